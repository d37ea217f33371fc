"""WorkerPool: the Ray workers a search scores recipes on, and everything Ray about them.

It owns the cluster (a private local one, started and stopped with its search, unless an address
is given), the workers (one Ray actor each: a local `Worker`, or a `RemoteWorker` for a provider's
pool), dispatch, per-candidate timeouts and the replacement of a worker that died or timed out.
The search loop sees jobs and results only:

    pool.start()                          # actors up, each has loaded its pool and evaluator
    for index in pool.idle(): pool.submit(index, job, recipe)
    for job, result in pool.collect():    # result None: its worker died, run the job again
    pool.run_all(jobs)                    # the same, to completion (the references)

A job is any object with an `attempts` counter (the search's InFlight): a job whose worker died
`workers.max_attempts` times comes back failed instead of None.
"""

from __future__ import annotations

import collections
import os
import time
from pathlib import Path
from typing import Any, Iterable, Optional

from evomerge.config import SearchConfig
from evomerge.errors import EvomergeError
from evomerge.poolkinds import pool_kind


class WorkerPool:
    def __init__(self, config: SearchConfig):
        self.config = config
        self.kind = pool_kind(config.pool)
        self.workers: list[Any] = []
        self.busy: dict[Any, tuple[int, Any, float]] = {}  # ref -> (worker index, job, dispatched at)
        self._owns_ray = False  # True once start_ray started a private local cluster
        self.run_dir: Optional[Path] = None  # the run's directory, for workers that keep files there

    # ---- the cluster --------------------------------------------------------------------------
    def start_ray(self) -> None:
        """Start (or join) Ray; a search calls it before its run dir is made, so a bad address
        leaves nothing behind."""
        from evomerge.worker import start_ray

        workers = self.config.workers
        if start_ray(workers.ray_address, num_cpus=max(workers.count, cores()), timeout_s=workers.connect_timeout_s):
            self._owns_ray = True

    def stop_ray(self) -> None:
        """Shut down the private cluster this pool started, if it did: it lives as long as its
        search, also when the search fails before it runs (a run dir that exists). A cluster left
        behind would be joined by the next search in this process, with the environment of then."""
        if not self._owns_ray:
            return
        self._owns_ray = False
        try:
            from evomerge.worker import stop_ray

            stop_ray()
        except Exception:  # noqa: BLE001 - best effort on the way out; the process may be ending
            pass

    # ---- the workers --------------------------------------------------------------------------
    def start(self, run_dir: Optional[Path] = None) -> list[int]:
        """Start `workers.count` workers and wait until each has loaded its pool and evaluator
        (bounded; a constructor's error is one line). Returns their process ids."""
        self.run_dir = run_dir
        self.start_ray()  # first: it sets what Ray reads when it is imported
        import ray

        from evomerge.worker import first_line

        self._check_resources()
        workers = self.config.workers
        self.workers = [self._new_worker() for _ in range(workers.count)]
        try:
            infos = ray.get([w.info.remote() for w in self.workers], timeout=workers.start_timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise EvomergeError(f"the {workers.count} worker(s) did not start within {workers.start_timeout_s:.0f}s "
                                "(workers.start_timeout_s): a cluster without the resources they ask for, or a "
                                "model that loads slower than that") from None
        except ray.exceptions.RayError as error:
            raise EvomergeError(f"a worker failed to start: {first_line(error)}") from None
        return [info["pid"] for info in infos]

    def stop(self) -> None:
        """Best effort: on a stop (SIGTERM to the process group, Ctrl-C) Ray itself may be gone, or
        half imported (a stop during `import ray`): with no workers it is not touched."""
        self.busy.clear()
        if not self.workers:
            return
        import ray

        for worker in self.workers:
            try:
                ray.kill(worker)
            except Exception:  # noqa: BLE001 - the worker, or Ray, is already gone
                pass
        self.workers = []

    def _new_worker(self):
        workers = self.config.workers
        threads = workers.threads or max(1, cores() // workers.count)
        return self.kind.new_worker(self.config, threads=threads, device=device_in_actor(workers.device),
                                    run_dir=self.run_dir)

    def _check_resources(self) -> None:
        """A local cluster cannot grow: workers asking for GPUs it lacks would wait forever."""
        import ray

        workers = self.config.workers
        if workers.ray_address or not workers.device.startswith("cuda") or not self.kind.uses_devices:
            return
        gpus = int(ray.cluster_resources().get("GPU", 0))
        if gpus < workers.count:
            raise EvomergeError(f"workers: {workers.count} worker(s) on {workers.device} need {workers.count} GPU(s), "
                                f"Ray sees {gpus} on this machine; lower workers.count or use device: cpu")

    # ---- dispatch -----------------------------------------------------------------------------
    def idle(self) -> list[int]:
        busy_workers = {index for index, _, _ in self.busy.values()}
        return [index for index in range(len(self.workers)) if index not in busy_workers]

    def submit(self, index: int, job: Any, recipe: dict[str, Any]) -> None:
        self.busy[self.workers[index].evaluate.remote(recipe)] = (index, job, time.time())

    def collect(self) -> list[tuple[Any, Optional[dict[str, Any]]]]:
        """The jobs that finished within a few seconds, with their results; a job over
        `workers.timeout_s` fails and its worker is replaced (it may be stuck in C code)."""
        import ray

        timeout = self.config.workers.timeout_s
        ready, _ = ray.wait(list(self.busy), num_returns=1, timeout=min(timeout, 5.0))
        finished = []
        for ref in ready:
            index, job, _ = self.busy.pop(ref)
            try:
                finished.append((job, ray.get(ref)))
            except ray.exceptions.RayActorError:
                finished.append(self._worker_died(index, job, "worker process died"))
            except ray.exceptions.RayTaskError as error:
                finished.append((job, {"status": "failed", "reason": str(error).splitlines()[0][:300]}))
        now = time.time()
        for ref, (index, job, started) in list(self.busy.items()):
            if now - started > timeout:
                self.busy.pop(ref)
                ray.kill(self.workers[index])
                self.workers[index] = self._new_worker()
                finished.append((job, {"status": "failed", "reason": f"timeout after {timeout:.0f}s"}))
        return finished

    def _worker_died(self, index: int, job: Any, why: str):
        self.workers[index] = self._new_worker()
        job.attempts += 1
        if job.attempts >= self.config.workers.max_attempts:
            return job, {"status": "failed", "reason": f"{why} {job.attempts} times"}
        return job, None

    def run_all(self, jobs: Iterable[tuple[Any, dict[str, Any]]]) -> list[tuple[Any, dict[str, Any]]]:
        """Every (job, recipe) to a result, through the same dispatch as candidates: a job whose
        worker died runs again (bounded by max_attempts), one that times out or fails is a failed
        result. Results in the order they finished."""
        todo = collections.deque(jobs)
        recipe_of = {id(job): recipe for job, recipe in todo}
        results = []
        while todo or self.busy:
            for index in self.idle():
                if todo:
                    self.submit(index, *todo.popleft())
            for job, result in self.collect():
                if result is None:
                    todo.append((job, recipe_of[id(job)]))
                else:
                    results.append((job, result))
        return results


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def device_in_actor(device: str) -> str:
    """Inside a Ray actor with one GPU, that GPU is cuda:0 (Ray sets CUDA_VISIBLE_DEVICES)."""
    return "cuda:0" if device.startswith("cuda") else device
