"""Evaluator: the suite format, its one-line errors, metrics, evaluate(), the hf backend, `eval`."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from evomerge.backends import Backend
from evomerge.errors import ConfigError, EvomergeError
from evomerge.evaluator import cut_at_stop, evaluate, extract_regex, load_suite, suite_from_dict
from tests.test_evaluator_zoo import make_records, write_jsonl

torch.set_num_threads(1)  # tiny models: one thread is much faster on a shared machine


@pytest.fixture(scope="session")
def model_dir(tiny_zoo) -> Path:
    """The demo zoo's base model (a tiny Llama with a character-level tokenizer that adds <s>)."""
    return tiny_zoo / "base"


@pytest.fixture(scope="session")
def hf_backend(model_dir):
    from evomerge.backends.hf import HFBackend

    return HFBackend(model_dir, batch_size=4, num_threads=1)


def write_suite(directory: Path, tasks: list[dict], **extra) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "suite.yaml"
    path.write_text(yaml.safe_dump({"seed": 7, **extra, "tasks": tasks}))
    return path


def task(name="t", **overrides) -> dict:
    return {
        "task": name,
        "dataset_path": "data.jsonl",
        "output_type": "loss",
        "doc_to_text": "{{ question }} =",
        "doc_to_target": "answer",
        **overrides,
    }


@pytest.fixture
def data_dir(tmp_path) -> Path:
    write_jsonl(tmp_path / "data.jsonl", make_records(12, seed=3))
    return tmp_path


# ---- the suite format and its errors ------------------------------------------------------------


def one_line_error(exc_info, *needles):
    message = str(exc_info.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message
    return message


def test_suite_loads_with_lm_eval_words(data_dir):
    path = write_suite(data_dir, [
        task("loss"),
        task("gen", output_type="generate_until", generation_kwargs={"until": ["\n"], "max_gen_toks": 4},
             metric_list=[{"metric": "exact_match"}, {"metric": "regex", "regex_pattern": r"(\d+)"}], limit=5),
        task("mc", output_type="multiple_choice", doc_to_choice="{{ [answer, '99'] }}", weight=2,
             metric_list=[{"metric": "acc"}, {"metric": "acc_norm"}]),
    ])
    suite = load_suite(path)
    assert suite.task_names == ["loss", "gen", "mc"] and suite.seed == 7
    assert len(suite.docs("loss")) == 12


@pytest.mark.parametrize("tasks, needles", [
    ([task(outptu_type="loss")], ["tasks.0.outptu_type", "unknown key"]),
    ([], ["empty"]),
    ([task(dataset_path="nope.jsonl")], ["nope.jsonl", "does not exist"]),
    ([task(doc_to_text="{{ quesiton }}")], ["task 't'", "doc_to_text", "'quesiton'", "fields: answer, question"]),
    ([task(doc_to_target="anwser")], ["task 't'", "doc_to_target", "'anwser'"]),
    ([task(output_type="generate_until", metric_list=[{"metric": "acc"}])], ["'acc'", "generate_until"]),
    ([task(output_type="generate_until", metric_list=[{"metric": "regex"}])], ["regex_pattern"]),
    ([task(output_type="multiple_choice")], ["doc_to_choice"]),
    ([task(), task()], ["appears twice"]),
    ([task(num_fewshot=50)], ["num_fewshot 50"]),
])
def test_bad_suites_fail_up_front_in_one_line(data_dir, tasks, needles):
    with pytest.raises(ConfigError) as exc_info:
        load_suite(write_suite(data_dir, tasks))
    one_line_error(exc_info, *needles)


def test_malformed_jsonl_names_file_and_line(tmp_path):
    (tmp_path / "data.jsonl").write_text('{"question": "a", "answer": "b"}\n{"question": "a", answer}\n')
    with pytest.raises(EvomergeError) as exc_info:
        load_suite(write_suite(tmp_path, [task()]))
    one_line_error(exc_info, "data.jsonl:2", "not valid JSON")


def test_missing_suite_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_suite(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("tasks: [\n")
    with pytest.raises(ConfigError) as exc_info:
        load_suite(tmp_path / "bad.yaml")
    one_line_error(exc_info, "not valid YAML")


def test_committed_suites_load():
    root = Path(__file__).resolve().parent.parent / "evaluators"
    for path in sorted(root.glob("*.yaml")):
        suite = load_suite(path)
        assert suite.tasks, path
    for name in ("zoo-loss", "zoo-generate"):  # one file each, two splits
        validation, test = load_suite(name), load_suite(f"{name}:test")
        assert (validation.split, test.split) == ("validation", "test")
        assert [t.dataset_path for t in test.tasks] == [f"data/{t}/test.jsonl" for t in test.task_names]
        assert all(validation.docs(t) != test.docs(t) for t in test.task_names)


# ---- defaults and splits ------------------------------------------------------------------------


@pytest.fixture
def split_dir(tmp_path) -> Path:
    """data/{validation,test}.jsonl with different records, and a suite over them with defaults."""
    write_jsonl(tmp_path / "data" / "validation.jsonl", make_records(12, seed=3))
    write_jsonl(tmp_path / "data" / "test.jsonl", make_records(9, seed=4))
    write_suite(tmp_path, [{"task": "gen", "dataset_path": "data/{split}.jsonl"},
                           {"task": "loss", "dataset_path": "data/{split}.jsonl", "output_type": "loss", "limit": 5}],
                split="validation", defaults={"output_type": "generate_until", "doc_to_text": "{{ question }} =",
                                              "doc_to_target": "answer", "limit": 3})
    return tmp_path


def test_defaults_are_merged_under_every_task_and_its_own_keys_win(split_dir):
    suite = load_suite(split_dir / "suite.yaml")
    gen, loss = suite.tasks
    assert (gen.output_type, gen.limit, gen.doc_to_target) == ("generate_until", 3, "answer")
    assert (loss.output_type, loss.limit, loss.doc_to_target) == ("loss", 5, "answer")


def test_a_split_is_picked_by_the_suite_by_argument_or_by_name(split_dir):
    path = split_dir / "suite.yaml"
    default, test = load_suite(path), load_suite(path, split="test")
    assert default.split == "validation" and len(default.docs("gen")) == 12
    assert test.split == "test" and len(test.docs("gen")) == 9 and test.tasks[0].dataset_path == "data/test.jsonl"
    by_name = load_suite(f"{path}:test")
    assert by_name.split == "test" and by_name.docs("gen") == test.docs("gen")
    assert load_suite(f"{path}:test", split="test").docs("loss") == test.docs("loss")
    assert load_suite("zoo-loss:test").split == "test"  # a shipped suite's name too


def test_a_search_config_names_the_split_after_its_suite(split_dir, tmp_path_factory, monkeypatch):
    """`suite: suite.yaml:test` in a config is the config's neighbour on its test split, from anywhere."""
    from evomerge.config import _resolve_suite

    resolved = _resolve_suite("suite.yaml:test", split_dir)
    assert resolved == f"{(split_dir / 'suite.yaml').resolve()}:test"
    assert _resolve_suite("zoo-loss:test", split_dir) == "zoo-loss:test"  # a shipped name stays a name
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    assert load_suite(resolved).docs("gen") == load_suite(split_dir / "suite.yaml", split="test").docs("gen")


@pytest.mark.parametrize("change, needles", [
    ({"defaults": {"outptu_type": "loss"}}, ["suite.yaml", "defaults.outptu_type: unknown key"]),
    ({"defaults": {"task": "x"}}, ["suite.yaml", "defaults.task"]),
    ({"defaults": ["output_type"]}, ["suite.yaml", "defaults: expected a mapping"]),
    ({"splt": "test"}, ["suite.yaml", "splt: unknown key"]),
    ({"split": None}, ["suite.yaml", "holds {split}", "set `split:`"]),
])
def test_bad_defaults_and_splits_fail_in_one_line_naming_file_and_key(split_dir, change, needles):
    raw = yaml.safe_load((split_dir / "suite.yaml").read_text())
    path = split_dir / "suite.yaml"
    path.write_text(yaml.safe_dump({**raw, **change}))
    with pytest.raises(ConfigError) as exc_info:
        load_suite(path)
    one_line_error(exc_info, *needles)


def test_an_unknown_or_pointless_split_fails_in_one_line(split_dir, data_dir):
    path = split_dir / "suite.yaml"
    with pytest.raises(ConfigError) as exc_info:
        load_suite(path, split="tset")
    one_line_error(exc_info, "task 'gen'", "data/tset.jsonl", "(split 'tset') does not exist")
    with pytest.raises(ConfigError) as exc_info:
        load_suite(f"{path}:test", split="validation")
    one_line_error(exc_info, "two splits", "'test'", "'validation'")
    with pytest.raises(ConfigError) as exc_info:  # a suite without {split}: asking for one is a mistake
        load_suite(write_suite(data_dir / "plain", [task(dataset_path="../data.jsonl")]), split="test")
    one_line_error(exc_info, "split 'test' asked for", "no dataset_path holds {split}")
    with pytest.raises(ConfigError, match=r"add/tset.jsonl \(split 'tset'\) does not exist"):
        load_suite("zoo-loss:tset")
    with pytest.raises(ConfigError, match="suite zoo-lost:test does not exist"):
        load_suite("zoo-lost:test")


# ---- metrics ------------------------------------------------------------------------------------


def test_stop_and_regex():
    assert cut_at_stop(" 42\nQ: next", ["\n"]) == " 42"
    assert cut_at_stop("abc", []) == "abc"
    assert extract_regex("so the answer is 17.", r"answer is (\d+)") == "17"
    assert extract_regex("nothing", r"(\d+)") == "[invalid]"


class FakeBackend(Backend):
    """Deterministic backend: logprob -1 per char of continuation, -0.5 if it contains the answer 'x'."""

    name = "fake"

    def __init__(self, generations=None):
        self.generations = generations or {}

    def loglikelihood(self, requests):
        return [(-0.5 * len(c) if "good" in c else -1.0 * len(c), len(c), "good" in c) for _, c in requests]

    def generate_until(self, requests):
        return [self.generations.get(context, " wrong\nmore") for context, _ in requests]


def test_evaluate_orients_and_weights_scores(tmp_path):
    records = [{"question": f"q{i}", "answer": "good" if i % 2 else "bad", "choices": ["good", "bad"]}
               for i in range(10)]
    write_jsonl(tmp_path / "data.jsonl", records)
    suite = load_suite(write_suite(tmp_path, [
        task("loss", doc_to_text="question", target_delimiter=""),
        task("mc", output_type="multiple_choice", doc_to_text="question", doc_to_choice="choices", weight=3,
             metric_list=[{"metric": "acc"}, {"metric": "acc_norm"}]),
        task("gen", output_type="generate_until", doc_to_text="question", limit=4,
             metric_list=[{"metric": "exact_match"}, {"metric": "contains"}]),
    ]))
    generations = {"q1": " good \n junk", "q3": "good", "q5": "very good"}
    result = evaluate(suite, FakeBackend(generations), keep_samples=True)
    # loss: token-weighted mean CE; 5 "good" (4 chars, -2 each) and 5 "bad" (3 chars, -3 each)
    assert result.tasks["loss"].metrics["loss"] == pytest.approx((5 * 2 + 5 * 3) / (5 * 4 + 5 * 3))
    assert result.tasks["loss"].score == -result.tasks["loss"].metrics["loss"]
    # mc: " good" always wins (-2.5 vs -4): right on the 5 odd docs
    assert result.tasks["mc"].metrics == {"acc": 0.5, "acc_norm": 0.5}
    gen = result.tasks["gen"]
    assert gen.n == 4
    from evomerge.evaluator import build_requests

    chosen = build_requests(suite, suite.tasks[2]).doc_indices
    texts = [cut_at_stop(generations.get(f"q{i}", " wrong\nmore"), ["\n"]) for i in chosen]
    answers = [records[i]["answer"] for i in chosen]
    assert gen.metrics["exact_match"] == sum(t.strip() == a for t, a in zip(texts, answers)) / 4
    assert gen.metrics["contains"] == sum(a in t for t, a in zip(texts, answers)) / 4
    assert [s["generation"] for s in gen.samples] == texts
    scores = result.scores
    assert result.scalar == pytest.approx((scores["loss"] + 3 * scores["mc"] + scores["gen"]) / 5)
    assert json.loads(json.dumps(result.to_dict()))["scores"] == scores



class _GenerateOnly(FakeBackend):
    """Declares no log-likelihoods and no chat template (like a chat-only endpoint)."""

    name = "generate-only"
    loglikelihoods = False
    chat_template = False

    def __init__(self):
        super().__init__()
        self.generated: list[tuple[str, dict]] = []

    def loglikelihood(self, requests):
        raise AssertionError("evaluate asked a backend that declares no log-likelihoods for them")

    def generate_until(self, requests):
        self.generated.extend(requests)
        return super().generate_until(requests)


def test_evaluate_follows_what_the_backend_declares(data_dir):
    """A loss task on a backend that declares no log-likelihoods is one line before any work; a
    chat task on one without a chat template of its own is sent as chat (the endpoint renders it)."""
    backend = _GenerateOnly()
    suite = load_suite(write_suite(data_dir, [task("gen", output_type="generate_until", limit=2), task("loss")]))
    with pytest.raises(ConfigError, match="task 'loss': output_type 'loss' needs log-likelihoods, which "
                                          "backend 'generate-only' does not give"):
        evaluate(suite, backend)
    assert backend.generated == []  # refused before the generation task ran
    chat = load_suite(write_suite(data_dir, [task("gen", output_type="generate_until", limit=2,
                                                  apply_chat_template=True)]))
    evaluate(chat, backend)
    assert backend.generated and all(kwargs.get("chat") for _, kwargs in backend.generated)
    assert all(context.endswith(" =") for context, _ in backend.generated)  # not rendered here


def test_limit_and_fewshot_are_seeded(tmp_path):
    write_jsonl(tmp_path / "data.jsonl", make_records(30, seed=1))
    spec = [task(limit=6, num_fewshot=2, output_type="generate_until")]
    from evomerge.evaluator import build_requests

    def contexts(seed):
        suite = suite_from_dict({"seed": seed, "tasks": spec}, base_dir=tmp_path)
        requests = build_requests(suite, suite.tasks[0])
        return requests.doc_indices, [c for c, _ in requests.generate]

    first, again, other = contexts(1), contexts(1), contexts(2)
    assert first == again and first != other
    indices, prompts = first
    docs = make_records(30, seed=1)
    for index, prompt in zip(indices, prompts):
        assert prompt.count(" =") == 3 and prompt.endswith(f"{docs[index]['question']} =")
        # the doc itself is never its own example
        assert prompt.count(docs[index]["question"]) == 1 or docs.count(docs[index]) > 1


# ---- the hf backend -----------------------------------------------------------------------------


def reference_loglikelihood(backend, context, continuation):
    """Unbatched, unpadded: the plain definition."""
    from evomerge.backends import encode_pair

    ctx, cont = encode_pair(backend.tokenizer, context, continuation)
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logprobs = backend.model(ids).logits[0].float().log_softmax(-1)
    picked = [logprobs[len(ctx) - 1 + i, t] for i, t in enumerate(cont)]
    greedy = all(int(logprobs[len(ctx) - 1 + i].argmax()) == t for i, t in enumerate(cont))
    return float(sum(picked)), len(cont), greedy


def test_hf_tokenizes_the_lm_eval_way(hf_backend):
    from evomerge.backends import encode_pair

    tokenizer = hf_backend.tokenizer
    ctx, cont = encode_pair(tokenizer, "add 1+2 = ", "3")
    assert ctx[0] == tokenizer.bos_token_id  # BOS stays with the context
    assert tokenizer.bos_token_id not in cont
    assert tokenizer.decode(cont) == " 3"  # the trailing space moved to the continuation


def test_hf_batched_loglikelihood_matches_reference(hf_backend):
    requests = [(f"{r['question']} =", " " + r["answer"]) for r in make_records(7, seed=5)]
    requests.append(("short", " and a much longer continuation than the others"))
    got = hf_backend.loglikelihood(requests)
    for request, (logprob, n, greedy) in zip(requests, got):
        ref = reference_loglikelihood(hf_backend, *request)
        assert n == ref[1] and greedy == ref[2]
        assert logprob == pytest.approx(ref[0], rel=1e-5, abs=1e-5)


def test_hf_batched_generation_matches_one_by_one(hf_backend):
    requests = [(f"{r['question']} =", {"until": ["\n"], "max_gen_toks": 6}) for r in make_records(5, 6)]
    requests.append(("x", {"until": [], "max_gen_toks": 3}))
    batched = hf_backend.generate_until(requests)
    single = [hf_backend.generate_until([r])[0] for r in requests]
    assert batched == single
    assert all("\n" not in text for text in batched[:-1])


def test_hf_rescores_in_place_weight_swap_without_reloading(model_dir, tmp_path, monkeypatch):
    from evomerge.backends.hf import HFBackend

    write_jsonl(tmp_path / "data.jsonl", make_records(10, seed=8))
    suite = load_suite(write_suite(tmp_path, [task(), task("gen", output_type="generate_until",
                                                            generation_kwargs={"max_gen_toks": 4})]))
    backend = HFBackend(model_dir, batch_size=3, num_threads=1)
    before = evaluate(suite, backend)

    calls = {"n": 0}
    original = type(backend.tokenizer).__call__

    def counting(self, *args, **kwargs):
        calls["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(backend.tokenizer), "__call__", counting)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in backend.model.parameters():
            param.data.copy_(param.data + 0.05 * torch.randn(param.shape, generator=generator))
    after = evaluate(suite, backend)
    assert calls["n"] == 0, "a re-score after a weight swap must not tokenize again"
    assert after.scores["t"] != before.scores["t"]

    # the same weights loaded from disk score the same
    saved = tmp_path / "swapped"
    backend.model.save_pretrained(saved)
    backend.tokenizer.save_pretrained(saved)
    monkeypatch.undo()
    fresh = evaluate(suite, HFBackend(saved, batch_size=5, num_threads=1))
    assert fresh.scores["t"] == pytest.approx(after.scores["t"], rel=1e-5)
    assert fresh.tasks["gen"].metrics == after.tasks["gen"].metrics

    # update_weights is the same swap by name
    state = {k: v.clone() for k, v in HFBackend(model_dir, num_threads=1).model.state_dict().items()}
    backend.update_weights(state.items())
    assert evaluate(suite, backend).scores["t"] == pytest.approx(before.scores["t"], rel=1e-6)


def test_hf_chat_template_and_bad_inputs(hf_backend, model_dir):
    from evomerge.backends.hf import HFBackend

    tokenizer = copy.deepcopy(hf_backend.tokenizer)
    tokenizer.chat_template = "{% for m in messages %}<s>{{ m['content'] }}\n{% endfor %}"
    chat = HFBackend(hf_backend.model, tokenizer)
    assert chat.model is hf_backend.model
    assert chat.apply_chat_template("add 1+2 =") == "add 1+2 =\n"  # <s> comes back at encoding
    with pytest.raises(EvomergeError, match="no chat template"):
        hf_backend.apply_chat_template("hi")
    with pytest.raises(EvomergeError, match="no config.json"):
        HFBackend(model_dir.parent / "nope")
    if not torch.cuda.is_available():
        with pytest.raises(EvomergeError, match="no CUDA"):
            HFBackend(model_dir, device="cuda")


# ---- the eval command ---------------------------------------------------------------------------


def test_eval_command_prints_table_and_writes_json(model_dir, data_dir):
    from typer.testing import CliRunner

    from evomerge.cli import app

    suite = write_suite(data_dir, [task(), task("gen", output_type="generate_until",
                                                generation_kwargs={"max_gen_toks": 3})])
    out = data_dir / "out.json"
    result = CliRunner().invoke(app, ["eval", str(model_dir), "--suite", str(suite), "--limit", "3",
                                      "--batch-size", "2", "--output", str(out)])
    assert result.exit_code == 0, result.output
    payload = json.loads(out.read_text())
    assert set(payload["scores"]) == {"t", "gen"} and payload["tasks"]["t"]["n"] == 3
    assert math.isfinite(payload["scalar"])

    bad = write_suite(data_dir / "bad", [task(doc_to_text="{{ nope }}", dataset_path="../data.jsonl")])
    result = CliRunner().invoke(app, ["eval", str(model_dir), "--suite", str(bad)])
    assert result.exit_code == 2
    assert "'nope'" in result.output


def test_eval_command_picks_the_split(model_dir, split_dir):
    from typer.testing import CliRunner

    from evomerge.cli import app

    out = split_dir / "out.json"
    result = CliRunner().invoke(app, ["eval", str(model_dir), "--suite", str(split_dir / "suite.yaml"),
                                      "--split", "test", "--limit", "2", "--output", str(out)])
    assert result.exit_code == 0, result.output
    payload = json.loads(out.read_text())
    assert payload["split"] == "test" and payload["tasks"]["loss"]["n"] == 2
    result = CliRunner().invoke(app, ["eval", str(model_dir), "--suite", str(split_dir / "suite.yaml"),
                                      "--split", "tset"])
    assert result.exit_code == 2 and "(split 'tset') does not exist" in result.output


# ---- the demo zoo's suites ----------------------------------------------------------------------


def test_zoo_suites_reproduce_the_zoo_scores(tiny_zoo):
    """zoo-loss = the zoo's val_loss (answer tokens), zoo-generate:test = its greedy test_acc."""
    zoo = tiny_zoo
    from evomerge.backends.hf import HFBackend

    root = Path(__file__).resolve().parent.parent / "evaluators"
    expected = json.loads((zoo / "scores.json").read_text())["scores"]["base"]
    backend = HFBackend(zoo / "base", batch_size=64, num_threads=1)
    loss = evaluate(load_suite(root / "zoo-loss.yaml"), backend).scores
    accuracy = evaluate(load_suite(root / "zoo-generate.yaml", split="test"), backend).scores
    for task, scores in expected.items():
        assert -loss[task] == pytest.approx(scores["val_loss"], abs=1e-3), task
        assert accuracy[task] == pytest.approx(scores["test_acc"], abs=1e-9), task


# ---- a worker prepares its suite once ----------------------------------------------------------


@pytest.fixture(scope="module")
def worker_suite(tmp_path_factory) -> Path:
    """A small few-shot suite of the demo zoo's data: a loss task and a generation task."""
    data = Path(__file__).resolve().parent.parent / "evaluators" / "data"
    return write_suite(tmp_path_factory.mktemp("worker-suite"), [
        task("loss", dataset_path=str(data / "add" / "validation.jsonl"), doc_to_text="question",
             target_delimiter="", num_fewshot=2, limit=6),
        task("gen", dataset_path=str(data / "upper" / "validation.jsonl"), doc_to_text="question",
             output_type="generate_until", target_delimiter="", num_fewshot=1, limit=3,
             generation_kwargs={"until": ["\n"], "max_gen_toks": 6}),
    ])


def _worker(tiny_zoo, suite: Path):
    """A Worker as a search builds it, on the tiny zoo's full pool."""
    from evomerge.config import resolve_pool_spec
    from evomerge.worker import Worker

    return Worker(resolve_pool_spec("pool-full.yaml", tiny_zoo, "zoo"), str(suite), {"name": "hf", "batch_size": 16},
                  threads=1)


@pytest.fixture(scope="module")
def zoo_worker(tiny_zoo, worker_suite):
    return _worker(tiny_zoo, worker_suite), worker_suite


def _recipe(experts, weight):
    return {"method": "task_arithmetic", "experts": {name: {"weight": weight} for name in experts}}


def test_a_worker_builds_its_requests_and_few_shot_contexts_once(tiny_zoo, worker_suite, monkeypatch):
    """A search scores every candidate on the suite the worker loaded: the prompts and few-shot
    contexts are built once, not once per candidate."""
    import evomerge.evaluator as evaluator

    built = []
    context = evaluator._context

    def counting(task, suite, index, doc):
        built.append((task.task, index))
        return context(task, suite, index, doc)

    monkeypatch.setattr(evaluator, "_context", counting)
    worker = _worker(tiny_zoo, worker_suite)
    sent = []
    loglikelihood = worker.backend.loglikelihood
    monkeypatch.setattr(worker.backend, "loglikelihood", lambda requests: sent.append(requests) or loglikelihood(requests))
    for weight in (0.1, 0.3, 0.5):
        assert worker.evaluate(_recipe(worker.pool.names, weight))["status"] == "ok"
    assert len(built) == 6 + 3, f"{len(built)} contexts built for 9 docs and 3 candidates"
    assert len(sent) == 3 and sent[0] is sent[1] is sent[2]  # the same requests, not equal copies


def test_prepared_requests_score_as_requests_built_afresh(zoo_worker):
    """Reusing the requests changes no score: a candidate scores the same before and after another,
    and the same as a suite loaded and evaluated from scratch, bit for bit."""
    worker, suite_path = zoo_worker
    names = worker.pool.names
    first, other, again = (worker.evaluate(_recipe(names, w)) for w in (0.4, -0.2, 0.4))
    assert first["status"] == other["status"] == again["status"] == "ok"
    assert first["scores"] == again["scores"] and first["scalar"] == again["scalar"]
    assert other["scores"] != first["scores"]
    fresh = evaluate(load_suite(suite_path), worker.backend)  # the backend holds the last candidate
    assert fresh.scores == again["scores"] and fresh.scalar == again["scalar"]
