"""What `criud serve` loads before it serves: nothing only some requests need (issue 13)."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile

# `criud serve` up to its root check, which comes after every import of the
# server and the app (FastAPI builds the routes as their modules load): the
# modules loaded then are the daemon's start-up imports.  geteuid is faked
# so that it stops there whoever runs the test.
SERVE_UNTIL_ROOT_CHECK = r"""
import json, os, sys
os.geteuid = lambda: 1000
from criud.daemon.cli import main
rc = main(["serve", "--state-dir", sys.argv[1]])
# Loaded: in sys.modules as a module (a None entry is one kept out).
print(json.dumps({"rc": rc, "modules": {m: sys.modules.get(m) is not None for m in sys.argv[2:]}}))
"""

# Only some requests need these (bench/memory_map.py has their cost):
# archives (tarfile, zstandard), the warm pool's RPC (protobuf: started with
# the pool, not at import), the orphans' cold path (psutil), the CLI's
# progress bars (rich), a scrape of /metrics (prometheus_client), uvicorn's
# command line (uvicorn.main, click: uvicorn's __init__, daemon/memory.py's
# LAZY_INIT), archives, migrations, OCI bundles and lazy restores (criud's
# own modules for them); pydantic.v1 is never needed (daemon/memory.py).
LAZY = (
    "tarfile",
    "zstandard",
    "google.protobuf",
    "criud.daemon.criu_rpc",
    "criud.daemon.criu_msg",
    "uvicorn.main",
    "click",
    "criud.daemon.archive",
    "criud.daemon.peer",
    "criud.dump.export",
    "criud.dump.migrate",
    "criud.dump.oci",
    "criud.dump.oci_archive",
    "criud.restore.importer",
    "criud.restore.incoming",
    "criud.restore.lazy",
    "criud.restore.oci",
    "criud.restore.oci_archive",
    "prometheus_client",
    "psutil",
    "rich",
)


def _serve_loads(*modules: str) -> dict[str, bool]:
    with tempfile.TemporaryDirectory() as d:
        argv = [sys.executable, "-c", SERVE_UNTIL_ROOT_CHECK, f"{d}/state", *modules]
        out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=120)
    got = json.loads(out.stdout.splitlines()[-1])
    assert got["rc"] == 1 and "must run as root" in out.stderr, out.stderr
    return dict(got["modules"])


def test_serve_starts_without_what_only_some_requests_need() -> None:
    loaded = _serve_loads(*LAZY, "criud.api.app", "fastapi")
    assert loaded.pop("criud.api.app") and loaded.pop("fastapi"), "the probe ran too little"
    assert loaded == dict.fromkeys(LAZY, False)


# uvicorn as `criud serve` leaves it (its __init__ not run), then asked for
# what the daemon takes through the package and for what only __init__ gives.
UVICORN_LAZY_INIT = r"""
import json, sys
from criud.daemon import memory
memory.keep_out_unused()
import uvicorn
from uvicorn import Config
import uvicorn.config, uvicorn.server
out = {
    "config": Config is uvicorn.config.Config,
    "server": uvicorn.Server is uvicorn.server.Server,
    "main_before": "uvicorn.main" in sys.modules,
}
run, version = uvicorn.run, uvicorn.__version__
# (uvicorn.main is then the click command, as ever: __init__ imports it so.)
out["run"] = run is sys.modules["uvicorn.main"].run
out["version"] = isinstance(version, str) and version != ""
try:
    uvicorn.no_such_name
except AttributeError:
    out["missing"] = "AttributeError"
print(json.dumps(out))
"""


def test_uvicorn_init_runs_when_first_needed() -> None:
    out = subprocess.run(
        [sys.executable, "-c", UVICORN_LAZY_INIT], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {
        "config": True,
        "server": True,
        "main_before": False,
        "run": True,
        "version": True,
        "missing": "AttributeError",
    }


def test_serve_keeps_pydantic_v1_out() -> None:
    assert _serve_loads("pydantic.v1") == {"pydantic.v1": False}


# The app as `criud serve` builds it (DEFERRED models left unbuilt) or as a
# plain import builds it (argv[1] "plain"), answering over ASGI as the
# daemon's server would: the OpenAPI document, and a request refused by
# validation before any route runs.  Then which pydantic models are built.
APP_ANSWERS = r"""
import asyncio, json, sys
if sys.argv[1] == "deferred":
    from criud.daemon import memory
    memory.keep_out_unused()
import pydantic
from criud.api.app import create_app
from criud.daemon.caller import Caller

class Stub:
    def version(self):
        return {"criud": "0"}

def models():
    seen, todo = {}, [pydantic.BaseModel]
    while todo:
        for sub in todo.pop().__subclasses__():
            seen[f"{sub.__module__}.{sub.__qualname__}"] = sub.__pydantic_complete__
            todo.append(sub)
    return seen

async def call(app, method, path, body):
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
        "method": method, "path": path, "raw_path": path.encode(), "query_string": b"",
        "root_path": "", "scheme": "http", "server": None, "client": None,
        "headers": [(b"host", b"criud"), (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode())],
        "state": {"peer": Caller(uid=0, gid=0, pid=1)},
    }
    sent, got = [{"type": "http.request", "body": body, "more_body": False}], []
    async def receive():
        return sent.pop() if sent else {"type": "http.disconnect"}
    async def send(message):
        got.append(message)
    await app(scope, receive, send)
    status = got[0]["status"]
    headers = sorted((k.decode(), v.decode()) for k, v in got[0]["headers"])
    return [status, headers, b"".join(m.get("body", b"") for m in got[1:]).decode()]

app = create_app(Stub())
before = models()
bad = json.dumps({"pid": "nine", "leave_running": 3}).encode()
answers = [asyncio.run(call(app, "POST", "/v1/checkpoints", bad))]
answers.append(asyncio.run(call(app, "GET", "/openapi.json", b"")))
print(json.dumps({"before": before, "after": models(), "answers": answers,
                  "base_config": dict(pydantic.BaseModel.model_config)}))
"""


def _app_answers(mode: str) -> dict[str, object]:
    argv = [sys.executable, "-c", APP_ANSWERS, mode]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=120)
    got: dict[str, object] = json.loads(out.stdout.splitlines()[-1])
    return got


def test_serve_defers_only_the_openapi_models_and_answers_the_same() -> None:
    deferred, plain = _app_answers("deferred"), _app_answers("plain")
    # The same bytes: the 422 problem body and the whole OpenAPI document.
    assert deferred["answers"] == plain["answers"]
    status, _, body = plain["answers"][0]  # type: ignore[index]
    assert status == 422 and json.loads(body)["code"] == "invalid_request"
    unbuilt = {m: _unbuilt(got) for m, got in (("deferred", deferred), ("plain", plain))}
    # At start-up only fastapi.openapi.models' models wait (none of criud's,
    # none a request path uses); a pydantic or FastAPI upgrade that stops
    # the deferral, or defers more, fails here.  (Three of them wait for a
    # forward reference even when imported plainly.)
    assert unbuilt["plain"] < unbuilt["deferred"]
    assert all(n.startswith("fastapi.openapi.models.") for n in unbuilt["deferred"])
    assert "fastapi.openapi.models.OpenAPI" in unbuilt["deferred"]
    # Serving the document built it; BaseModel's own config is as pydantic left it.
    assert deferred["after"]["fastapi.openapi.models.OpenAPI"]  # type: ignore[index]
    assert deferred["base_config"] == plain["base_config"] == {}


def _unbuilt(got: dict[str, object]) -> set[str]:
    before = got["before"]
    assert isinstance(before, dict)
    return {name for name, built in before.items() if not built}
