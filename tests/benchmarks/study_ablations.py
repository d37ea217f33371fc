"""Why the Evo-Merging study comes out as it does: two ablations on the same zoo and suites.

    .venv/bin/python tests/benchmarks/study_ablations.py            # after study.py (reuses its zoo)

1. Density sweep (no search): every expert at one TopMag density d and one weight w, scored on
   the validation suite, per pool. Shows how much "sparsity-based denoising" can change on this
   pool at all, and where.
2. Step size: the searched Evo-Merging variants again, with CMA-ES sigma0 0.2 instead of the
   paper's 0.05, same budget and seeds. Shows whether the order of the variants is the method's
   or the step size's (with sigma0 0.05, 67 stage-1 evaluations barely move a density from 1).
3. LoRA merge form (LoRA pool): the full method at the paper's settings but merging the experts'
   dense delta-Ws (`lora_merge: dense`, as the classic recipes do) instead of the paper's low-rank
   A = sum b_i TopMag(A_i), B = sum b_i B_i, whose product carries cross terms B_i A_j.

Runs go under runs/study-ablations/, results to tests/benchmarks/results/ablations.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from evomerge.config import SearchConfig, WorkersConfig, open_pool, resolve_pool_spec  # noqa: E402
from evomerge.recipe import Recipe  # noqa: E402
from tests.benchmarks.study import (  # noqa: E402
    BACKEND, POOLS, VAL_SUITE, Scorer, _fmt, run_search, searched_spaces, summarize,
)

DENSITIES = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0)
WEIGHTS = (0.25, 0.5)
VARIANTS = ("scaling only", "denoising only", "Evo-Merging (both stages)")


def density_sweep(scorer: Scorer, experts: list[str], kind: str) -> dict[str, dict[str, float]]:
    lora_merge = "lowrank" if kind == "lora" else "dense"
    table: dict[str, dict[str, float]] = {}
    for weight in WEIGHTS:
        for density in DENSITIES:
            recipe = Recipe(method="evo_merging", lora_merge=lora_merge,
                            experts={e: {"weight": weight, "density": density} for e in experts})
            table.setdefault(f"w {weight}", {})[f"{density:g}"] = -scorer.score("val", recipe)["mean"]
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, default=REPO / "zoo")
    parser.add_argument("--runs", type=Path, default=REPO / "runs" / "study-ablations")
    parser.add_argument("--out", type=Path, default=REPO / "tests" / "benchmarks" / "results")
    parser.add_argument("--pools", default="full,lora")
    parser.add_argument("--budget", type=int, default=200)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--sigma0", type=float, default=0.2)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    started = time.perf_counter()
    results: dict = {"meta": {"budget": args.budget, "seeds": args.seeds, "sigma0": args.sigma0}, "pools": {}}
    for kind in args.pools.split(","):
        pool_spec = resolve_pool_spec(POOLS[kind], args.zoo.resolve(), f"pool {kind}")
        experts = open_pool(pool_spec).names
        variants = {f"{name}, sigma0 {args.sigma0:g}": (searched_spaces(kind)[name], args.sigma0) for name in VARIANTS}
        if kind == "lora":
            variants["Evo-Merging (both stages), dense LoRA merge, sigma0 0.05"] = ({"preset": "evo-merging"}, 0.05)
        runs = {name: [] for name in variants}
        for seed in range(args.seeds):
            for name, (space, sigma0) in variants.items():
                print(f"[{time.perf_counter() - started:7.1f}s] [{kind}] {name} seed {seed}", flush=True)
                config = SearchConfig(name=f"ablation-{kind}", pool=pool_spec, space=space,
                                      suite=str(VAL_SUITE), backend=BACKEND, budget=args.budget, seed=seed,
                                      optimizer={"sigma0": sigma0}, workers=WorkersConfig(count=args.workers),
                                      references=False)
                slug = "".join(c if c.isalnum() or c in ".-" else "-" for c in name)
                run, _ = run_search(config, args.runs / kind / f"{slug}-seed{seed}", print)
                runs[name].append(run)
        scorer = Scorer(pool_spec, threads=2)
        rows = []
        for name, seeded in runs.items():
            bests = [run.best(1)[0] for run in seeded]
            rows.append(summarize(scorer, name, "searched", [b.recipe for b in bests],
                                  args.budget, [b.objective for b in bests], ""))
        results["pools"][kind] = {"sweep": density_sweep(scorer, experts, kind), "rows": rows}
    results["meta"]["seconds"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ablations.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "ablations.md").write_text(markdown(results))
    print(markdown(results))


def markdown(results: dict) -> str:
    meta = results["meta"]
    lines = ["# Evo-Merging study: ablations", "",
             "Written by `python tests/benchmarks/study_ablations.py`.", ""]
    for kind, pool in results["pools"].items():
        lines += [f"## {kind} pool", "", "Density sweep: validation mean CE (lower is better), every expert at "
                  "one TopMag density and one weight:", ""]
        densities = list(next(iter(pool["sweep"].values())))
        lines += ["| weight | " + " | ".join(f"d {d}" for d in densities) + " |",
                  "|---" * (len(densities) + 1) + "|"]
        for weight, row in pool["sweep"].items():
            lines.append(f"| {weight} | " + " | ".join(f"{row[d]:.3f}" for d in densities) + " |")
        lines += ["", f"Searched (budget {meta['budget']}, {meta['seeds']} seeds; mean ± std):", "",
                  "| method | val objective | val mean -CE | test mean -CE | test mean EM |", "|---|---:|---:|---:|---:|"]
        for row in pool["rows"]:
            lines.append(f"| {row['method']} | {_fmt(row['val_objective'])} | {_fmt(row['val_mean'])} | "
                         f"{_fmt(row['test_loss_mean'])} | {_fmt(row['test_em_mean'])} |")
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
