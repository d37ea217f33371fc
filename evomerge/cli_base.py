"""What every `evomerge` command shares: the typer app, the stderr console, one-line user errors
and the option definitions used by several commands. The commands are in evomerge/cli.py (runs:
search, resume, show, export, demo) and evomerge/cli_models.py (models and endpoints: merge, zoo,
eval, serve, fuse).
"""

from __future__ import annotations

import functools
import os
import sys

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
