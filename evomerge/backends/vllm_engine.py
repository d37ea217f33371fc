"""In-process vLLM (`vllm.LLM`), weights replaced in place between candidates.

Install with `pip install 'evomerge[vllm]'` (vllm>=0.10.2,<0.12, Linux + CUDA). Every engine
argument passes through: `VLLMBackend("zoo/base", dtype="bfloat16", max_model_len=2048,
gpu_memory_utilization=0.5, enforce_eager=True, tensor_parallel_size=2)`.

Weight swaps go through vLLM's public extension points only (as in vLLM's RLHF examples): the
engine is built with `worker_extension_cls=WeightUpdateExtension`, and `update_weights()` calls
`llm.collective_rpc("update_weights", args=(named_tensors,))` so each worker loads the tensors
with its model's own `load_weights` (which handles fused / sharded layouts), then
`llm.reset_prefix_cache()` drops KV blocks computed with the old weights.

loss / multiple_choice use `SamplingParams(prompt_logprobs=1)` over the token ids of
context + continuation (tokenized the lm-eval way, as in the hf backend); generation is greedy.
"""

from __future__ import annotations

import importlib
from types import SimpleNamespace
from typing import Any, Iterable, Optional

from evomerge.backends import encode_pair
from evomerge.errors import EvomergeError

EXTENSION = "evomerge.backends.vllm_engine:WeightUpdateExtension"
TESTED_RANGE = ">=0.10.2,<0.12"  # the `vllm` extra in pyproject.toml


def import_vllm():
    try:
        return importlib.import_module("vllm")
    except ImportError as error:
        raise EvomergeError(
            f"backend 'vllm' needs vLLM ({error.name or 'vllm'} not importable): pip install"
            f" 'evomerge[vllm]' (vllm{TESTED_RANGE}, Linux + CUDA); or use --backend hf"
        ) from None


class WeightUpdateExtension:
    """Mixed into every vLLM worker (engine arg `worker_extension_cls`); its methods are called
    from the driver with `llm.collective_rpc(name, args=...)`. `self.model_runner` is the worker's."""

    def update_weights(self, named_tensors: list[tuple[str, Any]]) -> int:
        import torch

        model = self.model_runner.model
        device = next(model.parameters()).device
        model.load_weights(weights=[(name, tensor.to(device)) for name, tensor in named_tensors])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return len(named_tensors)

    def update_weights_from_path(self, path: str) -> int:
        """Load every tensor of a safetensors file (or a dir of them) in place."""
        from pathlib import Path

        from safetensors.torch import load_file

        files = sorted(Path(path).glob("*.safetensors")) if Path(path).is_dir() else [Path(path)]
        count = 0
        for file in files:
            count += self.update_weights(list(load_file(str(file)).items()))
        return count

    def weights_checksum(self) -> float:
        """Sum of all parameters: a cheap way to see that a swap arrived on every worker."""
        return float(sum(p.detach().float().sum().item() for p in self.model_runner.model.parameters()))


# ---- requests and outputs (pure: tested without vLLM) -------------------------------------------


def loglikelihood_prompts(
    tokenizer, requests: list[tuple[str, str]], max_model_len: Optional[int] = None, add_bos_token: bool = True
) -> list[tuple[list[int], int]]:
    """(prompt token ids, number of context tokens) per request, left-truncated to max_model_len."""
    prompts = []
    for context, continuation in requests:
        context_ids, continuation_ids = encode_pair(tokenizer, context, continuation, add_bos_token)
        if not continuation_ids:
            raise EvomergeError(f"empty continuation after tokenization for context {context[-40:]!r}")
        ids = context_ids + continuation_ids
        if max_model_len and len(ids) > max_model_len:
            ids = ids[-max_model_len:]
        prompts.append((ids, len(ids) - len(continuation_ids)))
    return prompts


def loglikelihood_from_output(output: Any, n_context: int) -> tuple[float, int, bool]:
    """Sum logprob, token count and greedy flag of the prompt tokens after `n_context`, from a
    vLLM RequestOutput's `prompt_token_ids` and `prompt_logprobs` (list of {token id: Logprob})."""
    token_ids = list(output.prompt_token_ids)
    entries = output.prompt_logprobs
    if entries is None:
        raise EvomergeError("vLLM returned no prompt_logprobs (SamplingParams.prompt_logprobs not set?)")
    total, greedy = 0.0, True
    for position in range(max(n_context, 1), len(token_ids)):
        candidates = entries[position]
        logprob = candidates[token_ids[position]]
        total += float(logprob.logprob)
        rank = getattr(logprob, "rank", None)
        if rank is not None:
            greedy = greedy and rank == 1
        else:
            greedy = greedy and logprob.logprob >= max(c.logprob for c in candidates.values()) - 1e-6
    return total, len(token_ids) - max(n_context, 1), greedy


def sampling_params(**kwargs: Any) -> Any:
    """vllm.SamplingParams when vLLM is importable, else a plain namespace of the same fields."""
    try:
        from vllm import SamplingParams
    except ImportError:
        return SimpleNamespace(**kwargs)
    return SamplingParams(**kwargs)


def loglikelihood_sampling_kwargs() -> dict:
    return {"temperature": 0.0, "max_tokens": 1, "prompt_logprobs": 1, "detokenize": False}


def generation_sampling_kwargs(kwargs: dict, seed: Optional[int] = None) -> dict:
    until = [s for s in kwargs.get("until") or [] if s]
    return {
        "temperature": 0.0,
        "max_tokens": int(kwargs.get("max_gen_toks") or 64),
        "stop": until,
        "include_stop_str_in_output": False,
        **({"seed": seed} if seed is not None else {}),
    }


class VLLMBackend:
    name = "vllm"

    def __init__(self, model: Any = None, *, llm: Any = None, add_bos_token: bool = True, batch_size: Any = None,
                 device: Optional[str] = None, **engine_args: Any):
        """Build a `vllm.LLM(model=model, **engine_args)` (or wrap a given `llm`)."""
        if llm is None:
            vllm = import_vllm()
            engine_args.setdefault("worker_extension_cls", EXTENSION)
            if device not in (None, "cuda", "auto"):
                engine_args.setdefault("device", device)
            try:
                llm = vllm.LLM(model=str(model), **engine_args)
            except TypeError as error:
                raise EvomergeError(f"vllm.LLM rejected an engine argument: {error}") from None
        self.llm = llm
        self.add_bos_token = add_bos_token
        self.tokenizer = llm.get_tokenizer()
        self.max_model_len = engine_args.get("max_model_len") or getattr(self.tokenizer, "model_max_length", None)
        if self.max_model_len and self.max_model_len > 10**7:  # tokenizers' "no limit" sentinel
            self.max_model_len = None
        self._prompts: dict[tuple[str, str], tuple[list[int], int]] = {}

    # -- weights ------------------------------------------------------------------------------

    def update_weights(self, named_tensors: Iterable[tuple[str, Any]]) -> None:
        """Replace weights in place on every worker, then drop the prefix cache."""
        self.llm.collective_rpc("update_weights", args=(list(named_tensors),))
        self.llm.reset_prefix_cache()

    def update_weights_from_path(self, path: str) -> None:
        self.llm.collective_rpc("update_weights_from_path", args=(str(path),))
        self.llm.reset_prefix_cache()

    def apply_chat_template(self, text: str) -> str:
        rendered = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        bos = self.tokenizer.bos_token
        if self.add_bos_token and bos and rendered.startswith(bos):
            rendered = rendered[len(bos) :]
        return rendered

    # -- the backend interface ----------------------------------------------------------------

    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[tuple[float, int, bool]]:
        missing = [r for r in dict.fromkeys(requests) if r not in self._prompts]
        for request, built in zip(missing, loglikelihood_prompts(self.tokenizer, missing, self.max_model_len,
                                                                  self.add_bos_token)):
            self._prompts[request] = built
        built = [self._prompts[r] for r in requests]
        prompts = [{"prompt_token_ids": ids} for ids, _ in built]  # == vllm.inputs.TokensPrompt
        outputs = self.llm.generate(prompts, sampling_params(**loglikelihood_sampling_kwargs()), use_tqdm=False)
        return [loglikelihood_from_output(out, n_context) for out, (_, n_context) in zip(outputs, built)]

    def generate_until(self, requests: list[tuple[str, dict]]) -> list[str]:
        from evomerge.evaluator import cut_at_stop

        prompts = [{"prompt_token_ids": self.tokenizer(c, add_special_tokens=self.add_bos_token)["input_ids"]}
                   for c, _ in requests]
        params = [sampling_params(**generation_sampling_kwargs(k)) for _, k in requests]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [cut_at_stop(out.outputs[0].text, k.get("until") or []) for out, (_, k) in zip(outputs, requests)]
