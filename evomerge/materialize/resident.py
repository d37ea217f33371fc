"""resident: a live torch model re-merged in place from tensors held on the device.

`ResidentSource` holds the pool's base tensors and task vectors (or LoRA factors) on the device once
(task vectors of full experts stacked, presparsified masks memoized); `ResidentMerger` merges each
new recipe from it into a model's parameters without reading the disk, a method linear in the task
vectors as one matrix-vector product per tensor (`_LinearPlan`).
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from evomerge.errors import EvomergeError
from evomerge.materialize.check import check_recipe
from evomerge.materialize.sources import TensorSource, merge_tensor
from evomerge.methods import get_method
from evomerge.pool import LoraFactors, Pool, all_finite
from evomerge.recipe import Recipe


class ResidentSource(TensorSource):
    """The pool's base tensors and task vectors (or LoRA factors) held on the device once.

    The full experts' task vectors of one tensor are stacked into one (experts, numel) float32
    tensor, so a merge linear in the task vectors is one matrix-vector product over it.
    """

    def __init__(self, pool: Pool, device: str):
        super().__init__(pool, device)
        disk = TensorSource(pool, device)
        self.full = [expert for expert, entry in pool.experts.items() if entry.kind == "full"]
        self._base: dict[str, torch.Tensor] = {}
        self._stacked: dict[str, torch.Tensor] = {}
        self._deltas: dict[tuple[str, str], torch.Tensor] = {}
        self._factors: dict[tuple[str, str], LoraFactors] = {}
        self._masks: dict[tuple[str, str], tuple[Callable, float, torch.Tensor]] = {}  # see presparsified
        for name in pool.tensor_names():
            if not pool.touched(name):
                continue
            base = self._base[name] = disk.base(name)
            if self.full:
                stacked = self._stacked[name] = torch.empty((len(self.full), *base.shape), device=self.device)
                for i, expert in enumerate(self.full):
                    torch.sub(pool.experts[expert].files.get(name).to(self.device), base, out=stacked[i])
                    self._deltas[(expert, name)] = stacked[i]
            for expert, entry in pool.experts.items():
                if entry.kind == "lora":
                    found = disk.factors(expert, name)
                    if found is not None:
                        self._factors[(expert, name)] = found

    def base(self, name: str) -> torch.Tensor:
        return self._base[name]

    def delta(self, expert: str, name: str, base: torch.Tensor) -> torch.Tensor | None:
        if (expert, name) in self._deltas:
            return self._deltas[(expert, name)]
        factors = self._factors.get((expert, name))
        return None if factors is None else factors.scaling * (factors.B @ factors.A)

    def factors(self, expert: str, name: str) -> LoraFactors | None:
        return self._factors.get((expert, name))

    def presparsified(self, experts, name, deltas, densities, sparsify):
        """sparsify(tau, density) from a memo of the last (sparsifier, density) per (expert, tensor),
        kept as a bool mask (a quarter of a float32 copy, counted in `nbytes`): Evo-Merging's stage 2
        fixes the densities, so its candidates re-merge without re-sorting any tensor. A sparsified
        task vector keeps all of itself at density 1, so the method then gets densities 1."""
        sparsified = []
        for expert, delta, density in zip(experts, deltas, densities):
            key = (expert, name)
            memo = self._masks.get(key)
            if memo is None or memo[0] is not sparsify or memo[1] != density:
                memo = self._masks[key] = (sparsify, density, sparsify(delta, density) != 0)
            sparsified.append(torch.where(memo[2], delta, 0.0))
        return sparsified, [1.0] * len(sparsified)

    def held(self) -> list[torch.Tensor]:
        """Every resident tensor once (a delta is a view into its stack)."""
        held = list(self._base.values()) + list(self._stacked.values())
        held += [mask for _, _, mask in self._masks.values()]
        return held + [t for f in self._factors.values() for t in (f.A, f.B)]

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.held())


class _LinearPlan:
    """A merge that is a * base + sum_t c_t tau_t for every tensor: coefficients per distinct
    TensorPlan (validated once, by the method itself, as check_recipe does), c over the stack."""

    def __init__(self, recipe: Recipe, source: ResidentSource):
        self.recipe, self.source = recipe, source
        self.method = get_method(recipe.method)
        self.position = [source.full.index(expert) for expert in recipe.experts]
        self.shared = None if recipe.overrides else self._coefficients(recipe.plan(""))
        self._cache: dict[tuple, tuple[float, torch.Tensor]] = {}

    @staticmethod
    def applies(recipe: Recipe, source: ResidentSource) -> bool:
        return get_method(recipe.method).linear is not None and all(expert in source.full for expert in recipe.experts)

    def coefficients(self, name: str) -> tuple[float, torch.Tensor]:
        if self.shared is not None:
            return self.shared
        plan = self.recipe.plan(name)
        key = (plan.weights, plan.densities, tuple(sorted(plan.parameters.items())))
        if key not in self._cache:
            self._cache[key] = self._coefficients(plan)
        return self._cache[key]

    def _coefficients(self, plan) -> tuple[float, torch.Tensor]:
        one = torch.zeros(1)  # the method's own checks (domains, linear's zero sum) on a 1-element merge
        self.method.merge(one, [one] * len(plan.weights), list(plan.weights), list(plan.densities),
                          dict(plan.parameters), torch.Generator().manual_seed(0))
        params = self.method._globals(dict(plan.parameters))
        base_scale, scales = self.method.linear([float(w) for w in plan.weights], params)
        c = torch.zeros(len(self.source.full), dtype=torch.float32)
        for position, scale in zip(self.position, scales):
            c[position] += scale
        return base_scale, c.to(self.source.device)

    def merge(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        base_scale, c = self.coefficients(name)
        base, stacked = self.source.base(name), self.source._stacked[name]
        flat_out = None if out is None else out.view(-1)
        result = torch.addmv(base.view(-1), stacked.view(len(c), -1).t(), c, beta=base_scale, out=flat_out)
        return result.view(base.shape)


class ResidentMerger:
    """Re-merge new recipes from tensors held on the device, without reading the disk.

    `apply(recipe, model)` writes the merge into a live torch model's parameters in place, so an
    inference engine built around that model scores the new candidate without a reload.
    Methods that declare themselves linear in the task vectors (linear, task_arithmetic) are one matrix-vector product
    per tensor over the stacked task vectors, written straight into float32 parameters.
    """

    def __init__(self, pool: Pool, device: str = "cpu"):
        self.pool = pool
        self.source = ResidentSource(pool, device)

    def merged(self, recipe: Recipe) -> Iterator[tuple[str, torch.Tensor]]:
        check_recipe(recipe, self.pool)
        linear = _LinearPlan(recipe, self.source) if _LinearPlan.applies(recipe, self.source) else None
        for name in self.source._base:
            yield name, self._merge_one(recipe, name, linear)

    def _merge_one(self, recipe: Recipe, name: str, linear: _LinearPlan | None,
                   out: torch.Tensor | None = None) -> torch.Tensor:
        if linear is not None:
            return linear.merge(name, out)
        merged = merge_tensor(recipe, name, self.source)
        return self.source.base(name) if merged is None else merged

    @torch.no_grad()
    def apply(self, recipe: Recipe, model: torch.nn.Module) -> None:
        params = model.state_dict(keep_vars=True)
        missing = [name for name in self.source._base if name not in params]
        if missing:
            raise EvomergeError(f"the live model has no tensor {missing[0]} (is it the pool's architecture?)")
        check_recipe(recipe, self.pool)
        linear = _LinearPlan(recipe, self.source) if _LinearPlan.applies(recipe, self.source) else None
        for name in self.source._base:
            target = params[name].data
            direct = (linear is not None and target.dtype == torch.float32 and target.is_contiguous()
                      and target.device == self.source.device and target.shape == self.source._base[name].shape)
            tensor = self._merge_one(recipe, name, linear, out=target if direct else None)
            if not all_finite(tensor):
                raise EvomergeError(f"merged tensor {name} holds NaN/Inf (recipe {recipe.id})")
            if not direct:
                target.copy_(tensor)
