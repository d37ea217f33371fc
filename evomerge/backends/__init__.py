"""Evaluator backends: one base class (like lm-eval's `LM`), several engines behind it.

    loglikelihood([(context, continuation), ...]) -> [(sum logprob of continuation, n tokens,
                                                       continuation is the greedy decode), ...]
    generate_until([(context, {"until": [...], "max_gen_toks": N}), ...]) -> [text, ...]

What a backend can do is declared on its class, never guessed from the methods it happens to have:

    weights          how it takes a candidate's merged weights: "module" (a live torch module whose
                     parameters are written in place: `live_module()`, hf), "named_tensors"
                     (`update_weights(named_tensors)`, the engine's own loaders: vllm) or "none"
                     (it scores a model served elsewhere: openai; a search refuses it)
    loglikelihoods   whether it scores continuations (loss / multiple_choice tasks)
    chat_template    whether it renders prompts with the model's chat template itself
                     (`apply_chat_template`); one without can still chat-generate (openai's chat API)

`check(output_types)` runs before any work (e.g. does the endpoint return prompt logprobs),
`begin_task(name)` before each task's requests (a per-task fusion), and `close()` stops what the
backend runs besides this process; all do nothing by default.

Backends are built by name from a dict of kwargs (`build_backend("hf", model="zoo/base")`); the
entries are lazy so `vllm` is imported only when someone asks for it.
"""

from __future__ import annotations

from typing import Any, ClassVar, Iterable, Literal

from evomerge.errors import EvomergeError
from evomerge.registry import Registry

LoglikelihoodRequest = tuple[str, str]
LoglikelihoodResult = tuple[float, int, bool]
GenerateRequest = tuple[str, dict]


WeightSwap = Literal["module", "named_tensors", "none"]
WEIGHT_SWAPS: tuple[WeightSwap, ...] = ("module", "named_tensors", "none")


class Backend:
    """The base class of every backend; subclasses declare their capabilities as class attributes."""

    name: ClassVar[str] = "backend"
    weights: ClassVar[WeightSwap] = "none"
    loglikelihoods: ClassVar[bool] = True
    chat_template: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.weights not in WEIGHT_SWAPS:  # a typo here would send a worker down no path at all
            raise TypeError(f"backend {cls.__name__}: weights={cls.weights!r}, expected one of {WEIGHT_SWAPS}")

    def loglikelihood(self, requests: list[LoglikelihoodRequest]) -> list[LoglikelihoodResult]:
        raise EvomergeError(f"backend {self.name!r} gives no log-likelihoods (loss / multiple_choice tasks)")

    def generate_until(self, requests: list[GenerateRequest]) -> list[str]:
        raise NotImplementedError

    def apply_chat_template(self, text: str) -> str:
        raise EvomergeError(f"backend {self.name!r} does not apply chat templates itself")

    def live_module(self) -> Any:
        """weights == "module": the torch module it scores, whose parameters may be written in place."""
        raise EvomergeError(f"backend {self.name!r} holds no live torch module (weights: {self.weights})")

    def update_weights(self, named_tensors: Iterable[tuple[str, Any]]) -> None:
        """weights == "named_tensors": replace the weights by name, in place."""
        raise EvomergeError(f"backend {self.name!r} takes no named tensors (weights: {self.weights})")

    def begin_task(self, task: str) -> None:
        """The next requests are this task's (a fusion of API models may weigh its models per task).
        Nothing by default: a model's answers do not depend on which task asks."""

    def check(self, output_types: set[str]) -> None:
        """Before any work: can this backend score these output types? Nothing to check by default."""

    def close(self) -> None:
        """Stop what the backend runs besides this process; idempotent. Nothing by default."""


BACKENDS: Registry[type] = Registry("evaluator backend")
BACKENDS.register("hf", "evomerge.backends.hf:HFBackend")
BACKENDS.register("openai", "evomerge.backends.openai_api:OpenAIBackend")
BACKENDS.register("vllm", "evomerge.backends.vllm_engine:VLLMBackend")


def build_backend(name: str, **kwargs: Any) -> Backend:
    """Build a backend by registry name from keyword arguments (e.g. a suite's `backend:` dict)."""
    return backend_class(name)(**kwargs)


def backend_class(name: str) -> type[Backend]:
    """The class registered under `name` (did-you-mean on an unknown one): its capabilities can be
    read before anything is built (a search checks them before any worker starts)."""
    engine = BACKENDS.get(name)
    if not (isinstance(engine, type) and issubclass(engine, Backend)):
        raise EvomergeError(f"backend {name!r} is registered as {engine!r}, which is not an evomerge Backend subclass")
    return engine


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
