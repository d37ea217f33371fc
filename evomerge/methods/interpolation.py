"""Methods on whole models rather than sparsified task vectors: linear (a weighted average of the
experts), slerp (spherical interpolation from the base to one expert) and Model Stock (interpolation
from the base toward the experts' average by their mean pairwise cosine)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from evomerge.errors import ConfigError
from evomerge.methods.base import NORMALIZE_ABS, WEIGHT, MergeMethod, Param, _normalize, register


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


def _linear_coefficients(weights: list[float], params: dict[str, Any]) -> tuple[float, list[float]]:
    """sum_t w_t (base + tau_t) / divisor = (sum_t w_t / divisor) base + sum_t (w_t / divisor) tau_t."""
    signed, absolute = sum(weights), sum(abs(w) for w in weights)
    divisor = absolute if params["normalize_abs"] else signed if params["normalize"] else 1.0
    scale = 1.0 / divisor if divisor else float("nan")  # all-zero |w|: NaN, as 0/0 would be
    return signed * scale, [w * scale for w in weights]


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


register(
    MergeMethod(
        name="linear",
        fn=_linear,
        parameters=(WEIGHT, _normalize(True), NORMALIZE_ABS),
        random=False,
        mergekit_name="linear",
        doc="sum_t w_t theta_t over the experts (not the base), divided by sum_t w_t when normalize",
        check=_check_linear,
        linear=_linear_coefficients,
    )
)
register(
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
register(
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
