"""The openai backend against servers: a small OpenAI-compatible server (stdlib, answers echo +
logprobs the way vLLM does, computed by the same transformers model) for what a real server cannot
be made to do on demand (429/5xx, timeouts, a wrong key, a server without echo), and a real
`transformers serve` for generation agreement.

Agreement of the loss, multiple-choice and generation paths with the hf backend is checked against
a real vLLM server in tests/test_vllm_server.py (which runs where vLLM is installed: CI's vLLM step).
`transformers serve` ignores echo and logprobs (it says so in its log), so the loss path cannot be
checked against it; the test checks that `check()` says so in one line before any work.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import yaml

from evomerge.backends.hf import HFBackend
from evomerge.backends.openai_api import OpenAIBackend
from evomerge.errors import EvomergeError
from evomerge.evaluator import evaluate, load_suite
from tests.test_evaluator import model_dir  # noqa: F401 - the shared session fixture
from tests.test_evaluator_zoo import make_records, write_jsonl
from tests.waiting import wait_until_serving

torch.set_num_threads(1)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class EchoServer:
    """/v1/models and /v1/completions (echo + logprobs, greedy generation) over a local model."""

    def __init__(self, directory: Path, api_key: str | None = None, echo: bool = True, names: tuple[str, ...] = ("tiny",)):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(directory)
        self.api_key, self.echo = api_key, echo
        self.failures: list[int] = []  # statuses to answer before succeeding (429, 503, ...)
        self.delays: list[float] = []  # seconds to sleep before answering
        self.requests = 0
        self.per_model: dict[str, int] = {}  # POSTs per model name (a fusion pool's models are names here)
        self.names = names
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, status, payload, headers=()):
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                for key, value in headers:
                    self.send_header(key, value)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def authorized(self):
                if server.api_key and self.headers.get("authorization") != f"Bearer {server.api_key}":
                    self.reply(401, {"error": {"message": "Incorrect API key", "type": "invalid_request_error"}})
                    return False
                return True

            def do_GET(self):
                if self.authorized():
                    self.reply(200, {"object": "list", "data": [{"id": name, "object": "model", "created": 0,
                                                                 "owned_by": "test"} for name in server.names]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                with server.lock:
                    server.requests += 1
                    server.per_model[body.get("model")] = server.per_model.get(body.get("model"), 0) + 1
                    status = server.failures.pop(0) if server.failures else 200
                    delay = server.delays.pop(0) if server.delays else 0.0
                time.sleep(delay)
                if not self.authorized():
                    return
                if status != 200:
                    self.reply(status, {"error": {"message": "try again"}}, [("retry-after-ms", "5")])
                    return
                self.reply(200, server.complete(body))

        self.httpd = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @torch.no_grad()
    def complete(self, body: dict) -> dict:
        prompt = body["prompt"]
        encoded = self.tokenizer(prompt, return_offsets_mapping=True)
        ids = list(encoded["input_ids"])
        offsets = [start for start, _ in encoded["offset_mapping"]]
        with self.lock:
            generated = []
            for _ in range(int(body.get("max_tokens") or 16)):
                logits = self.model(torch.tensor([ids + generated])).logits[0]
                generated.append(int(logits[-1].argmax()))
                if generated[-1] == self.tokenizer.eos_token_id:  # as real servers do
                    break
                text = self.tokenizer.decode(generated, skip_special_tokens=True)
                if any(s in text for s in body.get("stop") or []):
                    break
            logprobs = self.model(torch.tensor([ids + generated])).logits[0].log_softmax(-1)
        text = self.tokenizer.decode(generated, skip_special_tokens=True)
        choice = {"index": 0, "text": text, "finish_reason": "length", "logprobs": None}
        if self.echo and body.get("echo") and body.get("logprobs") is not None:
            all_ids = ids + generated
            tokens = self.tokenizer.convert_ids_to_tokens(all_ids)
            token_logprobs = [None] + [float(logprobs[i - 1, t]) for i, t in enumerate(all_ids) if i > 0]
            top = [None] + [{tokens[i]: float(logprobs[i - 1].max())} if int(logprobs[i - 1].argmax()) == t
                            else {"<other>": float(logprobs[i - 1].max())} for i, t in enumerate(all_ids) if i > 0]
            # as vLLM counts: each token's place in the concatenated token strings, BOS included
            offsets = [sum(len(token) for token in tokens[:i]) for i in range(len(tokens))]
            choice = {**choice, "text": prompt + text, "logprobs": {
                "tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}}
        return {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": body["model"],
                "choices": [choice], "usage": {"prompt_tokens": len(ids), "completion_tokens": len(generated),
                                               "total_tokens": len(ids) + len(generated)}}

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def echo_server(model_dir):  # noqa: F811
    server = EchoServer(model_dir)
    yield server
    server.close()


@pytest.fixture(scope="module")
def suites(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("suites")
    write_jsonl(root / "data.jsonl", make_records(8, seed=11))
    text = {"dataset_path": "data.jsonl", "doc_to_text": "{{ question }} =", "doc_to_target": "answer"}
    specs = {
        "loss": [{"task": "loss", "output_type": "loss", **text},
                 {"task": "mc", "output_type": "multiple_choice", "doc_to_choice": "{{ [answer, '3', '12'] }}",
                  "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}], **text}],
        "generate": [{"task": "gen", "output_type": "generate_until", **text,
                      "generation_kwargs": {"until": ["\n"], "max_gen_toks": 6}}],
    }
    out = {}
    for name, tasks in specs.items():
        (root / f"{name}.yaml").write_text(yaml.safe_dump({"seed": 3, "tasks": tasks}))
        out[name] = load_suite(root / f"{name}.yaml")
    return out


def test_echo_offsets_as_vllm_counts_them_select_the_continuation():
    """A response of vLLM 0.32's (recorded from `python -m vllm.entrypoints.openai.api_server` on
    the tiny zoo's base): its offsets count the BOS `<s>`, so "add" starts at 3, not at 0."""
    from types import SimpleNamespace

    from evomerge.backends.openai_api import parse_echo_logprobs

    tokens = ['<s>', 'a', 'd', 'd', ' ', '9', '9', '+', '4', '4', ' ', '=', ' ', '1', '4', '3', '\n']
    values = [None, -2.476, -9.724, -11.188, -10.203, -10.581, -6.595, -10.977, -11.096, -13.245, -7.011,
              -10.696, -0.002, -4.786, -3.418, -6.639, -0.009]
    offsets = [0] + list(range(3, 19))
    choice = SimpleNamespace(logprobs=SimpleNamespace(tokens=tokens, token_logprobs=values, text_offset=offsets,
                                                      top_logprobs=None))
    total, count, _ = parse_echo_logprobs(choice, "add 99+44 = 143", len("add 99+44 ="))
    assert count == 4 and total == pytest.approx(-0.002 - 4.786 - 3.418 - 6.639)  # " 143", not "= 14"


def test_retries_429_5xx_and_timeouts(echo_server):
    backend = OpenAIBackend(echo_server.url, max_retries=4, timeout=1.0, concurrency=1)
    echo_server.failures[:] = [429, 503, 500]
    echo_server.delays[:] = [0, 0, 0, 2.0]  # the 4th attempt times out, the 5th succeeds
    before = echo_server.requests
    assert backend.generate_until([("hi =", {"until": ["\n"], "max_gen_toks": 2})])
    assert echo_server.requests - before == 5
    echo_server.failures[:] = [503] * 3
    with pytest.raises(EvomergeError) as exc_info:
        OpenAIBackend(echo_server.url, max_retries=1).generate_until([("x", {"max_gen_toks": 1})])
    assert "answered 503" in str(exc_info.value) and "\n" not in str(exc_info.value)
    echo_server.failures.clear()


def test_preflight_errors_are_one_line(model_dir, monkeypatch):  # noqa: F811
    server = EchoServer(model_dir, api_key="right-key")
    try:
        monkeypatch.setenv("EVOMERGE_TEST_KEY", "wrong-key-123")
        with pytest.raises(EvomergeError) as exc_info:
            OpenAIBackend(server.url, api_key_env="EVOMERGE_TEST_KEY")
        message = str(exc_info.value)
        assert "EVOMERGE_TEST_KEY" in message and "401" in message
        assert "wrong-key-123" not in message and "\n" not in message
        monkeypatch.setenv("EVOMERGE_TEST_KEY", "right-key")
        backend = OpenAIBackend(server.url, api_key_env="EVOMERGE_TEST_KEY")
        assert backend.model == "tiny"
        with pytest.raises(EvomergeError, match="did you mean 'tiny'"):
            OpenAIBackend(server.url, model="tiyn", api_key_env="EVOMERGE_TEST_KEY")
    finally:
        server.close()
    with pytest.raises(EvomergeError) as exc_info:
        OpenAIBackend(f"http://127.0.0.1:{free_port()}")
    assert "cannot reach endpoint" in str(exc_info.value) and "\n" not in str(exc_info.value)


def test_server_without_echo_is_caught_before_work(model_dir, suites):  # noqa: F811
    server = EchoServer(model_dir, echo=False)
    try:
        with pytest.raises(EvomergeError, match="no prompt logprobs"):
            evaluate(suites["loss"], OpenAIBackend(server.url))
    finally:
        server.close()


# ---- a real server: transformers serve ----------------------------------------------------------


@pytest.fixture(scope="module")
def transformers_serve(model_dir, tmp_path_factory):  # noqa: F811
    from transformers.utils.import_utils import is_serve_available

    if not is_serve_available():
        pytest.skip("`transformers serve` needs fastapi + uvicorn: pip install 'transformers[serving]'")
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "warning"}
    command = [sys.executable, "-c", "import sys; from transformers.cli.transformers import main; sys.exit(main())",
               "serve", str(model_dir), "--port", str(port), "--host", "127.0.0.1", "--device", "cpu",
               "--dtype", "float32"]
    with log.open("w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(process, url, log, 120, "transformers serve")
    except BaseException:
        process.terminate()
        raise
    yield url
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()


@pytest.mark.slow
def test_generation_agrees_with_transformers_serve(model_dir, transformers_serve, suites):  # noqa: F811
    api = OpenAIBackend(transformers_serve, concurrency=2)  # model: the one it lists
    hf = evaluate(suites["generate"], HFBackend(model_dir, batch_size=4, num_threads=1), keep_samples=True)
    served = evaluate(suites["generate"], api, keep_samples=True)
    assert [s["generation"] for s in served.tasks["gen"].samples] == [s["generation"] for s in hf.tasks["gen"].samples]
    assert served.scores == hf.scores
    # it ignores echo + logprobs: the loss path is refused up front, in one line
    with pytest.raises(EvomergeError, match="no prompt logprobs"):
        evaluate(suites["loss"], api)


@pytest.mark.slow
def test_a_text_only_server_fuses_by_vote_and_refuses_log_linear_in_one_line(transformers_serve, tmp_path):
    """`transformers serve` gives no logprobs: the probe says so, log_linear is refused before any
    work, and the vote rule fuses its answers (two names for one served model, weights of either sign)."""
    import urllib.request

    from evomerge.config import load_search_config
    from evomerge.errors import ConfigError
    from evomerge.search import Search, search

    served = json.loads(urllib.request.urlopen(f"{transformers_serve}/v1/models", timeout=10).read())["data"][0]["id"]
    write_jsonl(tmp_path / "data.jsonl", make_records(3, seed=2))
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump({"tasks": [
        {"task": "gen", "output_type": "generate_until", "dataset_path": "data.jsonl", "doc_to_text": "{{ question }} =",
         "doc_to_target": "answer", "generation_kwargs": {"until": ["\n"], "max_gen_toks": 3}}]}))
    models = {name: {"endpoint": transformers_serve, "model": served} for name in ("one", "two")}
    config = {"pool": {"models": models}, "suite": "suite.yaml", "budget": 3, "workers": {"count": 1}}
    (tmp_path / "loglinear.yaml").write_text(yaml.safe_dump({**config, "space": "fusion"}))
    with pytest.raises(ConfigError) as error:
        Search(load_search_config(tmp_path / "loglinear.yaml"))
    assert "needs echo + logprobs" in str(error.value) and "one, two" in str(error.value) and "\n" not in str(error.value)
    (tmp_path / "vote.yaml").write_text(yaml.safe_dump({**config, "space": "fusion-vote"}))
    run = search(load_search_config(tmp_path / "vote.yaml"), tmp_path / "run")
    evaluations = run.evaluations()
    assert len(evaluations) == 3 and all(e.ok for e in evaluations), [e.reason for e in evaluations]
    alone = run.read_json("references.json")["one"]["scores"]["gen"]
    assert all(e.scores["gen"] == alone for e in evaluations if e.cost["queried"])  # one model's answers, voted
