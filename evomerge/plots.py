"""Plots of runs (matplotlib, headless): a run's score over evaluations and its Pareto front over
tasks (pairs of tasks, or parallel coordinates when there are many); several runs' best-so-far
curves side by side (runs NAME-seedK over one pool grouped into one band, never across pools).

The grouping helpers (method_of, pool_label, best_so_far_of, band) are also what the web dashboard
(evomerge/dashboard) draws with, so the PNGs and the page agree; none of them imports matplotlib."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import textwrap
import urllib.parse
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from evomerge.pareto import cost_front, hypervolume_text, pareto_front
from evomerge.poolspec import spec_kind
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


PAIRS_UP_TO = 3  # tasks; beyond this the pairwise grid is too many panels to read: parallel coordinates


def plot_pareto(run: Run, path: Path) -> Path:
    """The front over tasks: every candidate, the non-dominated ones and the reference models, as
    pairs of tasks (up to PAIRS_UP_TO tasks) or parallel coordinates (more); the title states the
    hypervolume and its reference point."""
    plt = _pyplot()
    evaluations = [e for e in run.evaluations() if e.ok and e.scores]
    front = pareto_front(evaluations)
    references = {name: ref["scores"] for name, ref in (run.read_json(REFERENCES) or {}).items()
                  if ref.get("scores") and set(front["tasks"]) <= set(ref["scores"])}
    draw = _pareto_pairs if len(front["tasks"]) <= PAIRS_UP_TO else _pareto_parallel
    fig = draw(plt, evaluations, front, references)
    fig.suptitle(f"{run.path.name}: task scores (higher is better), hypervolume {hypervolume_text(front['hypervolume'], 3)}", fontsize=10)
    fig.text(0.01, 0.005, _reference_caption(front), fontsize=7, va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _reference_caption(front: dict) -> str:
    """Where the hypervolume is measured from: without it the number cannot be compared or redone."""
    point = ", ".join(f"{task} {value:.4g}" for task, value in zip(front["tasks"], front["reference"]))
    return "\n".join(textwrap.wrap(f"hypervolume reference point (the worst score per task over this run's "
                                   f"candidates): {point}", 160))


def _pareto_pairs(plt, evaluations, front: dict, references: dict):
    tasks = front["tasks"]
    pairs = list(itertools.combinations(tasks, 2)) or [(tasks[0], tasks[0])]
    columns = min(3, len(pairs))
    rows = (len(pairs) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3.6 * rows + 0.6), squeeze=False)
    front_ids = {p["id"] for p in front["front"]}
    on_front = [e for e in evaluations if e.id in front_ids]
    for ax, (a, b) in zip(axes.flat, pairs):
        ax.scatter([e.scores[a] for e in evaluations], [e.scores[b] for e in evaluations], s=6, alpha=0.3,
                   label="candidates")
        ax.scatter([e.scores[a] for e in on_front], [e.scores[b] for e in on_front], s=14, color="red",
                   label="Pareto front")
        for name, scores in references.items():
            ax.scatter(scores[a], scores[b], marker="x", color="black", label="base / experts")
            ax.annotate(name, (scores[a], scores[b]), fontsize=7)
        ax.set_xlabel(a)
        ax.set_ylabel(b)
    for ax in list(axes.flat)[len(pairs):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    unique = dict(zip(labels, handles))  # one entry per kind, not one per reference model
    fig.legend(unique.values(), unique.keys(), loc="lower right", ncol=3, fontsize=7)
    return fig


def _pareto_parallel(plt, evaluations, front: dict, references: dict):
    """One vertical axis per task, scaled to its own range (tasks' scores differ in scale); a line
    per candidate, the front in red, the base and experts dashed and named at the right."""
    tasks = front["tasks"]
    points = np.array([[e.scores[t] for t in tasks] for e in evaluations])
    every = np.vstack([points, *([list(s[t] for t in tasks)] for s in references.values())])
    low, high = every.min(axis=0), every.max(axis=0)
    span = np.where(high > low, high - low, 1.0)
    x = np.arange(len(tasks))
    fig, ax = plt.subplots(figsize=(max(7.0, 1.1 * len(tasks) + 2), 4.8))
    front_ids = {p["id"] for p in front["front"]}
    for e, row in zip(evaluations, points):
        if e.id not in front_ids:
            ax.plot(x, (row - low) / span, color="grey", alpha=0.15, linewidth=0.7)
    for e, row in zip(evaluations, points):
        if e.id in front_ids:
            ax.plot(x, (row - low) / span, color="red", alpha=0.8, linewidth=1.2)
    styles = itertools.cycle(["--", ":", "-.", (0, (1, 4))])
    for name, scores in references.items():
        y = (np.array([scores[t] for t in tasks]) - low) / span
        ax.plot(x, y, color="black", linestyle=next(styles), linewidth=1.2, label=name)
    ax.plot([], [], color="grey", label="candidates")
    ax.plot([], [], color="red", label=f"Pareto front ({len(front_ids)})")
    ax.set_xticks(x, [f"{t}\n{lo:.3g}..{hi:.3g}" for t, lo, hi in zip(tasks, low, high)], fontsize=7)
    for position in x:
        ax.axvline(position, color="lightgrey", linewidth=0.8, zorder=0)
    ax.set_yticks([0, 1], ["worst", "best"])
    ax.set_ylabel("score, scaled per task (range under each name)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return fig


def method_of(run: Run) -> str:
    """PARENT/NAME without a seed suffix: runs/full/ties-seed0 and runs/full/ties-seed1 are one
    method, runs/lora/ties-seed0 another."""
    return f"{run.path.parent.name}/{re.sub(r'[-_]seed[0-9]+$', '', run.path.name)}"


def pool_label(pool: Any) -> str:
    """A short name for the pool a run searched (its config's `pool:`), so that runs over different
    pools (full vs LoRA, other experts) are never averaged into one band: kind, base, experts, and a
    hash of the whole spec (two pools that differ only in a path still differ)."""
    digest = hashlib.sha1(json.dumps(pool, sort_keys=True, default=str).encode()).hexdigest()[:6]
    if not isinstance(pool, dict):
        return f"pool {pool} [{digest}]"
    kind = spec_kind(pool)
    if kind == "remote":
        return f"remote {urllib.parse.urlparse(str(pool['endpoint'])).netloc or pool['endpoint']} [{digest}]"
    if kind == "fusion":
        return f"api models {','.join(sorted(pool['models']))} [{digest}]"
    experts = pool.get("experts") or {}
    paths = [Path(str(p)) for p in (experts.values() if isinstance(experts, dict) else experts)]
    kind = ("lora" if any((p / "adapter_config.json").is_file() for p in paths)
            else "full" if any((p / "config.json").is_file() for p in paths) else "local")
    return f"{kind} {Path(str(pool.get('base', '?'))).name}+{len(paths)} experts [{digest}]"


def run_pool_label(run: Run) -> str:
    try:
        return pool_label(run.config().get("pool"))
    except (OSError, ValueError, AttributeError):  # a config being written or edited: its own group
        return "pool unknown"


def best_so_far_of(evaluations) -> np.ndarray:
    """Per evaluation, the best mean task score so far (higher is better; failures count as -inf).
    The mean task score, not the objective: presets add different penalties to their objectives."""
    scores = [float(np.mean(list(e.scores.values()))) if e.ok and e.scores else -np.inf for e in evaluations]
    return np.maximum.accumulate(np.array(scores)) if scores else np.array([])


def best_so_far(run: Run) -> np.ndarray:
    return best_so_far_of(run.evaluations())


def band(curves: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """x, mean, min and max over seeds' best-so-far curves, cut to the shortest; a seed with no
    success yet is left out of a column (not counted as -inf), a column with none stays NaN."""
    n = min(len(c) for c in curves)
    stack = np.array([c[:n] for c in curves], dtype=float)
    stack[~np.isfinite(stack)] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.arange(1, n + 1), np.nanmean(stack, 0), np.nanmin(stack, 0), np.nanmax(stack, 0)


def compare_groups(runs: list[Run]) -> dict[tuple[str, str], list[tuple[Run, np.ndarray]]]:
    """Runs grouped by (pool, method): the seeds of one method over one pool make one band."""
    groups: dict[tuple[str, str], list[tuple[Run, np.ndarray]]] = {}
    for run in runs:
        curve = best_so_far(run)
        if len(curve):
            groups.setdefault((run_pool_label(run), method_of(run)), []).append((run, curve))
    return groups


def plot_compare(runs: list[Run], path: Path, baselines: dict[str, float] | None = None, title: str = "") -> Path:
    """Best-so-far mean task score over evaluations, one line per method and pool (mean over its
    seeds, band min..max, cut to the shortest seed), and optional horizontal baselines {label: score}.
    Runs over different pools are never one band; the legend then names each line's pool."""
    plt = _pyplot()
    groups = compare_groups(runs)
    pools = sorted({pool for pool, _ in groups})
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for (pool, method), members in groups.items():
        x, mean, low, high = band([curve for _, curve in members])
        n = len(members)
        label = f"{method} ({n} run{'s' if n > 1 else ''})" + (f" on {pool}" if len(pools) > 1 else "")
        line, = ax.plot(x, mean, label=label)
        if n > 1:
            ax.fill_between(x, low, high, color=line.get_color(), alpha=0.15)
    styles = itertools.cycle(["--", ":", "-.", (0, (1, 4))])
    for label, value in (baselines or {}).items():
        ax.axhline(value, color="grey", linestyle=next(styles), label=label)
    ax.set_xlabel("evaluations")
    ax.set_ylabel("best mean task score so far (higher is better)")
    where = (f"pool: {pools[0]}" if len(pools) == 1 else
             f"{len(pools)} different pools: grouped by pool, scores across pools may not compare")
    ax.set_title(f"{title or 'best so far, mean over seeds (band: min..max)'}\n{where}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
