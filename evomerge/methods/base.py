"""The merge-method contract: declared parameters, validation, and the registry of methods.

A `MergeMethod` is a pure function on one parameter tensor plus what it takes (`parameters`, like
mergekit's `MergeMethod.parameters()`): `merge` fills the defaults, validates every value (a ConfigError
of one line), upcasts to float32 and calls the function. The search space derives its genes from these
declarations; nothing else keeps a table of method names and parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from evomerge.errors import ConfigError, PoolError, did_you_mean
from evomerge.registry import Registry

@dataclass(frozen=True)
class Param:
    name: str
    default: float | bool | None
    low: float | None
    high: float | None
    per_expert: bool
    doc: str = ""

    @property
    def is_flag(self) -> bool:
        return isinstance(self.default, bool)


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: Callable[..., Tensor]
    parameters: tuple[Param, ...]
    random: bool
    mergekit_name: str | None
    doc: str
    min_experts: int = 1
    max_experts: int | None = None
    check: Callable[[list[float], list[float], dict[str, Any]], None] | None = field(default=None, repr=False)
    # What materialize needs to know about the method's structure, declared rather than looked up
    # by name. `presparsify`: a deterministic per-expert sparsifier (tensor, density -> tensor) the
    # method applies to each task vector before combining them with no other use of the density:
    # the method then gives the same merge on pre-sparsified task vectors at density 1, so a
    # resident source keeps each sparsifier's mask between candidates instead of re-sorting.
    presparsify: Callable[[Tensor, float], Tensor] | None = field(default=None, repr=False)
    # `linear`: the merge is base_scale * base + sum_t c_t tau_t, (base_scale, [c_t]) from the
    # weights and the parameters: a resident merge is then one matrix-vector product per tensor.
    linear: Callable[[list[float], dict[str, Any]], tuple[float, list[float]]] | None = field(default=None, repr=False)
    # `lora_rule`: how the method treats LoRA factors. "sparsify_a": only A is sparsified
    # (presparsify on A; B is kept), so a low-rank merge B @ A of the same rule exists.
    lora_rule: str | None = None
    # `acts_on`: "weights" (a merge of tensors, every method of mergekit's kind) or "outputs" (a
    # fusion rule over API models' answers, evomerge/fusion: it has no tensor function).
    acts_on: str = "weights"

    def param(self, name: str) -> Param | None:
        return next((p for p in self.parameters if p.name == name), None)

    def merge(
        self,
        base: Tensor,
        deltas: Sequence[Tensor],
        weights: Sequence[float] | None,
        densities: Sequence[float] | None,
        params: dict[str, Any] | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Fill defaults, validate (ConfigError with one line), then call `fn` in float32.

        weights/densities None mean 1.0 per expert; a method that declares no density ignores
        densities. Random methods need `generator` (ValueError without one); the global RNG is never
        used. Tensors may live on any device (the generator must be on the same one)."""
        deltas = list(deltas)
        self._check_count(len(deltas))
        weights = self._per_expert("weight", weights, len(deltas))
        densities = self._per_expert("density", densities, len(deltas))
        full = self._globals(params or {})
        if self.check is not None:
            self.check(weights, densities, full)
        if self.random and generator is None:
            raise ValueError(f"merge method {self.name!r} is random: pass a seeded torch.Generator")
        base32, deltas32 = _as_float32(base, deltas)
        return self.fn(
            base32, deltas32, weights=weights, densities=densities, params=full, generator=generator
        )

    def _check_count(self, n: int) -> None:
        if n < self.min_experts or (self.max_experts is not None and n > self.max_experts):
            want = str(self.min_experts) if self.min_experts == self.max_experts else f">= {self.min_experts}"
            raise ConfigError(f"merge method {self.name!r} needs {want} expert(s), got {n}")

    def _per_expert(self, name: str, values: Sequence[float] | None, n: int) -> list[float]:
        spec = self.param(name)
        if values is None:
            return [1.0] * n
        values = [float(v) for v in values]
        if len(values) != n:
            raise ConfigError(f"merge method {self.name!r}: {len(values)} {name}s for {n} experts")
        if spec is None:
            return values  # not used by this method
        for i, v in enumerate(values):
            _check_domain(self.name, f"{name}[{i}]", v, spec)
        return values

    def _globals(self, params: dict[str, Any]) -> dict[str, Any]:
        known = {p.name: p for p in self.parameters if not p.per_expert}
        for key in params:
            if key not in known:
                raise ConfigError(self._unknown_param(key, known))
        full: dict[str, Any] = {}
        for name, spec in known.items():
            value = params.get(name, spec.default)
            if value is None:
                raise ConfigError(f"merge method {self.name!r} needs parameter {name!r}")
            if spec.is_flag:
                if not isinstance(value, bool):
                    raise ConfigError(f"merge method {self.name!r}: {name} must be true or false, got {value!r}")
            else:
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ConfigError(f"merge method {self.name!r}: {name} must be a number, got {value!r}")
                value = float(value)
                _check_domain(self.name, name, value, spec)
            full[name] = value
        return full

    def _unknown_param(self, key: str, known: dict[str, Param]) -> str:
        if self.param(key) is not None:  # a per-expert parameter passed as a global one
            return f"merge method {self.name!r}: {key!r} is per expert; pass it in the {key}s list"
        names = [p.name for p in self.parameters]
        return f"unknown parameter {key!r} for merge method {self.name!r};{did_you_mean(key, names)} takes: {', '.join(names)}"


def _check_domain(method: str, label: str, value: float, spec: Param) -> None:
    if not math.isfinite(value):
        raise ConfigError(f"merge method {method!r}: {label} must be finite, got {value}")
    if (spec.low is not None and value < spec.low) or (spec.high is not None and value > spec.high):
        low = "-inf" if spec.low is None else spec.low
        high = "inf" if spec.high is None else spec.high
        raise ConfigError(f"merge method {method!r}: {label}={value} is outside [{low}, {high}]")


def _as_float32(base: Tensor, deltas: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
    for i, d in enumerate(deltas):
        if d.shape != base.shape:
            raise PoolError(f"delta {i} has shape {tuple(d.shape)} but the base has {tuple(base.shape)}")
    return base.float(), [d.float() for d in deltas]


# --------------------------------------------------------------------------------------------------
# Parameters that several methods share

WEIGHT = Param("weight", 1.0, None, None, True, "expert weight w_t; may be negative")
DENSITY = Param("density", 1.0, 0.0, 1.0, True, "fraction of the task vector kept")
LAMBDA = Param("lambda", 1.0, None, None, False, "scale of the merged task vector")
NORMALIZE_ABS = Param(
    "normalize_abs", False, None, None, False,
    "evomerge only: divide by sum |w_t| (m_t) instead of sum w_t (m_t); turns normalization on",
)
RESCALE_UNBIASED = Param(
    "rescale_unbiased", False, None, None, False,
    "evomerge only: divide kept entries by their keep probability (the papers' rescale), not L1 match",
)


# Flags mergekit does not have: a recipe that sets one True cannot be written as a mergekit config.
EVOMERGE_ONLY_PARAMS = frozenset({NORMALIZE_ABS.name, RESCALE_UNBIASED.name})


def _normalize(default: bool) -> Param:
    return Param("normalize", default, None, None, False, "divide by the sum of the (kept) weights")


# --------------------------------------------------------------------------------------------------
# The registry (filled by the modules of this package as they are imported)

METHODS: Registry[MergeMethod] = Registry("merge method")


def register(method: MergeMethod) -> None:
    METHODS.register(method.name, method)


def get_method(name: str) -> MergeMethod:
    """The merge method called `name`; ConfigError with a did-you-mean otherwise."""
    return METHODS.get(name)
