"""Which optimizer finds the best routing: the fusion-routing genome (a weight per model and task,
the argmax routes) replayed on a table of per-task scores, so that hundreds of searches take seconds.

    .venv/bin/python tests/benchmarks/bench_routing_optimizers.py

The table is the tiny demo zoo's: each of its 5 models alone on each task (validation -CE, 20 docs
per task, from the references of a fusion-routing run against the vLLM server). A run succeeds when
its best candidate is the best routing (each task to its own expert). The objective is flat between
switches of the argmax, which is what makes routing hard for a step-size method.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from evomerge.optimizers import Bounds, SearchContext, build_optimizer  # noqa: E402

MODELS = ("add", "base", "next", "reverse", "upper")  # the genes' order: per model, then per task
SCORES = {"add": [-1.877, -4.899, -4.874, -3.813, -4.544], "reverse": [-4.581, -5.729, -5.276, -2.24, -5.303],
          "upper": [-4.339, -5.254, -5.772, -4.382, -0.268], "next": [-4.812, -5.807, -0.289, -3.907, -5.532]}
TASKS = list(SCORES)
OPTIONS = [{"type": "cmaes", "sigma0": 0.3}, {"type": "cmaes", "sigma0": 0.5}, {"type": "nevergrad", "name": "NGOpt"},
           {"type": "nevergrad", "name": "DiscreteOnePlusOne"}, {"type": "random"}]


def objective(x: np.ndarray) -> float:
    weights = np.asarray(x).reshape(len(MODELS), len(TASKS)).T  # rows: tasks
    return -float(np.mean([SCORES[t][int(np.argmax(weights[i]))] for i, t in enumerate(TASKS)]))


def best_found(options: dict, budget: int, seed: int) -> float:
    dim = len(MODELS) * len(TASKS)
    bounds = Bounds(lower=np.zeros(dim), upper=np.ones(dim), x0=np.full(dim, 0.5))
    optimizer = build_optimizer(options, bounds, SearchContext(budget=budget, workers=1, space=None), seed=seed)
    best = np.inf
    while optimizer.n_told < budget:
        asked = optimizer.ask(1)
        if not asked:
            break
        value = objective(asked[0].x)
        best = min(best, value)
        optimizer.tell([(asked[0].id, value)])
    return best


def main(seeds: int = 10, budgets: tuple[int, ...] = (60, 100)) -> None:
    optimum = -float(np.mean([max(v) for v in SCORES.values()]))
    print(f"| optimizer | {' | '.join(f'budget {b}' for b in budgets)} |")
    print(f"| --- | {' | '.join('---:' for _ in budgets)} |")
    for options in OPTIONS:
        cells = []
        for budget in budgets:
            hits = sum(abs(best_found(options, budget, seed) - optimum) < 1e-9 for seed in range(seeds))
            cells.append(f"{hits}/{seeds}")
        print(f"| {options} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
