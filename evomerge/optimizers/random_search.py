"""Uniform random search in the box: the baseline every search should beat.

A ``numpy.random.Generator`` (PCG64, seeded) draws each candidate; a restore replays the journal,
which draws the same numbers again. ``include_x0`` makes the first candidate ``x0`` (the preset's
starting recipe).
Multi-objective losses only feed ``best`` (scalarized by ``weights``, default the mean).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from evomerge.optimizers.base import Candidate, Optimizer


class RandomSearch(Optimizer):
    name = "random"

    @classmethod
    def options_from_context(cls, options, context):
        """It is done (asks nothing more) once the stage's budget is drawn."""
        return {"budget": context.budget, **options}

    def __init__(
        self,
        dim: int,
        lower: np.ndarray,
        upper: np.ndarray,
        x0: np.ndarray,
        seed: int,
        n_objectives: int = 1,
        *,
        include_x0: bool = False,
        budget: int | None = None,
        weights: Sequence[float] | None = None,
    ):
        """``budget``: stop (``done``) after this many candidates; None = open-ended."""
        super().__init__(dim, lower, upper, x0, seed, n_objectives, weights)
        self.rng = np.random.Generator(np.random.PCG64(self.seed))
        self.include_x0 = bool(include_x0)
        self.budget = None if budget is None else int(budget)

    @property
    def done(self) -> bool:
        return self.budget is not None and self._next_id >= self.budget

    def _ask(self, n: int) -> list[Candidate]:
        if self.budget is not None:
            n = min(n, self.budget - self._next_id)
        out = []
        for _ in range(n):
            cid = self._new_id()
            x = self.x0.copy() if (cid == 0 and self.include_x0) else self.rng.uniform(self.lower, self.upper)
            out.append(Candidate(cid, x))
        return out

    def _tell(self, results: list[tuple[int, Any]]) -> None:
        pass  # nothing to learn; ``best`` is kept by the base class
