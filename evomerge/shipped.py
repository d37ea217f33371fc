"""Shipped data: the search-space presets (`searchspaces/`) and the demo suites (`evaluators/`).

Both live at the top of the repository and are packaged as `evomerge.searchspaces` and
`evomerge.evaluators` (pyproject's package-dir), so an editable install, a wheel and a plain
checkout all find the same files through `importlib.resources`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parent.parent


def shipped_dir(name: str) -> Path:
    """The directory of shipped data `name` ("searchspaces" or "evaluators")."""
    spec = importlib.util.find_spec(f"evomerge.{name}")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return _CHECKOUT / name  # a checkout on sys.path without an install
