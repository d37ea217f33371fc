"""The provider under abuse and under load, on loopback: a real uvicorn server (`bind` +
`make_server`, as `evomerge serve` runs it) in a thread, over a small random pool, scoring with a
cheap objective that resolves every recipe per tensor as a merge does (so module patterns run).

Bounded: every client has a timeout, every test a few seconds; no zoo, no models loaded.
"""

from __future__ import annotations

import http.client
import io
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest

from evomerge.poolspec import RemotePoolSpec
from evomerge.provider import Limits, Provider, RemoteWorker, bind, make_server, pattern_cost, request
from evomerge.recipe import Recipe
from tests.objectives import quadratic
from tests.synthetic import make_pool

TOKEN = "tok-load-test-5678"
AUTH = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
# Llama tensor names, as materialize resolves a recipe for each
TENSORS = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"] + [
    f"model.layers.{i}.{part}.weight" for i in range(8)
    for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")]
POOL = ("expert0", "expert1", "expert2")
SLOW = {"seconds": 0.0, "started": threading.Event(), "calls": 0, "running": 0, "most": 0}
OK = {"method": "linear", "experts": {"expert0": {"weight": 1.0}, "expert1": {"weight": 0.5}}}


def planned(recipe: Recipe) -> dict[str, float]:
    """The objective: unknown experts fail as check_recipe does, every tensor's plan is resolved
    (every override's module pattern searched in every name), then quadratic scores."""
    SLOW["calls"] += 1
    SLOW["started"].set()
    SLOW["running"] += 1
    SLOW["most"] = max(SLOW["most"], SLOW["running"])
    try:
        return _planned(recipe)
    finally:
        SLOW["running"] -= 1


def _planned(recipe: Recipe) -> dict[str, float]:
    for name in recipe.experts:
        if name not in POOL:
            raise ValueError(f"recipe names expert {name!r}, which the pool does not have")
    for tensor in TENSORS:
        recipe.plan(tensor)
    time.sleep(SLOW["seconds"])
    return quadratic(recipe)


@pytest.fixture(scope="module")
def provider(tmp_path_factory) -> Provider:
    spec = make_pool(tmp_path_factory.mktemp("pool"))
    return Provider(spec, None, {}, objective="tests.test_provider_load:planned")


@pytest.fixture(autouse=True)
def fast_objective():
    SLOW.update(seconds=0.0, calls=0, running=0, most=0)
    SLOW["started"].clear()


@contextmanager
def serving(provider: Provider, log=None, **limits):
    """`evomerge serve`'s server on a free loopback port, in a thread; yields (host, port)."""
    server = make_server(provider, bind("127.0.0.1", 0), TOKEN, log=log, limits=Limits(**limits))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    deadline = time.time() + 10
    while not server.uvicorn.started:
        assert time.time() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield server.server_address[:2]
    finally:
        server.shutdown()
        thread.join(timeout=15)
        assert not thread.is_alive(), "the server did not stop"


def call(address, method: str, path: str, body: bytes | None = None, headers=None, timeout: float = 20.0):
    """(status, headers, JSON) of one request on its own connection; raises on a reset or a timeout."""
    connection = http.client.HTTPConnection(*address, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=AUTH if headers is None else headers)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), json.loads(response.read() or b"null")
    finally:
        connection.close()


def evaluate(address, recipe: dict, **kwargs):
    return call(address, "POST", "/v1/evaluate", json.dumps({"recipe": recipe}).encode(), **kwargs)


def raw(address, payload: bytes, timeout: float = 10.0) -> bytes:
    """What the server sends back to `payload`, until it closes the connection."""
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(payload)
        return read_until_closed(sock)


def read_until_closed(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


# ---- module patterns ------------------------------------------------------------------------

CATASTROPHIC = [
    r"([a-z._0-9]+)+#",  # nested repetition: 2^39 ways to split model.layers.0.self_attn.q_proj.weight
    r"(\w+\.?)*#",  # the same, with an optional dot between the runs
    r"(a|ab|abc)*#",
    "a?" * 30 + "a" * 30,  # thirty optional characters: 2^30 ways
    r"(.*)\1#",  # backreference
    r".*.*.*.*#",  # four repetitions: n^5 steps per name
    "x" * 201,
]


@pytest.mark.parametrize("pattern", CATASTROPHIC)
def test_a_module_pattern_that_could_backtrack_for_long_is_refused_at_once(provider, pattern):
    recipe = {**OK, "overrides": [{"modules": pattern, "experts": {"expert0": {"weight": 0.0}}}]}
    with serving(provider) as address:
        started = time.perf_counter()
        status, _, result = evaluate(address, recipe, timeout=10)
        assert time.perf_counter() - started < 2.0
        assert status == 200 and result["status"] == "failed" and "overrides[0].modules" in result["reason"]
        assert "'attention', 'mlp' or a regex" in result["reason"]
        assert SLOW["calls"] == 0  # refused before it took the provider's turn
        assert evaluate(address, OK)[2]["status"] == "ok"  # and the provider goes on


def test_module_patterns_people_write_still_work(provider):
    patterns = ["attention", "mlp", r"\.self_attn\.", r"layers\.\d+\.mlp\.", r"\.layers\.(1[0-5]|[0-7])\.self_attn\.",
                r".*q_proj", r"(?:q|k|v)_proj", r"(self_attn|mlp)\.(q|up)_proj", "down_proj", r"^model\.norm\.weight$"]
    overrides = [{"modules": p, "experts": {"expert1": {"weight": 0.25}}} for p in patterns]
    with serving(provider) as address:
        status, _, result = evaluate(address, {**OK, "overrides": overrides})
    assert status == 200 and result["status"] == "ok", result


def test_a_recipe_with_many_costly_patterns_is_refused():
    from evomerge.provider import module_pattern_problem

    one = {"modules": r"layers\..*\..*proj", "experts": {}}
    assert module_pattern_problem({"overrides": [one] * 4}) is None
    problem = module_pattern_problem({"overrides": [one] * 5})
    assert problem is not None and "overrides[4]" in problem
    assert pattern_cost("attention") == pattern_cost("q_proj") == 1
    assert pattern_cost(r"(a|ab)") == 2  # alternation outside a repetition: tried once each


# ---- malformed requests ---------------------------------------------------------------------


def test_deeply_nested_json_gets_400(provider):
    with serving(provider) as address:
        for body in (b"[" * 100_000, b'{"recipe": ' + b"[" * 100_000, b'{"recipe": {"a": ' * 50_000):
            status, _, payload = call(address, "POST", "/v1/evaluate", body)
            assert status == 400 and "must be JSON" in payload["error"]
        assert evaluate(address, OK)[0] == 200


def test_an_expert_name_with_rich_markup_is_answered_and_logged(provider, capsys):
    from rich.console import Console

    console = Console(file=io.StringIO())  # markup on, as `serve`'s log was: `[/]` raises MarkupError
    with serving(provider, log=lambda line: console.print(line, highlight=False)) as address:
        status, _, result = evaluate(address, {"method": "linear", "experts": {"[/]": {"weight": 1.0}, "[bold]": {}}})
        assert status == 200 and result["status"] == "failed" and "'[/]'" in result["reason"]
        assert call(address, "GET", "/v1/pool")[0] == 200
    assert "'[/]'" in capsys.readouterr().err  # the line the log could not print, printed plainly


def test_oversized_bodies_get_413_not_a_reset(provider):
    big = json.dumps({"recipe": OK, "padding": "x" * (2 << 20)}).encode()
    with serving(provider) as address:
        status, _, payload = call(address, "POST", "/v1/evaluate", big)  # the whole body sent, then read
        assert status == 413 and "at most 1048576 bytes" in payload["error"]
        # chunked, with no length to refuse up front: cut at the limit
        head = b"POST /v1/evaluate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode() + \
               b"\r\nTransfer-Encoding: chunked\r\n\r\n"
        chunk = b"10000\r\n" + b"x" * 0x10000 + b"\r\n"
        answer = raw(address, head + chunk * 20 + b"0\r\n\r\n" + b"GET /v1/pool HTTP/1.1\r\nHost: x\r\n"
                     b"Connection: close\r\nAuthorization: Bearer " + TOKEN.encode() + b"\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 413 ")
        assert b"HTTP/1.1 200 " in answer  # the body was dropped and the connection kept for the next request
        # client errors are HTTP errors, each with a clear message
        assert request(f"http://{address[0]}:{address[1]}", "/v1/pool", TOKEN, retries=1)["experts"] == list(POOL)
        assert call(address, "GET", "/v1/pool", headers={})[0] == 401
        assert call(address, "GET", "/v1/evaluate")[0] == 405
        assert call(address, "GET", "/v1/nothing")[0] == 404
        assert raw(address, b"NOT HTTP AT ALL\r\n\r\n").startswith(b"HTTP/1.1 400 ")


# ---- slow clients ---------------------------------------------------------------------------


def test_slow_clients_are_cut_off_with_408_and_others_are_served(provider):
    with serving(provider, header_timeout_s=1.0, body_timeout_s=1.0) as address:
        silent = [socket.create_connection(address, timeout=10) for _ in range(20)]  # connect, send nothing
        trickle = socket.create_connection(address, timeout=10)
        slow_body = socket.create_connection(address, timeout=10)
        slow_body.sendall(b"POST /v1/evaluate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode() +
                          b"\r\nContent-Length: 100\r\n\r\n{")
        pipelined = socket.create_connection(address, timeout=10)  # one whole request, then half of the next
        pipelined.sendall(b"GET /v1/pool HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode() +
                          b"\r\n\r\nGET /v1/pool HTTP/1.1\r\nHo")
        started = time.perf_counter()
        assert call(address, "GET", "/v1/pool")[0] == 200  # served while they hold connections
        for byte in b"GET /v1/pool HTTP/1.1\r\nHost: x\r\n":  # a header a byte at a time
            try:
                trickle.sendall(bytes([byte]))
            except OSError:
                break  # cut off
            time.sleep(0.1)
        for sock in [*silent, trickle, slow_body]:
            with sock:
                assert read_until_closed(sock).startswith(b"HTTP/1.1 408 ")
        with pipelined:
            answers = read_until_closed(pipelined)
            assert answers.startswith(b"HTTP/1.1 200 ") and answers.count(b"HTTP/1.1 408 ") == 1
        assert time.perf_counter() - started < 6.0
        assert evaluate(address, OK)[2]["status"] == "ok"


def test_connections_beyond_the_limit_get_503_until_idle_ones_are_cut_off(provider):
    with serving(provider, max_connections=8, header_timeout_s=1.0) as address:
        idle = [socket.create_connection(address, timeout=10) for _ in range(8)]
        time.sleep(0.2)
        get = b"GET /v1/pool HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer " + TOKEN.encode() + b"\r\n\r\n"
        assert raw(address, get).startswith(b"HTTP/1.1 503 ")
        for sock in idle:
            with sock:
                read_until_closed(sock)  # 408 after a second
        assert raw(address, get).startswith(b"HTTP/1.1 200 ")


# ---- the queue ------------------------------------------------------------------------------


def test_beyond_the_queue_a_client_gets_503_with_retry_after(provider):
    SLOW["seconds"] = 1.5
    with serving(provider, max_queue=1) as address, ThreadPoolExecutor(3) as pool:
        running = pool.submit(evaluate, address, OK)
        assert SLOW["started"].wait(10)
        # one running, room for one waiting: of two more, one queues and one is turned away
        answers = sorted((f.result(20) for f in [pool.submit(evaluate, address, OK) for _ in range(2)]),
                         key=lambda answer: answer[0])
        assert running.result(20)[0] == 200 and [status for status, _, _ in answers] == [200, 503]
        _, headers, payload = answers[1]
        assert int(headers["retry-after"]) >= 1 and "retry after" in payload["error"]
        assert SLOW["calls"] == 2  # the one turned away never ran


def test_a_queued_request_whose_client_has_gone_is_skipped(provider):
    SLOW["seconds"] = 1.5
    lines: list[str] = []
    with serving(provider, log=lines.append) as address, ThreadPoolExecutor(1) as pool:
        running = pool.submit(evaluate, address, OK)
        assert SLOW["started"].wait(10)
        with socket.create_connection(address, timeout=10) as gone:  # queued, then hangs up
            body = json.dumps({"recipe": OK}).encode()
            gone.sendall(b"POST /v1/evaluate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode() +
                         b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            time.sleep(0.5)  # read and queued behind the running one
        assert running.result(20)[0] == 200
        deadline = time.time() + 10
        while not any("gone before its turn: skipped" in line for line in lines):
            assert time.time() < deadline, lines
            time.sleep(0.05)
    assert SLOW["calls"] == 1


# ---- load -----------------------------------------------------------------------------------


def test_fifty_concurrent_clients_all_get_an_http_answer(provider):
    """50 clients x 8 requests at once, each on its own connection, without retries: every one gets an
    HTTP answer (200, or 503 with Retry-After past the queue), none a reset or a timeout; then 50
    RemoteWorkers (the search's client, which waits out 503s) all get their scores."""
    clients, per_client = 50, 8

    def client(i: int) -> list:
        answers = []
        for j in range(per_client):
            if (i + j) % 2:
                status, headers, _ = call(address, "GET", "/v1/pool", timeout=30)
            else:
                status, headers, _ = evaluate(address, {**OK, "seed": i * per_client + j}, timeout=30)
            answers.append((status, "retry-after" in headers))
        return answers

    with serving(provider, max_queue=8) as address:
        started = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            answers = [a for result in pool.map(client, range(clients)) for a in result]  # re-raises any reset
        assert len(answers) == clients * per_client
        assert {status for status, _ in answers} <= {200, 503}
        assert all(retry for status, retry in answers if status == 503)
        assert sum(status == 200 for status, _ in answers) >= clients * per_client // 2

        endpoint = f"http://{address[0]}:{address[1]}"
        import os

        os.environ["EVOMERGE_LOAD_TOKEN"] = TOKEN
        try:
            workers = [RemoteWorker(RemotePoolSpec(endpoint=endpoint, token_env="EVOMERGE_LOAD_TOKEN"), timeout_s=30)
                       for _ in range(clients)]
        finally:
            del os.environ["EVOMERGE_LOAD_TOKEN"]
        with ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(lambda w: w.evaluate({**OK, "seed": id(w) % 1000}), workers))
        assert [r["status"] for r in results] == ["ok"] * clients, [r.get("reason") for r in results if r["status"] != "ok"]
        assert time.perf_counter() - started < 60
    assert SLOW["most"] == 1  # one evaluation (one thread) at a time, however many clients
