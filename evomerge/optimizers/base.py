"""The Optimizer contract: ask / tell / state_dict, like Optuna's samplers.

The search loop only ever sees this class. A backend proposes points in a box (``lower`` ..
``upper``, a flat float vector of length ``dim``) and is told losses to MINIMIZE, per candidate id,
in any order. Ids increase monotonically and are stable: the same seed and the same sequence of
tells give the same ids and the same points, whether or not the optimizer was serialized and
restored in between (``state_dict`` holds the whole state, RNG included).

Multi-objective: ``n_objectives > 1`` means each tell carries a list of that many losses.
Backends that are single-objective (cmaes, random) scalarize with ``weights`` (default: the mean
of the objectives; see ``scalarize``). nevergrad receives the list as is.

Failed candidates: the loop should tell a penalized value. A non-finite loss (nan, inf) is accepted
and each backend replaces it by something it can rank (documented there).
"""

from __future__ import annotations

import math
import pickle
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from evomerge.errors import ConfigError

Loss = float | Sequence[float]

_STATE_VERSION = 1


@dataclass(frozen=True, eq=False)
class Candidate:
    """One proposal: a stable id and a point inside the bounds."""

    id: int
    x: np.ndarray

    def __repr__(self) -> str:
        return f"Candidate(id={self.id}, x={np.array2string(self.x, precision=4)})"


class Optimizer(ABC):
    """Ask/tell over a box. Subclasses implement ``_ask`` and ``_tell`` (see the module doc)."""

    #: registry name, set by each backend
    name: str = ""

    def __init__(
        self,
        dim: int,
        lower: np.ndarray,
        upper: np.ndarray,
        x0: np.ndarray,
        seed: int,
        n_objectives: int = 1,
        weights: Sequence[float] | None = None,
    ):
        self.dim = int(dim)
        if self.dim < 1:
            raise ConfigError(f"optimizer {self.name!r}: the search space has no genes (dim={dim})")
        self.lower = _vector(lower, self.dim, "lower")
        self.upper = _vector(upper, self.dim, "upper")
        self.x0 = _vector(x0, self.dim, "x0")
        bad = np.flatnonzero(~(self.lower < self.upper))
        if bad.size:
            i = int(bad[0])
            raise ConfigError(
                f"optimizer {self.name!r}: gene {i} has lower {self.lower[i]} >= upper {self.upper[i]}"
                " (fix the bounds, or make the gene fixed instead of searched)"
            )
        out = np.flatnonzero((self.x0 < self.lower) | (self.x0 > self.upper))
        if out.size:
            i = int(out[0])
            raise ConfigError(
                f"optimizer {self.name!r}: x0[{i}] = {self.x0[i]} is outside [{self.lower[i]}, {self.upper[i]}]"
            )
        self.seed = int(seed)
        self.n_objectives = int(n_objectives)
        if self.n_objectives < 1:
            raise ConfigError(f"optimizer {self.name!r}: n_objectives must be >= 1, got {n_objectives}")
        if weights is None:
            self.weights = np.full(self.n_objectives, 1.0 / self.n_objectives)
        else:
            self.weights = np.asarray(weights, dtype=float)
            if self.weights.shape != (self.n_objectives,):
                raise ConfigError(
                    f"optimizer {self.name!r}: weights has {self.weights.size} entries,"
                    f" expected one per objective ({self.n_objectives})"
                )
        self._next_id = 0
        self._pending: dict[int, np.ndarray] = {}  # asked, not yet told
        self.n_told = 0
        self.best: tuple[int, np.ndarray, float] | None = None  # (id, x, scalarized loss)

    # -- the contract ---------------------------------------------------------------------------

    def ask(self, n: int = 1) -> list[Candidate]:
        """Up to ``n`` new candidates. Fewer (even none) when a generational backend waits for
        the tells that complete its current generation, or when ``done``."""
        if n < 0:
            raise ValueError(f"ask(n) needs n >= 0, got {n}")
        if n == 0 or self.done:
            return []
        cands = self._ask(n)
        for c in cands:
            self._pending[c.id] = c.x
        return cands

    def tell(self, results: Sequence[tuple[int, Loss]]) -> None:
        """Losses to minimize, per candidate id, in any order, any grouping."""
        checked = []
        for cid, loss in results:
            cid = int(cid)
            if cid not in self._pending:
                raise ValueError(f"tell: candidate {cid} was not asked, or was already told")
            checked.append((cid, self._check_loss(cid, loss)))
        if len({cid for cid, _ in checked}) != len(checked):
            raise ValueError("tell: the same candidate id appears twice in one tell")
        for cid, loss in checked:
            x = self._pending.pop(cid)
            self.n_told += 1
            s = self.scalarize(loss)
            if math.isfinite(s) and (self.best is None or s < self.best[2]):
                self.best = (cid, x, s)
        self._tell(checked)

    def state_dict(self) -> bytes:
        """The whole state (backend, counters, RNG) as bytes (pickle)."""
        return pickle.dumps(
            {"class": type(self).__name__, "version": _STATE_VERSION, "dim": self.dim, "state": self._get_state()},
            protocol=pickle.HIGHEST_PROTOCOL,
        )

    def load_state_dict(self, b: bytes) -> None:
        blob = pickle.loads(b)
        if blob.get("class") != type(self).__name__:
            raise ConfigError(
                f"checkpoint holds a {blob.get('class')} optimizer state, not {type(self).__name__}:"
                " resume with the optimizer the run was started with"
            )
        if blob.get("dim") != self.dim:
            raise ConfigError(
                f"checkpoint optimizer has {blob.get('dim')} genes, this search space has {self.dim}:"
                " resume with the search space the run was started with"
            )
        self.__dict__.clear()
        self._set_state(blob["state"])

    def _get_state(self) -> dict[str, Any]:
        """What ``state_dict`` pickles; by default every attribute."""
        return self.__dict__

    def _set_state(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    @property
    def generational(self) -> bool:
        """True when the backend updates only after a whole population is told (cmaes)."""
        return False

    @property
    def done(self) -> bool:
        """True when there is nothing more to ask (grid exhausted, CMA-ES converged)."""
        return False

    @property
    def in_flight(self) -> list[int]:
        """Ids asked and not yet told."""
        return sorted(self._pending)

    # -- helpers for backends -------------------------------------------------------------------

    def scalarize(self, loss: Loss) -> float:
        """One number from a loss: itself, or ``weights . losses`` (default weights: the mean)."""
        if self.n_objectives == 1:
            return float(loss)  # type: ignore[arg-type]
        return float(np.dot(self.weights, np.asarray(loss, dtype=float)))

    def _new_id(self) -> int:
        cid = self._next_id
        self._next_id += 1
        return cid

    def _check_loss(self, cid: int, loss: Loss) -> float | list[float]:
        if self.n_objectives == 1:
            if isinstance(loss, (list, tuple, np.ndarray)):
                if len(loss) != 1:
                    raise ValueError(f"tell: candidate {cid} has {len(loss)} losses, expected 1")
                loss = loss[0]
            return float(loss)
        if not isinstance(loss, (list, tuple, np.ndarray)) or len(loss) != self.n_objectives:
            raise ValueError(f"tell: candidate {cid} needs a list of {self.n_objectives} losses, got {loss!r}")
        return [float(v) for v in loss]

    @abstractmethod
    def _ask(self, n: int) -> list[Candidate]: ...

    @abstractmethod
    def _tell(self, results: list[tuple[int, Any]]) -> None: ...


class GlobalNumpyRNG:
    """A private state for the global ``numpy.random``, for libraries that sample from it (pycma,
    parts of nevergrad). ``with rng:`` installs it, and on exit saves it and restores the caller's.
    Picklable, so it travels in ``state_dict``."""

    def __init__(self, seed: int):
        self.state = np.random.RandomState(seed).get_state()

    def __enter__(self) -> "GlobalNumpyRNG":
        self._saved = np.random.get_state()
        np.random.set_state(self.state)
        return self

    def __exit__(self, *exc) -> None:
        self.state = np.random.get_state()
        np.random.set_state(self._saved)
        del self._saved

    def __getstate__(self):
        return {"state": self.state}


def _vector(v: Any, dim: int, what: str) -> np.ndarray:
    a = np.array(v, dtype=float).reshape(-1)
    if a.shape != (dim,):
        raise ConfigError(f"optimizer: {what} has {a.size} entries, the search space has {dim} genes")
    if not np.all(np.isfinite(a)):
        raise ConfigError(f"optimizer: {what} must be finite, got {a}")
    return a


def finite_or(values: Sequence[float], fallback: float = 1e12) -> list[float]:
    """Replace non-finite losses by (worst finite value + 1 + |worst|), or ``fallback`` when none
    is finite: a failed candidate ranks last without poisoning an update with nan/inf."""
    finite = [v for v in values if math.isfinite(v)]
    worst = max(finite) + 1.0 + abs(max(finite)) if finite else fallback
    return [v if math.isfinite(v) else worst for v in values]
