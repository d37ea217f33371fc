"""Fast synthetic objectives for the search loop's mechanics (config `objective: tests.objectives:NAME`).

Each takes a Recipe and returns per-task scores (higher is better), like an evaluated merge would.
Behaviour on real models is tested on the tiny demo zoo.
"""

from __future__ import annotations

import os
import time

from evomerge.recipe import Recipe


def quadratic(recipe: Recipe) -> dict[str, float]:
    """One 'task' per expert: best when that expert's weight is 1, the others' 0.2, densities 0.6."""
    delay = float(os.environ.get("EVOMERGE_TEST_DELAY", "0"))
    if delay:
        time.sleep(delay)
    names = list(recipe.experts)
    scores = {}
    for task in names:
        loss = 0.0
        for name, params in recipe.experts.items():
            loss += (params.weight - (1.0 if name == task else 0.2)) ** 2 + (params.density - 0.6) ** 2
        scores[task] = -loss
    return scores


def best_at_the_base(recipe: Recipe) -> dict[str, float]:
    """One task, best with every weight 0 (a base that already knows it): any merge hurts."""
    return {"task": -sum(abs(p.weight) + 0.1 * (1.0 - p.density) for p in recipe.experts.values())}


def fails_on_negative(recipe: Recipe) -> dict[str, float]:
    """Like quadratic, but a candidate with a negative weight raises (a failed merge)."""
    if any(p.weight < 0 for p in recipe.experts.values()):
        raise ValueError("negative weight: merged weights hold NaN")
    return quadratic(recipe)


def sleeps(recipe: Recipe) -> dict[str, float]:
    """Like quadratic, after 3 s: longer than a test's candidate timeout."""
    time.sleep(3.0)
    return quadratic(recipe)


def needs_environment(recipe: Recipe) -> dict[str, float]:
    """Like quadratic, in a worker that sees EVOMERGE_TEST_SEEN_BY_WORKERS (the environment of the
    search that started its cluster: a cluster left from an earlier search would not have it)."""
    if not os.environ.get("EVOMERGE_TEST_SEEN_BY_WORKERS"):
        raise RuntimeError("EVOMERGE_TEST_SEEN_BY_WORKERS is not set in this worker")
    return quadratic(recipe)


def fails_unless_weights_equal(recipe: Recipe) -> dict[str, float]:
    """Like quadratic while the weights are all equal (evo-merging's stage 1 fixes them at 1/N);
    a candidate of stage 2, which searches them, raises: a stage whose own genes break the merge."""
    weights = {round(p.weight, 9) for p in recipe.experts.values()}
    if len(weights) > 1:
        raise ValueError("merged weights hold NaN/Inf with unequal expert weights")
    return quadratic(recipe)
