"""Baselines: the classic recipes as grid points of a search space, so a grid "search" over them
runs in the same loop and run-directory format as every other search and reads against it.

Grids (FusionBench's and the papers' usual ranges): task arithmetic lambda 0.1..1.0; TIES,
DARE-TIES, Breadcrumbs-TIES density {0.1, 0.3, 0.5, 0.7, 0.9} x lambda {0.5, 1.0, 1.5}; DELLA
density {0.3, 0.5, 0.7} (density +- epsilon 0.15 must stay inside (0, 1)) x the same lambdas.
"""

from __future__ import annotations

import numpy as np

from evomerge.errors import ConfigError
from evomerge.recipe import Recipe

LAMBDAS_TA = [round(0.1 * i, 1) for i in range(1, 11)]
LAMBDAS = [0.5, 1.0, 1.5]
DENSITIES = {"ties": [0.1, 0.3, 0.5, 0.7, 0.9], "dare_ties": [0.1, 0.3, 0.5, 0.7, 0.9],
             "breadcrumbs_ties": [0.1, 0.3, 0.5, 0.7, 0.9], "della": [0.3, 0.5, 0.7]}


def classic_settings(methods: list[str]) -> list[tuple[str, float, float]]:
    """(method, density, lambda) for every grid point of the given methods."""
    settings = []
    for method in methods:
        if method == "task_arithmetic":
            settings += [(method, 1.0, lam) for lam in LAMBDAS_TA]
        elif method in DENSITIES:
            settings += [(method, d, lam) for d in DENSITIES[method] for lam in LAMBDAS]
        else:
            raise ConfigError(f"no classic grid for method {method!r}; classic grids: task_arithmetic, {', '.join(DENSITIES)}")
    return settings


def classic_grid(space) -> list[list[float]]:
    """Genomes of `space` (the `classic` preset or any space with genes method, density[*], lambda)."""
    names = space.names()
    if "lambda" not in names:
        raise ConfigError("`points: classic` needs a space that searches lambda (e.g. the `classic` preset)")
    points = []
    for method, density, lam in classic_settings(space.methods):
        x = np.array(space.x0, dtype=float)
        for i, name in enumerate(names):
            if name == "method":
                x[i] = space.methods.index(method) + 0.5
            elif name.startswith("density["):
                x[i] = density
            elif name == "lambda":
                x[i] = lam
        points.append(x.tolist())
    return points


SCALES = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)  # uniform weights worth one evaluation each


def scale_grid(space, scales=SCALES) -> list[list[float]]:
    """Genomes of `space` with every weight gene at one value c, for each c in `scales` (task
    arithmetic's lambda sweep over the whole pool; c = 0 is the base), clipped to the genes' bounds;
    other searched genes stay at their start. Where a good merge sits differs from pool to pool
    (every weight near 0 over a base that knows the tasks, near 0.7 over one that knows none), so a
    search starting from the best of these starts on the right scale."""
    names = space.names()
    weights = [i for i, name in enumerate(names) if name.startswith("weight[")]
    if not weights:
        raise ConfigError("`points: scales` needs a space that searches the experts' weights")
    points = []
    for c in scales:
        x = np.array(space.x0, dtype=float)
        x[weights] = np.clip(float(c), space.lower[weights], space.upper[weights])
        points.append(x.tolist())
    return points


def reference_recipes(experts: list[str]) -> dict[str, Recipe]:
    """The base (every weight 0) and each expert alone (its weight 1), as recipes, keyed "base" and
    by expert name: every run reads its candidates against these."""
    def only(name: str | None) -> Recipe:
        return Recipe(method="evo_merging", experts={e: {"weight": float(e == name), "density": 1.0} for e in experts})

    return {"base": only(None), **{name: only(name) for name in experts}}
