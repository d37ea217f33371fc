"""Any nevergrad optimizer by name (NGOpt, TwoPointsDE, DE, PSO, OnePlusOne, CMA, ...).

The genes are one ``ng.p.Array`` with the box bounds, seeded through
``parametrization.random_state``; nevergrad's own candidate objects are kept per id so tells can
come in any order. Not generational: nevergrad takes a tell for any asked candidate at any time.
At most ``num_workers`` candidates are in flight: ``ask`` hands out fewer beyond that, because
nevergrad's sequential optimizers (which NGOpt picks for num_workers=1, e.g. Cobyla/SQP run in a
thread) block forever on a second ask before a tell.

State: like every backend (see ``base``), rebuilt on a restore by replaying the journal of asks
and tells into a fresh nevergrad optimizer with the same seed (Optuna-journal style), which works
for the thread-based sequential optimizers too; nothing is pickled.

numpy >= 2.4 and nevergrad 1.0.12: nevergrad's MetaModel (which NGOpt picks for small budgets)
calls ``float()`` on a one-element array, a TypeError since numpy 2.4 (nevergrad issue #1612).
``_patch_metamodel`` gives that one module a ``float`` that accepts one-element arrays.

Multi-objective (``n_objectives > 1``): the list of losses goes to nevergrad as is, and
``pareto()`` returns its current front. A non-finite loss is told as (worst finite loss seen so
far + 1 + |worst|), or 1e12 before any finite one.
"""

from __future__ import annotations

import builtins
import math
from typing import Any, Sequence

import nevergrad as ng
import numpy as np

from evomerge.errors import ConfigError, did_you_mean
from evomerge.optimizers.base import Candidate, GlobalNumpyRNG, Optimizer


def _patch_metamodel() -> None:
    from nevergrad.optimization import metamodel

    def lenient_float(v: Any = 0.0) -> float:
        if isinstance(v, np.ndarray) and v.size == 1:
            return builtins.float(v.reshape(-1)[0])
        return builtins.float(v)

    if np.lib.NumpyVersion(np.__version__) >= "2.4.0" and not hasattr(metamodel, "float"):
        metamodel.float = lenient_float  # module globals shadow builtins


_patch_metamodel()


class Nevergrad(Optimizer):
    name = "nevergrad"

    @classmethod
    def options_from_context(cls, options, context):
        """nevergrad plans for its budget (NGOpt picks an algorithm from it) and for how many
        candidates are out at once."""
        return {"budget": context.budget, "num_workers": context.workers, **options}

    def __init__(
        self,
        dim: int,
        lower: np.ndarray,
        upper: np.ndarray,
        x0: np.ndarray,
        seed: int,
        n_objectives: int = 1,
        *,
        name: str = "NGOpt",
        budget: int | None = None,
        num_workers: int = 1,
        weights: Sequence[float] | None = None,
    ):
        """``name``: a key of ``ng.optimizers.registry``; ``budget``: number of evaluations
        (NGOpt picks its algorithm from it; None = open-ended); ``num_workers``: candidates in
        flight at once; ``weights``: only for ``best`` with several objectives."""
        super().__init__(dim, lower, upper, x0, seed, n_objectives, weights)
        if name not in ng.optimizers.registry:
            hint = did_you_mean(name, ng.optimizers.registry, n=3)
            raise ConfigError(
                f"unknown nevergrad optimizer {name!r};{hint} see nevergrad.optimizers.registry"
                " (e.g. NGOpt, TwoPointsDE, DE, PSO, OnePlusOne, CMA)"
            )
        if int(num_workers) < 1:
            raise ConfigError(f"optimizer 'nevergrad': num_workers must be >= 1, got {num_workers}")
        self.ng_name = name
        self.budget = None if budget is None else int(budget)
        self.num_workers = int(num_workers)
        self._worst = -math.inf
        self._build()
        from nevergrad.optimization.optimizerlib import NGOptBase

        if self.budget is None and isinstance(self.opt, NGOptBase):
            raise ConfigError(f"nevergrad {name} picks its algorithm from the budget: give `budget:` (evaluations)")

    def _build(self) -> None:
        param = ng.p.Array(init=self.x0.copy(), lower=self.lower.copy(), upper=self.upper.copy())
        param.random_state.seed(self.seed)
        self._rng = GlobalNumpyRNG(self.seed)
        with self._rng:
            self.opt = ng.optimizers.registry[self.ng_name](
                parametrization=param, budget=self.budget, num_workers=self.num_workers
            )
        self._cands: dict[int, Any] = {}  # id -> nevergrad candidate, until told
        self._ids_by_uid: dict[str, int] = {}  # told candidates, for pareto()

    def _ask(self, n: int) -> list[Candidate]:
        n = min(n, self.num_workers - len(self._cands))
        out = []
        with self._rng:
            for _ in range(n):
                c = self.opt.ask()
                cid = self._new_id()
                self._cands[cid] = c
                out.append(Candidate(cid, np.clip(np.asarray(c.value, dtype=float), self.lower, self.upper)))
        return out

    def _tell(self, results: list[tuple[int, Any]]) -> None:
        told = [(cid, self._finite(loss)) for cid, loss in results]
        with self._rng:
            self._tell_ng(told)

    def _tell_ng(self, told: list[tuple[int, Any]]) -> None:
        for cid, loss in told:
            c = self._cands.pop(cid)
            self._ids_by_uid[c.uid] = cid
            self.opt.tell(c, loss)

    def _finite(self, loss: float | list[float]) -> float | list[float]:
        values = [loss] if isinstance(loss, float) else list(loss)
        for v in values:
            if math.isfinite(v):
                self._worst = max(self._worst, v)
        fill = self._worst + 1.0 + abs(self._worst) if math.isfinite(self._worst) else 1e12
        values = [v if math.isfinite(v) else fill for v in values]
        return values[0] if isinstance(loss, float) else values

    def pareto(self) -> list[tuple[int, np.ndarray, list[float]]]:
        """The current non-dominated set: (id, x, losses) per point (multi-objective only)."""
        if self.n_objectives == 1:
            raise ValueError("pareto() needs n_objectives > 1")
        with self._rng:
            front = self.opt.pareto_front()
        return [
            (self._ids_by_uid.get(c.uid, -1), np.asarray(c.value, dtype=float), [float(v) for v in c.losses])
            for c in front
        ]
