"""Backends declare what they can do (evomerge.backends.Backend); the worker dispatches on it.

The hf backend takes weights as a live module, so a search's worker merges each candidate straight
into the resident model's parameters (ResidentMerger.apply), with no state dict built; the vllm
backend takes named tensors (its engine's loaders); openai takes none and a search refuses it.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from evomerge.backends import Backend, backend_class
from evomerge.errors import ConfigError, EvomergeError
from evomerge.materialize import ResidentMerger

REPO = Path(__file__).resolve().parents[1]
SUITE = str(REPO / "evaluators" / "zoo-loss.yaml")


def test_each_backend_declares_how_it_takes_weights():
    assert backend_class("hf").weights == "module"
    assert backend_class("vllm").weights == "named_tensors"  # read without vLLM installed
    assert backend_class("openai").weights == "none"
    assert backend_class("hf").chat_template and backend_class("vllm").chat_template
    assert not backend_class("openai").chat_template  # it chat-generates through the endpoint's chat API
    assert all(backend_class(name).loglikelihoods for name in ("hf", "vllm", "openai"))


def test_a_backend_declaring_an_unknown_weight_swap_is_refused_at_definition():
    with pytest.raises(TypeError, match="weights='state_dict'"):
        type("Bad", (Backend,), {"name": "bad", "weights": "state_dict"})


def test_a_search_refuses_a_backend_that_takes_no_weights():
    from evomerge.worker import check_backend

    with pytest.raises(ConfigError, match="backend 'openai' scores the model served at its base_url"):
        check_backend({"name": "openai", "base_url": "http://localhost:1"})
    check_backend({"name": "hf"})
    check_backend({"name": "vllm"})


def test_no_getattr_or_hasattr_on_a_backend_in_the_package():
    """Capabilities are declared: nothing probes a backend for attributes. (The vllm backend still
    probes vLLM's own objects, its engine core and workers: those are vLLM's, not backends.)"""
    probe = re.compile(r"\b(getattr|hasattr)\(\s*(getattr\(\s*)?(self\.)?backend\b")
    found = [f"{path.relative_to(REPO)}:{n}" for path in (REPO / "evomerge").rglob("*.py")
             for n, line in enumerate(path.read_text().splitlines(), 1) if probe.search(line)]
    assert found == []


# ---- the worker's swap path on the tiny zoo --------------------------------------------------------


class _NamedTensorsHF(backend_class("hf")):
    """The hf backend declaring the other path: the merge goes through update_weights by name (the
    path every hf search took before capabilities were declared)."""

    weights = "named_tensors"


def _candidates(pool_names: list[str], n_layers: int) -> list[dict]:
    """Recipes as a search makes them: the default evo-merging space (stage 1 and 2 vectors),
    plus the linear family's one-pass merge and ties."""
    from evomerge.searchspace import load_space

    space = load_space("evo-merging", experts=pool_names, n_layers=n_layers)
    rng = np.random.default_rng(0)
    recipes = []
    for stage in range(space.n_stages):
        sub = space.stage(stage) if space.n_stages > 1 else space
        for _ in range(2):
            x = sub.lower + rng.random(sub.dim) * (sub.upper - sub.lower)
            recipes.append(sub.to_recipe(x, seed=0).model_dump(mode="json"))
    experts = {name: {"weight": w, "density": 0.6} for name, w in zip(pool_names, (0.6, -0.2, 0.5, 0.3))}
    recipes.append({"method": "task_arithmetic", "parameters": {"lambda": 0.8}, "experts": experts})
    recipes.append({"method": "ties", "experts": experts})
    return recipes


@pytest.fixture(scope="module")
def zoo_workers(tiny_zoo):
    from evomerge.config import resolve_pool_spec
    from evomerge.worker import Worker

    spec = resolve_pool_spec("pool-full.yaml", tiny_zoo, "zoo")
    in_place = Worker(spec, SUITE, {"name": "hf", "batch_size": 64}, threads=1)
    by_name = Worker(spec, SUITE, {"name": "hf", "batch_size": 64}, threads=1)
    by_name.backend = _NamedTensorsHF(str(spec.base), device="cpu", batch_size=64)
    return spec, in_place, by_name


def test_hf_search_worker_merges_in_place_and_scores_as_the_named_tensor_path(zoo_workers, monkeypatch):
    spec, in_place, by_name = zoo_workers
    calls = {"apply": 0, "merged": 0}
    apply, merged = ResidentMerger.apply, ResidentMerger.merged

    def counting_apply(self, recipe, model):
        calls["apply"] += 1
        assert model is in_place.backend.model  # the resident module the evaluator scores
        return apply(self, recipe, model)

    def counting_merged(self, recipe):
        calls["merged"] += 1
        return merged(self, recipe)

    monkeypatch.setattr(ResidentMerger, "apply", counting_apply)
    monkeypatch.setattr(ResidentMerger, "merged", counting_merged)
    model = in_place.backend.model
    storage = {name: p.data_ptr() for name, p in model.named_parameters()}
    candidates = _candidates(list(spec.experts), in_place.pool.n_layers())
    results = [in_place.evaluate(recipe) for recipe in candidates]
    assert all(r["status"] == "ok" for r in results), [r.get("reason") for r in results]
    assert calls == {"apply": len(candidates), "merged": 0}  # in place, no merged state dict built
    assert in_place.backend.model is model
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == storage  # written, not replaced

    calls.update(apply=0, merged=0)
    reference = [by_name.evaluate(recipe) for recipe in candidates]
    assert calls == {"apply": 0, "merged": len(candidates)}
    for got, want in zip(results, reference):
        assert want["status"] == "ok"
        assert set(got["scores"]) == set(want["scores"]) == {"add", "reverse", "upper", "next"}
        for task, value in want["scores"].items():
            assert got["scores"][task] == pytest.approx(value, abs=1e-5, rel=1e-5), task
    assert len({round(r["scalar"], 6) for r in results}) > 1  # the candidates really differ


def test_a_worker_around_a_backend_that_takes_no_weights_fails_the_candidate_in_one_line(zoo_workers):
    spec, in_place, _ = zoo_workers

    class Served(Backend):
        name = "served"  # weights "none", the default

        def loglikelihood(self, requests):
            return [(-1.0, 1, False)] * len(requests)

    kept = in_place.backend
    try:
        in_place.backend = Served()
        result = in_place.evaluate({"method": "linear", "experts": {n: {} for n in spec.experts}})
    finally:
        in_place.backend = kept
    assert result["status"] == "failed" and "takes no weights (weights: none)" in result["reason"]
    assert "\n" not in result["reason"]


def test_backend_base_class_refuses_what_a_backend_does_not_declare():
    class GenerateOnly(Backend):
        name = "gen-only"
        loglikelihoods = False

        def generate_until(self, requests):
            return [""] * len(requests)

    backend = GenerateOnly()
    with pytest.raises(EvomergeError, match="holds no live torch module"):
        backend.live_module()
    with pytest.raises(EvomergeError, match="takes no named tensors"):
        backend.update_weights([("w", torch.zeros(1))])
    with pytest.raises(EvomergeError, match="does not apply chat templates"):
        backend.apply_chat_template("hi")
    backend.check({"loss"})
    backend.close()  # nothing to stop


def test_a_pool_spec_is_typed_by_its_keys_and_a_run_config_reads_back_typed(tmp_path):
    """What a user writes becomes one member of the PoolSpec union; config.json holds it as data
    and reads back as the same typed spec, whose PoolKind says what the search may do with it."""
    import json

    from evomerge.config import SearchConfig
    from evomerge.fusion.spec import FusionPoolSpec
    from evomerge.poolkinds import pool_kind
    from evomerge.poolspec import LocalPoolSpec, RemotePoolSpec, parse_pool_spec
    from tests.synthetic import make_pool

    written = make_pool(tmp_path / "pool", n_experts=2)
    relative = {"base": "pool/base", "experts": ["pool/expert0", "pool/expert1"]}  # list form, relative paths
    config = SearchConfig(pool=relative, suite="zoo-loss").resolved(tmp_path)
    assert isinstance(config.pool, LocalPoolSpec)
    assert config.pool.experts == {n: Path(p) for n, p in written["experts"].items()}
    again = SearchConfig.model_validate(json.loads(json.dumps(config.model_dump(mode="json"))))
    assert again.pool == config.pool and pool_kind(again.pool).name == "local"

    remote = parse_pool_spec({"endpoint": "http://127.0.0.1:9", "token_env": "T"})
    assert isinstance(remote, RemotePoolSpec) and pool_kind(remote).scores_itself
    fusion = parse_pool_spec({"models": {"a": {"endpoint": "http://127.0.0.1:9", "model": "a"}}})
    assert isinstance(fusion, FusionPoolSpec) and pool_kind(fusion).reports_cost
    assert fusion.models["a"].endpoint == "http://127.0.0.1:9/v1"
    with pytest.raises(ConfigError, match=r"^pool: pool\.experts: .*required"):
        parse_pool_spec({"base": "x"})
    with pytest.raises(ConfigError, match=r"^pool: pool needs `base: PATH`"):
        parse_pool_spec({"tokenizer": "x"})
