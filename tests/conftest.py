"""Shared fixtures.

`tiny_zoo`: the tiny demo zoo (`evomerge zoo OUT --size tiny`), built once per test session into a
temporary directory (about a minute on 2 CPU cores); returns its Path (base/, full/<task>/,
lora/<task>/, pool-full.yaml, pool-lora.yaml, scores.json, data/). Treat it as read-only.
Set EVOMERGE_TINY_ZOO=/some/dir to keep it between sessions: a complete zoo there is reused.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory) -> Path:
    from evomerge.zoo import build_zoo

    cached = os.environ.get("EVOMERGE_TINY_ZOO")
    out = Path(cached) if cached else tmp_path_factory.mktemp("zoo") / "tiny"
    build_zoo(out, size="tiny", seed=0, progress=False)
    return out
