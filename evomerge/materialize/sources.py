"""sources: where a merge reads its inputs, and the merge of one tensor, streamed over a pool.

`TensorSource` reads the pool on disk (`ResidentSource`, in resident.py, holds it on a device
instead); `merge_tensor` merges one tensor from a source (LoRA pools of a "sparsify_a" method by
their factors, `lowrank_lora`); `iter_merged` yields every merged tensor in the base's order, a few
at a time on CPU, for the sinks to write.
"""

from __future__ import annotations

import math
import os
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

import torch

from evomerge.errors import ConfigError, EvomergeError
from evomerge.materialize.check import check_recipe
from evomerge.methods import get_method, lowrank_lora_merge
from evomerge.pool import LoraFactors, Pool, all_finite
from evomerge.recipe import Recipe

# Tensors merged at once by iter_merged: most merge ops (topk above all) run on one core per
# tensor, so two tensors in flight keep two cores busy; memory grows with this, not the pool.
MERGE_THREADS = min(2, os.cpu_count() or 1)


def tensor_generator(seed: int, tensor_name: str, device: torch.device | str) -> torch.Generator:
    """A generator per tensor, seeded from the recipe seed and the name: order-independent masks."""
    generator = torch.Generator(device=device)
    generator.manual_seed((seed * 1_000_003 + zlib.crc32(tensor_name.encode())) % (2**63))
    return generator


class TensorSource:
    """Where one merge reads its inputs: the pool on disk, or tensors held resident on a device."""

    def __init__(self, pool: Pool, device: str):
        self.pool, self.device = pool, torch.device(device)

    def base(self, name: str) -> torch.Tensor:
        return self.pool.base_tensor(name).to(self.device, torch.float32)

    def presparsified(self, experts, name, deltas, densities, sparsify):
        """The inputs of a method that declares `presparsify`; a streamed merge lets the method
        sparsify as it goes (ResidentSource keeps the masks between candidates instead)."""
        return deltas, densities

    def delta(self, expert: str, name: str, base: torch.Tensor) -> torch.Tensor | None:
        entry = self.pool.experts[expert]
        if entry.kind == "lora":
            factors = self.factors(expert, name)
            return None if factors is None else factors.scaling * (factors.B @ factors.A)
        return self.pool.task_vector(expert, name, base)

    def factors(self, expert: str, name: str) -> LoraFactors | None:
        found = self.pool.lora_factors(expert, name)
        if found is None:
            return None
        return LoraFactors(found.A.to(self.device, torch.float32), found.B.to(self.device, torch.float32), found.scaling)


def merge_tensor(recipe: Recipe, name: str, source: TensorSource) -> torch.Tensor | None:
    """The merged float32 tensor for `name`, or None when no expert touches it (keep the base)."""
    if not source.pool.touched(name):
        return None
    plan = recipe.plan(name)
    experts = list(recipe.experts)
    base = source.base(name)
    method = get_method(recipe.method)
    if source.pool.kinds == {"lora"} and method.lora_rule == "sparsify_a":
        return _merge_lora_sparsified_a(recipe, method, name, source, base, experts, plan)
    deltas = [source.delta(expert, name, base) for expert in experts]
    if all(delta is None for delta in deltas):
        return None
    deltas = [torch.zeros_like(base) if delta is None else delta for delta in deltas]
    densities = list(plan.densities)
    if method.presparsify is not None:
        deltas, densities = source.presparsified(experts, name, deltas, densities, method.presparsify)
    generator = tensor_generator(recipe.seed, name, source.device)
    return method.merge(base, deltas, list(plan.weights), densities, dict(plan.parameters), generator)


def _merge_lora_sparsified_a(recipe, method, name, source, base, experts, plan) -> torch.Tensor | None:
    """A method of LoRA rule "sparsify_a" (Evo-Merging) on LoRA factors: only A is sparsified
    (asymmetric sparsification), by the method's own sparsifier.

    lowrank: A = sum w_i TopMag(A_i), B = sum w_i s_i B_i, delta = B A (cross terms included).
    dense:   delta = sum w_i s_i B_i TopMag(A_i).
    """
    factors = [source.factors(expert, name) for expert in experts]
    # an adapter at weight 0 adds nothing to A, B or B A: it is off, and costs no TopMag either
    used = [(f, w, d) for f, w, d in zip(factors, plan.weights, plan.densities) if f is not None and w != 0]
    if not used:
        return None
    if recipe.lora_merge == "lowrank":
        A, B = lowrank_lora(used)
        return base + B @ A
    delta = torch.zeros_like(base)
    for f, weight, density in used:
        delta += (weight * f.scaling) * (f.B @ method.presparsify(f.A, density))
    return base + delta


def lowrank_lora(used: list[tuple[LoraFactors, float, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    ranks = {f.A.shape[0] for f, _, _ in used}
    if len(ranks) > 1:
        raise ConfigError(f"lora_merge: lowrank needs one LoRA rank across experts, found ranks {sorted(ranks)}")
    return lowrank_lora_merge([f.A for f, _, _ in used], [f.scaling * f.B for f, _, _ in used],
                              [w for _, w, _ in used], [d for _, _, d in used])


def iter_merged(recipe: Recipe, pool: Pool, device: str = "cpu",
                on_tensor: Callable[[str], None] | None = None,
                threads: int | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, float32 tensor) for every base tensor, in the base's order; untouched tensors
    are the base's. Up to `threads` tensors are merged at once (default MERGE_THREADS on CPU)."""
    check_recipe(recipe, pool)
    source = TensorSource(pool, device)
    threads = threads or (MERGE_THREADS if source.device.type == "cpu" else 1)

    def merged(name: str) -> torch.Tensor:
        tensor = merge_tensor(recipe, name, source)
        if tensor is None:
            return source.base(name)
        if not all_finite(tensor):
            raise EvomergeError(f"merged tensor {name} holds NaN/Inf (recipe {recipe.id})")
        return tensor

    names = pool.tensor_names()
    if threads <= 1:
        for name in names:
            tensor = merged(name)
            if on_tensor:
                on_tensor(name)
            yield name, tensor
        return
    # A tensor's working set is about its size times the experts, so the budget for tensors in
    # flight is the largest tensor alone: small tensors go in pairs, the embeddings go alone, and
    # peak memory stays that of a one-at-a-time merge.
    sizes = {name: math.prod(pool.base.shape(name)) for name in names}
    budget = max(sizes.values(), default=0)
    pool_ = ThreadPoolExecutor(threads, thread_name_prefix="evomerge-merge")
    pending: deque = deque()
    try:
        for name in [*names, None]:
            while pending and (name is None or len(pending) >= threads
                               or sum(sizes[n] for n, _ in pending) + sizes[name] > budget):
                done_name, future = pending.popleft()
                tensor = future.result()
                if on_tensor:
                    on_tensor(done_name)
                yield done_name, tensor
            if name is not None:
                pending.append((name, pool_.submit(merged, name)))
    finally:
        pool_.shutdown(wait=True, cancel_futures=True)
