"""Failure watch: a broken setup stops a search early, with its reason, instead of spending the budget.

A broken setup (a field every record lacks, an endpoint that is down, a model that does not load)
fails every candidate the same way. When a session's (or a stage's) first K results all failed with
one reason, the search stops with it; one success and the search goes on, failures and all. The
references (the base and each expert) are the first test: all of them failing stops before the search.
"""

from __future__ import annotations

import collections
import re
from pathlib import Path
from typing import Any, Optional

from evomerge.errors import EvomergeError

EARLY_STOP_AFTER = 3  # at least this many first results failed alike stop a search


def reason_kind(reason: str) -> str:
    """A failure reason without what differs between candidates (recipe ids, numbers), so that
    "tensor x holds NaN (recipe 3fa2c1)" is the same reason for every candidate."""
    return re.sub(r"\b(?=[0-9a-f]*\d)[0-9a-f]{6,}\b|\d+(?:\.\d+)?(?:e[-+]?\d+)?", "#", reason)


class FailureWatch:
    def __init__(self, workers: int):
        self.after = max(EARLY_STOP_AFTER, workers)  # a first round of workers all failing alike, at least
        self.first: Optional[list[str]] = None  # this session's (or stage's) first failure kinds; None: not watching

    def start(self) -> None:
        """Watch the next results: a session starts, or a stage whose own genes may break every merge."""
        self.first = []

    def watch(self, result: dict[str, Any], left: int, stage: str, run_path: Path) -> None:
        """Raise when the first K results all failed alike; `left` is the budget still to spend."""
        if self.first is None or left <= 0:
            return
        if result.get("status") == "ok":
            self.first = None  # something works
            return
        self.first.append(reason_kind(result.get("reason", "")))
        if len(self.first) >= self.after:
            alike, self.first = len(set(self.first)) == 1, None
            if alike:
                raise EvomergeError(f"stopped: the first {self.after} candidates{stage} all failed with the same "
                                    f"reason: {result.get('reason', '')[:300]} (fix that, then `evomerge resume "
                                    f"{run_path}`)")


def references_all_failed(results: dict[str, dict[str, Any]], run_path: Path) -> None:
    """Raise, with the most common reason, when every reference failed: so will every candidate."""
    failed = [r.get("reason", "") for r in results.values() if r.get("status") != "ok"]
    if len(failed) < len(results):
        return
    kind, count = collections.Counter(map(reason_kind, failed)).most_common(1)[0]
    reason = next(r for r in failed if reason_kind(r) == kind)
    every = count == len(results)
    raise EvomergeError(f"stopped before the search: {'every' if every else f'{count} of the'} {len(results)} "
                        f"references (the base and each expert) failed{'' if every else ', the most common reason'}: "
                        f"{reason[:300]} (fix that, then `evomerge resume {run_path}`)")
