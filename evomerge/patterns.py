"""Module patterns a provider takes: an override's `modules:` regex is searched in every tensor
name, for every recipe, while the provider's one Worker is busy with it, so only patterns whose
backtracking is bounded are taken (see below); anything else is refused before it queues."""

from __future__ import annotations

import re
from typing import Any

from evomerge.recipe import MODULE_FILTERS

try:
    from re import _parser as _sre_parse  # Python 3.11+
except ImportError:  # pragma: no cover - Python 3.10
    import sre_parse as _sre_parse

# An override's `modules:` regex is searched in every tensor name, for every recipe, while the
# provider's one Worker is busy with it. Python's regex engine backtracks: `(a+)+$` takes
# exponential time and cannot be interrupted from another thread. So the provider takes only
# patterns whose backtracking is bounded: repetitions of single characters (`.*`, `\d+`, `[a-z]{2,5}`),
# few of them, no backreferences. The bound is a count of the ways a match can be tried at one
# position, with a repetition counted as NAME_LENGTH ways.

NAME_LENGTH = 64  # characters of a typical tensor name (model.layers.31.self_attn.q_proj.weight is 39)
MAX_PATTERN_CHARS = 200
MAX_PATTERN_COST = NAME_LENGTH ** 2  # two repetitions, e.g. `layers\.\d+\..*proj`
MAX_RECIPE_COST = 4 * MAX_PATTERN_COST  # summed over a recipe's overrides
PATTERN_RULE = (f"the provider takes 'attention', 'mlp' or a regex of at most {MAX_PATTERN_CHARS} characters with "
                "at most two repetitions (*, +, {m,n}) of single characters or classes, no repeated groups "
                "that themselves repeat or alternate, and no backreferences")
_REPEATS = {"MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"}
_SINGLE_CHARACTER = {"LITERAL", "NOT_LITERAL", "ANY", "IN"}


class _Unsafe(Exception):
    pass


def pattern_cost(pattern: str) -> int:
    """How many ways a match of `pattern` can be tried at one position of a tensor name (an upper
    bound); _Unsafe where that is unbounded or the pattern is not one the provider takes."""
    if pattern in MODULE_FILTERS:
        return 1
    if len(pattern) > MAX_PATTERN_CHARS:
        raise _Unsafe(f"is {len(pattern)} characters long")
    try:
        parsed = _sre_parse.parse(pattern)
    except (re.error, RecursionError, OverflowError) as error:
        raise _Unsafe(f"is not a valid regex ({error})") from None
    return _cost(list(parsed))


def _cost(items: list) -> int:
    total = 1
    for op, value in items:
        kind = str(op)
        if kind in _REPEATS:
            low, high, body = value
            if high <= 1:  # optional: tried with and without
                total *= 1 + _cost(list(body))
            elif not _single_characters(list(body)):
                raise _Unsafe("repeats a group that itself repeats or alternates (as in (a+)+ or (a|ab)*), "
                              "which can take exponential time")
            else:
                total *= min(high - low + 1, NAME_LENGTH)
        elif kind == "BRANCH":
            total *= sum(_cost(list(branch)) for branch in value[1])
        elif kind == "SUBPATTERN":
            total *= _cost(list(value[3]))
        elif kind == "ATOMIC_GROUP":
            total *= _cost(list(value))
        elif kind in ("ASSERT", "ASSERT_NOT"):
            total *= _cost(list(value[1]))
        elif kind in ("GROUPREF", "GROUPREF_EXISTS"):
            raise _Unsafe("uses a backreference")
        if total > MAX_RECIPE_COST:  # no need to count further (and no huge numbers)
            return total
    return total


def _single_characters(items: list) -> bool:
    """A run of single characters or classes (ab, [0-9], .), grouped or not: a repetition of it
    can split a name only one way per count."""
    for op, value in items:
        kind = str(op)
        if kind == "SUBPATTERN":
            if not _single_characters(list(value[3])):
                return False
        elif kind not in _SINGLE_CHARACTER:
            return False
    return True


def module_pattern_problem(recipe: Any) -> str | None:
    """Why the provider refuses this recipe's module patterns, or None. Reads the recipe as JSON
    (before the Worker validates it: anything else malformed is the Worker's failed result)."""
    overrides = recipe.get("overrides") if isinstance(recipe, dict) else None
    if not isinstance(overrides, list):
        return None
    total = 0
    for position, override in enumerate(overrides):
        pattern = override.get("modules") if isinstance(override, dict) else None
        if not isinstance(pattern, str):
            continue
        where = f"overrides[{position}].modules {pattern[:60]!r}"
        try:
            cost = pattern_cost(pattern)
        except _Unsafe as why:
            return f"{where} {why}: {PATTERN_RULE}"
        if cost > MAX_PATTERN_COST:
            return f"{where} can take long to match (too many repetitions or alternatives): {PATTERN_RULE}"
        total += cost
        if total > MAX_RECIPE_COST:
            return (f"the module patterns up to {where} can take long to match together: at most "
                    f"{MAX_RECIPE_COST // MAX_PATTERN_COST} patterns with two repetitions each in one recipe")
    return None


def refused(problem: str) -> dict[str, Any]:
    """A Worker result for a recipe the provider will not run: a failed candidate, as a bad recipe
    is in a local search."""
    return {"status": "failed", "reason": problem[:500], "seconds": {"total": 0.0}}
