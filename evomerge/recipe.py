"""Recipe: a merge as plain data.

A recipe names a merge method, per expert a signed weight and a density, the method's global
parameters, optional overrides per layer group and module filter, and a seed. It knows nothing of
tensors or files: expert names are resolved against a Pool by materialize.

It round-trips through YAML, has a content hash as its id, and converts to and from mergekit's
YAML (`models`, `base_model`, `merge_method`, `parameters`, `dtype`) for every method both tools
share.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from evomerge.errors import ConfigError, validation_message

MODULE_FILTERS = {
    # Llama/Mistral/Qwen naming; a filter that is not one of these keys is a regex on tensor names.
    "attention": r"\.self_attn\.",
    "mlp": r"\.mlp\.",
}
LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ExpertParams(_Frozen):
    weight: float = 1.0
    density: float = 1.0


class ExpertOverride(_Frozen):
    """Per-expert values an override replaces; None keeps the recipe's value."""

    weight: float | None = None
    density: float | None = None

    def apply_to(self, params: ExpertParams) -> ExpertParams:
        return params.model_copy(update={k: v for k, v in self.model_dump().items() if v is not None})


class Override(_Frozen):
    """Parameters that replace the recipe's own for the tensors this override matches.

    `layers` is a half-open range [start, end) of decoder layer indices (tensors outside the
    decoder layers, such as embeddings, never match a layer range); `modules` is "attention",
    "mlp" or a regular expression searched in the tensor name. Later overrides win.
    """

    layers: tuple[int, int] | None = None
    modules: str | None = None
    experts: dict[str, ExpertOverride] = Field(default_factory=dict)
    parameters: dict[str, float | bool] = Field(default_factory=dict)

    @field_validator("modules")
    @classmethod
    def _valid_pattern(cls, value: str | None) -> str | None:
        if value is not None and value not in MODULE_FILTERS:
            try:
                re.compile(value)
            except re.error as error:
                raise ValueError(f"modules {value!r} is not 'attention', 'mlp' or a valid regex: {error}")
        return value

    def matches(self, tensor_name: str) -> bool:
        if self.layers is not None:
            found = LAYER_INDEX.search(tensor_name)
            if not found or not (self.layers[0] <= int(found.group(1)) < self.layers[1]):
                return False
        if self.modules is not None:
            pattern = MODULE_FILTERS.get(self.modules, self.modules)
            if not re.search(pattern, tensor_name):
                return False
        return True


class TensorPlan(BaseModel):
    """What one tensor gets: the resolved per-expert and global parameters."""

    model_config = ConfigDict(frozen=True)
    weights: tuple[float, ...]
    densities: tuple[float, ...]
    parameters: dict[str, float | bool]


class Recipe(_Frozen):
    method: str
    experts: dict[str, ExpertParams]
    parameters: dict[str, float | bool] = Field(default_factory=dict)
    overrides: list[Override] = Field(default_factory=list)
    seed: int = 0
    lora_merge: Literal["dense", "lowrank"] = "dense"
    dtype: str | None = None

    @field_validator("experts")
    @classmethod
    def _has_experts(cls, value: dict[str, ExpertParams]) -> dict[str, ExpertParams]:
        if not value:
            raise ValueError("a recipe needs at least one expert")
        return value

    # ---- identity -------------------------------------------------------------------------
    @property
    def id(self) -> str:
        """Content hash: the same recipe has the same id on every machine."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]

    # ---- per-tensor resolution ------------------------------------------------------------
    def plan(self, tensor_name: str) -> TensorPlan:
        experts = dict(self.experts)
        parameters = dict(self.parameters)
        for override in self.overrides:
            if override.matches(tensor_name):
                for name, values in override.experts.items():
                    experts[name] = values.apply_to(experts[name])
                parameters.update(override.parameters)
        names = list(self.experts)
        return TensorPlan(
            weights=tuple(experts[n].weight for n in names),
            densities=tuple(experts[n].density for n in names),
            parameters=parameters,
        )

    # ---- YAML -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_defaults=False)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: Any, where: str = "recipe") -> "Recipe":
        try:
            return cls.model_validate(data)
        except ValidationError as error:
            raise ConfigError(f"{where}: {validation_message(error)}") from None

    @classmethod
    def from_yaml(cls, text: str, where: str = "recipe") -> "Recipe":
        return cls.from_dict(load_yaml_text(text, where), where)

    def save(self, path: Path) -> None:
        path.write_text(self.to_yaml())


def load_yaml_text(text: str, where: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{where}{line}: not valid YAML: {problem}") from None


def load_yaml_file(path: Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    return load_yaml_text(path.read_text(), str(path))


# ---- mergekit YAML, both ways ---------------------------------------------------------------
MERGEKIT_EXPERT_KEYS = {"weight", "density"}
MERGEKIT_FILTERS = {"self_attn": "attention", "mlp": "mlp"}


def is_mergekit_config(data: Any) -> bool:
    return isinstance(data, dict) and "merge_method" in data


def recipe_from_mergekit(data: dict[str, Any], where: str = "mergekit config") -> tuple[Recipe, dict[str, Any]]:
    """A mergekit YAML (models/base_model/merge_method/parameters/dtype) -> (Recipe, pool spec).

    Expert names are the model folders' names. A per-model parameter may be a scalar or a list of
    {filter, value} entries (filter self_attn / mlp / a name fragment); gradients (plain lists of
    numbers) have no evomerge equivalent yet and are refused.
    """
    from evomerge.methods import METHODS, get_method

    method_name = data.get("merge_method")
    by_mergekit = {get_method(n).mergekit_name: n for n in METHODS.names() if get_method(n).mergekit_name}
    if method_name not in by_mergekit:
        raise ConfigError(f"{where}: merge_method {method_name!r} has no evomerge equivalent "
                          f"(supported: {', '.join(sorted(by_mergekit))})")
    if "slices" in data:
        raise ConfigError(f"{where}: `slices` (layer stacking) is not supported; use `models`")
    base = data.get("base_model")
    models = data.get("models") or []
    is_linear = by_mergekit[method_name] == "linear"
    if base is None and is_linear and models:  # mergekit's linear needs no base: any model serves
        first = models[0]
        base = first["model"] if isinstance(first, dict) else first
    if base is None:
        raise ConfigError(f"{where}: base_model is required (evomerge merges task vectors against a base)")
    experts: dict[str, ExpertParams] = {}
    paths: dict[str, str] = {}
    overrides: list[Override] = []
    for position, entry in enumerate(models):
        path = str(entry["model"] if isinstance(entry, dict) else entry)
        if path == str(base) and not is_linear:
            continue  # the base's task vector is zero; only linear gives its weight a meaning
        name = _unique_name(Path(path).name, paths)
        paths[name] = path
        params = (entry.get("parameters") or {}) if isinstance(entry, dict) else {}
        scalar, filtered = _split_mergekit_params(params, f"{where}: models[{position}]")
        experts[name] = ExpertParams(**scalar)
        for filt, values in filtered.items():
            overrides.append(Override(modules=MERGEKIT_FILTERS.get(filt, re.escape(filt)),
                                      experts={name: ExpertOverride(**values)}))
    global_params = {k: v for k, v in (data.get("parameters") or {}).items()}
    for key, value in global_params.items():
        if not isinstance(value, (int, float, bool)):
            raise ConfigError(f"{where}: parameters.{key}: only scalar values are supported")
    recipe = Recipe.from_dict({"method": by_mergekit[method_name], "experts": {n: e.model_dump() for n, e in experts.items()},
                               "parameters": global_params, "overrides": [o.model_dump() for o in overrides],
                               "dtype": data.get("out_dtype") or data.get("dtype")}, where)
    return recipe, {"base": str(base), "experts": paths}


def _unique_name(name: str, taken: dict[str, str]) -> str:
    candidate, i = name, 2
    while candidate in taken:
        candidate, i = f"{name}-{i}", i + 1
    return candidate


def _split_mergekit_params(params: dict[str, Any], where: str) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    scalar: dict[str, float] = {}
    filtered: dict[str, dict[str, float]] = {}
    for key, value in params.items():
        if key not in MERGEKIT_EXPERT_KEYS:
            raise ConfigError(f"{where}: parameter {key!r} is not a per-model parameter evomerge knows (weight, density)")
        if isinstance(value, (int, float)):
            scalar[key] = float(value)
            continue
        if not isinstance(value, list) or not all(isinstance(v, dict) and "value" in v for v in value):
            raise ConfigError(f"{where}: parameter {key}: gradients (lists of numbers) are not supported; use a scalar or [{{filter, value}}]")
        for item in value:
            if "filter" in item:
                filtered.setdefault(str(item["filter"]), {})[key] = float(item["value"])
            else:
                scalar[key] = float(item["value"])
    return scalar, filtered


def recipe_to_mergekit(recipe: Recipe, pool_spec: dict[str, Any]) -> dict[str, Any]:
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
    models = [{"model": str(pool_spec["experts"][n]), "parameters": per_model[n]} for n in recipe.experts]
    out: dict[str, Any] = {"merge_method": method.mergekit_name, "base_model": str(pool_spec["base"]), "models": models}
    if recipe.parameters:
        out["parameters"] = dict(recipe.parameters)
    if recipe.dtype:
        out["dtype"] = recipe.dtype
    return out
