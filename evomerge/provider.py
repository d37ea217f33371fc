"""Provider: the pool behind an HTTP endpoint, for searches that never see the experts' weights.

This is the Evo-Merging setting (Language-Model-as-a-Service): whoever holds the pool runs

    EVOMERGE_TOKEN=... evomerge serve zoo/pool-full.yaml --suite evaluators/zoo-loss.yaml --port 8765

and a user's search, anywhere, names only the endpoint and the environment variable holding the
token:

    pool: {endpoint: http://provider:8765, token_env: EVOMERGE_TOKEN}

The protocol is two JSON calls, each with `Authorization: Bearer <token>`:

    GET  /v1/pool       -> {"experts": [...], "n_layers": N, "suite": NAME, "tasks": [...]}
    POST /v1/evaluate   {"recipe": {...}} -> a Worker result: {"status", "scores", "scalar", ...}

Only recipes (a few floats per expert) and scores cross the wire. The provider holds one resident
Worker and scores one recipe at a time (evaluations queue on a lock, while /v1/pool still answers).
On the search's side a `RemoteWorker` has the Worker's interface, so the loop is the same loop:
it runs as a Ray actor (one per concurrent request, no CPU reserved), and a provider that cannot be
reached or answers with an error turns into a failed, penalized candidate, never a crashed search.
"""

from __future__ import annotations

import hmac
import json
import os
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from evomerge.errors import ConfigError

RETRIES = 3  # attempts of one request to an unreachable provider or one answering 5xx (never after a timeout)
RETRY_WAIT_S = 1.0  # doubled after each failed attempt


def is_remote(pool_spec: Any) -> bool:
    return isinstance(pool_spec, dict) and "endpoint" in pool_spec


def resolve_remote_spec(spec: dict[str, Any], where: str) -> dict[str, Any]:
    """{endpoint, token_env} checked; the token itself is never part of a spec (nor of a run dir)."""
    extra = set(spec) - {"endpoint", "token_env"}
    if extra:
        raise ConfigError(f"{where}: a remote pool has `endpoint:` and `token_env:` only, not {sorted(extra)}"
                          + ("; put the token in an environment variable and name it in token_env"
                             if extra & {"token", "api_key"} else ""))
    endpoint = str(spec["endpoint"]).rstrip("/")
    if not endpoint.startswith(("http://", "https://")):
        raise ConfigError(f"{where}: pool.endpoint must be an http(s) URL, got {endpoint!r}")
    return {"endpoint": endpoint, "token_env": str(spec.get("token_env") or "EVOMERGE_TOKEN")}


def token_from_env(spec: dict[str, Any]) -> str:
    token = os.environ.get(spec["token_env"])
    if not token:
        raise ConfigError(f"pool {spec['endpoint']}: set the provider's token in ${spec['token_env']}")
    return token


class ProviderError(Exception):
    """The provider could not be reached or answered with an error."""


def request(endpoint: str, path: str, token: str, body: dict | None = None, timeout: float = 60.0,
            retries: int = RETRIES) -> dict[str, Any]:
    """One JSON call; retried (with backoff) while the provider is unreachable or answers 5xx."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    wait = RETRY_WAIT_S
    for attempt in range(1, retries + 1):
        try:
            req = urllib.request.Request(endpoint + path, data=data, headers=headers,
                                         method="GET" if body is None else "POST")
            with urllib.request.urlopen(req, timeout=timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            detail = error.read().decode(errors="replace")[:200]
            if error.code < 500 or attempt == retries:
                raise ProviderError(f"{endpoint}{path}: HTTP {error.code} {detail}") from None
        except TimeoutError:  # the provider may still be working on it: asking again would queue it twice
            raise ProviderError(f"{endpoint}{path}: no answer within {timeout:.0f}s") from None
        except (urllib.error.URLError, ConnectionError) as error:
            if attempt == retries:
                reason = getattr(error, "reason", error)
                raise ProviderError(f"{endpoint}{path}: unreachable ({reason})") from None
        time.sleep(wait)
        wait *= 2
    raise AssertionError("unreachable")


def pool_info(spec: dict[str, Any]) -> dict[str, Any]:
    """What the search needs to know about a remote pool (expert names, layer count), checking
    the endpoint and the token once, up front: a wrong token is a config error, not 200 failures."""
    try:
        return request(spec["endpoint"], "/v1/pool", token_from_env(spec), timeout=30.0)
    except ProviderError as error:
        raise ConfigError(f"pool: {error}") from None


class RemoteWorker:
    """The Worker interface (info, evaluate) over a provider's endpoint."""

    def __init__(self, spec: dict[str, Any], token: str, timeout_s: float):
        self.endpoint, self.token, self.timeout_s = spec["endpoint"], token, timeout_s

    def info(self) -> dict[str, Any]:
        return {"pid": os.getpid()}

    def evaluate(self, recipe: dict[str, Any]) -> dict[str, Any]:
        started = time.perf_counter()
        try:
            return request(self.endpoint, "/v1/evaluate", self.token, {"recipe": recipe}, timeout=self.timeout_s)
        except ProviderError as error:
            return {"status": "failed", "reason": f"provider: {error}"[:500],
                    "seconds": {"total": time.perf_counter() - started}}


# ---- the provider's side ----------------------------------------------------------------------


class Provider:
    """One resident Worker over the pool, scoring recipes on the provider's suite, one at a time."""

    def __init__(self, pool_spec: dict[str, Any], suite: Path, backend: dict[str, Any], device: str = "cpu",
                 threads: int | None = None):
        from evomerge.worker import Worker

        self.worker = Worker(pool_spec, str(suite), backend, device=device, threads=threads)
        self.info = {"experts": self.worker.pool.names, "n_layers": self.worker.pool.n_layers(),
                     "suite": Path(suite).stem, "tasks": [task.task for task in self.worker.suite.tasks]}
        self.lock = threading.Lock()

    def evaluate(self, recipe: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            return self.worker.evaluate(recipe)


def make_server(provider: Provider, host: str, port: int, token: str, log=None) -> ThreadingHTTPServer:
    """An HTTP server (not yet serving) answering the two calls of the module docstring."""
    expected = f"Bearer {token}".encode()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # one line per evaluation instead (below), never the headers
            pass

        def _reply(self, status: int, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _authorized(self) -> bool:
            given = self.headers.get("Authorization", "").encode()
            if hmac.compare_digest(given, expected):
                return True
            self._reply(401, {"error": "missing or wrong bearer token"})
            return False

        def do_GET(self):
            if not self._authorized():
                return
            if self.path.rstrip("/") == "/v1/pool":
                self._reply(200, provider.info)
            else:
                self._reply(404, {"error": f"no such endpoint {self.path}; try /v1/pool or POST /v1/evaluate"})

        def do_POST(self):
            if not self._authorized():
                return
            if self.path.rstrip("/") != "/v1/evaluate":
                self._reply(404, {"error": f"no such endpoint {self.path}; try POST /v1/evaluate"})
                return
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                recipe = body["recipe"]
            except (ValueError, KeyError, TypeError):
                self._reply(400, {"error": 'the body must be JSON {"recipe": {...}}'})
                return
            result = provider.evaluate(recipe)  # a bad recipe is a failed result, as in a local search
            if log is not None:
                log(f"{self.client_address[0]} {result['status']} {result.get('scalar', result.get('reason', ''))}")
            self._reply(200, result)

    return ThreadingHTTPServer((host, port), Handler)
