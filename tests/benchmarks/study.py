"""The Evo-Merging study on the demo zoo, from nothing, in one command.

    .venv/bin/python tests/benchmarks/study.py                    # small zoo, budget 200, 3 seeds
    .venv/bin/python tests/benchmarks/study.py --quick            # smoke run: tiny zoo, budget 12, 1 seed

Steps (each search run is kept under --runs; a finished run is reused, a stopped one resumed, so
the command can be re-run after an interruption and only does what is missing):

1. build the demo zoo (`evomerge.zoo.build_zoo`, reused when complete);
2. per pool (full fine-tunes, LoRA adapters):
   - references: the base and each expert alone;
   - the classic recipes at their usual settings (weights 1): average (linear, normalized),
     task arithmetic lambda 0.3, TIES density 0.2 lambda 1, DARE-TIES density 0.5 lambda 1,
     Breadcrumbs-TIES density 0.9 gamma 0.01 lambda 1, DELLA density 0.5 epsilon 0.15 lambda 1;
   - the same families with density/lambda chosen on validation: one grid run over the `classic`
     space (`points: classic`, 64 points), best point per family by validation objective;
   - Evo-Merging "neither stage" (densities 1, weights 1/N: no search at all);
   - searched, each with the same budget and seeds: LoraHub (preset `lorahub`, NGOpt, weights
     only), scaling only (evo-merging with only its weight stage, densities fixed at 1),
     denoising only (only its density stage, weights fixed at 1/N), no sign flip (preset
     `no-sign-flip`), full two-stage Evo-Merging (preset `evo-merging`). On the LoRA pool every
     evo_merging-method variant (LoraHub included) merges with `lora_merge: lowrank` (the
     paper's A = sum b_i TopMag(A_i), B = sum b_i B_i); the classic recipes merge the experts'
     dense delta-Ws (lora_merge dense, as mergekit would).
   Every search optimizes the validation loss suite (evaluators/zoo-loss.yaml: mean answer-token
   cross-entropy, + the preset's L1 term); its pick is the run's lowest objective (Run.best).
3. every picked recipe is scored on the held-out test split: zoo-loss:test (evaluators/zoo-loss.yaml
   on its test split; score = -CE per task, higher is better) and zoo-generate:test (greedy exact
   match per task);
4. writes OUT/study.md (tables), OUT/study.json (everything, with per-run seconds), and plots:
   the full method's score-over-evaluations and Pareto front (seed 0, per pool), and the
   best-so-far validation loss of every searched method (mean over seeds, band = min..max).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # run as a script from a checkout

from evomerge.baselines import reference_recipes  # noqa: E402
from evomerge.config import SearchConfig, WorkersConfig, open_pool, resolve_pool_spec  # noqa: E402
from evomerge.recipe import Recipe  # noqa: E402
from evomerge.run import REFERENCES, Run  # noqa: E402

VAL_SUITE = REPO / "evaluators" / "zoo-loss.yaml"
TEST_LOSS_SUITE = f"{VAL_SUITE}:test"  # the same suite on its held-out test split
TEST_GEN_SUITE = f"{REPO / 'evaluators' / 'zoo-generate.yaml'}:test"
BACKEND = {"name": "hf", "batch_size": 64}
POOLS = {"full": "pool-full.yaml", "lora": "pool-lora.yaml"}
FAMILIES = {"task_arithmetic": "task arithmetic", "ties": "TIES", "dare_ties": "DARE-TIES",
            "breadcrumbs_ties": "Breadcrumbs-TIES", "della": "DELLA"}
SEARCHED = ["lorahub", "scaling only", "denoising only", "no sign flip", "Evo-Merging (both stages)"]
FULL = "Evo-Merging (both stages)"


# ---- what is run ------------------------------------------------------------------------------

def searched_spaces(kind: str) -> dict[str, dict[str, Any]]:
    """The searched methods as inline spaces (a preset + overrides of its top-level keys)."""
    lowrank = {"lora_merge": "lowrank"} if kind == "lora" else {}
    return {
        "lorahub": {"preset": "lorahub", **lowrank},
        "scaling only": {"preset": "evo-merging", **lowrank,
                         "stages": [{"name": "scaling", "search": ["weight"], "fixed": {"density": 1.0}}]},
        "denoising only": {"preset": "evo-merging", **lowrank,
                           "stages": [{"name": "denoising", "search": ["density"], "fixed": {"weight": "1/N"}}]},
        "no sign flip": {"preset": "no-sign-flip", **lowrank},
        FULL: {"preset": "evo-merging", **lowrank},
    }


def usual_recipes(experts: list[str], kind: str) -> dict[str, Recipe]:
    """The classic recipes at their usual settings, every expert at weight 1, and Evo-Merging's
    starting point (no stage: densities 1, weights 1/N)."""
    def uniform(method: str, density: float = 1.0, **parameters) -> Recipe:
        fields = {"weight": 1.0} if method == "linear" else {"weight": 1.0, "density": density}
        return Recipe(method=method, experts={n: dict(fields) for n in experts}, parameters=parameters)

    n = len(experts)
    return {
        "average (linear)": uniform("linear"),
        "task arithmetic (lambda 0.3)": uniform("task_arithmetic", **{"lambda": 0.3}),
        "TIES (density 0.2, lambda 1)": uniform("ties", 0.2, **{"lambda": 1.0}),
        "DARE-TIES (density 0.5, lambda 1)": uniform("dare_ties", 0.5, **{"lambda": 1.0}),
        "Breadcrumbs-TIES (density 0.9, gamma 0.01, lambda 1)": uniform("breadcrumbs_ties", 0.9, gamma=0.01, **{"lambda": 1.0}),
        "DELLA (density 0.5, epsilon 0.15, lambda 1)": uniform("della", 0.5, epsilon=0.15, **{"lambda": 1.0}),
        "Evo-Merging, neither stage (density 1, weight 1/N)": Recipe(
            method="evo_merging", experts={e: {"weight": 1.0 / n, "density": 1.0} for e in experts},
            lora_merge="lowrank" if kind == "lora" else "dense"),
    }


# ---- running ----------------------------------------------------------------------------------

def run_search(config: SearchConfig, run_dir: Path, log) -> tuple[Run, float]:
    """Run (or reuse a finished / resume a stopped) search; returns the run and its seconds."""
    from evomerge.search import resume, search

    status = Run(run_dir).status() if (run_dir / "config.yaml").is_file() else None
    started = time.perf_counter()
    if status and status.get("state") == "finished":
        log(f"  reuse {run_dir}")
        return Run(run_dir), (Run(run_dir).read_json("study_seconds.json") or {}).get("seconds", 0.0)
    if status:
        log(f"  resume {run_dir} ({status.get('state')})")
        run = resume(run_dir)
    else:
        if run_dir.exists():
            shutil.rmtree(run_dir)
        run = search(config, run_dir)
    seconds = time.perf_counter() - started
    run.write_json("study_seconds.json", {"seconds": seconds})
    return run, seconds


class Scorer:
    """In-process workers (one per suite) that score recipes; results cached by recipe JSON."""

    def __init__(self, pool_spec: dict[str, Any], threads: int, suites: dict[str, str] | None = None):
        """`suites`: val, test_loss and test_em (default: the demo zoo's)."""
        from evomerge.worker import Worker

        suites = suites or {"val": VAL_SUITE, "test_loss": TEST_LOSS_SUITE, "test_em": TEST_GEN_SUITE}
        self.workers = {name: Worker(pool_spec, str(suite), BACKEND, threads=threads) for name, suite in suites.items()}
        self.cache: dict[tuple[str, str], dict[str, Any]] = {}
        self.seconds = 0.0

    def score(self, which: str, recipe: Recipe | dict[str, Any]) -> dict[str, Any]:
        data = recipe.model_dump(mode="json") if isinstance(recipe, Recipe) else recipe
        key = (which, json.dumps(data, sort_keys=True))
        if key not in self.cache:
            started = time.perf_counter()
            result = self.workers[which].evaluate(data)
            self.seconds += time.perf_counter() - started
            if result["status"] != "ok":
                raise RuntimeError(f"{which} scoring failed: {result.get('reason')} for {data}")
            self.cache[key] = {"scores": result["scores"], "mean": result["scalar"]}
        return self.cache[key]


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    if len(values) == 1:
        return values[0], None
    return statistics.fmean(values), statistics.stdev(values)


def summarize(scorer: Scorer, name: str, kind: str, recipes: list[dict[str, Any]], budget: int | None,
              val_objectives: list[float] | None, settings: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """A table row: one picked recipe per seed, scored on validation and both test suites."""
    val = [scorer.score("val", r) for r in recipes]
    loss = [scorer.score("test_loss", r) for r in recipes]
    em = [scorer.score("test_em", r) for r in recipes]
    tasks = sorted(loss[0]["scores"])
    row = {
        "method": name, "kind": kind, "settings": settings, "budget": budget, "seeds": len(recipes),
        "val_mean": _mean_std([v["mean"] for v in val]),
        "val_objective": _mean_std(val_objectives) if val_objectives else None,
        "test_loss_mean": _mean_std([r["mean"] for r in loss]),
        "test_em_mean": _mean_std([r["mean"] for r in em]),
        "test_loss": {t: _mean_std([r["scores"][t] for r in loss]) for t in tasks},
        "test_em": {t: _mean_std([r["scores"][t] for r in em]) for t in tasks},
        "per_seed": {"val_mean": [v["mean"] for v in val], "test_loss_mean": [r["mean"] for r in loss],
                     "test_em_mean": [r["mean"] for r in em]},
        "recipes": recipes,
    }
    row.update(extra or {})
    return row


def run_pool(kind: str, zoo: Path, args, runs: Path, log) -> dict[str, Any]:
    from evomerge.baselines import classic_settings

    pool_spec = resolve_pool_spec(POOLS[kind], zoo.resolve(), f"pool {kind}")
    experts = open_pool(pool_spec).names
    workers = WorkersConfig(count=args.workers)
    seconds: dict[str, float] = {}
    rows: list[dict[str, Any]] = []

    def config(space, budget, seed, optimizer=None, references=False) -> SearchConfig:
        return SearchConfig(name=f"study-{kind}", pool=pool_spec, space=space, suite=str(VAL_SUITE), backend=BACKEND,
                            budget=budget, seed=seed, optimizer=optimizer or {}, workers=workers, references=references)

    # the searches first (Ray workers), then the in-process scoring
    grid_budget = len(classic_settings(list(FAMILIES)))
    log(f"[{kind}] classic grid, {grid_budget} points")
    grid_run, seconds["classic grid"] = run_search(config("classic", grid_budget, 0), runs / kind / "classic-grid", log)
    searched: dict[str, list[tuple[Run, float]]] = {name: [] for name in SEARCHED}
    for seed in range(args.seeds):  # seeds outermost: an interrupted study has whole seeds done
        for name, space in searched_spaces(kind).items():
            log(f"[{kind}] {name}, seed {seed}, budget {args.budget}")
            run, secs = run_search(config(space, args.budget, seed, references=(name == FULL and seed == 0)),
                                   runs / kind / f"{name.replace(' ', '-').replace('(', '').replace(')', '')}-seed{seed}", log)
            searched[name].append((run, secs))
            seconds[f"{name} seed {seed}"] = secs
    log(f"[{kind}] scoring on validation and test")
    started = time.perf_counter()
    scorer = Scorer(pool_spec, threads=args.threads)
    for name, recipe in reference_recipes(experts).items():
        name = name if name == "base" else f"expert {name}"
        rows.append(summarize(scorer, name, "reference", [recipe.model_dump(mode="json")], None, None, "-"))
    for name, recipe in usual_recipes(experts, kind).items():
        rows.append(summarize(scorer, name, "usual", [recipe.model_dump(mode="json")], None, None, name))
    grid = [e for e in grid_run.evaluations() if e.ok]
    for method, label in FAMILIES.items():
        points = [e for e in grid if e.recipe["method"] == method]
        best = min(points, key=lambda e: e.objective)
        density = next(iter(best.recipe["experts"].values())).get("density")
        settings = f"lambda {best.recipe['parameters'].get('lambda'):.2g}" + (f", density {density:.2g}" if method != "task_arithmetic" else "")
        rows.append(summarize(scorer, f"{label} (tuned on val: {settings})", "grid", [best.recipe], len(points),
                              [best.objective], settings, {"grid_points": len(points)}))
    for name, pairs in searched.items():
        bests = [run.best(1)[0] for run, _ in pairs]
        used = [len(run.evaluations()) for run, _ in pairs]
        failed = [sum(not e.ok for e in run.evaluations()) for run, _ in pairs]
        rows.append(summarize(scorer, name, "searched", [b.recipe for b in bests], max(used),
                              [b.objective for b in bests], "", {"failed": failed, "runs": [str(r.path) for r, _ in pairs],
                                                                 "budget_used": used}))
    seconds["scoring"] = time.perf_counter() - started
    return {"experts": experts, "rows": rows, "seconds": seconds, "grid_run": str(grid_run.path),
            "searched_runs": {n: [str(r.path) for r, _ in p] for n, p in searched.items()},
            "references_val": (searched[FULL][0][0].read_json(REFERENCES) or {})}


# ---- output -----------------------------------------------------------------------------------

def _fmt(pair, digits: int = 3) -> str:
    if pair is None:
        return "-"
    mean, std = pair
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def pool_table(kind: str, result: dict[str, Any]) -> str:
    rows = result["rows"]
    tasks = sorted(rows[0]["test_loss"])
    head = ["method", "budget", "seeds", "val objective", "val mean -CE", "test mean -CE", "test mean EM",
            *[f"{t} -CE / EM" for t in tasks]]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join([" --- "] + [" ---: "] * (len(head) - 1)) + "|"]
    for row in rows:
        budget = "-" if row["budget"] is None else str(row["budget"])
        cells = [row["method"], budget, str(row["seeds"]), _fmt(row["val_objective"]), _fmt(row["val_mean"]),
                 _fmt(row["test_loss_mean"]), _fmt(row["test_em_mean"]),
                 *[f"{_fmt(row['test_loss'][t], 2)} / {_fmt(row['test_em'][t], 2)}" for t in tasks]]
        if row["kind"] == "searched":
            cells[0] = f"**{cells[0]}**"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparisons(result: dict[str, Any]) -> str:
    """The study's questions answered from the numbers (test mean -CE; EM in brackets)."""
    rows = {r["method"]: r for r in result["rows"]}

    def test(row) -> str:
        return f"{_fmt(row['test_loss_mean'])} [EM {_fmt(row['test_em_mean'])}]"

    neither = next(r for n, r in rows.items() if n.startswith("Evo-Merging, neither"))
    ablation = [("both stages", rows[FULL]), ("scaling only", rows["scaling only"]),
                ("denoising only", rows["denoising only"]), ("neither", neither), ("no sign flip", rows["no sign flip"])]
    order = sorted(ablation, key=lambda kv: -kv[1]["test_loss_mean"][0])
    paper = ["both stages", "scaling only", "denoising only", "neither"]
    got = [k for k, _ in order if k in paper]
    score = {k: r["test_loss_mean"][0] for k, r in ablation}
    broken = [f"{a} {score[a]:.3f} vs {b} {score[b]:.3f}" for a, b in zip(paper, paper[1:]) if not score[a] > score[b]]
    grid = [r for r in result["rows"] if r["kind"] == "grid"]
    best_grid = max(grid, key=lambda r: r["val_mean"][0])
    experts = [r for r in result["rows"] if r["method"].startswith("expert ")]
    best_expert_val = max(experts, key=lambda r: r["val_mean"][0])
    best_expert_test = max(experts, key=lambda r: r["test_loss_mean"][0])
    merges = [r for r in result["rows"] if r["kind"] in ("usual", "grid", "searched")]
    best_merge_val = max(merges, key=lambda r: r["val_mean"][0])
    full_seeds = rows[FULL]["per_seed"]["test_loss_mean"]
    lines = [
        "- ablation, test mean -CE (higher is better), ordered: "
        + " > ".join(f"{k} {_fmt(r['test_loss_mean'])}" for k, r in order),
        f"  - the paper's order (both > scaling only > denoising only > neither) "
        f"{'holds' if not broken else 'does not hold'} here"
        f"{'' if not broken else ' (not strictly above: ' + '; '.join(broken) + ')'};"
        f" both vs no sign flip: {rows[FULL]['test_loss_mean'][0] - rows['no sign flip']['test_loss_mean'][0]:+.3f}",
        f"- full method {test(rows[FULL])} vs the best classic recipe chosen on validation,"
        f" {best_grid['method']}: {test(best_grid)}; full method's seeds {', '.join(f'{v:.3f}' for v in full_seeds)}"
        f" ({sum(v > best_grid['test_loss_mean'][0] for v in full_seeds)}/{len(full_seeds)} seeds above it)",
        f"- base {test(rows['base'])}; best single expert on validation {best_expert_val['method']} {test(best_expert_val)}"
        f" (best on test: {best_expert_test['method']} {test(best_expert_test)})",
        f"- best merge on validation: {best_merge_val['method']} {test(best_merge_val)};"
        f" plain average {test(rows['average (linear)'])}",
        f"- merging beats the best single expert (chosen on validation) on the test mean -CE:"
        f" {'yes' if best_merge_val['test_loss_mean'][0] > best_expert_val['test_loss_mean'][0] else 'no'};"
        f" beats the base: {'yes' if best_merge_val['test_loss_mean'][0] > rows['base']['test_loss_mean'][0] else 'no'}"
        f" ({best_merge_val['test_loss_mean'][0] - rows['base']['test_loss_mean'][0]:+.3f})",
    ]
    return "\n".join(lines)


def write_markdown(out: Path, results: dict[str, Any], plots: dict[str, list[str]]) -> None:
    meta = results["meta"]
    parts = [
        "# Evo-Merging study on the demo zoo",
        "",
        f"Reproduce: `{meta['command']}` ({meta['seconds'] / 60:.0f} min on {meta['cores']} CPU cores,"
        f" {meta['workers']} workers; zoo `{meta['zoo_size']}`).",
        "",
        f"Every searched method: budget {meta['budget']} evaluations of the validation loss suite"
        f" (`evaluators/zoo-loss.yaml`), seeds 0..{meta['seeds'] - 1}; its pick is the run's lowest"
        " objective (validation mean CE + the preset's L1 term). Classic families tuned on validation:"
        " best point of the `classic` grid per family (budget = that family's grid points). Test columns:"
        " `zoo-loss:test` (-CE per answer token, higher is better) and"
        " `zoo-generate:test` (greedy exact match), the test split of each suite. Searched rows: mean ± sample std over"
        " seeds; the others are deterministic (one value). `val objective` = -(val mean score) + L1 term"
        " as the search saw it; `val mean -CE` = the validation loss suite re-scored in-process.",
        "",
    ]
    for kind, result in results["pools"].items():
        parts += [f"## {kind} pool ({', '.join(result['experts'])})", "", pool_table(kind, result), "",
                  comparisons(result), ""]
        for plot in plots.get(kind, []):
            parts.append(f"![{Path(plot).stem}]({Path(plot).name})")
        parts.append("")
    if results.get("findings"):
        parts += ["## Findings", "", results["findings"], ""]
    (out / "study.md").write_text("\n".join(parts))


def best_so_far_plot(kind: str, result: dict[str, Any], path: Path) -> Path:
    """`evomerge show RUNS... --plot`'s comparison plot of the searched runs, with the baselines."""
    from evomerge.plots import plot_compare

    rows = {r["method"]: r for r in result["rows"]}
    grid = [r for r in result["rows"] if r["kind"] == "grid"]
    best_grid = max(grid, key=lambda r: r["val_mean"][0])
    experts = [r for r in result["rows"] if r["method"].startswith("expert ")]
    best_expert = max(experts, key=lambda r: r["val_mean"][0])
    neither = next(r for n, r in rows.items() if n.startswith("Evo-Merging, neither"))
    baselines = {f"best classic on val: {best_grid['method']}": best_grid["val_mean"][0],
                 f"best single expert on val: {best_expert['method']}": best_expert["val_mean"][0],
                 "neither stage (density 1, weight 1/N)": neither["val_mean"][0],
                 "base": rows["base"]["val_mean"][0]}
    runs = [Run(Path(d)) for dirs in result["searched_runs"].values() for d in dirs]
    return plot_compare(runs, path, baselines, title=f"{kind} pool: best-so-far validation mean -CE, "
                                                     "mean over seeds (band: min..max)")


def make_plots(kind: str, result: dict[str, Any], out: Path) -> list[str]:
    import tempfile

    from evomerge.plots import plot_run

    paths = []
    full_run = Run(Path(result["searched_runs"][FULL][0]))
    with tempfile.TemporaryDirectory() as tmp:
        for made in plot_run(full_run, Path(tmp)):
            target = out / f"{kind}_evo-merging_seed0_{made.name}"
            shutil.copyfile(made, target)
            paths.append(str(target))
    paths.append(str(best_so_far_plot(kind, result, out / f"{kind}_best_so_far.png")))
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, default=None, help="demo zoo dir, built if missing (default: REPO/zoo; --quick: /tmp/evomerge-study-quick/zoo)")
    parser.add_argument("--out", type=Path, default=None, help="results dir (default tests/benchmarks/results; --quick: /tmp/evomerge-study-quick/results)")
    parser.add_argument("--runs", type=Path, default=None, help="run dirs (default REPO/runs/study; --quick: /tmp/evomerge-study-quick/runs)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per searched method (default 3; --quick 1)")
    parser.add_argument("--budget", type=int, default=None, help="evaluations per searched run (default 200; --quick 12)")
    parser.add_argument("--pools", default="full,lora")
    parser.add_argument("--workers", type=int, default=2, help="Ray CPU workers")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the in-process test scoring")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny zoo, budget 12, 1 seed")
    parser.add_argument("--report-only", action="store_true", help="rewrite study.md and the plots from OUT/study.json")
    args = parser.parse_args(argv)
    quick_root = Path("/tmp/evomerge-study-quick")
    size = "tiny" if args.quick else "small"
    zoo = args.zoo or (quick_root / "zoo" if args.quick else REPO / "zoo")
    out = args.out or (quick_root / "results" if args.quick else REPO / "tests" / "benchmarks" / "results")
    runs = args.runs or (quick_root / "runs" if args.quick else REPO / "runs" / "study")
    args.seeds = args.seeds or (1 if args.quick else 3)
    args.budget = args.budget or (12 if args.quick else 200)
    out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        results = json.loads((out / "study.json").read_text())
        plots = {kind: make_plots(kind, result, out) for kind, result in results["pools"].items()}
        findings = out / "findings.md"
        if findings.is_file():
            results["findings"] = findings.read_text().strip()
        (out / "study.json").write_text(json.dumps(results, indent=1) + "\n")
        write_markdown(out, results, plots)
        return
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {message}", flush=True)

    from evomerge.zoo import build_zoo

    log(f"zoo ({size}) in {zoo}")
    if not (zoo / "scores.json").is_file():
        build_zoo(zoo, size=size, progress=False)
    zoo_seconds = time.perf_counter() - started
    zoo_meta = json.loads((zoo / "scores.json").read_text())["meta"]
    results: dict[str, Any] = {"pools": {}}
    plots: dict[str, list[str]] = {}
    for kind in args.pools.split(","):
        results["pools"][kind] = run_pool(kind, zoo, args, runs, log)
        plots[kind] = make_plots(kind, results["pools"][kind], out)
    import os

    results["meta"] = {
        "command": " ".join(["python tests/benchmarks/study.py", *(argv if argv is not None else sys.argv[1:])]),
        "seconds": time.perf_counter() - started, "zoo_build_seconds": zoo_seconds, "zoo": str(zoo),
        "zoo_size": zoo_meta["size"], "zoo_meta": zoo_meta, "budget": args.budget, "seeds": args.seeds,
        "workers": args.workers, "cores": len(os.sched_getaffinity(0)), "runs": str(runs),
    }
    findings = out / "findings.md"  # written by hand after a run; kept in study.md
    if findings.is_file():
        results["findings"] = findings.read_text().strip()
    (out / "study.json").write_text(json.dumps(results, indent=1) + "\n")
    write_markdown(out, results, plots)
    log(f"wrote {out / 'study.md'}, {out / 'study.json'} and {sum(len(p) for p in plots.values())} plots")


if __name__ == "__main__":
    main()
