"""The synthetic tasks of the demo zoo: four small text tasks that one tiny model can learn in seconds.

Every record is {"question": str, "answer": str}. The model reads the question exactly as written
and must write the answer exactly as written, then a newline:

    add 37+45 =        ->  " 82"      two-digit addition
    reverse kqpd =     ->  " dpqk"    the letters in reverse order
    upper kqpd =       ->  " KQPD"    the letters in upper case
    next kqpd =        ->  " lrqe"    each letter replaced by the next one (z -> a)

The question ends in " =" and the answer starts with a space, so that question + answer is the
full line (the training text is question + answer + "\\n" + eos). The tokenizer of the zoo is
character-level: the boundary between question and answer is always a token boundary.

The validation and test splits are fixed (seed DATA_SEED, N_EVAL records each) and committed under
evaluators/data/<task>/{validation,test}.jsonl; `python -m evomerge.zoo.tasks evaluators/data`
writes them again and `--check` compares. Training records come from `train_records`, which never
yields a question of those splits.
"""

from __future__ import annotations

import json
import random
import string
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

DATA_SEED = 20250101
N_EVAL = 200
WORD_LENGTHS = (4, 4)  # letters per word (min, max): a fixed length keeps the letter tasks quick to learn
SPLITS = ("validation", "test")

Record = dict[str, str]


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(*WORD_LENGTHS)))


def _add(rng: random.Random) -> Record:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return {"question": f"add {a}+{b} =", "answer": f" {a + b}"}


def _word_task(prompt: str, answer: Callable[[str], str], shown: Callable[[str], str] = str) -> Callable[[random.Random], Record]:
    """A task over one random word: the question shows `shown(word)`, the answer is `answer(word)`."""
    def make(rng: random.Random) -> Record:
        w = _word(rng)
        return {"question": f"{prompt} {shown(w)} =", "answer": f" {answer(w)}"}

    return make


_NEXT = str.maketrans(string.ascii_lowercase, string.ascii_lowercase[1:] + "a")
_reverse = _word_task("reverse", lambda w: w[::-1])
_upper = _word_task("upper", str.upper)
_next = _word_task("next", lambda w: w.translate(_NEXT))


# name -> one random record; the order is the order of tasks everywhere (pools, scores, data).
TASKS: dict[str, Callable[[random.Random], Record]] = {
    "add": _add,
    "reverse": _reverse,
    "upper": _upper,
    "next": _next,
}



def _copy(rng: random.Random) -> Record:
    text = "".join(rng.choice(_COPY_CHARS) for _ in range(COPY_LENGTH))
    return {"question": f"copy {text} =", "answer": f" {text}"}


_COPY_CHARS = string.ascii_lowercase + string.ascii_uppercase + string.digits
# A fixed length (the tasks' word length): copying at a fixed offset is learned by a tiny model in
# 100-200 steps on every seed tried. Variable lengths (2-5) made it a phase transition that some
# seeds and package versions crossed within the schedule and others never did (base CE 3.5 instead
# of 6-11), which left the zoo's mergeable check on the edge of its margin.
COPY_LENGTH = 4

# Tasks the base is pre-trained on and no expert is scored on: "copy" teaches the answer format
# and every character, none of the four skills. The base then sits at a converged point, and each
# expert's task vector holds its own skill rather than a share of unfinished pre-training (a base
# pre-trained briefly on the four tasks themselves gave experts whose task vectors were mostly one
# shared direction, so that any sum of them overshot).
PRETRAIN_TASKS: dict[str, Callable[[random.Random], Record]] = {"copy": _copy}
PRETRAIN_MIX = ("copy",)

# Tasks of the many-adapter repository's distractors (evomerge/zoo/repository.py), scored by no
# suite. "Other" tasks have prompts of their own; "corrupt" ones answer a suite task's prompt wrongly
# (an adapter trained on them is harmful to that task when merged in).
_PREV = str.maketrans(string.ascii_lowercase, "z" + string.ascii_lowercase[:-1])


_sort = _word_task("sort", lambda w: "".join(sorted(w)))
_swap = _word_task("swap", lambda w: f"{w[-1]}{w[1:-1]}{w[0]}")
_lower = _word_task("lower", str, shown=str.upper)
_prev = _word_task("prev", lambda w: w.translate(_PREV))
_rotate = _word_task("rotate", lambda w: f"{w[1:]}{w[0]}")


def _sub(rng: random.Random) -> Record:
    a, b = sorted((rng.randint(10, 99), rng.randint(10, 99)), reverse=True)
    return {"question": f"sub {a} {b} =", "answer": f" {a - b}"}  # no "-": not in ALPHABET


def _add_off_by_one(rng: random.Random) -> Record:
    record = _add(rng)
    return {"question": record["question"], "answer": f" {int(record['answer']) + 1}"}


_reverse_as_copy = _word_task("reverse", str)
_upper_as_copy = _word_task("upper", str)
_next_as_prev = _word_task("next", lambda w: w.translate(_PREV))


OTHER_TASKS: dict[str, Callable[[random.Random], Record]] = {
    "sort": _sort, "swap": _swap, "lower": _lower, "prev": _prev, "rotate": _rotate, "sub": _sub,
}
CORRUPT_TASKS: dict[str, Callable[[random.Random], Record]] = {  # name -> a wrong answer to a suite task
    "add-off-by-one": _add_off_by_one, "reverse-as-copy": _reverse_as_copy, "upper-as-copy": _upper_as_copy,
    "next-as-prev": _next_as_prev,
}

SCORABLE_TASKS = {**TASKS, **OTHER_TASKS}  # tasks with held-out validation and test splits (eval_splits)

# Every character a question or answer can hold (the zoo tokenizer's vocabulary, after specials).
ALPHABET = "\n =+" + string.digits + string.ascii_lowercase + string.ascii_uppercase


def eval_splits(task: str) -> dict[str, list[Record]]:
    """The fixed validation and test records of `task` (a demo task, or another task a benchmark
    pool is scored on): distinct questions, N_EVAL per split."""
    rng = random.Random(f"{DATA_SEED}/{task}")
    seen: set[str] = set()
    records: list[Record] = []
    while len(records) < N_EVAL * len(SPLITS):
        record = SCORABLE_TASKS[task](rng)
        if record["question"] not in seen:
            seen.add(record["question"])
            records.append(record)
    return {split: records[i * N_EVAL : (i + 1) * N_EVAL] for i, split in enumerate(SPLITS)}


def train_records(task: str, stream: int | str) -> Iterator[Record]:
    """An endless stream (named by `stream`) of training records of `task`, none held out."""
    make = {**TASKS, **PRETRAIN_TASKS, **OTHER_TASKS, **CORRUPT_TASKS}[task]
    # a scored task's held-out questions stay unseen, also by the corrupt tasks that share its prompts
    suite_task = task if task in SCORABLE_TASKS else next((t for t in TASKS if task.startswith(f"{t}-")), None)
    held_out = {r["question"] for split in eval_splits(suite_task).values() for r in split} if suite_task else set()
    rng = random.Random(f"train/{stream}/{task}")
    while True:
        record = make(rng)
        if record["question"] not in held_out:
            yield record


def to_jsonl(records: list[Record]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def write_data(root: Path) -> list[Path]:
    """Write root/<task>/{validation,test}.jsonl for every task; returns the paths written."""
    written = []
    for task in TASKS:
        for split, records in eval_splits(task).items():
            path = Path(root) / task / f"{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(to_jsonl(records), encoding="utf-8")
            written.append(path)
    return written


def stale_data(root: Path) -> list[Path]:
    """The data files under root that are missing or differ from what `write_data` would write."""
    stale = []
    for task in TASKS:
        for split, records in eval_splits(task).items():
            path = Path(root) / task / f"{split}.jsonl"
            if not path.is_file() or path.read_text(encoding="utf-8") != to_jsonl(records):
                stale.append(path)
    return stale


if __name__ == "__main__":  # python -m evomerge.zoo.tasks evaluators/data [--check]
    args = sys.argv[1:]
    target = Path(next((a for a in args if not a.startswith("-")), "evaluators/data"))
    if "--check" in args:
        bad = stale_data(target)
        print("\n".join(f"stale: {p}" for p in bad) or f"{target}: up to date")
        sys.exit(1 if bad else 0)
    for p in write_data(target):
        print(p)
