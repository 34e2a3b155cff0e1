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
# progress bars (rich), a scrape of /metrics (prometheus_client); pydantic.v1
# is never needed (daemon/memory.py).
LAZY = (
    "tarfile",
    "zstandard",
    "google.protobuf",
    "criud.daemon.criu_rpc",
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


def test_serve_keeps_pydantic_v1_out() -> None:
    assert _serve_loads("pydantic.v1") == {"pydantic.v1": False}
