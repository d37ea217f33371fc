"""A candidate's mergekit YAML, made in a child process of the dashboard: the merge-method registry
that `recipe_to_mergekit` consults imports torch, which the dashboard's server never does.

stdin: {"recipe": {...}, "pool": {...}}; stdout: one JSON line, {"yaml": "..."} or {"error": "why not"}.
"""

from __future__ import annotations

import json
import sys

import yaml


def main() -> None:
    from evomerge.errors import EvomergeError
    from evomerge.mergekit_yaml import recipe_to_mergekit
    from evomerge.poolspec import parse_pool_spec
    from evomerge.recipe import Recipe

    request = json.load(sys.stdin)
    try:
        config = recipe_to_mergekit(Recipe.model_validate(request["recipe"]), parse_pool_spec(request["pool"]))
        answer = {"yaml": yaml.safe_dump(config, sort_keys=False)}
    except EvomergeError as error:  # ConfigError: not expressible in mergekit, and why
        answer = {"error": f"not expressible in mergekit: {error}"}
    except (ValueError, KeyError, TypeError, AttributeError) as error:  # a recipe or pool this evomerge does not read
        answer = {"error": f"cannot make a mergekit YAML: {error}"}
    print(json.dumps(answer))


if __name__ == "__main__":
    main()
