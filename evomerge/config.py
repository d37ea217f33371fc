"""Config files: a merge config (`evomerge merge`) and a search config (`evomerge search`).

A merge config (`evomerge merge`) is an evomerge recipe with its pool, or a mergekit YAML.

evomerge form (paths relative to the config file):

    pool: {base: zoo/base, experts: {add: zoo/full/add, rev: zoo/full/reverse}}   # or pool: zoo/pool-full.yaml
    recipe: {method: ties, parameters: {lambda: 1.0}, experts: {add: {weight: 0.5, density: 0.5}, rev: {}}}

mergekit form: any mergekit YAML whose method evomerge shares (paths relative to the working directory,
as in mergekit).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from evomerge.errors import ConfigError, validation_message
from evomerge.pool import Pool
from evomerge.provider import is_remote, resolve_remote_spec
from evomerge.recipe import Recipe, is_mergekit_config, load_yaml_file, recipe_from_mergekit


def resolve_pool_spec(spec: Any, relative_to: Path, where: str) -> dict[str, Any]:
    """A pool given inline or as a path to a pool YAML -> {base, experts} with absolute paths."""
    if isinstance(spec, str):
        pool_file = (relative_to / spec).resolve()
        return resolve_pool_spec(load_yaml_file(pool_file), pool_file.parent, str(pool_file))
    if is_remote(spec):  # held by a provider (`evomerge serve`): nothing local to resolve
        return resolve_remote_spec(spec, where)
    if not isinstance(spec, dict) or "base" not in spec or "experts" not in spec:
        raise ConfigError(f"{where}: pool needs `base: PATH` and `experts: {{NAME: PATH}}` (or a path to a pool "
                          "YAML, or `endpoint: URL` of a provider)")
    experts = spec["experts"]
    if isinstance(experts, list):
        experts = {Path(p).name: p for p in experts}
    if not isinstance(experts, dict) or not experts:
        raise ConfigError(f"{where}: pool.experts must map names to paths")
    return {"base": str((relative_to / spec["base"]).resolve()),
            "experts": {str(n): str((relative_to / p).resolve()) for n, p in experts.items()}}


def load_merge_config(path: Path) -> tuple[Recipe, dict[str, Any]]:
    """(recipe, pool spec with absolute paths) from an evomerge or mergekit merge config."""
    path = Path(path)
    data = load_yaml_file(path)
    if is_mergekit_config(data):
        recipe, spec = recipe_from_mergekit(data, str(path))
        return recipe, resolve_pool_spec(spec, Path.cwd(), str(path))
    if not isinstance(data, dict) or set(data) - {"pool", "recipe"} or "recipe" not in data or "pool" not in data:
        raise ConfigError(f"{path}: a merge config has `pool:` and `recipe:` (or is a mergekit YAML with `merge_method:`)")
    spec = resolve_pool_spec(data["pool"], path.parent, str(path))
    return Recipe.from_dict(data["recipe"], f"{path}: recipe"), spec


def open_pool(spec: dict[str, Any]) -> Pool:
    if is_remote(spec):
        raise ConfigError(f"the pool is held by the provider at {spec['endpoint']}: its weights are not here "
                          "(ask the provider to export the recipe)")
    return Pool(Path(spec["base"]), {name: Path(p) for name, p in spec["experts"].items()})


# ---- search config ----------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WorkersConfig(_Strict):
    count: int = Field(1, ge=1, description="Ray actors; one per GPU on cuda, N on cpu")
    device: str = "cpu"
    threads: int | None = Field(None, description="torch threads per CPU worker (default: cores / count)")
    ray_address: str | None = None
    timeout_s: float = Field(900.0, gt=0, description="a candidate running longer is failed and its worker replaced")
    max_attempts: int = Field(3, ge=1, description="runs of one candidate whose worker died before it is failed")


class SearchConfig(_Strict):
    """A run config. Paths are relative to the config file; `config.yaml` in the run dir holds them resolved."""

    name: str | None = None
    pool: str | dict[str, Any]
    space: str | dict[str, Any] = "evo-merging"
    suite: str | None = None
    backend: dict[str, Any] = Field(default_factory=lambda: {"name": "hf"})
    objective: str | None = Field(None, description="'module:function' scoring a recipe without models (tests, demos)")
    optimizer: dict[str, Any] = Field(default_factory=dict, description="{type: cmaes|nevergrad|random|grid, ...}; default: the space's hints")
    budget: int = Field(100, ge=1)
    seed: int = 0
    workers: WorkersConfig = Field(default_factory=WorkersConfig)
    failure_objective: float = Field(100.0, description="objective recorded for a failed candidate (minimized)")
    multi_objective: bool = Field(False, description="tell per-task losses to a multi-objective optimizer")
    references: bool = Field(True, description="also score the base and each expert, for comparison")

    def resolved(self, relative_to: Path) -> "SearchConfig":
        """Paths made absolute, so the run dir's config.yaml works from anywhere."""
        updates: dict[str, Any] = {"pool": resolve_pool_spec(self.pool, relative_to, "pool")}
        if self.suite is not None:
            updates["suite"] = str((relative_to / self.suite).resolve())
        if isinstance(self.space, str) and self.space.endswith((".yaml", ".yml")):
            updates["space"] = str((relative_to / self.space).resolve())
        return self.model_copy(update=updates)

    def check(self, where: str) -> "SearchConfig":
        for key in ("api_key", "token"):
            if key in self.backend:
                raise ConfigError(f"{where}: backend.{key}: secrets never go in a config; name an env var with api_key_env")
        if is_remote(self.pool):
            if self.suite is not None or self.objective is not None:
                raise ConfigError(f"{where}: a provider's pool is scored on the provider's own suite; "
                                  "drop `suite:` and `objective:`")
            return self
        if self.suite is None and self.objective is None:
            raise ConfigError(f"{where}: give a `suite:` (evaluators/*.yaml) to score candidates on")
        return self


def load_search_config(path: Path, **overrides: Any) -> SearchConfig:
    path = Path(path)
    data = load_yaml_file(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a search config is a mapping (pool, space, suite, optimizer, budget, ...)")
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        config = SearchConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(f"{path}: {validation_message(error)}") from None
    return config.resolved(path.parent).check(str(path))
