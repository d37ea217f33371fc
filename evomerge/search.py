"""Search: the loop. Ask, dispatch to workers, collect, tell, record, checkpoint.

    for each stage of the space:
        while the stage has budget:
            fill every idle worker (re-runs first, then optimizer.ask)   -> checkpoint, dispatch
            wait for the first finished candidate                        -> log, tell, checkpoint

Ray, the workers, dispatch, timeouts and worker replacement belong to the WorkerPool
(evomerge/workerpool.py): this module imports no Ray.

Ordering makes kill -9 at any moment safe: a candidate is checkpointed as in flight before it is
dispatched, and logged (fsync) before it is told. On resume, a logged candidate the checkpoint
still has in flight is told from the log; any other in-flight candidate is evaluated again.

A resume reconciles the log and the checkpoint first (``_restore``): a torn last log line is cut
off (its candidate runs again), and a checkpoint that is missing, or does not match the log, is
rebuilt from the log (``_rebuild``); a log shorter than the checkpoint counted is refused. The run's
lock (``Run.lock``) is held for the whole of ``execute``: a second search or resume is refused.
"""

from __future__ import annotations

import collections
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from evomerge.config import SearchConfig
from evomerge.errors import EvomergeError
from evomerge.optimizers import Bounds, SearchContext, build_optimizer, merge_optimizer_config
from evomerge.poolkinds import pool_kind
from evomerge.recipe import Recipe
from evomerge.failures import FailureWatch, references_all_failed
from evomerge.run import CHECKPOINT, EVALUATIONS, LEGACY_CHECKPOINT, REFERENCES, STATUS, Evaluation, Run
from evomerge.searchstate import STAGE_OFFSET, InFlight, State
from evomerge.workerpool import WorkerPool

PROVIDER = "provider.json"  # what a remote pool's provider served: experts, layers, suite, tasks


class Search:
    """Built from a config, it checks everything it can before any long work (pool, space, suite,
    optimizer); `execute(run)` then runs or continues the search in that run directory."""

    def __init__(self, config: SearchConfig):
        from evomerge.searchspace import load_space

        self.config = config
        info = pool_kind(config.pool).info(config)  # the pool checked (or its provider asked) up front
        self.provider_info, self.pool_tasks = info.provider, info.tasks
        self.expert_names = info.experts
        self._space_shape = {"n_layers": info.n_layers, "tasks": info.tasks}
        self.space = load_space(config.space, experts=self.expert_names, **self._space_shape)
        if config.suite is not None:
            from evomerge.evaluator import load_suite

            load_suite(config.suite)
        self._make_optimizer(self.space.stage(0), State(), n_objectives=1, references=False)  # checked now
        self.pool = WorkerPool(config)  # Ray, the workers, dispatch: the loop sees candidates and results
        self.failures = FailureWatch(config.workers.count)  # a broken setup stops the search early

    # ---- the public entry ---------------------------------------------------------------------
    def execute(self, run: Run, progress: Any = None) -> Run:
        self.run, self.progress = run, progress
        run.lock()  # held for the whole run: a second search or resume of this run is refused
        try:
            self._check_provider()
            try:  # a resumed run: from the references it scored, before its state is rebuilt over the space
                self._preselect()
            except EvomergeError as error:  # references.json unreadable: the run failed, not left stopped
                self._record_stop(error)
                raise
            state = self._restore()
            try:  # set_status inside: a signal right after it must not leave `running` behind
                self.run.set_status("running", budget=self.config.budget)
                self._start_workers()
                if self.config.references and self.run.read_json(REFERENCES) is None:
                    self._score_references()
                    self._preselect()
                while state.stage < self.space.n_stages:
                    self._run_stage(state)
                    self._next_stage(state)
                self.run.update_pareto()
                self.run.set_status("finished", budget=self.config.budget)
            except BaseException as error:
                self._record_stop(error)
                raise
            finally:
                self._stop_workers()
                self.stop_ray()
        finally:
            run.release_lock()
        return self.run

    def _record_stop(self, error: BaseException) -> None:
        """status.json says failed/stopped, not running; when that cannot be written either (the
        disk that is full), the error being raised is the one the user sees, not this one."""
        try:
            self.run.set_status("failed" if isinstance(error, Exception) else "stopped", reason=str(error)[:300])
        except EvomergeError:
            pass

    def _note(self, line: str) -> None:
        """One line for the user (a repair made while resuming), above any live display."""
        print(f"evomerge: {line}", file=sys.stderr, flush=True)

    def _check_provider(self) -> None:
        """A remote run records what its provider served; resuming against another pool or suite
        would map the genomes onto other experts, so it is refused."""
        if self.provider_info is None:
            return
        recorded = self.run.read_json(PROVIDER)
        if recorded is None:
            self.run.write_json(PROVIDER, self.provider_info)
        elif recorded != self.provider_info:
            raise EvomergeError(f"{self.run.path}: the provider at {self.config.pool.endpoint} now serves "
                                f"{self.provider_info} but this run was made against {recorded}")

    def _preselect(self) -> None:
        """With `preselect: k`, the space over the k experts the references choose (evomerge/preselect.py);
        derived from references.json each time, so a resumed run searches the same experts."""
        from evomerge.preselect import preselect, preselect_size

        references = self.run.read_json(REFERENCES)
        setting = self.config.preselect
        if references is None or (setting == "auto" and not self.pool.kind.preselects_by_default):
            return
        tasks = (references.get("base") or {}).get("scores") or {}
        k = preselect_size(setting, len(self.expert_names), len(tasks))
        if k is None or (setting == "auto" and not tasks):  # auto without the base's scores: every expert
            return
        from evomerge.searchspace import load_space

        chosen = preselect(references, self.expert_names, k)
        logged = next(iter(self.run.evaluations()), None)
        if logged is not None and sorted(logged.recipe["experts"]) != sorted(chosen):
            return  # a run begun by an evomerge without pre-selection: it goes on over what it searched
        if self.space.experts != chosen:
            self._note(f"preselect: searching {len(chosen)} of {len(self.expert_names)} experts "
                       f"({', '.join(chosen)}); the rest are off")
            self.space = load_space(self.config.space, experts=chosen, **self._space_shape)

    # ---- stages -------------------------------------------------------------------------------
    def stage_budget(self, stage: int) -> int:
        """The stage's share of the run's budget (a grid stops earlier when its points run out)."""
        return stage_budgets(self.space, self.config.budget)[stage]

    def _stage_space(self, state: State):
        fixed = Recipe.model_validate(state.fixed) if state.fixed else None
        return self.space.stage(state.stage, fixed_from=fixed)

    def _make_optimizer(self, stage_space, state: State, n_objectives: int | None = None, references: bool = True):
        options = merge_optimizer_config(stage_space.optimizer_hints, self.config.optimizer)
        if n_objectives is None:
            n_objectives = {"scalar": 1, "cost": 2}.get(self.config.objectives) or len(self._task_names())
        x0 = self._warm_x0(stage_space) if references else stage_space.x0
        bounds = Bounds(lower=stage_space.lower, upper=stage_space.upper, x0=x0)
        context = SearchContext(budget=self.stage_budget(state.stage), workers=self.config.workers.count,
                                space=stage_space)
        optimizer = build_optimizer(options, bounds, context, seed=self.config.seed + state.stage,
                                    n_objectives=n_objectives)
        if state.optimizer is not None:
            optimizer.load_state_dict(state.optimizer)
        return optimizer

    def _warm_x0(self, stage_space) -> np.ndarray:
        """The space's init, or where the pool kind says to start from the scored references
        (derived from references.json each time, so a rebuilt optimizer starts where it did)."""
        warm = self.pool.kind.warm_start(self.run.read_json(REFERENCES) or {}, self.config)
        if warm is None:
            return stage_space.x0
        return np.clip(stage_space.to_vector(warm), stage_space.lower, stage_space.upper)

    def _next_stage(self, state: State) -> None:
        stage_done = [e for e in self.run.evaluations() if e.stage == state.stage and e.ok]
        if stage_done:
            state.fixed = min(stage_done, key=lambda e: e.objective).recipe
        state.stage += 1
        state.optimizer, state.in_flight = None, {}
        self.failures.start()  # a stage that breaks (its genes make every merge fail) stops too
        self.run.save_checkpoint(state.__dict__)

    def _run_stage(self, state: State) -> None:
        space = self._stage_space(state)
        optimizer = self._make_optimizer(space, state)
        budget = self.stage_budget(state.stage)
        self._tell_logged_in_flight(state, optimizer, space)
        rerun = collections.deque(state.in_flight.values())
        while optimizer.n_told < budget:
            self._fill_workers(state, optimizer, space, rerun, budget)
            if not self.pool.busy:
                break  # the optimizer has nothing more to propose (e.g. a grid is exhausted)
            for candidate, result in self._collect():
                if result is None:  # its worker died: run it again, a bounded number of times
                    rerun.append(candidate)
                    continue
                self._record(state, optimizer, space, candidate, result)
                self._stop_if_broken(result, state, optimizer.n_told)

    # ---- dispatch -----------------------------------------------------------------------------
    def _fill_workers(self, state, optimizer, space, rerun, budget) -> None:
        for index in self.pool.idle():
            if rerun:
                candidate = rerun.popleft()
            elif optimizer.n_proposed < budget:
                asked = optimizer.ask(1)
                if not asked:
                    return  # a generational optimizer waits for this generation's results
                candidate = InFlight(state.stage * STAGE_OFFSET + asked[0].id, asked[0].x.tolist())
            else:
                return
            state.in_flight[candidate.id] = candidate
            state.optimizer = optimizer.state_dict()
            self.run.save_checkpoint(state.__dict__)  # in flight before it runs: resume re-runs it
            recipe = space.to_recipe(np.asarray(candidate.x), seed=self.config.seed)
            self.pool.submit(index, candidate, recipe.model_dump(mode="json"))

    def _collect(self):
        return self.pool.collect()

    # ---- recording ----------------------------------------------------------------------------
    def _record(self, state, optimizer, space, candidate: InFlight, result: dict[str, Any]) -> None:
        x = np.asarray(candidate.x)
        cost = result.get("cost")
        if result["status"] == "ok":
            objective = -result["scalar"] + space.penalty(x)
            if self.config.cost_weight and cost is not None:
                objective += self.config.cost_weight * 1000.0 * cost["serving_usd_per_query"]
        else:
            objective = self.config.failure_objective
        evaluation = Evaluation(
            id=candidate.id, stage=state.stage, genome=candidate.x,
            recipe=space.to_recipe(x, seed=self.config.seed).model_dump(mode="json"),
            scores=result.get("scores", {}), objective=objective, status=result["status"],
            reason=result.get("reason", ""), worker=str(result.get("worker", "")), seconds=result.get("seconds"),
            finished_at=time.time(), cost=cost,
        )
        self.run.append(evaluation)  # the log first: from here on this result survives a kill
        state.logged, state.last_id = state.logged + 1, evaluation.id
        self._tell(state, optimizer, evaluation)
        if self.progress is not None:
            self.progress(evaluation)

    def _tell(self, state: State, optimizer, evaluation: Evaluation, save: bool = True) -> None:
        candidate_id = evaluation.id - state.stage * STAGE_OFFSET
        loss: float | list[float] = evaluation.objective
        if self.config.objectives == "tasks":
            tasks = self._task_names()
            loss = [-evaluation.scores[t] if evaluation.ok else self.config.failure_objective for t in tasks]
        elif self.config.objectives == "cost":  # a failure costs nothing to serve but is never worth it
            loss = [evaluation.objective, evaluation.serving_per_1k if evaluation.ok else self.config.failure_objective]
        optimizer.tell([(candidate_id, loss)])
        state.in_flight.pop(evaluation.id, None)
        if save:
            state.optimizer = optimizer.state_dict()
            self.run.save_checkpoint(state.__dict__)

    def _tell_logged_in_flight(self, state: State, optimizer, space) -> None:
        """After a kill between log and checkpoint: tell what the log has, never re-evaluate it.
        First, the optimizer (replayed from the checkpoint) must have exactly the checkpoint's
        in-flight candidates out, at the same points: else its proposals would not be the run's."""
        self._check_in_flight(state, optimizer)
        for evaluation in self.run.evaluations():  # log order: _restore has checked the log
            if evaluation.stage == state.stage and evaluation.id in state.in_flight:
                state.logged, state.last_id = state.logged + 1, evaluation.id
                self._tell(state, optimizer, evaluation)

    def _check_in_flight(self, state: State, optimizer) -> None:
        offset = state.stage * STAGE_OFFSET
        pending = {offset + cid: x for cid, x in optimizer.pending().items()}
        wrong = sorted(set(pending) ^ set(state.in_flight))
        wrong += [cid for cid in sorted(set(pending) & set(state.in_flight))
                  if not np.allclose(pending[cid], state.in_flight[cid].x, rtol=0, atol=1e-9)]
        if wrong:
            raise EvomergeError(f"{self.run.path / CHECKPOINT}: the optimizer's state does not match the in-flight "
                                f"candidate {wrong[0]}; delete {CHECKPOINT} to rebuild the run's state from {EVALUATIONS}")

    def _task_names(self) -> list[str]:
        if self.pool_tasks:
            return self.pool_tasks
        references = self.run.read_json(REFERENCES) or {}
        scored = [r["scores"] for r in references.values() if r.get("scores")]
        if scored:
            return sorted(scored[0])
        raise EvomergeError("multi_objective needs the references (set references: true)")

    # ---- workers ------------------------------------------------------------------------------
    def start_ray(self) -> None:
        """Start (or join) Ray: `search` and the CLI call it before the run dir is made, so a bad
        address leaves nothing; `stop_ray` pairs with it (see WorkerPool)."""
        self.pool.start_ray()

    def stop_ray(self) -> None:
        self.pool.stop_ray()

    def _start_workers(self) -> None:
        self.failures.start()
        pids = self.pool.start(self.run.path)
        self.run.set_status("running", budget=self.config.budget, workers=pids)

    def _stop_workers(self) -> None:
        self.pool.stop()

    def _stop_if_broken(self, result: dict[str, Any], state: State, told: int) -> None:
        later = range(state.stage + 1, self.space.n_stages)
        left = self.stage_budget(state.stage) - told + sum(self.stage_budget(s) for s in later)
        stage = ""
        if self.space.n_stages > 1:
            name = self.space.stages[state.stage].name
            stage = f" in stage {state.stage + 1} of {self.space.n_stages}" + (f" ({name})" if name else "")
        self.failures.watch(result, left, stage, self.run.path)

    def _score_references(self) -> None:
        """The base and each expert, scored on the same suite by the same workers, through the same
        dispatch as candidates: a worker that dies is replaced and its reference run again, and a
        reference that times out or fails is recorded as failed rather than stopping the search."""
        recipes = self.pool.kind.references(self.expert_names, self.config)
        names = list(recipes)
        jobs = [(InFlight(i, []), recipes[name].model_dump(mode="json")) for i, name in enumerate(names)]
        results = {names[reference.id]: result for reference, result in self.pool.run_all(jobs)}
        references_all_failed(results, self.run.path)  # even the base fails: so will every candidate
        self.run.write_json(REFERENCES, {name: results[name] for name in names})

    def _restore(self) -> State:
        """The state to continue from, reconciled with the log, which is the truth: the log may be
        one record ahead (a kill between logging a result and checkpointing its tell: told from
        the log by _tell_logged_in_flight), never behind. No checkpoint, or one that disagrees
        with the log: rebuilt from the log. A log that lost records the checkpoint counted: refused."""
        log = self.run.checked_evaluations(self._note)
        saved = self.run.load_checkpoint()
        file, legacy = self.run.path / EVALUATIONS, self.run.path / LEGACY_CHECKPOINT
        if saved is None:
            if legacy.is_file():
                self._note(f"{legacy} (an older evomerge's pickle) is not loaded, since unpickling a file can run "
                           f"code: the run's state is rebuilt from {EVALUATIONS}")
            elif log:
                self._note(f"{self.run.path / CHECKPOINT} is missing: the run's state is rebuilt from {file} "
                           f"({len(log)} evaluations, none evaluated again)")
            return self._rebuild(log) if log else State()
        state = State.from_data(saved, self.run.path / CHECKPOINT)
        if state.logged and not file.is_file():
            raise EvomergeError(f"{file} is missing but {CHECKPOINT} counted {state.logged} evaluations: the log is "
                                "the run's record; restore it to resume")
        if len(log) < state.logged:
            raise EvomergeError(f"{file} has {len(log)} evaluations but {CHECKPOINT} counted {state.logged}: records "
                                f"were lost; restore them, or delete {CHECKPOINT} to continue from what the log holds")
        seen, ahead = log[:state.logged], log[state.logged:]
        if (seen and seen[-1].id != state.last_id) or any(
                e.stage != state.stage or e.id not in state.in_flight for e in ahead):
            self._note(f"{self.run.path / CHECKPOINT} does not match {file}: the run's state is rebuilt from the log")
            return self._rebuild(log)
        return state

    def _rebuild(self, log: list[Evaluation]) -> State:
        """The state from the log alone. Each earlier stage settles on its best (as _next_stage
        does); the last stage's optimizer is replayed as the loop drives it (candidates asked while
        workers are idle, results told in log order), checking each logged genome comes out again.
        Asked but not logged: in flight, run again. Exact for cmaes, random and grid; a nevergrad
        run whose asks came in another order cannot be rebuilt and says so."""
        state = State(stage=max(e.stage for e in log))
        for stage in range(state.stage):
            done = [e for e in log if e.stage == stage and e.ok]
            if done:
                state.fixed = min(done, key=lambda e: e.objective).recipe
        optimizer = self._make_optimizer(self._stage_space(state), state)
        budget, offset = self.stage_budget(state.stage), state.stage * STAGE_OFFSET

        def ask() -> bool:
            asked = optimizer.ask(1) if optimizer.n_proposed < budget else []
            for candidate in asked:
                state.in_flight[offset + candidate.id] = InFlight(offset + candidate.id, candidate.x.tolist())
            return bool(asked)

        for evaluation in (e for e in log if e.stage == state.stage):
            while len(state.in_flight) < self.config.workers.count and ask():
                pass
            while evaluation.id not in state.in_flight and evaluation.id - offset >= optimizer.n_asked and ask():
                pass
            candidate = state.in_flight.get(evaluation.id)
            if candidate is None or not np.allclose(candidate.x, evaluation.genome, rtol=0, atol=1e-9):
                raise EvomergeError(f"{self.run.path / EVALUATIONS}: replaying the log into a fresh {optimizer.name} "
                                    f"optimizer does not give candidate {evaluation.id} again, so the run's state "
                                    f"cannot be rebuilt from the log; restore {CHECKPOINT}")
            self._tell(state, optimizer, evaluation, save=False)
        state.logged, state.last_id = len(log), log[-1].id
        state.optimizer = optimizer.state_dict()
        self.run.save_checkpoint(state.__dict__)
        return state


def stage_budgets(space, budget: int) -> list[int]:
    """Each stage's evaluations: a stage's set `evaluations` (at most half the budget, so that a
    short run still searches), the rest shared by `budget_fraction` among the other stages; the
    last stage that shares takes what rounding leaves."""
    stages = [space.stage(i) for i in range(space.n_stages)]
    budgets = [min(s.evaluations, budget // 2) if s.evaluations else 0 for s in stages]
    sharing = [i for i, s in enumerate(stages) if not s.evaluations]
    left = budget - sum(budgets)
    total = sum(stages[i].budget_fraction for i in sharing)
    for i in sharing:
        budgets[i] = int(round(left * stages[i].budget_fraction / total))
    if sharing:
        budgets[sharing[-1]] += budget - sum(budgets)
    return budgets


def search(config: SearchConfig, run_dir: Path, progress: Any = None) -> Run:
    prepared = Search(config)  # a bad config fails here, before the run dir exists
    prepared.start_ray()  # and so does a Ray address that does not answer
    try:
        return prepared.execute(Run.create(run_dir, config.model_dump(mode="json")), progress)
    finally:
        prepared.stop_ray()


def open_for_resume(run_dir: Path) -> tuple[Run, Search]:
    """The run, locked by this process (a second resume, or the search still running it, is
    refused with its pid and host), and its Search; `execute` continues it and releases the lock."""
    run = Run.open(run_dir)
    run.lock()
    try:
        status = run.status()  # "running" here is stale: its process no longer holds the lock
        if status.get("state") == "finished":
            raise EvomergeError(f"{run_dir} has finished its budget; start another run to search more")
        if status.get("state") == "unknown":  # advisory only
            print(f"evomerge: {run.path / STATUS} is not valid JSON: ignored, this resume writes it again", file=sys.stderr)
        return run, Search(SearchConfig.model_validate(run.config()))
    except BaseException:
        run.release_lock()
        raise


def resume(run_dir: Path, progress: Any = None) -> Run:
    run, prepared = open_for_resume(run_dir)
    return prepared.execute(run, progress)
