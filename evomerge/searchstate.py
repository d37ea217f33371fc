"""The search's state between sessions: what checkpoint.json holds besides the log.

The log (evaluations.jsonl) is the truth; the state is what a resume needs on top of it (the stage,
the optimizer's plain-data state, the recipe earlier stages settled on, the candidates in flight) and
the two counters that tie it to the log (`logged`, `last_id`). The search reconciles them on resume.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError
from evomerge.run import EVALUATIONS

STAGE_OFFSET = 1_000_000  # candidate id = stage * STAGE_OFFSET + the optimizer's id


@dataclass
class InFlight:
    id: int
    x: list[float]
    attempts: int = 0


@dataclass
class State:
    """Everything a resume needs besides the log; written as JSON into checkpoint.json."""

    stage: int = 0
    optimizer: dict[str, Any] | None = None  # Optimizer.state_dict(): plain data
    fixed: dict[str, Any] | None = None  # the recipe earlier stages settled on
    in_flight: dict[int, InFlight] = field(default_factory=dict)
    # how many of this stage's candidates were asked and told is the optimizer's (n_asked, n_told,
    # replayed from its journal): kept once, not here as well
    logged: int = 0  # evaluations in the log (all stages) when this was written
    last_id: int | None = None  # the id of the last of them: the log and the checkpoint must agree

    @classmethod
    def from_data(cls, data: dict[str, Any], where: Path) -> "State":
        """From checkpoint.json's data; anything malformed is one line naming the file."""
        data = {k: v for k, v in data.items() if k not in ("format", "told", "asked")}  # told/asked: older checkpoints kept them
        try:
            in_flight = {int(k): InFlight(**v) for k, v in (data.pop("in_flight", None) or {}).items()}
            state = cls(**data, in_flight=in_flight)
            if not all(isinstance(v, int) for v in (state.stage, state.logged)):
                raise TypeError("stage and the counts must be integers")
        except (TypeError, ValueError, AttributeError) as error:
            raise EvomergeError(f"{where} is not a checkpoint this evomerge wrote ({error}); delete it to "
                                f"rebuild the run's state from {EVALUATIONS}, then resume") from None
        return state
