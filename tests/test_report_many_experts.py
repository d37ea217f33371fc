"""`show` and `export` on a pool of many experts (pools of 64-128 LoRA adapters): each candidate's
experts are its top few by |weight| and a count of the rest, the comparison lists the few best
experts alone, and `show --json` keeps every expert. With 8 experts or fewer nothing changes.

The run dirs come from real searches over small random pools (tests.synthetic), scored by
`three_tasks` below: tests.objectives:quadratic has one task per expert, and 40 tasks is more than
the Pareto front's hypervolume takes (31).
"""

from __future__ import annotations

import json
import re

import pytest
import yaml

from evomerge.config import load_search_config
from evomerge.recipe import Recipe
from evomerge.run import Run
from evomerge.search import search
from tests.synthetic import make_pool

WIDE = {"COLUMNS": "400"}  # rich would fit any table into 80 columns by wrapping its cells; this shows its own width


def three_tasks(recipe: Recipe) -> dict[str, float]:
    """Three tasks over any pool: task k wants weight 0.5 from the experts whose index is k mod 3
    (the others 0) and densities 0.6; the weights differ, so the best recipe has a clear top expert."""
    scores = {}
    for k, task in enumerate(("a", "b", "c")):
        loss = 0.0
        for i, params in enumerate(recipe.experts.values()):
            target = 0.5 * (1 + i / len(recipe.experts)) if i % 3 == k else 0.0
            loss += (params.weight - target) ** 2 + (params.density - 0.6) ** 2
        scores[task] = -loss
    return scores


def run_search(root, n_experts: int, budget: int = 8) -> Run:
    pool = make_pool(root / "pool", n_experts=n_experts)
    config = {"pool": pool, "space": {"preset": "ties-dare", "layer_groups": 1},
              "objective": "tests.test_report_many_experts:three_tasks", "budget": budget, "seed": 7,
              "optimizer": {"type": "cmaes", "popsize": 4}, "workers": {"count": 1},
              "preselect": None}  # every expert in every recipe: what the display must cope with
    (root / "search.yaml").write_text(yaml.safe_dump(config))
    return search(load_search_config(root / "search.yaml"), root / "run")


@pytest.fixture(scope="module")
def many(tmp_path_factory) -> Run:
    return run_search(tmp_path_factory.mktemp("many"), n_experts=40)


@pytest.fixture(scope="module")
def few(tmp_path_factory) -> Run:
    return run_search(tmp_path_factory.mktemp("few"), n_experts=4)


def invoke(*args: str, env: dict | None = None):
    from typer.testing import CliRunner

    from evomerge.cli import app

    done = CliRunner().invoke(app, list(args), env=env)
    assert done.exit_code == 0, (done.output, done.exception)
    return done


def on_by_weight(recipe: dict) -> list[str]:
    """The experts a ties-dare recipe takes something from, largest |weight| first (as the report says)."""
    on = [n for n, p in recipe["experts"].items() if p["weight"] != 0 and p["density"] > 0]
    return sorted(on, key=lambda n: (-abs(recipe["experts"][n]["weight"]), n))


def named(name: str, text: str) -> bool:
    """`name` as a whole name (expert3 is not in expert31)."""
    return re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text) is not None


def test_show_names_each_candidates_top_experts_and_counts_the_rest(many):
    out = invoke("show", str(many.path), env=WIDE).stdout
    lines = out.splitlines()
    assert max(map(len, lines)) <= 120, max(lines, key=len)
    assert len(lines) < 120, out  # no row per expert
    best = many.best(1)[0]
    on = on_by_weight(best.recipe)
    assert len(on) > 5, "the search should leave more than five experts on"
    top = on[0]
    params = best.recipe["experts"][top]
    assert f"{top} {params['weight']:+.2f} ({params['density']:.2f})" in out, out
    assert f"+ {len(on) - 5} more on, {40 - len(on)} off" in out, out
    assert "genome" not in out  # 40 experts' first 8 genes say nothing: the column is the top experts


def test_show_compares_with_the_base_and_a_few_experts_only(many):
    out = invoke("show", str(many.path), env=WIDE).stdout
    comparison = out[out.index("per-task scores"):]
    references = json.loads((many.path / "references.json").read_text())
    listed = [name for name in references if name != "base" and named(name, comparison)]
    assert len(listed) == 5, comparison
    assert "+ 35 more experts" in comparison and "base" in comparison, comparison
    # every task's best expert alone is among them (three tasks: three winners at most)
    for task in ("a", "b", "c"):
        winner = max((n for n in references if n != "base"), key=lambda n: references[n]["scores"][task])
        assert winner in listed, (task, winner, listed)


def test_show_json_keeps_every_expert(many):
    document = json.loads(invoke("show", str(many.path), "--json").stdout)
    assert len(document["best"][0]["recipe"]["experts"]) == 40
    assert len(document["references"]) == 41  # the base and every expert


def test_show_in_80_columns_keeps_the_top_expert_whole(many):
    out = invoke("show", str(many.path), env={"COLUMNS": "80"}).stdout
    top = on_by_weight(many.best(1)[0].recipe)[0]
    assert max(map(len, out.splitlines())) <= 80
    assert named(top, out), out


def test_export_says_which_experts_weigh_most(many, tmp_path):
    done = invoke("export", str(many.path), "-o", str(tmp_path / "merged"))
    best = many.best(1)[0]
    on = on_by_weight(best.recipe)
    said = done.stderr
    assert f"exported best ({len(on)} experts with dare_ties)" in said, said
    params = best.recipe["experts"][on[0]]
    assert f"{on[0]} {params['weight']:+.2f} ({params['density']:.2f})" in said, said
    assert f"+ {len(on) - 5} more on, {40 - len(on)} off" in said, said
    assert len(said.splitlines()) <= 10, said
    # the files keep every expert
    assert yaml.safe_load((tmp_path / "merged" / "recipe.yaml").read_text()) == best.recipe
    assert len(yaml.safe_load((tmp_path / "merged" / "mergekit.yaml").read_text())["models"]) == 40


def test_few_experts_are_each_listed_as_before(few, tmp_path):
    out = invoke("show", str(few.path), env=WIDE).stdout
    assert "genome" in out and "more on" not in out, out
    comparison = out[out.index("per-task scores"):]
    assert "vs the base and each expert" in " ".join(comparison.split())  # the title wraps to the table's width
    assert all(named(f"expert{i}", comparison) for i in range(4)), comparison
    said = invoke("export", str(few.path), "-o", str(tmp_path / "merged")).stderr
    assert said.startswith("exported best (") and "more on" not in said and said.count("\n") <= 1, said


def test_summary_starts_above_eight_experts():
    from evomerge.report import expert_summary

    def recipe(n: int) -> Recipe:
        weights = [0.0 if i % 4 == 0 else (i + 1) / 10 for i in range(n)]
        return Recipe(method="ties", experts={f"e{i}": {"weight": w, "density": 0.5} for i, w in enumerate(weights)})

    assert expert_summary(recipe(8)) is None and expert_summary(recipe(8).to_dict()) is None
    nine = expert_summary(recipe(9))
    assert nine == ["e7 +0.80 (0.50)", "e6 +0.70 (0.50)", "e5 +0.60 (0.50)", "e3 +0.40 (0.50)", "e2 +0.30 (0.50)",
                    "+ 1 more on, 3 off"]
    assert expert_summary(recipe(9).to_dict()) == nine
    linear = Recipe(method="linear", experts={f"e{i}": {"weight": -1.0 if i == 3 else 0.1} for i in range(12)})
    assert expert_summary(linear)[0] == "e3 -1.00"  # |weight|; no density for a method without one
    off = Recipe(method="ties", experts={f"e{i}": {"weight": 1.0, "density": 0.0} for i in range(10)})
    assert expert_summary(off) == ["none on, 10 off"]


def test_a_search_over_40_tasks_finishes_and_shows_its_front_without_a_hypervolume(tmp_path):
    """moocore's hypervolume takes at most 31 objectives: a suite of 40 tasks still finishes, with
    its Pareto front, and `show` says why there is no hypervolume (it used to fail the finished run)."""
    pool = make_pool(tmp_path / "pool", n_experts=40)
    (tmp_path / "search.yaml").write_text(yaml.safe_dump({
        "pool": pool, "space": {"preset": "ties-dare", "layer_groups": 1}, "objective": "tests.objectives:quadratic",
        "budget": 4, "seed": 0, "optimizer": {"type": "cmaes", "popsize": 4}, "workers": {"count": 1}}))
    run = search(load_search_config(tmp_path / "search.yaml"), tmp_path / "run")
    assert run.status()["state"] == "finished"
    pareto = json.loads((run.path / "pareto.json").read_text())
    assert len(pareto["tasks"]) == 40 and pareto["front"] and pareto["hypervolume"] is None
    shown = invoke("show", str(run.path), env={"COLUMNS": "400"}).output
    assert "hypervolume n/a (over 31 tasks)" in shown
