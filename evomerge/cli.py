"""The `evomerge` command line: each command is a thin function over the library.

Errors a user can cause are EvomergeError: printed as one line, exit code 2. Set EVOMERGE_DEBUG=1
for the traceback.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console

from evomerge.errors import EvomergeError

app = typer.Typer(
    help="Search for model-merge recipes (Evo-Merging, TIES, DARE, ...) over full and LoRA pools.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True, soft_wrap=True)  # messages stay one line in a log file too (no wrap at 80 columns)


def user_errors(fn):
    """Turn EvomergeError into one line on stderr and exit 2 (tracebacks with EVOMERGE_DEBUG=1)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EvomergeError as error:
            if os.environ.get("EVOMERGE_DEBUG"):
                raise
            console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
            sys.exit(2)

    return wrapper


# Shared option definitions: one help text per concept.
DeviceOption = typer.Option("cpu", "--device", help="Where to compute: cpu, cuda, cuda:N.")


@app.command()
@user_errors
def merge(
    config: Path = typer.Argument(..., help="An evomerge merge config (pool + recipe) or a mergekit YAML."),
    output: Path = typer.Option(..., "--output", "-o", help="Directory to write the merged model to (must not exist)."),
    device: str = DeviceOption,
    dtype: Optional[str] = typer.Option(None, help="Output dtype: float32, float16, bfloat16 (default: the recipe's, else the base's)."),
    skip_value_check: bool = typer.Option(False, help="Skip the NaN/Inf scan of the experts (it reads every tensor once)."),
):
    """Merge a pool into one model directory.

    Example: evomerge merge examples/ties.yaml -o merged/ --dtype bfloat16
    """
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from evomerge.config import load_merge_config, open_pool
    from evomerge.materialize import write_adapter_dir, write_model_dir

    started = time.perf_counter()
    recipe, spec = load_merge_config(config)
    pool = open_pool(spec).validate(check_values=not skip_value_check)
    names = pool.tensor_names()
    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=True) as progress:
        used = recipe.used_experts()  # what the merge takes from, not the size of the pool
        task = progress.add_task(f"merging {len(used)} experts ({recipe.method})", total=len(names))
        if recipe.lora_merge == "lowrank":
            write_adapter_dir(recipe, pool, output, device=device)
        else:
            write_model_dir(recipe, pool, output, device=device, dtype=dtype,
                            on_tensor=lambda _name: progress.advance(task))
    unused = [name for name in pool.experts if name not in used]
    note = (f"; {len(unused)} of the pool's {len(pool.experts)} unused (weight 0 or not in the recipe): "
            f"{', '.join(unused)}" if unused else "")
    console.print(f"merged {len(used)} expert{'s' if len(used) != 1 else ''} with {recipe.method} into {output} "
                  f"({len(names)} tensors, {time.perf_counter() - started:.1f}s, recipe {recipe.id}{note})",
                  highlight=False)


@app.command()
@user_errors
def zoo(
    output: Path = typer.Argument(..., help="Directory to build the demo pool in."),
    size: str = typer.Option("small", help="tiny (seconds, for tests) or small (minutes, for the demo)."),
    seed: int = typer.Option(0, help="Seed for data, pre-training and fine-tuning."),
):
    """Build the demo zoo on CPU: a tiny Llama base, full and LoRA experts per task, and their scores."""
    from evomerge.zoo import build_zoo

    build_zoo(output, size=size, seed=seed, progress=True)


RunDirArgument = typer.Argument(..., help="A run directory (runs/NAME).")


def _search_progress(run_dir: Path, budget: int):
    """A rich live display: evaluations done / budget, best score so far, failures, rate."""
    from evomerge.progress import SearchProgress
    from evomerge.run import Run

    return SearchProgress(console, budget, done=Run(run_dir).evaluations())


@app.command()
@user_errors
def search(
    config: Path = typer.Argument(..., help="A search config (pool, space, suite, optimizer, budget, workers)."),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Where the run goes (default runs/NAME)."),
    budget: Optional[int] = typer.Option(None, help="Evaluations in all (overrides the config)."),
    workers: Optional[int] = typer.Option(None, help="Number of Ray workers (overrides the config)."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Join this Ray cluster (default: a private local one; RAY_ADDRESS is ignored)."),
    seed: Optional[int] = typer.Option(None, help="Seed (overrides the config)."),
):
    """Search for a merge recipe; resumable with `evomerge resume RUN` after any stop.

    Example: evomerge search examples/evo-merging.yaml --run-dir runs/demo --budget 200 --workers 2
    """
    from evomerge.config import load_search_config
    from evomerge.run import Run
    from evomerge.search import Search

    run = None
    with _stoppable(lambda: run.path if run else None):  # a stop before the run dir is made: nothing to resume
        loaded = load_search_config(config, budget=budget, seed=seed, workers={"count": workers, "ray_address": ray_address})
        run_dir = run_dir or Path("runs") / (loaded.name or config.stem)
        _note_ignored_ray_address(loaded.workers.ray_address)
        prepared = Search(loaded)  # checks pool, space, suite and optimizer before anything is written
        prepared.start_ray()  # and a Ray address that does not answer (bounded)
        try:
            run = Run.create(run_dir, loaded.model_dump(mode="json"))
            with _search_progress(run_dir, loaded.budget) as progress:
                prepared.execute(run, progress=progress)
        finally:
            prepared.stop_ray()
    _print_summary(run)


@app.command()
@user_errors
def resume(run_dir: Path = RunDirArgument):
    """Continue a stopped run: finished candidates are kept, in-flight ones run again."""
    from evomerge.search import open_for_resume

    with _stoppable(lambda: run_dir):
        run, prepared = open_for_resume(run_dir)
        _note_ignored_ray_address(prepared.config.workers.ray_address)
        with _search_progress(run_dir, prepared.config.budget) as progress:
            prepared.execute(run, progress=progress)
    _print_summary(run)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread as Ctrl-C raises KeyboardInterrupt: a stop unwinds the
    same way (status stopped, workers killed, the log intact: as safe as kill -9, and tidier)."""

    def __str__(self) -> str:
        return "SIGTERM"


_signals_received: list[int] = []  # Ray's calls turn an exception raised inside them into KeyboardInterrupt
_signal_again: list[threading.Timer] = []


def _raise_stop(signum, frame):
    """Raise Terminated (SIGTERM) or KeyboardInterrupt (SIGINT) wherever the main thread is. That
    may be code whose exceptions Python swallows (a weakref callback, __del__, a Cython module's
    import): so the signal comes again shortly, until a stop has begun (`_stoppable` then ignores
    both signals and cancels it)."""
    _signals_received.append(signum)
    again = threading.Timer(0.5, os.kill, (os.getpid(), signum))
    again.daemon = True
    again.start()
    _signal_again.append(again)
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


@contextlib.contextmanager
def _stoppable(run_dir: Callable[[], Optional[Path]]):
    """SIGTERM and Ctrl-C stop a search or resume with one line saying how to continue (the run
    dir, once known, is `run_dir()`), and exit 143 / 130 (the shell's codes), never a traceback."""
    previous = signal.signal(signal.SIGTERM, _raise_stop), signal.signal(signal.SIGINT, _raise_stop)
    sys.unraisablehook = functools.partial(_quiet_stops, sys.unraisablehook)
    stopping = False
    try:
        yield
    except KeyboardInterrupt as stop:
        stopping = True
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not break the cleanup
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # kept until exit: the exit itself is the stop
        for again in _signal_again:
            again.cancel()
        terminated = isinstance(stop, Terminated) or signal.SIGTERM in _signals_received
        how, code = ("SIGTERM", 143) if terminated else ("Ctrl-C", 130)
        from evomerge.run import CONFIG

        where = run_dir()
        if where is not None and (where / CONFIG).is_file():
            _mark_stopped(where, how)
            console.print(f"stopped ({how}): continue with `evomerge resume {where}`", highlight=False, soft_wrap=True)
        else:
            console.print(f"stopped ({how}) before the run started: nothing was written", highlight=False, soft_wrap=True)
        sys.exit(code)
    finally:
        if not stopping:
            signal.signal(signal.SIGTERM, previous[0])
            signal.signal(signal.SIGINT, previous[1])


def _mark_stopped(run_dir: Path, how: str) -> None:
    """The search records a stop itself; a signal landing just as it writes `running` (or before
    its handler is in place) can leave `running` behind: this process's own `running` is stopped."""
    from evomerge.run import STATUS, Run

    run = Run(run_dir)
    try:
        status = run.read_json(STATUS) or {}
        if status.get("state") == "running" and status.get("pid") == os.getpid():
            run.set_status("stopped", reason=how, budget=status.get("budget"))
    except Exception:  # noqa: BLE001 - advisory: a resume continues the run whatever status says
        pass


def _quiet_stops(hook, unraisable) -> None:
    """A stop raised inside a callback is swallowed by Python (the signal comes again): no traceback."""
    if not isinstance(unraisable.exc_value, KeyboardInterrupt):
        hook(unraisable)


def _note_ignored_ray_address(address: Optional[str]) -> None:
    inherited = os.environ.get("RAY_ADDRESS")
    if inherited and not address:
        console.print(f"note: RAY_ADDRESS={inherited} is ignored (a search starts a private local Ray cluster); "
                      "join a cluster with --ray-address or workers.ray_address", highlight=False, markup=False, soft_wrap=True)


def _print_summary(run) -> None:
    from evomerge.report import summary_line

    console.print(summary_line(run))


@app.command()
@user_errors
def show(
    run_dirs: list[Path] = typer.Argument(..., help="One run directory, or several to compare (runs/NAME-seedK group by NAME)."),
    top: int = typer.Option(5, help="How many of the best candidates to list."),
    plot: bool = typer.Option(False, "--plot", help="Write PNGs: one run's score over evaluations and Pareto front "
                              "(into its run dir); several runs' best-so-far curves (compare_runs.png, see --plot-dir)."),
    plot_dir: Path = typer.Option(Path("."), "--plot-dir", help="Where the comparison plot of several runs goes."),
):
    """Status, best candidates, Pareto front, and the best against the base and each expert (works while live).

    With several run dirs: one table comparing them, and with --plot their best-so-far curves.
    """
    from evomerge.report import compare_table, render_run
    from evomerge.run import Run

    runs = [Run.open(run_dir) for run_dir in run_dirs]
    if len(runs) == 1:
        render_run(runs[0], Console(), top=top)
    else:
        Console().print(compare_table(runs))
    if plot:
        from evomerge.plots import plot_compare, plot_run

        if len(runs) == 1:
            paths = plot_run(runs[0])
        else:
            plot_dir.mkdir(parents=True, exist_ok=True)
            paths = [plot_compare(runs, plot_dir / "compare_runs.png")]
        for path in paths:
            console.print(f"wrote {path}")


@app.command()
@user_errors
def export(
    run_dir: Path = RunDirArgument,
    pick: str = typer.Option("best", help="'best' or a candidate id."),
    output: Path = typer.Option(..., "--output", "-o", help="Directory for the merged model."),
    device: str = DeviceOption,
    dtype: Optional[str] = typer.Option(None, help="Output dtype (default: the base's)."),
):
    """Write a candidate's merged model as an HF directory, with its recipe and a mergekit YAML where expressible."""
    from evomerge.report import export_candidate
    from evomerge.run import Run

    from evomerge.recipe import Recipe

    path = export_candidate(Run.open(run_dir), pick, output, device=device, dtype=dtype)
    recipe = Recipe.from_yaml((path / "recipe.yaml").read_text(), str(path / "recipe.yaml"))
    used = len(recipe.used_experts())
    console.print(f"exported {pick} ({used} expert{'s' if used != 1 else ''} with {recipe.method}) to {path}",
                  highlight=False)


@app.command()
@user_errors
def fuse(
    fusion: Path = typer.Argument(..., help="An exported fusion (export -o DIR writes DIR/fusion.yaml)."),
    prompt: list[str] = typer.Option(..., "--prompt", "-p", help="A prompt to answer; repeat for several."),
    max_tokens: int = typer.Option(64, "--max-tokens", help="Tokens per answer."),
    stop: list[str] = typer.Option(["\n"], "--stop", help="Stop strings (repeatable)."),
):
    """Answer prompts with a fusion of API models picked by a search (what `export` wrote for it).

    Example:
      evomerge fuse runs/fusion/export/fusion.yaml --prompt "add 12+34 ="
    """
    from evomerge.fusion.serve import fuse as answer

    answers, cost = answer(fusion / "fusion.yaml" if fusion.is_dir() else fusion, prompt, max_tokens, stop)
    for text in answers:
        print(text)
    console.print(f"{cost['calls']} API calls, {cost['prompt_tokens']} prompt + {cost['completion_tokens']} completion "
                  f"tokens, ${cost['serving_usd']:.4g}" + (f"; {cost['missing']} answers missing" if cost["missing"] else ""),
                  highlight=False)


@app.command()
@user_errors
def demo(
    zoo_dir: Path = typer.Option(Path("zoo"), "--zoo", help="Where the demo zoo is (built there if missing)."),
    size: str = typer.Option("small", help="Zoo size: tiny or small."),
    budget: int = typer.Option(60, help="Evaluations of the search."),
    workers: int = typer.Option(2, help="Ray workers."),
    run_dir: Path = typer.Option(Path("runs/demo"), "--run-dir", help="Where the demo's run goes (replaced if it exists)."),
):
    """Build the demo zoo if missing, run a short Evo-Merging search, and compare it with the base, experts and classic recipes."""
    from evomerge.demo import run_demo

    run_demo(zoo_dir, size=size, budget=budget, workers=workers, run_dir=run_dir, console=Console())


@app.command()
@user_errors
def serve(
    pool: Path = typer.Argument(..., help="The pool YAML to hold (its weights never leave this machine)."),
    suite: Path = typer.Option(..., "--suite", help="The suite every recipe is scored on, e.g. evaluators/zoo-loss.yaml."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on (0.0.0.0 for every one)."),
    port: int = typer.Option(8765, "--port"),
    token_env: str = typer.Option("EVOMERGE_TOKEN", "--token-env", help="Environment variable holding the bearer token clients must send."),
    device: str = DeviceOption,
    batch_size: int = typer.Option(64, "--batch-size", help="Requests per forward pass (hf backend)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch threads (default: all cores)."),
):
    """Hold a pool and score recipes on a suite over HTTP: searches elsewhere use `pool: {endpoint: URL}`.

    Example:
      EVOMERGE_TOKEN=s3cret evomerge serve zoo/pool-full.yaml --suite evaluators/zoo-loss.yaml
    """
    from evomerge.config import resolve_pool_spec
    from evomerge.provider import Provider, bind, make_server

    token = os.environ.get(token_env)
    if not token:
        raise EvomergeError(f"set ${token_env} to the bearer token clients must send (it is read from the environment only)")
    spec = resolve_pool_spec(str(pool), Path.cwd(), str(pool))
    listening = bind(host, port)
    provider = Provider(spec, suite, {"name": "hf", "batch_size": batch_size}, device=device, threads=threads)
    # markup=False: expert names and reasons come from clients' recipes (`[/]` would raise)
    server = make_server(provider, listening, token,
                         log=lambda line: console.print(line, highlight=False, markup=False))
    console.print(f"serving {len(provider.info['experts'])} experts ({', '.join(provider.info['experts'])}) "
                  f"scored on {provider.info['suite']} at http://{host}:{server.server_address[1]}",
                  highlight=False, markup=False)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


# ---- eval (owned by the evaluator module) ---------------------------------------------------
# BEGIN eval command
@app.command("eval")
@user_errors
def eval_command(
    target: str = typer.Argument(..., help="A model dir (hf, vllm) or an OpenAI-compatible URL (http://host:port/v1)."),
    suite: Path = typer.Option(..., "--suite", help="A task suite, e.g. evaluators/zoo-loss.yaml."),
    split: Optional[str] = typer.Option(None, "--split", help="The split its dataset_path {split} stands for "
                                        "(default: the suite's `split:`), e.g. test."),
    backend: Optional[str] = typer.Option(None, "--backend", help="hf, openai or vllm (default: openai for a URL, else hf)."),
    device: str = DeviceOption,
    batch_size: int = typer.Option(16, "--batch-size", help="Requests per forward pass (hf)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Score at most this many docs per task (seeded subsample)."),
    model: Optional[str] = typer.Option(None, "--model", help="Model name at the endpoint (default: its first listed model)."),
    api_key_env: str = typer.Option("OPENAI_API_KEY", "--api-key-env", help="Environment variable that holds the endpoint's API key."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write the scores as JSON here."),
):
    """Score a model or an endpoint on a suite: per-task scores (higher is better) and the weighted scalar.

    Examples:
      evomerge eval zoo/base --suite evaluators/zoo-loss.yaml
      evomerge eval zoo/base --suite zoo-generate --split test
      evomerge eval http://localhost:8000/v1 --suite evaluators/zoo-generate.yaml --model my-model
    """
    import json

    from rich.table import Table

    from evomerge.backends import BACKENDS, build_backend
    from evomerge.evaluator import evaluate, load_suite

    is_url = target.startswith(("http://", "https://"))
    name = backend or ("openai" if is_url else "hf")
    BACKENDS.get(name)  # unknown names fail here, with did-you-mean
    loaded = load_suite(suite, split=split, limit=limit)  # every data/template check before any model work
    if name == "openai":
        if not is_url:
            raise EvomergeError(f"backend 'openai' needs a URL (http://host:port/v1), got {target!r}")
        engine = build_backend("openai", base_url=target, model=model, api_key_env=api_key_env)
    elif is_url:
        raise EvomergeError(f"backend {name!r} needs a model dir; for a URL use --backend openai")
    elif name == "hf":
        engine = build_backend("hf", model=target, device=device, batch_size=batch_size)
    else:
        engine = build_backend(name, model=target, device=device)
    try:
        result = evaluate(loaded, engine)
    finally:  # an engine process (vllm) stopped here, not at interpreter exit, where it aborted (-6)
        engine.close()

    table = Table(title=f"{suite}{f' ({loaded.split} split)' if loaded.split else ''} on {target} ({name})")
    for column in ("task", "type", "n", "weight", "metrics", "score", "seconds"):
        table.add_column(column, justify="left" if column in ("task", "type", "metrics") else "right")
    for task in result.tasks.values():
        metrics = ", ".join(f"{key} {value:.4f}" for key, value in task.metrics.items())
        table.add_row(task.task, task.output_type, str(task.n), f"{task.weight:g}", metrics,
                      f"{task.score:.4f}", f"{task.seconds:.2f}")
    table.add_row("[bold]suite[/]", "", "", "", "", f"[bold]{result.scalar:.4f}[/]", f"{result.seconds:.2f}")
    Console().print(table)
    console.print("scores are higher-is-better; a loss task scores -(mean cross-entropy per token)")
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        payload = {"target": target, "suite": str(suite), "split": loaded.split, **result.to_dict()}
        output.write_text(json.dumps(payload, indent=2) + "\n")
        console.print(f"wrote {output}")
# END eval command


if __name__ == "__main__":
    app()
