"""Benchmark the hf backend on the demo zoo: re-scoring after an in-place weight swap vs reloading.

A worker scores candidate after candidate. With the `hf` backend it keeps one model resident and
copies each candidate's weights into it (param.data.copy_), so a re-score runs only the forward
passes (the suite's tokenization and padded batches are cached). The alternative reloads the model
from disk for every candidate. Candidates here are the zoo's full experts (one per task).

    python tests/benchmarks/bench_eval.py --zoo /tmp/zoo-tiny --size tiny --n 100

Prints the loss-suite (4 tasks x n docs) time per candidate both ways and the ratio, then the time
of a 4 x n generate_until suite.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run as a script from a checkout

from evomerge.backends.hf import HFBackend  # noqa: E402
from evomerge.evaluator import evaluate, load_suite  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, default=Path("/tmp/evomerge-eval-bench/zoo-tiny"))
    parser.add_argument("--size", default="tiny", help="zoo size, built if --zoo is missing")
    parser.add_argument("--n", type=int, default=100, help="docs per task")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if not (args.zoo / "base").is_dir():
        from evomerge.zoo import build_zoo

        print(f"building the {args.size} zoo in {args.zoo} ...")
        build_zoo(args.zoo, size=args.size, progress=False)
    experts = sorted(p for p in (args.zoo / "full").iterdir() if p.is_dir())
    loss_suite = load_suite(ROOT / "evaluators/zoo-loss.yaml", limit=args.n)
    gen_suite = load_suite(ROOT / "evaluators/zoo-generate.yaml", limit=args.n)
    docs = sum(min(args.n, len(loss_suite.docs(t.task))) for t in loss_suite.tasks)
    print(f"zoo {args.zoo} ({len(experts)} experts), loss suite {len(loss_suite.tasks)} tasks x {args.n} "
          f"= {docs} docs, batch {args.batch_size}, {args.threads} thread(s), {args.device}")

    # in place: one resident backend; weights read into memory beforehand (a worker gets them
    # from materialize), the timed part is the copy + the evaluation
    states = {e.name: load_file(str(next(e.glob("*.safetensors")))) for e in experts}
    backend = HFBackend(args.zoo / "base", batch_size=args.batch_size, device=args.device)
    started = time.perf_counter()
    evaluate(loss_suite, backend)
    cold = time.perf_counter() - started
    in_place, scores_in_place = [], {}
    for _ in range(2):
        for name, state in states.items():
            started = time.perf_counter()
            backend.update_weights(state.items())
            scores_in_place[name] = evaluate(loss_suite, backend).scalar
            in_place.append(time.perf_counter() - started)

    reload, scores_reload = [], {}
    for _ in range(2):
        for expert in experts:
            started = time.perf_counter()
            fresh = HFBackend(expert, batch_size=args.batch_size, device=args.device)
            scores_reload[expert.name] = evaluate(loss_suite, fresh).scalar
            reload.append(time.perf_counter() - started)
            del fresh
    for name in scores_in_place:
        assert abs(scores_in_place[name] - scores_reload[name]) <= 1e-4 * abs(scores_reload[name]), name

    swap = statistics.median(in_place)
    load = statistics.median(reload)
    print(f"loss suite, first score (tokenize + forward): {cold:.3f} s")
    print(f"loss suite per candidate, in-place swap + re-score: {swap:.3f} s (median of {len(in_place)})")
    print(f"loss suite per candidate, reload from disk + score: {load:.3f} s (median of {len(reload)})")
    print(f"ratio reload / in-place: {load / swap:.1f}x")

    started = time.perf_counter()
    result = evaluate(gen_suite, backend)
    first = time.perf_counter() - started
    started = time.perf_counter()
    evaluate(gen_suite, backend)
    again = time.perf_counter() - started
    print(f"generate_until suite {len(gen_suite.tasks)} x {args.n} (max_gen_toks 12): first {first:.2f} s,"
          f" again {again:.2f} s; exact_match of expert {experts[-1].name}: "
          + ", ".join(f"{k} {v.metrics['exact_match']:.2f}" for k, v in result.tasks.items()))


if __name__ == "__main__":
    main()
