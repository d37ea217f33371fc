"""Search: the loop. Ask, dispatch to workers, collect, tell, record, checkpoint.

    for each stage of the space:
        while the stage has budget:
            fill every idle worker (re-runs first, then optimizer.ask)   -> checkpoint, dispatch
            wait for the first finished candidate                        -> log, tell, checkpoint

Ordering makes kill -9 at any moment safe: a candidate is checkpointed as in flight before it is
dispatched, and logged (fsync) before it is told. On resume, a logged candidate the checkpoint
still has in flight is told from the log; any other in-flight candidate is evaluated again.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from evomerge.config import SearchConfig
from evomerge.errors import EvomergeError
from evomerge.optimizers import backend_of, merge_optimizer_config, optimizer_from_config
from evomerge.provider import is_remote, pool_info
from evomerge.recipe import Recipe
from evomerge.run import REFERENCES, Evaluation, Run

PROVIDER = "provider.json"  # what a remote pool's provider served: experts, layers, suite, tasks
STAGE_OFFSET = 1_000_000  # candidate id = stage * STAGE_OFFSET + the optimizer's id


@dataclass
class InFlight:
    id: int
    x: list[float]
    attempts: int = 0


@dataclass
class State:
    """Everything a resume needs besides the log; pickled into checkpoint.pkl."""

    stage: int = 0
    optimizer: bytes | None = None
    fixed: dict[str, Any] | None = None  # the recipe earlier stages settled on
    in_flight: dict[int, InFlight] = field(default_factory=dict)
    told: int = 0  # evaluations told in this stage
    asked: int = 0  # candidates asked in this stage


class Search:
    """Built from a config, it checks everything it can before any long work (pool, space, suite,
    optimizer); `execute(run)` then runs or continues the search in that run directory."""

    def __init__(self, config: SearchConfig):
        from evomerge.config import open_pool
        from evomerge.searchspace import load_space

        self.config = config
        self.provider_info: dict[str, Any] | None = None
        if is_remote(config.pool):  # the provider has the weights; it tells what the space needs
            self.provider_info = pool_info(config.pool)
            self.expert_names, n_layers = self.provider_info["experts"], self.provider_info["n_layers"]
        else:
            pool = open_pool(config.pool).validate(check_values=False)
            self.expert_names, n_layers = pool.names, pool.n_layers()
        self.space = load_space(config.space, experts=self.expert_names, n_layers=n_layers)
        if config.suite is not None:
            from evomerge.evaluator import load_suite

            load_suite(config.suite)
        self._make_optimizer(self.space.stage(0), State(), n_objectives=1)
        self.workers: list[Any] = []
        self.busy: dict[Any, tuple[int, InFlight, float]] = {}  # ref -> (worker index, candidate, start)

    # ---- the public entry ---------------------------------------------------------------------
    def execute(self, run: Run, progress: Any = None) -> Run:
        self.run, self.progress = run, progress
        self._check_provider()
        state = self._restore()
        self.run.set_status("running", budget=self.config.budget)
        try:
            self._start_workers()
            if self.config.references and self.run.read_json(REFERENCES) is None:
                self._score_references()
            while state.stage < self.space.n_stages:
                self._run_stage(state)
                self._next_stage(state)
        except BaseException as error:
            self.run.set_status("failed" if isinstance(error, Exception) else "stopped", reason=str(error)[:300])
            raise
        finally:
            self._stop_workers()
        self.run.update_pareto()
        self.run.set_status("finished", budget=self.config.budget)
        return self.run

    def _check_provider(self) -> None:
        """A remote run records what its provider served; resuming against another pool or suite
        would map the genomes onto other experts, so it is refused."""
        if self.provider_info is None:
            return
        recorded = self.run.read_json(PROVIDER)
        if recorded is None:
            self.run.write_json(PROVIDER, self.provider_info)
        elif recorded != self.provider_info:
            raise EvomergeError(f"{self.run.path}: the provider at {self.config.pool['endpoint']} now serves "
                                f"{self.provider_info} but this run was made against {recorded}")

    # ---- stages -------------------------------------------------------------------------------
    def stage_budget(self, stage: int) -> int:
        """The stage's share of the run's budget (a grid stops earlier when its points run out)."""
        fractions = [self.space.stage(i).budget_fraction for i in range(self.space.n_stages)]
        budgets = [int(round(self.config.budget * f / sum(fractions))) for f in fractions]
        budgets[-1] = self.config.budget - sum(budgets[:-1])
        return budgets[stage]

    def _stage_space(self, state: State):
        fixed = Recipe.model_validate(state.fixed) if state.fixed else None
        return self.space.stage(state.stage, fixed_from=fixed)

    def _make_optimizer(self, stage_space, state: State, n_objectives: int | None = None):
        options = merge_optimizer_config(stage_space.optimizer_hints, self.config.optimizer)
        if backend_of(options) is None:
            options["type"] = "cmaes"
        if options.get("points") == "classic":
            from evomerge.baselines import classic_grid

            options["points"] = classic_grid(stage_space)
        if backend_of(options) in ("nevergrad", "random"):
            options.setdefault("budget", self.stage_budget(state.stage))
        if backend_of(options) == "nevergrad":
            options.setdefault("num_workers", self.config.workers.count)
        if n_objectives is None:
            n_objectives = len(self._task_names()) if self.config.multi_objective else 1
        optimizer = optimizer_from_config(options, dim=stage_space.dim, lower=stage_space.lower, upper=stage_space.upper,
                                          x0=stage_space.x0, seed=self.config.seed + state.stage, n_objectives=n_objectives)
        if state.optimizer is not None:
            optimizer.load_state_dict(state.optimizer)
        return optimizer

    def _next_stage(self, state: State) -> None:
        stage_done = [e for e in self.run.evaluations() if e.stage == state.stage and e.ok]
        if stage_done:
            state.fixed = min(stage_done, key=lambda e: e.objective).recipe
        state.stage += 1
        state.optimizer, state.in_flight, state.told, state.asked = None, {}, 0, 0
        self.run.save_checkpoint(state.__dict__)

    def _run_stage(self, state: State) -> None:
        space = self._stage_space(state)
        optimizer = self._make_optimizer(space, state)
        budget = self.stage_budget(state.stage)
        self._tell_logged_in_flight(state, optimizer, space)
        rerun = collections.deque(state.in_flight.values())
        while state.told < budget:
            self._fill_workers(state, optimizer, space, rerun, budget)
            if not self.busy:
                break  # the optimizer has nothing more to propose (e.g. a grid is exhausted)
            for candidate, result in self._collect():
                if result is None:  # its worker died: run it again, a bounded number of times
                    rerun.append(candidate)
                    continue
                self._record(state, optimizer, space, candidate, result)

    # ---- dispatch -----------------------------------------------------------------------------
    def _idle_workers(self) -> list[int]:
        busy_workers = {index for index, _, _ in self.busy.values()}
        return [index for index in range(len(self.workers)) if index not in busy_workers]

    def _dispatch(self, index: int, candidate: InFlight, recipe: dict[str, Any]) -> None:
        self.busy[self.workers[index].evaluate.remote(recipe)] = (index, candidate, time.time())

    def _fill_workers(self, state, optimizer, space, rerun, budget) -> None:
        for index in self._idle_workers():
            if rerun:
                candidate = rerun.popleft()
            elif state.asked < budget:
                asked = optimizer.ask(1)
                if not asked:
                    return  # a generational optimizer waits for this generation's results
                candidate = InFlight(state.stage * STAGE_OFFSET + asked[0].id, asked[0].x.tolist())
                state.asked += 1
            else:
                return
            state.in_flight[candidate.id] = candidate
            state.optimizer = optimizer.state_dict()
            self.run.save_checkpoint(state.__dict__)  # in flight before it runs: resume re-runs it
            recipe = space.to_recipe(np.asarray(candidate.x), seed=self.config.seed)
            self._dispatch(index, candidate, recipe.model_dump(mode="json"))

    def _collect(self):
        import ray

        timeout = self.config.workers.timeout_s
        ready, _ = ray.wait(list(self.busy), num_returns=1, timeout=min(timeout, 5.0))
        finished = []
        for ref in ready:
            index, candidate, started = self.busy.pop(ref)
            try:
                finished.append((candidate, ray.get(ref)))
            except ray.exceptions.RayActorError:
                finished.append(self._worker_died(index, candidate, "worker process died"))
            except ray.exceptions.RayTaskError as error:
                finished.append((candidate, {"status": "failed", "reason": str(error).splitlines()[0][:300]}))
        now = time.time()
        for ref, (index, candidate, started) in list(self.busy.items()):
            if now - started > timeout:
                self.busy.pop(ref)
                ray.kill(self.workers[index])
                self.workers[index] = self._new_worker()
                finished.append((candidate, {"status": "failed", "reason": f"timeout after {timeout:.0f}s"}))
        return finished

    def _worker_died(self, index: int, candidate: InFlight, why: str):
        self.workers[index] = self._new_worker()
        candidate.attempts += 1
        if candidate.attempts >= self.config.workers.max_attempts:
            return candidate, {"status": "failed", "reason": f"{why} {candidate.attempts} times"}
        return candidate, None

    # ---- recording ----------------------------------------------------------------------------
    def _record(self, state, optimizer, space, candidate: InFlight, result: dict[str, Any]) -> None:
        x = np.asarray(candidate.x)
        if result["status"] == "ok":
            objective = -result["scalar"] + space.penalty(x)
        else:
            objective = self.config.failure_objective
        evaluation = Evaluation(
            id=candidate.id, stage=state.stage, genome=candidate.x,
            recipe=space.to_recipe(x, seed=self.config.seed).model_dump(mode="json"),
            scores=result.get("scores", {}), objective=objective, status=result["status"],
            reason=result.get("reason", ""), worker=str(result.get("worker", "")), seconds=result.get("seconds"),
            finished_at=time.time(),
        )
        self.run.append(evaluation)  # the log first: from here on this result survives a kill
        self._tell(state, optimizer, evaluation)
        if self.progress is not None:
            self.progress(evaluation)

    def _tell(self, state: State, optimizer, evaluation: Evaluation) -> None:
        candidate_id = evaluation.id - state.stage * STAGE_OFFSET
        loss: float | list[float] = evaluation.objective
        if self.config.multi_objective:
            tasks = self._task_names()
            loss = [-evaluation.scores[t] if evaluation.ok else self.config.failure_objective for t in tasks]
        optimizer.tell([(candidate_id, loss)])
        state.in_flight.pop(evaluation.id, None)
        state.told += 1
        state.optimizer = optimizer.state_dict()
        self.run.save_checkpoint(state.__dict__)

    def _tell_logged_in_flight(self, state: State, optimizer, space) -> None:
        """After a kill between log and checkpoint: tell what the log has, never re-evaluate it."""
        logged = {e.id: e for e in self.run.evaluations() if e.stage == state.stage}
        for candidate_id in sorted(set(state.in_flight) & set(logged)):
            self._tell(state, optimizer, logged[candidate_id])

    def _task_names(self) -> list[str]:
        if self.provider_info and self.provider_info["tasks"]:
            return sorted(self.provider_info["tasks"])
        references = self.run.read_json(REFERENCES) or {}
        scored = [r["scores"] for r in references.values() if r.get("scores")]
        if scored:
            return sorted(scored[0])
        raise EvomergeError("multi_objective needs the references (set references: true)")

    # ---- workers ------------------------------------------------------------------------------
    def _new_worker(self):
        from evomerge.worker import ray_worker_class

        workers = self.config.workers
        if is_remote(self.config.pool):  # waits on HTTP: no CPU of its own
            import ray

            from evomerge.provider import RemoteWorker

            return ray.remote(num_cpus=0)(RemoteWorker).remote(self.config.pool, workers.timeout_s)
        threads = workers.threads or max(1, _cores() // workers.count)
        return ray_worker_class(workers.device).remote(
            self.config.pool, self.config.suite, self.config.backend, device=_device_for(workers.device),
            threads=threads, objective=self.config.objective)

    def _start_workers(self) -> None:
        import ray

        if not ray.is_initialized():
            workers = self.config.workers
            ray.init(address=workers.ray_address, include_dashboard=False, log_to_driver=False,
                     num_cpus=None if workers.ray_address else max(workers.count, _cores()),
                     configure_logging=False)
        self.workers = [self._new_worker() for _ in range(self.config.workers.count)]
        pids = ray.get([w.info.remote() for w in self.workers])
        self.run.set_status("running", budget=self.config.budget, workers=[p["pid"] for p in pids])

    def _stop_workers(self) -> None:
        import ray

        for worker in self.workers:
            ray.kill(worker)
        self.workers = []

    def _score_references(self) -> None:
        """The base and each expert, scored on the same suite by the same workers, through the same
        dispatch as candidates: a worker that dies is replaced and its reference run again, and a
        reference that times out or fails is recorded as failed rather than stopping the search."""
        from evomerge.baselines import reference_recipes

        recipes = reference_recipes(self.expert_names)
        names = list(recipes)
        todo = collections.deque(InFlight(i, []) for i in range(len(names)))
        results: dict[str, dict[str, Any]] = {}
        while todo or self.busy:
            for index in self._idle_workers():
                if todo:
                    reference = todo.popleft()
                    self._dispatch(index, reference, recipes[names[reference.id]].model_dump(mode="json"))
            for reference, result in self._collect():
                if result is None:
                    todo.append(reference)
                else:
                    results[names[reference.id]] = result
        self.run.write_json(REFERENCES, {name: results[name] for name in names})

    def _restore(self) -> State:
        saved = self.run.load_checkpoint()
        if saved is None:
            return State()
        return State(**saved)


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _device_for(device: str) -> str:
    """Inside a Ray actor with one GPU, that GPU is cuda:0 (Ray sets CUDA_VISIBLE_DEVICES)."""
    return "cuda:0" if device.startswith("cuda") else device


def search(config: SearchConfig, run_dir: Path, progress: Any = None) -> Run:
    prepared = Search(config)  # a bad config fails here, before the run dir exists
    return prepared.execute(Run.create(run_dir, config.model_dump(mode="json")), progress)


def open_for_resume(run_dir: Path) -> tuple[Run, Search]:
    run = Run.open(run_dir)
    state = run.status().get("state")
    if state == "finished":
        raise EvomergeError(f"{run_dir} has finished its budget; start another run to search more")
    if state == "running":
        raise EvomergeError(f"{run_dir} is running (pid {run.status().get('pid')}); stop it before resuming")
    return run, Search(SearchConfig.model_validate(run.config()))


def resume(run_dir: Path, progress: Any = None) -> Run:
    run, prepared = open_for_resume(run_dir)
    return prepared.execute(run, progress)
