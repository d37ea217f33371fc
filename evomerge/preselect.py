"""Pre-selection: which experts of a large pool the search spends its budget on.

In a repository of 100+ adapters most are beside the point, and a genome of 2 genes per adapter
is more than 200 evaluations can search. The references a run scores anyway (the base and each
expert alone, on the suite's validation split: no label the search would not have) say which
adapters help which task. `preselect` takes, task by task in turn, the adapter that gains most
over the base on that task and is not taken yet, until it has `k`; the search then runs over
those alone, and every other adapter is off (in no recipe, so it costs nothing to merge).

Taking the best per task in turn, rather than the best on the mean, keeps an adapter that is
strong on one task and poor on the rest, the shape a specialist has.
"""

from __future__ import annotations

from typing import Any, Mapping

from evomerge.errors import EvomergeError

AUTO_AT_LEAST, AUTO_PER_TASK = 8, 2  # `preselect: auto`: max(8, 2 per task) experts


def preselect_size(setting: int | str | None, n_experts: int, n_tasks: int) -> int | None:
    """How many experts to search over, or None for all: `auto` takes max(8, 2 per task), enough
    for each task's specialist and a runner-up (tests/benchmarks/bench_many_adapters.py: at 16, 64
    and 128 LoRA adapters, 8 of them beat the full genome and the 4 relevant adapters alone)."""
    k = max(AUTO_AT_LEAST, AUTO_PER_TASK * n_tasks) if setting == "auto" else setting
    return k if k is not None and k < n_experts else None


def preselect(references: Mapping[str, Mapping[str, Any]], experts: list[str], k: int) -> list[str]:
    """The `k` experts to search over (in the pool's order), from the scored references
    (references.json: "base" and each expert, with per-task `scores`, higher is better)."""
    if k >= len(experts):
        return list(experts)
    base = (references.get("base") or {}).get("scores")
    if not base:
        raise EvomergeError("preselect needs the base's reference scores, and the base's reference failed")
    scored = {name: references[name]["scores"] for name in experts
              if (references.get(name) or {}).get("scores")}
    if not scored:
        raise EvomergeError("preselect: every expert's reference failed; nothing to choose from")
    tasks = list(base)
    ranked = {task: sorted(scored, key=lambda name: (-(scored[name][task] - base[task]), name)) for task in tasks}
    chosen: list[str] = []
    for rank in range(len(scored)):
        for task in tasks:
            name = ranked[task][rank]
            if name not in chosen and len(chosen) < k:
                chosen.append(name)
    return [name for name in experts if name in chosen]
