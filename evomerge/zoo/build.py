"""Building the demo zoo: the base pre-trained until it copies, then per task a full fine-tune and
a LoRA adapter, scored, checked to be mergeable, and written in one rename (see evomerge/zoo)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from pathlib import Path

import torch

from evomerge.errors import EvomergeError
from evomerge.materialize import merge_state_dict
from evomerge.pool import Pool
from evomerge.recipe import Recipe
from evomerge.zoo.model import SIZES, ZooSize, build_model, build_tokenizer, greedy_answers, save_model, score, train
from evomerge.zoo.tasks import PRETRAIN_MIX, TASKS, eval_splits, train_records, write_data

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ZOO_FORMAT = 4  # 2: copy pre-training, replay while fine-tuning, average rows; 3: fixed-length copy, base
# trained until it copies; 4: tiny has 2 heads (head dim 32: vLLM's CPU attention has no kernel for 16)
BASE_COPY_TARGET = 0.95  # exact match on held-out `copy` questions the base must reach
BASE_EXTRA_ROUNDS = 3  # at most this many more half-schedules of pre-training to reach it
MERGEABLE_MARGIN = 0.25  # nats: how clearly the zoo's checks must hold (not on the edge)


# ---- the zoo --------------------------------------------------------------------------------


@contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _progress(enabled: bool):
    if not enabled:
        return nullcontext(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description:<14}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), transient=False)


def _existing(out: Path, size: str, seed: int) -> dict | None:
    """The scores of a complete zoo of this size and seed at `out`; None if `out` is free."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return None
    scores = out / "scores.json"
    if scores.is_file():
        table = json.loads(scores.read_text())
        meta = table.get("meta", {})
        if meta.get("format") != ZOO_FORMAT:
            raise EvomergeError(f"{out} holds a zoo of an older format ({meta.get('format')}, now {ZOO_FORMAT}); "
                                "delete it and build again")
        if meta.get("size") != size or meta.get("seed") != seed:
            raise EvomergeError(
                f"{out} already holds a zoo built with size={meta.get('size')!r} seed={meta.get('seed')!r}; "
                f"delete it or choose another directory to build size={size!r} seed={seed!r}")
        if meta.get("spec") != asdict(SIZES[size]):
            raise EvomergeError(f"{out} holds a {size} zoo built with another schedule ({meta.get('spec')}); "
                                "delete it and build again")
        return table
    raise EvomergeError(f"{out} exists and is not a complete zoo; delete it or choose another directory")


def _write_pool(path: Path, kind: str) -> None:
    lines = ["# written by `evomerge zoo`; paths are relative to this file", "base: base", "experts:"]
    lines += [f"  {task}: {kind}/{task}" for task in TASKS]
    path.write_text("\n".join(lines) + "\n")


def build_zoo(out: Path, size: str = "small", seed: int = 0, progress: bool = True) -> dict:
    """Build the demo zoo into `out` (see the module docstring); returns the scores table.

    Deterministic given size and seed (on one machine and torch version). A complete zoo of the
    same size and seed already at `out` is reused; anything else already at `out` is an error.
    """
    if size not in SIZES:
        raise EvomergeError(f"unknown zoo size {size!r}; available: {', '.join(SIZES)}")
    out = Path(out)
    if (table := _existing(out, size, seed)) is not None:
        return table
    out.parent.mkdir(parents=True, exist_ok=True)
    spec = SIZES[size]
    tasks = list(TASKS)
    splits = {task: eval_splits(task) for task in tasks}
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a zoo is for sharing
    try:
        # One thread: these models are too small to gain from intra-op threads, and on a busy
        # 2-core machine two threads made each step several times slower (and timings erratic).
        with _threads(1), _progress(progress) as bars:
            scores, pretraining = _build(tmp, out.resolve(), spec, tasks, splits, seed, bars)
        table = {
            "meta": {"format": ZOO_FORMAT, "size": size, "seed": seed, "tasks": tasks,
                     "spec": asdict(spec), "base_pretraining": pretraining, "seconds": round(time.perf_counter() - started, 1),
                     "val_loss": "mean cross-entropy (nats/token) of the answer tokens, validation split",
                     "test_acc": "greedy exact match of the answer (up to the newline), test split"},
            "scores": scores,
        }
        (tmp / "scores.json").write_text(json.dumps(table, indent=2) + "\n")
        if out.exists():  # an empty directory (checked by _existing)
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        from transformers.utils import logging as hf_logging

        hf_logging.enable_progress_bar()  # _build turned it off
    if progress:
        from rich.console import Console
        from rich.markdown import Markdown

        Console().print(Markdown(scores_markdown(table)))
        Console().print(f"zoo written to {out} in {table['meta']['seconds']:.0f}s")
    return table


def scores_markdown(table: dict) -> str:
    """The scores table as Markdown: one row per model, per task "val loss / test accuracy"."""
    tasks = table["meta"]["tasks"]
    lines = ["| model | " + " | ".join(tasks) + " | mean |", "|---" * (len(tasks) + 2) + "|"]
    for model, row in table["scores"].items():
        cells = [f"{row[t]['val_loss']:.3f} / {row[t]['test_acc']:.0%}" for t in tasks]
        loss = _mean_loss(row, tasks)
        acc = sum(row[t]["test_acc"] for t in tasks) / len(tasks)
        lines.append(f"| {model} | " + " | ".join(cells) + f" | {loss:.3f} / {acc:.0%} |")
    return "\n".join(lines) + "\n"


def expert_mix(task: str, spec: ZooSize) -> list[str]:
    """The batch mix of an expert's fine-tune: its task, with the pre-training mix replayed so
    that the expert keeps what the base knows (the format, every character)."""
    return [task] * spec.expert_replay + list(PRETRAIN_MIX)


def _mean_loss(row: dict[str, dict[str, float]], tasks: list[str]) -> float:
    return sum(row[t]["val_loss"] for t in tasks) / len(tasks)


def check_mergeable(scores: dict, tasks: list[str], margin: float = MERGEABLE_MARGIN) -> None:
    """Refuse a zoo where merging is not a winnable problem: in each pool every expert must be the
    best model on its own task (the experts specialize), and the plain average of the experts must
    beat the base on the mean validation loss (their task vectors combine at all). Both must hold by
    `margin` nats, so that a zoo built on another machine or package version (whose numbers differ
    in the last digits) passes or fails the same way."""
    base = _mean_loss(scores["base"], tasks)
    for kind in ("full", "lora"):
        models = ["base", *(f"{kind}/{t}" for t in tasks)]
        for task in tasks:
            expert = f"{kind}/{task}"
            runner_up = min((m for m in models if m != expert), key=lambda m: scores[m][task]["val_loss"])
            if not scores[expert][task]["val_loss"] + margin < scores[runner_up][task]["val_loss"]:
                raise EvomergeError(
                    f"zoo check failed: {expert} does not beat {runner_up} on {task} by {margin} nats "
                    f"({scores[expert][task]['val_loss']:.3f} vs {scores[runner_up][task]['val_loss']:.3f}; "
                    "the experts do not specialize; change the zoo's schedule)")
        average = _mean_loss(scores[f"average/{kind}"], tasks)
        if not average + margin < base:
            raise EvomergeError(f"zoo check failed: the average of the {kind} experts (mean val loss "
                                f"{average:.3f}) does not beat the base ({base:.3f}) by {margin} nats; "
                                "change the zoo's schedule")


def copy_accuracy(model, tokenizer, n: int = 100) -> float:
    """Greedy exact match on `copy` questions drawn from a stream no training run reads."""
    stream = train_records("copy", "held-out")
    records = [next(stream) for _ in range(n)]
    answers = greedy_answers(model, tokenizer, [r["question"] for r in records])
    return sum(a == r["answer"] for a, r in zip(answers, records)) / n


def pretrain_base(base, tokenizer, spec: ZooSize, seed: int, phase) -> dict:
    """Pre-train on `copy` until the base copies (BASE_COPY_TARGET), in at most BASE_EXTRA_ROUNDS
    more half-schedules after the first. Learning to copy is a sudden transition whose step differs
    by seed and machine: a fixed schedule alone leaves some builds with an unconverged base, and
    then the experts' task vectors hold pre-training as well as their skill."""
    train(base, tokenizer, list(PRETRAIN_MIX), spec.base_steps, spec.base_lr, spec.batch, f"{seed}/base",
          phase("base", spec.base_steps))
    steps, accuracy = spec.base_steps, copy_accuracy(base, tokenizer)
    for extra in range(1, BASE_EXTRA_ROUNDS + 1):
        if accuracy >= BASE_COPY_TARGET:
            break
        more = spec.base_steps // 2
        train(base, tokenizer, list(PRETRAIN_MIX), more, spec.base_lr / 2, spec.batch, f"{seed}/base/{extra}",
              phase(f"base +{extra}", more))
        steps, accuracy = steps + more, copy_accuracy(base, tokenizer)
    if accuracy < BASE_COPY_TARGET:
        raise EvomergeError(f"zoo build: the base reached {accuracy:.0%} exact match on copy after {steps} "
                            f"steps (needs {BASE_COPY_TARGET:.0%}); change the zoo's schedule")
    return {"steps": steps, "copy_exact_match": accuracy}


def _build(tmp: Path, final: Path, spec: ZooSize, tasks: list[str], splits: dict, seed: int,
           bars) -> tuple[dict, dict]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    def phase(name: str, total: int):
        if bars is None:
            return None
        tid = bars.add_task(name, total=total)
        return lambda: bars.advance(tid)

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Loading weights" bar per expert under our own bars
    tokenizer = build_tokenizer()
    write_data(tmp / "data")
    torch.manual_seed(seed)
    base = build_model(spec, tokenizer)
    pretraining = pretrain_base(base, tokenizer, spec, seed, phase)
    save_model(base, tokenizer, tmp / "base")
    scores = {}
    tick = phase("scoring", 1 + 2 * len(tasks) + 2)
    scores["base"] = score(base, tokenizer, splits)
    tick and tick()

    for i, task in enumerate(tasks):
        torch.manual_seed(seed * 1000 + i)
        model = AutoModelForCausalLM.from_pretrained(tmp / "base")
        train(model, tokenizer, expert_mix(task, spec), spec.full_steps, spec.full_lr, spec.batch,
              f"{seed}/expert", phase(f"full/{task}", spec.full_steps))
        save_model(model, tokenizer, tmp / "full" / task)
        scores[f"full/{task}"] = score(model, tokenizer, splits)
        tick and tick()

    for i, task in enumerate(tasks):
        torch.manual_seed(seed * 1000 + 100 + i)
        model = AutoModelForCausalLM.from_pretrained(tmp / "base")
        config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS,
                            task_type="CAUSAL_LM")
        model = get_peft_model(model, config)
        train(model, tokenizer, expert_mix(task, spec), spec.lora_steps, spec.lora_lr, spec.batch,
              f"{seed}/expert", phase(f"lora/{task}", spec.lora_steps))
        model.save_pretrained(tmp / "lora" / task)
        adapter_config = tmp / "lora" / task / "adapter_config.json"  # point at where base will be
        config_json = json.loads(adapter_config.read_text())
        config_json["base_model_name_or_path"] = str(final / "base")
        adapter_config.write_text(json.dumps(config_json, indent=2) + "\n")
        scores[f"lora/{task}"] = score(model, tokenizer, splits)
        tick and tick()

    for kind in ("full", "lora"):  # the plain average, merged by evomerge's own engine
        average = Recipe(method="linear", experts={task: {"weight": 1.0} for task in tasks})
        pool = Pool(tmp / "base", {task: tmp / kind / task for task in tasks})
        base.load_state_dict(merge_state_dict(average, pool))
        scores[f"average/{kind}"] = score(base, tokenizer, splits)
        tick and tick()
    check_mergeable(scores, tasks)
    _write_pool(tmp / "pool-full.yaml", "full")
    _write_pool(tmp / "pool-lora.yaml", "lora")
    return scores, pretraining
