"""Optimizers: one ask/tell contract (``base.Optimizer``) over pycma, nevergrad, random, grid.

    opt = make_optimizer("cmaes", dim=3, lower=lo, upper=hi, x0=x0, seed=0, sigma0=0.05, popsize=20)
    opt = make_optimizer("nevergrad", name="TwoPointsDE", budget=400, num_workers=4, **problem)
    opt = optimizer_from_config({"type": "nevergrad", "name": "NGOpt"}, **problem)
    opt = optimizer_from_config({"name": "cmaes", "sigma0": 0.05}, **problem)

Backends are registered lazily ("module:attr"), so nevergrad is imported only when asked for.
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping

from evomerge.errors import ConfigError, did_you_mean
from evomerge.optimizers.base import Bounds, Candidate, Optimizer, SearchContext
from evomerge.registry import Registry

OPTIMIZERS: Registry[type[Optimizer]] = Registry("optimizer")
OPTIMIZERS.register("cmaes", "evomerge.optimizers.cmaes:CMAES")
OPTIMIZERS.register("nevergrad", "evomerge.optimizers.nevergrad_opt:Nevergrad")
OPTIMIZERS.register("random", "evomerge.optimizers.random_search:RandomSearch")
OPTIMIZERS.register("grid", "evomerge.optimizers.grid:Grid")

_PROBLEM = ("dim", "lower", "upper", "x0", "seed", "n_objectives")


def make_optimizer(kind: str, /, **kwargs: Any) -> Optimizer:
    """Build backend ``kind`` ("cmaes", "nevergrad", "random", "grid") with the problem
    (dim, lower, upper, x0, seed[, n_objectives]) and the backend's options as keywords.
    Unknown backends and unknown options are ConfigErrors with a did-you-mean."""
    cls = OPTIMIZERS.get(kind)
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", *_PROBLEM)]
    for key in kwargs:
        if key not in _PROBLEM and key not in accepted:
            raise ConfigError(f"optimizer {kind!r} has no option {key!r};{did_you_mean(key, accepted)} "
                              f"options: {', '.join(accepted) or 'none'}")
    return cls(**kwargs)


def optimizer_from_config(config: Mapping[str, Any], /, **problem: Any) -> Optimizer:
    """From a config mapping: the backend under ``type`` (or under ``name`` when there is no
    ``type``), the rest its options. For nevergrad, ``name`` is nevergrad's optimizer:
    ``{"type": "nevergrad", "name": "NGOpt", "budget": 400}``."""
    kind, options = _kind_and_options(config)
    return make_optimizer(kind, **options, **problem)


DEFAULT_OPTIMIZER = "cmaes"  # what a config that names no backend gets


def build_optimizer(config: Mapping[str, Any], bounds: Bounds, context: SearchContext, *, seed: int,
                    n_objectives: int = 1) -> Optimizer:
    """The optimizer a search stage runs: the config's backend (DEFAULT_OPTIMIZER when it names
    none) on the stage's bounds, with what the backend takes from the search's context (a budget,
    the number of workers, points derived from the space) filled in by the backend itself
    (`Optimizer.options_from_context`) unless the config sets it."""
    config = dict(config)
    if backend_of(config) is None:
        config["type"] = DEFAULT_OPTIMIZER
    kind, options = _kind_and_options(config)
    options = OPTIMIZERS.get(kind).options_from_context(options, context)
    return make_optimizer(kind, **options, dim=bounds.dim, lower=bounds.lower, upper=bounds.upper, x0=bounds.x0,
                          seed=seed, n_objectives=n_objectives)


def _kind_and_options(config: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    options = dict(config)
    if "type" in options:
        kind = options.pop("type")
    elif "name" in options:
        kind = options.pop("name")
    else:
        raise ConfigError(f"optimizer config needs `type:` (one of {', '.join(OPTIMIZERS.names())})")
    if kind not in OPTIMIZERS and "type" not in config:
        msg = OPTIMIZERS.unknown_message(str(kind))
        raise ConfigError(f"{msg} (for a nevergrad optimizer write `type: nevergrad, name: {kind}`)")
    return str(kind), options


def backend_of(config: Mapping[str, Any]) -> str | None:
    """The backend a config names (``type``, else ``name`` when that is a backend), or None."""
    if "type" in config:
        return str(config["type"])
    name = config.get("name")
    return str(name) if name in OPTIMIZERS else None


def merge_optimizer_config(hints: Mapping[str, Any], user: Mapping[str, Any]) -> dict[str, Any]:
    """A search space's optimizer hints under the user's optimizer config: the hints' options
    (sigma0, popsize, nevergrad's name...) apply only when the user names no backend or the
    hints' backend; a user who picks another backend gets only their own options, except in a stage
    that sweeps a grid of set points."""
    user_kind, hint_kind = backend_of(user), backend_of(hints)
    if hint_kind == "grid" and user_kind not in (None, "grid"):
        return dict(hints)  # a stage that sweeps set points (the default's scales) is no optimizer's to take
    if user_kind is None or user_kind == hint_kind:
        merged = {**hints, **user}
        if "type" not in merged and hint_kind is not None and "name" in user and user_kind is None:
            merged["type"] = hint_kind  # {name: NGOpt} under nevergrad hints is nevergrad's name
        return merged
    return dict(user)


__all__ = [
    "DEFAULT_OPTIMIZER", "OPTIMIZERS", "Bounds", "Candidate", "Optimizer", "SearchContext", "backend_of",
    "build_optimizer", "make_optimizer", "merge_optimizer_config", "optimizer_from_config",
]
