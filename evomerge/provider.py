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
Worker and scores one recipe at a time; the others wait in a bounded queue (beyond it: 503 with
Retry-After, nothing queued), while /v1/pool still answers. The server is uvicorn (h11) with limits
(`Limits`): body size, a deadline for each request's head and body (408), open connections, and
module patterns that cannot backtrack for long (evomerge/patterns.py). Every request gets an HTTP answer or, after a
deadline, is cut off; none crashes or stalls the server. The search's side (`RemoteWorker`, the
HTTP call) is evomerge/provider_client.py, re-exported here.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from evomerge.errors import ConfigError

if TYPE_CHECKING:
    from evomerge.poolspec import PoolSpec
from evomerge.provider_client import (  # noqa: F401 - the public names, importable from here as before
    RETRIES,
    RETRY_WAIT_S,
    ProviderError,
    RemoteWorker,
    pool_info,
    request,
    token_from_env,
)
from evomerge.patterns import (  # noqa: F401 - the provider's pattern rules, importable from here as before
    MAX_PATTERN_CHARS,
    MAX_PATTERN_COST,
    MAX_RECIPE_COST,
    PATTERN_RULE,
    module_pattern_problem,
    pattern_cost,
    refused,
)

MAX_BODY = 1 << 20  # bytes of one request: a recipe is a few kB


@dataclass(frozen=True)
class Limits:
    """What clients may take from the provider. Beyond each: an HTTP error with a JSON `error`
    (uvicorn's own plain-text 400/503 for bad HTTP and too many connections); a client too slow
    gets 408 and its connection is closed."""

    max_body: int = MAX_BODY  # bytes of a POST body: 413 beyond
    max_queue: int = 32  # evaluations waiting behind the running one: 503 + Retry-After beyond
    header_timeout_s: float = 10.0  # from connecting (or a request's first byte) to the end of its headers: 408
    body_timeout_s: float = 30.0  # from the headers to the end of the body: 408
    max_connections: int = 256  # open at once: uvicorn's own 503 beyond
    backlog: int = 1024  # connections the kernel holds before accept (the old server had 5: resets)
    keep_alive_s: int = 5  # an idle connection between requests is closed after this


# ---- the provider ---------------------------------------------------------------------------


class Provider:
    """One resident Worker over the pool, scoring recipes on the provider's suite, one at a time.

    `objective` ("module:function", as in a search config) scores without loading models (tests);
    the pool is still opened for its names and layer count."""

    def __init__(self, pool_spec: "PoolSpec", suite: Path | None, backend: dict[str, Any], device: str = "cpu",
                 threads: int | None = None, objective: str | None = None):
        from evomerge.config import open_pool
        from evomerge.worker import Worker

        self.worker = Worker(pool_spec, None if suite is None else str(suite), backend, device=device,
                             threads=threads, objective=objective)
        pool = self.worker.pool if objective is None else open_pool(pool_spec)
        tasks = [task.task for task in self.worker.suite.tasks] if objective is None else []
        self.info = {"experts": pool.names, "n_layers": pool.n_layers(),
                     "suite": self._suite_name(suite) if objective is None else str(objective), "tasks": tasks}
        self.lock = threading.Lock()
        self.last_seconds = 1.0  # the last evaluation's: a busy provider's Retry-After is estimated from it

    def _suite_name(self, suite: Path | str) -> str:
        """The suite's name and split ("zoo-loss:test"): a run records it, and its resume refuses a
        provider that now scores another suite, or the same suite on another split."""
        name = Path(Path(str(suite)).name.partition(":")[0]).stem  # "dir/zoo-loss.yaml:test" -> "zoo-loss"
        return f"{name}:{self.worker.suite.split}" if self.worker.suite.split else name

    def evaluate(self, recipe: dict[str, Any], wanted: Callable[[], bool] = lambda: True) -> dict[str, Any] | None:
        """The recipe's result; None (nothing run) when `wanted()` says its client has gone while it
        queued, e.g. a search that timed the request out or was killed. A module pattern that could
        backtrack for long is a failed result at once, without taking the turn."""
        problem = module_pattern_problem(recipe)
        if problem is not None:
            return refused(problem)
        with self.lock:
            if not wanted():
                return None
            started = time.perf_counter()
            try:
                return self.worker.evaluate(recipe)
            finally:
                self.last_seconds = time.perf_counter() - started


# ---- the server -----------------------------------------------------------------------------


class Server:
    """A bound socket, then (make_server) uvicorn serving the provider's app on it."""

    def __init__(self, listening: socket.socket):
        self.socket = listening
        self.server_address = listening.getsockname()
        self.uvicorn = None

    def serve_forever(self) -> None:
        """Until SIGINT/SIGTERM (in the main thread) or `shutdown()`."""
        self.uvicorn.run(sockets=[self.socket])

    def shutdown(self) -> None:
        self.uvicorn.should_exit = True

    def server_close(self) -> None:
        self.socket.close()


def bind(host: str, port: int, backlog: int = Limits.backlog) -> Server:
    """The listening socket, bound before any model loads: a port in use fails in a second, and
    clients that connect while the pool loads wait in the backlog."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return Server(socket.create_server((host, port), family=family, backlog=backlog))
    except OSError as error:
        raise ConfigError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None


def make_server(provider: Provider, server: Server, token: str, log: Callable[[str], Any] | None = None,
                limits: Limits = Limits()) -> Server:
    """`server` (from `bind`) answering the two calls of the module docstring, within `limits`."""
    import uvicorn

    config = uvicorn.Config(
        _App(provider, token, limits, log), http=_h11_with_head_deadline(limits.header_timeout_s), lifespan="off",
        access_log=False, log_level="warning", limit_concurrency=limits.max_connections, backlog=limits.backlog,
        timeout_keep_alive=limits.keep_alive_s, timeout_graceful_shutdown=5, server_header=False)
    server.uvicorn = uvicorn.Server(config)
    return server


def _raw_response(status: int, reason: str, payload: dict) -> bytes:
    body = json.dumps(payload).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode() + body


def _h11_with_head_deadline(header_timeout_s: float):
    """uvicorn's h11 protocol with a deadline for each request's head. uvicorn has none: a client
    that connects and sends nothing, or its headers a byte at a time, would hold a connection for
    ever. Past the deadline it gets 408 and the connection is closed."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    timed_out = _raw_response(408, "Request Timeout", {"error": f"the request's headers took over {header_timeout_s:g}s"})

    class H11WithHeadDeadline(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._head_timer is None and self._between_requests():  # a next request's first byte
                self._arm()
            super().data_received(data)

        def handle_events(self) -> None:
            before = self.cycle
            super().handle_events()
            if self.cycle is not before:  # a request's head is complete
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self._head_timer is None and self._between_requests() and self.conn.trailing_data[0]:
                self._arm()  # part of a pipelined request arrived while the last one ran

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _between_requests(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _arm(self) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(header_timeout_s, self._expire)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _expire(self) -> None:
            self._head_timer = None
            if not self.transport.is_closing() and self._between_requests():
                self.transport.write(timed_out)
                self.transport.close()

    return H11WithHeadDeadline


class _BodyTooLarge(Exception):
    pass


class _App:
    """The ASGI app: auth, the two calls, the bounded queue in front of the provider's one turn."""

    def __init__(self, provider: Provider, token: str, limits: Limits, log: Callable[[str], Any] | None):
        self.provider, self.limits, self.log = provider, limits, log
        self.expected = f"Bearer {token}".encode()
        self.admitted = 0  # evaluations running or waiting
        self.turn: asyncio.Lock | None = None  # made in the server's loop

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        try:
            status, payload, headers, note = await self._answer(scope, receive)
        except Exception as error:  # a bug here must still answer, never drop the connection
            status, payload, headers, note = 500, {"error": f"internal error: {type(error).__name__}"}, {}, None
        if status:
            body = json.dumps(payload).encode()
            raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            raw += [(k.encode(), v.encode()) for k, v in headers.items()]
            await send({"type": "http.response.start", "status": status, "headers": raw})
            await send({"type": "http.response.body", "body": body})
        if note is not None:
            self._log(note)

    def _log(self, line: str) -> None:
        """One line per evaluation; a log that fails (e.g. rich markup in an expert's name) is
        printed plainly instead, after the client has its answer."""
        if self.log is None:
            return
        try:
            self.log(line)
        except Exception:
            print(line, file=sys.stderr, flush=True)

    async def _answer(self, scope, receive) -> tuple[int, dict, dict, str | None]:
        """(status, JSON payload, extra headers, log line); status 0: the client has gone, no answer."""
        # Answers before the body is read keep the connection: uvicorn then reads the rest of the
        # body and drops it (within the head deadline). Closing at once would reset it, and a client
        # still sending (urllib sends the whole body first) would see the reset, not the answer.
        given = dict(scope["headers"]).get(b"authorization", b"")
        if not hmac.compare_digest(given, self.expected):
            return 401, {"error": "missing or wrong bearer token"}, {}, None
        path, method = scope["path"].rstrip("/"), scope["method"]
        if path == "/v1/pool" and method == "GET":
            return 200, self.provider.info, {}, None
        if path == "/v1/evaluate" and method == "POST":
            return await self._evaluate(scope, receive)
        if path in ("/v1/pool", "/v1/evaluate"):
            allowed = "GET" if path == "/v1/pool" else "POST"
            return 405, {"error": f"{path} takes {allowed}"}, {"allow": allowed}, None
        return 404, {"error": f"no such endpoint {scope['path']}; try GET /v1/pool or POST /v1/evaluate"}, {}, None

    async def _evaluate(self, scope, receive) -> tuple[int, dict, dict, str | None]:
        limit = self.limits.max_body
        bad_body = f'the body must be JSON {{"recipe": {{...}}}} of at most {limit} bytes'
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > limit:  # h11 has checked it, but cheaply again
            return 413, {"error": bad_body}, {}, None
        try:
            raw = await asyncio.wait_for(self._read_body(receive, limit), self.limits.body_timeout_s)
        except _BodyTooLarge:
            return 413, {"error": bad_body}, {}, None
        except asyncio.TimeoutError:  # a client this slow is not kept
            return 408, {"error": f"the request's body took over {self.limits.body_timeout_s:g}s"}, \
                {"connection": "close"}, None
        if raw is None:
            return 0, {}, {}, None
        try:
            recipe = json.loads(raw)["recipe"]
            if not isinstance(recipe, dict):
                raise TypeError
        except (ValueError, KeyError, TypeError, RecursionError):  # RecursionError: [[[[... nested too deep
            return 400, {"error": bad_body}, {}, None
        client = (scope.get("client") or ("?",))[0]
        problem = module_pattern_problem(recipe)  # refused before it queues: it never takes the turn
        if problem is not None:
            return 200, refused(problem), {}, f"{client} failed {problem[:120]}"
        if self.admitted > self.limits.max_queue:  # one running, max_queue waiting
            wait = min(600, max(1, math.ceil(self.provider.last_seconds * self.admitted)))
            return 503, {"error": f"busy: {self.admitted} evaluations ahead; retry after {wait}s"}, \
                {"retry-after": str(wait)}, None
        self.admitted += 1
        try:
            result = await self._in_turn(recipe, receive)
        finally:
            self.admitted -= 1
        if result is None:
            return 0, {}, {}, f"{client} gone before its turn: skipped"
        return 200, result, {}, f"{client} {result['status']} {result.get('scalar', result.get('reason', ''))}"

    @staticmethod
    async def _read_body(receive, limit: int) -> bytes | None:
        """The whole body (None: the client went away), at most `limit` bytes."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            size += len(message.get("body", b""))
            if size > limit:
                raise _BodyTooLarge
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _in_turn(self, recipe: dict, receive) -> dict | None:
        """Wait for the provider's one turn, skip it if the client has gone meanwhile, and run the
        evaluation in a daemon thread (the event loop keeps answering; a stop does not wait on it)."""
        if self.turn is None:
            self.turn = asyncio.Lock()
        async with self.turn:
            if await _disconnected(receive):
                return None
            loop = asyncio.get_running_loop()
            done: asyncio.Future = loop.create_future()

            def run() -> None:
                try:
                    outcome = (self.provider.evaluate(recipe), None)
                except BaseException as error:  # noqa: BLE001 - handed back to the loop
                    outcome = (None, error)
                try:
                    loop.call_soon_threadsafe(_settle, done, *outcome)
                except RuntimeError:  # the loop has closed: the server stopped
                    pass

            threading.Thread(target=run, name="evomerge-evaluate", daemon=True).start()
            return await done


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


async def _disconnected(receive) -> bool:
    """True when the client has closed its connection (its body was read: the next message
    uvicorn has for us is http.disconnect, if one is waiting)."""
    try:
        message = await asyncio.wait_for(receive(), timeout=0.01)
    except asyncio.TimeoutError:
        return False
    return message.get("type") == "http.disconnect"
