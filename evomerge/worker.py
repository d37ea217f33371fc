"""Worker: holds the pool resident on its device and an evaluator warm; recipe in, scores out.

A Worker is a plain class so it can be used in-process (export, tests); `RayWorker` is the same
class as a Ray actor. Only the recipe (a few floats) crosses the process boundary, never tensors.
A candidate that fails (NaN weights, an exception in the merge or the evaluation) comes back as
a result with status "failed" and the reason; the worker stays usable.

`start_ray` starts the Ray cluster the workers run in: a private local one unless an address is
given explicitly, within a bounded time, interruptible.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import math
import os
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from typing import TYPE_CHECKING, Any, Callable

from evomerge.errors import ConfigError, EvomergeError
from evomerge.recipe import Recipe

if TYPE_CHECKING:
    from evomerge.poolspec import PoolSpec

LOCAL_START_TIMEOUT_S = 120.0  # a local Ray start takes seconds; more means something is wrong
RAY_ADDRESS_ENV = "RAY_ADDRESS"


def load_callable(spec: str) -> Callable[..., Any]:
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


class Worker:
    def __init__(self, pool_spec: "PoolSpec", suite: str | None, backend: dict[str, Any],
                 device: str = "cpu", threads: int | None = None, objective: str | None = None):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.pid = os.getpid()
        self.backend = None  # none for a synthetic objective
        self.objective = load_callable(objective) if objective else None
        if self.objective is None:
            self._load_models(pool_spec, suite, backend, device)

    def _load_models(self, pool_spec, suite, backend, device) -> None:
        from evomerge.backends import build_backend
        from evomerge.config import open_pool
        from evomerge.evaluator import PreparedSuite, load_suite
        from evomerge.materialize import ResidentMerger

        self.pool = open_pool(pool_spec)
        self.merger = ResidentMerger(self.pool, device)
        self.suite = load_suite(suite)  # a file or a shipped name, optionally NAME:SPLIT
        options = {k: v for k, v in backend.items() if k != "name"}
        self.backend = build_backend(backend.get("name", "hf"), model=str(self.pool.base_path), device=device, **options)
        self.prepared = PreparedSuite(self.suite, self.backend)  # requests built once, scored per candidate

    def _swap_weights(self, recipe: Recipe) -> None:
        """Put the candidate's merge into the backend the way its class declares it takes weights."""
        swap = self.backend.weights
        if swap == "module":  # transformers: merged straight into the live module's parameters
            self.merger.apply(recipe, self.backend.live_module())
        elif swap == "named_tensors":  # vLLM: the engine's own loaders take the tensors, by name
            self.backend.update_weights(_finite_or_raise(list(self.merger.merged(recipe)), recipe))
        else:  # check_backend refuses these before a search; a Worker built by hand gets one line
            raise EvomergeError(f"backend {self.backend.name!r} takes no weights (weights: {swap}): "
                                "it cannot score a merged candidate")

    def info(self) -> dict[str, Any]:
        return {"pid": self.pid}

    def close(self) -> None:
        """Stop what the backend runs besides this process (vLLM's engine process); idempotent."""
        if self.backend is not None:
            self.backend.close()

    def evaluate(self, recipe: dict[str, Any]) -> dict[str, Any]:
        started = time.perf_counter()
        try:
            scores, scalar, seconds = self._score(Recipe.model_validate(recipe), started)
        except Exception as error:  # a failed candidate is a result, not a crashed search
            reason = f"{type(error).__name__}: {error}".splitlines()[0][:500]
            if os.environ.get("EVOMERGE_DEBUG"):
                traceback.print_exc()
            return {"status": "failed", "reason": reason, "seconds": {"total": time.perf_counter() - started},
                    **self._extras()}
        bad = [task for task, value in scores.items() if not math.isfinite(value)]
        if bad:
            return {"status": "failed", "reason": f"non-finite score on task {bad[0]}", "scores": {}, "seconds": seconds,
                    **self._extras()}
        return {"status": "ok", "scores": scores, "scalar": scalar, "seconds": seconds, "worker": self.pid,
                **self._extras()}

    def _extras(self) -> dict[str, Any]:
        """What a kind of worker adds to each result (a fusion worker: the candidate's costs)."""
        return {}

    def _score(self, recipe: Recipe, started: float) -> tuple[dict[str, float], float, dict[str, float]]:
        if self.objective is not None:  # a synthetic objective: scores only, mean as the scalar
            scores = self.objective(recipe)
            return scores, sum(scores.values()) / len(scores), {"merge": 0.0, "eval": time.perf_counter() - started}
        from evomerge.evaluator import PreparedSuite

        self._swap_weights(recipe)
        merged = time.perf_counter()
        if self.prepared.backend is not self.backend:  # replaced after the start (tests, benchmarks)
            self.prepared = PreparedSuite(self.suite, self.backend)
        result = self.prepared.evaluate()
        return result.scores, result.scalar, {"merge": merged - started, "eval": time.perf_counter() - merged}


def _finite_or_raise(named: list, recipe: Recipe) -> list:
    from evomerge.pool import all_finite

    for name, tensor in named:
        if not all_finite(tensor):
            raise ValueError(f"merged tensor {name} holds NaN/Inf (recipe {recipe.id})")
    return named


def ray_worker_class(device: str):
    """Worker as a Ray actor class, asking Ray for a GPU on cuda devices and one CPU otherwise."""
    import ray

    if device.startswith("cuda"):
        return ray.remote(num_gpus=1, num_cpus=1)(Worker)
    return ray.remote(num_cpus=1)(Worker)


# ---- what a search's workers need, checked before any run dir or Ray ---------------------------


def check_backend(backend: dict[str, Any]) -> None:
    """The backend a worker will build, checked up front: a known name, options it takes, and one
    that can score merged weights. A worker swaps each candidate's weights into its resident model
    (`Worker._swap_weights`); a backend that scores a model served elsewhere (openai) has no
    weights to swap, so every candidate would score the same served model."""
    from evomerge.backends import backend_class

    name = backend.get("name", "hf")
    engine = backend_class(name)  # an unknown name: did-you-mean
    if engine.weights == "none":
        raise ConfigError(f"backend {name!r} scores the model served at its base_url and cannot take merged weights, "
                          "so it cannot score a search's candidates: use backend hf or vllm, or have the pool served "
                          "by `evomerge serve` (pool: {endpoint: URL}); score one served model with `evomerge eval`")
    options = {k: v for k, v in backend.items() if k != "name"}
    for fixed in ("model", "device"):
        if fixed in options:
            raise ConfigError(f"backend.{fixed}: set by the search (the pool's base, workers.device); drop it")
    try:
        inspect.signature(engine).bind(model="base", device="cpu", **options)
    except TypeError as error:
        raise ConfigError(f"backend {name!r}: {error}") from None


# ---- Ray: a private local cluster unless an address is given; every wait bounded ---------------


_ray_thread_release: list[threading.Event] = []  # set by stop_ray: the init thread of the cluster we started may end
_ray_starting: list[threading.Event] = []  # set when a ray.init a stop cut short (in its thread) returns


def start_ray(address: str | None, num_cpus: int | None, timeout_s: float) -> bool:
    """Start a private local Ray cluster (address None), or join the one at `address`.

    An inherited RAY_ADDRESS is ignored (a search never joins someone else's cluster silently),
    and the local cluster keeps its files in a directory of this user's. ray.init runs in a helper
    thread: it blocks in C++ for minutes on an address that accepts connections but is no Ray, and
    Python runs signal handlers (Ctrl-C, SIGTERM) only in the main thread, which here just waits,
    up to `timeout_s` (LOCAL_START_TIMEOUT_S for a local start). The thread then stays alive until
    `stop_ray`: Ray's processes are tied to the thread that started them (PR_SET_PDEATHSIG).
    True when this call started a private local cluster (the caller then owns it: `stop_ray`)."""
    # Ray's C++ core would take SIGTERM over while it starts (a stack dump, then an abort: exit -6)
    # before _reclaim_signals can give it back; without it, the CLI's clean stop works throughout.
    # Ray reads this when it is first imported (ray_constants), so it is set before that.
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    import ray

    if ray.is_initialized():
        return False
    if address == "local":
        address = None
    if address:
        check_reachable(address, timeout_s)
    options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    if not address:
        options.update(num_cpus=num_cpus, _temp_dir=os.environ.get("RAY_TMPDIR") or _private_ray_dir())
    started, failures, release = threading.Event(), [], threading.Event()
    logging.getLogger("ray._private.worker").addFilter(_not_the_thread_warning)
    # Ray enables token authentication on the local cluster it starts, and says so on every start:
    # that is the default we want, and the user's terminal gets one line per stop, not Ray's notes.
    logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_not_the_auth_note)

    def init() -> None:
        try:
            ray.init(address=address or "local", **options)
        except BaseException as error:  # noqa: BLE001 - reported by the waiting main thread
            failures.append(error)
        started.set()
        if not failures:
            release.wait()

    inherited = os.environ.pop(RAY_ADDRESS_ENV, None) if address is None else None
    try:
        threading.Thread(target=init, name="evomerge-ray-init", daemon=True).start()
        limit = timeout_s if address else LOCAL_START_TIMEOUT_S
        deadline = time.monotonic() + limit
        _ray_starting.append(started)  # until the wait below ends: a stop in it leaves the start to settle_ray
        while not started.wait(0.1):
            if time.monotonic() > deadline:
                _ray_starting.remove(started)  # given up on: nothing for a later stop to wait for
                where = f"join the Ray cluster at {address}" if address else "start a local Ray cluster"
                raise EvomergeError(f"could not {where} within {limit:.0f}s" + (
                    "; check --ray-address (workers.ray_address), or leave it unset for a private local cluster"
                    if address else ""))
        _ray_starting.remove(started)
    finally:
        if inherited is not None:
            os.environ[RAY_ADDRESS_ENV] = inherited
    if failures:
        where = f"join the Ray cluster at {address}" if address else "start a local Ray cluster"
        raise EvomergeError(f"could not {where}: {first_line(failures[0])}") from None
    _reclaim_signals()
    _ray_thread_release.append(release)
    return address is None


def stop_ray() -> None:
    """Shut down the private local cluster `start_ray` started. The next search in this process
    then starts its own, with its own CPU count and the environment as it is then (a RemoteWorker
    reads its provider's token from its process's environment, never from a Ray argument)."""
    import ray

    ray.shutdown()
    while _ray_thread_release:
        _ray_thread_release.pop().set()


def settle_ray(timeout_s: float = 15.0) -> None:
    """On a stop (Ctrl-C, SIGTERM): let a ray.init the stop cut short finish in its thread (bounded),
    then shut Ray down now. Else Ray's exit handler does it while that thread is still connecting,
    and what Ray prints about it ('NoneType' object has no attribute ...) comes after the CLI's
    stop line, which must be the last."""
    if "ray" not in sys.modules:
        return
    while _ray_starting:
        _ray_starting.pop().wait(timeout_s)
    try:
        stop_ray()
    except Exception:  # noqa: BLE001 - best effort on the way out
        pass


def _not_the_auth_note(record: logging.LogRecord) -> bool:
    return "Token authentication is enabled for this Ray cluster" not in record.getMessage()


def _not_the_thread_warning(record: logging.LogRecord) -> bool:
    """Ray warns that it sets no SIGTERM handler from a thread: that is the point (the CLI has one)."""
    return "SIGTERM handler is not set" not in record.getMessage()


def _reclaim_signals() -> None:
    """Ray's C++ core may install its own SIGTERM handler (unless RAY_DISABLE_FAILURE_SIGNAL_HANDLER:
    it dumps a stack and aborts, exit -6): give SIGTERM and SIGINT back to the Python handlers."""
    if threading.current_thread() is not threading.main_thread():
        return
    for number in (signal.SIGTERM, signal.SIGINT):
        handler = signal.getsignal(number)
        if callable(handler):
            signal.signal(number, handler)


def check_reachable(address: str, timeout_s: float) -> None:
    """A TCP connection to a Ray address (GCS host:port, or ray://host:port of a Ray Client server),
    so that a wrong address is one line in seconds, not ray.init's minutes of retries."""
    if address == "auto":
        return  # this machine's running cluster, found by Ray itself (fast when there is none)
    scheme, _, rest = address.rpartition("://")
    host, _, port = rest.rstrip("/").rpartition(":")
    if not host:
        host, port = rest, ""
    try:
        number = int(port) if port else (10001 if scheme else 6379)
        socket.create_connection((host.strip("[]"), number), timeout=min(timeout_s, 10.0)).close()
    except (OSError, ValueError) as error:
        reason = type(error).__name__ if isinstance(error, OSError) else f"bad port {port!r}"
        raise EvomergeError(f"cannot reach the Ray cluster at {address} ({reason}); check --ray-address "
                            "(workers.ray_address), or leave it unset for a private local cluster") from None


def first_line(error: BaseException) -> str:
    """What went wrong, in one line: the last line of a Ray error that carries a remote traceback
    (the exception itself), else the first line of the message."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    exception_lines = [line for line in lines if _looks_like_exception(line)]
    line = exception_lines[-1] if exception_lines else lines[0]
    return line[:300]


def _looks_like_exception(line: str) -> bool:
    head = line.split(":", 1)[0]
    return ":" in line and head.replace(".", "").isidentifier() and head.split(".")[-1][:1].isupper() \
        and head.endswith(("Error", "Exception", "Interrupt", "Exit"))


def _private_ray_dir() -> str:
    """Ray's files under a directory of this user's: /tmp/ray may belong to another user's cluster."""
    return os.path.join(tempfile.gettempdir(), f"ray-{os.getuid()}" if hasattr(os, "getuid") else "ray-evomerge")
