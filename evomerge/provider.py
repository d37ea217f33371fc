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
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from evomerge.errors import ConfigError

RETRIES = 3  # attempts of a request while the provider refuses connections (GET: also on 5xx); never after a timeout
RETRY_WAIT_S = 1.0  # doubled after each failed attempt
MAX_BODY = 1 << 20  # bytes of one request: a recipe is a few kB


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
    parsed = urllib.parse.urlsplit(endpoint)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ConfigError(f"{where}: pool.endpoint must be an http(s) URL, got {endpoint!r}")
    if parsed.username or parsed.password or parsed.query:
        raise ConfigError(f"{where}: pool.endpoint must not carry credentials or a query; name the token's "
                          "environment variable in token_env")
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
    """One JSON call, retried with backoff only where that cannot run an evaluation twice: while the
    provider refuses connections (it is down or restarting), and for GET also on 5xx."""
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
            if error.code < 500 or body is not None or attempt == retries:  # a 5xx POST may have run
                raise ProviderError(f"{endpoint}{path}: HTTP {error.code} {detail}") from None
        except TimeoutError:  # the provider may still be working on it: asking again would queue it twice
            raise ProviderError(f"{endpoint}{path}: no answer within {timeout:.0f}s") from None
        except (urllib.error.URLError, ConnectionError) as error:
            refused = isinstance(getattr(error, "reason", error), ConnectionRefusedError)
            if body is not None and not refused:  # it may have arrived: sending it again could run it twice
                raise ProviderError(f"{endpoint}{path}: connection lost ({getattr(error, 'reason', error)})") from None
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
        info = request(spec["endpoint"], "/v1/pool", token_from_env(spec), timeout=30.0)
        return {"experts": [str(e) for e in info["experts"]], "n_layers": int(info["n_layers"]),
                "suite": str(info.get("suite", "")), "tasks": [str(t) for t in info.get("tasks", [])]}
    except ProviderError as error:
        raise ConfigError(f"pool: {error}") from None
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"pool: {spec['endpoint']}/v1/pool did not answer as `evomerge serve` does") from None


class RemoteWorker:
    """The Worker interface (info, evaluate) over a provider's endpoint."""

    def __init__(self, spec: dict[str, Any], timeout_s: float):
        # Read here, not passed in: an actor's arguments are stored by Ray (its GCS); the
        # environment is inherited from the driver on a local cluster (set it on every node of a
        # remote one).
        self.endpoint, self.token, self.timeout_s = spec["endpoint"], token_from_env(spec), timeout_s

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

    def evaluate(self, recipe: dict[str, Any], wanted=lambda: True) -> dict[str, Any] | None:
        """The recipe's result; None (nothing run) when `wanted()` says its client has gone while it
        queued, e.g. a search that timed the request out or was killed."""
        with self.lock:
            if not wanted():
                return None
            return self.worker.evaluate(recipe)


def _client_gone(sock) -> bool:
    """True when the peer closed the connection (readable with nothing to read)."""
    import select
    import socket

    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


def bind(host: str, port: int) -> ThreadingHTTPServer:
    """The listening socket, bound before any model loads: a port in use fails in a second."""
    try:
        return ThreadingHTTPServer((host, port), BaseHTTPRequestHandler)
    except OSError as error:
        raise ConfigError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None


def make_server(provider: Provider, server: ThreadingHTTPServer, token: str, log=None) -> ThreadingHTTPServer:
    """`server` (from `bind`) answering the two calls of the module docstring."""
    expected = f"Bearer {token}".encode()

    class Handler(BaseHTTPRequestHandler):
        timeout = 60  # seconds a silent client may hold a thread

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
                length = int(self.headers.get("Content-Length") or 0)
                if not 0 < length <= MAX_BODY:
                    raise ValueError(length)
                recipe = json.loads(self.rfile.read(length))["recipe"]
            except (ValueError, KeyError, TypeError):
                self._reply(400, {"error": f'the body must be JSON {{"recipe": {{...}}}} of at most {MAX_BODY} bytes'})
                return
            # a bad recipe is a failed result, as in a local search
            result = provider.evaluate(recipe, wanted=lambda: not _client_gone(self.connection))
            if result is None:
                if log is not None:
                    log(f"{self.client_address[0]} gone before its turn: skipped")
                return
            if log is not None:
                log(f"{self.client_address[0]} {result['status']} {result.get('scalar', result.get('reason', ''))}")
            self._reply(200, result)

    server.RequestHandlerClass = Handler
    return server
