"""Helpers for the evaluator tests: small JSONL tasks whose texts use only the demo zoo
tokenizer's characters (letters, digits, space, newline, "=", "+")."""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = "zero one two three four five six seven eight nine ten plus minus times is what the answer".split()


def make_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        records.append({"question": f"what is {WORDS[a]} plus {WORDS[b]}", "answer": str(a + b)})
    return records


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path
