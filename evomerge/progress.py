"""SearchProgress: the live display of a search (done / budget, best so far, failures, rate)."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from evomerge.run import Evaluation


class SearchProgress:
    """Called with each finished Evaluation; a context manager around a rich Progress bar."""

    def __init__(self, console: Console, budget: int, done: list[Evaluation] | None = None):
        done = done or []
        self.best = min((e.objective for e in done if e.ok), default=None)
        self.failures = sum(not e.ok for e in done)
        self.count, self.started, self.started_count = len(done), time.perf_counter(), len(done)
        self.progress = Progress(
            TextColumn("[bold]search"), BarColumn(), MofNCompleteColumn(),
            TextColumn("best {task.fields[best]}  failed {task.fields[failures]}  {task.fields[rate]}"),
            TimeElapsedColumn(), console=console)
        self.task = self.progress.add_task("search", total=budget, completed=self.count,
                                           best=self._best(), failures=self.failures, rate="")

    def _best(self) -> str:
        return "-" if self.best is None else f"{self.best:.4f}"

    def __call__(self, evaluation: Evaluation) -> None:
        self.count += 1
        if evaluation.ok and (self.best is None or evaluation.objective < self.best):
            self.best = evaluation.objective
        self.failures += not evaluation.ok
        elapsed = time.perf_counter() - self.started
        rate = (self.count - self.started_count) / elapsed * 60 if elapsed > 0 else 0.0
        self.progress.update(self.task, completed=self.count, best=self._best(), failures=self.failures,
                             rate=f"{rate:.1f}/min")

    def __enter__(self) -> "SearchProgress":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()
