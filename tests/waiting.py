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


def wait_until_serving(process, url: str, log, timeout: float, what: str) -> None:
    """Until `url`/health answers; a server process that exits, or does not answer within
    `timeout` seconds, fails the test with the end of its log."""
    import urllib.request

    import pytest

    deadline = time.time() + timeout
    while True:
        if process.poll() is not None:
            pytest.fail(f"{what} exited ({process.returncode}):\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            return
        except OSError:
            if time.time() > deadline:
                pytest.fail(f"{what} did not answer in {timeout:.0f} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
