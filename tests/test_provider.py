"""Black-box search: a provider holds the tiny zoo behind `evomerge serve`; the search sees only
the endpoint and a token from the environment."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from evomerge.config import load_search_config
from evomerge.errors import ConfigError, EvomergeError
from evomerge.poolspec import RemotePoolSpec
from evomerge.provider import ProviderError, RemoteWorker, request
from evomerge.search import search

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "evaluators" / "zoo-loss.yaml"
TOKEN = "tok-provider-test-1234"

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def provider(tiny_zoo):
    port = free_port()
    env = {**os.environ, "EVOMERGE_TOKEN": TOKEN}
    process = subprocess.Popen(
        [sys.executable, "-m", "evomerge.cli", "serve", str(tiny_zoo / "pool-full.yaml"), "--suite", str(SUITE),
         "--port", str(port), "--threads", "1"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            request(endpoint, "/v1/pool", TOKEN, retries=1, timeout=5)
            break
        except Exception:
            if process.poll() is not None or time.time() > deadline:
                raise AssertionError(f"evomerge serve did not start: {process.stderr.read()}")
            time.sleep(0.3)
    yield endpoint, process
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(timeout=30)


def write_config(path: Path, endpoint: str, **extra) -> Path:
    path.write_text(yaml.safe_dump({
        "pool": {"endpoint": endpoint, "token_env": "PROVIDER_TOKEN"}, "space": "lorahub", "budget": 4,
        "optimizer": {"type": "random"}, "workers": {"count": 2}, **extra}))
    return path


def test_search_against_a_provider_scores_like_a_local_worker(provider, tiny_zoo, tmp_path, monkeypatch):
    endpoint, _ = provider
    monkeypatch.setenv("PROVIDER_TOKEN", TOKEN)
    run = search(load_search_config(write_config(tmp_path / "s.yaml", endpoint)), tmp_path / "run")
    evaluations = run.evaluations()
    assert len(evaluations) == 4 and all(e.ok for e in evaluations)
    assert set(evaluations[0].scores) == {"add", "reverse", "upper", "next"}

    # the provider's scores are the zoo's own (a local worker on the same pool and suite gives these)
    references = json.loads((run.path / "references.json").read_text())
    zoo = json.loads((tiny_zoo / "scores.json").read_text())["scores"]
    for name in ("base", "upper"):
        model = "base" if name == "base" else f"full/{name}"
        assert references[name]["scores"]["upper"] == pytest.approx(-zoo[model]["upper"]["val_loss"], rel=1e-3)

    # export hands over the merge config; merged where the pool is, it is the candidate's model
    exported = subprocess.run([sys.executable, "-m", "evomerge.cli", "export", str(run.path), "-o", str(tmp_path / "x")],
                              capture_output=True, text=True)
    assert exported.returncode == 0, exported.stderr
    merge_yaml = (tmp_path / "x" / "merge.yaml").read_text().replace("POOL.yaml", str(tiny_zoo / "pool-full.yaml"))
    (tmp_path / "merge.yaml").write_text(merge_yaml)
    merged = subprocess.run([sys.executable, "-m", "evomerge.cli", "merge", str(tmp_path / "merge.yaml"),
                             "-o", str(tmp_path / "merged")], capture_output=True, text=True)
    assert merged.returncode == 0, merged.stderr
    assert (tmp_path / "merged" / "model.safetensors").is_file()

    # the token is never written anywhere in the run directory
    for path in run.path.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path


def test_wrong_token_is_one_config_error_before_anything_is_written(provider, tmp_path, monkeypatch):
    endpoint, _ = provider
    config = write_config(tmp_path / "s.yaml", endpoint)
    monkeypatch.setenv("PROVIDER_TOKEN", "wrong")
    with pytest.raises(ConfigError, match="HTTP 401"):
        search(load_search_config(config), tmp_path / "run")
    assert not (tmp_path / "run").exists()
    for env, expected in (({"PROVIDER_TOKEN": "x-bad-token-77"}, "HTTP 401"), ({}, "$PROVIDER_TOKEN")):
        environ = {k: v for k, v in os.environ.items() if k != "PROVIDER_TOKEN"} | env
        done = subprocess.run([sys.executable, "-m", "evomerge.cli", "search", str(config), "--run-dir",
                               str(tmp_path / "run")], capture_output=True, text=True, env=environ)
        assert done.returncode == 2 and expected in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and "x-bad-token-77" not in done.stderr
        assert not (tmp_path / "run").exists()


def test_resume_against_a_provider_serving_something_else_is_refused(provider, tmp_path, monkeypatch):
    from evomerge.run import Run
    from evomerge.search import resume

    endpoint, _ = provider
    monkeypatch.setenv("PROVIDER_TOKEN", TOKEN)
    run = search(load_search_config(write_config(tmp_path / "s.yaml", endpoint, budget=2)), tmp_path / "run")
    served = json.loads((run.path / "provider.json").read_text())
    assert served["experts"] == ["add", "reverse", "upper", "next"] and served["suite"] == "zoo-loss:validation"
    # as if the run had stopped early and the provider had meanwhile swapped its pool
    (run.path / "provider.json").write_text(json.dumps({**served, "experts": ["a", "b", "c", "d"]}))
    Run(run.path).set_status("stopped")
    with pytest.raises(EvomergeError, match="now serves"):
        resume(run.path)


def test_bad_recipe_and_unreachable_provider_are_failed_results(provider, monkeypatch):
    endpoint, _ = provider
    monkeypatch.setenv("EVOMERGE_TOKEN", TOKEN)
    worker = RemoteWorker(RemotePoolSpec(endpoint=endpoint, token_env="EVOMERGE_TOKEN"), timeout_s=60)
    bad = worker.evaluate({"method": "ties", "experts": {"nope": {"weight": 1.0}}})
    assert bad["status"] == "failed" and "nope" in bad["reason"]
    gone = RemoteWorker(RemotePoolSpec(endpoint=f"http://127.0.0.1:{free_port()}", token_env="EVOMERGE_TOKEN"), timeout_s=5)
    result = gone.evaluate({"method": "linear", "experts": {"add": {"weight": 1.0}}})
    assert result["status"] == "failed" and "unreachable" in result["reason"]


def test_malformed_requests_get_a_clear_http_error(provider):
    endpoint, _ = provider
    with pytest.raises(ProviderError, match="HTTP 404"):
        request(endpoint, "/v1/nothing", TOKEN, retries=1)
    with pytest.raises(ProviderError, match="HTTP 401"):
        request(endpoint, "/v1/evaluate", "nope", {"recipe": {}}, retries=1)
    with pytest.raises(ProviderError, match="HTTP 400"):
        request(endpoint, "/v1/evaluate", TOKEN, {"not a recipe": 1}, retries=1)


@pytest.mark.parametrize("pool, backend, message", [
    ({"endpoint": "http://x:1", "token": "abc"}, {}, "environment variable"),
    ({"endpoint": "http://user:pw@x:1"}, {}, "credentials"),
    ({"endpoint": "x:1"}, {}, "http"),
    ({"endpoint": "http://x:1"}, {"name": "hf", "token": "abc"}, "secrets never go in a config"),
])
def test_secrets_and_bad_endpoints_in_the_config_are_refused(tmp_path, pool, backend, message):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"pool": pool, "space": "lorahub", **({"backend": backend} if backend else {})}))
    with pytest.raises(ConfigError, match=message):
        load_search_config(path)


def test_a_queued_request_whose_client_has_gone_is_skipped(tiny_zoo):
    """The Provider side of it; the server side (a client that hangs up while queued) is in
    tests/test_provider_load.py."""
    from evomerge.config import resolve_pool_spec
    from evomerge.provider import Provider

    provider = Provider(resolve_pool_spec("pool-full.yaml", tiny_zoo, "zoo"), SUITE, {"name": "hf", "batch_size": 64},
                        threads=1)
    recipe = {"method": "linear", "experts": {"add": {"weight": 1.0}}}
    assert provider.evaluate(recipe, wanted=lambda: False) is None  # nothing run for a client that left
    assert provider.evaluate(recipe)["status"] == "ok"


def test_the_provider_names_its_suite_with_the_split(tiny_zoo):
    """A run records what its provider scores on; the split is part of it, so a resume against a
    provider restarted on the test split is refused rather than mixing two splits' scores."""
    from evomerge.config import resolve_pool_spec
    from evomerge.provider import Provider

    spec = resolve_pool_spec("pool-full.yaml", tiny_zoo, "zoo")
    names = {Provider(spec, suite, {"name": "hf", "batch_size": 64}, threads=1).info["suite"]
             for suite in ("zoo-loss", "zoo-loss:test", str(SUITE))}
    assert names == {"zoo-loss:validation", "zoo-loss:test"}


def test_serve_answers_abusive_requests_and_keeps_serving(provider):
    """What froze or dropped connections of `evomerge serve` before: a regex that backtracks over every
    tensor name (under the provider's lock), 100,000 nested `[` (RecursionError), an expert name that is
    rich markup (the log line raised). Each gets an answer within seconds; the provider goes on."""
    import http.client
    import urllib.parse

    endpoint, process = provider
    address = urllib.parse.urlsplit(endpoint)
    ok = {"method": "linear", "experts": {"add": {"weight": 1.0}}}
    started = time.perf_counter()
    frozen = request(endpoint, "/v1/evaluate", TOKEN, {"recipe": {**ok, "overrides": [
        {"modules": r"([a-z._0-9]+)+#", "experts": {"add": {"weight": 0.5}}}]}}, timeout=20, retries=1)
    assert frozen["status"] == "failed" and "repeats a group" in frozen["reason"]
    markup = request(endpoint, "/v1/evaluate", TOKEN, {"recipe": {"method": "linear", "experts": {"[/]": {"weight": 1.0}}}},
                     timeout=20, retries=1)
    assert markup["status"] == "failed" and "[/]" in markup["reason"]
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=20)
    connection.request("POST", "/v1/evaluate", body=b"[" * 100_000, headers={"Authorization": f"Bearer {TOKEN}"})
    assert connection.getresponse().status == 400
    connection.close()
    assert time.perf_counter() - started < 30
    assert request(endpoint, "/v1/evaluate", TOKEN, {"recipe": ok}, timeout=60, retries=1)["status"] == "ok"
    assert process.poll() is None
