"""`evomerge dashboard`: its JSON API over run directories (read-only, torn lines, no torch or Ray),
the page in a real headless browser (Debian's chromium driven by Playwright), and `show --json`.

The browser tests skip, saying why, where /usr/bin/chromium or playwright is missing; .ci/run
installs both. Runs are written with the Run API (fast, any shape: stages, many tasks, costs); one
test reads a run that a real search wrote.
"""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.error import HTTPError
from urllib.parse import quote
from urllib.request import urlopen

import pytest

from evomerge.run import Evaluation, Run

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TASKS = ["add", "next", "reverse", "upper"]


# ---- runs written with the Run API ----------------------------------------------------------
def evaluation(i: int, stage: int = 0, tasks=TASKS, ok: bool = True, cost: float | None = None) -> Evaluation:
    scores = {t: -((i * 7 + k * 3) % 11) / 10.0 - 0.1 * k for k, t in enumerate(tasks)} if ok else {}
    return Evaluation(id=i, stage=stage, genome=[0.1 * i, -0.2], scores=scores,
                      recipe={"method": "evo_merging", "experts": {t: {"weight": 0.5, "density": 0.1 * (i % 10)}
                                                                  for t in tasks[:2]}, "parameters": {}},
                      objective=-sum(scores.values()) / len(tasks) if ok else 100.0, status="ok" if ok else "failed",
                      reason="" if ok else "merged weights hold NaN", worker="w0", finished_at=1_700_000_000.0 + 3 * i,
                      cost=None if cost is None else {"serving_usd_per_query": cost, "queried": ["a"]})


def make_run(path: Path, n: int = 12, tasks=TASKS, pool: dict | None = None, costed: bool = False,
             budget: int = 40, seed: int = 0) -> Run:
    pool = pool or {"base": "/pools/p1/base", "experts": {t: f"/pools/p1/{t}" for t in tasks}}
    run = Run.create(path, {"name": path.name, "pool": pool, "budget": budget, "seed": seed, "space": "evo-merging"})
    run.release_lock()
    for i in range(n):
        run.append(evaluation(i, stage=0 if i < n // 2 else 1, tasks=tasks, ok=i % 5 != 3,
                              cost=0.001 * (i % 4 + 1) if costed else None))
    references = {"base": {"status": "ok", "scores": {t: -1.2 for t in tasks}}}
    references.update({t: {"status": "ok", "scores": {u: -0.2 if u == t else -1.5 for u in tasks}} for t in tasks})
    run.write_json("references.json", references)
    run.write_json("status.json", {"state": "finished", "pid": 0, "updated": time.time(), "budget": budget})
    return run


@pytest.fixture
def runs_dir(tmp_path) -> Path:
    root = tmp_path / "runs"
    make_run(root / "full" / "evo-seed0", seed=0)
    make_run(root / "full" / "evo-seed1", n=9, seed=1)
    make_run(root / "lora" / "evo-seed0", n=6, pool={"base": "/pools/p2/base", "experts": {"add": "/pools/p2/add"}})
    make_run(root / "api", n=8, costed=True, pool={"models": {"a": {}, "b": {}}})
    (root / "not-a-run").mkdir()
    return root


# ---- a live server --------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def server(runs_dir):
    import uvicorn

    from evomerge.dashboard.server import make_app

    port = free_port()
    instance = uvicorn.Server(uvicorn.Config(make_app(runs_dir), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not instance.started:
        assert time.monotonic() < deadline, "the dashboard did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    instance.should_exit = True
    thread.join(timeout=10)


def get(url: str) -> dict:
    with urlopen(url, timeout=60) as response:
        return json.loads(response.read())


def snapshot(root: Path) -> dict[str, tuple[int, str]]:
    """Every file under root with its mode and content hash (and every folder), to prove nothing changed."""
    found = {}
    for path in sorted(root.rglob("*")):
        content = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        found[str(path.relative_to(root))] = (path.stat().st_mode, content)
    return found


# ---- the API --------------------------------------------------------------------------------
def test_api_lists_runs_with_progress_best_rate_and_pool(server):
    runs = {r["name"]: r for r in get(server + "/api/runs")["runs"]}
    assert set(runs) == {"full/evo-seed0", "full/evo-seed1", "lora/evo-seed0", "api"}  # not-a-run is not listed
    first = runs["full/evo-seed0"]
    assert (first["done"], first["budget"], first["failed"], first["state"]) == (12, 40, 2, "finished")
    assert first["best"]["stage"] == 1 and first["rate_per_min"] == pytest.approx(20.0)  # one per 3 s
    assert first["method"] == "full/evo" and first["pool"] != runs["lora/evo-seed0"]["pool"]
    assert first["pool"] == runs["full/evo-seed1"]["pool"]


def test_api_run_detail_has_stages_references_front_and_cost_axes(server):
    run = get(server + "/api/run?name=" + quote("full/evo-seed0"))
    assert run["tasks"] == TASKS and run["axes"] == TASKS + ["mean score", "objective"]
    assert {p["stage"] for p in run["progress"]} == {0, 1} and len(run["evaluations"]) == 12
    assert set(run["references"]) == {"base", *TASKS} and set(run["best_scores"]) == set(TASKS)
    assert run["pareto"]["front_ids"] and len(run["pareto"]["reference"]) == 4
    stage1 = [p for p in run["progress"] if p["stage"] == 1 and p["best"] is not None]
    assert [p["best"] for p in stage1] == sorted((p["best"] for p in stage1), reverse=True)  # best-so-far per stage
    api = get(server + "/api/run?name=api")
    assert "cost $/1k" in api["axes"] and api["score_cost"]["front"]


def test_api_compares_runs_grouped_by_pool_and_method(server):
    groups = get(server + "/api/compare")["groups"]
    by_method = {(g["pool"], g["method"]): g for g in groups}
    full = next(g for g in groups if g["method"] == "full/evo")
    assert sorted(full["runs"]) == ["full/evo-seed0", "full/evo-seed1"] and len(full["x"]) == 9  # cut to the shortest
    assert len(by_method) == 3  # lora/evo and api on pools of their own


def test_api_candidate_has_recipe_and_says_why_no_mergekit_yaml(server):
    candidate = get(server + "/api/candidate?name=" + quote("full/evo-seed0") + "&id=2")
    assert candidate["id"] == 2 and "evo_merging" in candidate["recipe_yaml"]
    assert "mergekit" in candidate["mergekit"]["error"]  # evo_merging: evomerge's own method
    api = get(server + "/api/candidate?name=api&id=1")
    assert "not one" in api["mergekit"]["error"]
    for bad in ("/api/run?name=" + quote("../runs"), "/api/run?name=nope", "/api/candidate?name=api&id=999"):
        with pytest.raises(HTTPError) as error:
            get(server + bad)
        assert error.value.code == 404
    with pytest.raises(HTTPError) as error:
        get(server + "/api/candidate?name=api&id=x")
    assert error.value.code == 400


def test_api_skips_torn_and_garbage_lines(server, runs_dir):
    log = runs_dir / "full" / "evo-seed0" / "evaluations.jsonl"
    with open(log, "ab") as handle:
        handle.write(b"not json at all\n[1, 2]\n{\"id\": 99}\n")
        handle.write(json.dumps(evaluation(12).__dict__).encode()[:40])  # torn: a search mid-write
    run = get(server + "/api/run?name=" + quote("full/evo-seed0"))
    assert len(run["evaluations"]) == 12
    with open(log, "ab") as handle:  # the writer finishes on a new line, as Run.append does
        handle.write(b"\n" + json.dumps(evaluation(13).__dict__).encode() + b"\n")
    assert [e["id"] for e in get(server + "/api/run?name=" + quote("full/evo-seed0"))["evaluations"]][-1] == 13


def test_api_never_writes_to_the_run_dirs(server, runs_dir):
    before = snapshot(runs_dir)
    for path in ("/", "/vendor/plotly.min.js", "/static/dashboard.js", "/api/runs", "/api/compare",
                 "/api/run?name=api", "/api/candidate?name=api&id=0", "/api/run?name=" + quote("full/evo-seed1"),
                 "/api/candidate?name=" + quote("full/evo-seed1") + "&id=1"):
        with urlopen(server + path, timeout=60) as response:
            assert response.status == 200, path
    assert snapshot(runs_dir) == before


def test_server_module_imports_neither_torch_nor_ray(runs_dir):
    """The page must work where torch and Ray are absent or slow to import: every endpoint answered
    in a child process, then its sys.modules checked."""
    code = f"""
import sys
from starlette.testclient import TestClient
from evomerge.dashboard.server import make_app
from evomerge import cli  # the `dashboard` command's own imports too
with TestClient(make_app({str(runs_dir)!r})) as client:
    for url in ("/", "/api/runs", "/api/compare", "/api/run?name=full/evo-seed0", "/api/candidate?name=full/evo-seed0&id=1"):
        assert client.get(url).status_code == 200, url
print(sorted(m for m in ("torch", "ray") if m in sys.modules))
"""
    if not _has("httpx"):  # starlette's TestClient needs httpx; without it, the modules alone
        code = code.replace("from starlette.testclient import TestClient\n", "").split("with TestClient")[0]
        code += "from evomerge.dashboard import data\ndata.detail(data.Path(%r), data.resolve_run(data.Path(%r), 'full/evo-seed0'))\n" % (
            str(runs_dir), str(runs_dir))
        code += "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_dashboard_command_refuses_a_missing_directory_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "evomerge.cli", "dashboard", str(tmp_path / "nope")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "is not a directory of runs" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_dashboard_command_refuses_a_port_in_use_in_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "evomerge.cli", "dashboard", str(tmp_path), "--port", str(port)],
                              capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "choose another --port" in done.stderr, done.stderr


def test_api_reads_a_run_a_real_search_wrote(tmp_path):
    from evomerge.config import load_search_config
    from evomerge.dashboard import data
    from evomerge.search import search
    from tests.synthetic import make_pool
    import yaml

    pool = make_pool(tmp_path / "pool", n_experts=2)
    config = {"pool": pool, "space": {"preset": "ties-dare", "layer_groups": 1}, "objective": "tests.objectives:quadratic",
              "budget": 8, "seed": 1,
              "optimizer": {"type": "cmaes", "popsize": 4}, "workers": {"count": 1}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(config))
    run = search(load_search_config(tmp_path / "s.yaml"), tmp_path / "runs" / "real")
    root = tmp_path / "runs"
    detail = data.detail(root, data.resolve_run(root, "real"))
    assert detail["done"] == 8 and detail["state"] == "finished" and detail["budget"] == 8
    assert set(detail["references"]) == {"base", "expert0", "expert1"} and detail["pool"].startswith("full ")
    best = run.best(1)[0]
    candidate = data.candidate(root, run.path, best.id)
    assert yaml.safe_load(candidate["recipe_yaml"]) == best.recipe
    assert yaml.safe_load(candidate["mergekit"]["yaml"])["merge_method"] == "dare_ties", candidate["mergekit"]


# ---- show --json and the PNGs ---------------------------------------------------------------
def test_show_json_prints_one_document_for_scripts(runs_dir):
    run = runs_dir / "full" / "evo-seed0"
    done = subprocess.run([sys.executable, "-m", "evomerge.cli", "show", str(run), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert document["status"]["state"] == "finished" and document["evaluations"] == 12 and document["failed"] == 2
    assert document["tasks"] == TASKS and document["best"][0]["scores"] and document["best"][0]["recipe"]
    assert set(document["references"]) == {"base", *TASKS} and document["pareto"]["front"]
    several = subprocess.run([sys.executable, "-m", "evomerge.cli", "show", str(run), str(runs_dir / "api"), "--json"],
                             capture_output=True, text=True, timeout=120)
    assert [d["run"] for d in json.loads(several.stdout)] == [str(run), str(runs_dir / "api")]


def test_pareto_png_of_many_tasks_and_comparison_across_pools(runs_dir, tmp_path):
    from evomerge.plots import compare_groups, plot_compare, plot_pareto

    run = Run(runs_dir / "full" / "evo-seed0")
    assert plot_pareto(run, tmp_path / "front.png").stat().st_size > 1000  # 4 tasks: parallel coordinates
    two = make_run(tmp_path / "two" / "r", tasks=["a", "b"])
    assert plot_pareto(two, tmp_path / "pairs.png").stat().st_size > 1000
    runs = [Run(runs_dir / n) for n in ("full/evo-seed0", "full/evo-seed1", "lora/evo-seed0")]
    groups = compare_groups(runs)
    assert sorted(len(members) for members in groups.values()) == [1, 2]  # never one band across pools
    assert plot_compare(runs, tmp_path / "compare.png").stat().st_size > 1000


# ---- the page in a real browser -------------------------------------------------------------
@pytest.fixture
def page(server):
    if not CHROMIUM.is_file():
        pytest.skip(f"no {CHROMIUM}: install Debian's chromium (apt-get install -y chromium) for the browser tests")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright; the browser is Debian's chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.errors = []
        page.on("console", lambda message: message.type == "error" and page.errors.append(message.text))
        page.on("pageerror", lambda error: page.errors.append(str(error)))
        page.on("requestfailed", lambda request: page.errors.append(f"failed: {request.url}"))
        page.base = server
        yield page
        browser.close()


def polls(page) -> int:
    return int(page.evaluate("document.body.dataset.polls || 0"))


def test_page_lists_runs_and_draws_the_comparison_without_console_errors(page):
    page.goto(page.base + "/")
    page.wait_for_selector("#runs-table tbody tr[data-run]")
    assert page.locator("#runs-table tbody tr").count() == 4
    assert "12/40" in page.locator('tr[data-run="full/evo-seed0"] td.progress').inner_text()
    page.wait_for_function("document.querySelector('#compare-plot .main-svg') !== null")
    assert page.evaluate("document.getElementById('compare-plot').data.filter(t => t.name).length") == 3
    page.locator('tr[data-run="full/evo-seed0"] a').click()
    page.wait_for_selector("#run-done")
    page.wait_for_function("document.querySelector('#parallel-plot .main-svg') !== null")
    assert page.errors == []


def test_page_shows_a_new_evaluation_without_a_reload(page, runs_dir):
    page.goto(page.base + "/#/run/" + quote("full/evo-seed0", safe=""))
    page.wait_for_selector("#run-done")
    assert page.inner_text("#run-done") == "12"
    page.evaluate("window.notReloaded = true")
    Run(runs_dir / "full" / "evo-seed0").append(evaluation(12, stage=1))
    page.wait_for_function("document.getElementById('run-done').textContent === '13'", timeout=15000)
    assert page.evaluate("window.notReloaded === true")  # the same page, updated in place
    assert page.locator('#candidates-table tr[data-id="12"]').count() == 1
    assert page.errors == []


def test_page_switches_pareto_axes_and_shows_a_recipe(page):
    page.goto(page.base + "/#/run/" + quote("full/evo-seed0", safe=""))
    page.wait_for_function("document.getElementById('pareto-plot').layout !== undefined")
    title = "document.getElementById('pareto-plot').layout.xaxis.title.text"
    assert page.evaluate(title).startswith("add")
    page.select_option("#pareto-x", "upper")
    page.select_option("#pareto-y", "objective")
    page.wait_for_function(f"{title}.startsWith('upper')")
    assert page.evaluate("document.getElementById('pareto-plot').layout.yaxis.title.text").startswith("objective")
    start = polls(page)
    page.wait_for_function(f"Number(document.body.dataset.polls) > {start}")  # the choice survives a poll
    assert page.evaluate(title).startswith("upper") and page.input_value("#pareto-x") == "upper"
    page.locator('#candidates-table th[data-key="objective"]').click()
    first = page.locator("#candidates-table tbody tr").first.get_attribute("data-id")
    page.locator("#candidates-table tbody tr").first.click()
    page.wait_for_function("document.getElementById('recipe-yaml').textContent.includes('evo_merging')")
    page.wait_for_function("!document.getElementById('mergekit-yaml').textContent.includes('making it')", timeout=60000)
    assert f"Candidate {first}" in page.inner_text("#candidate-title")
    assert page.errors == []


def test_page_survives_a_torn_line(page, runs_dir):
    log = runs_dir / "full" / "evo-seed1" / "evaluations.jsonl"
    page.goto(page.base + "/#/run/" + quote("full/evo-seed1", safe=""))
    page.wait_for_selector("#run-done")
    with open(log, "ab") as handle:
        handle.write(b"garbage\n" + json.dumps(evaluation(9).__dict__).encode()[:30])
    start = polls(page)
    page.wait_for_function(f"Number(document.body.dataset.polls) > {start + 1}", timeout=15000)
    assert page.inner_text("#run-done") == "9" and "cannot reach" not in page.inner_text("#refreshed")
    with open(log, "ab") as handle:
        handle.write(b"\n" + json.dumps(evaluation(10).__dict__).encode() + b"\n")
    page.wait_for_function("document.getElementById('run-done').textContent === '10'", timeout=15000)
    assert page.errors == []

