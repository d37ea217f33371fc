"""Screenshots of `evomerge dashboard` over real runs, for the README and for reviewing the page.

    .venv/bin/python tests/benchmarks/dashboard_screenshots.py            # -> tests/benchmarks/results/
    .venv/bin/python tests/benchmarks/dashboard_screenshots.py --out DIR --budget 60

Runs three real searches (Ray workers, CMA-ES) on a small random pool scored by the synthetic
objective (tests.objectives:quadratic: a second per run, no models to train), two seeds of
Evo-Merging and one of TIES-DARE (which mergekit can express), then serves the dashboard over them
and saves, with Debian's chromium driven by Playwright:

    dashboard-list.png   the runs, and their best-so-far curves compared (seeds as one band)
    dashboard-run.png    one run: best so far by stage, best vs references, Pareto front,
                         parallel coordinates, candidates, and a chosen candidate's mergekit YAML

(Not under runs/: that folder is ignored by git.)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import quote

import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.test_dashboard import CHROMIUM, CHROMIUM_ARGS, free_port  # noqa: E402


def make_runs(root: Path, budget: int) -> Path:
    from evomerge.config import load_search_config
    from evomerge.search import search
    from tests.synthetic import make_pool

    pool = make_pool(root / "pool", n_experts=3)
    runs = root / "runs"
    plans = [("evo-merging-seed0", "evo-merging", 0), ("evo-merging-seed1", "evo-merging", 1),
             ("ties-dare-seed0", {"preset": "ties-dare", "layer_groups": 1}, 0)]
    for name, space, seed in plans:
        config = {"pool": pool, "space": space, "objective": "tests.objectives:quadratic", "budget": budget,
                  "seed": seed, "optimizer": {"type": "cmaes", "popsize": 6}, "workers": {"count": 2}}
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        search(load_search_config(path), runs / "full" / name)
        print(f"ran {name}")
    return runs


def screenshot(runs: Path, out: Path) -> list[Path]:
    import uvicorn
    from playwright.sync_api import sync_playwright

    from evomerge.dashboard.server import make_app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(make_app(runs), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    base, written = f"http://127.0.0.1:{port}", []
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(base + "/")
            page.wait_for_function("document.querySelector('#compare-plot .main-svg') !== null")
            page.wait_for_timeout(500)
            written.append(out / "dashboard-list.png")
            page.screenshot(path=str(written[-1]), full_page=True)
            page.goto(base + "/#/run/" + quote("full/ties-dare-seed0", safe=""))
            page.wait_for_function("document.querySelector('#parallel-plot .main-svg') !== null")
            page.locator('#candidates-table th[data-key="objective"]').click()
            page.locator("#candidates-table tbody tr").first.click()
            page.wait_for_function("document.getElementById('mergekit-yaml').textContent.includes('merge_method')",
                                   timeout=120_000)
            written.append(out / "dashboard-run.png")
            page.screenshot(path=str(written[-1]), full_page=True)
            browser.close()
    finally:
        server.should_exit = True
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "tests" / "benchmarks" / "results")
    parser.add_argument("--budget", type=int, default=36)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        for path in screenshot(make_runs(Path(work), args.budget), args.out):
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
