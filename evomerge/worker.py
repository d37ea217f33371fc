"""Worker: holds the pool resident on its device and an evaluator warm; recipe in, scores out.

A Worker is a plain class so it can be used in-process (export, tests); `RayWorker` is the same
class as a Ray actor. Only the recipe (a few floats) crosses the process boundary, never tensors.
A candidate that fails (NaN weights, an exception in the merge or the evaluation) comes back as
a result with status "failed" and the reason; the worker stays usable.
"""

from __future__ import annotations

import importlib
import math
import os
import time
import traceback
from typing import Any, Callable

from evomerge.recipe import Recipe


def load_callable(spec: str) -> Callable[..., Any]:
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


class Worker:
    def __init__(self, pool_spec: dict[str, Any], suite: str | None, backend: dict[str, Any],
                 device: str = "cpu", threads: int | None = None, objective: str | None = None):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.pid = os.getpid()
        self.objective = load_callable(objective) if objective else None
        if self.objective is None:
            self._load_models(pool_spec, suite, backend, device)

    def _load_models(self, pool_spec, suite, backend, device) -> None:
        from evomerge.backends import build_backend
        from evomerge.config import open_pool
        from evomerge.evaluator import load_suite
        from evomerge.materialize import ResidentMerger

        self.pool = open_pool(pool_spec)
        self.merger = ResidentMerger(self.pool, device)
        self.suite = load_suite(suite)
        options = {k: v for k, v in backend.items() if k != "name"}
        self.backend = build_backend(backend.get("name", "hf"), model=pool_spec["base"], device=device, **options)

    def _swap_weights(self, recipe: Recipe) -> None:
        if hasattr(self.backend, "update_weights"):  # vLLM: the engine's own loaders take the tensors
            self.backend.update_weights(_finite_or_raise(list(self.merger.merged(recipe)), recipe))
        else:  # transformers: written into the live module's parameters
            self.merger.apply(recipe, self.backend.model)

    def info(self) -> dict[str, Any]:
        return {"pid": self.pid}

    def close(self) -> None:
        """Stop what the backend runs besides this process (vLLM's engine process); idempotent."""
        close = getattr(getattr(self, "backend", None), "close", None)
        if close is not None:
            close()

    def evaluate(self, recipe: dict[str, Any]) -> dict[str, Any]:
        started = time.perf_counter()
        try:
            scores, scalar, seconds = self._score(Recipe.model_validate(recipe), started)
        except Exception as error:  # a failed candidate is a result, not a crashed search
            reason = f"{type(error).__name__}: {error}".splitlines()[0][:500]
            if os.environ.get("EVOMERGE_DEBUG"):
                traceback.print_exc()
            return {"status": "failed", "reason": reason, "seconds": {"total": time.perf_counter() - started}}
        bad = [task for task, value in scores.items() if not math.isfinite(value)]
        if bad:
            return {"status": "failed", "reason": f"non-finite score on task {bad[0]}", "scores": {}, "seconds": seconds}
        return {"status": "ok", "scores": scores, "scalar": scalar, "seconds": seconds, "worker": self.pid}

    def _score(self, recipe: Recipe, started: float) -> tuple[dict[str, float], float, dict[str, float]]:
        if self.objective is not None:  # a synthetic objective: scores only, mean as the scalar
            scores = self.objective(recipe)
            return scores, sum(scores.values()) / len(scores), {"merge": 0.0, "eval": time.perf_counter() - started}
        from evomerge.evaluator import evaluate

        self._swap_weights(recipe)
        merged = time.perf_counter()
        result = evaluate(self.suite, self.backend)
        return result.scores, result.scalar, {"merge": merged - started, "eval": time.perf_counter() - merged}


def _finite_or_raise(named: list, recipe: Recipe) -> list:
    from evomerge.pool import all_finite

    for name, tensor in named:
        if not all_finite(tensor):
            raise ValueError(f"merged tensor {name} holds NaN/Inf (recipe {recipe.id})")
    return named


def ray_worker_class(device: str):
    """Worker as a Ray actor class, asking Ray for a GPU on cuda devices and one CPU otherwise."""
    import ray

    if device.startswith("cuda"):
        return ray.remote(num_gpus=1, num_cpus=1)(Worker)
    return ray.remote(num_cpus=1)(Worker)
