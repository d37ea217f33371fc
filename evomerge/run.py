"""Run: the run directory, the record people inspect and the truth a resume starts from.

    runs/NAME/
      config.yaml         the resolved config, as run (no secrets)
      evaluations.jsonl   one line per finished candidate, appended and fsynced per line
      checkpoint.json     stage, counters, in-flight candidates and the optimizer's state (its
                          constructor's arguments + journal of asks and tells), written atomically;
                          plain JSON with a `format` version: nothing in a run dir is ever unpickled
      references.json     the base's and each expert's scores on the same suite
      provider.json       what the provider served (remote pools only); resume checks it
      pareto.json         non-dominated set over the per-task scores, with hypervolume (API models:
                          also over mean score and serving cost, `score_cost`)
      queries.sqlite      API models: every answer the search paid for, asked once (evomerge/fusion)
      status.json         state (running / finished / failed / stopped), pid, heartbeat, for `show`
      lock                flock()ed by the process running the run (search or resume) for the whole
                          run; holds its pid and host, for the message a second process gets
      export/             merged models written by `evomerge export`

Like Optuna's journal storage, the append-only log is the truth: the checkpoint is derived, and a
logged evaluation the checkpoint has not seen yet is told again on resume, never re-evaluated.
A resume reads the log strictly (``checked_evaluations``): a torn last line (a kill mid-write) is
cut off and said so, a corrupt or duplicated line anywhere else stops it with file:line.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml

from evomerge.errors import EvomergeError
from evomerge.pareto import cost_front, hypervolume, pareto_front  # noqa: F401 - importable from here, as before

CONFIG = "config.yaml"
EVALUATIONS = "evaluations.jsonl"
CHECKPOINT = "checkpoint.json"
CHECKPOINT_FORMAT = 1
LEGACY_CHECKPOINT = "checkpoint.pkl"  # older evomerge's pickle: never loaded
LOCK = "lock"
REFERENCES = "references.json"
PARETO = "pareto.json"
STATUS = "status.json"


def atomic_write(path: Path, data: bytes) -> None:
    """Write-then-rename: a reader (or a crash) sees the old file or the new one, never half.
    A failed write (disk full, read-only file system) leaves the old file and is one line."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "wb") as handle:
            umask = os.umask(0o022)  # read it back: mkstemp makes the file 0600, a run dir is for sharing
            os.umask(umask)
            os.fchmod(handle.fileno(), 0o666 & ~umask)  # the mode open() gives a new file
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise EvomergeError(write_failed(path, error)) from error
        raise


def write_failed(path: Path, error: OSError) -> str:
    return (f"cannot write {path}: {error.strerror or error}; nothing logged is lost: free space or make the "
            f"directory writable, then `evomerge resume {path.parent}`")


@dataclass
class Evaluation:
    """One finished candidate as logged."""

    id: int
    stage: int
    genome: list[float]
    recipe: dict[str, Any]
    scores: dict[str, float]  # per task, higher is better
    objective: float  # minimized: -(weighted score) + penalty; the failure penalty when failed
    status: str  # "ok" | "failed"
    reason: str = ""
    worker: str = ""
    seconds: dict[str, float] | None = None
    finished_at: float = 0.0
    cost: dict[str, Any] | None = None  # API models: serving USD per query, what scoring it spent

    @property
    def serving_per_1k(self) -> float | None:
        """USD per 1000 queries that serving this candidate would cost (API models only)."""
        return None if self.cost is None else 1000.0 * self.cost["serving_usd_per_query"]

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class Run:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock: int | None = None  # the lock file's descriptor while this process runs the run

    # ---- lifecycle --------------------------------------------------------------------------
    @classmethod
    def create(cls, path: Path, config: dict[str, Any]) -> "Run":
        path = Path(path)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise EvomergeError(f"cannot create the run directory {path}: {error.strerror or error}") from error
        run = cls(path)
        run.lock()  # two searches into one new directory: one of them gets it
        try:
            if (path / CONFIG).exists():
                raise EvomergeError(f"{path} already holds a run; continue it with `evomerge resume {path}` "
                                    "or choose another --run-dir")
            atomic_write(path / CONFIG, yaml.safe_dump(config, sort_keys=False).encode())
        except BaseException:
            run.release_lock()
            raise
        return run

    @classmethod
    def open(cls, path: Path) -> "Run":
        path = Path(path)
        if not (path / CONFIG).is_file():
            raise EvomergeError(f"{path} is not a run directory (no {CONFIG}); start one with `evomerge search`")
        return cls(path)

    def config(self) -> dict[str, Any]:
        return yaml.safe_load((self.path / CONFIG).read_text())

    # ---- the lock ---------------------------------------------------------------------------
    def lock(self) -> None:
        """Hold the run's exclusive lock until ``release_lock`` (or this process ends, even by
        SIGKILL: the kernel drops it). A status file and a pid are not a lock: pids are reused and
        another host's are invisible; flock works across processes and (NFSv4) hosts."""
        if self._lock is not None:
            return
        file = self.path / LOCK
        try:
            fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise EvomergeError(f"cannot lock the run {self.path}: {error.strerror or error} ({file})") from error
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_holder(fd)
            os.close(fd)
            raise EvomergeError(f"run {self.path} is being run by another process "
                                f"(pid {holder.get('pid', '?')} on host {holder.get('host', '?')})") from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode(), 0)
        except OSError:
            pass  # the lock holds without its note (read-only lock file)
        self._lock = fd

    def release_lock(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # the lock file stays: removing it would let two processes lock two files
            self._lock = None

    @property
    def locked(self) -> bool:
        return self._lock is not None

    # ---- the log ----------------------------------------------------------------------------
    def append(self, evaluation: Evaluation) -> None:
        line = (json.dumps(evaluation.__dict__, default=_jsonable) + "\n").encode()
        file = self.path / EVALUATIONS
        try:
            with open(file, "a+b") as handle:
                end = handle.seek(0, os.SEEK_END)
                if end > 0:
                    handle.seek(end - 1)
                    if handle.read(1) != b"\n":
                        line = b"\n" + line  # never glue a record onto a torn one: each stays its own line
                handle.write(line)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as error:
            raise EvomergeError(write_failed(file, error)) from error

    def evaluations(self) -> list[Evaluation]:
        """Every logged evaluation, for readers (show, export, a live display): a torn last line
        (a kill, or a run mid-write) and unreadable lines are skipped. A resume uses
        ``checked_evaluations``, which refuses what this skips."""
        file = self.path / EVALUATIONS
        if not file.is_file():
            return []
        found = []
        for line in file.read_bytes().splitlines():
            try:
                found.append(_evaluation(line))
            except ValueError:
                continue
        return found

    def checked_evaluations(self, note: Callable[[str], None]) -> list[Evaluation]:
        """The log as a resume must see it: a torn last line (a stop mid-write: its candidate was
        never told, so it runs again) is cut off and ``note``d; a last line missing only its newline
        gets one; an unreadable line elsewhere or an id logged twice is an EvomergeError naming
        file:line, since skipping it would lose or double a record."""
        file = self.path / EVALUATIONS
        if not file.is_file():
            return []
        try:
            data = file.read_bytes()
            lines = data.split(b"\n")
            tail = lines.pop()  # what follows the last newline: empty when the file ends with one
            if tail:
                number = len(lines) + 1
                try:
                    _evaluation(tail)
                except ValueError:
                    os.truncate(file, len(data) - len(tail))
                    note(f"{file}:{number}: removed a torn last line ({len(tail)} bytes, cut short by a stop "
                         "mid-write); its candidate runs again")
                else:
                    with open(file, "ab") as handle:
                        handle.write(b"\n")
                        os.fsync(handle.fileno())
                    lines.append(tail)
                    note(f"{file}:{number}: the last line had no newline (a stop mid-write); added one")
        except OSError as error:
            raise EvomergeError(f"cannot repair {file}: {error.strerror or error}") from error
        found: list[Evaluation] = []
        first_line: dict[int, int] = {}
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                evaluation = _evaluation(line)
            except ValueError as why:
                raise EvomergeError(f"{file}:{number}: not an evaluation record ({why}); restore that line, or "
                                    f"delete it and {CHECKPOINT} to rebuild the run's state from the rest of the log") from None
            if evaluation.id in first_line:
                raise EvomergeError(f"{file}:{number}: id {evaluation.id} is logged twice (also at line "
                                    f"{first_line[evaluation.id]}); delete one of the two lines and {CHECKPOINT} "
                                    "to rebuild the run's state from the log") from None
            first_line[evaluation.id] = number
            found.append(evaluation)
        return found

    # ---- checkpoint -------------------------------------------------------------------------
    def save_checkpoint(self, state: dict[str, Any]) -> None:
        data = {"format": CHECKPOINT_FORMAT, **state}
        atomic_write(self.path / CHECKPOINT, json.dumps(data, default=_jsonable).encode())

    def load_checkpoint(self) -> dict[str, Any] | None:
        """The checkpoint's data, or None when there is none. Empty, cut short, not JSON or of
        another format: an EvomergeError that says how to rebuild it from the log."""
        file = self.path / CHECKPOINT
        if not file.is_file():
            return None
        rebuild = f"delete it to rebuild the run's state from {EVALUATIONS}, then resume"
        try:
            text = file.read_bytes()
        except OSError as error:
            raise EvomergeError(f"cannot read {file}: {error.strerror or error}; {rebuild}") from error
        if not text.strip():
            raise EvomergeError(f"{file} is empty; {rebuild}")
        try:
            data = json.loads(text)
        except ValueError as error:
            raise EvomergeError(f"{file} is not valid JSON ({error}): cut short or edited; {rebuild}") from None
        if not isinstance(data, dict) or "format" not in data:
            raise EvomergeError(f"{file} is not an evomerge checkpoint (no `format`); {rebuild}")
        if data["format"] != CHECKPOINT_FORMAT:
            raise EvomergeError(f"{file} has format {data['format']!r}, this evomerge reads format "
                                f"{CHECKPOINT_FORMAT}: resume with the evomerge that wrote it, or {rebuild}")
        return data

    # ---- small JSON records -----------------------------------------------------------------
    def write_json(self, name: str, data: Any) -> None:
        atomic_write(self.path / name, json.dumps(data, indent=1, default=_jsonable).encode())

    def read_json(self, name: str) -> Any:
        """A small JSON record, None when absent; unreadable JSON is one line that says what to do."""
        file = self.path / name
        if not file.is_file():
            return None
        try:
            return json.loads(file.read_text())
        except (ValueError, OSError) as error:
            raise EvomergeError(f"{file} is not valid JSON ({error}); {_FIX_JSON.get(name, 'restore or delete it')}") from None

    def set_status(self, state: str, **extra: Any) -> None:
        self.write_json(STATUS, {"state": state, "pid": os.getpid(), "updated": time.time(), **extra})

    def status(self) -> dict[str, Any]:
        try:
            status = self.read_json(STATUS) or {"state": "created"}
        except EvomergeError as error:  # advisory only: a resume rewrites it
            return {"state": "unknown", "reason": str(error)}
        if status.get("state") == "running" and not (self.locked or (_alive(status.get("pid")) and self._lock_held())):
            status["state"] = "stopped"  # the process is gone: killed or crashed; resume continues it
        return status

    def _lock_held(self) -> bool:
        """Whether some process holds the run's lock (a live pid in status.json may be a reused one).
        Probed with a shared lock, so that a runner is never blocked by it; no lock file: assume held."""
        try:
            fd = os.open(self.path / LOCK, os.O_RDONLY)
        except OSError:
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
        finally:
            os.close(fd)  # drops the probe's lock, if it got one
        return False

    # ---- reading results ------------------------------------------------------------------
    def best(self, n: int = 1) -> list[Evaluation]:
        """The run's picks, lowest objective first (``pick``)."""
        return pick(self.evaluations(), self.stage_penalties(), n)

    def stage_penalties(self) -> list[float] | None:
        return space_penalties(self.config())

    def get(self, candidate_id: int) -> Evaluation:
        for evaluation in self.evaluations():
            if evaluation.id == candidate_id:
                return evaluation
        raise EvomergeError(f"{self.path}: no evaluation with id {candidate_id}")

    def update_pareto(self) -> dict[str, Any]:
        evaluations = self.evaluations()
        front = pareto_front(evaluations)
        if any(e.cost is not None for e in evaluations):  # API models: score against serving cost too
            front["score_cost"] = cost_front(evaluations)
        self.write_json(PARETO, front)
        return front


def space_penalties(config: dict[str, Any]) -> list[float] | None:
    """Each stage's L1 weight, from a run config's space (plain YAML, never code); None when the
    space cannot be read (a preset this evomerge does not ship)."""
    from evomerge.spacespec import load_spec

    if "space" not in config:  # unreadable: a run's config.yaml always names its space
        return None
    try:
        spec, _ = load_spec(config["space"])
    except (EvomergeError, OSError, AttributeError):
        return None
    return [spec.l1 if s.l1 is None else s.l1 for s in spec.stages] if spec.stages else [spec.l1]


def pick(evaluations: list[Evaluation], penalties: list[float] | None, n: int = 1) -> list[Evaluation]:
    """The lowest objectives of the latest stage that has results, and of the stages before it
    when no stage involved adds an L1 term (the default's sweep and joint stage: the sweep's best,
    the base say, is a pick the joint stage may not beat). Stages with L1 terms do not compare:
    each penalizes its own genes (Evo-Merging's densities, then its weights)."""
    done = [e for e in evaluations if e.ok]
    if not done:
        return []
    last = max(e.stage for e in done)
    unpenalized = penalties is not None and len(penalties) > last and not any(penalties[:last + 1])
    chosen = done if unpenalized else [e for e in done if e.stage == last]
    return sorted(chosen, key=lambda e: e.objective)[:n]


_FIX_JSON = {
    REFERENCES: "delete it and resume: the references are scored again",
    STATUS: "delete it: the next search or resume writes it again",
    PARETO: "delete it: it is computed again from the log when the run finishes",
}


def _evaluation(line: bytes) -> Evaluation:
    """One log line as an Evaluation; ValueError (saying why) for anything else."""
    try:
        record = json.loads(line)
    except ValueError as error:
        raise ValueError(f"not JSON: {error}") from None
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    try:
        evaluation = Evaluation(**record)
    except TypeError as error:
        raise ValueError(str(error).replace("Evaluation.__init__() ", "")) from None
    if not isinstance(evaluation.id, int) or not isinstance(evaluation.stage, int):
        raise ValueError("id and stage must be integers")
    return evaluation


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
