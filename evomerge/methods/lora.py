"""LoRA merges: Evo-Merging's asymmetric sparsification on the factors (A sparsified, B not)."""

from __future__ import annotations

from typing import Sequence

from torch import Tensor

from evomerge.errors import ConfigError, PoolError
from evomerge.methods.sparsify import topmag


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
