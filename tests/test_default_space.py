"""The default space (searchspaces/default.yaml): a sweep of uniform scales, then CMA-ES over
densities and weights together from the best scale. Mechanics on the synthetic objective; the
zoo end to end is in test_search_zoo.py; whether it wins is tests/benchmarks/bench_pools.py."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import yaml

from evomerge.baselines import SCALES
from evomerge.config import load_search_config
from evomerge.errors import ConfigError
from evomerge.run import Run
from evomerge.search import resume, search, stage_budgets
from evomerge.searchspace import load_space
from tests.synthetic import make_pool


@pytest.fixture(scope="module")
def pool_spec(tmp_path_factory):
    return make_pool(tmp_path_factory.mktemp("pool"), n_experts=3)


def write_config(path, pool_spec, **overrides):
    config = {"pool": pool_spec, "objective": "tests.objectives:quadratic", "budget": 30, "seed": 3,
              "workers": {"count": 2}, **overrides}  # no space: the default
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_config_without_a_space_sweeps_the_scales_then_starts_cmaes_at_the_best(tmp_path, pool_spec):
    config = load_search_config(write_config(tmp_path / "s.yaml", pool_spec))
    assert config.space == "default"
    run = search(config, tmp_path / "run")
    evaluations = run.evaluations()
    assert len(evaluations) == 30
    sweep = sorted((e for e in evaluations if e.stage == 0), key=lambda e: e.id)  # logged as they finish
    assert [e.recipe["experts"]["expert0"]["weight"] for e in sweep] == pytest.approx(list(SCALES))
    for e in sweep:  # each point: every expert at the same weight, nothing sparsified
        assert len({p["weight"] for p in e.recipe["experts"].values()}) == 1
        assert all(p["density"] == 1.0 for p in e.recipe["experts"].values())
    # quadratic's best uniform weight is (1 + 2 * 0.2) / 3 = 0.47: the sweep's 0.5
    best_scale = min(sweep, key=lambda e: e.objective).recipe["experts"]["expert0"]["weight"]
    assert best_scale == pytest.approx(0.5)
    first_generation = sorted((e for e in evaluations if e.stage == 1), key=lambda e: e.id)[:4]  # popsize 4
    weights = [p["weight"] for e in first_generation for p in e.recipe["experts"].values()]
    assert abs(np.mean(weights) - 0.5) < 0.15  # sampled around the best scale, not around 1/N = 0.33
    assert len({p["density"] for e in first_generation for p in e.recipe["experts"].values()}) > 1  # joint
    assert run.best(1)[0].objective == min(e.objective for e in evaluations)  # no L1: every stage competes


def test_the_sweeps_best_is_the_pick_when_the_joint_stage_does_not_beat_it(tmp_path, pool_spec):
    """Over a base that already knows the tasks, the sweep's c = 0 (the base) can be the best
    merge there is; the run's pick must then be it, not the joint stage's best try."""
    config = load_search_config(write_config(tmp_path / "s.yaml", pool_spec, budget=12,
                                             objective="tests.objectives:best_at_the_base"))
    run = search(config, tmp_path / "run")
    best = run.best(1)[0]
    assert best.stage == 0 and all(p["weight"] == 0 for p in best.recipe["experts"].values())
    paper = search(load_search_config(write_config(tmp_path / "p.yaml", pool_spec, budget=12, space="evo-merging",
                                                   objective="tests.objectives:best_at_the_base")), tmp_path / "p")
    assert {e.stage for e in paper.best(3)} == {1}  # L1 terms on other genes: the last stage's own best


def test_the_sweep_stays_a_sweep_under_the_users_optimizer(tmp_path, pool_spec):
    """`optimizer: {type: nevergrad, ...}` picks the searching stage's optimizer; the scales are
    points, not an optimizer's to propose."""
    config = load_search_config(write_config(tmp_path / "s.yaml", pool_spec, budget=14,
                                             optimizer={"type": "random"}))
    run = search(config, tmp_path / "run")
    sweep = [e.recipe["experts"]["expert1"]["weight"] for e in sorted(run.evaluations(), key=lambda e: e.id) if e.stage == 0]
    assert sweep == pytest.approx(list(SCALES[:7]))  # budget 14: the sweep gets at most half


def test_a_default_run_rebuilt_from_its_log_goes_on_as_it_would_have(tmp_path, pool_spec):
    """Stage 2 starts where stage 1's best was: a resume that rebuilds the state from the log
    (the checkpoint lost) must start it there again and propose the same candidates."""
    config = load_search_config(write_config(tmp_path / "s.yaml", pool_spec, budget=24, workers={"count": 1}))
    whole = search(config, tmp_path / "whole")
    cut = tmp_path / "cut"
    shutil.copytree(whole.path, cut, ignore=shutil.ignore_patterns("*.lock"))
    lines = (cut / "evaluations.jsonl").read_text().splitlines(keepends=True)
    (cut / "evaluations.jsonl").write_text("".join(lines[:13]))  # the sweep and 5 of stage 2
    (cut / "checkpoint.json").unlink()
    Run(cut).set_status("stopped")
    resumed = resume(cut)
    assert [e.genome for e in resumed.evaluations()] == [e.genome for e in whole.evaluations()]


def test_stage_budgets_give_a_set_count_then_share_the_rest():
    space = load_space("default", experts=["a", "b"])
    assert stage_budgets(space, 200) == [8, 192]
    assert stage_budgets(space, 10) == [5, 5]  # at most half: a short run still searches
    assert stage_budgets(load_space("evo-merging", experts=["a", "b"]), 200) == [67, 133]


def test_scales_need_weights_and_scales_go_with_points_scales(tmp_path, pool_spec):
    no_weights = {"preset": "default", "stages": [
        {"name": "sweep", "search": ["density"], "evaluations": 4, "optimizer": {"type": "grid", "points": "scales"}},
        {"name": "joint", "search": ["density", "weight"], "start": "best"}]}
    with pytest.raises(ConfigError, match="`points: scales` needs a space that searches the experts' weights"):
        search(load_search_config(write_config(tmp_path / "a.yaml", pool_spec, space=no_weights)), tmp_path / "a")
    assert not (tmp_path / "a").exists()
    stray = {"preset": "default", "optimizer": {"type": "grid", "points": [[0.5] * 6], "scales": [0.5]}}
    with pytest.raises(ConfigError, match="`scales` goes with `points: scales`"):
        search(load_search_config(write_config(tmp_path / "b.yaml", pool_spec, space=stray)), tmp_path / "b")
