"""The `evomerge` command line: each command is a thin function over the library.

Errors a user can cause are EvomergeError: printed as one line, exit code 2. Set EVOMERGE_DEBUG=1
for the traceback.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from evomerge.errors import EvomergeError

app = typer.Typer(
    help="Search for model-merge recipes (Evo-Merging, TIES, DARE, ...) over full and LoRA pools.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)


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
        task = progress.add_task(f"merging {len(pool.experts)} experts ({recipe.method})", total=len(names))
        if recipe.lora_merge == "lowrank":
            write_adapter_dir(recipe, pool, output, device=device)
        else:
            write_model_dir(recipe, pool, output, device=device, dtype=dtype,
                            on_tensor=lambda _name: progress.advance(task))
    console.print(f"merged {len(pool.experts)} experts with {recipe.method} into {output} "
                  f"({len(names)} tensors, {time.perf_counter() - started:.1f}s, recipe {recipe.id})")


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


# ---- eval (owned by the evaluator module) ---------------------------------------------------
# BEGIN eval command
# END eval command


if __name__ == "__main__":
    app()
