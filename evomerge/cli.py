"""The `evomerge` command line: each command is a thin function over the library.

Errors a user can cause are EvomergeError: printed as one line, exit code 2. Set EVOMERGE_DEBUG=1
for the traceback. This module has the commands on runs (search, resume, show, export, demo);
evomerge/cli_models.py those on models and endpoints (merge, zoo, eval, serve, fuse), registered on
the same app (evomerge/cli_base.py).
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

from evomerge.cli_base import DeviceOption, app, console, user_errors



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
        if "evomerge.worker" in sys.modules:  # Ray may be up, or starting: settled before the last line
            from evomerge.worker import settle_ray

            settle_ray()
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
    as_json: bool = typer.Option(False, "--json", help="Print a JSON document for scripts instead of tables (one "
                                 "run: an object; several: a list): status, best candidates, per-task scores, "
                                 "references, Pareto front."),
):
    """Status, best candidates, Pareto front, and the best against the base and each expert (works while live).

    With several run dirs: one table comparing them, and with --plot their best-so-far curves.
    """
    from evomerge.report import compare_table, render_run, run_document, to_json
    from evomerge.run import Run

    runs = [Run.open(run_dir) for run_dir in run_dirs]
    if as_json:  # stdout holds the document alone: the "wrote" lines of --plot go to stderr
        documents = [run_document(run, top=top) for run in runs]
        print(to_json(documents[0] if len(runs) == 1 else documents))
    elif len(runs) == 1:
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
def dashboard(
    runs_dir: Path = typer.Argument(Path("runs"), help="A directory of run directories (searched 3 levels deep)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0: every interface; the page has no login)."),
    port: int = typer.Option(8765, help="Port to listen on."),
):
    """A live web page over the runs in RUNS_DIR: progress, best so far, Pareto fronts, recipes, comparisons.

    It reads the run directories only (never writes there) and refreshes every 2 s while searches run.

    Example: evomerge dashboard runs --port 8765, then open http://127.0.0.1:8765
    """
    from evomerge.dashboard import serve

    serve(runs_dir, host=host, port=port, say=lambda line: console.print(line, highlight=False, soft_wrap=True))


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
    from evomerge.report import expert_summary, export_candidate
    from evomerge.run import Run

    from evomerge.recipe import Recipe

    path = export_candidate(Run.open(run_dir), pick, output, device=device, dtype=dtype)
    recipe = Recipe.from_yaml((path / "recipe.yaml").read_text(), str(path / "recipe.yaml"))
    used = len(recipe.used_experts())
    summary = expert_summary(recipe)  # many experts: the few that weigh most, not all (recipe.yaml has all)
    console.print(f"exported {pick} ({used} expert{'s' if used != 1 else ''} with {recipe.method}) to {path}"
                  + ("; by |weight|:" if summary else ""), highlight=False)
    for line in summary or []:
        console.print(f"  {line}", highlight=False, markup=False)


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




from evomerge import cli_models  # noqa: E402,F401 - registers its commands on `app`

if __name__ == "__main__":
    app()
