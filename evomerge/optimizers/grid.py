"""An explicit list of points, asked in order: baselines, sweeps, re-evaluations.

``points`` is a list of genomes (each of length ``dim``, inside the bounds), or a name the stage's
space turns into genomes: ``classic`` (the fixed-recipe baselines), ``scales`` (every weight at
one value, for each value of ``scales``). ``done`` once every
point has been asked (the loop still collects the ones in flight). ``seed`` is unused.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from evomerge.errors import ConfigError
from evomerge.optimizers.base import Candidate, Optimizer


class Grid(Optimizer):
    name = "grid"

    @classmethod
    def options_from_context(cls, options, context):
        """`points: classic`: the fixed-recipe baselines of the stage's space; `points: scales`
        (optionally `scales: [c, ...]`): every weight at c, for each c (evomerge.baselines)."""
        if options.get("points") == "classic":
            from evomerge.baselines import classic_grid

            options = {**options, "points": classic_grid(context.space)}
        elif options.get("points") == "scales":
            from evomerge.baselines import SCALES, scale_grid

            options = dict(options)
            options["points"] = scale_grid(context.space, options.pop("scales", SCALES))
        elif "scales" in options:
            raise ConfigError("optimizer 'grid': `scales` goes with `points: scales`")
        return options

    def __init__(
        self,
        dim: int,
        lower: np.ndarray,
        upper: np.ndarray,
        x0: np.ndarray,
        seed: int,
        n_objectives: int = 1,
        *,
        points: Sequence[Sequence[float]],
        weights: Sequence[float] | None = None,
    ):
        super().__init__(dim, lower, upper, x0, seed, n_objectives, weights)
        self.points = []
        for i, p in enumerate(points):
            x = np.asarray(p, dtype=float).reshape(-1)
            if x.shape != (self.dim,):
                raise ConfigError(f"optimizer 'grid': point {i} has {x.size} values, the space has {self.dim} genes")
            if np.any(x < self.lower) or np.any(x > self.upper):
                raise ConfigError(f"optimizer 'grid': point {i} {x.tolist()} is outside the bounds")
            self.points.append(x)
        if not self.points:
            raise ConfigError("optimizer 'grid': `points` is empty")

    @property
    def done(self) -> bool:
        return self._next_id >= len(self.points)

    def _ask(self, n: int) -> list[Candidate]:
        out = []
        while len(out) < n and self._next_id < len(self.points):
            cid = self._new_id()
            out.append(Candidate(cid, self.points[cid].copy()))
        return out

    def _tell(self, results: list[tuple[int, Any]]) -> None:
        pass
