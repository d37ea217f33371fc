"""FusionWorker: the Worker interface (info, evaluate) over a fusion pool of API models.

It holds no weights: each candidate is a fusion recipe, put into a FusedBackend (`use`) and scored
on the config's suite by the same PreparedSuite as a merge. Each result carries the candidate's
costs: what serving it would cost per query (its objective) and what scoring it spent (API calls,
tokens, USD; cached answers are free).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Optional

from evomerge.fusion.cache import QUERIES, QueryCache
from evomerge.fusion.spec import parse_spec, probe
from evomerge.recipe import Recipe
from evomerge.worker import Worker


class FusionWorker(Worker):
    def __init__(self, pool_spec: dict[str, Any], suite: str, rule: str, run_dir: Optional[str]):
        from evomerge.evaluator import PreparedSuite, load_suite
        from evomerge.fusion.backend import FusedBackend
        from evomerge.fusion.client import ModelClients

        self.pid, self.objective = os.getpid(), None
        self.spec = parse_spec(pool_spec)
        found = probe(self.spec)  # capabilities as the servers answer now
        lora_servers = {self.spec.models[n].endpoint for n, f in found.items() if f["lora_server"]}
        self.cache = QueryCache(Path(run_dir) / QUERIES if run_dir else None)
        self.clients = ModelClients(self.spec, lora_servers, self.cache)
        self.backend = FusedBackend(self.spec, self.clients, {n for n, f in found.items() if f["logprobs"]}, rule)
        self.suite = load_suite(suite)
        self.prepared = PreparedSuite(self.suite, self.backend)
        self.queries = sum(len(r.doc_indices) for r in self.prepared.requests.values())  # per suite pass

    def _score(self, recipe: Recipe, started: float):
        self.clients.reset()
        self.backend.use(recipe)
        chosen = time.perf_counter()
        result = self.prepared.evaluate()
        return result.scores, result.scalar, {"merge": chosen - started, "eval": time.perf_counter() - chosen}

    def _extras(self) -> dict[str, Any]:
        spent = self.clients.spending.as_dict()
        return {"cost": {"serving_usd_per_query": self.backend.serving_usd / max(self.queries, 1),
                         "queried": self.backend.queried, "spent": spent}}

    def close(self) -> None:
        self.cache.close()
