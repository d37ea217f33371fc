"""The dashboard's web server: a Starlette app (served by uvicorn) with a JSON API over a directory
of runs, the page (static/index.html + dashboard.js) and Plotly.js from the installed `plotly`
package, so that nothing is fetched from the internet when the page loads.

    GET /                          the page
    GET /api/runs                  every run under the directory: state, progress, best, rate, ...
    GET /api/run?name=NAME         one run: evaluations, best so far, references, Pareto front
    GET /api/candidate?name=NAME&id=ID   a candidate's recipe, and its mergekit YAML where expressible
    GET /api/compare?name=A&name=B best-so-far curves grouped by pool and method (no name: every run)

Handlers are plain functions: Starlette runs them in its thread pool, so a slow read (or the
mergekit child process) never stalls the other requests. Run as `evomerge dashboard RUNS_DIR`.
"""

from __future__ import annotations

import importlib.util
import json
import math
import socket
from pathlib import Path
from typing import Any, Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from evomerge.dashboard import data
from evomerge.errors import EvomergeError
from evomerge.run import _jsonable

STATIC = Path(__file__).parent / "static"
NO_CACHE = {"Cache-Control": "no-store"}  # a poll must see the file as it is now


def plotly_js() -> Path:
    """plotly.min.js as the `plotly` package ships it, found without importing plotly (slow)."""
    spec = importlib.util.find_spec("plotly")
    path = Path(spec.origin).parent / "package_data" / "plotly.min.js" if spec and spec.origin else None
    if path is None or not path.is_file():
        raise EvomergeError("the dashboard draws with Plotly.js from the `plotly` package, which is not installed: "
                            "pip install plotly")
    return path


def _clean(value: Any) -> Any:
    """JSON that browsers parse: NaN and infinities (a diverged score) become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _json(payload: Any, status: int = 200) -> Response:
    body = json.dumps(_clean(json.loads(json.dumps(payload, default=_jsonable))), allow_nan=False)
    return Response(body, status_code=status, media_type="application/json", headers=NO_CACHE)


def _api(handler: Callable[[Request], Any]) -> Callable[[Request], Response]:
    """A handler's answer as JSON; an unknown run or candidate is a 404, a bad parameter a 400."""
    def endpoint(request: Request) -> Response:
        try:
            return _json(handler(request))
        except data.NotARun as error:
            return _json({"error": str(error)}, 404)
        except (ValueError, KeyError) as error:
            return _json({"error": f"bad request: {error}"}, 400)
    return endpoint


def make_app(root: Path) -> Starlette:
    root = Path(root)
    vendor = plotly_js()

    def runs(request: Request) -> Any:
        return data.list_runs(root)

    def run(request: Request) -> Any:
        return data.detail(root, data.resolve_run(root, request.query_params["name"]))

    def candidate(request: Request) -> Any:
        path = data.resolve_run(root, request.query_params["name"])
        return data.candidate(root, path, int(request.query_params["id"]))

    def compare(request: Request) -> Any:
        names = request.query_params.getlist("name") or [data.run_name(root, p) for p in data.find_runs(root)]
        return data.compare(root, names)

    routes = [
        Route("/", lambda request: FileResponse(STATIC / "index.html", headers=NO_CACHE)),
        Route("/vendor/plotly.min.js", lambda request: FileResponse(vendor)),
        Route("/api/runs", _api(runs)),
        Route("/api/run", _api(run)),
        Route("/api/candidate", _api(candidate)),
        Route("/api/compare", _api(compare)),
        Mount("/static", StaticFiles(directory=STATIC)),
    ]
    return Starlette(routes=routes)


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a port in use is one line, not a uvicorn log."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise EvomergeError(f"cannot listen on {host}: {error.strerror}; give an address such as 127.0.0.1") from None
    family, kind, _, _, address = infos[0]
    sock = socket.socket(family, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as error:
        sock.close()
        raise EvomergeError(f"cannot listen on {host}:{port}: {error.strerror or error}; choose another --port") from None
    sock.listen(128)
    return sock


def serve(root: Path, host: str = "127.0.0.1", port: int = 8765, say: Callable[[str], None] = print) -> None:
    """Serve the dashboard over `root` until Ctrl-C."""
    import uvicorn

    root = Path(root)
    if not root.is_dir():
        raise EvomergeError(f"{root} is not a directory of runs; give the folder your runs are in (default runs/)")
    app = make_app(root)
    sock = listen(host, port)
    bound_port = sock.getsockname()[1]
    say(f"dashboard of {root} ({len(data.find_runs(root))} runs) at http://{host}:{bound_port} (Ctrl-C stops it)")
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    server.run(sockets=[sock])


if __name__ == "__main__":  # python -m evomerge.dashboard.server RUNS_DIR [PORT]
    import sys

    serve(Path(sys.argv[1] if len(sys.argv) > 1 else "runs"), port=int(sys.argv[2]) if len(sys.argv) > 2 else 8765)
