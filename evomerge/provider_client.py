"""The search's side of a provider (`evomerge serve`, evomerge/provider.py): the token, the
HTTP call, and `RemoteWorker`, which has the Worker's interface over the endpoint.

Only the standard library: a search that names an endpoint needs no server packages.
"""

from __future__ import annotations

import json
import os
import random
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import TYPE_CHECKING, Any

from evomerge.errors import ConfigError, redact

if TYPE_CHECKING:
    from evomerge.poolspec import RemotePoolSpec  # pydantic; kept out of the import of this module

RETRIES = 3  # attempts while the provider refuses connections (GET: also on 5xx); never after a timeout
RETRY_WAIT_S = 1.0  # doubled after each failed attempt
MAX_RETRY_AFTER_S = 60.0  # the most a busy provider's Retry-After makes a client wait


def token_from_env(spec: RemotePoolSpec) -> str:
    token = os.environ.get(spec.token_env)
    if not token:
        raise ConfigError(f"pool {spec.endpoint}: set the provider's token in ${spec.token_env}")
    return token


class ProviderError(Exception):
    """The provider could not be reached or answered with an error."""


def _retry_after(error: urllib.error.HTTPError) -> float:
    try:
        return min(MAX_RETRY_AFTER_S, max(0.0, float(error.headers.get("Retry-After", 0))))
    except (TypeError, ValueError):  # an HTTP date, or junk: the backoff alone
        return 0.0


def request(endpoint: str, path: str, token: str, body: dict | None = None, timeout: float = 60.0,
            retries: int = RETRIES) -> dict[str, Any]:
    """One JSON call, retried with backoff only where that cannot run an evaluation twice: while the
    provider refuses connections (it is down or restarting), and for GET also on 5xx. A 503 (busy:
    the provider turned the request away before queueing it) is waited out, as its Retry-After says
    and with jitter so that turned-away clients do not all come back at once, for up to `timeout`
    seconds in all."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    wait, attempt, deadline = RETRY_WAIT_S, 0, time.monotonic() + timeout
    while True:
        attempt += 1
        pause, busy = wait, False
        try:
            req = urllib.request.Request(endpoint + path, data=data, headers=headers,
                                         method="GET" if body is None else "POST")
            with urllib.request.urlopen(req, timeout=timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            detail = redact(error.read().decode(errors="replace"), (token,))[:200]  # servers may echo it
            failure = ProviderError(f"{endpoint}{path}: HTTP {error.code} {detail}")
            if error.code == 503:  # busy: nothing was queued
                pause = max(RETRY_WAIT_S, _retry_after(error)) * random.uniform(1.0, 1.5)
                if time.monotonic() + pause > deadline:
                    raise failure from None
                attempt, busy = attempt - 1, True  # not an attempt that counts
            elif error.code < 500 or body is not None or attempt >= retries:  # a 5xx POST may have run
                raise failure from None
        except TimeoutError:  # the provider may still be working on it: asking again would queue it twice
            raise ProviderError(f"{endpoint}{path}: no answer within {timeout:.0f}s") from None
        except (urllib.error.URLError, ConnectionError) as error:
            refused = isinstance(getattr(error, "reason", error), ConnectionRefusedError)
            if body is not None and not refused:  # it may have arrived: sending it again could run it twice
                raise ProviderError(f"{endpoint}{path}: connection lost ({getattr(error, 'reason', error)})") from None
            if attempt >= retries:
                reason = getattr(error, "reason", error)
                raise ProviderError(f"{endpoint}{path}: unreachable ({reason})") from None
        time.sleep(pause)
        if not busy:
            wait *= 2


def pool_info(spec: RemotePoolSpec) -> dict[str, Any]:
    """What the search needs to know about a remote pool (expert names, layer count), checking
    the endpoint and the token once, up front: a wrong token is a config error, not 200 failures."""
    try:
        info = request(spec.endpoint, "/v1/pool", token_from_env(spec), timeout=30.0)
        return {"experts": [str(e) for e in info["experts"]], "n_layers": int(info["n_layers"]),
                "suite": str(info.get("suite", "")), "tasks": [str(t) for t in info.get("tasks", [])]}
    except ProviderError as error:
        raise ConfigError(f"pool: {error}") from None
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"pool: {spec.endpoint}/v1/pool did not answer as `evomerge serve` does") from None


class RemoteWorker:
    """The Worker interface (info, evaluate) over a provider's endpoint."""

    def __init__(self, spec: RemotePoolSpec, timeout_s: float):
        # Read here, not passed in: an actor's arguments are stored by Ray (its GCS); the
        # environment is inherited from the driver on a local cluster (set it on every node of a
        # remote one).
        self.endpoint, self.token, self.timeout_s = spec.endpoint, token_from_env(spec), timeout_s

    def info(self) -> dict[str, Any]:
        return {"pid": os.getpid()}

    def evaluate(self, recipe: dict[str, Any]) -> dict[str, Any]:
        started = time.perf_counter()
        try:
            return request(self.endpoint, "/v1/evaluate", self.token, {"recipe": recipe}, timeout=self.timeout_s)
        except ProviderError as error:
            return {"status": "failed", "reason": f"provider: {error}"[:500],
                    "seconds": {"total": time.perf_counter() - started}}
