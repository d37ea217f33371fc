"""Synthetic objectives for a broken setup (config `objective: tests.faulty:NAME`): every candidate
fails the same way, as with an endpoint that is down or a field every record lacks."""

from __future__ import annotations

from evomerge.recipe import Recipe
from tests.objectives import quadratic


def always_fails(recipe: Recipe) -> dict[str, float]:
    raise ConnectionError(f"endpoint http://127.0.0.1:9/v1 refused the connection (recipe {recipe.id})")


def fails_unless_reference(recipe: Recipe) -> dict[str, float]:
    """The references (each weight 0 or 1) score; every searched candidate fails alike."""
    if all(p.weight in (0.0, 1.0) for p in recipe.experts.values()):
        return quadratic(recipe)
    raise ValueError(f"merged tensor model.norm.weight holds NaN/Inf (recipe {recipe.id})")
