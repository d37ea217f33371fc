"""ModelClients: a fusion pool's queries, asked through the cache, concurrently, with retries.

Two kinds of query, both `completions` at temperature 0:
  echo      prompt = context + continuation, echo + top-k logprobs, 1 new token: the log-probs of
            the continuation's tokens and the top-k at each (log-linear pooling)
  generate  the greedy answer to a context, with the task's stop strings (every rule)

The openai client retries 429, 5xx, timeouts and connection errors with exponential backoff
(`max_retries`); after the last retry the answer is missing for that prompt: `None`, counted and
its reason kept, never an exception that fails the candidate, and not cached (a later candidate
asks again). Keys are read from the environment in the process that asks, never passed on.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from evomerge.errors import redact
from evomerge.fusion.cache import QueryCache, query_key
from evomerge.fusion.spec import FusionPoolSpec


@dataclass(frozen=True)
class Query:
    model: str  # the pool's name for it
    kind: str  # "echo" | "generate"
    prompt: str
    max_tokens: int = 1
    stop: tuple[str, ...] = ()

    def request(self, top_logprobs: int) -> dict[str, Any]:
        request: dict[str, Any] = {"prompt": self.prompt, "max_tokens": self.max_tokens, "temperature": 0.0}
        if self.kind == "echo":
            request.update(echo=True, logprobs=top_logprobs)
        if self.stop:
            request["stop"] = list(self.stop)[:4]  # the OpenAI API takes at most 4
        return request


@dataclass
class Spending:
    """What the queries of one candidate (or one `fuse` call) cost the search."""

    calls: int = 0  # answered by an API, paid for
    cached: int = 0  # answered from the cache, free
    missing: int = 0  # no answer after the retries
    prompt_tokens: int = 0
    completion_tokens: int = 0
    usd: float = 0.0
    reasons: list[str] = field(default_factory=list)  # of the missing answers (the first few)

    def as_dict(self) -> dict[str, Any]:
        return {"calls": self.calls, "cached": self.cached, "missing": self.missing,
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "usd": self.usd, **({"missing_reasons": self.reasons[:3]} if self.reasons else {})}


class ModelClients:
    def __init__(self, spec: FusionPoolSpec, lora_servers: set[str], cache: QueryCache):
        self.spec, self.cache = spec, cache
        self.lora_servers = lora_servers  # endpoints that take echo requests one at a time (vllm#16668)
        self.spending = Spending()

    def reset(self) -> Spending:
        spending, self.spending = self.spending, Spending()
        return spending

    def ask(self, queries: list[Query]) -> list[Optional[dict[str, Any]]]:
        """The answers (a completions response as a dict), in order; None where one is missing."""
        answers: list[Optional[dict[str, Any]]] = [None] * len(queries)
        todo: dict[str, list[int]] = {}  # one call per distinct query
        for i, query in enumerate(queries):
            key = self._key(query)
            hit = self.cache.get(key)
            if hit is not None:
                answers[i] = hit
                self.spending.cached += 1
            else:
                todo.setdefault(key, []).append(i)
        if todo:
            fetched = asyncio.run(self._fetch_all([(key, queries[indices[0]]) for key, indices in todo.items()]))
            for (key, indices), response in zip(todo.items(), fetched):
                for i in indices:
                    answers[i] = response
        return answers

    def _key(self, query: Query) -> str:
        model = self.spec.models[query.model]
        return query_key(model.endpoint, model.model, query.kind, query.request(self.spec.top_logprobs))

    async def _fetch_all(self, todo: list[tuple[str, Query]]) -> list[Optional[dict[str, Any]]]:
        import openai

        clients: dict[str, Any] = {}
        semaphores: dict[str, asyncio.Semaphore] = {}
        for _, query in todo:
            model = self.spec.models[query.model]
            if query.model not in clients:
                timeout = min(self.spec.timeout_s, model.latency_budget_s or self.spec.timeout_s)
                clients[query.model] = openai.AsyncOpenAI(base_url=model.endpoint, api_key=model.api_key(),
                                                          max_retries=self.spec.max_retries, timeout=timeout)
            lane = f"{model.endpoint}|{query.kind}"
            if lane not in semaphores:
                one_at_a_time = query.kind == "echo" and model.endpoint in self.lora_servers
                semaphores[lane] = asyncio.Semaphore(1 if one_at_a_time else self.spec.concurrency)

        async def fetch(key: str, query: Query) -> Optional[dict[str, Any]]:
            model = self.spec.models[query.model]
            async with semaphores[f"{model.endpoint}|{query.kind}"]:
                try:
                    response = await clients[query.model].completions.create(
                        model=model.model, **query.request(self.spec.top_logprobs))
                except openai.APIError as error:
                    self._missing(query, error)
                    return None
            answer = response.model_dump(mode="json", exclude_none=False)
            usd = model.price(answer.get("usage") or {})
            self.cache.put(key, query.model, query.kind, answer, usd, time.time())
            usage = answer.get("usage") or {}
            self.spending.calls += 1
            self.spending.prompt_tokens += int(usage.get("prompt_tokens") or 0)
            self.spending.completion_tokens += int(usage.get("completion_tokens") or 0)
            self.spending.usd += usd
            return answer

        try:
            return await asyncio.gather(*(fetch(key, query) for key, query in todo))
        finally:
            for client in clients.values():
                await client.close()

    def _missing(self, query: Query, error: Exception) -> None:
        model = self.spec.models[query.model]
        status = getattr(error, "status_code", None)
        what = f"answered {status}" if status else type(error).__name__
        self.spending.missing += 1
        if len(self.spending.reasons) < 3:
            detail = redact(str(getattr(error, "message", error)), (model.api_key(),)).splitlines()[0][:120]
            self.spending.reasons.append(f"{query.model}: {what} after {self.spec.max_retries} retries ({detail})")
