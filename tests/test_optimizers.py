"""The Optimizer contract, for every backend: determinism, exact resume, bounds, out-of-order tells."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from evomerge.errors import ConfigError
from evomerge.optimizers import OPTIMIZERS, make_optimizer, merge_optimizer_config, optimizer_from_config

DIM = 3
LOWER = np.array([0.0, -1.5, -1.5])
UPPER = np.array([1.0, 1.5, 1.5])
X0 = np.array([1.0, 1 / 3, 1 / 3])
TARGET = np.array([0.3, -0.7, 0.9])


def problem(seed=7, **kw):
    return dict(dim=DIM, lower=LOWER, upper=UPPER, x0=X0, seed=seed, **kw)


BACKENDS = {
    "cmaes": dict(popsize=6, sigma0=0.3),
    "nevergrad": dict(name="TwoPointsDE", num_workers=6, budget=200),
    "random": {},
    "grid": dict(points=[LOWER + (UPPER - LOWER) * t for t in np.linspace(0, 1, 40)]),
}


def sphere(x):
    return float(np.sum((x - TARGET) ** 2))


def drive(opt, steps, batch=4, reverse=False, start=None):
    """Ask ``batch``, tell in (optionally reversed) order; returns the asked (id, x) list."""
    seen = []
    for _ in range(steps):
        cands = opt.ask(batch)
        seen += [(c.id, c.x.copy()) for c in cands]
        results = [(c.id, sphere(c.x)) for c in cands]
        opt.tell(results[::-1] if reverse else results)
    return seen


def same(a, b):
    assert [i for i, _ in a] == [i for i, _ in b]
    for (_, xa), (_, xb) in zip(a, b):
        np.testing.assert_array_equal(xa, xb)


@pytest.mark.parametrize("kind", sorted(BACKENDS))
def test_same_seed_same_proposals(kind):
    a = drive(make_optimizer(kind, **problem(), **BACKENDS[kind]), 5)
    b = drive(make_optimizer(kind, **problem(), **BACKENDS[kind]), 5)
    same(a, b)
    assert [i for i, _ in a] == list(range(len(a)))  # ids increase monotonically
    if kind in ("cmaes", "random"):
        c = drive(make_optimizer(kind, **problem(seed=8), **BACKENDS[kind]), 5)
        assert not np.allclose(a[1][1], c[1][1])


@pytest.mark.parametrize("kind", sorted(BACKENDS))
def test_state_round_trip_mid_generation(kind):
    """Ask part, tell part, serialize, restore into a fresh object: same future as uninterrupted."""

    def run(interrupt: bool):
        opt = make_optimizer(kind, **problem(), **BACKENDS[kind])
        log = drive(opt, 2, batch=4)
        cands = opt.ask(4)  # mid-generation for cmaes (popsize 6)
        opt.tell([(cands[1].id, sphere(cands[1].x))])
        if interrupt:
            blob = opt.state_dict()
            np.random.seed(123)  # other code touching the global RNG must not matter
            np.random.rand(10)
            opt = make_optimizer(kind, **problem(), **BACKENDS[kind])
            opt.ask(2)  # a used object: the load starts it afresh
            opt.load_state_dict(blob)
        assert opt.in_flight == sorted(c.id for i, c in enumerate(cands) if i != 1)
        opt.tell([(c.id, sphere(c.x)) for i, c in enumerate(cands) if i != 1])
        return log + drive(opt, 4, batch=3), opt

    a, oa = run(False)
    b, ob = run(True)
    same(a, b)
    assert oa.n_told == ob.n_told


@pytest.mark.parametrize("kind", sorted(BACKENDS))
def test_state_is_plain_json_data(kind):
    """No pickle: the state is JSON (constructor arguments + journal), and survives a JSON round trip."""
    opt = make_optimizer(kind, **problem(), **BACKENDS[kind])
    drive(opt, 2, batch=3)
    state = opt.state_dict()
    assert json.loads(json.dumps(state, allow_nan=False)) == state
    restored = make_optimizer(kind, **problem(), **BACKENDS[kind])
    restored.load_state_dict(json.loads(json.dumps(state)))
    same(drive(opt, 3, batch=3), drive(restored, 3, batch=3))


_TWO_PROCESSES = """
import json, sys
import numpy as np
from evomerge.optimizers import make_optimizer

LOWER, UPPER = np.zeros(4), np.ones(4)
def sphere(x):
    return float(np.sum((x - 0.3) ** 2))
def fresh():
    return make_optimizer("cmaes", dim=4, lower=LOWER, upper=UPPER, x0=UPPER, seed=3, sigma0=0.3, popsize=6)
step, path = sys.argv[1], sys.argv[2]
if step == "first":  # half of the first generation told, then the process ends
    opt = fresh()
    cands = opt.ask(6)
    opt.tell([(c.id, sphere(c.x)) for c in cands[:3]])
    open(path, "w").write(json.dumps({"state": opt.state_dict(), "rest": [c.x.tolist() for c in cands[3:]]}))
else:
    saved = json.loads(open(path).read())
    opt = fresh()
    if step == "second":
        opt.load_state_dict(saved["state"])
    else:  # uninterrupted
        cands = opt.ask(6)
        opt.tell([(c.id, sphere(c.x)) for c in cands[:3]])
    opt.tell([(3 + i, sphere(np.asarray(x))) for i, x in enumerate(saved["rest"])])
    seen = []
    for _ in range(4):
        cands = opt.ask(6)
        seen += [c.x.tolist() for c in cands]
        opt.tell([(c.id, sphere(c.x)) for c in cands])
    print(json.dumps(seen))
"""


def test_cmaes_resumes_exactly_in_another_process_from_a_bound(tmp_path):
    """x0 on the upper bound: pycma's genotypes differ from the (bounded) phenotypes. An unpickled
    pycma in a new process (another hash salt) lost them and diverged; a replayed one does not."""
    path = str(tmp_path / "state.json")

    def step(name: str, hash_seed: str) -> str:
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        done = subprocess.run([sys.executable, "-c", _TWO_PROCESSES, name, path], env=env, capture_output=True,
                              text=True, check=True)
        return done.stdout

    step("first", "1")
    resumed, uninterrupted = json.loads(step("second", "2")), json.loads(step("uninterrupted", "1"))
    assert len(resumed) == 24
    np.testing.assert_allclose(resumed, uninterrupted, rtol=0, atol=1e-12)


def test_state_of_another_backend_is_refused():
    blob = make_optimizer("random", **problem()).state_dict()
    with pytest.raises(ConfigError, match="RandomSearch"):
        make_optimizer("cmaes", **problem()).load_state_dict(blob)
    with pytest.raises(ConfigError, match="optimizer state has format 1; this evomerge reads format 2"):
        make_optimizer("random", **problem()).load_state_dict({**blob, "format": 1})
    with pytest.raises(ConfigError, match="format 'bytes'"):
        make_optimizer("random", **problem()).load_state_dict(b"\x80\x04pickle")


@pytest.mark.parametrize("kind", sorted(BACKENDS))
def test_bounds_respected(kind):
    opt = make_optimizer(kind, **problem(), **BACKENDS[kind])
    for _, x in drive(opt, 10, batch=4):
        assert np.all(x >= LOWER) and np.all(x <= UPPER)


def test_cmaes_generation_queue_and_out_of_order_tells():
    opt = make_optimizer("cmaes", **problem(), popsize=5, sigma0=0.2)
    assert opt.generational
    first = opt.ask(3) + opt.ask(10)  # hands out the rest of the population only
    assert [c.id for c in first] == [0, 1, 2, 3, 4]
    assert opt.ask(1) == []  # waits for the generation's tells
    opt.tell([(4, 1.0), (0, 2.0)])
    opt.tell([(2, 0.5), (1, 0.1)])
    assert opt.ask(2) == [] and opt.generation == 0
    opt.tell([(3, 0.7)])  # the last tell of a generation makes the next one available at once
    nxt = opt.ask(2)
    assert opt.generation == 1 and [c.id for c in nxt] == [5, 6]
    with pytest.raises(ValueError, match="not asked"):
        opt.tell([(3, 0.1)])


@pytest.mark.parametrize("kind", ["nevergrad", "random"])
def test_out_of_order_tells_steady_state(kind):
    opt = make_optimizer(kind, **problem(), **BACKENDS[kind])
    assert not opt.generational
    a = opt.ask(4)
    opt.tell([(a[2].id, 1.0)])
    b = opt.ask(2)
    opt.tell([(c.id, sphere(c.x)) for c in (b[1], a[0], a[3], b[0], a[1])])
    assert opt.in_flight == []
    assert opt.best is not None


def test_cmaes_converges_on_sphere():
    opt = make_optimizer("cmaes", **problem(), sigma0=0.3, popsize=8)
    drive(opt, 60, batch=8, reverse=True)
    _, x, f = opt.best
    assert f < 1e-4, (x, f)


def test_ngopt_converges_on_sphere():
    opt = make_optimizer("nevergrad", **problem(), name="NGOpt", budget=100)
    drive(opt, 100, batch=4)  # num_workers=1: one candidate in flight at a time
    assert opt.n_told == 100
    assert opt.best[2] < 1e-3, opt.best


@pytest.fixture
def stop_nevergrad_threads():
    """nevergrad runs its sequential optimizers (Cobyla, SQP) in non-daemon threads that wait for a
    tell. A failed assertion keeps the test's optimizers alive in its traceback, and the process then
    hangs at exit instead of reporting: stop those threads once the test is over."""
    yield
    from nevergrad.optimization.recaster import _MessagingThread

    for thread in threading.enumerate():
        if isinstance(thread, _MessagingThread):
            thread.stop()


def test_nevergrad_thread_based_optimizer_resumes_by_replay(stop_nevergrad_threads):
    """NGOpt with one worker and a small budget runs Cobyla in a thread: not picklable, so the
    state is rebuilt by replaying the journal; the future must be the same, restored into a fresh
    object or into a used one that has a candidate in flight at the load."""
    kw = dict(name="NGOpt", budget=60, num_workers=1)
    a = make_optimizer("nevergrad", **problem(), **kw)
    assert len(drive(a, 10, batch=1)) == 10
    state = a.state_dict()
    b = make_optimizer("nevergrad", **problem(), **kw)
    b.load_state_dict(state)
    c = make_optimizer("nevergrad", **problem(), **kw)
    assert c.ask(1)[0].id == 0
    c.load_state_dict(state)
    for restored in (b, c):
        assert (restored.n_asked, restored.n_told, restored.in_flight) == (a.n_asked, a.n_told, a.in_flight)
    with pytest.raises(ConfigError, match="built with another seed than this config gives"):
        make_optimizer("nevergrad", **problem(seed=3), **kw).load_state_dict(state)
    future = drive(a, 5, batch=1)
    same(future, drive(b, 5, batch=1))
    same(future, drive(c, 5, batch=1))


def test_nevergrad_in_flight_capped_at_num_workers():
    opt = make_optimizer("nevergrad", **problem(), name="OnePlusOne", num_workers=2)
    assert len(opt.ask(5)) == 2 and opt.ask(1) == []
    opt.tell([(1, 0.5)])
    assert [c.id for c in opt.ask(3)] == [2]


def test_failed_candidates_rank_last():
    opt = make_optimizer("cmaes", **problem(), popsize=4)
    c = opt.ask(4)
    opt.tell([(c[0].id, float("nan")), (c[1].id, float("inf")), (c[2].id, 1.0), (c[3].id, 2.0)])
    assert opt.generation == 1 and opt.best[0] == c[2].id
    ng_opt = make_optimizer("nevergrad", **problem(), name="OnePlusOne", num_workers=2)
    c = ng_opt.ask(2)
    ng_opt.tell([(c[0].id, float("nan")), (c[1].id, 3.0)])
    assert ng_opt.best[0] == c[1].id  # and nevergrad itself was told the failure as the worse point:
    np.testing.assert_array_equal(ng_opt.opt.provide_recommendation().value, c[1].x)


def test_cmaes_survives_flat_generations():
    """Equal losses (a generation of failures, a coarse metric) must not end the search."""
    opt = make_optimizer("cmaes", **problem(), popsize=4)
    for _ in range(5):
        cands = opt.ask(4)
        assert len(cands) == 4 and not opt.done
        opt.tell([(c.id, 1.0) for c in cands])


def test_grid_exhaustion():
    pts = [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.5, -1.0, 1.0]]
    opt = make_optimizer("grid", **problem(), points=pts)
    a = opt.ask(2)
    assert not opt.done
    b = opt.ask(5)
    assert [c.id for c in a + b] == [0, 1, 2] and opt.done and opt.ask(1) == []
    np.testing.assert_array_equal(b[0].x, pts[2])
    opt.tell([(2, 0.0), (0, 1.0), (1, 2.0)])
    assert opt.best[0] == 2
    with pytest.raises(ConfigError, match="outside"):
        make_optimizer("grid", **problem(), points=[[2.0, 0.0, 0.0]])


def test_multi_objective():
    """Two conflicting objectives (optima at x0 = 0.2 and 0.8): nevergrad's front must be exactly the
    non-dominated set of what it was told, each point with both of its losses."""
    opt = make_optimizer("nevergrad", **problem(n_objectives=2), name="DE", num_workers=2)
    told = {}
    for _ in range(15):
        results = [(c.id, [float((c.x[0] - 0.2) ** 2 + c.x[1] ** 2), float((c.x[0] - 0.8) ** 2 + c.x[1] ** 2)])
                   for c in opt.ask(2)]
        told.update(results)
        opt.tell(results)
    assert len(told) == 30

    def dominates(a, b):
        return all(x <= y for x, y in zip(a, b)) and a != b

    expected = {cid for cid, loss in told.items() if not any(dominates(other, loss) for other in told.values())}
    front = opt.pareto()
    assert sorted(cid for cid, _, _ in front) == sorted(expected)
    assert all(losses == pytest.approx(told[cid]) for cid, _, losses in front)
    # cmaes scalarizes with weights (default the mean)
    cm = make_optimizer("cmaes", **problem(n_objectives=2), popsize=4, weights=[1.0, 0.0])
    c = cm.ask(4)
    cm.tell([(x.id, [float(i), 10.0 - i]) for i, x in enumerate(c)])
    assert cm.best[0] == c[0].id and cm.best[2] == 0.0
    with pytest.raises(ValueError, match="2 losses"):
        cm.tell([(cm.ask(1)[0].id, 1.0)])


def test_registry_and_config_errors():
    assert OPTIMIZERS.names() == ["cmaes", "grid", "nevergrad", "random"]
    with pytest.raises(ConfigError, match="did you mean 'cmaes'"):
        make_optimizer("cmaess", **problem())
    with pytest.raises(ConfigError, match="did you mean 'NGOpt'"):
        make_optimizer("nevergrad", **problem(), name="NGOtp")
    with pytest.raises(ConfigError, match="did you mean 'sigma0'"):
        make_optimizer("cmaes", **problem(), sigm0=0.1)
    with pytest.raises(ConfigError, match="did you mean 'tolx'"):
        make_optimizer("cmaes", **problem(), cma_options={"tolxx": 1e-3})
    with pytest.raises(ConfigError, match="give `budget:`"):
        make_optimizer("nevergrad", **problem(), name="NGOpt")
    with pytest.raises(ConfigError, match="type: nevergrad"):
        optimizer_from_config({"name": "TwoPointsDE"}, **problem())
    with pytest.raises(ConfigError, match="lower"):
        make_optimizer("random", **{**problem(), "upper": LOWER})
    opt = optimizer_from_config({"type": "nevergrad", "name": "PSO", "num_workers": 2}, **problem())
    assert opt.ng_name == "PSO"
    assert optimizer_from_config({"name": "cmaes", "sigma0": 0.05, "popsize": 20}, **problem()).popsize == 20


def test_merge_optimizer_config_keeps_hints_of_the_same_backend_only():
    cma_hints = {"type": "cmaes", "sigma0": 0.05, "popsize": 20}
    assert merge_optimizer_config(cma_hints, {}) == cma_hints
    assert merge_optimizer_config(cma_hints, {"type": "cmaes", "popsize": 8})["popsize"] == 8
    assert merge_optimizer_config(cma_hints, {"popsize": 8}) == {**cma_hints, "popsize": 8}
    assert merge_optimizer_config(cma_hints, {"type": "nevergrad", "name": "PSO"}) == {"type": "nevergrad", "name": "PSO"}
    assert merge_optimizer_config(cma_hints, {"name": "random"}) == {"name": "random"}
    ng_hints = {"type": "nevergrad", "name": "NGOpt"}
    assert merge_optimizer_config(ng_hints, {"name": "TwoPointsDE"}) == {"type": "nevergrad", "name": "TwoPointsDE"}
    assert merge_optimizer_config(ng_hints, {"type": "cmaes"}) == {"type": "cmaes"}


def test_a_stage_builds_its_optimizer_from_bounds_and_context():
    """What a backend takes from the search (nevergrad: budget and workers; random: budget) is the
    backend's to say; a config's own value wins; a config naming no backend gets CMA-ES."""
    from evomerge.optimizers import Bounds, SearchContext, build_optimizer

    p = problem()
    bounds = Bounds(lower=p["lower"], upper=p["upper"], x0=p["x0"])
    context = SearchContext(budget=30, workers=3)
    ng = build_optimizer({"type": "nevergrad", "name": "TwoPointsDE"}, bounds, context, seed=1)
    assert (ng.budget, ng.num_workers) == (30, 3)
    assert build_optimizer({"type": "nevergrad", "budget": 7}, bounds, context, seed=1).budget == 7
    assert build_optimizer({"type": "random"}, bounds, context, seed=1).budget == 30
    assert build_optimizer({"sigma0": 0.1}, bounds, context, seed=1).name == "cmaes"
