"""Evaluator: a suite (evomerge/suite.py) scored through a backend.

Scores are oriented higher-is-better: a task's score is its first metric, negated where lower is
better (loss -> score = -mean cross-entropy per continuation token). The suite's scalar is the
weight-averaged task score.

    suite = load_suite("zoo-loss")                  # or "zoo-loss:test", split="test"
    backend = build_backend("hf", model="zoo/base")
    result = evaluate(suite, backend)      # SuiteResult: .scores, .scalar, .tasks[name].metrics
    prepared = PreparedSuite(suite, backend)  # requests built once: a worker's many candidates
    result = prepared.evaluate()
"""

from __future__ import annotations

import math
import random
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

from evomerge.errors import ConfigError
from evomerge.suite import (  # noqa: F401 - the suite's names, importable from here as before
    LOWER_IS_BETTER,
    METRICS_FOR,
    GenerationKwargs,
    MetricName,
    MetricSpec,
    OutputType,
    Suite,
    TaskConfig,
    _choices,
    _target_index,
    load_suite,
    read_jsonl,
    read_jsonl_lines,
    render,
    suite_from_dict,
)


# ---- requests -----------------------------------------------------------------------------------


def _subsample(n: int, limit: Optional[int], seed: int, task: str) -> list[int]:
    if limit is None or limit >= n:
        return list(range(n))
    return sorted(random.Random(f"{seed}/{task}/limit").sample(range(n), limit))


def _context(task: TaskConfig, suite: Suite, index: int, doc: dict) -> str:
    parts = []
    if task.num_fewshot:
        pool = suite._fewshot[task.task]
        candidates = range(len(pool)) if task.fewshot_path else [i for i in range(len(pool)) if i != index]
        rng = random.Random(f"{suite.seed}/{task.task}/fewshot/{index}")
        for i in rng.sample(list(candidates), task.num_fewshot):
            shot = pool[i]
            if task.output_type == "multiple_choice":
                target = _choices(task, shot)[_target_index(task, shot)]
            else:
                target = str(render(task.doc_to_target, shot))
            parts.append(str(render(task.doc_to_text, shot)) + task.target_delimiter + target)
    parts.append(str(render(task.doc_to_text, doc)))
    return task.description + task.fewshot_delimiter.join(parts)


@dataclass
class TaskRequests:
    """What one task asks of a backend, built once per (suite, task, chat formatter)."""

    task: TaskConfig
    doc_indices: list[int]
    loglikelihood: list[tuple[str, str]] = field(default_factory=list)
    generate: list[tuple[str, dict]] = field(default_factory=list)
    targets: list[Any] = field(default_factory=list)  # str (loss/generate) or (index, choices) for MC
    spans: list[tuple[int, int]] = field(default_factory=list)  # MC: request slice per doc


def build_requests(
    suite: Suite, task: TaskConfig, chat: Optional[Callable[[str], str]] = None
) -> TaskRequests:
    docs = suite.docs(task.task)
    indices = _subsample(len(docs), task.limit, suite.seed, task.task)
    out = TaskRequests(task=task, doc_indices=indices)
    for index in indices:
        doc = docs[index]
        context = _context(task, suite, index, doc)
        delimiter = task.target_delimiter
        if task.apply_chat_template and chat is not None:
            context, delimiter = chat(context), ""
        if task.output_type == "loss":
            target = str(render(task.doc_to_target, doc))
            out.loglikelihood.append((context, delimiter + target))
            out.targets.append(target)
        elif task.output_type == "multiple_choice":
            choices = _choices(task, doc)
            start = len(out.loglikelihood)
            out.loglikelihood.extend((context, delimiter + c) for c in choices)
            out.spans.append((start, len(out.loglikelihood)))
            out.targets.append((_target_index(task, doc), choices))
        else:
            kwargs = task.generation_kwargs.model_dump()
            if task.apply_chat_template and chat is None:
                kwargs["chat"] = True  # the backend formats it (e.g. a chat endpoint)
            out.generate.append((context, kwargs))
            out.targets.append(str(render(task.doc_to_target, doc)))
    return out


# ---- metrics ------------------------------------------------------------------------------------


def cut_at_stop(text: str, until: list[str]) -> str:
    """Cut a generation at the first stop string (what lm-eval does after generation)."""
    cut = len(text)
    for stop in until:
        if stop:
            position = text.find(stop)
            if position != -1:
                cut = min(cut, position)
    return text[:cut]


def extract_regex(text: str, pattern: str) -> str:
    match = re.search(pattern, text)
    if match is None:
        return "[invalid]"
    return (match.group(1) if match.groups() else match.group(0)).strip()


def score_generation(spec: MetricSpec, generation: str, target: str) -> float:
    prediction, gold = generation.strip(), target.strip()
    if spec.metric == "regex":
        prediction = extract_regex(generation, spec.regex_pattern)
    if spec.ignore_case:
        prediction, gold = prediction.lower(), gold.lower()
    if spec.metric == "contains":
        return float(gold in prediction)
    return float(prediction == gold)


# ---- evaluation ---------------------------------------------------------------------------------


@dataclass
class TaskResult:
    task: str
    output_type: str
    metrics: dict[str, float]  # raw values, lm-eval orientation (loss: lower is better)
    score: float  # first metric, higher is better (loss -> -loss)
    n: int  # docs scored
    weight: float
    seconds: float
    samples: list[dict] = field(default_factory=list, repr=False)  # per-doc outputs, if asked


@dataclass
class SuiteResult:
    tasks: dict[str, TaskResult]
    scalar: float  # weighted mean of the task scores, higher is better
    seconds: float  # wall time of the whole evaluation
    backend: str = ""

    @property
    def scores(self) -> dict[str, float]:
        return {name: result.score for name, result in self.tasks.items()}

    def to_dict(self) -> dict:
        return {
            "scalar": self.scalar,
            "scores": self.scores,
            "seconds": self.seconds,
            "backend": self.backend,
            "tasks": {name: asdict(result) for name, result in self.tasks.items()},
            "note": "scores are higher-is-better: a loss task scores -(mean cross-entropy per token)",
        }


def _score_loss(requests: TaskRequests, outputs) -> tuple[dict[str, float], list[dict]]:
    total_logprob = sum(logprob for logprob, _, _ in outputs)
    total_tokens = sum(n for _, n, _ in outputs)
    loss = -total_logprob / max(total_tokens, 1)
    samples = [{"logprob": lp, "tokens": n, "greedy": g} for lp, n, g in outputs]
    return {"loss": loss}, samples


def _score_choice(requests: TaskRequests, outputs) -> tuple[dict[str, float], list[dict]]:
    hits = {spec.metric: 0.0 for spec in requests.task.metrics}
    samples = []
    for (start, end), (gold, choices) in zip(requests.spans, requests.targets):
        logprobs = [outputs[i][0] for i in range(start, end)]
        predicted = max(range(len(logprobs)), key=logprobs.__getitem__)
        normed = [lp / max(len((requests.task.target_delimiter + c).encode()), 1) for lp, c in zip(logprobs, choices)]
        predicted_norm = max(range(len(normed)), key=normed.__getitem__)
        if "acc" in hits:
            hits["acc"] += predicted == gold
        if "acc_norm" in hits:
            hits["acc_norm"] += predicted_norm == gold
        samples.append({"logprobs": logprobs, "gold": gold, "predicted": predicted})
    n = max(len(requests.spans), 1)
    return {name: value / n for name, value in hits.items()}, samples


def _score_generate(requests: TaskRequests, outputs: list[str]) -> tuple[dict[str, float], list[dict]]:
    until = requests.task.generation_kwargs.until
    generations = [cut_at_stop(text, until) for text in outputs]
    metrics = {}
    for spec in requests.task.metrics:
        values = [score_generation(spec, g, t) for g, t in zip(generations, requests.targets)]
        metrics[spec.metric] = sum(values) / max(len(values), 1)
    samples = [{"generation": g, "target": t} for g, t in zip(generations, requests.targets)]
    return metrics, samples


class PreparedSuite:
    """A suite's requests built once for one backend (lm-eval's build_all_requests): a Worker
    prepares its suite when it starts and scores every candidate with `evaluate()`. What it asks
    depends on the suite and the backend's chat template, never on the weights it scores."""

    def __init__(self, suite: Suite, backend):
        chat = backend.apply_chat_template if backend.chat_template else None  # declared (evomerge.backends)
        for task in suite.tasks:
            if task.apply_chat_template and chat is None and task.output_type != "generate_until":
                raise ConfigError(
                    f"task {task.task!r}: apply_chat_template with output_type {task.output_type!r} needs"
                    f" a backend that holds the tokenizer (hf, vllm); {backend.name!r} can only chat-generate"
                )
            if task.output_type != "generate_until" and not backend.loglikelihoods:
                raise ConfigError(f"task {task.task!r}: output_type {task.output_type!r} needs log-likelihoods, "
                                  f"which backend {backend.name!r} does not give; use hf or vllm")
        # e.g. does the endpoint return prompt logprobs? (before any real work)
        backend.check({task.output_type for task in suite.tasks})
        self.suite, self.backend = suite, backend
        self.requests = {task.task: build_requests(suite, task, chat if task.apply_chat_template else None)
                         for task in suite.tasks}

    def evaluate(self, *, keep_samples: bool = False) -> SuiteResult:
        """Score every task through the backend as its weights are now; scores are higher-is-better."""
        started = time.perf_counter()
        results: dict[str, TaskResult] = {}
        for task in self.suite.tasks:
            task_started = time.perf_counter()
            requests = self.requests[task.task]
            self.backend.begin_task(task.task)
            if task.output_type == "generate_until":
                metrics, samples = _score_generate(requests, self.backend.generate_until(requests.generate))
            else:
                outputs = self.backend.loglikelihood(requests.loglikelihood)
                scorer = _score_loss if task.output_type == "loss" else _score_choice
                metrics, samples = scorer(requests, outputs)
            primary = task.metrics[0].metric
            value = metrics[primary]
            score = -value if primary in LOWER_IS_BETTER else value
            if not math.isfinite(score):
                score = -math.inf
            results[task.task] = TaskResult(
                task=task.task,
                output_type=task.output_type,
                metrics=metrics,
                score=score,
                n=len(requests.doc_indices),
                weight=task.weight,
                seconds=time.perf_counter() - task_started,
                samples=samples if keep_samples else [],
            )
        total_weight = sum(r.weight for r in results.values())
        scalar = sum(r.weight * r.score for r in results.values()) / total_weight
        return SuiteResult(
            tasks=results,
            scalar=scalar,
            seconds=time.perf_counter() - started,
            backend=self.backend.name,
        )


def evaluate(suite: Suite, backend, *, keep_samples: bool = False) -> SuiteResult:
    """Score every task of `suite` through `backend` once; scores are higher-is-better. To score
    many weights through one backend, prepare the suite once (`PreparedSuite`), as a Worker does."""
    return PreparedSuite(suite, backend).evaluate(keep_samples=keep_samples)
