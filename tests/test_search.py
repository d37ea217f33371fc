"""The search loop: run dir, failures, SIGKILL + resume, dead workers, show/export, bad configs.

Mechanics use a fast synthetic objective (tests.objectives) on a small random pool; the end-to-end
tests on the tiny demo zoo are in test_search_zoo.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from evomerge.config import load_search_config
from evomerge.errors import ConfigError, EvomergeError
from evomerge.run import Run
from evomerge.search import resume, search
from tests.synthetic import make_pool
from tests.waiting import wait_for


@pytest.fixture(scope="module")
def pool_spec(tmp_path_factory):
    return make_pool(tmp_path_factory.mktemp("pool"), n_experts=3)


def write_config(path: Path, pool_spec, **overrides) -> Path:
    config = {"pool": pool_spec, "space": "evo-merging", "objective": "tests.objectives:quadratic",
              "budget": 24, "seed": 7, "optimizer": {"type": "cmaes", "popsize": 6}, "workers": {"count": 2}}
    config.update(overrides)
    path.write_text(yaml.safe_dump(config))
    return path


def genomes(run_dir: Path) -> dict[int, list[float]]:
    return {e.id: e.genome for e in Run(run_dir).evaluations()}


def test_search_records_every_evaluation_and_the_front(tmp_path, pool_spec):
    config = load_search_config(write_config(tmp_path / "s.yaml", pool_spec))
    run = search(config, tmp_path / "run")
    evaluations = run.evaluations()
    assert len(evaluations) == 24 and len({e.id for e in evaluations}) == 24
    assert {e.stage for e in evaluations} == {0, 1}  # evo-merging: densities, then weights
    assert sum(e.stage == 0 for e in evaluations) == 8  # a third of the budget
    stage1 = [e for e in evaluations if e.stage == 1]
    best_stage0 = min((e for e in evaluations if e.stage == 0), key=lambda e: e.objective)
    densities = {n: p["density"] for n, p in best_stage0.recipe["experts"].items()}
    assert all({n: p["density"] for n, p in e.recipe["experts"].items()} == densities for e in stage1)
    pareto = json.loads((run.path / "pareto.json").read_text())
    assert pareto["front"] and pareto["hypervolume"] > 0
    assert run.status()["state"] == "finished"
    assert run.best(1)[0] == min(stage1, key=lambda e: e.objective)  # the last stage's best is the answer
    assert set(json.loads((run.path / "references.json").read_text())) == {"base", "expert0", "expert1", "expert2"}
    saved = yaml.safe_load((run.path / "config.yaml").read_text())
    assert saved["pool"]["base"] == pool_spec["base"]


def test_failed_candidates_are_recorded_not_fatal(tmp_path, pool_spec):
    config = load_search_config(write_config(tmp_path / "s.yaml", pool_spec, space="lorahub", budget=16,
                                             objective="tests.objectives:fails_on_negative",
                                             optimizer={"type": "random"}, workers={"count": 1}))
    run = search(config, tmp_path / "run")
    evaluations = run.evaluations()
    failed = [e for e in evaluations if not e.ok]
    assert len(evaluations) == 16 and failed
    assert all("negative weight" in e.reason and e.objective == config.failure_objective for e in failed)
    assert run.best(1)[0].ok


def test_existing_run_dir_is_refused_with_the_fix(tmp_path, pool_spec):
    config = load_search_config(write_config(tmp_path / "s.yaml", pool_spec, budget=4))
    search(config, tmp_path / "run")
    with pytest.raises(EvomergeError, match="evomerge resume"):
        search(config, tmp_path / "run")
    with pytest.raises(EvomergeError, match="finished its budget"):
        resume(tmp_path / "run")


@pytest.mark.parametrize("overrides, message", [
    ({"space": "evo-mergin"}, "unknown search space 'evo-mergin'; did you mean 'evo-merging'"),
    ({"space": {"preset": "evo-merging", "genes": {"density": {"low": 0.0, "high": 1.5, "init": 1.0},
                                                   "weight": {"low": -1, "high": 1, "init": 0.1}}}}, "density"),
    ({"budgte": 3}, "budgte: unknown key"),
    ({"pool": {"base": "/nonexistent/base", "experts": {"a": "/nonexistent/a"}}}, "no such model directory"),
])
def test_bad_config_is_one_clear_line(tmp_path, pool_spec, overrides, message):
    """In process (the CLI's own entry, its own error handling; no interpreter start per case)."""
    from typer.testing import CliRunner

    from evomerge.cli import app

    path = write_config(tmp_path / "s.yaml", pool_spec, **overrides)
    done = CliRunner().invoke(app, ["search", str(path), "--run-dir", str(tmp_path / "r")])
    assert done.exit_code == 2, done.output
    assert message in done.stderr and done.stderr.strip().count("\n") == 0, done.stderr
    assert not (tmp_path / "r").exists()


def start_search(config: Path, run_dir: Path, delay: float) -> subprocess.Popen:
    env = {**os.environ, "EVOMERGE_TEST_DELAY": str(delay)}
    return subprocess.Popen([sys.executable, "-m", "evomerge.cli", "search", str(config), "--run-dir", str(run_dir)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)




def start_resume(run_dir: Path, delay: float) -> subprocess.Popen:
    env = {**os.environ, "EVOMERGE_TEST_DELAY": str(delay)}
    return subprocess.Popen([sys.executable, "-m", "evomerge.cli", "resume", str(run_dir)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def kill_when(process: subprocess.Popen, ready, after: float) -> None:
    """SIGKILL the process (and its Ray workers) ``after`` seconds once ``ready()`` holds."""
    wait_for(lambda: ready() or process.poll() is not None)
    assert process.poll() is None, "it finished before the kill"
    time.sleep(after)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def test_sigkill_at_seeded_random_points_then_resume_is_exact(tmp_path, pool_spec):
    """Kill -9 the driver in stage 0's first generation, then during a resume, then at once again in
    stage 1 (twice in a row), each at a seeded random moment (mid-evaluation, between log and
    checkpoint, during restore or Ray's start); the resumed run must have the uninterrupted run's
    ids, each once, and its proposals: the genes start on a bound (evo-merging's density 1.0),
    where an unpickled pycma in a new process used to diverge."""
    import random

    rng = random.Random(9)
    delay = 0.25
    config = write_config(tmp_path / "s.yaml", pool_spec, references=False)
    reference = genomes(search(load_search_config(config), tmp_path / "reference").path)
    run_dir = tmp_path / "run"
    logged = lambda: len(Run(run_dir).evaluations())  # noqa: E731

    first_generation = rng.randint(1, 5)  # popsize 6: ids 0..5 are stage 0's first generation
    kill_when(start_search(config, run_dir, delay), lambda: logged() >= first_generation, rng.uniform(0, delay))
    assert first_generation <= logged() < 8 and Run(run_dir).status()["state"] == "stopped"

    process = start_resume(run_dir, delay)
    lock = run_dir / "lock"
    kill_when(process, lambda: lock.is_file() and str(process.pid) in lock.read_text(), rng.uniform(0, 3.0))

    in_stage_1 = rng.randint(max(logged() + 1, 10), 20)
    process = start_resume(run_dir, delay)
    kill_when(process, lambda: logged() >= in_stage_1, rng.uniform(0, delay))
    assert Run(run_dir).status()["state"] == "stopped"

    done = start_resume(run_dir, 0.0)
    assert done.wait(timeout=300) == 0, done.stderr.read()
    ids = [e.id for e in Run(run_dir).evaluations()]
    assert len(ids) == len(set(ids)) == 24  # nothing repeated, budget finished
    after = genomes(run_dir)
    assert sorted(after) == sorted(reference)
    assert all(np.allclose(after[i], reference[i], rtol=0, atol=1e-9) for i in after)


def test_killed_worker_is_replaced_and_its_candidate_run_again(tmp_path, pool_spec):
    config = write_config(tmp_path / "s.yaml", pool_spec, budget=12, space="lorahub")
    process = start_search(config, tmp_path / "run", delay=1.0)
    run = Run(tmp_path / "run")
    wait_for(lambda: (run.path / "status.json").exists() and run.status().get("workers"))
    wait_for(lambda: len(run.evaluations()) >= 2)
    os.kill(run.status()["workers"][0], signal.SIGKILL)
    assert process.wait(timeout=180) == 0
    evaluations = run.evaluations()
    assert len(evaluations) == 12 and len({e.id for e in evaluations}) == 12
    assert all(e.ok for e in evaluations)


def test_worker_killed_while_scoring_the_references_is_replaced(tmp_path, pool_spec):
    config = write_config(tmp_path / "s.yaml", pool_spec, budget=6, space="lorahub")
    process = start_search(config, tmp_path / "run", delay=2.0)  # 4 references on 2 workers: 4 s
    run = Run(tmp_path / "run")
    wait_for(lambda: (run.path / "status.json").exists() and run.status().get("workers"))
    assert not (run.path / "references.json").exists()
    os.kill(run.status()["workers"][0], signal.SIGKILL)
    assert process.wait(timeout=180) == 0
    references = json.loads((run.path / "references.json").read_text())
    assert set(references) == {"base", "expert0", "expert1", "expert2"}
    assert all(r["status"] == "ok" for r in references.values())
    assert len(run.evaluations()) == 6


def test_show_and_export(tmp_path, pool_spec):
    # scored by the synthetic objective; the export merges for real
    config = write_config(tmp_path / "s.yaml", pool_spec, budget=8, space={"preset": "ties-dare", "layer_groups": 1})
    run = search(load_search_config(config), tmp_path / "run")
    shown = subprocess.run([sys.executable, "-m", "evomerge.cli", "show", str(run.path), "--plot"],
                           capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    assert "best candidates" in shown.stdout and "Pareto front" in shown.stdout and "expert0" in shown.stdout
    assert (run.path / "score_over_evaluations.png").stat().st_size > 1000
    assert (run.path / "pareto_front.png").stat().st_size > 1000
    out = tmp_path / "export"
    exported = subprocess.run([sys.executable, "-m", "evomerge.cli", "export", str(run.path), "-o", str(out)],
                              capture_output=True, text=True)
    assert exported.returncode == 0, exported.stderr
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)
    mergekit = yaml.safe_load((out / "mergekit.yaml").read_text())
    assert mergekit["merge_method"] == "dare_ties"
    best = run.best(1)[0]
    assert yaml.safe_load((out / "recipe.yaml").read_text()) == best.recipe


def test_show_compares_several_runs_grouping_seeds(tmp_path, pool_spec):
    from evomerge.plots import best_so_far, method_of

    runs = []
    for name, seed in (("lorahub-seed0", 0), ("lorahub-seed1", 1), ("random", 0)):
        config = write_config(tmp_path / f"{name}.yaml", pool_spec, budget=6, seed=seed, space="lorahub",
                              optimizer={"type": "random"}, references=False)
        runs.append(search(load_search_config(config), tmp_path / name))
    group = tmp_path.name
    assert [method_of(r) for r in runs] == [f"{group}/lorahub", f"{group}/lorahub", f"{group}/random"]
    shown = subprocess.run([sys.executable, "-m", "evomerge.cli", "show", *(str(r.path) for r in runs), "--plot",
                            "--plot-dir", str(tmp_path / "plots")], capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    assert all(r.path.name in shown.stdout for r in runs) and "6/6" in shown.stdout, shown.stdout
    assert (tmp_path / "plots" / "compare_runs.png").stat().st_size > 1000


def test_best_so_far_is_the_running_best_mean_score_with_failures_at_minus_infinity(tmp_path):
    from evomerge.plots import best_so_far
    from evomerge.run import Evaluation

    run = Run.create(tmp_path / "run", {"budget": 4})
    logged = [("failed", {}), ("ok", {"a": -2.0, "b": -4.0}), ("ok", {"a": -5.0, "b": -5.0}), ("ok", {"a": -1.0, "b": -2.0})]
    for i, (status, scores) in enumerate(logged):
        run.append(Evaluation(id=i, stage=0, genome=[0.0], recipe={}, scores=scores, objective=0.0, status=status))
    assert best_so_far(run).tolist() == [float("-inf"), -3.0, -3.0, -1.5]


def test_classic_grid_baseline_runs_every_point_in_the_run_format(tmp_path, pool_spec):
    from evomerge.baselines import classic_settings

    config = load_search_config(write_config(tmp_path / "s.yaml", pool_spec, space="classic", budget=500, optimizer={}))
    run = search(config, tmp_path / "run")
    evaluations = run.evaluations()
    expected = classic_settings(["task_arithmetic", "ties", "dare_ties", "breadcrumbs_ties", "della"])
    assert len(evaluations) == len(expected)  # the grid ran out before the budget
    seen = {(e.recipe["method"], next(iter(e.recipe["experts"].values()))["density"], e.recipe["parameters"]["lambda"])
            for e in evaluations}
    assert seen == set(expected)


def test_timed_out_candidate_is_failed_and_its_worker_replaced(tmp_path, pool_spec):
    config = load_search_config(write_config(tmp_path / "s.yaml", pool_spec, budget=3, space="lorahub",
                                             objective="tests.objectives:sleeps",
                                             optimizer={"type": "random"},
                                             workers={"count": 2, "timeout_s": 1.0}, references=False))
    run = search(config, tmp_path / "run")
    evaluations = run.evaluations()
    assert len(evaluations) == 3
    assert all(not e.ok and e.reason.startswith("timeout after") for e in evaluations)


def test_multi_objective_nevergrad_gets_per_task_losses(tmp_path, pool_spec, monkeypatch):
    from evomerge.optimizers.base import Optimizer

    told = {}  # candidate id -> the loss the optimizer was told
    tell = Optimizer.tell

    def recording_tell(self, results):
        told.update((cid, loss) for cid, loss in results)
        return tell(self, results)

    monkeypatch.setattr(Optimizer, "tell", recording_tell)
    config = load_search_config(write_config(tmp_path / "s.yaml", pool_spec, budget=12, space="lorahub",
                                             multi_objective=True,
                                             optimizer={"type": "nevergrad", "name": "DE"}))
    run = search(config, tmp_path / "run")
    evaluations = run.evaluations()
    assert len(evaluations) == 12 and {e.stage for e in evaluations} == {0} and all(e.ok for e in evaluations)
    tasks = ["expert0", "expert1", "expert2"]
    # each candidate's loss is its list of per-task losses (not the scalar objective)
    assert {e.id: [-e.scores[t] for t in tasks] for e in evaluations} == told
    front = json.loads((run.path / "pareto.json").read_text())
    assert front["tasks"] == tasks and len(front["front"]) >= 2


def test_a_shipped_suite_is_named_in_a_config(tmp_path, pool_spec):
    # `suite: zoo-loss` was made into CONFIG_DIR/zoo-loss, which never exists, and refused
    from evomerge.search import Search

    path = write_config(tmp_path / "s.yaml", pool_spec, suite="zoo-loss")
    config = load_search_config(path)
    assert config.suite == "zoo-loss"
    Search(config)  # loads the suite, among the other checks made before any long work
    (tmp_path / "zoo-loss").mkdir()  # a directory of that name beside the config is a path, not a name
    with pytest.raises(ConfigError, match="does not exist"):
        Search(load_search_config(path))
