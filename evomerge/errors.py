"""User-facing errors: one line that says what is wrong and where.

Every error a user can cause (bad config, bad pool, bad data) is raised as an EvomergeError. The
CLI prints its message on one line and exits non-zero; tracebacks only with EVOMERGE_DEBUG=1.
"""


class EvomergeError(Exception):
    """An error caused by the user's input; its message names the file/key/tensor and the fix."""


class PoolError(EvomergeError):
    """The pool does not fit together (names, shapes, dtypes, LoRA targets, corrupt files)."""


class ConfigError(EvomergeError):
    """A config, recipe, suite or search space is malformed."""


def validation_message(error, limit: int = 1) -> str:
    """A pydantic ValidationError as one line: "key.path: what is wrong" for its first problems;
    a key the model does not have is called out as a probable typo."""
    parts = []
    for problem in error.errors()[:limit]:
        location = ".".join(str(part) for part in problem["loc"])
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "extra_forbidden":
            message = "unknown key (typo?)"
        parts.append(f"{location}: {message}" if location else message)
    return "; ".join(parts)
