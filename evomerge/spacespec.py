"""spacespec: the YAML of a search space, its presets, loading and validation.

A space is a YAML file (``searchspaces/NAME.yaml``, shipped as presets) or a dict, validated into a
frozen ``SpaceSpec`` (unknown keys refused): the method or methods, ``genes`` (``{low, high, init}``
to search, or a fixed value), ``layer_groups``, ``modules``, ``l1``, optimizer hints, and optional
``stages``. A spec may start from another with ``preset: NAME`` (its top-level keys replace the
preset's). What the genes mean for a pool, genome <-> Recipe, is ``evomerge.searchspace``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError

from evomerge.errors import ConfigError, did_you_mean, validation_message
from evomerge.schema import Frozen
from evomerge.shipped import shipped_dir

PRESETS_DIR = shipped_dir("searchspaces")

Value = float | bool | str  # a str is the expression "1/N" (N = number of experts) or a method name


class GeneSpec(Frozen):
    """A searched parameter: bounds and a starting value."""

    low: float
    high: float
    init: float | str = Field(description='starting value; "1/N" = one over the number of experts')


class StageSpec(Frozen):
    name: str | None = None
    search: list[str] = Field(description="the parameters this stage searches (gene names in `genes`, or `method`)")
    fixed: dict[str, Value] = Field(default_factory=dict, description="values for other parameters in this stage")
    l1: float | None = Field(None, ge=0, description="L1 penalty weight (default: the space's `l1`)")
    budget_fraction: float = Field(1.0, gt=0, description="share of the run's budget (normalized over stages)")
    evaluations: int | None = Field(None, ge=1, description="a set number of evaluations instead of a share "
                                    "(at most half the run's budget); the other stages share the rest")
    start: Literal["init", "best"] = Field("init", description="where the searched genes start: their `init`, "
                                           "or the best recipe of the stages before")
    optimizer: dict[str, Any] | None = Field(None, description="optimizer hints (default: the space's)")


class SpaceSpec(Frozen):
    """The YAML of a search space (one file in searchspaces/)."""

    description: str = ""
    method: str | list[str] = Field(description="a merge method, or a list to choose among (categorical gene)")
    genes: dict[str, GeneSpec | Value] = Field(description="per parameter: {low, high, init} to search, or a fixed value")
    layer_groups: int | Literal["per_layer"] = Field(1, description="genes per layer group (G divides the layers)")
    modules: list[Literal["attention", "mlp"]] | None = Field(None, description="genes per module filter")
    per_task: bool = Field(False, description="genes per task of the suite (fusion of API models: route or "
                           "weigh the models differently for each kind of query)")
    l1: float = Field(0.0, ge=0, description="objective += l1 * mean |gene| over the searched float genes")
    optimizer: dict[str, Any] = Field(default_factory=dict, description="optimizer hints, e.g. {type: cmaes, sigma0: 0.05}")
    stages: list[StageSpec] | None = None
    lora_merge: Literal["dense", "lowrank"] = "dense"
    seed: int = Field(0, description="the recipes' seed (random masks of dare/della)")


# ---- presets ----------------------------------------------------------------------------------

def presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def load_spec(space: str | Path | dict[str, Any], **overrides: Any) -> tuple[SpaceSpec, str]:
    """The validated spec of ``space`` (see ``evomerge.searchspace.load_space``) and where it comes
    from, the prefix of its messages."""
    if isinstance(space, dict):
        data, where = _resolve(dict(space), "search space")
    else:
        data, where = _read_spec(space)
    data.update(overrides)
    try:
        spec = SpaceSpec.model_validate(data)
    except ValidationError as error:
        raise ConfigError(f"{where}: {validation_message(error)}") from None
    return spec, where


def _resolve(data: dict[str, Any], where: str, depth: int = 0) -> tuple[dict[str, Any], str]:
    base = data.pop("preset", None)
    if base is None:
        return data, where
    if depth > 8:
        raise ConfigError(f"{where}: `preset:` chain too deep (a cycle?)")
    parent, parent_where = _read_spec(base, depth + 1)
    return {**parent, **data}, (where if where != "search space" else f"search space (from {parent_where})")


def _read_spec(space: str | Path, depth: int = 0) -> tuple[dict[str, Any], str]:
    from evomerge.recipe import load_yaml_text

    text = str(space)
    path = Path(text)
    if not text.endswith((".yaml", ".yml")) and "/" not in text:
        path = PRESETS_DIR / f"{text}.yaml"
        if not path.is_file():
            raise ConfigError(f"unknown search space {text!r};{did_you_mean(text, presets())} presets: "
                              f"{', '.join(presets())} (or a .yaml path)")
    if not path.is_file():
        raise ConfigError(f"{path}: no such search space file")
    data = load_yaml_text(path.read_text(), str(path))
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a search space is a mapping (method, genes, stages, ...)")
    where = f"searchspaces/{path.name}" if path.parent == PRESETS_DIR else str(path)
    return _resolve(data, where, depth)
