"""Pool specs: what a config's `pool:` says, as one typed union.

    pool: {base: zoo/base, experts: {add: zoo/full/add}, tokenizer: add}     LocalPoolSpec
    pool: {endpoint: http://host:8800, token_env: EVOMERGE_TOKEN}            RemotePoolSpec (evomerge serve)
    pool: {models: {gpt: {endpoint: ..., model: ..., price_in: ...}}}       FusionPoolSpec (API models)

A spec says its kind by its keys, as users write it (no `kind:` tag to add). `resolve_pool_spec`
turns what a user wrote (relative paths, a pool YAML, experts as a list of folders) into the typed,
absolute spec a run's config.json keeps; `parse_pool_spec` reads one back. Everything downstream
holds a `PoolSpec`, never a dict, and asks its `PoolKind` (poolkinds.py) what differs.
"""

from __future__ import annotations

import re
import urllib.parse
from pathlib import Path
from typing import Annotated, Any, Optional, Union

from pydantic import Discriminator, Field, Tag, ValidationError

from evomerge.errors import ConfigError, validation_message
from evomerge.fusion.spec import FusionPoolSpec, resolve_fusion_spec
from evomerge.schema import Frozen


class LocalPoolSpec(Frozen):
    """A base and its experts (full checkpoints or PEFT LoRA adapters) on this machine."""

    base: Path
    experts: dict[str, Path] = Field(min_length=1)
    tokenizer: Optional[Path] = Field(None, description="whose tokenizer a merged model gets (default: the base's)")


class RemotePoolSpec(Frozen):
    """A provider's pool (`evomerge serve`): the token is read from `token_env`, never stored."""

    endpoint: str
    token_env: str = "EVOMERGE_TOKEN"


def spec_kind(spec: Any) -> Optional[str]:
    """Which kind a spec is, from its keys (or its type, once parsed): remote, fusion or local."""
    for kind, model in SPEC_MODELS.items():
        if isinstance(spec, model):
            return kind
    if not isinstance(spec, dict):
        return None
    if "endpoint" in spec:
        return "remote"
    if "models" in spec:
        return "fusion"
    return "local" if {"base", "experts"} & set(spec) else None


PoolSpec = Annotated[
    Union[Annotated[LocalPoolSpec, Tag("local")], Annotated[RemotePoolSpec, Tag("remote")],
          Annotated[FusionPoolSpec, Tag("fusion")]],
    Discriminator(spec_kind),
]
SPEC_MODELS = {"local": LocalPoolSpec, "remote": RemotePoolSpec, "fusion": FusionPoolSpec}

NOT_A_POOL = ("pool needs `base: PATH` and `experts: {NAME: PATH}` (or a path to a pool YAML, `endpoint: URL` of "
              "a provider, or `models:` of API models to fuse)")


def parse_pool_spec(spec: Any, where: str = "pool") -> PoolSpec:
    """A resolved spec (a run's config.json holds one) as its typed model; a parsed one as it is."""
    kind = spec_kind(spec)
    if kind is None:
        raise ConfigError(f"{where}: {NOT_A_POOL}")
    try:  # the member's own model, so an error names the key (pool.experts), not the union's tag
        return SPEC_MODELS[kind].model_validate(spec)
    except ValidationError as error:
        raise ConfigError(f"{where}: pool.{validation_message(error)}") from None


def resolve_pool_spec(spec: Any, relative_to: Path, where: str) -> PoolSpec:
    """A pool given inline or as a path to a pool YAML -> its typed spec, every path absolute and checked."""
    from evomerge.recipe import load_yaml_file

    if isinstance(spec, str):
        pool_file = (relative_to / spec).resolve()
        return resolve_pool_spec(load_yaml_file(pool_file), pool_file.parent, str(pool_file))
    if isinstance(spec, (LocalPoolSpec, RemotePoolSpec, FusionPoolSpec)):
        spec = spec.model_dump(mode="json", exclude_none=True)
    kind = spec_kind(spec)
    if kind == "remote":
        return resolve_remote_spec(spec, where)
    if kind == "fusion":
        return resolve_fusion_spec(spec, where)
    if kind == "local":
        return resolve_local_spec(spec, relative_to, where)
    raise ConfigError(f"{where}: {NOT_A_POOL}")


def resolve_local_spec(spec: dict[str, Any], relative_to: Path, where: str) -> LocalPoolSpec:
    if "base" not in spec or "experts" not in spec:
        raise ConfigError(f"{where}: {NOT_A_POOL}")
    extra = set(spec) - {"base", "experts", "tokenizer"}
    if extra:
        raise ConfigError(f"{where}: pool.{sorted(extra)[0]}: unknown key (a pool has base, experts, tokenizer)")
    experts = spec["experts"]
    if isinstance(experts, list):
        experts = _named_by_folder(experts, where)
    if not isinstance(experts, dict) or not experts:
        raise ConfigError(f"{where}: pool.experts must map names to paths")
    resolved = {"base": _local_path(spec["base"], relative_to, f"{where}: pool.base"),
                "experts": {str(n): _local_path(p, relative_to, f"{where}: pool.experts.{n}") for n, p in experts.items()}}
    tokenizer = spec.get("tokenizer")
    if tokenizer not in (None, "base"):  # an expert's name or a path
        resolved["tokenizer"] = resolved["experts"].get(str(tokenizer)) or _local_path(
            tokenizer, relative_to, f"{where}: pool.tokenizer")
    return LocalPoolSpec.model_validate(resolved)


def _named_by_folder(paths: list[Any], where: str) -> dict[str, Any]:
    """The list form of pool.experts: each expert is named after its folder, so two folders of one
    name would be one expert (the last): refused."""
    named: dict[str, Any] = {}
    for path in paths:
        name = Path(str(path)).name
        if name in named:
            raise ConfigError(f"{where}: pool.experts: {named[name]} and {path} are both named {name!r} (the folder "
                              "name); give them as a mapping NAME: PATH")
        named[name] = path
    return named


HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")  # org/name, as on the Hugging Face hub


def _local_path(given: Any, relative_to: Path, where: str) -> str:
    """`given` resolved against `relative_to`; a hub id or mergekit's model+lora form that is not a
    local path is refused here, with what to do instead (a missing local path is the pool's to report)."""
    given = str(given)
    path = (relative_to / Path(given).expanduser()).resolve()
    if not path.exists():
        if "+" in given:
            raise ConfigError(f"{where}: {given!r}: mergekit's MODEL+LORA form is not supported; list the LoRA "
                              "adapter as an expert of its own (evomerge applies it to the base)")
        if HUB_ID.match(given):
            raise ConfigError(f"{where}: {given!r} is not a local directory, and Hugging Face hub ids are not "
                              f"supported offline; download it first (huggingface-cli download {given} --local-dir "
                              "DIR) and give the local path")
    return str(path)


def resolve_remote_spec(spec: dict[str, Any], where: str) -> RemotePoolSpec:
    """{endpoint, token_env} checked; the token itself is never part of a spec (nor of a run dir)."""
    extra = set(spec) - {"endpoint", "token_env"}
    if extra:
        raise ConfigError(f"{where}: a remote pool has `endpoint:` and `token_env:` only, not {sorted(extra)}"
                          + ("; put the token in an environment variable and name it in token_env"
                             if extra & {"token", "api_key"} else ""))
    endpoint = str(spec["endpoint"]).rstrip("/")
    parsed = urllib.parse.urlsplit(endpoint)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ConfigError(f"{where}: pool.endpoint must be an http(s) URL, got {endpoint!r}")
    if parsed.username or parsed.password or parsed.query:
        raise ConfigError(f"{where}: pool.endpoint must not carry credentials or a query; name the token's "
                          "environment variable in token_env")
    return RemotePoolSpec(endpoint=endpoint, token_env=str(spec.get("token_env") or "EVOMERGE_TOKEN"))
