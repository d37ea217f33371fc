"""Config files: a merge config (`evomerge merge`) and a search config (`evomerge search`).

A merge config (`evomerge merge`) is an evomerge recipe with its pool, or a mergekit YAML.

evomerge form (paths relative to the config file):

    pool: {base: zoo/base, experts: {add: zoo/full/add, rev: zoo/full/reverse}}   # or pool: zoo/pool-full.yaml
    recipe: {method: ties, parameters: {lambda: 1.0}, experts: {add: {weight: 0.5, density: 0.5}, rev: {}}}

mergekit form: any mergekit YAML whose method evomerge shares (paths relative to the working directory,
as in mergekit).
"""

from __future__ import annotations

import re
import urllib.parse
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import Field, ValidationError

from evomerge.errors import ConfigError, redact, validation_message
from evomerge.schema import Strict
from evomerge.pool import Pool
from evomerge.poolkinds import pool_kind
from evomerge.poolspec import PoolSpec, parse_pool_spec, resolve_pool_spec
from evomerge.mergekit_yaml import is_mergekit_config, recipe_from_mergekit
from evomerge.recipe import Recipe, load_yaml_file


def load_merge_config(path: Path) -> tuple[Recipe, PoolSpec]:
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


def open_pool(spec: PoolSpec | dict[str, Any]) -> Pool:
    """The weights of a resolved pool spec (a provider's are not here: one line saying so)."""
    return pool_kind(parse_pool_spec(spec)).open()


# ---- search config ----------------------------------------------------------------------------


class WorkersConfig(Strict):
    count: int = Field(1, ge=1, description="Ray actors; one per GPU on cuda, N on cpu")
    device: str = "cpu"
    threads: int | None = Field(None, description="torch threads per CPU worker (default: cores / count)")
    ray_address: str | None = Field(None, description="join this Ray cluster; unset: a private local one "
                                    "(an inherited RAY_ADDRESS is ignored)")
    connect_timeout_s: float = Field(30.0, gt=0, description="joining the cluster at ray_address takes at most this")
    start_timeout_s: float = Field(600.0, gt=0, description="workers not up (pool and evaluator loaded) by then fail the run")
    timeout_s: float = Field(900.0, gt=0, description="a candidate running longer is failed and its worker replaced")
    max_attempts: int = Field(3, ge=1, description="runs of one candidate whose worker died before it is failed")


def _resolve_suite(suite: str, relative_to: Path) -> str:
    """A suite path made absolute against the config's directory; a bare name with no such file
    there (`suite: zoo-loss`) stays a name, which `load_suite` finds among the shipped suites; a
    `:SPLIT` after either (`suite: zoo-loss:test`) stays after it."""
    head, colon, split = suite.rpartition(":")
    if colon and head and split and not set("/\\") & set(split) and not (relative_to / suite).exists():
        return f"{_resolve_suite(head, relative_to)}:{split}"
    path = relative_to / suite
    if not path.exists() and "/" not in suite and not suite.endswith((".yaml", ".yml")):
        return suite
    return str(path.resolve())


class SearchConfig(Strict):
    """A run config. Paths are relative to the config file; `config.yaml` in the run dir holds them resolved."""

    name: str | None = None
    # What a user wrote (a pool YAML's path, or a mapping with relative paths) until `resolved`, then
    # the typed spec with absolute paths (what a run's config.json keeps and is read back as).
    pool: Union[PoolSpec, str, dict[str, Any]] = Field(union_mode="left_to_right")
    space: str | dict[str, Any] = "default"  # searchspaces/default.yaml; the paper's schedule: "evo-merging"
    suite: str | None = None
    backend: dict[str, Any] = Field(default_factory=lambda: {"name": "hf"})
    objective: str | None = Field(None, description="'module:function' scoring a recipe without models (tests, demos)")
    optimizer: dict[str, Any] = Field(default_factory=dict, description="{type: cmaes|nevergrad|random|grid, ...}; default: the space's hints")
    budget: int = Field(100, ge=1)
    seed: int = 0
    workers: WorkersConfig = Field(default_factory=WorkersConfig)
    failure_objective: float = Field(100.0, description="objective recorded for a failed candidate (minimized)")
    multi_objective: bool | Literal["tasks", "cost"] = Field(
        False, description="tell a multi-objective optimizer per-task losses (true, tasks) or the objective and "
                           "the serving cost per 1k queries (cost: a fusion pool of API models)")
    cost_weight: float = Field(0.0, ge=0, description="objective += cost_weight * serving USD per 1k queries "
                               "(a fusion pool; one run per weight is a scalarized sweep)")
    references: bool = Field(True, description="also score the base and each expert, for comparison")
    preselect: int | Literal["auto"] | None = Field(
        "auto", description="search over this many experts only, chosen from the references (per task in turn, the "
                            "expert alone that gains most over the base); the rest stay off. auto: max(8, 2 per task) "
                            "when the pool has more (and references are scored); null: every expert "
                            "(evomerge/preselect.py)")

    def resolved(self, relative_to: Path) -> "SearchConfig":
        """Paths made absolute, so the run dir's config.yaml works from anywhere."""
        updates: dict[str, Any] = {"pool": resolve_pool_spec(self.pool, relative_to, "pool")}
        if self.suite is not None:
            updates["suite"] = _resolve_suite(self.suite, relative_to)
        if isinstance(self.space, str) and self.space.endswith((".yaml", ".yml")):
            updates["space"] = str((relative_to / self.space).resolve())
        return self.model_copy(update=updates)

    def check(self, where: str) -> "SearchConfig":
        refuse_secrets(self.model_dump(mode="json"), where)
        if isinstance(self.preselect, int) and self.preselect < 1:
            raise ConfigError(f"{where}: preselect must be at least 1 (or auto, or null), got {self.preselect}")
        if isinstance(self.preselect, int) and not self.references:
            raise ConfigError(f"{where}: preselect chooses experts from the references; set references: true")
        if pool_kind(self.pool).scores_itself:
            if self.suite is not None or self.objective is not None:
                raise ConfigError(f"{where}: a provider's pool is scored on the provider's own suite; "
                                  "drop `suite:` and `objective:`")
            return self
        if self.suite is None and self.objective is None:
            raise ConfigError(f"{where}: give a `suite:` (evaluators/*.yaml) to score candidates on")
        costed = pool_kind(self.pool).reports_cost
        if (self.multi_objective == "cost" or self.cost_weight) and not costed:
            raise ConfigError(f"{where}: {'multi_objective: cost' if self.multi_objective == 'cost' else 'cost_weight'} "
                              "needs a pool whose answers cost money (`pool: {models: ...}` of API models)")
        if costed and self.objective is not None:
            raise ConfigError(f"{where}: a fusion pool is scored on its `suite:`; drop `objective:`")
        return self

    @property
    def objectives(self) -> str:
        """What the optimizer is told: "scalar", "tasks" (one loss per task) or "cost" (objective, cost)."""
        if self.multi_objective == "cost":
            return "cost"
        return "tasks" if self.multi_objective else "scalar"


# A key whose last word is one of these holds a secret (api_key, hf_token, client_secret, ...); the
# name of the environment variable that holds it (api_key_env, token_env) is what goes in a config.
SECRET_WORDS = {"key", "apikey", "token", "secret", "password", "passwd", "authorization", "auth", "credentials",
                "bearer"}


def refuse_secrets(data: Any, where: str, path: str = "") -> None:
    """A secret anywhere in a search config (it is saved as the run dir's config.yaml, which people
    share): a key named like one, credentials in a URL, or a value shaped like a key (sk-...)."""
    if isinstance(data, dict):
        for key, value in data.items():
            label = f"{path}.{key}" if path else str(key)
            words = re.split(r"[_\-.]", str(key).lower())
            if words[-1] in SECRET_WORDS and value not in (None, ""):
                raise ConfigError(f"{where}: {label}: {SECRET_FIX}")
            refuse_secrets(value, where, label)
    elif isinstance(data, list):
        for i, value in enumerate(data):
            refuse_secrets(value, where, f"{path}[{i}]")
    elif isinstance(data, str) and (redact(data) != data or _url_secret(data)):
        raise ConfigError(f"{where}: {path}: holds credentials or a key ({_url_secret(data) or 'a value shaped like an API key'}); {SECRET_FIX}")


SECRET_FIX = ("secrets never go in a config (it is copied into the run directory): put it in an environment "
              "variable and name that with api_key_env (token_env for a provider's pool)")


def _url_secret(text: str) -> str:
    """What in a URL is a secret: a user (or user:password) before the host, or a key in the query."""
    if not text.startswith(("http://", "https://")):
        return ""
    parsed = urllib.parse.urlsplit(text)
    if parsed.username or parsed.password:
        return "user:password@ in the URL"
    for name in urllib.parse.parse_qs(parsed.query):
        if re.split(r"[_\-.]", name.lower())[-1] in SECRET_WORDS:
            return f"{name}= in the URL"
    return ""


def _apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> set[tuple[str, ...]]:
    """Command-line overrides into the file's data, so they are validated as the file's own values;
    a mapping (workers: {count: 2}) is merged into the file's. Returns the keys given."""
    given: set[tuple[str, ...]] = set()
    for key, value in overrides.items():
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if v is not None}
            if value and data.get(key) is None:
                data[key] = value
            elif value and isinstance(data[key], dict):
                data[key] = {**data[key], **value}
            given |= {(key, k) for k in value}
        elif value is not None:
            data[key] = value
            given.add((key,))
    return given


def load_search_config(path: Path, **overrides: Any) -> SearchConfig:
    path = Path(path)
    data = load_yaml_file(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a search config is a mapping (pool, space, suite, optimizer, budget, ...)")
    given = _apply_overrides(data, overrides)
    try:
        config = SearchConfig.model_validate(data)
    except ValidationError as error:
        location = tuple(str(part) for part in error.errors()[0]["loc"])
        origin = " (given on the command line)" if location[:2] in given or location[:1] in given else ""
        raise ConfigError(f"{path}: {validation_message(error)}{origin}") from None
    return config.resolved(path.parent).check(str(path))
