"""CMA-ES through pycma, with a population queue for steady-state dispatch.

pycma asks and tells whole populations. We keep the current population as a queue: ``ask(n)``
hands out its next ``n`` members (fewer, or none, once all are out), ``tell`` collects losses in
any order, and when the whole population is told we call ``es.tell`` and ``es.ask`` at once, so
the next generation's candidates are available as soon as the last one of this generation is told.
Ids are assigned when a population is sampled: same seed + same tells -> same ids and points.

RNG: pycma samples from the global ``numpy.random``. Every call into pycma runs with our own
RandomState installed there (and the caller's restored after), so the RNG is part of our state
and two optimizers in one process do not disturb each other. pycma's ``randn`` option is set to
``_GlobalRandn``, which looks ``np.random.randn`` up at each call, so pycma always draws from the
state installed there.

State: rebuilt by replaying the journal (``base``), never unpickled: an unpickled pycma in another
process cannot find its own genotypes (``sent_solutions`` is keyed by the salted ``hash`` of each
phenotype), re-derives them from clipped phenotypes, and diverges when a gene starts on a bound.

Multi-objective: scalarized by ``weights`` (default the mean). Non-finite losses rank last
(``finite_or``).
"""

from __future__ import annotations

from typing import Any, Sequence

import cma
import numpy as np

from evomerge.errors import ConfigError, did_you_mean
from evomerge.optimizers.base import Candidate, GlobalNumpyRNG, Optimizer, finite_or


class CMAES(Optimizer):
    name = "cmaes"

    def __init__(
        self,
        dim: int,
        lower: np.ndarray,
        upper: np.ndarray,
        x0: np.ndarray,
        seed: int,
        n_objectives: int = 1,
        *,
        sigma0: float | None = None,
        popsize: int | None = None,
        weights: Sequence[float] | None = None,
        cma_options: dict[str, Any] | None = None,
    ):
        """``sigma0``: initial step size in the genes' units (default a quarter of the median
        range); ``popsize``: default pycma's 4 + 3 ln(dim); ``cma_options``: passed to pycma
        (e.g. ``{"tolx": 1e-6, "CMA_diagonal": True}``)."""
        super().__init__(dim, lower, upper, x0, seed, n_objectives, weights)
        self.sigma0 = float(sigma0) if sigma0 is not None else 0.25 * float(np.median(self.upper - self.lower))
        if not self.sigma0 > 0:
            raise ConfigError(f"optimizer 'cmaes': sigma0 must be > 0, got {sigma0}")
        opts: dict[str, Any] = {
            "bounds": [self.lower.tolist(), self.upper.tolist()],
            "seed": float("nan"),  # pycma: "do nothing"; we seed self._rng
            "randn": _GlobalRandn(),
            "verbose": -9,
            # pycma stops after one generation of equal losses (tolfun, tolflatfitness); coarse
            # metrics (exact match on a few examples) or a generation of failures make that
            # common, and a search ends on its budget anyway: stop on x-convergence (tolx) only
            "tolfun": 0.0,
            "tolflatfitness": 10,
        }
        if popsize is not None:
            if int(popsize) < 2:
                raise ConfigError(f"optimizer 'cmaes': popsize must be >= 2, got {popsize}")
            opts["popsize"] = int(popsize)
        for key in cma_options or {}:
            if key not in cma.CMAOptions():
                raise ConfigError(f"optimizer 'cmaes': cma_options.{key} is not a pycma option;"
                                  f"{did_you_mean(key, cma.CMAOptions())} see cma.CMAOptions()")
        opts.update(cma_options or {})
        self._rng = GlobalNumpyRNG(self.seed)
        with self._rng:
            self.es = cma.CMAEvolutionStrategy(self.x0.tolist(), self.sigma0, opts)
        self.popsize = int(self.es.popsize)
        self.generation = 0
        self._population: list[tuple[int, np.ndarray]] = []  # (id, x as pycma returned it)
        self._handed = 0
        self._losses: dict[int, float] = {}
        self._sample()

    @property
    def generational(self) -> bool:
        return True

    @property
    def done(self) -> bool:
        """pycma's termination criteria held after the last generation (see ``stop_reasons``)."""
        return not self._population

    def stop_reasons(self) -> dict[str, Any]:
        return dict(self._stop())

    def _stop(self):
        with self._rng:
            return self.es.stop()

    def _ask(self, n: int) -> list[Candidate]:
        out = self._population[self._handed : self._handed + n]
        self._handed += len(out)
        return [Candidate(cid, np.clip(x, self.lower, self.upper)) for cid, x in out]

    def _tell(self, results: list[tuple[int, Any]]) -> None:
        ids = {cid for cid, _ in self._population}
        for cid, loss in results:
            assert cid in ids, f"candidate {cid} is not in the current generation"
            self._losses[cid] = self.scalarize(loss)
        if len(self._losses) == self.popsize:
            X = [x for _, x in self._population]
            F = finite_or([self._losses[cid] for cid, _ in self._population])
            with self._rng:
                self.es.tell(X, F)
            self.generation += 1
            self._losses = {}
            if not self._stop():
                self._sample()
            else:
                self._population, self._handed = [], 0

    def _sample(self) -> None:
        with self._rng:
            X = self.es.ask()
        self._population = [(self._new_id(), np.asarray(x, dtype=float)) for x in X]
        self._handed = 0


class _GlobalRandn:
    """``np.random.randn`` looked up at call time (so it draws from the installed state)."""

    def __call__(self, *shape: int) -> np.ndarray:
        return np.random.randn(*shape)
