"""Massive pools: how a 200-evaluation search fares as the pool grows from the 4 relevant LoRA
adapters to 128, most of them distractors (some harmful), and where to spend the budget.

    .venv/bin/python tests/benchmarks/bench_many_adapters.py                  # N = 4, 16, 64, 128, budget 200
    .venv/bin/python tests/benchmarks/bench_many_adapters.py --sizes 4 16 --budget 24   # smoke run

Builds the tiny demo zoo and its 128-adapter repository (`evomerge zoo --adapters 128`, reused
when complete), then per pool size N (the nested pools pool-N.yaml: the 4 relevant adapters first)
and per way of spending the budget, one search (Evo-Merging's two stages, lora_merge lowrank, the
validation loss suite, 2 Ray workers), its pick (Run.best) scored on the held-out test split:

- full genome: every adapter, 2 genes each (and at N >= 64 the same with separable CMA-ES,
  pycma's CMA_diagonal: a diagonal covariance, learnable from fewer samples in high dimension);
- random 20 (LoraHub's way): 20 adapters drawn at random (seeded), the search over those;
- preselect 8: `preselect: 8`, the 8 adapters the references choose (each alone on validation);
  for the zoo's 4 tasks also what the default, `preselect: auto`, does. The other rows set
  `preselect: null` (every adapter of their pool searched).

The references (the base and each adapter alone) are scored in every run, so the table says how
many evaluations they took beside the search's 200. Then, without a search, the merge itself:
per N, the bytes each adapter holds resident (ResidentSource) and the seconds to merge one
candidate with every adapter on, low-rank and dense, on one CPU thread.

Writes tests/benchmarks/results/bench_many_adapters.{md,json}. Runs are kept under --runs (a
finished run is reused, a stopped one resumed), so the command can be re-run after a stop.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from study import BACKEND, VAL_SUITE, Scorer, run_search  # noqa: E402 - the study's runner and test scorer

from evomerge.config import SearchConfig, WorkersConfig, resolve_pool_spec  # noqa: E402

SPACE = {"preset": "evo-merging", "lora_merge": "lowrank"}


def strategies(n: int, subset: int, top: int) -> dict[str, dict]:
    """The ways of spending the budget that differ from the full genome at this N."""
    out = {"full genome": {"preselect": None}}
    if n >= 64:  # pycma's separable (diagonal) CMA-ES: a covariance it can learn in 200 evaluations
        out["full genome, sep-CMA"] = {"optimizer": {"cma_options": {"CMA_diagonal": True}}, "preselect": None}
    if n > subset:
        out[f"random {subset} (LoraHub's)"] = {"subset": subset, "preselect": None}
    if n > top:  # 8 is also what the default (`preselect: auto`) takes for the zoo's 4 tasks
        out[f"preselect {top}" + (" (the default)" if top == 8 else "")] = {"preselect": top}
    return out


def subset_pool(repository: Path, n: int, k: int, seed: int, out: Path) -> Path:
    """A pool YAML of k adapters of pool-N drawn at random (LoraHub samples its adapters so)."""
    import yaml

    pool = yaml.safe_load((repository / f"pool-{n}.yaml").read_text())
    names = sorted(random.Random(f"subset/{n}/{k}/{seed}").sample(list(pool["experts"]), k),
                   key=list(pool["experts"]).index)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump({"base": str((repository / pool["base"]).resolve()),
                                   "experts": {e: str(repository / pool["experts"][e]) for e in names}}))
    return out


def merge_cost(repository: Path, n: int, repeats: int) -> dict:
    """Resident bytes per adapter and the seconds of one merge with all n adapters on."""
    import torch

    from evomerge.materialize.resident import ResidentSource
    from evomerge.materialize.sources import merge_tensor
    from evomerge.config import open_pool
    from evomerge.recipe import Recipe

    torch.set_num_threads(1)
    pool = open_pool(resolve_pool_spec(str(repository / f"pool-{n}.yaml"), REPO, "pool"))
    source = ResidentSource(pool, "cpu")
    base = sum(source.base(t).nbytes for t in pool.tensor_names() if pool.touched(t))
    result = {"resident_bytes": source.nbytes(), "resident_bytes_per_adapter": (source.nbytes() - base) / n}
    for merge in ("lowrank", "dense"):
        recipe = Recipe(method="evo_merging", lora_merge=merge,
                        experts={e: {"weight": 1.0 / n, "density": 0.5} for e in pool.names})
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            for name in pool.tensor_names():
                merge_tensor(recipe, name, source)
            times.append(time.perf_counter() - started)
        result[f"merge_s_{merge}"] = statistics.median(times)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zoo", type=Path, default=REPO / "runs" / "zoo-tiny")
    parser.add_argument("--runs", type=Path, default=REPO / "runs" / "bench-many-adapters")
    parser.add_argument("--sizes", type=int, nargs="+", default=[4, 16, 64, 128])
    parser.add_argument("--budget", type=int, default=200)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--subset", type=int, default=20)
    parser.add_argument("--top", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)

    from evomerge.zoo import build_zoo
    from evomerge.zoo.repository import build_repository

    build_zoo(args.zoo, size="tiny", seed=0, progress=False)
    repository = build_repository(args.zoo, max(args.sizes), progress=True)
    if max(args.sizes) not in (4, 16, 64, 128):
        raise SystemExit("sizes must be among the repository's nested pools: 4, 16, 64, 128")
    rows, costs = [], {}
    for n in args.sizes:
        costs[n] = merge_cost(repository, n, repeats=5)
        print(f"N={n}: merge cost {costs[n]}", flush=True)
        for label, how in strategies(n, args.subset, args.top).items():
            for seed in range(args.seeds):
                slug = f"n{n}-{label.split(' ')[0]}{'-sep' if 'sep' in label else ''}-seed{seed}"
                pool = (subset_pool(repository, n, how["subset"], seed, args.runs / f"{slug}.pool.yaml")
                        if "subset" in how else repository / f"pool-{n}.yaml")
                spec = resolve_pool_spec(str(pool), REPO, "pool")
                config = SearchConfig(name=f"many-{n}", pool=spec, space=SPACE, suite=str(VAL_SUITE), backend=BACKEND,
                                      budget=args.budget, seed=seed, workers=WorkersConfig(count=args.workers),
                                      preselect=how.get("preselect"), optimizer=how.get("optimizer", {}))
                print(f"N={n} {label} seed {seed}", flush=True)
                run, seconds = run_search(config, args.runs / slug, print)
                evaluations = run.evaluations()
                best = run.best(1)[0]
                scorer = Scorer(resolve_pool_spec(str(repository / f"pool-{n}.yaml"), REPO, "pool"), threads=2)
                on = [e for e, g in best.recipe["experts"].items() if g.get("weight", 0) != 0]
                per_candidate = [sum((e.seconds or {}).values()) for e in evaluations if e.ok]
                rows.append({
                    "n": n, "strategy": label, "seed": seed, "run": str(run.path), "seconds": seconds,
                    "references": len(run.read_json("references.json") or {}),
                    "evaluations": len(evaluations), "failed": sum(not e.ok for e in evaluations),
                    "val_objective": best.objective, "test_em": scorer.score("test_em", best.recipe)["mean"],
                    "test_loss": scorer.score("test_loss", best.recipe)["mean"],
                    "searched_experts": len(best.recipe["experts"]), "relevant_on": sorted(set(on) & {"add", "reverse", "upper", "next"}),
                    "candidate_s": statistics.median(per_candidate) if per_candidate else None,
                })
                print(json.dumps(rows[-1]), flush=True)
    write(args.out, rows, costs, args)


def _grouped(rows: list[dict]) -> dict[tuple[int, str], list[dict]]:
    groups: dict[tuple[int, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["n"], row["strategy"]), []).append(row)
    return groups


def _mean_sd(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def write(out: Path, rows: list[dict], costs: dict, args) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_many_adapters.json").write_text(json.dumps({"rows": rows, "merge": costs, "args": {
        k: str(v) for k, v in vars(args).items()}}, indent=2) + "\n")
    lines = [f"# Many-adapter pools: {args.budget} evaluations, Evo-Merging (lowrank), tiny zoo, "
             f"{args.seeds} seed(s)", "",
             "Test split: exact match (mean of the 4 tasks) and answer-token loss of the run's pick. "
             "References: evaluations spent on the base and each adapter alone, beside the budget.", "",
             "Mean over seeds (± sd); test loss is lower-is-better:", "",
             "| N | strategy | test loss | test exact match | relevant on | references | s / candidate |",
             "|---|---|---|---|---|---|---|"]
    for (n, strategy), group in _grouped(rows).items():
        lines.append(f"| {n} | {strategy} | {_mean_sd([-r['test_loss'] for r in group])} | "
                     f"{_mean_sd([r['test_em'] for r in group])} | "
                     f"{statistics.fmean(len(r['relevant_on']) for r in group):.1f}/4 | {group[0]['references']} | "
                     f"{statistics.fmean(r['candidate_s'] for r in group):.2f} |")
    lines += ["", "Per run:", "",
             "| N | strategy | test exact match | test loss | val objective | experts searched | relevant on | "
             "references | s / candidate | run s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['n']} | {r['strategy']} | {r['test_em']:.3f} | {-r['test_loss']:.3f} | {r['val_objective']:.3f} | "
                     f"{r['searched_experts']} | {len(r['relevant_on'])}/4 | {r['references']} | "
                     f"{r['candidate_s']:.2f} | {r['seconds']:.0f} |")
    lines += ["", "The merge alone (one CPU thread, every adapter on, weight 1/N, density 0.5):", "",
              "| N | resident MB | resident bytes / adapter (beyond the base) | lowrank merge s | dense merge s |", "|---|---|---|---|---|"]
    for n, c in costs.items():
        lines.append(f"| {n} | {c['resident_bytes'] / 2**20:.1f} | {c['resident_bytes_per_adapter']:,.0f} | {c['merge_s_lowrank']:.4f} | {c['merge_s_dense']:.4f} |")
    (out / "bench_many_adapters.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
