"""The one pydantic base of every model read from a user's file (configs, recipes, suites, search
spaces): an unknown key is an error, never ignored, so a typo (`budgte: 3`) is one line naming it.
`Frozen` models (recipes, suites, spaces) are values: hashable, never changed after validation."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Frozen(Strict):
    model_config = ConfigDict(extra="forbid", frozen=True)
