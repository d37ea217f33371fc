"""The Optimizer contract: ask / tell / state_dict, like Optuna's samplers.

The search loop only ever sees this class. A backend proposes points in a box (``lower`` ..
``upper``, a flat float vector of length ``dim``) and is told losses to MINIMIZE, per candidate id,
in any order. Ids increase monotonically and are stable: the same seed and the same sequence of
tells give the same ids and the same points, whether or not the optimizer was serialized and
restored in between.

State (``state_dict``) is plain data, never a pickle: how the optimizer was built (its constructor's
arguments) and its journal, every ask and tell in order with the losses told. ``load_state_dict``
builds the optimizer again from those arguments and replays the journal into it, so the backend
(pycma, nevergrad, the RNGs) reaches exactly the state it had, in this process: nothing from
another process (pycma's ``sent_solutions`` is keyed by Python's per-process salted ``hash``)
and no code from a checkpoint file. Restoring costs one replay, milliseconds per generation.

Multi-objective: ``n_objectives > 1`` means each tell carries a list of that many losses.
Backends that are single-objective (cmaes, random) scalarize with ``weights`` (default: the mean
of the objectives; see ``scalarize``). nevergrad receives the list as is.

Failed candidates: the loop should tell a penalized value. A non-finite loss (nan, inf) is accepted
and each backend replaces it by something it can rank (documented there).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from evomerge.errors import ConfigError

Loss = float | Sequence[float]

STATE_FORMAT = 2  # 1 was a pickle (evomerge <= 0.x): refused


@dataclass(frozen=True, eq=False)
class Bounds:
    """The box a stage searches, and where it starts."""

    lower: np.ndarray
    upper: np.ndarray
    x0: np.ndarray

    @property
    def dim(self) -> int:
        return len(self.lower)


@dataclass(frozen=True)
class SearchContext:
    """What a search tells its optimizer besides the bounds: the stage's budget, how many
    candidates run at once, and the stage's search space (presets derive points from it)."""

    budget: int
    workers: int = 1
    space: Any = None


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

    def __new__(cls, *args: Any, **kwargs: Any):
        self = super().__new__(cls)
        self._init_args = (args, kwargs)  # what state_dict records to build this optimizer again
        return self

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
        self._journal: list[tuple[str, Any]] = []  # ("ask", n) | ("tell", ((id, loss), ...)), in order
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
        if cands:
            if self._journal and self._journal[-1][0] == "ask":  # n asks of 1 replay as one ask of n
                self._journal[-1] = ("ask", self._journal[-1][1] + len(cands))
            else:
                self._journal.append(("ask", len(cands)))
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
        self._journal.append(("tell", tuple(checked)))
        self._tell(checked)

    def state_dict(self) -> dict[str, Any]:
        """The whole state as JSON-able data: the constructor's arguments and the journal."""
        args, kwargs = self._init_args
        return {"format": STATE_FORMAT, "class": type(self).__name__, "dim": self.dim,
                "init": {"args": plain(args), "kwargs": plain(kwargs)},
                "journal": plain(self._journal)}

    def load_state_dict(self, state: Any) -> None:
        """Become the optimizer ``state`` describes: this one built again (fresh) and the state's
        journal replayed into it. A state that is not this format, this backend, this many genes,
        or was built with other arguments (seed, bounds, options) is a ConfigError: a checkpoint
        cannot choose what this optimizer is, only replay what the run told it."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            found = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise ConfigError(f"optimizer state has format {found!r}; this evomerge reads format {STATE_FORMAT}")
        if state.get("class") != type(self).__name__:
            raise ConfigError(
                f"checkpoint holds a {state.get('class')} optimizer state, not {type(self).__name__}:"
                " resume with the optimizer the run was started with"
            )
        if state.get("dim") != self.dim:
            raise ConfigError(
                f"checkpoint optimizer has {state.get('dim')} genes, this search space has {self.dim}:"
                " resume with the search space the run was started with"
            )
        args, kwargs = self._init_args
        saved = state.get("init") or {}
        if plain(args) != saved.get("args") or plain(kwargs) != saved.get("kwargs"):
            ours, theirs = plain(kwargs), saved.get("kwargs") or {}
            keys = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k)) or ["positional arguments"]
            raise ConfigError(f"checkpoint's {self.name} optimizer was built with another {keys[0]} than this config "
                              "gives: resume with the config the run was started with")
        self.__dict__.clear()
        self.__init__(*args, **kwargs)
        self._init_args = (args, kwargs)
        self.replay(state["journal"])

    def replay(self, journal: Sequence[Sequence[Any]]) -> None:
        """Ask and tell as ``journal`` says (see ``state_dict``); every ask must come out as many
        candidates as it did, or the backend is not reproducible and cannot resume."""
        for kind, value in journal:
            if kind == "ask":
                got = len(self.ask(int(value)))
                if got != int(value):
                    raise ConfigError(f"optimizer {self.name!r}: replaying its journal, an ask gave {got} candidates"
                                      f" where the run got {value}: this optimizer cannot resume")
            elif kind == "tell":
                self.tell([(int(cid), loss) for cid, loss in value])
            else:
                raise ConfigError(f"optimizer state: unknown journal entry {kind!r}")

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

    def pending(self) -> dict[int, np.ndarray]:
        """The candidates asked and not yet told: id -> x."""
        return {cid: x.copy() for cid, x in self._pending.items()}

    @property
    def n_asked(self) -> int:
        """Candidates asked so far; ids run 0 .. n_asked - 1."""
        return self._next_id

    @property
    def n_proposed(self) -> int:
        """Candidates `ask` has handed out (told or still out); a generational backend may have
        numbered more (n_asked) for the generation it holds back."""
        return self.n_told + len(self._pending)

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

    @classmethod
    def options_from_context(cls, options: dict[str, Any], context: SearchContext) -> dict[str, Any]:
        """The options a search gives this backend, from its context, where the config left them
        unset (nevergrad's budget and num_workers, a grid's points...). Default: none."""
        return options

    @abstractmethod
    def _ask(self, n: int) -> list[Candidate]: ...

    @abstractmethod
    def _tell(self, results: list[tuple[int, Any]]) -> None: ...


class GlobalNumpyRNG:
    """A private state for the global ``numpy.random``, for libraries that sample from it (pycma,
    parts of nevergrad). ``with rng:`` installs it, and on exit saves it and restores the caller's.
    Rebuilt from its seed and the journal on a restore, like the rest of the state."""

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


def plain(value: Any) -> Any:
    """``value`` with numpy arrays and scalars as lists and numbers, tuples as lists (for JSON)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    return value


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
