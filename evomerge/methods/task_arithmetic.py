"""The task-arithmetic family: theta0 + lambda * mix_t(w_t * sparsify(tau_t)).

One general function (`_TaskArithmetic`: sparsify, weight, optionally elect a sign, sum, normalize,
scale) registered under several names, as mergekit does: task_arithmetic, ties, dare_linear, dare_ties,
breadcrumbs, breadcrumbs_ties, della, della_linear. Beside them, two relatives on task vectors:
Evo-Merging (a weighted sum of TopMag-sparsified task vectors, no normalization) and TALL-mask
consensus.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from evomerge.errors import ConfigError
from evomerge.methods.base import (
    DENSITY, LAMBDA, NORMALIZE_ABS, RESCALE_UNBIASED, WEIGHT, MergeMethod, Param, _normalize, register,
)
from evomerge.methods.sparsify import _Kept, _sparsify_kept, _topmag_kept, topmag


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


def _consensus(base, deltas, *, weights, densities, params, generator) -> Tensor:
    """TALL-mask consensus (Wang et al. 2024), per tensor. With D_t = w_t tau_t and tau_MTL = sum_t D_t:
    m_t = [|D_t| > lambda |tau_MTL - D_t|] (strict), c = [sum_t m_t >= k], theta = theta0 + tau_MTL * c.
    Equal positive weights w_t = alpha reproduce the paper's theta0 + alpha (c * sum_t tau_t)."""
    weighted = torch.stack([w * d for w, d in zip(weights, deltas)])
    mtl = weighted.sum(dim=0)
    masks = weighted.abs() > params["lambda"] * (mtl - weighted).abs()
    consensus = masks.sum(dim=0) >= params["k"]
    return base + mtl * consensus



def _task_arithmetic_coefficients(weights: list[float], params: dict[str, Any]) -> tuple[float, list[float]]:
    """base + lambda * sum_t w_t tau_t / divisor (the divisor as _divisor takes it for one entry)."""
    signed, absolute = sum(weights), sum(abs(w) for w in weights)
    if params["normalize_abs"]:
        divisor = absolute if absolute != 0 else 1.0
    elif params["normalize"]:
        divisor = signed if abs(signed) > 1e-8 else 1.0
    else:
        divisor = 1.0
    scale = params["lambda"] / divisor
    return 1.0, [w * scale for w in weights]


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
# Parameters and registration

GAMMA = Param("gamma", 0.01, 0.0, 1.0, False, "fraction of largest |entries| dropped as outliers")
EPSILON = Param("epsilon", 0.15, 0.0, 0.5, False, "keep probabilities span density +- epsilon by rank")


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


for _name, (_kind, _elect_sign, _norm, _resc, _extra, _doc) in _TA_FAMILY.items():
    _params = [WEIGHT] + ([DENSITY] if _kind else []) + [LAMBDA, _normalize(_norm), NORMALIZE_ABS]
    _params += [_rescale(_resc)] if _resc is not None else []
    register(
        MergeMethod(
            name=_name,
            fn=_TaskArithmetic(_kind, _elect_sign),
            parameters=tuple(_params) + _extra,
            random=_kind in ("random", "della"),
            mergekit_name=_name,
            doc=_doc,
            check=_check_della if _kind == "della" else None,
            linear=_task_arithmetic_coefficients if _kind is None and not _elect_sign else None,
        )
    )

register(
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
register(
    MergeMethod(
        name="evo_merging",
        fn=_evo_merging,
        parameters=(WEIGHT, DENSITY),
        random=False,
        mergekit_name=None,
        doc="Evo-Merging: theta0 + sum_t w_t TopMag(tau_t, d_t), exact top-k, no rescale or normalization",
        presparsify=topmag,
        lora_rule="sparsify_a",
    )
)
