"""A fusion pool: named API models, each an OpenAI-compatible endpoint, a model name, the name of
the environment variable holding its key (never the key), and its prices.

    pool:
      models:
        add:  {endpoint: http://127.0.0.1:8000, model: add, price_in: 0.15, price_out: 0.60}
        gpt:  {endpoint: https://api.openai.com, model: gpt-4o-mini, api_key_env: OPENAI_API_KEY,
               price_in: 0.15, price_out: 0.60, latency_budget_s: 20}
      top_logprobs: 5        # the top-k each answer token brings back (vLLM allows up to --max-logprobs)
      gate_threshold: 0.1    # a model whose gate is below this is not queried at all

Prices are USD per million tokens, as providers list them. `probe` asks every model once before
any long work (its endpoint answers, it serves the model, whether it gives logprobs) and says in
one line per model what is missing.
"""

from __future__ import annotations

import os
import urllib.parse
from typing import Any, Optional

from pydantic import Field, ValidationError, field_validator

from evomerge.errors import ConfigError, did_you_mean, redact, validation_message
from evomerge.schema import Frozen

PROBE_PROMPT = ("Hello", " world")  # an echo + logprobs request on this shows what a model gives


class APIModel(Frozen):
    endpoint: str = Field(description="the OpenAI-compatible server, http(s)://host:port[/v1]")
    model: str = Field(min_length=1, description="the model name the server knows it by")
    api_key_env: Optional[str] = Field(None, description="the environment variable holding its key (none: a local server)")
    price_in: float = Field(0.0, ge=0, description="USD per million prompt tokens")
    price_out: float = Field(0.0, ge=0, description="USD per million completion tokens")
    latency_budget_s: Optional[float] = Field(None, gt=0, description="a request taking longer is a missing answer")

    @field_validator("endpoint")
    @classmethod
    def _api_root(cls, url: str) -> str:
        from evomerge.backends.openai_api import normalize_base_url

        return normalize_base_url(url)  # http://host:8000 -> http://host:8000/v1, as the openai client wants

    def api_key(self) -> str:
        return (os.environ.get(self.api_key_env) if self.api_key_env else None) or "EMPTY"  # local servers take any

    def price(self, usage: dict[str, Any]) -> float:
        """USD of one response, from the tokens its `usage` reports."""
        return (self.price_in * (usage.get("prompt_tokens") or 0)
                + self.price_out * (usage.get("completion_tokens") or 0)) / 1e6


class FusionPoolSpec(Frozen):
    models: dict[str, APIModel] = Field(min_length=1)
    top_logprobs: int = Field(5, ge=1, le=20, description="top-k per answer token (OpenAI allows up to 20)")
    gate_threshold: float = Field(0.1, ge=0, lt=1, description="gate below this: the model is not queried")
    concurrency: int = Field(8, ge=1, description="requests in flight per endpoint")
    max_retries: int = Field(4, ge=0, description="retries of a 429/5xx/timeout, with exponential backoff")
    timeout_s: float = Field(60.0, gt=0, description="one request's timeout")

    @property
    def names(self) -> list[str]:
        return list(self.models)


def resolve_fusion_spec(spec: dict[str, Any], where: str) -> "FusionPoolSpec":
    """The spec validated (one line naming the key), endpoints normalized to their /v1 root."""
    from evomerge.config import refuse_secrets

    refuse_secrets({"pool": spec}, where)  # a key given inline: said so, before "unknown key"
    try:
        parsed = FusionPoolSpec.model_validate(spec)
    except ValidationError as error:
        raise ConfigError(f"{where}: pool.{validation_message(error)}") from None
    for name, model in parsed.models.items():
        url = urllib.parse.urlsplit(model.endpoint)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ConfigError(f"{where}: pool.models.{name}.endpoint must be an http(s) URL, got {model.endpoint!r}")
        if url.username or url.password or url.query:
            raise ConfigError(f"{where}: pool.models.{name}.endpoint must not carry credentials or a query; name "
                              "the key's environment variable in api_key_env")
    return parsed


def parse_spec(spec: "FusionPoolSpec | dict[str, Any]") -> FusionPoolSpec:
    return spec if isinstance(spec, FusionPoolSpec) else FusionPoolSpec.model_validate(spec)


def probe(spec: FusionPoolSpec) -> dict[str, dict[str, Any]]:
    """Per model: {"logprobs": bool, "lora_server": bool}, after one listing and one echo request
    each. Every model that cannot be used (unreachable, refused key, not served) is one line of
    one ConfigError, so a user fixes them all at once."""
    import openai

    problems, found = [], {}
    listed: dict[tuple[str, str], tuple[list[Any], Optional[str]]] = {}
    for name, model in spec.models.items():
        client = openai.OpenAI(base_url=model.endpoint, api_key=model.api_key(), max_retries=spec.max_retries,
                               timeout=spec.timeout_s)  # a LoRA server loads an adapter on its first request
        try:
            key = (model.endpoint, model.api_key_env or "")
            if key not in listed:
                listed[key] = _list_models(client, model)
            served, trouble = listed[key]
            if trouble:
                problems.append(f"{name}: {trouble}")
                continue
            ids = [m.id for m in served]
            if ids and model.model not in ids:
                problems.append(f"{name}: {model.endpoint} does not serve model {model.model!r};"
                                f"{did_you_mean(model.model, ids)} it serves {', '.join(ids[:8])}")
                continue
            try:
                logprobs = _gives_logprobs(client, model)
            except openai.APIError as error:  # a timeout, a dropped connection: not an answer about echo
                problems.append(f"{name}: no answer to a one-token probe ({type(error).__name__}) within "
                                f"{spec.timeout_s:.0f}s")
                continue
            found[name] = {"logprobs": logprobs, "lora_server": any((m.model_extra or {}).get("parent") for m in served)}
        finally:
            client.close()
    if problems:
        raise ConfigError("fusion pool: " + "; ".join(problems))
    return found


def _list_models(client, model: APIModel) -> tuple[list[Any], Optional[str]]:
    import openai

    try:
        return list(client.models.list()), None
    except openai.NotFoundError:
        return [], None  # no /models route: trust the name
    except (openai.AuthenticationError, openai.PermissionDeniedError) as error:
        state = "is set" if model.api_key_env and os.environ.get(model.api_key_env) else "is not set"
        return [], f"{model.endpoint} refused the key ({error.status_code}): check ${model.api_key_env} (it {state})"
    except openai.APIConnectionError as error:
        return [], f"cannot reach {model.endpoint} ({type(error.__cause__ or error).__name__}); is the server up?"
    except openai.APIError as error:
        return [], f"{model.endpoint}: {redact(str(error), (model.api_key(),)).splitlines()[0][:200]}"


def _gives_logprobs(client, model: APIModel) -> bool:
    """Whether the server echoes the prompt's token logprobs with their top-k (log-linear pooling
    needs them); a server that refuses or ignores echo is a text-only model (the vote rule)."""
    import openai

    try:
        response = client.completions.create(model=model.model, prompt="".join(PROBE_PROMPT), echo=True, logprobs=1,
                                             max_tokens=1, temperature=0.0)
    except openai.BadRequestError:  # it refuses echo or logprobs (400/422): text only
        return False
    except openai.UnprocessableEntityError:
        return False
    logprobs = response.choices[0].logprobs if response.choices else None
    return bool(logprobs is not None and logprobs.token_logprobs and logprobs.top_logprobs)
