"""Pareto fronts of a run's evaluations: over the per-task scores (every run), and over mean score
and serving cost (runs over API models), each with its hypervolume (moocore) and reference point."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from evomerge.run import Evaluation


def pareto_front(evaluations: list["Evaluation"]) -> dict[str, Any]:
    """Non-dominated ok evaluations over the per-task scores (all maximized), with hypervolume.

    The hypervolume's reference point is the worst score per task among all ok evaluations, so the
    number grows as the front advances and is comparable across snapshots of one run.
    """
    ok = [e for e in evaluations if e.ok and e.scores]
    if not ok:
        return {"tasks": [], "front": [], "hypervolume": 0.0, "reference": []}
    tasks = sorted(ok[0].scores)
    points = np.array([[e.scores[t] for t in tasks] for e in ok])
    keep = [i for i in range(len(ok)) if not _dominated(points[i], points)]
    reference = points.min(axis=0)
    return {
        "tasks": tasks,
        "front": [{"id": ok[i].id, "scores": ok[i].scores, "objective": ok[i].objective} for i in keep],
        "hypervolume": hypervolume(points[keep], reference),
        "reference": reference.tolist(),
    }


def cost_front(evaluations: list["Evaluation"]) -> dict[str, Any]:
    """Non-dominated ok evaluations over (mean task score: maximized, serving USD per 1k queries:
    minimized), for runs over API models. The hypervolume's reference point is the worst score and
    the highest cost among all ok evaluations (stated in the result: `reference`)."""
    ok = [e for e in evaluations if e.ok and e.scores and e.cost is not None]
    if not ok:
        return {"axes": ["score", "usd_per_1k"], "front": [], "hypervolume": 0.0, "reference": []}
    points = np.array([[float(np.mean(list(e.scores.values()))), -e.serving_per_1k] for e in ok])
    keep = sorted((i for i in range(len(ok)) if not _dominated(points[i], points)), key=lambda i: -points[i, 1])
    reference = points.min(axis=0)
    return {
        "axes": ["score", "usd_per_1k"],
        "front": [{"id": ok[i].id, "score": points[i, 0], "usd_per_1k": -points[i, 1],
                   "queried": ok[i].cost.get("queried", [])} for i in keep],
        "hypervolume": hypervolume(points[keep], reference),
        "reference": {"score": reference[0], "usd_per_1k": -reference[1]},
    }


def _dominated(point: np.ndarray, points: np.ndarray) -> bool:
    better_or_equal = (points >= point).all(axis=1)
    strictly_better = (points > point).any(axis=1)
    return bool((better_or_equal & strictly_better).any())


HYPERVOLUME_MAX_DIM = 31  # moocore's hypervolume (exact and approximate) takes at most 31 objectives


def hypervolume(front: np.ndarray, reference: np.ndarray) -> float | None:
    """Volume dominated by a maximization front above `reference` (moocore's exact indicator);
    None beyond HYPERVOLUME_MAX_DIM objectives (a suite of more tasks still has its front)."""
    if len(front) == 0:
        return 0.0
    if np.shape(front)[1] > HYPERVOLUME_MAX_DIM:
        return None
    import moocore

    return float(moocore.hypervolume(np.asarray(front, dtype=float), ref=np.asarray(reference, dtype=float),
                                     maximise=True))


def hypervolume_text(value: float | None, digits: int = 4) -> str:
    """The hypervolume as a title shows it; None says why there is none."""
    return f"n/a (over {HYPERVOLUME_MAX_DIM} tasks)" if value is None else f"{value:.{digits}g}"
