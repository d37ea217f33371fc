"""Run: the run directory, the record people inspect and the truth a resume starts from.

    runs/NAME/
      config.yaml         the resolved config, as run (no secrets)
      evaluations.jsonl   one line per finished candidate, appended and fsynced per line
      checkpoint.pkl      optimizer state + counters + in-flight candidates, written atomically
      references.json     the base's and each expert's scores on the same suite
      provider.json       what the provider served (remote pools only); resume checks it
      pareto.json         non-dominated set over the per-task scores, with hypervolume
      status.json         state (running / finished / failed), pid, heartbeat, for `show` while live
      export/             merged models written by `evomerge export`

Like Optuna's journal storage, the append-only log is the truth: the checkpoint is derived, and a
logged evaluation the checkpoint has not seen yet is told again on resume, never re-evaluated.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from evomerge.errors import EvomergeError

CONFIG = "config.yaml"
EVALUATIONS = "evaluations.jsonl"
CHECKPOINT = "checkpoint.pkl"
REFERENCES = "references.json"
PARETO = "pareto.json"
STATUS = "status.json"


def atomic_write(path: Path, data: bytes) -> None:
    """Write-then-rename: a reader (or a crash) sees the old file or the new one, never half."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class Run:
    def __init__(self, path: Path):
        self.path = Path(path)

    # ---- lifecycle --------------------------------------------------------------------------
    @classmethod
    def create(cls, path: Path, config: dict[str, Any]) -> "Run":
        path = Path(path)
        if (path / CONFIG).exists():
            raise EvomergeError(f"{path} already holds a run; continue it with `evomerge resume {path}` "
                                "or choose another --run-dir")
        path.mkdir(parents=True, exist_ok=True)
        run = cls(path)
        atomic_write(path / CONFIG, yaml.safe_dump(config, sort_keys=False).encode())
        return run

    @classmethod
    def open(cls, path: Path) -> "Run":
        path = Path(path)
        if not (path / CONFIG).is_file():
            raise EvomergeError(f"{path} is not a run directory (no {CONFIG}); start one with `evomerge search`")
        return cls(path)

    def config(self) -> dict[str, Any]:
        return yaml.safe_load((self.path / CONFIG).read_text())

    # ---- the log ----------------------------------------------------------------------------
    def append(self, evaluation: Evaluation) -> None:
        line = json.dumps(evaluation.__dict__, default=_jsonable) + "\n"
        with open(self.path / EVALUATIONS, "a") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())

    def evaluations(self) -> list[Evaluation]:
        """Every logged evaluation; a torn last line (a kill mid-write) is ignored."""
        file = self.path / EVALUATIONS
        if not file.is_file():
            return []
        found = []
        for line in file.read_text().splitlines():
            try:
                found.append(Evaluation(**json.loads(line)))
            except (ValueError, TypeError):
                continue
        return found

    # ---- checkpoint -------------------------------------------------------------------------
    def save_checkpoint(self, state: dict[str, Any]) -> None:
        atomic_write(self.path / CHECKPOINT, pickle.dumps(state))

    def load_checkpoint(self) -> dict[str, Any] | None:
        file = self.path / CHECKPOINT
        if not file.is_file():
            return None
        return pickle.loads(file.read_bytes())

    # ---- small JSON records -----------------------------------------------------------------
    def write_json(self, name: str, data: Any) -> None:
        atomic_write(self.path / name, json.dumps(data, indent=1, default=_jsonable).encode())

    def read_json(self, name: str) -> Any:
        file = self.path / name
        return json.loads(file.read_text()) if file.is_file() else None

    def set_status(self, state: str, **extra: Any) -> None:
        self.write_json(STATUS, {"state": state, "pid": os.getpid(), "updated": time.time(), **extra})

    def status(self) -> dict[str, Any]:
        status = self.read_json(STATUS) or {"state": "created"}
        if status.get("state") == "running" and not _alive(status.get("pid")):
            status["state"] = "stopped"  # the process is gone: killed or crashed; resume continues it
        return status

    # ---- reading results ------------------------------------------------------------------
    def best(self, n: int = 1) -> list[Evaluation]:
        """The lowest objectives of the latest stage that has results: a later stage builds on the
        earlier ones' best, and stages' objectives carry different L1 terms, so they do not compare."""
        done = [e for e in self.evaluations() if e.ok]
        if done:
            last = max(e.stage for e in done)
            done = [e for e in done if e.stage == last]
        return sorted(done, key=lambda e: e.objective)[:n]

    def get(self, candidate_id: int) -> Evaluation:
        for evaluation in self.evaluations():
            if evaluation.id == candidate_id:
                return evaluation
        raise EvomergeError(f"{self.path}: no evaluation with id {candidate_id}")

    def update_pareto(self) -> dict[str, Any]:
        front = pareto_front(self.evaluations())
        self.write_json(PARETO, front)
        return front


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
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def pareto_front(evaluations: list[Evaluation]) -> dict[str, Any]:
    """Non-dominated ok evaluations over the per-task scores (all maximized), with hypervolume.

    The hypervolume's reference point is the worst score per task among all ok evaluations, so the
    number grows as the front advances and is comparable across snapshots of one run.
    """
    ok = [e for e in evaluations if e.ok and e.scores]
    if not ok:
        return {"tasks": [], "front": [], "hypervolume": 0.0, "reference": []}
    tasks = sorted(ok[0].scores)
    points = np.array([[e.scores[t] for t in tasks] for e in ok])
    keep = [i for i in range(len(ok)) if not _dominated(points[i], points)]
    reference = points.min(axis=0)
    return {
        "tasks": tasks,
        "front": [{"id": ok[i].id, "scores": ok[i].scores, "objective": ok[i].objective} for i in keep],
        "hypervolume": hypervolume(points[keep], reference),
        "reference": reference.tolist(),
    }


def _dominated(point: np.ndarray, points: np.ndarray) -> bool:
    better_or_equal = (points >= point).all(axis=1)
    strictly_better = (points > point).any(axis=1)
    return bool((better_or_equal & strictly_better).any())


def hypervolume(front: np.ndarray, reference: np.ndarray) -> float:
    """Volume dominated by a maximization front above `reference` (nevergrad's exact indicator)."""
    if len(front) == 0:
        return 0.0
    from nevergrad.optimization.multiobjective import HypervolumeIndicator

    # nevergrad minimizes: negate so that "more is better" becomes "less is better".
    indicator = HypervolumeIndicator(-reference)
    return float(indicator.compute([-p for p in front]))
