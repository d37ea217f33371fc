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
from rich.text import Text

from evomerge.errors import EvomergeError
from evomerge.poolkinds import pool_kind
from evomerge.recipe import Recipe
from evomerge.pareto import cost_front, hypervolume_text, pareto_front
from evomerge.run import PARETO, REFERENCES, Evaluation, Run, _jsonable

# Pools of 64-128 LoRA adapters: a list of every expert would be 128 entries in each candidate's row
# and 128 rows of references. Above MANY_EXPERTS experts, what people read names the TOP_EXPERTS that
# count most and says how many more there are (`expert_summary`, for `show`'s tables and export's
# summary); with MANY_EXPERTS or fewer the output is as it always was. `show --json`, recipe.yaml,
# references.json and mergekit.yaml always keep every expert: scripts and tools want all of them.
MANY_EXPERTS = 8
TOP_EXPERTS = 5


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


def expert_summary(recipe: Recipe | dict[str, Any], top: int = TOP_EXPERTS) -> list[str] | None:
    """A recipe's experts in a few lines, for a recipe of more than MANY_EXPERTS experts (None for
    fewer: the caller prints what it always did). The `top` experts that are on (`used_experts`:
    weight non-zero, and density where the method has one), by |weight| (the recipe's own value:
    the mean over the layer groups of a layer-wise space), as "name +0.93 (0.61)" (weight
    (density); no density for a method without one), then "+ 37 more on, 86 off"."""
    if isinstance(recipe, dict):
        if len(recipe.get("experts") or {}) <= MANY_EXPERTS:
            return None
        recipe = Recipe.model_validate(recipe)
    if len(recipe.experts) <= MANY_EXPERTS:
        return None
    from evomerge.methods import get_method

    has_density = get_method(recipe.method).param("density") is not None
    on = sorted(recipe.used_experts(), key=lambda name: (-abs(recipe.experts[name].weight), name))
    lines = [f"{name} {recipe.experts[name].weight:+.2f}" + (f" ({recipe.experts[name].density:.2f})" if has_density else "")
             for name in on[:top]]
    off = len(recipe.experts) - len(on)
    lines.append(f"+ {len(on) - len(lines)} more on, {off} off" if on else f"none on, {off} off")
    return lines


def _best_table(best: list[Evaluation], tasks: list[str]) -> Table:
    # Many experts: the genome (their first 8 genes) says little; the experts that weigh most say what the merge is.
    summaries = [expert_summary(e.recipe) for e in best]
    many = any(summary is not None for summary in summaries)
    last = "genome"
    if many:
        from evomerge.methods import get_method

        densities = any(get_method(e.recipe["method"]).param("density") is not None for e in best)
        last = f"top {TOP_EXPERTS} experts on: weight" + (" (density)" if densities else "")
    table = Table(title="best candidates (objective: lower is better; task scores: higher is better)", show_lines=many)
    costed = any(e.cost is not None for e in best)
    for column in ("id", "stage", "objective", *tasks, *(["$/1k queries", "queried"] if costed else [])):
        table.add_column(column, justify="right" if column != "queried" else "left")
    table.add_column(last)
    for e, summary in zip(best, summaries):
        if many:
            described = Text("\n".join(summary or []))  # text, not markup: an adapter may be called "lora[v2]"
        else:
            described = " ".join(f"{g:+.2f}" for g in e.genome[:8]) + (" ..." if len(e.genome) > 8 else "")
        cost = [f"{e.serving_per_1k:.4g}", ",".join(e.cost.get("queried", []))] if costed and e.cost else []
        table.add_row(str(e.id), str(e.stage), f"{e.objective:.4f}", *(f"{e.scores[t]:.4f}" for t in tasks), *cost,
                      described)
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
    table = Table(title=f"Pareto front over tasks ({len(front['front'])} points, "
                        f"hypervolume {hypervolume_text(front['hypervolume'])})")
    table.add_column("id", justify="right")
    for task in front["tasks"]:
        table.add_column(task, justify="right")
    for point in front["front"]:
        table.add_row(str(point["id"]), *(f"{point['scores'][t]:.4f}" for t in front["tasks"]))
    return table


def _shown_references(references: dict, tasks: list[str]) -> tuple[dict, int]:
    """The references the comparison lists, and how many experts it leaves out: every one for
    MANY_EXPERTS experts or fewer; else the base and the TOP_EXPERTS experts that are best on the
    most tasks alone, then by mean score (those that failed last)."""
    experts = [name for name in references if name != "base"]
    if len(experts) <= MANY_EXPERTS:
        return references, 0
    scored = {name: references[name].get("scores") or {} for name in experts}
    scored = {name: scores for name, scores in scored.items() if all(t in scores for t in tasks)}
    wins = dict.fromkeys(scored, 0)
    for task in tasks:
        if scored:
            wins[max(scored, key=lambda name: scored[name][task])] += 1

    def rank(name: str) -> tuple:
        if name not in scored:
            return (1, 0, 0.0, name)
        return (0, -wins[name], -(sum(scored[name][t] for t in tasks) / len(tasks) if tasks else 0.0), name)

    kept = set(sorted(experts, key=rank)[:TOP_EXPERTS])
    shown = {name: ref for name, ref in references.items() if name == "base"}
    shown.update({name: references[name] for name in sorted(kept, key=rank)})
    return shown, len(experts) - len(kept)


def _comparison_table(best: Evaluation, references: dict, tasks: list[str]) -> Table:
    shown, left_out = _shown_references(references, tasks)
    if left_out:
        listed = len(shown) - ("base" in shown)
        table = Table(title=f"per-task scores: best candidate vs the base and the {listed} best of {listed + left_out} "
                            "experts alone", caption=f"+ {left_out} more experts (best: most tasks won, then mean; "
                                                     "every one: show --json)")
    else:
        table = Table(title="per-task scores: best candidate vs the base and each expert")
    for column in ("model", *tasks, "mean"):
        table.add_column(column, justify="right" if column != "model" else "left")
    rows = [(f"best ({best.id})", best.scores)] + [(name, ref.get("scores", {})) for name, ref in shown.items()]
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
