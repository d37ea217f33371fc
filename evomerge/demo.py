"""`evomerge demo`: build the demo zoo if missing, search, and compare on the held-out test split.

The comparison scores every model the same way on the test split (greedy exact match per task,
and the mean answer cross-entropy): the base, each expert, the classic recipes at their usual
settings, and the best recipe the search found on the validation loss.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from rich.console import Console
from rich.table import Table

from evomerge.baselines import reference_recipes
from evomerge.config import SearchConfig, WorkersConfig, open_pool, resolve_pool_spec
from evomerge.recipe import Recipe
from evomerge.shipped import shipped_dir

SUITES = shipped_dir("evaluators")
SEARCH_SUITE = SUITES / "zoo-loss.yaml"  # its validation split
TEST_SUITE = f"{SUITES / 'zoo-generate.yaml'}:test"  # the held-out test split of each
TEST_LOSS_SUITE = f"{SEARCH_SUITE}:test"


def classic_recipes(experts: list[str]) -> dict[str, Recipe]:
    """The usual settings of the classic recipes (FusionBench/mergekit defaults)."""
    def uniform(method: str, density: float = 1.0, **parameters) -> Recipe:
        return Recipe(method=method, experts={n: {"weight": 1.0, "density": density} for n in experts},
                      parameters=parameters)

    return {
        "average (linear)": uniform("linear"),
        "task arithmetic (lambda 0.3)": uniform("task_arithmetic", **{"lambda": 0.3}),
        "TIES (density 0.5)": uniform("ties", 0.5),
        "DARE-TIES (density 0.5)": uniform("dare_ties", 0.5),
    }


def demo_config(zoo_dir: Path, budget: int, workers: int) -> SearchConfig:
    return SearchConfig(
        name="demo", pool=resolve_pool_spec("pool-full.yaml", zoo_dir.resolve(), "demo"), space="evo-merging",
        suite=str(SEARCH_SUITE), backend={"name": "hf", "batch_size": 64}, budget=budget, seed=0,
        optimizer={"type": "cmaes", "popsize": 8}, workers=WorkersConfig(count=workers))


def run_demo(zoo_dir: Path, size: str, budget: int, workers: int, run_dir: Path, console: Console) -> None:
    from evomerge.progress import SearchProgress
    from evomerge.search import search
    from evomerge.zoo import build_zoo

    console.print(f"[bold]1/3[/] demo zoo in {zoo_dir} (built if missing)")
    build_zoo(zoo_dir, size=size, progress=True)
    config = demo_config(zoo_dir, budget, workers)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    console.print(f"[bold]2/3[/] Evo-Merging search, {budget} evaluations on the validation loss -> {run_dir}")
    with SearchProgress(console, budget) as progress:
        run = search(config, run_dir, progress=progress)
    best = Recipe.model_validate(run.best(1)[0].recipe)
    console.print("[bold]3/3[/] scoring on the held-out test split (greedy exact match, cross-entropy)")
    table = compare_on_test(config, {"Evo-Merging (searched)": best}, console)
    console.print(table)
    console.print(f"inspect the run: evomerge show {run_dir} --plot;  export it: evomerge export {run_dir} -o merged/")


def compare_on_test(config: SearchConfig, found: dict[str, Recipe], console: Console) -> Table:
    from evomerge.worker import Worker

    experts = open_pool(config.pool).names
    references = {("base" if name == "base" else f"expert {name}"): r for name, r in reference_recipes(experts).items()}
    recipes = {**references, **classic_recipes(experts), **found}
    worker = Worker(config.pool, TEST_SUITE, config.backend)
    loss_worker = Worker(config.pool, TEST_LOSS_SUITE, config.backend)
    results = {name: (worker.evaluate(recipe.model_dump(mode="json")), loss_worker.evaluate(recipe.model_dump(mode="json")))
               for name, recipe in recipes.items()}
    tasks = sorted(next(r for r, _ in results.values() if r["status"] == "ok")["scores"])
    table = Table(title="test split: exact match per task (higher is better), and mean cross-entropy (lower is better)")
    for column in ("model", *tasks, "mean EM", "mean CE"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for name, (em, loss) in results.items():
        if em["status"] != "ok" or loss["status"] != "ok":
            reason = em.get("reason") or loss.get("reason") or ""
            table.add_row(name, *("failed" for _ in tasks), reason[:40], "")
            continue
        scores = em["scores"]
        table.add_row(name, *(f"{scores[t]:.3f}" for t in tasks), f"{sum(scores.values()) / len(scores):.3f}",
                      f"{-loss['scalar']:.3f}")
    return table
