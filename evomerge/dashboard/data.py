"""What the dashboard's JSON API answers, read from run directories and nothing else.

Read-only by construction: the run dir's own readers (Run.evaluations skips a torn or garbage line,
Run.status probes the lock with a shared flock) and plain file reads; nothing here opens a file
for writing. No torch, no Ray: a recipe's mergekit YAML needs the merge-method registry (which
imports torch), so it is made in a short-lived child process (evomerge/dashboard/mergekit.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from evomerge.errors import EvomergeError
from evomerge.pareto import cost_front, pareto_front
from evomerge.poolspec import spec_kind
from evomerge.plots import band, best_so_far_of, method_of, pool_label
from evomerge.run import CONFIG, EVALUATIONS, REFERENCES, Evaluation, Run, pick, space_penalties

CONFIG_NAMES = (CONFIG, "config.yaml", "config.json")  # what older and newer evomerge write
SEARCH_DEPTH = 3  # runs/NAME, runs/GROUP/NAME, runs/STUDY/GROUP/NAME
RATE_WINDOW = 20  # evaluations: the rate is the recent one, not one diluted by a pause before a resume
MERGEKIT_TIMEOUT_S = 120


class NotARun(LookupError):
    """A name that is not a run under the dashboard's directory (404)."""


# ---- finding runs ---------------------------------------------------------------------------
def find_runs(root: Path) -> list[Path]:
    """Run directories (those with a config file) under root, up to SEARCH_DEPTH levels down."""
    found = []
    for here, dirs, _files in os.walk(root):
        depth = len(Path(here).relative_to(root).parts)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "export")
        if depth and _config_file(Path(here)) is not None:
            found.append(Path(here))
            dirs[:] = []  # a run's own subfolders (export/) hold no runs
        elif depth >= SEARCH_DEPTH:
            dirs[:] = []
    return found


def resolve_run(root: Path, name: str) -> Path:
    """The run called `name` (its path relative to root), refusing anything outside root."""
    path = (root / name).resolve()
    if root.resolve() not in path.parents or _config_file(path) is None:
        raise NotARun(f"no run {name!r} under {root}")
    return path


def run_name(root: Path, path: Path) -> str:
    return path.resolve().relative_to(root.resolve()).as_posix()


# ---- reading one run ------------------------------------------------------------------------
def _config_file(path: Path) -> Path | None:
    return next((path / n for n in CONFIG_NAMES if (path / n).is_file()), None)


def read_config(path: Path) -> dict[str, Any]:
    file = _config_file(path)
    try:
        config = yaml.safe_load(file.read_text()) if file else None  # JSON is YAML too
    except (OSError, yaml.YAMLError):
        config = None  # being replaced right now: the next poll reads it
    return config if isinstance(config, dict) else {}


_cache: dict[Path, tuple[tuple[int, int], list[Evaluation]]] = {}
_cache_lock = threading.Lock()


def evaluations(path: Path) -> list[Evaluation]:
    """The run's log (torn and garbage lines skipped), parsed again only when the file changed.
    The file is stat'ed before it is read: a line appended meanwhile changes the key, so the next
    call reads again and nothing is missed."""
    file = path / EVALUATIONS
    try:
        stat = file.stat()
    except OSError:
        return []
    key = (stat.st_size, stat.st_mtime_ns)
    with _cache_lock:
        cached = _cache.get(path)
    if cached and cached[0] == key:
        return cached[1]
    found = Run(path).evaluations()
    with _cache_lock:
        _cache[path] = (key, found)
    return found


def _read_json(path: Path, name: str) -> Any:
    try:
        return Run(path).read_json(name)
    except EvomergeError:
        return None  # mid-replace or damaged: the page shows what it can


def _status(path: Path) -> dict[str, Any]:
    status = Run(path).status()
    return status if isinstance(status, dict) else {"state": "unknown"}


def _mean(scores: dict[str, float]) -> float | None:
    return float(np.mean(list(scores.values()))) if scores else None


def _rate(done: list[Evaluation]) -> float | None:
    """Evaluations per minute over the last RATE_WINDOW finished ones."""
    times = sorted(e.finished_at for e in done if e.finished_at)[-RATE_WINDOW:]
    if len(times) < 2 or times[-1] <= times[0]:
        return None
    return 60.0 * (len(times) - 1) / (times[-1] - times[0])


def _mtime(file: Path) -> float | None:
    try:
        return file.stat().st_mtime
    except OSError:
        return None


def summary(root: Path, path: Path) -> dict[str, Any]:
    """One row of the runs list."""
    config, status, logged = read_config(path), _status(path), evaluations(path)
    best = pick(logged, space_penalties(config))
    started = _mtime(_config_file(path) or path)
    updates = [t for t in (_mtime(path / EVALUATIONS), status.get("updated")) if isinstance(t, (int, float))]
    return {
        "name": run_name(root, path),
        "state": status.get("state", "unknown"),
        "reason": status.get("reason", ""),
        "budget": config.get("budget") or status.get("budget"),
        "done": len(logged),
        "failed": sum(not e.ok for e in logged),
        "best": None if not best else {"id": best[0].id, "objective": best[0].objective,
                                       "mean_score": _mean(best[0].scores), "stage": best[0].stage},
        "rate_per_min": _rate(logged),
        "started": started,
        "updated": max(updates) if updates else started,
        "method": method_of(Run(path)),
        "seed": config.get("seed"),
        "pool": pool_label(config.get("pool")),
    }


def list_runs(root: Path) -> dict[str, Any]:
    return {"root": str(root), "now": time.time(), "runs": [summary(root, p) for p in find_runs(root)]}


def _row(e: Evaluation) -> dict[str, Any]:
    return {"id": e.id, "stage": e.stage, "status": e.status, "objective": e.objective, "scores": e.scores,
            "mean_score": _mean(e.scores), "cost_per_1k": e.serving_per_1k if e.ok else None,
            "finished_at": e.finished_at, "reason": e.reason, "worker": e.worker, "recipe": recipe_summary(e.recipe)}


def recipe_summary(recipe: dict[str, Any]) -> str:
    """One line for the table: method, then each expert's parameters (gradients as [n values])."""
    if not isinstance(recipe, dict):
        return ""
    experts = recipe.get("experts") or {}
    parts = [f"{name}: " + " ".join(f"{k}={_short(v)}" for k, v in (params or {}).items() if v is not None)
             for name, params in experts.items()]
    extra = f" (+{len(recipe['overrides'])} overrides)" if recipe.get("overrides") else ""
    return f"{recipe.get('method', '?')}{extra}; " + "; ".join(parts)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, list):
        return f"[{len(value)} values]"
    return str(value)


def _progress(logged: list[Evaluation]) -> list[dict[str, Any]]:
    """Per evaluation in log order: its objective and the best objective so far within its stage
    (stages' objectives carry different terms, so a best does not carry over a stage change)."""
    best: dict[int, float] = {}
    points = []
    for n, e in enumerate(logged, 1):
        if e.ok:
            best[e.stage] = min(best.get(e.stage, float("inf")), e.objective)
        points.append({"n": n, "id": e.id, "stage": e.stage, "objective": e.objective if e.ok else None,
                       "best": best.get(e.stage)})
    return points


def detail(root: Path, path: Path) -> dict[str, Any]:
    """Everything the run page draws."""
    logged = evaluations(path)
    ok = [e for e in logged if e.ok and e.scores]
    front = pareto_front(logged)
    references = {name: ref.get("scores") or {} for name, ref in (_read_json(path, REFERENCES) or {}).items()
                  if isinstance(ref, dict)}
    config = read_config(path)
    best = pick(logged, space_penalties(config))
    costed = any(e.cost is not None for e in ok)
    return {
        **summary(root, path),
        "status": _status(path),
        "tasks": front["tasks"],
        "axes": front["tasks"] + ["mean score", "objective"] + (["cost $/1k"] if costed else []),
        "evaluations": [_row(e) for e in logged],
        "progress": _progress(logged),
        "best_so_far_score": [None if not np.isfinite(v) else float(v) for v in best_so_far_of(logged)],
        "references": references,
        "best_scores": best[0].scores if best else {},
        "pareto": {**front, "front_ids": [p["id"] for p in front["front"]]},
        "score_cost": cost_front(logged) if costed else None,
    }


def compare(root: Path, names: list[str]) -> dict[str, Any]:
    """Best-so-far mean score curves grouped by (pool, method): seeds of one method over one pool
    make one band (mean, min..max), as in `show --plot`; runs over different pools never share one."""
    groups: dict[tuple[str, str], list[tuple[str, np.ndarray]]] = {}
    for name in names:
        path = resolve_run(root, name)
        curve = best_so_far_of(evaluations(path))
        if len(curve):
            key = (pool_label(read_config(path).get("pool")), method_of(Run(path)))
            groups.setdefault(key, []).append((name, curve))
    out = []
    for (pool, method), members in sorted(groups.items()):
        x, mean, low, high = band([curve for _, curve in members])
        out.append({"pool": pool, "method": method, "runs": [n for n, _ in members], "x": x.tolist(),
                    "mean": _finite(mean), "low": _finite(low), "high": _finite(high),
                    "curves": {n: _finite(c) for n, c in members}})
    return {"groups": out, "pools": sorted({g["pool"] for g in out})}


def _finite(values: np.ndarray) -> list[float | None]:
    return [float(v) if np.isfinite(v) else None for v in values]


# ---- one candidate --------------------------------------------------------------------------
_mergekit_cache: dict[tuple[Path, int], dict[str, str]] = {}


def candidate(root: Path, path: Path, candidate_id: int) -> dict[str, Any]:
    """A candidate's full record, its recipe as YAML, and its mergekit YAML (or why there is none)."""
    found = next((e for e in evaluations(path) if e.id == candidate_id), None)
    if found is None:
        raise NotARun(f"run {run_name(root, path)!r} has no candidate {candidate_id}")
    return {"run": run_name(root, path), **_row(found), "genome": found.genome, "seconds": found.seconds,
            "cost": found.cost, "recipe_yaml": yaml.safe_dump(found.recipe, sort_keys=False),
            "mergekit": mergekit_yaml(path, found)}


def mergekit_yaml(path: Path, found: Evaluation) -> dict[str, str]:
    """{"yaml": ...} or {"error": why not}. Logged candidates never change, so one answer each."""
    key = (path, found.id)
    if key not in _mergekit_cache:
        pool = read_config(path).get("pool")
        if spec_kind(pool) != "local":
            return {"error": "mergekit describes merges of weights on disk; this run's pool is not one"}
        _mergekit_cache[key] = _mergekit_child({"recipe": found.recipe, "pool": pool})
    return _mergekit_cache[key]


def _mergekit_child(request: dict[str, Any]) -> dict[str, str]:
    try:
        done = subprocess.run([sys.executable, "-m", "evomerge.dashboard.mergekit"], input=json.dumps(request),
                              capture_output=True, text=True, timeout=MERGEKIT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"error": f"making the mergekit YAML took over {MERGEKIT_TIMEOUT_S} s"}
    try:
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"error": f"making the mergekit YAML failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}"}

