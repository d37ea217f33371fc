"""Plots of runs (matplotlib, headless): a run's score over evaluations and its Pareto front over
tasks; several runs' best-so-far curves side by side (runs NAME-seedK grouped into one band)."""

from __future__ import annotations

import itertools
import re
import warnings
from pathlib import Path

import numpy as np

from evomerge.pareto import cost_front, pareto_front
from evomerge.run import REFERENCES, Run


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_run(run: Run, out_dir: Path | None = None) -> list[Path]:
    out_dir = Path(out_dir or run.path)
    evaluations = [e for e in run.evaluations() if e.ok]
    if not evaluations:
        return []
    paths = [plot_progress(run, out_dir / "score_over_evaluations.png"), plot_pareto(run, out_dir / "pareto_front.png")]
    if any(e.cost is not None for e in evaluations):
        paths.append(plot_cost_front(run, out_dir / "pareto_score_cost.png"))
    return paths


def plot_cost_front(run: Run, path: Path) -> Path:
    """Mean task score against serving cost per 1k queries: every candidate, the front, the models alone."""
    plt = _pyplot()
    evaluations = [e for e in run.evaluations() if e.ok and e.cost is not None]
    front = cost_front(evaluations)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter([e.serving_per_1k for e in evaluations], [np.mean(list(e.scores.values())) for e in evaluations],
               s=8, alpha=0.4, label="candidates")
    ax.step([p["usd_per_1k"] for p in front["front"]], [p["score"] for p in front["front"]], where="post",
            color="red", marker="o", markersize=4, label="Pareto front")
    for name, ref in (run.read_json(REFERENCES) or {}).items():
        if ref.get("scores") and ref.get("cost"):
            x, y = 1000.0 * ref["cost"]["serving_usd_per_query"], np.mean(list(ref["scores"].values()))
            ax.scatter(x, y, marker="x", color="black")
            ax.annotate(name, (x, y), fontsize=7)
    ax.set_xlabel("serving cost, USD per 1k queries (lower is better)")
    ax.set_ylabel("mean task score (higher is better)")
    reference = front["reference"]
    ax.set_title(f"{run.path.name}: score vs cost, hypervolume {front['hypervolume']:.3g} (reference: score "
                 f"{reference['score']:.3f}, ${reference['usd_per_1k']:.3g}/1k)" if reference else run.path.name, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_progress(run: Run, path: Path) -> Path:
    plt = _pyplot()
    evaluations = run.evaluations()
    x = np.arange(1, len(evaluations) + 1)
    objective = np.array([e.objective if e.ok else np.nan for e in evaluations])
    best = np.fmin.accumulate(np.where(np.isnan(objective), np.inf, objective))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.scatter(x, objective, s=8, alpha=0.5, label="candidate")
    ax.plot(x, best, color="black", label="best so far")
    for stage_start in [i for i in range(1, len(evaluations)) if evaluations[i].stage != evaluations[i - 1].stage]:
        ax.axvline(stage_start + 0.5, color="grey", linestyle=":", label="next stage")
    ax.set_xlabel("evaluations")
    ax.set_ylabel("objective (lower is better)")
    ax.set_title(f"{run.path.name}: objective over evaluations")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_pareto(run: Run, path: Path) -> Path:
    """Pairwise task scores: every candidate, the non-dominated ones, and the reference models."""
    plt = _pyplot()
    evaluations = [e for e in run.evaluations() if e.ok]
    front = pareto_front(evaluations)
    tasks = front["tasks"]
    pairs = list(itertools.combinations(tasks, 2)) or [(tasks[0], tasks[0])]
    columns = min(3, len(pairs))
    rows = (len(pairs) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3.6 * rows), squeeze=False)
    front_ids = {p["id"] for p in front["front"]}
    references = run.read_json(REFERENCES) or {}
    for ax, (a, b) in zip(axes.flat, pairs):
        ax.scatter([e.scores[a] for e in evaluations], [e.scores[b] for e in evaluations], s=6, alpha=0.3, label="candidates")
        on_front = [e for e in evaluations if e.id in front_ids]
        ax.scatter([e.scores[a] for e in on_front], [e.scores[b] for e in on_front], s=14, color="red", label="Pareto front")
        for name, ref in references.items():
            if ref.get("scores"):
                ax.scatter(ref["scores"][a], ref["scores"][b], marker="x", color="black")
                ax.annotate(name, (ref["scores"][a], ref["scores"][b]), fontsize=7)
        ax.set_xlabel(a)
        ax.set_ylabel(b)
    for ax in list(axes.flat)[len(pairs):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"{run.path.name}: task scores (higher is better), hypervolume {front['hypervolume']:.3g}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def method_of(run: Run) -> str:
    """PARENT/NAME without a seed suffix: runs/full/ties-seed0 and runs/full/ties-seed1 are one
    method, runs/lora/ties-seed0 another."""
    return f"{run.path.parent.name}/{re.sub(r'[-_]seed[0-9]+$', '', run.path.name)}"


def best_so_far(run: Run) -> np.ndarray:
    """Per evaluation, the best mean task score so far (higher is better; failures count as -inf).
    The mean task score, not the objective: presets add different penalties to their objectives."""
    scores = [float(np.mean(list(e.scores.values()))) if e.ok and e.scores else -np.inf for e in run.evaluations()]
    return np.maximum.accumulate(np.array(scores)) if scores else np.array([])


def plot_compare(runs: list[Run], path: Path, baselines: dict[str, float] | None = None, title: str = "") -> Path:
    """Best-so-far mean task score over evaluations, one line per method (mean over its seeds,
    band min..max, cut to the shortest seed), and optional horizontal baselines {label: score}."""
    plt = _pyplot()
    groups: dict[str, list[np.ndarray]] = {}
    for run in runs:
        curve = best_so_far(run)
        if len(curve):
            groups.setdefault(method_of(run), []).append(curve)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for method, curves in groups.items():
        n = min(len(c) for c in curves)
        stack = np.array([c[:n] for c in curves])
        stack[~np.isfinite(stack)] = np.nan  # a seed with no success yet: left out, not -inf
        x = np.arange(1, n + 1)
        with warnings.catch_warnings():  # columns where no seed has succeeded yet stay blank
            warnings.simplefilter("ignore", RuntimeWarning)
            mean, low, high = np.nanmean(stack, 0), np.nanmin(stack, 0), np.nanmax(stack, 0)
        line, = ax.plot(x, mean, label=f"{method} ({len(curves)} run{'s' if len(curves) > 1 else ''})")
        if len(curves) > 1:
            ax.fill_between(x, low, high, color=line.get_color(), alpha=0.15)
    styles = itertools.cycle(["--", ":", "-.", (0, (1, 4))])
    for label, value in (baselines or {}).items():
        ax.axhline(value, color="grey", linestyle=next(styles), label=label)
    ax.set_xlabel("evaluations")
    ax.set_ylabel("best mean task score so far (higher is better)")
    ax.set_title(title or "best so far, mean over seeds (band: min..max)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
