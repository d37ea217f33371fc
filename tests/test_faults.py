"""Nothing hangs, nothing runs a whole budget on a broken setup (issue 9, part 4).

Each test drives the real CLI (a subprocess, real signals, a real Ray) or the real search loop on a
small random pool scored by synthetic objectives (tests.objectives, tests.faulty); the openai one
talks to a real `transformers serve`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from evomerge.config import load_search_config
from evomerge.errors import ConfigError, EvomergeError
from evomerge.run import Run
from evomerge.search import search
from tests.synthetic import make_pool
from tests.test_evaluator import model_dir  # noqa: F401 - the shared session fixture
from tests.test_evaluator_openai import transformers_serve  # noqa: F401 - a real OpenAI-compatible server
from tests.waiting import wait_for

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pool_spec(tmp_path_factory):
    return make_pool(tmp_path_factory.mktemp("pool"), n_experts=3)


def write_config(path: Path, pool_spec, **overrides) -> Path:
    config = {"pool": pool_spec, "space": "lorahub", "objective": "tests.objectives:quadratic", "budget": 12,
              "seed": 7, "optimizer": {"type": "random"}, "workers": {"count": 2}}
    config.update(overrides)
    path.write_text(yaml.safe_dump(config))
    return path


def evomerge(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "evomerge.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout, cwd=ROOT)


STARTED: list[subprocess.Popen] = []


def start(*args: str, env: dict | None = None) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-m", "evomerge.cli", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}, cwd=ROOT,
                               start_new_session=True)
    STARTED.append(process)
    return process


@pytest.fixture(autouse=True)
def no_leftover_processes():
    """A test that fails while its search still runs (a hang) kills it: nothing outlives the test."""
    yield
    while STARTED:
        process = STARTED.pop()
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip() and not _ray_noise(line)]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr, stderr
    return lines[0]


def last_line(stderr: str) -> str:
    """What evomerge said last (after a live progress display, which also writes to stderr)."""
    assert "Traceback" not in stderr, stderr
    return [line for line in stderr.splitlines() if line.strip()][-1]


def _ray_noise(line: str) -> bool:
    """What Ray itself prints while it starts (C++ warnings, its auth notice), not evomerge's."""
    return line.startswith("[20") or "Token authentication" in line or "SIGTERM handler is not set" in line




def raw_status(run_dir: Path) -> dict:
    """status.json as written (Run.status() reports a dead pid's `running` as stopped)."""
    try:
        return json.loads((run_dir / "status.json").read_text())
    except (OSError, ValueError):
        return {}


# ---- the workers override -------------------------------------------------------------------------


@pytest.mark.parametrize("count", ["0", "-1"])
def test_workers_on_the_command_line_are_validated_like_the_config(tmp_path, pool_spec, count):
    config = write_config(tmp_path / "s.yaml", pool_spec)
    done = evomerge("search", str(config), "--run-dir", str(tmp_path / "run"), "--workers", count, timeout=60)
    assert done.returncode == 2
    line = one_line(done.stderr)
    assert "workers.count" in line and "greater than or equal to 1" in line and "command line" in line, line
    assert not (tmp_path / "run").exists()


def test_the_other_overrides_merge_into_the_configs_workers(tmp_path, pool_spec):
    config = write_config(tmp_path / "s.yaml", pool_spec, workers={"count": 2, "timeout_s": 7.0})
    loaded = load_search_config(config, workers={"count": 3, "ray_address": None})
    assert (loaded.workers.count, loaded.workers.timeout_s, loaded.workers.ray_address) == (3, 7.0, None)


# ---- Ray: private unless an address is given, bounded, interruptible --------------------------------


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_an_unreachable_ray_address_is_one_line_quickly_and_leaves_no_run_dir(tmp_path, pool_spec):
    config = write_config(tmp_path / "s.yaml", pool_spec)
    started = time.time()
    done = evomerge("search", str(config), "--run-dir", str(tmp_path / "run"), "--ray-address",
                    f"127.0.0.1:{closed_port()}", timeout=90)
    assert done.returncode == 2 and time.time() - started < 60
    line = one_line(done.stderr)
    assert "cannot reach the Ray cluster at 127.0.0.1:" in line and "--ray-address" in line, line
    assert not (tmp_path / "run").exists()


class SilentListener:
    """Accepts TCP connections and never answers: an address that is no Ray, where ray.init waits."""

    def __init__(self):
        self.socket = socket.socket()
        self.socket.bind(("0.0.0.0", 0))  # Ray dials 127.0.0.1 as this machine's own address
        self.socket.listen(64)
        self.port = self.socket.getsockname()[1]
        self.accepted: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                self.accepted.append(self.socket.accept()[0])
            except OSError:
                return

    def close(self):
        self.socket.close()
        for connection in self.accepted:
            connection.close()


@pytest.fixture
def silent():
    listener = SilentListener()
    yield listener
    listener.close()


def test_an_address_that_never_answers_fails_within_the_connect_timeout(tmp_path, pool_spec, silent):
    config = write_config(tmp_path / "s.yaml", pool_spec, workers={"count": 1, "connect_timeout_s": 5})
    started = time.time()
    done = evomerge("search", str(config), "--run-dir", str(tmp_path / "run"), "--ray-address",
                    f"127.0.0.1:{silent.port}", timeout=120)
    assert done.returncode == 2 and time.time() - started < 90, done.stderr
    line = one_line(done.stderr)
    assert f"could not join the Ray cluster at 127.0.0.1:{silent.port} within 5s" in line, line
    assert not (tmp_path / "run").exists()


def test_ctrl_c_while_joining_a_cluster_stops_at_once_without_a_traceback(tmp_path, pool_spec, silent):
    config = write_config(tmp_path / "s.yaml", pool_spec, workers={"count": 1, "connect_timeout_s": 300})
    process = start("search", str(config), "--run-dir", str(tmp_path / "run"), "--ray-address",
                    f"127.0.0.1:{silent.port}")
    wait_for(lambda: len(silent.accepted) >= 2, 90, "ray.init to connect")  # our reachability check, then Ray's
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 130, stderr
    assert one_line(stderr) == "stopped (Ctrl-C) before the run started: nothing was written"
    assert not (tmp_path / "run").exists()


def test_an_inherited_ray_address_is_ignored_for_a_private_cluster(tmp_path, pool_spec):
    config = write_config(tmp_path / "s.yaml", pool_spec, budget=4, references=False, workers={"count": 1})
    done = evomerge("search", str(config), "--run-dir", str(tmp_path / "run"),
                    env={"RAY_ADDRESS": f"127.0.0.1:{closed_port()}"}, timeout=240)
    assert done.returncode == 0, done.stderr
    assert "RAY_ADDRESS=127.0.0.1:" in done.stderr and "is ignored" in done.stderr
    assert len(Run(tmp_path / "run").evaluations()) == 4


def test_a_worker_that_does_not_start_in_time_fails_the_run_in_one_line(tmp_path, pool_spec):
    config = load_search_config(write_config(tmp_path / "s.yaml", pool_spec, objective="tests.slow_to_load:never_called",
                                             workers={"count": 1, "start_timeout_s": 3}))
    started = time.time()
    with pytest.raises(EvomergeError, match=r"the 1 worker\(s\) did not start within 3s \(workers.start_timeout_s\)"):
        search(config, tmp_path / "run")
    assert time.time() - started < 25
    assert raw_status(tmp_path / "run")["state"] == "failed"


def test_a_worker_whose_constructor_fails_is_one_line(tmp_path, pool_spec):
    config = load_search_config(write_config(tmp_path / "s.yaml", pool_spec, objective="tests.no_such_module:f"))
    with pytest.raises(EvomergeError) as raised:
        search(config, tmp_path / "run")
    assert str(raised.value) == "a worker failed to start: ModuleNotFoundError: No module named 'tests.no_such_module'"


# ---- data validated before a search or an eval ------------------------------------------------------


def suite_with_a_bad_seventh_record(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"question": f"{i}+1", "answer": str(i + 1)}) for i in range(8)]
    lines[6] = json.dumps({"question": "6+1"})  # line 7: no answer
    (directory / "data.jsonl").write_text("\n".join(lines) + "\n")
    suite = {"tasks": [{"task": "add", "dataset_path": "data.jsonl", "doc_to_text": "question",
                        "doc_to_target": "{{ answer }}"}]}
    (directory / "suite.yaml").write_text(yaml.safe_dump(suite))
    return directory / "suite.yaml"


def test_a_record_missing_a_field_past_the_fifth_is_one_line_with_file_and_line(tmp_path, pool_spec):
    from evomerge.evaluator import load_suite

    suite = suite_with_a_bad_seventh_record(tmp_path / "suite")
    where = f"{tmp_path / 'suite' / 'data.jsonl'}:7"
    with pytest.raises(ConfigError) as raised:
        load_suite(suite)
    assert where in str(raised.value) and "'answer'" in str(raised.value) and "\n" not in str(raised.value)

    evaluated = evomerge("eval", pool_spec["base"], "--suite", str(suite), timeout=90)
    assert evaluated.returncode == 2 and where in one_line(evaluated.stderr)

    config = write_config(tmp_path / "s.yaml", pool_spec, objective=None, suite=str(suite))
    searched = evomerge("search", str(config), "--run-dir", str(tmp_path / "run"), timeout=90)
    assert searched.returncode == 2 and where in one_line(searched.stderr)
    assert not (tmp_path / "run").exists()


def test_a_pool_with_nan_in_an_expert_is_refused_before_the_search(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    spec = make_pool(tmp_path / "pool", n_experts=2)
    weights = Path(spec["experts"]["expert1"]) / "model.safetensors"
    tensors = load_file(weights)
    name = sorted(tensors)[0]
    tensors[name][0] = float("nan")
    save_file(tensors, weights, metadata={"format": "pt"})
    config = write_config(tmp_path / "s.yaml", spec)
    done = evomerge("search", str(config), "--run-dir", str(tmp_path / "run"), timeout=90)
    assert done.returncode == 2
    line = one_line(done.stderr)
    assert "expert1" in line and name in line and "NaN" in line, line
    assert not (tmp_path / "run").exists()


# ---- a broken setup stops the search instead of spending its budget ---------------------------------


def test_references_that_all_fail_alike_stop_before_the_search(tmp_path, pool_spec):
    config = load_search_config(write_config(tmp_path / "s.yaml", pool_spec, objective="tests.faulty:always_fails"))
    with pytest.raises(EvomergeError) as raised:
        search(config, tmp_path / "run")
    message = str(raised.value)
    assert "every 4 references (the base and each expert) failed" in message, message
    assert "refused the connection" in message and f"evomerge resume {tmp_path / 'run'}" in message
    run = Run(tmp_path / "run")
    assert run.evaluations() == [] and not (run.path / "references.json").exists()  # resume scores them again
    assert raw_status(run.path)["state"] == "failed" and "references" in raw_status(run.path)["reason"]


def test_first_candidates_that_all_fail_alike_stop_the_search(tmp_path, pool_spec):
    path = write_config(tmp_path / "s.yaml", pool_spec, budget=24, objective="tests.faulty:fails_unless_reference")
    done = evomerge("search", str(path), "--run-dir", str(tmp_path / "run"), timeout=240)
    assert done.returncode == 2
    line = last_line(done.stderr)
    assert line.startswith("error: ") and done.stderr.count("error:") == 1, done.stderr
    assert "the first 3 candidates all failed with the same reason" in line and "holds NaN/Inf" in line, line
    run = Run(tmp_path / "run")
    assert 3 <= len(run.evaluations()) <= 4  # 3, and maybe the other worker's, not the budget of 24
    assert all(not e.ok for e in run.evaluations())
    assert raw_status(run.path)["state"] == "failed" and "same reason" in raw_status(run.path)["reason"]


def test_failures_mixed_with_successes_do_not_stop_the_search(tmp_path, pool_spec):
    # one worker: results arrive in the order asked, so whether a success comes among the first
    # three (seed 7: it does) does not depend on timing
    config = load_search_config(write_config(tmp_path / "s.yaml", pool_spec, budget=16, workers={"count": 1},
                                             objective="tests.objectives:fails_on_negative"))
    run = search(config, tmp_path / "run")
    assert len(run.evaluations()) == 16 and run.status()["state"] == "finished"


# ---- SIGTERM and Ctrl-C: a clean stop that says how to continue -------------------------------------


def stop_while_ray_starts(run_dir: Path, sig: int) -> subprocess.CompletedProcess:
    """Resume `run_dir` and send `sig` once the run is `running` but its workers are not up yet."""
    process = start("resume", str(run_dir), env={"EVOMERGE_TEST_DELAY": "0.3"})
    wait_for(lambda: raw_status(run_dir).get("pid") == process.pid and raw_status(run_dir).get("state") == "running",
             120, "the resume to start")
    assert "workers" not in raw_status(run_dir)  # Ray and the workers are still starting
    process.send_signal(sig)
    stdout, stderr = process.communicate(timeout=60)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def test_sigterm_and_ctrl_c_stop_cleanly_at_any_point_and_resume_finishes(tmp_path, pool_spec):
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "s.yaml", pool_spec, budget=16)
    process = start("search", str(config), "--run-dir", str(run_dir), env={"EVOMERGE_TEST_DELAY": "0.3"})
    wait_for(lambda: len(Run(run_dir).evaluations()) >= 3, 180, "three evaluations")
    process.send_signal(signal.SIGTERM)  # mid-search
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, stderr
    assert last_line(stderr) == f"stopped (SIGTERM): continue with `evomerge resume {run_dir}`"
    assert "Traceback" not in stderr and "SIGTERM received" not in stderr, stderr  # no Ray stack dump
    assert raw_status(run_dir)["state"] == "stopped"

    for sig, code, how in ((signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "Ctrl-C")):
        done = stop_while_ray_starts(run_dir, sig)
        assert done.returncode == code, done.stderr
        assert last_line(done.stderr) == f"stopped ({how}): continue with `evomerge resume {run_dir}`", done.stderr
        assert raw_status(run_dir)["state"] == "stopped"

    done = evomerge("resume", str(run_dir), timeout=240)
    assert done.returncode == 0, done.stderr
    ids = [e.id for e in Run(run_dir).evaluations()]
    assert len(ids) == len(set(ids)) == 16


# ---- the openai backend in a search -------------------------------------------------------------------


def test_an_openai_backend_search_is_refused_up_front(tmp_path, pool_spec):
    config = write_config(tmp_path / "s.yaml", pool_spec, objective=None, suite=str(ROOT / "evaluators/zoo-loss.yaml"),
                          backend={"name": "openai", "base_url": "http://127.0.0.1:9/v1", "api_key_env": "NO_KEY"})
    done = evomerge("search", str(config), "--run-dir", str(tmp_path / "run"), timeout=90)
    assert done.returncode == 2
    assert "cannot take merged weights" in one_line(done.stderr)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_an_openai_backend_search_against_a_real_server_is_refused_and_eval_scores_it(
        tmp_path, tiny_zoo, transformers_serve):  # noqa: F811
    """The served model answers, but a search cannot put merged weights into it: refused before
    any run dir or Ray, in one line that says why and what to use; `eval` is what scores it."""
    config = {"pool": str(tiny_zoo / "pool-full.yaml"), "suite": str(ROOT / "evaluators/zoo-generate.yaml"),
              "backend": {"name": "openai", "base_url": transformers_serve, "api_key_env": "NO_KEY"}, "budget": 4}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(config))
    done = evomerge("search", str(tmp_path / "s.yaml"), "--run-dir", str(tmp_path / "run"), timeout=120)
    assert done.returncode == 2, done.stderr
    line = one_line(done.stderr)
    assert "backend 'openai'" in line and "cannot take merged weights" in line and "evomerge eval" in line, line
    assert not (tmp_path / "run").exists()
    scored = evomerge("eval", transformers_serve, "--suite", str(ROOT / "evaluators/zoo-generate.yaml"),
                      "--limit", "2", timeout=300)
    assert scored.returncode == 0, scored.stderr


def test_a_finished_search_prints_its_summary_on_one_line_and_no_ray_notes(tmp_path, pool_spec):
    # Ray announced token authentication on every start, and the summary wrapped at 80 columns in a log
    run_dir = tmp_path / ("a-long-run-directory-name-" * 3)
    done = evomerge("search", str(write_config(tmp_path / "s.yaml", pool_spec, budget=4, workers={"count": 1})),
                    "--run-dir", str(run_dir))
    assert done.returncode == 0, done.stderr
    assert "Token authentication" not in done.stderr, done.stderr
    assert re.search(rf"^{re.escape(str(run_dir))}: 4 evaluations, 0 failed, best objective .* \(candidate \d+\)$",
                     done.stderr, re.MULTILINE), done.stderr


def test_a_search_refused_after_ray_started_leaves_no_cluster_for_the_next_one(tmp_path, pool_spec, monkeypatch):
    """`search()` starts Ray before it makes the run dir; a refusal there (a run dir that holds a
    run) must shut the private cluster down, or the next search in the process joins it with the
    environment of then (a provider token set since would be missing in its actors)."""
    import ray

    config = load_search_config(write_config(tmp_path / "s.yaml", pool_spec, budget=4))
    search(config, tmp_path / "run")
    with pytest.raises(EvomergeError, match="already holds a run"):
        search(config, tmp_path / "run")
    assert not ray.is_initialized()
    monkeypatch.setenv("EVOMERGE_TEST_SEEN_BY_WORKERS", "set after the refused search")
    run = search(config.model_copy(update={"objective": "tests.objectives:needs_environment"}), tmp_path / "next")
    assert all(e.ok for e in run.evaluations())


def test_a_stage_whose_every_candidate_fails_stops_the_search_there(tmp_path, pool_spec):
    """Stage 1 works; every merge of stage 2 fails alike: the search stops after that stage's first
    few results, saying which stage and why, instead of spending stage 2's budget; stage 1's
    results stay, and `show` still has the best of them."""
    path = write_config(tmp_path / "s.yaml", pool_spec, space="evo-merging", budget=30, references=False,
                        objective="tests.objectives:fails_unless_weights_equal", workers={"count": 1},
                        optimizer={"type": "cmaes", "popsize": 4})
    done = evomerge("search", str(path), "--run-dir", str(tmp_path / "run"), timeout=240)
    assert done.returncode == 2, done.stderr
    line = last_line(done.stderr)
    assert "the first 3 candidates in stage 2 of 2 (scaling) all failed with the same reason" in line, line
    assert "unequal expert weights" in line, line
    run = Run(tmp_path / "run")
    first, second = [e for e in run.evaluations() if e.stage == 0], [e for e in run.evaluations() if e.stage == 1]
    assert len(first) == 10 and all(e.ok for e in first)  # a third of 30: the stage that worked, all kept
    assert len(second) == 3 and not any(e.ok for e in second)  # not stage 2's 20
    assert raw_status(run.path)["state"] == "failed"
    shown = evomerge("show", str(run.path))
    assert shown.returncode == 0 and "best candidates" in shown.stdout, shown.stderr
