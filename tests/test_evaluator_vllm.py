"""The vllm backend without a GPU: request construction, logprob extraction from vLLM-shaped
outputs (vLLM's own Logprob dataclass when importable), weight swaps through collective_rpc and
the worker extension, and the error when vLLM is missing. A FakeLLM answers like `vllm.LLM`
(generate / get_tokenizer / collective_rpc / reset_prefix_cache) over the same transformers model,
so the backend must agree with the hf backend."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional

import pytest
import torch
import yaml

from evomerge.backends.hf import HFBackend
from evomerge.backends.vllm_engine import (
    EXTENSION,
    VLLMBackend,
    WeightUpdateExtension,
    generation_sampling_kwargs,
    loglikelihood_from_output,
    loglikelihood_prompts,
    loglikelihood_sampling_kwargs,
    sampling_params,
)
from evomerge.evaluator import evaluate, load_suite
from tests.test_evaluator import model_dir  # noqa: F401 - the shared session fixture
from tests.test_evaluator_zoo import make_records, write_jsonl

torch.set_num_threads(1)

try:  # vLLM's own dataclass where vLLM is installed (moved between versions)
    from vllm.logprobs import Logprob
except ImportError:
    try:
        from vllm.sequence import Logprob
    except ImportError:

        @dataclass
        class Logprob:  # the documented shape of vllm's Logprob
            logprob: float
            rank: Optional[int] = None
            decoded_token: Optional[str] = None


class FakeLLM:
    """What VLLMBackend uses of vllm.LLM, over a transformers model; the worker side is a
    WeightUpdateExtension whose model_runner.model has vLLM's `load_weights`."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        state = dict(model.named_parameters())

        def load_weights(weights):
            for name, tensor in weights:
                state[name].data.copy_(tensor)

        model.load_weights = load_weights
        self.worker = WeightUpdateExtension()
        self.worker.model_runner = SimpleNamespace(model=model)
        self.rpc_calls, self.prefix_resets = [], 0

    def get_tokenizer(self):
        return self.tokenizer

    def collective_rpc(self, method, args=(), kwargs=None):
        self.rpc_calls.append(method)
        return [getattr(self.worker, method)(*args, **(kwargs or {}))]

    def reset_prefix_cache(self):
        self.prefix_resets += 1
        return True

    @torch.no_grad()
    def generate(self, prompts, params, use_tqdm=True):
        params = params if isinstance(params, list) else [params] * len(prompts)
        return [self._one(prompt["prompt_token_ids"], p) for prompt, p in zip(prompts, params)]

    def _one(self, ids, params):
        prompt_logprobs = None
        if getattr(params, "prompt_logprobs", None):
            logprobs = self.model(torch.tensor([ids])).logits[0].log_softmax(-1)
            prompt_logprobs = [None]
            for position in range(1, len(ids)):
                row = logprobs[position - 1]
                token, best = ids[position], int(row.argmax())
                prompt_logprobs.append({
                    token: Logprob(float(row[token]), int((row > row[token]).sum()) + 1, None),
                    best: Logprob(float(row[best]), 1, None),
                })
        generated = []
        text = ""
        for _ in range(params.max_tokens):
            generated.append(int(self.model(torch.tensor([ids + generated])).logits[0, -1].argmax()))
            text = self.tokenizer.decode(generated, skip_special_tokens=True)
            hits = [text.find(s) for s in getattr(params, "stop", None) or [] if s in text]
            if hits:
                text = text[: min(hits)]
                break
        return SimpleNamespace(prompt_token_ids=ids, prompt_logprobs=prompt_logprobs,
                               outputs=[SimpleNamespace(text=text, token_ids=generated)])


@pytest.fixture
def suite(tmp_path):
    write_jsonl(tmp_path / "data.jsonl", make_records(6, seed=21))
    text = {"dataset_path": "data.jsonl", "doc_to_text": "{{ question }} =", "doc_to_target": "answer"}
    tasks = [{"task": "loss", "output_type": "loss", **text},
             {"task": "mc", "output_type": "multiple_choice", "doc_to_choice": "{{ [answer, '7'] }}", **text},
             {"task": "gen", "output_type": "generate_until", **text,
              "generation_kwargs": {"until": ["\n"], "max_gen_toks": 5}}]
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump({"tasks": tasks}))
    return load_suite(tmp_path / "suite.yaml")


def test_vllm_backend_agrees_with_hf_and_swaps_weights_in_place(model_dir, suite):  # noqa: F811
    hf = HFBackend(model_dir, batch_size=4, num_threads=1)
    fake_side = HFBackend(model_dir, num_threads=1)  # a second copy: the "engine's" weights
    llm = FakeLLM(fake_side.model, fake_side.tokenizer)
    backend = VLLMBackend(llm=llm)
    for a, b in [(evaluate(suite, backend, keep_samples=True), evaluate(suite, hf, keep_samples=True))]:
        assert a.scores["loss"] == pytest.approx(b.scores["loss"], rel=1e-5)
        assert a.tasks["mc"].metrics == b.tasks["mc"].metrics
        assert [s["generation"] for s in a.tasks["gen"].samples] == [s["generation"] for s in b.tasks["gen"].samples]

    generator = torch.Generator().manual_seed(1)
    new = {name: p.detach() + 0.05 * torch.randn(p.shape, generator=generator)
           for name, p in hf.model.named_parameters()}
    backend.update_weights(new.items())
    hf.update_weights(new.items())
    assert llm.rpc_calls == ["update_weights"] and llm.prefix_resets == 1
    swapped, reference = evaluate(suite, backend), evaluate(suite, hf)
    assert swapped.scores["loss"] == pytest.approx(reference.scores["loss"], rel=1e-5)
    assert swapped.scores["gen"] == reference.scores["gen"]


def test_request_construction_and_extraction(model_dir):  # noqa: F811
    hf = HFBackend(model_dir, num_threads=1)
    tokenizer = hf.tokenizer
    (ids, n_context), = loglikelihood_prompts(tokenizer, [("add 2+2 =", " 4")])
    assert ids[0] == tokenizer.bos_token_id and tokenizer.decode(ids[n_context:]) == " 4"
    (short, n_short), = loglikelihood_prompts(tokenizer, [(("a long context " * 5).strip(), " 4")], max_model_len=6)
    assert len(short) == 6 and tokenizer.decode(short[n_short:]) == " 4"

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
    assert EXTENSION.split(":")[1] == WeightUpdateExtension.__name__


def test_extension_loads_from_a_safetensors_file(model_dir, tmp_path):  # noqa: F811
    from safetensors.torch import save_file

    backend = HFBackend(model_dir, num_threads=1)
    llm = FakeLLM(backend.model, backend.tokenizer)
    before = llm.worker.weights_checksum()
    doubled = {name: (p.detach() * 2).contiguous() for name, p in backend.model.named_parameters()}
    save_file(doubled, str(tmp_path / "model.safetensors"))
    VLLMBackend(llm=llm).update_weights_from_path(tmp_path)
    assert llm.worker.weights_checksum() == pytest.approx(2 * before, rel=1e-4)
    assert llm.prefix_resets == 1


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
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    if "HAS_VLLM" in out.stdout:
        pytest.skip("vLLM is installed here")
    name, message = out.stdout.strip().split(" | ")
    assert name == "EvomergeError" and "pip install 'evomerge[vllm]'" in message and "\n" not in message
