"""Merge-engine benchmarks (results go to the README; these are not tests).

    .venv/bin/python tests/benchmarks/bench_merge.py [--quick] [--out /tmp/evomerge-bench]

1. disk:     `evomerge merge` vs `mergekit-yaml` on one TIES config (4 experts, density 0.5, weights
             0.3/0.3/0.2/0.2, lambda 1), each a subprocess writing to disk, interleaved; wall time,
             CPU time, max RSS, and how far the two outputs are apart.
2. resident: ResidentMerger.apply of a new recipe into a live float32 model, per method, against a
             memory-bandwidth floor measured in the same loop (one read of every resident byte).
3. rss:      max RSS of `evomerge merge` (TIES) to disk with 2 and with 8 experts of one model size.

Models are random-init Llama checkpoints in bfloat16 with experts = base + seeded noise, built once
under OUT/models (bench_merge_models.py). mergekit runs from its own venv (--mergekit, default
/tmp/mkvenv/bin/mergekit-yaml). Writes OUT/results[-quick].json and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.benchmarks.bench_merge_models import build_pool, n_params  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
WEIGHTS = (0.3, 0.3, 0.2, 0.2)
DENSITY = 0.5
PROFILES = {  # model sizes per benchmark (see bench_merge_models.SIZES)
    "full": {"disk": "110m", "resident": "42m", "rss": "110m", "repeats": 2, "resident_repeats": 5},
    "quick": {"disk": "5m", "resident": "1m", "rss": "5m", "repeats": 1, "resident_repeats": 3},
}
MERGEKIT_FLAGS = ["--quiet"]  # CPU defaults otherwise: no --cuda, default --out-shard-size, no --async-write


# ---- subprocesses with their own rusage ------------------------------------------------------
def run_timed(cmd: list[str], log: Path) -> dict:
    """Run cmd; wall seconds, user+sys CPU seconds and max RSS (MiB) of that child alone (wait4)."""
    with open(log, "w") as out:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}); see {log}:\n{log.read_text()[-2000:]}")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "max_rss_mib": usage.ru_maxrss / 1024}


def warm_cache(paths: list[str]) -> None:
    """Read every input file once so that both tools start from a warm page cache."""
    for path in paths:
        for file in Path(path).iterdir():
            with open(file, "rb") as handle:
                while handle.read(64 << 20):
                    pass


def mergekit_yaml(spec: dict, names: list[str], weights, density: float) -> dict:
    return {
        "merge_method": "ties", "base_model": spec["base"], "dtype": "float32", "out_dtype": "bfloat16",
        "parameters": {"lambda": 1.0},
        "models": [{"model": spec["experts"][n], "parameters": {"weight": w, "density": density}}
                   for n, w in zip(names, weights)],
    }


def evomerge_cmd(config: Path, out: Path) -> list[str]:
    # evomerge reads the mergekit YAML's `dtype` (float32) as its output dtype and ignores out_dtype,
    # so the output dtype is given on the command line; it accumulates in float32 regardless.
    return [sys.executable, "-m", "evomerge.cli", "merge", str(config), "-o", str(out), "--dtype", "bfloat16"]


def compare_outputs(a: Path, b: Path) -> dict:
    """Max |a - b| over every tensor (in float32), and the fraction of entries that differ at all."""
    from safetensors import safe_open

    def tensors(path):
        files = sorted(path.glob("*.safetensors"))
        for file in files:
            with safe_open(str(file), "pt") as handle:
                for name in handle.keys():
                    yield name, handle.get_tensor(name)

    theirs = dict(tensors(b))
    worst, differing, total, worst_name = 0.0, 0, 0, None
    for name, tensor in tensors(a):
        diff = (tensor.float() - theirs.pop(name).float()).abs()
        if diff.max().item() > worst:
            worst, worst_name = diff.max().item(), name
        differing += int((diff > 0).sum())
        total += diff.numel()
    assert not theirs, f"tensors only in {b}: {sorted(theirs)[:3]}"
    return {"max_abs_diff": worst, "worst_tensor": worst_name, "frac_entries_differing": differing / total,
            "entries": total}


# ---- 1. evomerge vs mergekit -----------------------------------------------------------------
def bench_disk(work: Path, size: str, repeats: int, mergekit: str, log) -> dict:
    import yaml

    spec = build_pool(work, size, "bfloat16", 4, log)
    names = list(spec["experts"])[:4]
    config = work / f"ties-{size}.yaml"
    config.write_text(yaml.safe_dump(mergekit_yaml(spec, names, WEIGHTS, DENSITY), sort_keys=False))
    warm_cache([spec["base"], *spec["experts"].values()])
    runs: dict[str, list[dict]] = {"evomerge": [], "mergekit": []}
    outs = {"evomerge": work / "out-evomerge", "mergekit": work / "out-mergekit"}
    for rep in range(repeats):
        order = ["evomerge", "mergekit"] if rep % 2 == 0 else ["mergekit", "evomerge"]
        for tool in order:
            shutil.rmtree(outs[tool], ignore_errors=True)
            cmd = (evomerge_cmd(config, outs[tool]) if tool == "evomerge"
                   else [mergekit, str(config), str(outs[tool]), *MERGEKIT_FLAGS])
            result = run_timed(cmd, work / f"{tool}.log")
            log(f"  disk {size} rep {rep} {tool}: {result['wall_s']:.1f}s wall, {result['cpu_s']:.1f}s cpu, "
                f"{result['max_rss_mib']:.0f} MiB")
            runs[tool].append(result)
    best = {tool: min(r["wall_s"] for r in rs) for tool, rs in runs.items()}
    return {
        "model": size, "params": n_params(Path(spec["base"])), "storage_dtype": "bfloat16", "experts": 4,
        "config": config.read_text(), "evomerge_cmd": " ".join(evomerge_cmd(config, Path("OUT"))),
        "mergekit_cmd": " ".join([mergekit, str(config), "OUT", *MERGEKIT_FLAGS]),
        "runs": runs, "best_wall_s": best, "speedup": best["mergekit"] / best["evomerge"],
        "agreement": compare_outputs(outs["evomerge"], outs["mergekit"]),
    }


# ---- 2. resident re-merge vs a bandwidth floor ----------------------------------------------
RESIDENT_METHODS = {  # method: extra recipe parameters
    "linear": {}, "task_arithmetic": {}, "ties": {}, "dare_ties": {}, "della": {"epsilon": 0.1},
    "breadcrumbs": {}, "evo_merging": {},
}
LINEAR = ("linear", "task_arithmetic")


def resident_recipe(method: str, names: list[str], seed: int):
    from evomerge.recipe import Recipe

    gen = torch.Generator().manual_seed(seed)  # a new recipe each time: fresh weights and densities
    experts = {}
    for name, weight in zip(names, WEIGHTS):
        w = weight + 0.1 * float(torch.rand(1, generator=gen))
        d = 0.4 + 0.2 * float(torch.rand(1, generator=gen))
        experts[name] = {"weight": w} if method in LINEAR else {"weight": w, "density": d}
    return Recipe(method=method, experts=experts, parameters=RESIDENT_METHODS[method], seed=seed)


def floor_pass(tensors: list[torch.Tensor]) -> float:
    """One read of every resident byte: a sum per tensor."""
    total = torch.zeros(())
    for t in tensors:
        total += t.sum()
    return float(total)


def bench_resident(work: Path, size: str, repeats: int, log) -> dict:
    from transformers import AutoModelForCausalLM

    from evomerge.config import open_pool
    from evomerge.materialize import ResidentMerger, iter_merged

    spec = build_pool(work, size, "bfloat16", 4, log)
    pool = open_pool(spec)
    started = time.perf_counter()
    merger = ResidentMerger(pool)
    load_s = time.perf_counter() - started
    held = merger.source.held()
    resident = sum(t.nbytes for t in held)
    model = AutoModelForCausalLM.from_pretrained(spec["base"], dtype=torch.float32)
    names = list(pool.experts)
    times: dict[str, list[float]] = {"floor": [], **{m: [] for m in RESIDENT_METHODS}}
    for rep in range(repeats):
        for method in ["floor", *RESIDENT_METHODS]:
            if method not in ("floor", *LINEAR) and rep >= 2:
                continue  # the sparsifying methods are far from the floor; two runs say enough
            started = time.perf_counter()
            if method == "floor":
                floor_pass(held)
            else:
                merger.apply(resident_recipe(method, names, seed=rep), model)
            times[method].append(time.perf_counter() - started)
        log(f"  resident {size} rep {rep}: floor {min(times['floor']) * 1e3:.0f} ms, "
            f"linear {min(times['linear']) * 1e3:.0f} ms")
    # the fast path must give what the streamed merge gives
    agreement = {}
    for method in LINEAR:
        recipe = resident_recipe(method, names, seed=99)
        merger.apply(recipe, model)
        live = model.state_dict()
        agreement[method] = max((live[n] - t).abs().max().item() for n, t in iter_merged(recipe, pool))  # float32
    floor = min(times["floor"])
    return {
        "model": size, "params": n_params(Path(spec["base"])), "experts": len(names), "resident_bytes": resident,
        "load_s": load_s, "torch_threads": torch.get_num_threads(), "floor_s": floor,
        "floor_gb_s": resident / floor / 1e9,
        "methods": {m: {"best_s": min(t), "runs_s": t, "ratio_to_floor": min(t) / floor}
                    for m, t in times.items() if m != "floor"},
        "fast_path_vs_streamed_max_abs_diff": agreement,
    }


# ---- 3. RSS vs number of experts -------------------------------------------------------------
def bench_rss(work: Path, size: str, log) -> dict:
    import yaml

    spec = build_pool(work, size, "bfloat16", 8, log)
    rows = {}
    for n in (2, 8):
        names = list(spec["experts"])[:n]
        weights = [1.0 / n] * n
        config = work / f"ties-{size}-{n}x.yaml"
        config.write_text(yaml.safe_dump(mergekit_yaml(spec, names, weights, DENSITY), sort_keys=False))
        out = work / f"out-rss-{n}"
        shutil.rmtree(out, ignore_errors=True)
        rows[n] = run_timed(evomerge_cmd(config, out), work / f"rss-{n}.log")
        log(f"  rss {size} {n} experts: {rows[n]['max_rss_mib']:.0f} MiB, {rows[n]['wall_s']:.1f}s")
    base_file = Path(spec["base"]) / "model.safetensors"
    params = n_params(Path(spec["base"]))
    return {"model": size, "params": params, "model_file_mib": base_file.stat().st_size / 2**20,
            "model_fp32_mib": params * 4 / 2**20, "experts": rows}


# ---- report ------------------------------------------------------------------------------------
def tables(results: dict) -> str:
    lines = []
    if "disk" in results:
        d = results["disk"]
        lines += [f"### evomerge merge vs mergekit-yaml: TIES, 4 experts x {d['params'] / 1e6:.0f}M params "
                  f"(bfloat16 on disk, float32 compute, bfloat16 out)", "",
                  "| tool | wall s (best) | runs wall s | CPU s | max RSS MiB |", "|---|---|---|---|---|"]
        for tool in ("evomerge", "mergekit"):
            runs = d["runs"][tool]
            walls = ", ".join(f"{r['wall_s']:.1f}" for r in runs)
            lines.append(f"| {tool} | {d['best_wall_s'][tool]:.1f} | {walls} | "
                         f"{min(r['cpu_s'] for r in runs):.1f} | {max(r['max_rss_mib'] for r in runs):.0f} |")
        a = d["agreement"]
        lines += ["", f"speedup (mergekit / evomerge wall): **{d['speedup']:.2f}x**; outputs: max |diff| "
                      f"{a['max_abs_diff']:.2e} ({a['worst_tensor']}), {a['frac_entries_differing']:.2e} of "
                      f"{a['entries'] / 1e6:.0f}M entries differ", ""]
    if "resident" in results:
        r = results["resident"]
        lines += [f"### Resident re-merge (ResidentMerger.apply into a float32 model), {r['experts']} experts x "
                  f"{r['params'] / 1e6:.0f}M params, {r['resident_bytes'] / 2**20:.0f} MiB resident", "",
                  f"floor (one read of every resident byte): {r['floor_s'] * 1e3:.0f} ms "
                  f"({r['floor_gb_s']:.1f} GB/s); torch threads {r['torch_threads']}", "",
                  "| method | best ms | x floor |", "|---|---|---|"]
        for method, m in r["methods"].items():
            lines.append(f"| {method} | {m['best_s'] * 1e3:.0f} | {m['ratio_to_floor']:.1f} |")
        diffs = ", ".join(f"{k} {v:.1e}" for k, v in r["fast_path_vs_streamed_max_abs_diff"].items())
        lines += ["", f"fast path vs streamed merge, max |diff|: {diffs}", ""]
    if "rss" in results:
        s = results["rss"]
        lines += [f"### Peak RSS of evomerge merge (TIES) to disk, {s['params'] / 1e6:.0f}M-param model "
                  f"({s['model_file_mib']:.0f} MiB bfloat16 file, {s['model_fp32_mib']:.0f} MiB in float32)", "",
                  "| experts | max RSS MiB | wall s |", "|---|---|---|"]
        for n, row in s["experts"].items():
            lines.append(f"| {n} | {row['max_rss_mib']:.0f} | {row['wall_s']:.1f} |")
        lines.append("")
    return "\n".join(lines)


def machine() -> dict:
    import safetensors
    import transformers

    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "safetensors": safetensors.__version__, "mem_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small models: a smoke run in a minute or two")
    parser.add_argument("--out", type=Path, default=Path("/tmp/evomerge-bench"), help="work dir (models cached here) and results")
    parser.add_argument("--only", default="disk,resident,rss", help="comma-separated subset of disk,resident,rss")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved runs per tool in the disk benchmark")
    parser.add_argument("--mergekit", default="/tmp/mkvenv/bin/mergekit-yaml")
    args = parser.parse_args(argv)
    profile = PROFILES["quick" if args.quick else "full"]
    work = args.out
    work.mkdir(parents=True, exist_ok=True)
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    results: dict = {"machine": machine(), "profile": "quick" if args.quick else "full"}
    only = set(args.only.split(","))
    if "disk" in only:
        results["disk"] = bench_disk(work, profile["disk"], args.repeats or profile["repeats"], args.mergekit, log)
    if "resident" in only:
        results["resident"] = bench_resident(work, profile["resident"], profile["resident_repeats"], log)
    if "rss" in only:
        results["rss"] = bench_rss(work, profile["rss"], log)
    out = work / f"results{'-quick' if args.quick else ''}.json"
    out.write_text(json.dumps(results, indent=1, default=str))
    print(tables(results))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
