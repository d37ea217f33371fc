"""check: everything about a recipe that can be checked before touching a tensor.

The recipe's own values, each override's per-expert values against the method's domains, and every
distinct combination of overrides a tensor of the pool gets, each merged once on a 1-element tensor
so that a value outside a method's domain is one ConfigError up front, never a failure mid-merge.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from evomerge.errors import ConfigError
from evomerge.methods import METHODS, get_method
from evomerge.pool import Pool
from evomerge.recipe import Recipe, TensorPlan


def check_recipe(recipe: Recipe, pool: Pool) -> None:
    """Everything about a recipe that can be checked before touching a tensor: its own values,
    every override's (one line naming the override's index and key), and every combination of
    overrides a tensor of the pool gets, so that no value outside a method's domain fails mid-merge."""
    method = get_method(recipe.method)
    if method.acts_on != "weights":
        raise ConfigError(f"recipe method {recipe.method!r} fuses the answers of API models (a fusion pool: "
                          "`pool: {models: ...}`); it merges no weights")
    unknown = [name for name in recipe.experts if name not in pool.experts]
    if unknown:
        raise ConfigError(f"recipe names expert {unknown[0]!r}, which is not in the pool ({', '.join(pool.names)})")
    for index, override in enumerate(recipe.overrides):
        _check_override_values(recipe, method, index, override)
    if recipe.lora_merge == "lowrank":
        if pool.kinds != {"lora"}:
            raise ConfigError("lora_merge: lowrank needs a pool of LoRA adapters only")
        if method.lora_rule != "sparsify_a":
            raise ConfigError(f"lora_merge: lowrank is defined for methods that sparsify only LoRA's A "
                              f"({', '.join(m for m in METHODS if METHODS.get(m).lora_rule == 'sparsify_a')}), "
                              f"not {recipe.method}")
    _check_plan(method, _plan_with(recipe, []))  # the recipe's own values: the method's message as it is
    for index, override in enumerate(recipe.overrides):  # each override over them, whatever it matches
        with _prefixed(f"recipe overrides[{index}]: "):
            _check_plan(method, _plan_with(recipe, [override]))
    _check_tensor_plans(recipe, method, pool)


def _plan_with(recipe: Recipe, overrides: list) -> TensorPlan:
    """The plan of a tensor that these overrides match (their layer and module filters aside)."""
    experts, parameters = dict(recipe.experts), dict(recipe.parameters)
    for override in overrides:
        for name, values in override.experts.items():
            experts[name] = values.apply_to(experts[name])
        parameters.update(override.parameters)
    return TensorPlan(weights=tuple(experts[n].weight for n in recipe.experts),
                      densities=tuple(experts[n].density for n in recipe.experts), parameters=parameters)


def _check_override_values(recipe: Recipe, method, index: int, override) -> None:
    """Per-expert values of one override, each against the method's domain for its key."""
    from evomerge.methods import _check_domain

    for name, values in override.experts.items():
        if name not in recipe.experts:
            raise ConfigError(f"recipe overrides[{index}].experts.{name}: expert {name!r} is not one of the "
                              f"recipe's experts ({', '.join(recipe.experts)})")
        for key, value in values.model_dump(exclude_none=True).items():
            spec = method.param(key)
            if spec is not None:  # a key the method does not take is ignored, as in the recipe's own values
                _check_domain(method.name, f"recipe overrides[{index}].experts.{name}.{key}", float(value), spec)


def _check_tensor_plans(recipe: Recipe, method, pool: Pool) -> None:
    """Overrides that match one tensor together (say two whose weights then sum to 0): every
    distinct plan the pool's merged tensors get, checked once."""
    if not recipe.overrides:
        return
    seen: set = set()
    for name in pool.tensor_names():
        if not pool.touched(name):
            continue
        plan = recipe.plan(name)
        key = (plan.weights, plan.densities, tuple(sorted(plan.parameters.items())))
        if key in seen:
            continue
        seen.add(key)
        matched = ", ".join(str(i) for i, override in enumerate(recipe.overrides) if override.matches(name))
        with _prefixed(f"recipe overrides[{matched}] combined on tensor {name}: "):
            _check_plan(method, plan)


def _check_plan(method, plan) -> None:
    """Let the method check its parameter domains once, on a 1-element tensor."""
    one = torch.zeros(1)
    method.merge(one, [one] * len(plan.weights), list(plan.weights), list(plan.densities),
                 dict(plan.parameters), torch.Generator().manual_seed(0))


@contextlib.contextmanager
def _prefixed(where: str) -> Iterator[None]:
    """A ConfigError raised inside says where it comes from."""
    try:
        yield
    except ConfigError as error:
        raise ConfigError(f"{where}{error}") from None
