"""mergekit's YAML, both ways: a mergekit config read as a Recipe and its pool (`models`,
`base_model`, `merge_method`, `parameters` with gradients and filters, a whole-model `slices`,
`dtype`, `tokenizer_source`), and a Recipe written as mergekit YAML for every method both tools
share. What mergekit can say that a recipe cannot (layer stacking, per-module merges, building a
tokenizer) is refused with one line saying what to write instead."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from evomerge.errors import ConfigError
from evomerge.recipe import ExpertOverride, Override, Recipe

if TYPE_CHECKING:
    from evomerge.poolspec import LocalPoolSpec


MERGEKIT_EXPERT_KEYS = {"weight", "density"}
MERGEKIT_FILTERS = {"self_attn": "attention", "mlp": "mlp"}


# Top-level mergekit keys evomerge reads; the refused ones say what to write instead.
MERGEKIT_KEYS = {"merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype",
                 "tokenizer_source"}
MERGEKIT_REFUSED_KEYS = {
    "modules": "per-module merges are not supported; write one `models:` list for the whole model",
    "tokenizer": "building a tokenizer is not supported; write `tokenizer_source: base` or a model's path",
    "chat_template": "not supported; the chat template comes with the tokenizer files (tokenizer_source)",
}
# Global mergekit parameters that change how mergekit computes, not what it computes.
MERGEKIT_IGNORED_PARAMS = {
    # mergekit keeps its sparsification masks as int8 instead of its working dtype, to save memory;
    # evomerge's masks are already one byte per entry (bool), so the flag changes nothing here.
    "int8_mask",
}
Setting = Any  # a mergekit parameter value: scalar, gradient (list of numbers) or [{filter, value}]
Placed = tuple[tuple[int, int] | None, str | None, Any]  # (layer range, module filter, value)


def is_mergekit_config(data: Any) -> bool:
    return isinstance(data, dict) and "merge_method" in data


def recipe_from_mergekit(data: dict[str, Any], where: str = "mergekit config",
                         relative_to: Path | None = None) -> tuple[Recipe, dict[str, Any]]:
    """A mergekit YAML -> (Recipe, pool spec). Paths stay as written (relative to `relative_to`,
    default the working directory, as in mergekit).

    Reads `models:` or one whole-model slice (`slices:` with one slice whose sources each cover every
    layer), scalar, gradient (list of numbers, interpolated over the layers as mergekit does) and
    [{filter, value}] parameters at model, slice and top level, `tokenizer_source` (base or a model)
    and passthrough of one whole model. Expert names are the model folders' names."""
    from evomerge.methods import METHODS, get_method

    for key in data:
        if key in MERGEKIT_REFUSED_KEYS:
            raise ConfigError(f"{where}: {key}: {MERGEKIT_REFUSED_KEYS[key]}")
        if key not in MERGEKIT_KEYS:
            raise ConfigError(f"{where}: {key}: not a mergekit key evomerge reads ({', '.join(sorted(MERGEKIT_KEYS))})")
    method_name = data.get("merge_method")
    by_mergekit = {get_method(n).mergekit_name: n for n in METHODS.names() if get_method(n).mergekit_name}
    passthrough = method_name == "passthrough"
    if not passthrough and method_name not in by_mergekit:
        raise ConfigError(f"{where}: merge_method {method_name!r} has no evomerge equivalent "
                          f"(supported: {', '.join(sorted([*by_mergekit, 'passthrough']))})")
    method = "linear" if passthrough else by_mergekit[method_name]
    sources, slice_params, slice_layers = _mergekit_sources(data, where, passthrough)
    base = data.get("base_model")
    if base is None and method == "linear" and sources:  # mergekit's linear needs no base: any model serves
        base = sources[0][0]
    if base is None:
        raise ConfigError(f"{where}: base_model is required (evomerge merges task vectors against a base)")
    layers = _LayerCount(str(base), slice_layers, relative_to or Path.cwd(), where)
    if slice_layers is not None:
        layers()  # a slice must cover the whole base: [0, 1] of a 2-layer model is layer stacking
    global_params = [data.get("parameters") or {}, slice_params]  # later wins, as in mergekit
    for params, label in zip(global_params, ("parameters", "slices[0].parameters")):
        if not isinstance(params, dict):
            raise ConfigError(f"{where}: {label} must be a mapping of parameter names to values")

    experts: dict[str, dict[str, float]] = {}
    paths: dict[str, str] = {}
    overrides: list[Override] = []
    per_expert = {"scale": "weight"} if passthrough else {k: k for k in MERGEKIT_EXPERT_KEYS}
    for position, (path, params, label) in enumerate(sources):
        if path == str(base) and method != "linear":
            continue  # the base's task vector is zero; only linear gives its weight a meaning
        name = _unique_name(Path(path).name, paths)
        paths[name] = path
        experts[name] = {}
        for key in params:
            if key not in per_expert:
                known = ", ".join(sorted(per_expert))
                raise ConfigError(f"{where}: {label}.parameters.{key}: not a per-model parameter evomerge knows ({known})")
        for key, ours in per_expert.items():
            layered = [_placed(p[key], f"{where}: {label}", key, layers) for p in [*global_params, params] if key in p]
            default, rest = _collapse(layered)
            if default is not None:
                experts[name][ours] = float(default)
            overrides += [Override(layers=r, modules=m, experts={name: ExpertOverride(**{ours: float(v)})})
                          for r, m, v in rest]
    parameters: dict[str, Any] = {"normalize": False} if passthrough else {}
    for key in dict.fromkeys(k for p in global_params for k in p):
        if key in per_expert or key in MERGEKIT_IGNORED_PARAMS:
            continue
        default, rest = _collapse([_placed(p[key], f"{where}: parameters", key, layers) for p in global_params if key in p])
        if default is not None:
            parameters[key] = default
        overrides += [Override(layers=r, modules=m, parameters={key: v}) for r, m, v in rest]
    recipe = Recipe.from_dict({"method": method, "experts": experts, "parameters": parameters,
                               "overrides": [o.model_dump() for o in overrides],
                               "dtype": data.get("out_dtype") or data.get("dtype")}, where)
    spec: dict[str, Any] = {"base": str(base), "experts": paths}
    tokenizer = _tokenizer_source(data.get("tokenizer_source"), where)
    if tokenizer is not None:
        spec["tokenizer"] = tokenizer
    return recipe, spec


def _mergekit_sources(data: dict[str, Any], where: str, passthrough: bool) -> tuple[list, dict, int | None]:
    """[(model path, per-model parameters, label)], the slice's parameters, and the layer count the
    slice names (None for `models:`)."""
    if "slices" in data and "models" in data:
        raise ConfigError(f"{where}: give `models:` or `slices:`, not both")
    if "slices" not in data:
        models = data.get("models") or []
        if not isinstance(models, list):
            raise ConfigError(f"{where}: models: a list of {{model: PATH, parameters: {{...}}}}")
        sources = [_source(entry, f"models[{i}]", where) for i, entry in enumerate(models)]
        if passthrough and len(sources) != 1:
            raise ConfigError(f"{where}: passthrough copies one model; give one entry in `models:` "
                              "(to combine several, use merge_method: linear)")
        return sources, {}, None
    slices = data["slices"]
    stacking = ("slices that stack layers (a frankenmerge) are not supported: evomerge merges models of one "
                "architecture tensor by tensor; build the stacked model with mergekit and use it as a pool model")
    if not isinstance(slices, list) or len(slices) != 1:
        raise ConfigError(f"{where}: slices: {stacking}")
    only = slices[0]
    if not isinstance(only, dict) or "sources" not in only:
        raise ConfigError(f"{where}: slices[0]: needs `sources:` (a list of {{model, layer_range}})")
    for key in only:
        if key not in ("sources", "parameters", "base_model"):
            raise ConfigError(f"{where}: slices[0].{key}: not supported (slices take sources, parameters)")
    if "base_model" in only and only["base_model"] != data.get("base_model"):
        raise ConfigError(f"{where}: slices[0].base_model: give the base once, as the top-level base_model")
    sources, ends = [], set()
    for i, entry in enumerate(only["sources"] or []):
        label = f"slices[0].sources[{i}]"
        span = entry.get("layer_range") if isinstance(entry, dict) else None
        if not (isinstance(span, list) and len(span) == 2 and all(isinstance(v, int) for v in span)):
            raise ConfigError(f"{where}: {label}: needs layer_range: [0, N] (N: the model's layer count)")
        if span[0] != 0:
            raise ConfigError(f"{where}: {label}.layer_range {span}: only whole models are merged "
                              f"(layer_range [0, N] in every source); partial ranges are layer stacking: {stacking}")
        ends.add(span[1])
        sources.append(_source({k: v for k, v in entry.items() if k != "layer_range"}, label, where))
    if len(ends) > 1:
        raise ConfigError(f"{where}: slices[0]: the sources cover different layer counts {sorted(ends)}; "
                          "every source must cover the whole model")
    if passthrough and len(sources) != 1:
        raise ConfigError(f"{where}: passthrough copies one model; give one source (to combine several, use "
                          "merge_method: linear)")
    return sources, only.get("parameters") or {}, ends.pop() if ends else None


def _source(entry: Any, label: str, where: str) -> tuple[str, dict, str]:
    if isinstance(entry, str):
        return entry, {}, label
    if not isinstance(entry, dict) or "model" not in entry:
        raise ConfigError(f"{where}: {label}: needs `model: PATH`")
    extra = set(entry) - {"model", "parameters"}
    if extra:
        raise ConfigError(f"{where}: {label}.{sorted(extra)[0]}: not supported (a model takes model, parameters)")
    params = entry.get("parameters") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{where}: {label}.parameters must be a mapping")
    return str(entry["model"]), params, label


class _LayerCount:
    """The base's decoder layer count, read only when a gradient needs it; a slice's layer_range
    must agree with it."""

    def __init__(self, base: str, from_slice: int | None, relative_to: Path, where: str):
        self.base, self.from_slice, self.relative_to, self.where = base, from_slice, relative_to, where
        self._value: int | None = None

    def __call__(self) -> int:
        if self._value is None:
            from evomerge.pool import count_layers

            found = count_layers(self.relative_to / self.base)
            if self.from_slice is not None and found is not None and found != self.from_slice:
                raise ConfigError(f"{self.where}: slices[0] covers layers [0, {self.from_slice}) but the base has "
                                  f"{found}: only whole models are merged (layer_range [0, {found}])")
            self._value = found or self.from_slice
            if self._value is None:
                raise ConfigError(f"{self.where}: a gradient needs the base's layer count: {self.base} has no "
                                  "config.json with num_hidden_layers (or give slices with layer_range)")
        return self._value


def _placed(setting: Setting, where: str, key: str, layers: Callable[[], int]) -> list[Placed]:
    """A mergekit setting as (layers, modules, value) entries in evomerge's order: later ones win.

    mergekit takes the first [{filter, value}] entry whose filter is in the tensor's name (no filter
    or "*": every tensor), so the entries are placed last-first; those after an unfiltered entry can
    never be reached and are dropped."""
    if _is_scalar(setting):
        return [(None, None, setting)]
    if _is_gradient(setting):
        return _gradient(setting, None, layers())
    if not (isinstance(setting, list) and setting and all(isinstance(c, dict) and "value" in c for c in setting)):
        raise ConfigError(f"{where}.parameters.{key}: {setting!r} is not a number, a gradient (list of numbers) "
                          "or a list of {filter, value}")
    reachable = []
    for cond in setting:
        reachable.append(cond)
        if cond.get("filter") in (None, "*"):
            break
    placed: list[Placed] = []
    for cond in reversed(reachable):
        filt = cond.get("filter")
        modules = None if filt in (None, "*") else MERGEKIT_FILTERS.get(str(filt), re.escape(str(filt)))
        value = cond["value"]
        if _is_scalar(value):
            placed.append((None, modules, value))
        elif _is_gradient(value):
            placed += _gradient(value, modules, layers())
        else:
            raise ConfigError(f"{where}.parameters.{key}: value {value!r} is not a number or a gradient")
    return placed


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (int, float, bool))


def _is_gradient(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                           for v in value)


def gradient_value(values: list[float], t: float) -> float:
    """A mergekit gradient at t in [0, 1]: the values are evenly spaced from t = 0 to t = 1 and
    joined by straight lines."""
    return float(np.interp(t, np.linspace(0.0, 1.0, len(values)), np.asarray(values, dtype=float)))


def _gradient(values: list[float], modules: str | None, n_layers: int) -> list[Placed]:
    """A gradient over the decoder layers: layer i of n gets t = i / (n - 1) (t = 1 for one layer),
    tensors outside the layers (embeddings, final norm, head) t = 0, as mergekit plans them.
    Runs of layers with the same value share one override."""
    outside = gradient_value(values, 0.0)
    per_layer = [gradient_value(values, i / (n_layers - 1) if n_layers > 1 else 1.0) for i in range(n_layers)]
    placed: list[Placed] = [(None, modules, outside)]
    start = 0
    for i in range(1, n_layers + 1):
        if i == n_layers or per_layer[i] != per_layer[start]:
            if per_layer[start] != outside:
                placed.append(((start, i), modules, per_layer[start]))
            start = i
    return placed


def _collapse(layered: list[list[Placed]]) -> tuple[Any, list[Placed]]:
    """Settings from outer to inner level (top-level, slice, model) -> (default, overrides): an
    entry for every tensor replaces all before it, so the last such entry is the default."""
    placed = [entry for level in layered for entry in level]
    default = None
    for i, (span, modules, value) in enumerate(placed):
        if span is None and modules is None:
            default, start = value, i + 1
    if default is None:
        return None, placed
    return default, placed[start:]


def _tokenizer_source(value: Any, where: str) -> str | None:
    if value in (None, "base"):
        return None
    if value == "union":
        raise ConfigError(f"{where}: tokenizer_source: union builds a merged vocabulary, which evomerge does not do "
                          "(the pool shares one vocabulary); write tokenizer_source: base or a model's path")
    if not isinstance(value, str):
        raise ConfigError(f"{where}: tokenizer_source: write base or a model's path")
    return value


def _unique_name(name: str, taken: dict[str, str]) -> str:
    candidate, i = name, 2
    while candidate in taken:
        candidate, i = f"{name}-{i}", i + 1
    return candidate


def recipe_to_mergekit(recipe: Recipe, pool_spec: "LocalPoolSpec") -> dict[str, Any]:
    """The mergekit YAML for a recipe, when mergekit can express it (else ConfigError saying why)."""
    from evomerge.methods import EVOMERGE_ONLY_PARAMS, get_method

    method = get_method(recipe.method)
    if method.mergekit_name is None:
        raise ConfigError(f"method {recipe.method} has no mergekit equivalent")
    for params in [recipe.parameters] + [o.parameters for o in recipe.overrides]:
        for name in EVOMERGE_ONLY_PARAMS & {k for k, v in params.items() if v}:
            raise ConfigError(f"parameter {name} is evomerge's own; mergekit cannot express it")
    reverse_filters = {v: k for k, v in MERGEKIT_FILTERS.items()}
    per_model: dict[str, dict[str, Any]] = {n: dict(p.model_dump()) for n, p in recipe.experts.items()}
    for override in recipe.overrides:
        if override.layers is not None or override.parameters or override.modules not in reverse_filters:
            raise ConfigError("overrides by layer range or regex have no mergekit equivalent in `models` form")
        for name, params in override.experts.items():
            for key, value in params.model_dump(exclude_none=True).items():
                base_value = per_model[name][key]
                entries = base_value if isinstance(base_value, list) else [{"value": base_value}]
                per_model[name][key] = [{"filter": reverse_filters[override.modules], "value": value}] + entries
    models = [{"model": str(pool_spec.experts[n]), "parameters": per_model[n]} for n in recipe.experts]
    out: dict[str, Any] = {"merge_method": method.mergekit_name, "base_model": str(pool_spec.base), "models": models}
    if recipe.parameters:
        out["parameters"] = dict(recipe.parameters)
    if recipe.dtype:
        out["dtype"] = recipe.dtype
    return out
