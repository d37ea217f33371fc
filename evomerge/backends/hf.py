"""The transformers backend: one model + tokenizer held in memory, batched, CPU or CUDA.

`backend.model` is the live torch module (`weights = "module"`: a search's worker writes each
candidate's merge straight into its parameters, `ResidentMerger.apply`). Other code may change its
weights in place between calls (`param.data.copy_(...)`, or `backend.update_weights(named_tensors)`);
scoring again reuses the cached tokenization and padded batches of the suite, so a re-score runs
only forward passes.

    backend = HFBackend("zoo/base", device="cpu", batch_size=16)   # or build_backend("hf", model=...)
    backend.model            # torch.nn.Module, update it in place
    backend.update_weights(state_dict.items())                       # same, by name
    HFBackend(live_model, tokenizer)                                 # around a model you hold
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

import torch

from evomerge.backends import Backend, encode_pair
from evomerge.errors import EvomergeError

_PLAN_CACHE_SIZE = 8  # request lists whose padded batches are kept (one per task of a suite)


@dataclass
class _Batch:
    input_ids: torch.Tensor  # (B, T) on the model's device
    attention_mask: torch.Tensor
    rows: list[tuple[int, int, torch.Tensor]]  # (request index, unpadded length, continuation ids)


@dataclass
class _GenBatch:
    input_ids: torch.Tensor  # left-padded
    attention_mask: torch.Tensor
    indices: list[int]
    until: list[str]
    max_gen_toks: int


def _resolve_device(device: str) -> torch.device:
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise EvomergeError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise EvomergeError(f"device {device!r} asked for, but torch sees no CUDA GPU here; use --device cpu")
    return resolved


def _resolve_dtype(dtype: Any, device: torch.device) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise EvomergeError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
    return resolved


def _dtype_kwarg(dtype: torch.dtype) -> dict:
    """`dtype=` since transformers 4.56, `torch_dtype=` before."""
    import transformers

    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


class HFBackend(Backend):
    name = "hf"
    weights = "module"  # the merge is written into `live_module()`'s parameters, no state-dict copy
    loglikelihoods = True
    chat_template = True

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        *,
        device: Optional[str] = None,
        dtype: Any = None,
        batch_size: int = 16,
        max_length: Optional[int] = None,
        add_bos_token: bool = True,
        trust_remote_code: bool = False,
        num_threads: Optional[int] = None,
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if device is None:  # a live module stays where it is; a model dir loads on CPU
            device = "cpu" if isinstance(model, (str, Path)) else str(next(model.parameters()).device)
        self.device = _resolve_device(device)
        if num_threads:  # torch's CPU threads are process-wide; 1 is fastest on a busy machine
            torch.set_num_threads(int(num_threads))
        self.batch_size = int(batch_size)
        self.add_special_tokens = add_bos_token
        if isinstance(model, (str, Path)):
            path = Path(model)
            if not (path / "config.json").is_file():
                raise EvomergeError(f"model dir {path} has no config.json (expected a transformers model dir)")
            try:
                model = AutoModelForCausalLM.from_pretrained(
                    path, **_dtype_kwarg(_resolve_dtype(dtype, self.device)), trust_remote_code=trust_remote_code
                )
            except (OSError, ValueError) as error:
                raise EvomergeError(f"cannot load model from {path}: {str(error).splitlines()[0]}") from None
            tokenizer = tokenizer or path
        if tokenizer is None:
            raise EvomergeError("HFBackend built around a live model needs its tokenizer too")
        if isinstance(tokenizer, (str, Path)):
            try:
                tokenizer = AutoTokenizer.from_pretrained(tokenizer, trust_remote_code=trust_remote_code)
            except (OSError, ValueError) as error:
                raise EvomergeError(f"cannot load tokenizer from {tokenizer}: {str(error).splitlines()[0]}") from None
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if self.pad_id is None:
            self.pad_id = 0
        config_max = getattr(model.config, "max_position_embeddings", None)
        self.max_length = int(max_length or config_max or 2048)
        self._pairs: dict[tuple[str, str], tuple[list[int], list[int]]] = {}
        self._prompts: dict[str, list[int]] = {}
        self._plans: OrderedDict[Any, list] = OrderedDict()

    # -- weights ------------------------------------------------------------------------------

    def live_module(self) -> torch.nn.Module:
        return self.model

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy tensors into the live model's parameters/buffers in place (no reload)."""
        state = dict(self.model.named_parameters())
        state.update(self.model.named_buffers())
        with torch.no_grad():
            for name, tensor in named_tensors:
                if name not in state:
                    raise EvomergeError(f"model has no parameter {name!r}")
                state[name].data.copy_(tensor)

    # -- helpers ------------------------------------------------------------------------------

    def apply_chat_template(self, text: str) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise EvomergeError("apply_chat_template: true, but the model's tokenizer has no chat template")
        rendered = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        bos = self.tokenizer.bos_token
        if self.add_special_tokens and bos and rendered.startswith(bos):
            rendered = rendered[len(bos) :]  # encoding adds it back
        return rendered

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        key = (context, continuation)
        if key not in self._pairs:
            self._pairs[key] = encode_pair(self.tokenizer, context, continuation, self.add_special_tokens)
        return self._pairs[key]

    def _encode_prompt(self, prompt: str) -> list[int]:
        if prompt not in self._prompts:
            ids = self.tokenizer(prompt, add_special_tokens=self.add_special_tokens)["input_ids"]
            self._prompts[prompt] = ids
        return self._prompts[prompt]

    def _cached_plan(self, key, build):
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = build()
            while len(self._plans) > _PLAN_CACHE_SIZE:
                self._plans.popitem(last=False)
        else:
            self._plans.move_to_end(key)
        return plan

    # -- loglikelihood ------------------------------------------------------------------------

    def _plan_loglikelihood(self, requests: list[tuple[str, str]]) -> list[_Batch]:
        items = []
        for index, (context, continuation) in enumerate(requests):
            context_ids, continuation_ids = self._encode_pair(context, continuation)
            if not continuation_ids:
                raise EvomergeError(f"empty continuation after tokenization for context {context[-40:]!r}")
            whole = (context_ids + continuation_ids)[-(self.max_length + 1) :][:-1]
            items.append((index, whole, continuation_ids))
        items.sort(key=lambda item: -len(item[1]))  # longest first: a too-long batch fails early
        batches = []
        for start in range(0, len(items), self.batch_size):
            chunk = items[start : start + self.batch_size]
            width = len(chunk[0][1])
            input_ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            rows = []
            for row, (index, ids, continuation_ids) in enumerate(chunk):
                input_ids[row, : len(ids)] = torch.tensor(ids)
                mask[row, : len(ids)] = 1
                rows.append((index, len(ids), torch.tensor(continuation_ids, device=self.device)))
            batches.append(_Batch(input_ids.to(self.device), mask.to(self.device), rows))
        return batches

    @torch.inference_mode()
    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[tuple[float, int, bool]]:
        plan = self._cached_plan(("ll", tuple(requests)), lambda: self._plan_loglikelihood(requests))
        results: list[Any] = [None] * len(requests)
        for batch in plan:
            logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            for row, (index, length, targets) in enumerate(batch.rows):
                n = len(targets)
                logprobs = logits[row, length - n : length].float().log_softmax(-1)
                picked = logprobs.gather(-1, targets[:, None]).squeeze(-1)
                greedy = bool((logprobs.argmax(-1) == targets).all())
                results[index] = (float(picked.sum()), n, greedy)
        return results

    # -- generation ---------------------------------------------------------------------------

    def _plan_generate(self, requests: list[tuple[str, dict]]) -> list[_GenBatch]:
        groups: dict[str, list[int]] = {}
        for index, (_, kwargs) in enumerate(requests):
            key = json.dumps({k: kwargs.get(k) for k in ("until", "max_gen_toks")}, sort_keys=True)
            groups.setdefault(key, []).append(index)
        batches = []
        for key, indices in groups.items():
            kwargs = json.loads(key)
            until = kwargs["until"] or []
            max_gen = int(kwargs["max_gen_toks"] or 64)
            budget = max(self.max_length - max_gen, 1)
            encoded = {i: self._encode_prompt(requests[i][0])[-budget:] for i in indices}
            indices = sorted(indices, key=lambda i: -len(encoded[i]))
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                width = len(encoded[chunk[0]])
                input_ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for row, i in enumerate(chunk):
                    ids = encoded[i]
                    input_ids[row, width - len(ids) :] = torch.tensor(ids)
                    mask[row, width - len(ids) :] = 1
                batches.append(_GenBatch(input_ids.to(self.device), mask.to(self.device), chunk, until, max_gen))
        return batches

    @torch.inference_mode()
    def generate_until(self, requests: list[tuple[str, dict]]) -> list[str]:
        from evomerge.evaluator import cut_at_stop

        key = ("gen", tuple((c, json.dumps(k, sort_keys=True)) for c, k in requests))
        plan = self._cached_plan(key, lambda: self._plan_generate(requests))
        results: list[str] = [""] * len(requests)
        for batch in plan:
            extra = {"stop_strings": batch.until, "tokenizer": self.tokenizer} if batch.until else {}
            output = self.model.generate(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                max_new_tokens=batch.max_gen_toks,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=self.pad_id,
                **extra,
            )
            new_tokens = output[:, batch.input_ids.shape[1] :]
            for row, index in enumerate(batch.indices):
                text = self.tokenizer.decode(new_tokens[row], skip_special_tokens=True)
                results[index] = cut_at_stop(text, batch.until)
        return results
