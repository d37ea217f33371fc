"""The run directory under faults and adversaries: data not code, one runner at a time, a log that
loses nothing, and resumes that propose what the uninterrupted run did.

A reference search (synthetic objective, evo-merging preset, cmaes popsize 6, 24 evaluations:
8 in stage 0, 16 in stage 1) runs once; each test damages a copy of it the way a kill, a full disk
or a hostile edit would, resumes it, and compares ids and genomes with the reference.
"""

from __future__ import annotations

import json
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from evomerge.config import SearchConfig, load_search_config
from evomerge.errors import EvomergeError
from evomerge.run import CHECKPOINT, EVALUATIONS, Evaluation, Run
from evomerge.search import Search, resume, search
from tests.synthetic import make_pool

BUDGET = 24


@pytest.fixture(scope="module")
def pool_spec(tmp_path_factory):
    return make_pool(tmp_path_factory.mktemp("pool"), n_experts=3)


def write_config(path: Path, pool_spec, **overrides) -> Path:
    config = {"pool": pool_spec, "space": "evo-merging", "objective": "tests.objectives:quadratic",
              "budget": BUDGET, "seed": 7, "optimizer": {"type": "cmaes", "popsize": 6}, "workers": {"count": 2},
              "references": False}
    config.update(overrides)
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, pool_spec) -> Path:
    """The uninterrupted run."""
    root = tmp_path_factory.mktemp("reference")
    return search(load_search_config(write_config(root / "s.yaml", pool_spec)), root / "run").path


def genomes(run_dir: Path) -> dict[int, list[float]]:
    return {e.id: e.genome for e in Run(run_dir).evaluations()}


def assert_same_as(run_dir: Path, reference: Path) -> None:
    """Every id once, the budget spent, and the same proposals as the uninterrupted run."""
    ids = [e.id for e in Run(run_dir).evaluations()]
    assert len(ids) == len(set(ids)) == BUDGET
    after, expected = genomes(run_dir), genomes(reference)
    assert sorted(after) == sorted(expected)
    assert all(np.allclose(after[i], expected[i], rtol=0, atol=1e-9) for i in after)


def log_lines(run_dir: Path) -> list[bytes]:
    return (run_dir / EVALUATIONS).read_bytes().splitlines(keepends=True)


def stopped_copy(reference: Path, dest: Path, keep: int, checkpoint: bool = True) -> Path:
    """The reference as a run stopped after its first ``keep`` evaluations: the log cut there, and
    (``checkpoint``) a checkpoint consistent with it, as a kill between two candidates leaves."""
    shutil.copytree(reference, dest)
    (dest / EVALUATIONS).write_bytes(b"".join(log_lines(reference)[:keep]))
    (dest / CHECKPOINT).unlink()
    for name in ("pareto.json", "lock"):
        (dest / name).unlink(missing_ok=True)
    Run(dest).set_status("stopped")
    if checkpoint:  # the state a resume rebuilds from the log: what the checkpoint held at the kill
        prepared = Search(SearchConfig.model_validate(Run(dest).config()))
        prepared.run = Run(dest)
        prepared._restore()
    return dest


@pytest.mark.parametrize("keep", [3, 11])  # stage 0's first generation; stage 1
def test_missing_checkpoint_is_rebuilt_from_the_log_and_no_logged_id_runs_again(tmp_path, reference, keep, capfd):
    run_dir = stopped_copy(reference, tmp_path / "run", keep, checkpoint=False)
    before = log_lines(run_dir)
    resume(run_dir)
    assert "checkpoint.json is missing: the run's state is rebuilt from" in capfd.readouterr().err
    assert log_lines(run_dir)[:keep] == before  # nothing rewritten
    assert_same_as(run_dir, reference)


def test_torn_last_line_is_cut_off_said_so_and_its_candidate_runs_again(tmp_path, reference, capfd):
    run_dir = stopped_copy(reference, tmp_path / "run", keep=11)
    torn = log_lines(reference)[11][:150]  # a kill in the middle of writing record 12
    with open(run_dir / EVALUATIONS, "ab") as handle:
        handle.write(torn)
    resume(run_dir)
    err = capfd.readouterr().err
    assert f"{EVALUATIONS}:12: removed a torn last line (150 bytes" in err and "runs again" in err
    assert_same_as(run_dir, reference)


def test_a_record_is_never_glued_onto_a_torn_line(tmp_path):
    run = Run.create(tmp_path / "run", {"budget": 2})
    record = Evaluation(id=0, stage=0, genome=[0.5], recipe={}, scores={}, objective=1.0, status="ok")
    run.append(record)
    with open(run.path / EVALUATIONS, "ab") as handle:
        handle.write(b'{"id": 1, "sta')  # a stray partial write
    run.append(Evaluation(**{**record.__dict__, "id": 2}))
    lines = log_lines(run.path)
    assert lines[1] == b'{"id": 1, "sta\n' and json.loads(lines[2])["id"] == 2  # each on its own line
    assert [e.id for e in run.evaluations()] == [0, 2]  # readers skip the fragment...
    with pytest.raises(EvomergeError, match=rf"{EVALUATIONS}:2: not an evaluation record \(not JSON"):
        run.checked_evaluations(print)  # ...a resume refuses it: that candidate would be lost


def test_corrupt_middle_line_and_duplicated_id_are_refused_with_file_and_line(tmp_path, reference):
    run_dir = stopped_copy(reference, tmp_path / "run", keep=11)
    lines = log_lines(run_dir)
    (run_dir / EVALUATIONS).write_bytes(b"".join(lines[:4] + [b"{garbage\n"] + lines[5:]))
    with pytest.raises(EvomergeError, match=rf"{EVALUATIONS}:5: not an evaluation record"):
        resume(run_dir)
    (run_dir / EVALUATIONS).write_bytes(b"".join(lines[:6] + [lines[3]] + lines[6:]))
    with pytest.raises(EvomergeError, match=rf"{EVALUATIONS}:7: id \d+ is logged twice \(also at line 4\)"):
        resume(run_dir)
    missing_field = json.loads(lines[2])
    del missing_field["objective"]
    (run_dir / EVALUATIONS).write_bytes(b"".join(lines[:2] + [json.dumps(missing_field).encode() + b"\n"] + lines[3:]))
    with pytest.raises(EvomergeError, match=rf"{EVALUATIONS}:3: not an evaluation record \(missing .*objective"):
        resume(run_dir)
    assert Run(run_dir).status()["state"] == "stopped"  # refused before anything ran


def test_a_log_that_lost_records_is_refused(tmp_path, reference):
    run_dir = stopped_copy(reference, tmp_path / "run", keep=11)
    (run_dir / EVALUATIONS).write_bytes(b"".join(log_lines(run_dir)[:9]))
    with pytest.raises(EvomergeError, match=f"has 9 evaluations but {CHECKPOINT} counted 11: records were lost"):
        resume(run_dir)
    (run_dir / EVALUATIONS).unlink()
    with pytest.raises(EvomergeError, match=f"{EVALUATIONS} is missing but {CHECKPOINT} counted 11 evaluations"):
        resume(run_dir)


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b'{"format": 1, "stage": 1, "optimi', "is not valid JSON"),
    (b'{"format": 7, "stage": 1}', "has format 7, this evomerge reads format 1"),
    (b'{"format": 1, "stage": "one"}', "is not a checkpoint this evomerge wrote"),
    (pickle.dumps({"stage": 1}), "is not valid JSON"),
])
def test_damaged_checkpoint_is_one_line_and_loses_nothing(tmp_path, reference, content, message):
    run_dir = stopped_copy(reference, tmp_path / "run", keep=11)
    before = log_lines(run_dir)
    (run_dir / CHECKPOINT).write_bytes(content)
    with pytest.raises(EvomergeError, match=message) as error:
        resume(run_dir)
    assert "\n" not in str(error.value) and f"delete it to rebuild the run's state from {EVALUATIONS}" in str(error.value)
    assert log_lines(run_dir) == before and Run(run_dir).status()["state"] == "stopped"
    (run_dir / CHECKPOINT).unlink()  # the fix the message gives
    resume(run_dir)
    assert_same_as(run_dir, reference)


class _RunsCode:
    """Unpickling this creates a marker file: what a crafted checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_in_the_run_dir_is_never_loaded(tmp_path, reference, capfd):
    marker = tmp_path / "code-ran"
    run_dir = stopped_copy(reference, tmp_path / "run", keep=5, checkpoint=False)
    (run_dir / "checkpoint.pkl").write_bytes(pickle.dumps({"state": _RunsCode(marker)}))
    resume(run_dir)
    assert not marker.exists()
    assert "checkpoint.pkl (an older evomerge's pickle) is not loaded" in capfd.readouterr().err
    assert_same_as(run_dir, reference)
    # the checkpoint is JSON through and through; an optimizer state that is a pickle is refused
    saved = json.loads((run_dir / CHECKPOINT).read_text())
    assert saved["format"] == 1
    run_dir = stopped_copy(reference, tmp_path / "run2", keep=5)
    saved = json.loads((run_dir / CHECKPOINT).read_text())
    saved["optimizer"] = {"format": 1, "blob": pickle.dumps(_RunsCode(marker)).hex()}
    (run_dir / CHECKPOINT).write_text(json.dumps(saved))
    with pytest.raises(EvomergeError, match="optimizer state has format 1; this evomerge reads format 2"):
        resume(run_dir)
    assert not marker.exists() and Run(run_dir).status()["state"] == "failed"


def test_bad_json_in_references_or_status_is_one_line(tmp_path, reference, capfd):
    run_dir = stopped_copy(reference, tmp_path / "run", keep=11)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    (run_dir / "config.yaml").write_text(yaml.safe_dump({**config, "references": True}))
    (run_dir / "references.json").write_text('{"base": {"status": "ok", "sco')
    with pytest.raises(EvomergeError, match="references.json is not valid JSON .*delete it and resume: the "
                                            "references are scored again"):
        resume(run_dir)
    assert Run(run_dir).status()["state"] == "failed"  # not left running
    (run_dir / "references.json").unlink()
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    (run_dir / "status.json").write_text("{")
    assert Run(run_dir).status()["state"] == "unknown"  # `show` says so instead of a traceback
    resume(run_dir)
    assert "status.json is not valid JSON: ignored, this resume writes it again" in capfd.readouterr().err
    assert Run(run_dir).status()["state"] == "finished"
    assert_same_as(run_dir, reference)


def test_full_disk_is_one_line_and_a_resume_loses_nothing(tmp_path, reference, capfd):
    run_dir = stopped_copy(reference, tmp_path / "run", keep=11)
    # the log may grow by 100 bytes, less than a record: the next append is cut short and fails,
    # like a disk that fills up (EFBIG from RLIMIT_FSIZE here; ENOSPC on a full disk, below)
    from evomerge.worker import start_ray, stop_ray

    # Ray starts before the limit (its own processes write more than 100 bytes); a search then uses
    # the running cluster and leaves it to whoever started it
    start_ray(None, num_cpus=2, timeout_s=60)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, ((run_dir / EVALUATIONS).stat().st_size + 100, hard))
    try:
        with pytest.raises(EvomergeError, match=f"cannot write {run_dir / EVALUATIONS}: File too large; nothing "
                                                "logged is lost") as error:
            resume(run_dir)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        stop_ray()
    assert "\n" not in str(error.value)
    assert Run(run_dir).status()["state"] == "failed"
    resume(run_dir)  # space again: the torn record is cut off, its candidate runs again
    assert "removed a torn last line (100 bytes" in capfd.readouterr().err
    assert_same_as(run_dir, reference)


def test_no_space_left_is_one_line(tmp_path):
    run = Run.create(tmp_path / "run", {"budget": 1})
    (run.path / EVALUATIONS).symlink_to("/dev/full")
    record = Evaluation(id=0, stage=0, genome=[0.5], recipe={}, scores={}, objective=1.0, status="ok")
    with pytest.raises(EvomergeError, match="evaluations.jsonl: No space left on device; nothing logged is lost"):
        run.append(record)


def test_lock_in_one_process(tmp_path):
    first = Run.create(tmp_path / "run", {"budget": 1})  # held from create on
    with pytest.raises(EvomergeError, match=rf"run {first.path} is being run by another process \(pid {os.getpid()} on host"):
        Run.open(first.path).lock()
    first.release_lock()
    second = Run.open(first.path)
    second.lock()
    second.release_lock()


def cli(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "evomerge.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, **kwargs)


def test_a_second_process_on_a_running_run_is_refused(tmp_path, reference, pool_spec):
    run_dir = stopped_copy(reference, tmp_path / "run", keep=11)
    first = cli("resume", str(run_dir), env={**os.environ, "EVOMERGE_TEST_DELAY": "10"})  # still running below
    try:
        deadline = time.time() + 120
        lock = run_dir / "lock"
        while not (lock.is_file() and str(first.pid) in lock.read_text()):
            assert time.time() < deadline and first.poll() is None, first.stderr.read() if first.poll() else ""
            time.sleep(0.1)
        config = write_config(tmp_path / "s.yaml", pool_spec)
        seconds = [cli("resume", str(run_dir)), cli("search", str(config), "--run-dir", str(run_dir))]
        for second in seconds:
            _, err = second.communicate(timeout=120)
            assert second.returncode == 2, err
            errors = [line for line in err.splitlines() if line.startswith("error:")]
            assert errors == [f"error: run {run_dir} is being run by another process (pid {first.pid} on host "
                              f"{os.uname().nodename})"], err
        assert first.poll() is None
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    resume(run_dir)  # the kernel dropped the killed process's lock
    assert_same_as(run_dir, reference)


def _can_unshare_mounts() -> bool:
    done = subprocess.run(["unshare", "-m", "true"], capture_output=True) if shutil.which("unshare") else None
    return done is not None and done.returncode == 0


@pytest.mark.skipif(not _can_unshare_mounts(), reason="needs `unshare -m` (a private mount namespace)")
def test_read_only_file_system_is_one_line(tmp_path, reference):
    run_dir = stopped_copy(reference, tmp_path / "run", keep=11)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    command = (f"mount -o bind,ro {run_dir} {run_dir} && "
               f"exec {sys.executable} -m evomerge.cli resume {run_dir}")
    done = subprocess.run(["unshare", "-m", "sh", "-c", command], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: cannot lock the run {run_dir}: Read-only file system ({run_dir / 'lock'})"], done.stderr
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before


def test_status_of_a_run_whose_pid_was_reused_is_stopped(tmp_path):
    run = Run.create(tmp_path / "run", {"budget": 1})
    run.set_status("running")
    assert Run(run.path).status()["state"] == "running"  # this process holds the lock
    run.release_lock()
    # status.json names a live pid (this one: "reused"), but no process holds the run's lock
    assert Run(run.path).status()["state"] == "stopped"


def test_log_ahead_of_the_checkpoint_is_told_from_the_log_never_evaluated_again(tmp_path, reference, capfd):
    lines = log_lines(reference)
    # a kill between logging record keep + 1 and checkpointing its tell: the checkpoint has it in
    # flight. Which record was in flight when the one before it was told depends on which of the
    # reference's two workers finished first (a candidate asked after that tell can finish first).
    for keep in range(11, BUDGET - 4):
        run_dir = stopped_copy(reference, tmp_path / f"run-{keep}", keep=keep)
        if str(json.loads(lines[keep])["id"]) in json.loads((run_dir / CHECKPOINT).read_text())["in_flight"]:
            break
    else:
        pytest.fail("no record of the reference run was in flight when the one before it was told")
    with open(run_dir / EVALUATIONS, "ab") as handle:
        handle.write(lines[keep])
    capfd.readouterr()
    resume(run_dir)
    assert "rebuilt" not in capfd.readouterr().err
    assert log_lines(run_dir)[keep] == lines[keep]  # told from the log, not run again (ids are unique)
    assert_same_as(run_dir, reference)
    # a checkpoint older than that (a backup put back): the log wins, the state is rebuilt from it
    run_dir = stopped_copy(reference, tmp_path / "run2", keep=keep)
    with open(run_dir / EVALUATIONS, "ab") as handle:
        handle.write(b"".join(lines[keep:keep + 4]))
    resume(run_dir)
    assert f"{CHECKPOINT} does not match" in capfd.readouterr().err
    assert_same_as(run_dir, reference)


def test_a_checkpoint_that_still_counts_asks_and_tells_resumes_exactly(tmp_path, reference, capfd):
    """Checkpoints written before the counts were left to the optimizer held `told` and `asked`
    as well: such a run resumes as any other, with nothing rebuilt and nothing evaluated twice."""
    run_dir = stopped_copy(reference, tmp_path / "run", 11)
    data = json.loads((run_dir / CHECKPOINT).read_text())
    data.update(told=1, asked=1)  # this stage's counts as the old checkpoint kept them
    (run_dir / CHECKPOINT).write_text(json.dumps(data))
    before = log_lines(run_dir)
    capfd.readouterr()  # what making the stopped copy said
    resume(run_dir)
    assert "rebuilt" not in capfd.readouterr().err
    assert log_lines(run_dir)[:11] == before
    assert_same_as(run_dir, reference)
