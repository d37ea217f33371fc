"""End to end on the tiny demo zoo: real merges, real evaluations, through Ray workers and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from evomerge.run import Run

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args, env: dict | None = None):
    return subprocess.run([sys.executable, "-m", "evomerge.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize("pool, space", [
    ("pool-full.yaml", "evo-merging"),
    ("pool-lora.yaml", {"preset": "evo-merging", "lora_merge": "lowrank"}),
])
def test_search_on_the_zoo_then_show_and_export(tiny_zoo, tmp_path, pool, space):
    config = tmp_path / "search.yaml"
    config.write_text(yaml.safe_dump({
        "pool": str(tiny_zoo / pool), "space": space, "suite": str(REPO / "evaluators" / "zoo-loss.yaml"),
        "backend": {"name": "hf", "batch_size": 64}, "budget": 8, "seed": 0,
        "optimizer": {"type": "cmaes", "popsize": 4}, "workers": {"count": 2}}))
    done = run_cli("search", str(config), "--run-dir", str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr
    run = Run(tmp_path / "run")
    evaluations = run.evaluations()
    assert len(evaluations) == 8 and all(e.ok for e in evaluations)
    assert set(evaluations[0].scores) == {"add", "reverse", "upper", "next"}
    references = json.loads((run.path / "references.json").read_text())
    zoo_scores = json.loads((tiny_zoo / "scores.json").read_text())["scores"]
    kind = "full" if "full" in pool else "lora"
    for task in ("add", "reverse"):  # the workers score the experts as the zoo did (loss = -score)
        assert references[task]["scores"][task] == pytest.approx(-zoo_scores[f"{kind}/{task}"][task]["val_loss"], rel=1e-3)
    shown = run_cli("show", str(run.path))
    assert shown.returncode == 0 and "best candidates" in shown.stdout
    _the_dashboard_and_show_json_read_the_run(run, tmp_path, kind, references)
    exported = run_cli("export", str(run.path), "-o", str(tmp_path / "export"))
    assert exported.returncode == 0, exported.stderr
    if kind == "lora":  # a low-rank merge stays a PEFT adapter
        assert (tmp_path / "export" / "adapter_model.safetensors").is_file()
    else:
        assert (tmp_path / "export" / "model.safetensors").is_file()
        assert (tmp_path / "export" / "tokenizer.json").is_file()
        _export_picks_the_candidate_that_was_scored(run, tmp_path)


def _the_dashboard_and_show_json_read_the_run(run: Run, root: Path, kind: str, references: dict) -> None:
    """What `evomerge dashboard` and `show --json` answer over a real zoo run: its progress, the
    best against the references, the pool it searched, and the best candidate's recipe."""
    from evomerge.dashboard import data

    best = run.best(1)[0]
    detail = data.detail(root, data.resolve_run(root, "run"))
    assert detail["done"] == 8 and detail["state"] == "finished" and detail["best"]["id"] == best.id
    assert set(detail["references"]) == set(references) and detail["best_scores"] == best.scores
    assert detail["pool"].startswith(f"{kind} ") and set(detail["tasks"]) == set(best.scores)
    picked = data.candidate(root, run.path, best.id)
    assert yaml.safe_load(picked["recipe_yaml"]) == best.recipe and set(picked["mergekit"]) <= {"yaml", "error"}
    shown = run_cli("show", str(run.path), "--json")
    document = json.loads(shown.stdout)
    assert shown.returncode == 0 and document["evaluations"] == 8 and document["best"][0]["id"] == best.id


def _export_picks_the_candidate_that_was_scored(run: Run, tmp_path: Path) -> None:
    """`export --pick ID` writes that candidate (not the best), and the model it writes scores what
    the search recorded for it; an id the run does not have is one line."""
    from evomerge.backends.hf import HFBackend
    from evomerge.evaluator import evaluate, load_suite

    best = min((e for e in run.evaluations() if e.ok), key=lambda e: e.objective)
    other = next(e for e in run.evaluations() if e.ok and e.id != best.id)
    exported = run_cli("export", str(run.path), "--pick", str(other.id), "-o", str(tmp_path / "picked"))
    assert exported.returncode == 0 and f"exported {other.id}" in exported.stdout + exported.stderr, exported.stderr
    scored = evaluate(load_suite(REPO / "evaluators" / "zoo-loss.yaml"),
                      HFBackend(tmp_path / "picked", batch_size=64, num_threads=1)).scores
    assert scored == pytest.approx(other.scores, rel=1e-4)
    assert scored != pytest.approx(best.scores, rel=1e-4)
    missing = run_cli("export", str(run.path), "--pick", "4242", "-o", str(tmp_path / "none"))
    assert missing.returncode == 2 and missing.stderr.strip().count("\n") == 0, missing.stderr
    assert "4242" in missing.stderr and not (tmp_path / "none").exists()


def test_the_default_on_the_zoos_adapters_sweeps_scales_from_the_base_then_merges_jointly(tiny_zoo, tmp_path):
    """No space named: the default. Its sweep's first point (every weight 0) is the base, scored as
    the base reference is; the joint stage searches densities and weights from the best scale, over
    a dense merge of the LoRA adapters, and what it picks exports."""
    config = tmp_path / "search.yaml"
    config.write_text(yaml.safe_dump({
        "pool": str(tiny_zoo / "pool-lora.yaml"), "suite": str(REPO / "evaluators" / "zoo-loss.yaml"),
        "backend": {"name": "hf", "batch_size": 64}, "budget": 10, "seed": 0, "workers": {"count": 2}}))
    done = run_cli("search", str(config), "--run-dir", str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr
    run = Run(tmp_path / "run")
    evaluations = run.evaluations()
    assert len(evaluations) == 10 and all(e.ok for e in evaluations)
    sweep, joint = [e for e in evaluations if e.stage == 0], [e for e in evaluations if e.stage == 1]
    assert len(sweep) == 5 and len(joint) == 5  # budget 10: the sweep takes at most half
    base = json.loads((run.path / "references.json").read_text())["base"]["scores"]
    at_zero = next(e for e in sweep if all(p["weight"] == 0 for p in e.recipe["experts"].values()))
    assert at_zero.scores == pytest.approx(base, rel=1e-4)
    assert all(e.recipe["lora_merge"] == "dense" for e in evaluations)
    assert any(p["density"] < 1 for e in joint for p in e.recipe["experts"].values())
    exported = run_cli("export", str(run.path), "-o", str(tmp_path / "export"))
    assert exported.returncode == 0, exported.stderr


def test_nan_candidate_on_a_real_merge_is_a_failed_result(tiny_zoo):
    from evomerge.config import resolve_pool_spec
    from evomerge.worker import Worker

    spec = resolve_pool_spec("pool-full.yaml", tiny_zoo, "zoo")
    worker = Worker(spec, str(REPO / "evaluators" / "zoo-loss.yaml"), {"name": "hf", "batch_size": 64})
    huge = {"method": "task_arithmetic", "parameters": {"lambda": 1e30},
            "experts": {name: {"weight": 1e10} for name in spec.experts}}
    result = worker.evaluate(huge)
    assert result["status"] == "failed" and "NaN" in result["reason"]
    fine = worker.evaluate({"method": "task_arithmetic", "experts": {n: {"weight": 0.25} for n in spec.experts}})
    assert fine["status"] == "ok"  # the worker is still usable after a failed candidate


def test_demo_runs_end_to_end_on_the_tiny_zoo(tiny_zoo, tmp_path):
    done = run_cli("demo", "--zoo", str(tiny_zoo), "--size", "tiny", "--budget", "6", "--workers", "2",
                   "--run-dir", str(tmp_path / "demo"), env={"COLUMNS": "200"})  # no wrapped names
    assert done.returncode == 0, done.stderr
    assert "Evo-Merging (searched)" in done.stdout and "TIES (density 0.5)" in done.stdout
    assert "expert add" in done.stdout and "mean CE" in done.stdout
