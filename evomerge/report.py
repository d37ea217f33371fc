"""Reading a run for people: `show`'s tables, the one-line summary, and `export`.

Everything here reads the run directory only, so it works while the search is live.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from evomerge.errors import EvomergeError
from evomerge.poolkinds import pool_kind
from evomerge.recipe import Recipe
from evomerge.pareto import cost_front, pareto_front
from evomerge.run import PARETO, REFERENCES, Evaluation, Run, _jsonable


def summary_line(run: Run) -> str:
    evaluations = run.evaluations()
    failed = sum(not e.ok for e in evaluations)
    best = run.best(1)
    best_text = f"best objective {best[0].objective:.4f} (candidate {best[0].id})" if best else "no successful candidate"
    return f"{run.path}: {len(evaluations)} evaluations, {failed} failed, {best_text}"


def compare_table(runs: list[Run]) -> Table:
    """One row per run: state, evaluations, failures, best objective and its mean task score."""
    table = Table(title="runs (objective: lower is better; mean task score: higher is better)")
    labels = [f"{run.path.parent.name}/{run.path.name}" for run in runs]
    table.add_column("run", no_wrap=True, min_width=max(map(len, labels)))  # names stay whole
    for column in ("state", "evals", "failed", "best objective", "its mean score"):
        table.add_column(column, justify="left" if column == "state" else "right")
    for label, run in zip(labels, runs):
        evaluations, best = run.evaluations(), run.best(1)
        mean = sum(best[0].scores.values()) / len(best[0].scores) if best and best[0].scores else None
        table.add_row(label, run.status().get("state", "?"), f"{len(evaluations)}/{run.config()['budget']}",
                      str(sum(not e.ok for e in evaluations)), f"{best[0].objective:.4f}" if best else "-",
                      f"{mean:.4f}" if mean is not None else "-")
    return table


def render_run(run: Run, console: Console, top: int = 5) -> None:
    config, status, evaluations = run.config(), run.status(), run.evaluations()
    console.print(f"[bold]{run.path}[/]  state [bold]{status['state']}[/]  "
                  f"{len(evaluations)}/{config['budget']} evaluations  "
                  f"{sum(not e.ok for e in evaluations)} failed")
    if not evaluations:
        return
    best = run.best(top)
    tasks = sorted(best[0].scores) if best else []
    console.print(_best_table(best, tasks))
    front = run.read_json(PARETO) if status["state"] == "finished" else None
    console.print(_pareto_table(front or pareto_front(evaluations)))
    if any(e.cost is not None for e in evaluations):
        console.print(_cost_front_table(cost_front(evaluations)))
        console.print(_spent_line(run, evaluations))
    references = run.read_json(REFERENCES)
    if references and best:
        console.print(_comparison_table(best[0], references, tasks))
    failures = [e for e in evaluations if not e.ok]
    if failures:
        console.print(f"last failure: candidate {failures[-1].id}: {failures[-1].reason}")


def run_document(run: Run, top: int = 5) -> dict[str, Any]:
    """What `show --json` prints for scripts: the same content as `render_run`'s tables, as data
    (status, the best candidates with their per-task scores and recipes, references, Pareto fronts)."""
    config, status, evaluations = run.config(), run.status(), run.evaluations()
    best = run.best(top)
    front = (run.read_json(PARETO) if status["state"] == "finished" else None) or pareto_front(evaluations)
    failures = [e for e in evaluations if not e.ok]
    document = {
        "run": str(run.path),
        "status": status,
        "budget": config.get("budget"),
        "evaluations": len(evaluations),
        "failed": len(failures),
        "tasks": sorted(best[0].scores) if best else [],
        "best": [{**dataclasses.asdict(e), "mean_score": _mean(e.scores)} for e in best],
        "references": run.read_json(REFERENCES) or {},
        "pareto": front,
        "last_failure": {"id": failures[-1].id, "reason": failures[-1].reason} if failures else None,
    }
    if any(e.cost is not None for e in evaluations):
        document["score_cost"] = cost_front(evaluations)
    return document


def to_json(document: Any) -> str:
    return json.dumps(document, indent=1, default=_jsonable)


def _mean(scores: dict[str, float]) -> float | None:
    return sum(scores.values()) / len(scores) if scores else None


def _best_table(best: list[Evaluation], tasks: list[str]) -> Table:
    table = Table(title="best candidates (objective: lower is better; task scores: higher is better)")
    costed = any(e.cost is not None for e in best)
    for column in ("id", "stage", "objective", *tasks, *(["$/1k queries", "queried"] if costed else []), "genome"):
        table.add_column(column, justify="right" if column not in ("genome", "queried") else "left")
    for e in best:
        genome = " ".join(f"{g:+.2f}" for g in e.genome[:8]) + (" ..." if len(e.genome) > 8 else "")
        cost = [f"{e.serving_per_1k:.4g}", ",".join(e.cost.get("queried", []))] if costed and e.cost else []
        table.add_row(str(e.id), str(e.stage), f"{e.objective:.4f}", *(f"{e.scores[t]:.4f}" for t in tasks), *cost,
                      genome)
    return table


def _cost_front_table(front: dict) -> Table:
    reference = front["reference"]
    where = f"; reference point: score {reference['score']:.4f}, ${reference['usd_per_1k']:.4g}/1k" if reference else ""
    table = Table(title=f"Pareto front over mean score and serving cost ({len(front['front'])} points, "
                        f"hypervolume {front['hypervolume']:.4g}{where})")
    for column in ("id", "mean score", "$/1k queries", "queried"):
        table.add_column(column, justify="left" if column == "queried" else "right")
    for point in front["front"]:
        table.add_row(str(point["id"]), f"{point['score']:.4f}", f"{point['usd_per_1k']:.4g}", ",".join(point["queried"]))
    return table


def _spent_line(run: Run, evaluations: list[Evaluation]) -> str:
    """What the search paid (the query cache: every call once) apart from what candidates would cost to serve."""
    from evomerge.fusion.cache import spent

    paid = spent(run.path)
    missing = sum((e.cost or {}).get("spent", {}).get("missing", 0) for e in evaluations)
    if paid is None:
        return "search spent: no API calls yet"
    total = paid["total"]
    return (f"search spent: {total['calls']} API calls, {total['prompt_tokens']} prompt + {total['completion_tokens']} "
            f"completion tokens, ${total['usd']:.4g} (every query asked once: queries.sqlite)"
            + (f"; {missing} answers missing after retries" if missing else ""))


def _pareto_table(front: dict) -> Table:
    table = Table(title=f"Pareto front over tasks ({len(front['front'])} points, hypervolume {front['hypervolume']:.4g})")
    table.add_column("id", justify="right")
    for task in front["tasks"]:
        table.add_column(task, justify="right")
    for point in front["front"]:
        table.add_row(str(point["id"]), *(f"{point['scores'][t]:.4f}" for t in front["tasks"]))
    return table


def _comparison_table(best: Evaluation, references: dict, tasks: list[str]) -> Table:
    table = Table(title="per-task scores: best candidate vs the base and each expert")
    for column in ("model", *tasks, "mean"):
        table.add_column(column, justify="right" if column != "model" else "left")
    rows = [(f"best ({best.id})", best.scores)] + [(name, ref.get("scores", {})) for name, ref in references.items()]
    for name, scores in rows:
        if not scores:
            table.add_row(name, *("failed" for _ in tasks), "")
            continue
        table.add_row(name, *(f"{scores[t]:.4f}" for t in tasks), f"{sum(scores[t] for t in tasks) / len(tasks):.4f}")
    return table


def pick_candidate(run: Run, pick: str) -> Evaluation:
    if pick == "best":
        best = run.best(1)
        if not best:
            raise EvomergeError(f"{run.path}: no successful candidate to export yet")
        return best[0]
    try:
        chosen = run.get(int(pick))
    except ValueError:
        raise EvomergeError(f"--pick takes 'best' or a candidate id, not {pick!r}") from None
    if not chosen.ok:
        raise EvomergeError(f"candidate {chosen.id} failed ({chosen.reason}); pick another")
    return chosen


def export_candidate(run: Run, pick: str, output: Path, device: str = "cpu", dtype: str | None = None) -> Path:
    """The candidate's merged model (or low-rank adapter) + recipe.yaml + mergekit.yaml where expressible."""
    chosen = pick_candidate(run, pick)
    recipe = Recipe.model_validate(chosen.recipe)
    return pool_kind(run.config()["pool"]).export(recipe, output, device=device, dtype=dtype)
