"""A many-adapter repository over a demo zoo: a few LoRA adapters relevant to the suite's tasks and
many distractors, the setting evomerge's method was made for (100+ adapters, most of them beside
the point, some of them harmful).

`build_repository(zoo, n)` writes ZOO/many-N/:

    adapters/<name>/     PEFT adapters over ZOO/base, in the zoo's format (rank 8, the same targets)
                         - the suite's tasks (add, reverse, upper, next): the zoo's own lora/<task>
                         - other tasks (sort, swap, lower, prev, rotate, sub; named <task>-<k>):
                           prompts no suite task has; three distractors in four
                         - corrupt tasks (add-off-by-one, reverse-as-copy, upper-as-copy,
                           next-as-prev): a suite task's prompts answered wrongly; harmful when
                           merged in; one distractor in four
    pool-<m>.yaml        nested pools: the 4 relevant adapters, then the first m - 4 distractors,
                         for m in 4, 16, 64, 128 (up to n) and n
    repository.json      per adapter what it was trained on, its role (relevant, distractor,
                         harmful) and its validation loss on each suite task

Distractors differ by task, data stream, seed and schedule (half of them train half as long), so
no two are alike. Built in a temporary directory and renamed into place, like the zoo itself.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from evomerge.errors import EvomergeError
from evomerge.zoo.build import LORA_TARGETS, _progress, _threads, expert_mix
from evomerge.zoo.model import SIZES, build_tokenizer, train, val_loss
from evomerge.zoo.tasks import CORRUPT_TASKS, OTHER_TASKS, TASKS, eval_splits

REPOSITORY_FORMAT = 1
POOL_SIZES = (4, 16, 64, 128)


def distractor_tasks(count: int) -> list[tuple[str, str]]:
    """(training task, role) of the first `count` distractors: three other tasks, then a corrupt one."""
    other, corrupt = list(OTHER_TASKS), list(CORRUPT_TASKS)
    return [(corrupt[(i // 4) % len(corrupt)], "harmful") if i % 4 == 3 else (other[(i - i // 4) % len(other)], "distractor")
            for i in range(count)]


def adapter_names(tasks: list[tuple[str, str]]) -> list[str]:
    """`<task>-<k>`: the k-th distractor trained on that task."""
    seen: dict[str, int] = {}
    names = []
    for task, _ in tasks:
        seen[task] = seen.get(task, 0) + 1
        names.append(f"{task}-{seen[task]}")
    return names


def build_repository(zoo: Path, n: int, seed: int = 0, progress: bool = True, out: Path | None = None) -> Path:
    """Build ZOO/many-N, or `out` (see the module docstring), and return it; a complete one there is reused."""
    zoo = Path(zoo)
    table = _zoo_table(zoo)
    if n < len(TASKS):
        raise EvomergeError(f"--adapters {n}: a repository holds the {len(TASKS)} relevant adapters and distractors; "
                            f"give at least {len(TASKS)}")
    out = Path(out) if out is not None else zoo / f"many-{n}"
    if (out / "repository.json").is_file():
        meta = json.loads((out / "repository.json").read_text())["meta"]
        if meta.get("format") == REPOSITORY_FORMAT and meta.get("seed") == seed:
            return out
        raise EvomergeError(f"{out} holds a repository built with seed {meta.get('seed')} (format "
                            f"{meta.get('format')}); delete it to build seed {seed}")
    if out.exists():
        raise EvomergeError(f"{out} exists and is not a complete repository; delete it and build again")
    spec = SIZES[table["meta"]["size"]]
    started = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    os.chmod(tmp, 0o755)
    try:
        with _threads(1), _progress(progress) as bars:
            adapters = _build(zoo, tmp, out, n, seed, spec, bars)
        meta = {"format": REPOSITORY_FORMAT, "n": n, "seed": seed, "zoo": str(zoo.resolve()),
                "tasks": list(TASKS), "seconds": round(time.perf_counter() - started, 1),
                "val_loss": "mean cross-entropy (nats/token) of the answer tokens, validation split"}
        (tmp / "repository.json").write_text(json.dumps({"meta": meta, "adapters": adapters}, indent=2) + "\n")
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if progress:
        harmful = sum(a["role"] == "harmful" for a in adapters.values())
        print(f"repository of {n} adapters ({len(TASKS)} relevant, {n - len(TASKS) - harmful} distractors, "
              f"{harmful} harmful) written to {out} in {meta['seconds']:.0f}s")
    return out


def _zoo_table(zoo: Path) -> dict:
    scores = zoo / "scores.json"
    if not scores.is_file() or not (zoo / "lora").is_dir():
        raise EvomergeError(f"{zoo} is not a demo zoo (no scores.json or lora/); build one with `evomerge zoo {zoo}`")
    return json.loads(scores.read_text())


def _build(zoo: Path, tmp: Path, out: Path, n: int, seed: int, spec, bars) -> dict:
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = build_tokenizer()
    validation = {task: eval_splits(task)["validation"] for task in TASKS}
    base_path = (zoo / "base").resolve()
    adapters: dict[str, dict] = {}
    tick = bars.add_task("adapters", total=n) if bars is not None else None

    def record(name: str, model, trained_on: str, role: str) -> None:
        adapters[name] = {"trained_on": trained_on, "role": role,
                          "val_loss": {t: round(val_loss(model, tokenizer, recs), 4) for t, recs in validation.items()}}
        if tick is not None:
            bars.advance(tick)

    for task in TASKS:  # the relevant ones: the zoo's own adapters, so pool-4 is the zoo's pool-lora
        shutil.copytree(zoo / "lora" / task, tmp / "adapters" / task)
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), zoo / "lora" / task)
        record(task, model.eval(), task, "relevant")

    plan = distractor_tasks(n - len(TASKS))
    for i, ((task, role), name) in enumerate(zip(plan, adapter_names(plan))):
        torch.manual_seed(seed * 1000 + 500 + i)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_path),
                               LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS,
                                          task_type="CAUSAL_LM"))
        steps = spec.lora_steps if i % 2 == 0 else spec.lora_steps // 2  # strong and weak distractors
        train(model, tokenizer, expert_mix(task, spec), steps, spec.lora_lr, spec.batch, f"{seed}/distractor/{i}")
        model.save_pretrained(tmp / "adapters" / name)
        config_path = tmp / "adapters" / name / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = str(base_path)
        config_path.write_text(json.dumps(config, indent=2) + "\n")
        record(name, model, task, role)

    names = list(adapters)
    base_rel = os.path.relpath(base_path, out.resolve())
    for m in sorted({*(s for s in POOL_SIZES if s <= n), n}):
        lines = [f"# written by `evomerge zoo --adapters {n}`: the {len(TASKS)} relevant adapters, then "
                 f"{m - len(TASKS)} distractors; paths relative to this file", f"base: {base_rel}", "experts:"]
        lines += [f"  {name}: adapters/{name}" for name in names[:m]]
        (tmp / f"pool-{m}.yaml").write_text("\n".join(lines) + "\n")
    return adapters
