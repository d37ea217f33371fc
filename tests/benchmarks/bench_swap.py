"""Benchmark a search worker's two weight-swap paths with the hf backend, side by side.

in place      the hf backend declares `weights = "module"`: ResidentMerger.apply writes each
              candidate's merge straight into the live model's parameters (what a search does now)
named tensors the same backend declaring `weights = "named_tensors"`: the merge is built as a list
              of (name, tensor) and copied in by update_weights (what every hf search did before
              capabilities were declared, and what the vllm backend does)

Both are the real `Worker` of a search on a demo zoo (full experts), scoring the same candidates:
the default evo-merging space's stage 1 and stage 2 vectors, task_arithmetic (one matrix-vector
product per tensor, written into the parameter) and ties. Prints per family the median time per
candidate of the swap alone and of swap + evaluation, both paths, and the ratio named / in place;
checks that both paths score the same (1e-5).

    python tests/benchmarks/bench_swap.py --zoo /work/tinyzoo --zoo /work/smallzoo --n 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run as a script from a checkout

from evomerge.backends import backend_class  # noqa: E402
from evomerge.config import resolve_pool_spec  # noqa: E402
from evomerge.recipe import Recipe  # noqa: E402
from evomerge.searchspace import load_space  # noqa: E402
from evomerge.worker import Worker  # noqa: E402

SUITE = ROOT / "evaluators" / "zoo-loss.yaml"


class NamedTensorsHF(backend_class("hf")):
    weights = "named_tensors"


def candidates(experts: list[str], n_layers: int, n: int, seed: int = 0) -> dict[str, list[dict]]:
    """n recipes per family, as a search makes them."""
    space = load_space("evo-merging", experts=experts, n_layers=n_layers)
    rng = np.random.default_rng(seed)
    families: dict[str, list[dict]] = {}
    for stage in range(space.n_stages):
        sub = space.stage(stage) if space.n_stages > 1 else space
        families[f"evo_merging stage {stage + 1}"] = [
            sub.to_recipe(sub.lower + rng.random(sub.dim) * (sub.upper - sub.lower), seed=0).model_dump(mode="json")
            for _ in range(n)]
    for method in ("task_arithmetic", "ties"):
        families[method] = [{"method": method, "experts": {
            name: {"weight": float(w), "density": float(d)}
            for name, w, d in zip(experts, rng.uniform(-0.5, 1.0, len(experts)), rng.uniform(0.2, 1.0, len(experts)))}}
            for _ in range(n)]
    return families


def time_candidate(worker: Worker, recipe: dict) -> tuple[float, float, dict]:
    """(swap seconds, swap + evaluation seconds, scores) of one candidate."""
    started = time.perf_counter()
    worker._swap_weights(Recipe.model_validate(recipe))
    swapped = time.perf_counter() - started
    result = worker.evaluate(recipe)  # swaps again (as a search does) and scores
    assert result["status"] == "ok", result.get("reason")
    return swapped, result["seconds"]["merge"] + result["seconds"]["eval"], result["scores"]


def bench_zoo(zoo: Path, n: int, threads: int) -> dict:
    spec = resolve_pool_spec("pool-full.yaml", zoo, "zoo")
    backend = {"name": "hf", "batch_size": 64}
    in_place = Worker(spec, str(SUITE), backend, threads=threads)
    by_name = Worker(spec, str(SUITE), backend, threads=threads)
    by_name.backend = NamedTensorsHF(spec["base"], device="cpu", batch_size=64)
    params = sum(p.numel() for p in in_place.backend.model.parameters())
    families = candidates(list(spec["experts"]), in_place.pool.n_layers(), n)
    for worker in (in_place, by_name):  # warm: the suite's batches are planned and cached once
        worker.evaluate(families["task_arithmetic"][0])
    rows = {}
    for family, recipes in families.items():
        times = {"in place": ([], []), "named tensors": ([], [])}
        worst = 0.0
        for recipe in recipes:  # alternate the paths, so machine noise hits both alike
            a = time_candidate(in_place, recipe)
            b = time_candidate(by_name, recipe)
            for path, (swap, total, _) in (("in place", a), ("named tensors", b)):
                times[path][0].append(swap)
                times[path][1].append(total)
            worst = max(worst, max(abs(a[2][t] - b[2][t]) for t in a[2]))
        assert worst <= 1e-5, f"{family}: the paths' scores differ by {worst}"
        row = {path: {"swap_ms": 1e3 * statistics.median(s), "candidate_ms": 1e3 * statistics.median(c)}
               for path, (s, c) in times.items()}
        row["ratio_swap"] = row["named tensors"]["swap_ms"] / row["in place"]["swap_ms"]
        row["ratio_candidate"] = row["named tensors"]["candidate_ms"] / row["in place"]["candidate_ms"]
        row["max_score_diff"] = worst
        rows[family] = row
    recipe = Recipe.model_validate(families["task_arithmetic"][0])
    copy_bytes = sum(t.nbytes for _, t in by_name.merger.merged(recipe))  # held at once by update_weights' list
    return {"zoo": str(zoo), "parameters": params, "experts": len(spec["experts"]), "n": n, "rows": rows,
            "named_tensors_copy_mb": copy_bytes / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, action="append", required=True, help="a built demo zoo (repeatable)")
    parser.add_argument("--n", type=int, default=5, help="candidates per family")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for zoo in args.zoo:
        result = bench_zoo(zoo, args.n, args.threads)
        results.append(result)
        print(f"\n{zoo}: {result['parameters'] / 1e6:.2f}M parameters, {result['experts']} experts, "
              f"{args.n} candidates per family, {args.threads} thread(s); median ms per candidate; the named-"
              f"tensors path builds a {result['named_tensors_copy_mb']:.2f} MiB copy of the merged tensors per "
              "candidate, the in-place one at most one tensor (none for task_arithmetic: written into the parameter)")
        print(f"{'family':<24}{'swap in place':>14}{'swap named':>12}{'ratio':>7}"
              f"{'cand. in place':>16}{'cand. named':>13}{'ratio':>7}")
        for family, row in result["rows"].items():
            a, b = row["in place"], row["named tensors"]
            print(f"{family:<24}{a['swap_ms']:>14.2f}{b['swap_ms']:>12.2f}{row['ratio_swap']:>7.2f}"
                  f"{a['candidate_ms']:>16.1f}{b['candidate_ms']:>13.1f}{row['ratio_candidate']:>7.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
