"""A picked fusion, used: `export` writes it as fusion.yaml, `evomerge fuse fusion.yaml --prompt`
answers with it (the same FusedBackend a search scored it with, its answers cached in memory).

    rule: log_linear
    temperature: 0.8
    alpha: 0.1
    top_logprobs: 5
    models:                                   # only the models the fusion queries
      add: {endpoint: http://127.0.0.1:8000/v1, model: add, weight: 1.2, gate: 0.9, price_in: 0.1, price_out: 0.4}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError

from evomerge.errors import ConfigError, validation_message
from evomerge.fusion import rules
from evomerge.fusion.spec import APIModel, FusionPoolSpec, parse_spec
from evomerge.recipe import Recipe, load_yaml_file
from evomerge.schema import Frozen


class ServedModel(APIModel):
    weight: float
    gate: float = Field(1.0, ge=0, le=1)


class FusionConfig(Frozen):
    rule: str
    models: dict[str, ServedModel] = Field(min_length=1)
    temperature: float = Field(1.0, gt=0)
    alpha: float = Field(0.1, ge=0, le=1)
    top_logprobs: int = Field(5, ge=1, le=20)
    gate_threshold: float = Field(0.1, ge=0, lt=1)
    tasks: dict[str, dict[str, dict[str, float]]] = Field(
        default_factory=dict, description="per task (a per_task search): each model's weight and gate for its queries")


def fusion_config(recipe: Recipe, pool_spec: "FusionPoolSpec | dict[str, Any]") -> dict[str, Any]:
    """The deployable form of a fusion recipe over a fusion pool: no key, only its env var's name."""
    spec = parse_spec(pool_spec)
    queried = rules.members(recipe.experts, spec.names, spec.gate_threshold)
    models = {m.name: {**spec.models[m.name].model_dump(mode="json", exclude_none=True), "weight": m.weight,
                       "gate": m.gate} for m in queried}
    tasks = {o.modules.removeprefix("task:"): {name: {k: v for k, v in (("weight", e.weight), ("gate", e.density))
                                                       if v is not None} for name, e in o.experts.items()}
             for o in recipe.overrides if o.modules and o.modules.startswith("task:")}
    if tasks:  # a per-task fusion queries, for some task, models the recipe's own values leave out
        used = {name for values in tasks.values() for name in values}
        models.update({n: {**spec.models[n].model_dump(mode="json", exclude_none=True), "weight": 0.0, "gate": 0.0}
                       for n in spec.names if n in used and n not in models})
    return {"rule": recipe.method, "temperature": float(recipe.parameters.get("temperature", 1.0)),
            "alpha": float(recipe.parameters.get("alpha", 0.1)), "top_logprobs": spec.top_logprobs,
            "gate_threshold": spec.gate_threshold, "models": models, **({"tasks": tasks} if tasks else {})}


def load_fusion(path: Path) -> FusionConfig:
    data = load_yaml_file(Path(path))
    try:
        return FusionConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(f"{path}: {validation_message(error)}") from None


def fuse(path: Path, prompts: list[str], max_tokens: int = 64, stop: list[str] | None = None,
         task: str | None = None) -> tuple[list[str], dict]:
    """The fusion's answers to `prompts` (as queries of `task`, for a per-task fusion), and what
    they cost (calls, tokens, USD)."""
    from evomerge.fusion.backend import FusedBackend
    from evomerge.fusion.cache import QueryCache
    from evomerge.fusion.client import ModelClients
    from evomerge.fusion.spec import probe

    config = load_fusion(path)
    base = {k: v for k, v in config.models.items()}
    spec = FusionPoolSpec(models={n: APIModel(**m.model_dump(exclude={"weight", "gate"})) for n, m in base.items()},
                          top_logprobs=config.top_logprobs, gate_threshold=config.gate_threshold)
    found = probe(spec)
    clients = ModelClients(spec, {spec.models[n].endpoint for n, f in found.items() if f["lora_server"]}, QueryCache(None))
    backend = FusedBackend(spec, clients, {n for n, f in found.items() if f["logprobs"]}, config.rule)
    if config.tasks and task not in config.tasks:
        raise ConfigError(f"{path}: this fusion answers each task with its own models: give --task, one of "
                          f"{', '.join(config.tasks)}")
    overrides = [{"modules": f"task:{name}", "experts": {n: {"weight": v.get("weight"), "density": v.get("gate")}
                                                         for n, v in values.items()}}
                 for name, values in config.tasks.items()]
    backend.use(Recipe(method=config.rule, experts={n: {"weight": m.weight, "density": m.gate} for n, m in base.items()},
                       parameters={"temperature": config.temperature, "alpha": config.alpha} if config.rule == "log_linear" else {},
                       overrides=overrides))
    if task is not None:
        backend.begin_task(task)
    kwargs = {"until": list(stop if stop is not None else ["\n"]), "max_gen_toks": max_tokens}
    answers = backend.generate_until([(prompt, kwargs) for prompt in prompts])
    return answers, {**clients.spending.as_dict(), "serving_usd": backend.serving_usd}
