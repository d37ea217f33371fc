"""`evomerge dashboard RUNS_DIR`: a live web page over run directories (server.py: the Starlette
app and its JSON API; data.py: what it reads from the run dirs; static/: the page, drawn with
Plotly.js). It reads run directories only, never writes there, and never imports torch or Ray."""

from __future__ import annotations

from pathlib import Path
from typing import Callable


def serve(root: Path, host: str = "127.0.0.1", port: int = 8765, say: Callable[[str], None] = print) -> None:
    from evomerge.dashboard.server import serve as _serve

    _serve(root, host=host, port=port, say=say)
