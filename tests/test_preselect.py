"""Many-adapter pools: the repository of relevant adapters and distractors, and `preselect:`, which
spends the search on the adapters the references say matter."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from evomerge.errors import EvomergeError
from evomerge.preselect import preselect, preselect_size
from evomerge.run import Run

REPO = Path(__file__).resolve().parents[1]
RELEVANT = ["add", "reverse", "upper", "next"]


def _references(table: dict) -> dict:
    return {name: {"status": "ok", "scores": scores} for name, scores in table.items()}


def test_preselect_takes_each_tasks_best_in_turn_in_the_pools_order():
    references = _references({
        "base": {"a": -5.0, "b": -5.0},
        "x": {"a": -1.0, "b": -6.0},   # best on a, hurts b: a specialist, kept
        "y": {"a": -4.0, "b": -4.0},   # good on the mean, best on neither
        "z": {"a": -6.0, "b": -2.0},   # best on b
        "w": {"a": -2.0, "b": -4.5},   # second on a
    })
    experts = ["w", "x", "y", "z"]
    assert preselect(references, experts, 2) == ["x", "z"]
    assert preselect(references, experts, 3) == ["w", "x", "z"]  # then the second of each task: w (a), y (b)
    assert preselect(references, experts, 4) == experts
    references["x"] = {"status": "failed", "reason": "NaN"}  # a failed reference is never chosen
    assert preselect(references, experts, 2) == ["w", "z"]
    with pytest.raises(EvomergeError, match="base's reference failed"):
        preselect({**references, "base": {"status": "failed"}}, experts, 2)


def test_auto_takes_two_per_task_and_at_least_eight_and_only_from_a_larger_pool():
    assert preselect_size("auto", 9, 4) == 8 and preselect_size("auto", 8, 4) is None
    assert preselect_size("auto", 30, 6) == 12 and preselect_size("auto", 128, 4) == 8
    assert preselect_size(None, 128, 4) is None
    assert preselect_size(5, 10, 4) == 5 and preselect_size(5, 5, 4) is None


def test_a_run_begun_over_every_expert_goes_on_over_every_expert(tmp_path):
    """A run whose log names every expert (begun with `preselect: null`, or by an evomerge before
    pre-selection) is resumed over the same genome, not narrowed under it."""
    from evomerge.config import load_search_config
    from evomerge.search import Search, search
    from tests.synthetic import make_pool

    data = {"pool": make_pool(tmp_path / "pool", n_experts=12), "space": {"preset": "ties-dare", "layer_groups": 1},
            "objective": "tests.test_report_many_experts:three_tasks", "budget": 4, "seed": 0,
            "optimizer": {"type": "cmaes", "popsize": 4}, "workers": {"count": 1}, "preselect": None}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(data))
    run = search(load_search_config(tmp_path / "s.yaml"), tmp_path / "run")
    assert all(len(e.recipe["experts"]) == 12 for e in run.evaluations())
    del data["preselect"]  # now the default, auto: 8 of 12 for a fresh run
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(data))
    resumed = Search(load_search_config(tmp_path / "s.yaml"))
    resumed.run = run
    resumed._preselect()
    assert len(resumed.space.experts) == 12
    fresh = search(load_search_config(tmp_path / "s.yaml"), tmp_path / "fresh")
    assert all(len(e.recipe["experts"]) == 8 for e in fresh.evaluations())


@pytest.fixture(scope="module")
def repository(tiny_zoo, tmp_path_factory) -> Path:
    from evomerge.zoo.repository import build_repository

    return build_repository(tiny_zoo, 10, out=tmp_path_factory.mktemp("many") / "many-10", progress=False)


def test_a_repository_holds_the_relevant_adapters_and_distractors_some_harmful(repository, tiny_zoo):
    from evomerge.pool import Pool

    table = json.loads((repository / "repository.json").read_text())["adapters"]
    roles = {name: entry["role"] for name, entry in table.items()}
    assert [n for n, r in roles.items() if r == "relevant"] == RELEVANT and len(roles) == 10
    assert [n for n, r in roles.items() if r == "harmful"] == ["add-off-by-one-1"]  # one distractor in four
    pool4 = yaml.safe_load((repository / "pool-4.yaml").read_text())
    pool10 = yaml.safe_load((repository / "pool-10.yaml").read_text())
    assert list(pool4["experts"]) == RELEVANT and list(pool10["experts"])[:4] == RELEVANT and len(pool10["experts"]) == 10
    # the relevant adapters are the zoo's own, bit for bit; every adapter loads as a LoRA expert of the base
    assert (repository / "adapters/add/adapter_model.safetensors").read_bytes() == \
        (tiny_zoo / "lora/add/adapter_model.safetensors").read_bytes()
    pool = Pool((repository / pool10["base"]).resolve(), {n: repository / p for n, p in pool10["experts"].items()})
    assert {entry.kind for entry in pool.experts.values()} == {"lora"}
    # each relevant adapter is the best of the repository on its own task: the distractors are beside the point
    for task in RELEVANT:
        assert min(table, key=lambda name: table[name]["val_loss"][task]) == task


def test_a_search_with_preselect_spends_its_budget_on_the_relevant_adapters(repository, tmp_path):
    config = tmp_path / "search.yaml"
    config.write_text(yaml.safe_dump({
        "pool": str(repository / "pool-10.yaml"), "space": {"preset": "evo-merging", "lora_merge": "lowrank"},
        "suite": str(REPO / "evaluators" / "zoo-loss.yaml"), "backend": {"name": "hf", "batch_size": 64},
        "budget": 6, "seed": 0, "optimizer": {"type": "cmaes", "popsize": 3}, "workers": {"count": 1},
        "preselect": 4}))  # auto would take 8 of these 10: 4 shows the choice
    done = subprocess.run([sys.executable, "-m", "evomerge.cli", "search", str(config), "--run-dir", str(tmp_path / "run")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "preselect: searching 4 of 10 experts (add, reverse, upper, next)" in done.stderr
    run = Run(tmp_path / "run")
    references = json.loads((run.path / "references.json").read_text())
    assert len(references) == 11  # every adapter alone, and the base: what the choice was made on
    evaluations = run.evaluations()
    assert len(evaluations) == 6 and all(e.ok for e in evaluations)
    assert all(sorted(e.recipe["experts"]) == sorted(RELEVANT) for e in evaluations)  # the distractors are off
    # a resumed search derives the same choice from the run's references
    from evomerge.config import load_search_config
    from evomerge.search import Search

    search = Search(load_search_config(run.path / "config.yaml"))
    search.run = run
    search._preselect()
    assert search.space.experts == RELEVANT


def test_preselect_without_references_is_refused(tmp_path):
    from evomerge.config import ConfigError, load_search_config

    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"pool": {"endpoint": "http://127.0.0.1:9"}, "preselect": 4,
                                                     "references": False}))
    with pytest.raises(ConfigError, match="preselect chooses experts from the references"):
        load_search_config(tmp_path / "s.yaml")
