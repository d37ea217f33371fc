"""Recipe: a merge as plain data.

A recipe names a merge method, per expert a signed weight and a density, the method's global
parameters, optional overrides per layer group and module filter, and a seed. It knows nothing of
tensors or files: expert names are resolved against a Pool by materialize.

It round-trips through YAML and has a content hash as its id; evomerge/mergekit_yaml.py converts
it to and from mergekit's YAML 
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
from evomerge.schema import Frozen

MODULE_FILTERS = {
    # Llama/Mistral/Qwen naming; a filter that is not one of these keys is a regex on tensor names.
    "attention": r"\.self_attn\.",
    "mlp": r"\.mlp\.",
}
LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


class ExpertParams(Frozen):
    weight: float = 1.0
    density: float = 1.0


class ExpertOverride(Frozen):
    """Per-expert values an override replaces; None keeps the recipe's value."""

    weight: float | None = None
    density: float | None = None

    def apply_to(self, params: ExpertParams) -> ExpertParams:
        return params.model_copy(update={k: v for k, v in self.model_dump().items() if v is not None})


class Override(Frozen):
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


class Recipe(Frozen):
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

    def used_experts(self) -> list[str]:
        """The experts this merge takes anything from: weight (and density, where the method has one)
        non-zero in the recipe or in an override. A method without weights (slerp, model_stock)
        uses every expert it lists."""
        from evomerge.methods import get_method

        method = get_method(self.method)
        if method.param("weight") is None:
            return list(self.experts)
        has_density = method.param("density") is not None

        def contributes(weight: float | None, density: float | None) -> bool:
            return weight != 0 and not (has_density and density == 0)

        used = {name for name, p in self.experts.items() if contributes(p.weight, p.density)}
        for override in self.overrides:
            for name, values in override.experts.items():
                merged = values.apply_to(self.experts[name])
                if contributes(merged.weight, merged.density):
                    used.add(name)
        return [name for name in self.experts if name in used]

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


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key repeated in one mapping is an error (PyYAML keeps the
    last one silently: two experts under one name would quietly become one)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may be overridden: legal
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} is repeated (first on line {seen[key]}); give each key once",
                        key_node.start_mark)
                seen[key] = key_node.start_mark.line + 1
            except TypeError:  # an unhashable key: PyYAML says so below
                continue
        return super().construct_mapping(node, deep)


def load_yaml_text(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
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

