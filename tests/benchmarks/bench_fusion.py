"""Fusion of the demo zoo's experts served as API models against a weight merge of the same experts.

    # a vLLM server with the zoo's base and LoRA experts as model names (see README, "Fusion"):
    python -m vllm.entrypoints.openai.api_server --model ZOO/base --served-model-name base \\
        --dtype float32 --max-model-len 64 --max-logprobs 20 --enable-lora --max-lora-rank 8 --max-loras 4 \\
        --lora-modules add=ZOO/lora/add reverse=ZOO/lora/reverse upper=ZOO/lora/upper next=ZOO/lora/next --port 8311
    .venv/bin/python tests/benchmarks/bench_fusion.py --zoo ZOO --endpoint http://127.0.0.1:8311 --budget 40

The three searches run on the loss suite's validation split (`--limit` docs per task) with the
same budget: a fusion with the preset `fusion` (CMA-ES over a gate and a signed weight per model,
temperature and the plausibility cut), routing with `fusion-routing` (one model per task), and the
merge with `evo-merging` on the zoo's LoRA pool (hf backend). The best of each is then scored on the held-out test split. Serving cost per query: a
merged model answers with one call to one model; a fusion calls every model it queries. Prices
are made up but in proportion (the base at half an expert's); what counts is the ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import yaml  # noqa: E402

from evomerge.config import load_search_config  # noqa: E402
from evomerge.recipe import Recipe  # noqa: E402
from evomerge.search import search  # noqa: E402

TASKS = ("add", "reverse", "upper", "next")
PRICE = {"in": 0.2, "out": 0.8}  # USD per million tokens, an expert; the base costs half


def write_suite(directory: Path, zoo: Path, limit: int) -> Path:
    suite = {"split": "validation", "defaults": {"output_type": "loss", "doc_to_text": "question",
                                                 "doc_to_target": "answer", "target_delimiter": "", "limit": limit},
             "tasks": [{"task": t, "dataset_path": str(zoo / "data" / t / "{split}.jsonl")} for t in TASKS]}
    (directory / "suite.yaml").write_text(yaml.safe_dump(suite))
    return directory / "suite.yaml"


def fusion_pool(endpoint: str) -> dict:
    half = {"base": 0.5}
    return {"models": {m: {"endpoint": endpoint, "model": m, "price_in": PRICE["in"] * half.get(m, 1.0),
                           "price_out": PRICE["out"] * half.get(m, 1.0)} for m in ("base", *TASKS)}}


def run_search(directory: Path, pool, space: str, suite: Path, budget: int, seed: int):
    from evomerge.run import Run

    if (directory / f"run-{space}" / "evaluations.jsonl").is_file():  # --work: a run kept from before
        return Run.open(directory / f"run-{space}")
    config = {"pool": pool, "space": space, "suite": str(suite), "budget": budget, "seed": seed,
              "workers": {"count": 1}}
    (directory / f"{space}.yaml").write_text(yaml.safe_dump(config))
    return search(load_search_config(directory / f"{space}.yaml"), directory / f"run-{space}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, required=True)
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--budget", type=int, default=40)
    parser.add_argument("--limit", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None, help="keep the two runs here (default: a temporary dir)")
    parser.add_argument("--out", type=Path, default=REPO / "tests" / "benchmarks" / "results" / "bench_fusion")
    args = parser.parse_args()
    zoo = args.zoo.resolve()
    from evomerge.fusion.worker import FusionWorker
    from evomerge.worker import Worker

    with tempfile.TemporaryDirectory() as tmp:
        directory = args.work or Path(tmp)
        directory.mkdir(parents=True, exist_ok=True)
        suite = write_suite(directory, zoo, args.limit)
        fused = run_search(directory, fusion_pool(args.endpoint), "fusion", suite, args.budget, args.seed)
        routed = run_search(directory, fusion_pool(args.endpoint), "fusion-routing", suite, args.budget, args.seed)
        merged = run_search(directory, str(zoo / "pool-lora.yaml"), "evo-merging", suite, args.budget, args.seed)
        print(f"searches done: {fused.path}, {routed.path}, {merged.path}", flush=True)
        test = f"{suite}:test"
        fusion_best, merge_best = fused.best(1)[0], merged.best(1)[0]
        fusion_worker = FusionWorker(fusion_pool(args.endpoint), test, "log_linear", None)
        rows = {"fusion, log_linear (best of the search)": fusion_worker.evaluate(fusion_best.recipe),
                "fusion, routing per task (best of the search)": FusionWorker(
                    fusion_pool(args.endpoint), test, "route", None).evaluate(routed.best(1)[0].recipe)}
        for name in ("base", *TASKS):
            rows[f"{name} alone (API model)"] = fusion_worker.evaluate(_alone(name))
        from evomerge.config import resolve_pool_spec

        spec = resolve_pool_spec(str(zoo / "pool-lora.yaml"), Path.cwd(), "pool")
        merge_worker = Worker(spec, test, {"name": "hf"})
        rows["weight merge (evo-merging, best of the search)"] = merge_worker.evaluate(merge_best.recipe)
    one_query = rows["add alone (API model)"]["cost"]["serving_usd_per_query"]
    report = {"budget": args.budget, "limit": args.limit, "seed": args.seed, "rows": {}}
    lines = [f"Loss suite, test split ({args.limit} docs per task), scores -(mean CE per token), higher is better; "
             f"every search: budget {args.budget} on validation, seed {args.seed}.", "",
             "| model | " + " | ".join(TASKS) + " | mean | models used (over all tasks) | serving cost per query |",
             "| --- | " + " | ".join("---:" for _ in TASKS) + " | ---: | ---: | ---: |"]
    for name, result in rows.items():
        if result["status"] != "ok":
            raise SystemExit(f"{name}: {result.get('reason')}")
        scores = result["scores"]
        mean = sum(scores.values()) / len(scores)
        queried = len(result["cost"]["queried"]) if "cost" in result else 1
        usd = result["cost"]["serving_usd_per_query"] if "cost" in result else one_query
        report["rows"][name] = {"scores": scores, "mean": mean, "queried": queried, "usd_per_query": usd}
        lines.append(f"| {name} | " + " | ".join(f"{scores[t]:.3f}" for t in TASKS)
                     + f" | {mean:.3f} | {queried} | {usd / one_query:.2f}x |")
    lines += ["", "Serving cost relative to one query to one expert (a merged model costs 1x: one model, one call; "
              "the base's price is half an expert's). The log_linear fusion's weights and gates: "
              + ", ".join(f"{name} {p['weight']:+.2f} (gate {p['density']:.2f})"
                          for name, p in fusion_best.recipe["experts"].items()) + "."]
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _alone(name: str) -> dict:
    return Recipe(method="log_linear", experts={m: {"weight": float(m == name), "density": float(m == name)}
                                                for m in ("base", *TASKS)},
                  parameters={"temperature": 1.0, "alpha": 0.0}).model_dump()


if __name__ == "__main__":
    main()
