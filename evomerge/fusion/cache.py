"""QueryCache: every API answer a search paid for, kept in the run directory (`queries.sqlite`).

A query is (endpoint, model, request parameters, prompt); its key is their hash. Each is asked
once: a genome scored on prompts already seen costs no call, a resume reuses what the killed search
paid for, and several Ray workers share one file (SQLite in WAL mode; a write is one transaction,
so a kill -9 leaves every committed answer). No key or header is part of a query. The file is data:
`show` reads what the search spent from it with a plain SELECT.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path
from typing import Any, Optional

QUERIES = "queries.sqlite"
SCHEMA = """CREATE TABLE IF NOT EXISTS queries (
    key TEXT PRIMARY KEY, model TEXT NOT NULL, kind TEXT NOT NULL, response TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL, usd REAL NOT NULL, at REAL NOT NULL)"""


def query_key(endpoint: str, model: str, kind: str, request: dict[str, Any]) -> str:
    text = json.dumps({"endpoint": endpoint, "model": model, "kind": kind, "request": request}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


class QueryCache:
    """Answers by query key; `path` None keeps them in memory (`evomerge fuse`, tests)."""

    def __init__(self, path: Optional[Path]):
        self.path = path
        self._db = sqlite3.connect(str(path) if path else ":memory:", timeout=60.0, isolation_level=None,
                                   check_same_thread=False)
        if path is not None:
            self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(SCHEMA)

    def get(self, key: str) -> Optional[dict[str, Any]]:
        row = self._db.execute("SELECT response FROM queries WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, key: str, model: str, kind: str, response: dict[str, Any], usd: float, at: float) -> None:
        usage = response.get("usage") or {}
        self._db.execute(
            "INSERT OR IGNORE INTO queries VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (key, model, kind, json.dumps(response), int(usage.get("prompt_tokens") or 0),
             int(usage.get("completion_tokens") or 0), float(usd), float(at)))

    def close(self) -> None:
        self._db.close()


def spent(run_dir: Path) -> Optional[dict[str, Any]]:
    """What a run's search paid for, per model and in all: calls, tokens, USD (None: no queries)."""
    path = Path(run_dir) / QUERIES
    if not path.is_file():
        return None
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10.0)
    try:
        rows = db.execute("SELECT model, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens), SUM(usd) "
                          "FROM queries GROUP BY model ORDER BY model").fetchall()
    finally:
        db.close()
    per_model = {model: {"calls": calls, "prompt_tokens": p, "completion_tokens": c, "usd": usd}
                 for model, calls, p, c, usd in rows}
    total = {key: sum(m[key] for m in per_model.values()) for key in ("calls", "prompt_tokens", "completion_tokens", "usd")}
    return {"models": per_model, "total": total}
