"""Sparsifiers: one expert's task vector -> which entries it keeps, and how they are rescaled.

A sparsifier returns a `_Kept` recipe (a bool mask and maybe a rescale), not the masked tensor: the
TIES family holds one byte per entry per expert between its two passes instead of a float32 copy, and
rebuilds w_t * sparsify(tau_t) into one scratch buffer when it needs it. The caller's task vectors are
only ever read (ResidentSource hands out views of tensors it keeps).

Kinds (`_sparsify_kept`): None (keep all), "magnitude" (TIES trim), "outliers" (Model Breadcrumbs),
"random" (DARE), "della" (DELLA); `topmag` is Evo-Merging's exact top-k. Every random one draws from
the torch.Generator it is given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor


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
