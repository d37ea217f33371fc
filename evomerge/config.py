"""Config files: a merge config (`evomerge merge`) is an evomerge recipe with its pool, or a mergekit YAML.

evomerge form (paths relative to the config file):

    pool: {base: zoo/base, experts: {add: zoo/full/add, rev: zoo/full/reverse}}   # or pool: zoo/pool-full.yaml
    recipe: {method: ties, parameters: {lambda: 1.0}, experts: {add: {weight: 0.5, density: 0.5}, rev: {}}}

mergekit form: any mergekit YAML whose method evomerge shares (paths relative to the working directory,
as in mergekit).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from evomerge.errors import ConfigError
from evomerge.pool import Pool
from evomerge.recipe import Recipe, is_mergekit_config, load_yaml_file, recipe_from_mergekit


def resolve_pool_spec(spec: Any, relative_to: Path, where: str) -> dict[str, Any]:
    """A pool given inline or as a path to a pool YAML -> {base, experts} with absolute paths."""
    if isinstance(spec, str):
        pool_file = (relative_to / spec).resolve()
        return resolve_pool_spec(load_yaml_file(pool_file), pool_file.parent, str(pool_file))
    if not isinstance(spec, dict) or "base" not in spec or "experts" not in spec:
        raise ConfigError(f"{where}: pool needs `base: PATH` and `experts: {{NAME: PATH}}` (or a path to a pool YAML)")
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
    return Pool(Path(spec["base"]), {name: Path(p) for name, p in spec["experts"].items()})
