"""User-facing errors: one line that says what is wrong and where.

Every error a user can cause (bad config, bad pool, bad data) is raised as an EvomergeError. The
CLI prints its message on one line and exits non-zero; tracebacks only with EVOMERGE_DEBUG=1.
"""

import difflib
import re


class EvomergeError(Exception):
    """An error caused by the user's input; its message names the file/key/tensor and the fix."""


class PoolError(EvomergeError):
    """The pool does not fit together (names, shapes, dtypes, LoRA targets, corrupt files)."""


class ConfigError(EvomergeError):
    """A config, recipe, suite or search space is malformed."""


def did_you_mean(word: str, choices, n: int = 1) -> str:
    """" did you mean 'x'?" (or "'x' or 'y'") for the closest of `choices`, else "": the hint every
    unknown-name error carries, written after a semicolon."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=n)
    return f" did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


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


# Secrets in text we print: an API key an endpoint echoes back, credentials in a URL.
SECRET_PATTERNS = (
    re.compile(r"(?<=://)[^/\s:@]+:[^/\s@]+(?=@)"),  # user:password@ in a URL
    re.compile(r"(?i)(?<=bearer )[A-Za-z0-9._~+/=-]{8,}"),  # Authorization: Bearer <token>
    re.compile(r"\b(?:sk|rk|pk)-[A-Za-z0-9_-]{8,}"),  # OpenAI-style keys (sk-..., sk-proj-...)
    re.compile(r"\b(?:hf|api|ghp|gho|xox[bp])_[A-Za-z0-9_-]{8,}"),  # hub / GitHub / Slack style tokens
)
REDACTED = "***"


def redact(text: str, secrets: tuple[str | None, ...] = ()) -> str:
    """`text` with every given secret value and anything shaped like a key replaced by ***.
    Used on whatever an endpoint answers before it is printed or logged (servers echo keys)."""
    for secret in secrets:
        if secret and len(secret) >= 4:  # a 1-3 character "key" would blank out ordinary words
            text = text.replace(secret, REDACTED)
    for pattern in SECRET_PATTERNS:
        text = pattern.sub(REDACTED, text)
    return text
