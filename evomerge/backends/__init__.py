"""Evaluator backends: one small interface (like lm-eval's LM), several engines behind it.

    loglikelihood([(context, continuation), ...]) -> [(sum logprob of continuation, n tokens,
                                                       continuation is the greedy decode), ...]
    generate_until([(context, {"until": [...], "max_gen_toks": N}), ...]) -> [text, ...]

Optional methods, used when present: `apply_chat_template(text) -> str` (backends that hold the
tokenizer), `check(output_types)` (called by `evaluate` before any work: e.g. does the endpoint
return prompt logprobs), `update_weights(named_tensors)` (in-place weight swap: hf, vllm).

Backends are built by name from a dict of kwargs (`build_backend("hf", model="zoo/base")`); the
entries are lazy so `vllm` is imported only when someone asks for it.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from evomerge.registry import Registry

LoglikelihoodRequest = tuple[str, str]
LoglikelihoodResult = tuple[float, int, bool]
GenerateRequest = tuple[str, dict]


@runtime_checkable
class Backend(Protocol):
    name: str

    def loglikelihood(self, requests: list[LoglikelihoodRequest]) -> list[LoglikelihoodResult]: ...

    def generate_until(self, requests: list[GenerateRequest]) -> list[str]: ...


BACKENDS: Registry[type] = Registry("evaluator backend")
BACKENDS.register("hf", "evomerge.backends.hf:HFBackend")
BACKENDS.register("openai", "evomerge.backends.openai_api:OpenAIBackend")
BACKENDS.register("vllm", "evomerge.backends.vllm_engine:VLLMBackend")


def build_backend(name: str, **kwargs: Any) -> Backend:
    """Build a backend by registry name from keyword arguments (e.g. a suite's `backend:` dict)."""
    return BACKENDS.get(name)(**kwargs)


def encode_pair(tokenizer, context: str, continuation: str, add_special_tokens: bool = True):
    """Token ids of (context, continuation), the lm-eval way: encode the whole string and split it
    at the context's length, so BOS (if the tokenizer adds one) stays with the context and a merge
    across the boundary is attributed to the continuation. Trailing spaces of the context move to
    the continuation. An empty context becomes the BOS/EOS token."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=add_special_tokens)["input_ids"]
    context_ids = tokenizer(context, add_special_tokens=add_special_tokens)["input_ids"] if context else []
    if not context_ids:
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return [prefix], tokenizer(continuation, add_special_tokens=False)["input_ids"]
    return context_ids, whole[len(context_ids) :]
