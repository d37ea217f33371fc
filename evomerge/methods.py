"""Merge methods: pure functions on one parameter tensor.

Every method takes the base tensor and the experts' task vectors (tau_t = theta_t - theta0) and returns
the full merged tensor in float32. Inputs are upcast to float32 once; every random step draws from the
torch.Generator it is given, never from the global RNG.

Methods that mergekit also has keep mergekit's semantics under mergekit's name (checked against
mergekit 0.1.5 by tests/test_methods.py with fixtures from tests/benchmarks/make_mergekit_fixtures.py).
Where evomerge deliberately differs, the difference is behind a flag that is off by default:
`normalize_abs` (divide by sum |w| instead of sum w, safe with negative weights) and `rescale_unbiased`
(the DARE/DELLA papers' 1/p rescale instead of mergekit's L1-norm match).

One general task-arithmetic function (`_TaskArithmetic`: sparsify, weight, optionally elect a sign,
sum, normalize, scale) is registered under several names, as mergekit does.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from evomerge.errors import ConfigError, PoolError
from evomerge.registry import Registry

__all__ = [
    "Param",
    "MergeMethod",
    "METHODS",
    "get_method",
    "topmag",
    "lowrank_lora_merge",
    "EVOMERGE_ONLY_PARAMS",
]


# --------------------------------------------------------------------------------------------------
# Declarations


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
        close = difflib.get_close_matches(key, [p.name for p in self.parameters], n=1)
        hint = f" did you mean {close[0]!r}?" if close else ""
        return f"unknown parameter {key!r} for merge method {self.name!r};{hint} takes: {', '.join(p.name for p in self.parameters)}"


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
# Sparsifiers: one expert's task vector -> which entries it keeps, and how they are rescaled
#
# A sparsifier returns a `_Kept` recipe (a bool mask and maybe a rescale), not the masked tensor: the
# TIES family holds one byte per entry per expert between its two passes instead of a float32 copy, and
# rebuilds w_t * sparsify(tau_t) into one scratch buffer when it needs it. The caller's task vectors are
# only ever read (ResidentSource hands out views of tensors it keeps).


@dataclass(frozen=True)
class _Kept:
    """sparsify(tau) = tau * keep / probs * scale, each step only where given; `zero`: all zeros.

    The operations and their order are those of the masked-tensor code this replaced, so the results
    are the same bit for bit (tests/test_methods.py checks against a stacked reference)."""

    keep: Tensor | None = None  # bool mask of the kept entries; None keeps every entry
    probs: Tensor | None = None  # the papers' unbiased rescale: divide kept entries by their keep probability
    scale: Tensor | None = None  # mergekit's L1 rescale: a 0-dim factor
    zero: bool = False

    def build(self, tau: Tensor, out: Tensor, weight: float | None = None) -> Tensor | None:
        """weight * sparsify(tau) written into `out` (not tau); None where it is all zeros."""
        if self.zero:
            return None
        if self.keep is None and self.probs is None and self.scale is None and weight is not None:
            return torch.mul(tau, weight, out=out)
        if self.keep is None:
            out.copy_(tau)
        else:  # keep * tau == tau * keep bit for bit; a float32 operand is ~3x faster than a bool one
            out.copy_(self.keep).mul_(tau)
        if self.probs is not None:
            out.div_(self.probs)
        if self.scale is not None:
            out.mul_(self.scale)
        return out if weight is None else out.mul_(weight)

    def tensor(self, tau: Tensor) -> Tensor:
        built = self.build(tau, torch.empty_like(tau))
        return torch.zeros_like(tau) if built is None else built


def _keep_largest(t: Tensor, k: int) -> Tensor:
    """Bool mask of the k entries of largest |t| (exactly k; ties broken by torch.topk).
    torch.topk has no 16M-element limit (unlike torch.quantile); for k > n/2 it drops the n-k smallest.

    No faster selection keeps the same set: task vectors of bfloat16 checkpoints hold a few thousand
    distinct magnitudes, so the cut always falls inside a run of ties (~170k entries at the cut of a
    12M-entry embedding), and which of those torch.topk keeps is its nth_element's choice."""
    n = t.numel()
    magnitude = t.abs().reshape(-1).float()
    if 2 * k <= n:
        mask = torch.zeros(n, dtype=torch.bool, device=t.device)
        if k > 0:
            mask.index_fill_(0, torch.topk(magnitude, k, sorted=False).indices, True)
    else:
        mask = torch.ones(n, dtype=torch.bool, device=t.device)
        if k < n:
            mask.index_fill_(0, torch.topk(magnitude, n - k, largest=False, sorted=False).indices, False)
    return mask.reshape(t.shape)


def _top_kept(t: Tensor, density: float, k: Callable[[int], int]) -> _Kept:
    if density >= 1:
        return _Kept()
    if density <= 0 or t.numel() == 0:
        return _Kept(zero=True)
    return _Kept(keep=_keep_largest(t, k(t.numel())))


def _topmag_kept(t: Tensor, density: float) -> _Kept:
    return _top_kept(t, density, lambda n: min(n, max(1, math.floor(density * n + 0.5))))


def _magnitude_kept(t: Tensor, density: float) -> _Kept:
    """TIES trim as mergekit: keep max(1, int(density * numel)) largest |entries| (floor, not round)."""
    return _top_kept(t, density, lambda n: max(1, int(density * n)))


def topmag(t: Tensor, density: float) -> Tensor:
    """Evo-Merging's TopMag: keep the round(density * numel) largest |entries| exactly, no rescale.

    Rounds half up. density <= 0 gives zeros, density >= 1 the tensor unchanged; otherwise at least one
    entry is kept, so a tiny tensor (a bias of 4 entries at density 0.1) keeps its largest entry
    rather than vanishing. Equal magnitudes at the cut are broken by torch.topk (exactly k kept).
    """
    t = t.float()
    return _topmag_kept(t, density).tensor(t)


def _outlier_kept(t: Tensor, density: float, gamma: float) -> _Kept:
    """Model Breadcrumbs as mergekit 0.1.5: drop the int(gamma*n) largest |entries| and the smallest,
    keeping int(density*n); when density + gamma > 1 fewer outliers are dropped. gamma = 0 keeps the
    top int(density*n) (it does not zero the tensor, unlike the older mergekit slice bug). int(density*n)
    may be 0 on a tiny tensor, which zeroes it, as in mergekit."""
    if density >= 1:
        return _Kept()
    n = t.numel()
    keep = int(density * n)
    n_bot = max(0, n - keep - int(gamma * n))
    order = torch.sort(t.abs().reshape(-1), descending=False).indices
    mask = torch.zeros(n, dtype=torch.bool, device=t.device)
    mask.index_fill_(0, order[n_bot : n_bot + keep], True)
    return _Kept(keep=mask.reshape(t.shape))


def _bernoulli_keep(t: Tensor, density: float, generator: torch.Generator) -> Tensor:
    """DARE mask: each entry kept with probability density (same RNG stream as mergekit's)."""
    return torch.bernoulli(torch.full_like(t, density, dtype=torch.float32), generator=generator)


def _della_probs(t: Tensor, density: float, epsilon: float) -> Tensor:
    """DELLA keep probabilities: density - eps + 2 eps * rank/(n-1), ranks of |t| along dim 1 (a 1-D
    tensor is one row), as mergekit. A row of one entry gets probability density (mergekit: NaN)."""
    rows = t.reshape(1, -1) if t.dim() < 2 else t
    ranks = torch.argsort(rows.abs(), dim=1).argsort(dim=1).float() + 1
    low = ranks.min(dim=1, keepdim=True).values
    high = ranks.max(dim=1, keepdim=True).values
    rank_norm = ((ranks - low) / (high - low)).clamp(0, 1).nan_to_num(0.5)
    return (density - epsilon) + rank_norm * 2 * epsilon


def _l1_kept(t: Tensor, kept: _Kept, scratch: Tensor | None, eps: float = 1e-7) -> _Kept:
    """mergekit's `rescale`: scale the kept part so its L1 norm equals the original's."""
    scratch = torch.empty_like(t) if scratch is None else scratch
    before = torch.abs(t, out=scratch).sum()
    built = kept.build(t, scratch)
    after = torch.zeros((), device=t.device) if built is None else built.abs_().sum()
    if before < eps or after < eps:
        return kept
    return _Kept(kept.keep, kept.probs, before / after)


def _random_kept(t: Tensor, density: float, params: dict[str, Any], generator, della: bool,
                 scratch: Tensor | None) -> _Kept:
    if density >= 1:
        return _Kept()  # mergekit draws nothing here either: keeps the RNG streams aligned
    if della and density <= 0:
        return _Kept(zero=True)
    if della:
        probs = _della_probs(t, density, params["epsilon"])
        keep = torch.bernoulli(probs, generator=generator).reshape(t.shape).bool()
        probs = probs.reshape(t.shape)
    else:
        keep = _bernoulli_keep(t, density, generator).bool()
        probs = None
    if params.get("rescale_unbiased"):
        probs = torch.full_like(t, density) if probs is None else probs
        return _Kept(keep, probs=probs.clamp_min(1e-12))
    return _l1_kept(t, _Kept(keep), scratch) if params["rescale"] else _Kept(keep)


def _sparsify_kept(kind: str | None, t: Tensor, density: float, params: dict[str, Any], generator,
                   scratch: Tensor | None = None) -> _Kept:
    """What `kind` keeps of t. `scratch` (t's shape, float32) is working space for the L1 rescale."""
    if kind is None:
        return _Kept()
    if kind == "magnitude":
        kept = _magnitude_kept(t, density)
    elif kind == "outliers":
        kept = _outlier_kept(t, density, params["gamma"])
    else:
        return _random_kept(t, density, params, generator, kind == "della", scratch)
    return _l1_kept(t, kept, scratch) if params.get("rescale") and density < 1 else kept


# --------------------------------------------------------------------------------------------------
# The task-arithmetic family (task_arithmetic, ties, dare_*, breadcrumbs*, della*)


@dataclass(frozen=True)
class _TaskArithmetic:
    """theta0 + lambda * mix(w_t * sparsify(tau_t)), mix = sum, or TIES disjoint sum when `elect`.

    Streams over the experts, summing in expert order: the working set is three float32 tensors of the
    base's size plus, for the sign election, one bool mask per expert; the task vectors are only read.
    With up to 4 experts the sums are those of torch.stack(...).sum(0) bit for bit; with more, torch's
    reduction reassociates some columns (by thread split), so the last bit may differ from a stacked sum."""

    sparsify: str | None  # None, "magnitude", "random", "outliers", "della"
    elect: bool  # TIES sign election ("sum" rule) and disjoint merge

    def __call__(self, base, deltas, *, weights, densities, params, generator) -> Tensor:
        merged, scratch = torch.zeros_like(base), torch.empty_like(base)
        kept = []
        for tau, weight, density in zip(deltas, weights, densities):
            part = _sparsify_kept(self.sparsify, tau, density, params, generator, scratch)
            weighted = part.build(tau, scratch, weight)
            if weighted is not None:
                merged += weighted
            if self.elect:
                kept.append(part)
        if self.elect:
            divisor = _disjoint(merged, deltas, weights, kept, params, scratch)
        else:
            w = torch.tensor(weights, dtype=torch.float32, device=base.device).reshape(-1, *([1] * base.dim()))
            divisor = _divisor(w.sum(dim=0), w.abs().sum(dim=0), params, tol=1e-8)
        if divisor is not None:
            merged /= divisor
        return merged.mul_(params["lambda"]).add_(base)


def _disjoint(total: Tensor, deltas, weights, kept: list[_Kept], params, scratch: Tensor) -> Tensor | None:
    """TIES sign election and disjoint sum, in place: `total` (sum_t D_t) becomes sum_t D_t [sign(D_t) = s]
    with s = +1 where sum_t D_t >= 0 else -1 ("sum" rule, D_t = w_t * trim(tau_t)). Zero entries (trimmed)
    have no sign and are never selected. Returns the divisor sum_t w_t m_t (see _divisor), or None."""
    sign = torch.where(total >= 0, 1.0, -1.0)
    total.zero_()
    absolute = bool(params.get("normalize_abs"))
    count = torch.zeros_like(total) if absolute or params["normalize"] else None
    agree = torch.empty_like(total)  # float32 0/1: elementwise ops on bool operands are several times slower
    for i, (tau, weight) in enumerate(zip(deltas, weights)):
        weighted = kept[i].build(tau, scratch, weight)
        kept[i] = None  # free its mask
        if weighted is None:
            continue
        torch.mul(weighted, sign, out=agree).gt_(0)  # sign(D_t) == s; D_t * (+-1) is exact
        total.addcmul_(weighted, agree)  # products with 0/1 are exact: same sums as D_t * m_t
        if count is not None:
            count.add_(agree, alpha=abs(weight) if absolute else weight)
    return None if count is None else count.masked_fill_(count == 0, 1.0)


def _divisor(signed: Tensor, absolute: Tensor, params: dict[str, Any], tol: float = 0.0) -> Tensor | None:
    """mergekit: divide by the signed sum (an exact 0 -> 1 for TIES, |x| < 1e-8 -> 1 otherwise).
    normalize_abs: divide by sum |w_t| m_t instead (never cancels; turns normalization on)."""
    if params.get("normalize_abs"):
        return torch.where(absolute == 0, 1.0, absolute)
    if not params["normalize"]:
        return None
    return torch.where(signed.abs() <= tol, 1.0, signed)

# --------------------------------------------------------------------------------------------------
# Other methods


def _linear(base, deltas, *, weights, densities, params, generator) -> Tensor:
    """mergekit linear over the experts theta_t = theta0 + tau_t: sum_t w_t theta_t (/ sum_t w_t)."""
    w = torch.tensor(weights, dtype=torch.float32, device=base.device).reshape(-1, *([1] * base.dim()))
    merged = (torch.stack([base + d for d in deltas]) * w).sum(dim=0)
    if params["normalize_abs"]:
        return merged / w.abs().sum()
    return merged / w.sum() if params["normalize"] else merged


def _check_linear(weights: list[float], densities: list[float], params: dict[str, Any]) -> None:
    if params["normalize"] and not params["normalize_abs"] and abs(sum(weights)) < 1e-8:
        raise ConfigError("linear: the weights sum to 0, so normalize would divide by 0; set normalize: false")


def _slerp(base, deltas, *, weights, densities, params, generator) -> Tensor:
    """Spherical interpolation from theta0 (t=0) to theta0 + tau (t=1) on the whole tensor, as mergekit:
    lerp when the normalized dot product has |cos| > 0.9995 (or either tensor is ~0)."""
    t = params["t"]
    v0, v1 = base, base + deltas[0]
    n0, n1 = v0.norm(), v1.norm()
    n0 = n0 if n0 > 1e-8 else torch.ones_like(n0)
    n1 = n1 if n1 > 1e-8 else torch.ones_like(n1)
    dot = ((v0 / n0) * (v1 / n1)).sum().clamp(-1, 1)
    if dot.abs() > 0.9995:
        return (1 - t) * v0 + t * v1
    theta = torch.acos(dot)
    return (torch.sin((1 - t) * theta) / torch.sin(theta)) * v0 + (torch.sin(t * theta) / torch.sin(theta)) * v1


def _consensus(base, deltas, *, weights, densities, params, generator) -> Tensor:
    """TALL-mask consensus (Wang et al. 2024), per tensor. With D_t = w_t tau_t and tau_MTL = sum_t D_t:
    m_t = [|D_t| > lambda |tau_MTL - D_t|] (strict), c = [sum_t m_t >= k], theta = theta0 + tau_MTL * c.
    Equal positive weights w_t = alpha reproduce the paper's theta0 + alpha (c * sum_t tau_t)."""
    weighted = torch.stack([w * d for w, d in zip(weights, deltas)])
    mtl = weighted.sum(dim=0)
    masks = weighted.abs() > params["lambda"] * (mtl - weighted).abs()
    consensus = masks.sum(dim=0) >= params["k"]
    return base + mtl * consensus


def _model_stock(base, deltas, *, weights, densities, params, generator) -> Tensor:
    """Model Stock (Jang et al. 2024) as mergekit: with the fine-tuned models' task vectors tau_t
    (N of them) and cos the mean pairwise cosine between them, t = N cos / (1 + (N - 1) cos) and
    theta = t * mean_t(theta0 + tau_t) + (1 - t) * theta0. Per tensor, or per row (the last
    dimension) with filter_wise; a 1-D tensor is one row. Weights and densities are not used."""
    if params["filter_wise"]:
        rows = base.reshape(1, -1) if base.dim() < 2 else base
        taus = [d.reshape(rows.shape) for d in deltas]
    else:
        rows, taus = base.reshape(-1), [d.reshape(-1) for d in deltas]
    cosines = []
    for i in range(len(taus)):
        for j in range(i + 1, len(taus)):
            norms = (taus[i].norm(dim=-1) * taus[j].norm(dim=-1)).clamp(min=1e-6)
            cosines.append(((taus[i] * taus[j]).sum(dim=-1) / norms).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(taus)
    t = n * cos / (1 + (n - 1) * cos)
    average = sum(rows + tau for tau in taus) / n
    return (t * average + (1 - t) * rows).reshape(base.shape)


def _evo_merging(base, deltas, *, weights, densities, params, generator) -> Tensor:
    """Evo-Merging on full task vectors: theta0 + sum_t w_t TopMag(tau_t, d_t); no normalization,
    negative weights flip an expert's sign."""
    merged, scratch = torch.zeros_like(base), torch.empty_like(base)
    for w, d, rho in zip(weights, deltas, densities):
        weighted = _topmag_kept(d, rho).build(d, scratch, w)
        if weighted is not None:
            merged += weighted
    return base + merged


# --------------------------------------------------------------------------------------------------
# LoRA (Evo-Merging's asymmetric sparsification)


def lowrank_lora_merge(
    As: Sequence[Tensor], Bs: Sequence[Tensor], weights: Sequence[float], densities: Sequence[float]
) -> tuple[Tensor, Tensor]:
    """A = sum_i w_i TopMag(A_i, d_i) (r, in); B = sum_i w_i B_i (out, r). delta W = B @ A times the
    LoRA scaling, which the caller folds in. This is the low-rank merge: B @ A holds cross terms
    w_i w_j B_i A_j, so it differs from the dense merge sum_i w_i B_i TopMag(A_i, d_i) (the sum of the
    experts' own updates, which materialize builds itself: `lora_merge: dense`)."""
    _check_lora(As, Bs, weights, densities)
    A = sum(w * topmag(a, rho) for a, w, rho in zip(As, weights, densities))
    B = sum(w * b.float() for b, w in zip(Bs, weights))
    return A, B


def _check_lora(As, Bs, weights, densities) -> None:
    if not As or not (len(As) == len(Bs) == len(weights) == len(densities)):
        raise ConfigError(
            f"LoRA merge needs one A, B, weight and density per adapter, got "
            f"{len(As)} A, {len(Bs)} B, {len(weights)} weights, {len(densities)} densities"
        )
    for i, d in enumerate(densities):
        if not 0 <= d <= 1:
            raise ConfigError(f"LoRA merge: density[{i}]={d} is outside [0, 1]")
    for i, (a, b) in enumerate(zip(As, Bs)):
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0] or a.shape != As[0].shape or b.shape != Bs[0].shape:
            raise PoolError(
                f"LoRA adapter {i}: A {tuple(a.shape)} and B {tuple(b.shape)} do not fit "
                f"(A is (r, in), B is (out, r), all adapters alike; first A {tuple(As[0].shape)})"
            )


# --------------------------------------------------------------------------------------------------
# Parameters and registration

WEIGHT = Param("weight", 1.0, None, None, True, "expert weight w_t; may be negative")
DENSITY = Param("density", 1.0, 0.0, 1.0, True, "fraction of the task vector kept")
LAMBDA = Param("lambda", 1.0, None, None, False, "scale of the merged task vector")
GAMMA = Param("gamma", 0.01, 0.0, 1.0, False, "fraction of largest |entries| dropped as outliers")
EPSILON = Param("epsilon", 0.15, 0.0, 0.5, False, "keep probabilities span density +- epsilon by rank")
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


def _rescale(default: bool) -> Param:
    return Param("rescale", default, None, None, False, "rescale kept entries to the original L1 norm")


def _check_della(weights: list[float], densities: list[float], params: dict[str, Any]) -> None:
    eps = params["epsilon"]
    for i, rho in enumerate(densities):
        if 0 < rho < 1 and not (rho - eps > 0 and rho + eps < 1):
            raise ConfigError(
                f"della: density[{i}]={rho} with epsilon={eps} leaves (0, 1); keep density +- epsilon inside it"
            )


_TA_FAMILY = {
    # name: (sparsify, elect, normalize default, rescale default, extra params, doc)
    "task_arithmetic": (None, False, False, None, (), "theta0 + lambda * sum_t w_t tau_t"),
    "ties": ("magnitude", True, True, False, (), "TIES: trim to density by magnitude, elect sign, disjoint mean"),
    "dare_linear": ("random", False, False, True, (RESCALE_UNBIASED,), "DARE: random drop (seeded), sum"),
    "dare_ties": ("random", True, False, True, (RESCALE_UNBIASED,), "DARE drop, then TIES election"),
    "breadcrumbs": ("outliers", False, False, False, (GAMMA,), "Model Breadcrumbs: drop outliers and small"),
    "breadcrumbs_ties": ("outliers", True, False, False, (GAMMA,), "Breadcrumbs, then TIES election"),
    "della": ("della", True, True, True, (EPSILON, RESCALE_UNBIASED), "DELLA: rank-based drop, TIES election"),
    "della_linear": ("della", False, False, True, (EPSILON, RESCALE_UNBIASED), "DELLA drop, sum"),
}

METHODS: Registry[MergeMethod] = Registry("merge method")


def _register(method: MergeMethod) -> None:
    METHODS.register(method.name, method)


for _name, (_kind, _elect_sign, _norm, _resc, _extra, _doc) in _TA_FAMILY.items():
    _params = [WEIGHT] + ([DENSITY] if _kind else []) + [LAMBDA, _normalize(_norm), NORMALIZE_ABS]
    _params += [_rescale(_resc)] if _resc is not None else []
    _register(
        MergeMethod(
            name=_name,
            fn=_TaskArithmetic(_kind, _elect_sign),
            parameters=tuple(_params) + _extra,
            random=_kind in ("random", "della"),
            mergekit_name=_name,
            doc=_doc,
            check=_check_della if _kind == "della" else None,
        )
    )

_register(
    MergeMethod(
        name="linear",
        fn=_linear,
        parameters=(WEIGHT, _normalize(True), NORMALIZE_ABS),
        random=False,
        mergekit_name="linear",
        doc="sum_t w_t theta_t over the experts (not the base), divided by sum_t w_t when normalize",
        check=_check_linear,
    )
)
_register(
    MergeMethod(
        name="slerp",
        fn=_slerp,
        parameters=(Param("t", 0.5, 0.0, 1.0, False, "0 gives the base, 1 the expert"),),
        random=False,
        mergekit_name="slerp",
        doc="spherical interpolation between the base and one expert",
        min_experts=1,
        max_experts=1,
    )
)
_register(
    MergeMethod(
        name="model_stock",
        fn=_model_stock,
        parameters=(Param("filter_wise", False, None, None, False, "one interpolation ratio per row, not per tensor"),),
        random=False,
        mergekit_name="model_stock",
        doc="Model Stock: interpolate from the base toward the experts' average by their mean pairwise cosine",
        min_experts=2,
    )
)
_register(
    MergeMethod(
        name="consensus",
        fn=_consensus,
        parameters=(
            WEIGHT,
            Param("lambda", 0.4, 0.0, None, False, "TALL mask threshold: keep |D_t| > lambda |tau_MTL - D_t|"),
            Param("k", 2, 0.0, None, False, "keep entries that at least k experts' TALL masks keep"),
        ),
        random=False,
        mergekit_name=None,
        doc="TALL-mask consensus merging: task arithmetic restricted to entries k experts agree on",
    )
)
_register(
    MergeMethod(
        name="evo_merging",
        fn=_evo_merging,
        parameters=(WEIGHT, DENSITY),
        random=False,
        mergekit_name=None,
        doc="Evo-Merging: theta0 + sum_t w_t TopMag(tau_t, d_t), exact top-k, no rescale or normalization",
    )
)


def get_method(name: str) -> MergeMethod:
    """The merge method called `name`; ConfigError with a did-you-mean otherwise."""
    return METHODS.get(name)
