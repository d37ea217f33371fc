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


# ---- eval (owned by the evaluator module) ---------------------------------------------------
# BEGIN eval command
# END eval command
