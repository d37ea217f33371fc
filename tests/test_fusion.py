"""Fusion over API models: the rules' arithmetic by hand, and a fusion search against a local
OpenAI-compatible server (tests/test_evaluator_openai.py's EchoServer, on the tiny zoo's base,
answering as several model names and counting each one's requests) for what a real server cannot
be made to do on demand: 503s, and counting requests per model. The same search against a real
vLLM server with the zoo's LoRA experts as models is in tests/test_vllm_server.py.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from evomerge.config import load_search_config
from evomerge.errors import ConfigError, EvomergeError
from evomerge.fusion import rules
from evomerge.fusion.rules import Member, Position
from evomerge.recipe import Recipe
from evomerge.run import cost_front
from tests.test_evaluator import model_dir  # noqa: F401 - the shared session fixture
from tests.test_evaluator_openai import EchoServer, free_port
from tests.test_evaluator_zoo import make_records, write_jsonl

SECRET = "sk-fusiontest-0123456789abcdef"


# ---- the rules, by hand -------------------------------------------------------------------------


def test_log_linear_pools_with_signed_weights_over_the_positive_models_support():
    expert = Position("a", math.log(0.6), {"a": math.log(0.6), "b": math.log(0.3), "c": math.log(0.1)})
    amateur = Position("a", math.log(0.2), {"a": math.log(0.2), "b": math.log(0.7), "d": math.log(0.1)})
    views = [(Member("expert", 1.0, 1.0), expert), (Member("amateur", -0.5, 1.0), amateur)]
    got = rules.pooled_logprob(views, k=3, temperature=1.0, alpha=0.0)
    # support: the expert's tokens a, b, c (not d: only the negative model proposes it); the amateur
    # has no c in its top-3, so c gets its floor log(0.1)
    # has no c in its top-3, so c gets its floor log(0.1); "rest" is every other token: the expert
    # has no mass left outside {a, b, c}, the amateur 1 - (0.2 + 0.7 + 0.1) = 0 too (both at 1e-6)
    f = {"a": math.log(0.6) - 0.5 * math.log(0.2), "b": math.log(0.3) - 0.5 * math.log(0.7),
         "c": math.log(0.1) - 0.5 * math.log(0.1), "rest": 0.5 * math.log(1e-6)}
    assert got == pytest.approx(f["a"] - math.log(sum(math.exp(v) for v in f.values())))
    # the plausibility cut: with alpha 0.4, c (0.1 < 0.4 * 0.6) leaves the support, a bonus it had
    # only because the amateur never ranked it: it joins the rest
    cut = rules.pooled_logprob(views, k=3, temperature=1.0, alpha=0.4)
    rest = math.log(0.1) - 0.5 * math.log(0.1)
    assert cut == pytest.approx(f["a"] - math.log(math.exp(f["a"]) + math.exp(f["b"]) + math.exp(rest)))
    # temperature divides the pooled log-probs
    hot = rules.pooled_logprob(views, k=3, temperature=2.0, alpha=0.0)
    assert hot == pytest.approx(f["a"] / 2 - math.log(sum(math.exp(v / 2) for v in f.values())))
    # one model alone at weight 1, temperature 1: exactly its own log-prob, whatever its top-k holds
    alone = Position("a", math.log(0.5), {"a": math.log(0.5), "b": math.log(0.2)})
    assert rules.pooled_logprob([(Member("x", 1.0, 1.0), alone)], 2, 1.0, 0.0) == pytest.approx(math.log(0.5))


def test_a_gate_keeps_that_share_of_the_models_top_k():
    position = Position("b", math.log(0.3), {"a": math.log(0.6), "b": math.log(0.3), "c": math.log(0.1)})
    top, floor = rules.kept(position, gate=0.34, k=3)  # ceil(0.34 * 3) = 2 tokens kept
    assert set(top) == {"a", "b"} and floor == pytest.approx(math.log(0.3))
    top, floor = rules.kept(position, gate=0.2, k=3)
    assert set(top) == {"a"} and floor == pytest.approx(math.log(0.6))
    chosen = rules.members({"x": _params(1.0, 0.05), "y": _params(0.5, 0.5), "z": _params(0.0, 1.0)},
                           ["x", "y", "z"], threshold=0.1)
    assert [m.name for m in chosen] == ["y"]  # x: gate below the threshold; z: weight 0


def test_vote_sums_signed_weights_over_the_answers_positive_models_gave():
    a, b, c = Member("a", 1.0, 1), Member("b", 0.8, 1), Member("c", 0.5, 1)
    assert rules.vote([(a, " 4"), (b, "5"), (c, "5")]) == "5"
    assert rules.vote([(a, " 4"), (b, "5"), (Member("c", -0.5, 1), "5")]) == "4"  # c counts against 5
    assert rules.vote([(a, None), (Member("c", -0.5, 1), "5")]) == ""  # nobody positive answered


def _params(weight, density):
    from evomerge.recipe import ExpertParams

    return ExpertParams(weight=weight, density=density)


# ---- a fusion search against a local server -----------------------------------------------------


@pytest.fixture(scope="module")
def server(model_dir):  # noqa: F811
    server = EchoServer(model_dir, api_key=SECRET, names=("alpha", "beta", "gamma"))
    yield server
    server.close()


def _config(tmp_path: Path, server: EchoServer, generation: bool = True, **extra) -> Path:
    write_jsonl(tmp_path / "data.jsonl", make_records(4, seed=5))
    text = {"dataset_path": "data.jsonl", "doc_to_text": "{{ question }} =", "doc_to_target": "answer"}
    tasks = [{"task": "loss", "output_type": "loss", **text}]
    if generation:
        tasks.append({"task": "gen", "output_type": "generate_until", **text,
                      "generation_kwargs": {"until": ["\n"], "max_gen_toks": 3}})
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump({"tasks": tasks}))
    models = {name: {"endpoint": server.url, "model": name, "api_key_env": "FUSION_TEST_KEY", "price_in": 1.0 + i,
                     "price_out": 2.0} for i, name in enumerate(("alpha", "beta", "gamma"))}
    config = {"pool": {"models": models, "top_logprobs": 2, "max_retries": 1, "timeout_s": 5},
              "space": "fusion", "suite": "suite.yaml", "budget": 4, "multi_objective": "cost",
              "workers": {"count": 1}, **extra}
    (tmp_path / "search.yaml").write_text(yaml.safe_dump(config))
    return tmp_path / "search.yaml"


def test_a_fusion_search_records_cost_caches_answers_and_never_writes_the_key(server, tmp_path, monkeypatch):
    from evomerge.search import search

    monkeypatch.setenv("FUSION_TEST_KEY", SECRET)
    config = load_search_config(_config(tmp_path, server))
    before = dict(server.per_model)
    run = search(config, tmp_path / "run")
    evaluations = run.evaluations()
    assert len(evaluations) == 4 and all(e.ok for e in evaluations), [e.reason for e in evaluations]
    references = run.read_json("references.json")
    assert set(references) == {"alpha", "beta", "gamma"}  # each model alone
    # the references asked every model every prompt; candidates that query the same models found
    # every answer in the cache, except the fused generations' echoes of answers not seen yet
    asked = {name: server.per_model.get(name, 0) - before.get(name, 0) for name in ("alpha", "beta", "gamma")}
    paid = json.loads(subprocess.run([sys.executable, "-c", "import json,sys; from evomerge.fusion.cache import spent; "
                                      f"print(json.dumps(spent({str(run.path)!r})))"],
                                     capture_output=True, text=True, check=True).stdout)
    probes = 2  # one echo request per model before any work: the search's check, then the worker's
    assert paid["total"]["calls"] == sum(asked.values()) - probes * 3  # every other call is in the cache, once
    assert all(e.cost["serving_usd_per_query"] > 0 for e in evaluations)
    assert sum(e.cost["spent"]["cached"] for e in evaluations) > 0
    # the key is in no file of the run dir, and not in the queries the cache keeps
    for path in run.path.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    front = run.read_json("pareto.json")["score_cost"]
    assert front["front"] and front["reference"] and front == json.loads(json.dumps(cost_front(evaluations)))
    # show prints what serving costs and what the search spent
    shown = subprocess.run([sys.executable, "-m", "evomerge.cli", "show", str(run.path)], capture_output=True,
                           text=True, env={**__import__("os").environ, "COLUMNS": "200"})
    assert "serving cost" in shown.stdout and "search spent" in shown.stdout, shown.stderr


def test_a_gate_below_the_threshold_sends_no_request_and_a_cache_hit_none(server, tmp_path, monkeypatch):
    from evomerge.fusion.worker import FusionWorker

    monkeypatch.setenv("FUSION_TEST_KEY", SECRET)
    config = load_search_config(_config(tmp_path, server))
    worker = FusionWorker(config.pool, config.suite, "log_linear", str(tmp_path))
    recipe = Recipe(method="log_linear", experts={"alpha": {"weight": 1.0, "density": 1.0},
                                                  "beta": {"weight": 0.5, "density": 0.05},  # gated off
                                                  "gamma": {"weight": -0.3, "density": 0.9}},
                    parameters={"temperature": 1.0, "alpha": 0.1})
    before = dict(server.per_model)
    first = worker.evaluate(recipe.model_dump())
    assert first["status"] == "ok", first
    assert server.per_model.get("beta", 0) == before.get("beta", 0)  # not one request
    assert server.per_model["alpha"] > before.get("alpha", 0) and server.per_model["gamma"] > before.get("gamma", 0)
    assert first["cost"]["queried"] == ["alpha", "gamma"] and first["cost"]["spent"]["calls"] > 0
    requests = server.requests
    again = worker.evaluate(recipe.model_dump())  # the same prompts: every answer from the cache
    assert server.requests == requests and again["cost"]["spent"]["calls"] == 0
    assert again["scores"] == first["scores"] and again["cost"]["serving_usd_per_query"] == first["cost"]["serving_usd_per_query"]


def test_a_model_answering_503_is_retried_then_missing_never_a_crash(server, tmp_path, monkeypatch):
    from evomerge.fusion.worker import FusionWorker

    monkeypatch.setenv("FUSION_TEST_KEY", SECRET)
    config = load_search_config(_config(tmp_path, server))
    worker = FusionWorker(config.pool, config.suite, "log_linear", None)  # in-memory cache
    recipe = Recipe(method="log_linear", experts={"alpha": {"weight": 1.0, "density": 1.0}},
                    parameters={"temperature": 1.0, "alpha": 0.1})
    server.failures[:] = [503] * 100  # every attempt of the first requests: max_retries 1, so 2 each
    try:
        result = worker.evaluate(recipe.model_dump())
    finally:
        server.failures.clear()
    assert result["status"] == "ok", result  # scored, with the missing answers at the worst log-prob
    spent = result["cost"]["spent"]
    assert spent["missing"] > 0 and "answered 503" in spent["missing_reasons"][0]
    assert SECRET not in json.dumps(result)
    healthy = worker.evaluate(recipe.model_dump())  # missing answers are not cached: asked again
    assert healthy["cost"]["spent"]["missing"] == 0 and healthy["scalar"] > result["scalar"]


def test_a_fusion_pool_with_bad_models_is_one_line_per_model_before_any_work(server, tmp_path, monkeypatch):
    from evomerge.search import Search

    monkeypatch.setenv("FUSION_TEST_KEY", SECRET)
    path = _config(tmp_path, server)
    data = yaml.safe_load(path.read_text())
    data["pool"]["models"]["beta"]["model"] = "bta"
    data["pool"]["models"]["gamma"]["endpoint"] = f"http://127.0.0.1:{free_port()}"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as error:
        Search(load_search_config(path))
    message = str(error.value)
    assert "\n" not in message and "beta:" in message and "did you mean 'beta'" in message
    assert "gamma: cannot reach" in message and "alpha:" not in message  # alpha is fine
    data["pool"]["models"]["beta"]["api_key"] = SECRET  # a key in the config: refused, not copied anywhere
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="api_key_env"):
        load_search_config(path)
    assert not (tmp_path / "run").exists()


def test_a_weight_method_over_a_fusion_pool_and_a_fusion_rule_over_weights_are_refused(server, model_dir, tmp_path,  # noqa: F811
                                                                                       monkeypatch):
    from evomerge.search import Search

    monkeypatch.setenv("FUSION_TEST_KEY", SECRET)
    with pytest.raises(ConfigError, match="one fusion rule"):
        Search(load_search_config(_config(tmp_path, server, space="evo-merging")))
    with pytest.raises(ConfigError, match="drop `objective:`"):
        load_search_config(_config(tmp_path, server, suite=None, objective="tests.objectives:quadratic"))
    with pytest.raises(ConfigError, match="needs a pool whose answers cost money"):
        load_search_config(_config(tmp_path, server, pool=str(model_dir.parent / "pool-full.yaml")))
    from evomerge.materialize import check_recipe
    from evomerge.pool import Pool

    pool = Pool(model_dir, {"add": model_dir.parent / "full" / "add"})
    with pytest.raises(EvomergeError, match="fuses the answers of API models"):
        check_recipe(Recipe(method="log_linear", experts={"add": {"weight": 1.0}}), pool)


def test_a_fusion_search_killed_then_resumed_never_pays_twice(server, tmp_path):
    """kill -9 once the references and a candidate are logged: the resumed search finds every
    answer it needs in the run's cache (a loss suite: the candidates ask what the references did),
    so the server sees nothing after the kill but each session's one probe per model."""
    import os
    import signal
    import time

    budget = 40  # the candidates answer from the cache in milliseconds: enough of them that the kill lands mid-run
    config = _config(tmp_path, server, generation=False, budget=budget)
    env = {**os.environ, "FUSION_TEST_KEY": SECRET}
    process = subprocess.Popen([sys.executable, "-m", "evomerge.cli", "search", str(config), "--run-dir",
                                str(tmp_path / "run")], env=env, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log = tmp_path / "run" / "evaluations.jsonl"
    deadline = time.monotonic() + 240
    while not (log.is_file() and log.read_text().count("\n") >= 1):
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read().decode()[-2000:]
        time.sleep(0.005)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    killed_at = server.requests
    assert log.read_text().count("\n") < budget, "the search finished before the kill: nothing resumed"
    resumed = subprocess.run([sys.executable, "-m", "evomerge.cli", "resume", str(tmp_path / "run")], env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    evaluations = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(evaluations) == budget and len({e["id"] for e in evaluations}) == budget
    assert server.requests - killed_at == 2 * 3  # the resume's probes (its check, its worker's): nothing else
    assert all(e["cost"]["spent"]["calls"] == 0 for e in evaluations)


def test_routing_sends_each_tasks_queries_to_one_model_and_breaks_ties_by_name():
    from evomerge.fusion.backend import FusedBackend
    from evomerge.fusion.spec import parse_spec

    names = ("zeta", "beta", "alpha")  # a config's order: not the tie-break
    spec = parse_spec({"models": {n: {"endpoint": "http://127.0.0.1:9", "model": n} for n in names}})
    backend = FusedBackend(spec, None, set(names), "route")
    backend.use(Recipe(method="route", experts={n: {"weight": 0.5} for n in names}, overrides=[
        {"modules": "task:t1", "experts": {"beta": {"weight": 0.9}}},
        {"modules": "task:t2", "experts": {"zeta": {"weight": 0.7}, "alpha": {"weight": 0.7}, "beta": {"density": 0.0}}}]))
    assert [m.name for m in backend.members] == ["alpha"]  # the recipe's own values: a three-way tie
    backend.begin_task("t1")
    assert [(m.name, m.weight) for m in backend.members] == [("beta", 1.0)]
    backend.begin_task("t2")
    assert [m.name for m in backend.members] == ["alpha"]
    backend.begin_task("t3")  # no override for it: the recipe's own values
    assert [m.name for m in backend.members] == ["alpha"] and backend.queried == ["beta", "alpha"]


def test_a_blank_proposal_is_an_answer_only_when_no_model_proposes_another():
    """Reranking whole answers by their pooled log-prob: a blank answer (one space) is a prefix of
    nearly every answer and would outscore them all, so it is dropped beside a real one."""
    from evomerge.fusion.backend import _proposals

    assert _proposals([" ", " ABC", None, " ABC", " ABD"]) == [" ABC", " ABD"]
    assert _proposals([" ", None, " "]) == [" "]
    assert _proposals([None, ""]) == []
