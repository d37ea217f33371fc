"""Waiting on another process in a test: poll a condition, fail with what was awaited."""

from __future__ import annotations

import time


def wait_for(predicate, timeout: float = 180.0, what: str = "the condition") -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")
