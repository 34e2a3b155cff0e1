"""Where the idle daemon's memory goes (issue 13): the figures of docs/benchmarks.md.

    python bench/memory_map.py imports [RUNS]     # RSS per import step, fresh interpreters
    python bench/memory_map.py variants [RUNS]    # levers outside criud's code, paired
    python bench/memory_map.py modules            # each criud module alone, over the framework
    python bench/memory_map.py daemon [RUNS]      # a live daemon, 1,000 records: where RSS sits
    python bench/memory_map.py pair OLD NEW [RUNS] # idle RSS, code at git rev OLD vs NEW, paired
                                                  # (NEW "." is this worktree as it is)

`imports` and `modules` need no root; `daemon` and `pair` start the real
daemon (as root, with real criu) the way bench/bench.py's api section does:
one real checkpoint plus 999 copies of its record seeded into the store,
the daemon started on that state, and its VmRSS read 1 s after readiness.
Every figure is a median over RUNS; the load average is printed at the
start and the end, since other work on the machine moves RSS very little
but timing a lot.

RSS of a fresh interpreter is measured after gc.collect() and malloc_trim,
so a step's figure is what it keeps, not what it passed through.  The
interpreters of `imports` start as `criud serve` leaves them: with
criud.daemon.memory.keep_out_unused() (pydantic.v1 kept out,
fastapi.openapi.models' models built on first use).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import _repo  # the repo root on sys.path, for the tests' helpers

import bench as B
from tests.integration.helpers import Daemon

CRIU = "/usr/local/sbin/criu"
RECORDS = 1000

# A step that is code, not a module: build the OpenAPI document's models,
# as the first /openapi.json does (criud.daemon.memory.DEFERRED).
BUILD_OPENAPI = (
    "!import fastapi.openapi.models as m\n"
    "from pydantic import BaseModel as B\n"
    "for c in vars(m).values():\n"
    "    if isinstance(c, type) and issubclass(c, B) and c is not B:\n"
    "        c.model_rebuild()"
)

# What `criud serve` does before the framework loads.
SERVE_SETUP = "!from criud.daemon import memory; memory.keep_out_unused()"

# What the daemon imports, in the order its start-up needs them; each step
# adds to the one before, so a delta is that step's own cost.  The third
# field says when the daemon loads it now: "start" (start-up), "pool" (with
# the warm criu pool, on by default), "lazy" (the first request that needs
# it), "never".
STEPS: list[tuple[str, list[str], str]] = [
    ("`criud serve`'s set-up (criud.daemon.memory, ctypes)", [SERVE_SETUP], "start"),
    ("hashlib, ssl (OpenSSL's libcrypto and libssl)", ["hashlib", "ssl"], "start"),
    (
        "the rest of the stdlib the daemon uses (asyncio, sqlite3, logging, ...)",
        ["asyncio", "sqlite3", "logging", "json", "ctypes", "concurrent.futures", "shutil"],
        "start",
    ),
    ("pydantic", ["pydantic"], "start"),
    ("fastapi + starlette (+ anyio, opentelemetry-api)", ["fastapi", "fastapi.responses"], "start"),
    ("fastapi.openapi.models' models built", [BUILD_OPENAPI], "lazy"),
    ("uvicorn (its package imports click, multiprocessing)", ["uvicorn"], "start"),
    ("uvicorn's httptools protocol", ["uvicorn.protocols.http.httptools_impl"], "start"),
    ("orjson", ["orjson"], "start"),
    ("prometheus_client", ["prometheus_client"], "lazy"),
    ("protobuf + criud's criu RPC classes", ["criud.daemon.criu_rpc_pb2"], "pool"),
    ("zstandard", ["zstandard"], "lazy"),
    ("tarfile (+ gzip)", ["tarfile", "gzip"], "lazy"),
    ("pydantic.v1 (FastAPI's check that no model is one)", ["pydantic.v1"], "never"),
    (
        "criud.daemon core (store, criu, metrics, errors)",
        ["criud.daemon.store", "criud.daemon.criu", "criud.daemon.metrics"],
        "start",
    ),
    ("criud.api.models (pydantic models)", ["criud.api.models"], "start"),
    ("criud.daemon.service (+ dump/, restore/)", ["criud.daemon.service"], "start"),
    ("criud.api.app (+ its routes, built as they load)", ["criud.api.app"], "start"),
    ("criud.daemon.server (the rest)", ["criud.daemon.server"], "start"),
]

PROBE = r"""
import ctypes, gc, importlib, json, sys
trim = ctypes.CDLL("libc.so.6").malloc_trim
def rss():
    gc.collect(); trim(0)
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
steps = json.loads(sys.argv[1])
out = [rss()]
for mods in steps:
    for m in mods:
        if m.startswith("!"):
            exec(m[1:])
            continue
        if m in sys.modules and sys.modules[m] is None:
            del sys.modules[m]  # kept out by the set-up step: measured all the same
        importlib.import_module(m)
    out.append(rss())
if sys.argv[2] == "app":
    from criud.api.app import create_app
    class Stub:
        def version(self): return {"criud": "0"}
    app = create_app(Stub())
    out.append(rss())
print(json.dumps(out))
"""


# The interpreter's flags as `criud serve` runs (none); and a variant's.
SERVE_FLAGS: tuple[str, ...] = ()
NO_DEBUG_RANGES = ("-X", "no_debug_ranges")


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def probe(
    steps: list[list[str]], app: bool = False, flags: Sequence[str] = SERVE_FLAGS
) -> list[float]:
    """RSS (MiB) of a fresh interpreter (flags: the interpreter's): bare, then each step."""
    argv = [sys.executable, *flags, "-c", PROBE, json.dumps(steps), "app" if app else "-"]
    out = subprocess.run(argv, check=True, capture_output=True, text=True)
    return [float(x) for x in json.loads(out.stdout)]


def cmd_imports(runs: int) -> None:
    names = [(name, when) for name, _, when in STEPS]
    names.append(("build the app (create_app: middleware, routers)", "start"))
    samples = [probe([mods for _, mods, _ in STEPS], app=True) for _ in range(runs)]
    med = [statistics.median(col) for col in zip(*samples, strict=True)]
    print("| step | + MiB | total MiB | the daemon loads it |\n|---|---:|---:|---|")
    print(f"| bare python | | {med[0]:.1f} | |")
    for i, (name, when) in enumerate(names, 1):
        print(f"| {name} | {med[i] - med[i - 1]:+.1f} | {med[i]:.1f} | {when} |")
    kept = sum(med[i] - med[i - 1] for i, (_, w) in enumerate(names, 1) if w in ("lazy", "never"))
    print(f"\nkept out of start-up: {kept:.1f} MiB (the pool's: {_pool_cost(med, names):.1f})")


# The daemon's start-up imports as `criud serve` has them (no lazy steps),
# then the app; each variant changes one thing, in a fresh interpreter.
START = [mods for _, mods, when in STEPS if when == "start"]
UVICORN_WITHOUT_INIT = (
    "!import importlib.util, sys, types\n"
    "spec = importlib.util.find_spec('uvicorn')\n"
    "pkg = types.ModuleType('uvicorn')\n"
    "pkg.__path__, pkg.__spec__ = list(spec.submodule_search_locations), spec\n"
    "sys.modules['uvicorn'] = pkg\n"
    "import uvicorn.config, uvicorn.server\n"
    "pkg.Config, pkg.Server = uvicorn.config.Config, uvicorn.server.Server"
)
VARIANT_SETUPS: list[tuple[str, tuple[str, ...], list[str]]] = [
    ("as criud serve runs", SERVE_FLAGS, [SERVE_SETUP]),
    ("code without column tables (-X no_debug_ranges)", NO_DEBUG_RANGES, [SERVE_SETUP]),
    (
        "fastapi.openapi.models built at import (no deferral)",
        SERVE_FLAGS,
        ["!import sys; sys.modules['pydantic.v1'] = None"],
    ),
    # Measurement only: criud does not do this (it would stub a package).
    (
        "uvicorn's package without its __init__ (no uvicorn.main, click, multiprocessing)",
        SERVE_FLAGS,
        [SERVE_SETUP, UVICORN_WITHOUT_INIT],
    ),
]


def cmd_variants(runs: int) -> None:
    """Start-up RSS of each variant against criud serve's own, paired, fresh interpreters."""
    print(f"load at start: {loadavg()}")
    got: dict[str, list[float]] = defaultdict(list)
    for i in range(runs):
        order = VARIANT_SETUPS if i % 2 == 0 else VARIANT_SETUPS[::-1]
        for name, flags, setup in order:
            steps = [setup, *START[1:]]  # START[0] is the set-up itself
            got[name].append(probe(steps, app=True, flags=flags)[-1])
    base = got[VARIANT_SETUPS[0][0]]
    print("| variant | MiB | paired - as run |\n|---|---:|---:|")
    for name, _, _ in VARIANT_SETUPS:
        diffs = [v - b for v, b in zip(got[name], base, strict=True)]
        print(f"| {name} | {statistics.median(got[name]):.1f} | {statistics.median(diffs):+.1f} |")
    print(f"load at end: {loadavg()}")


def _pool_cost(med: list[float], names: list[tuple[str, str]]) -> float:
    return sum(med[i] - med[i - 1] for i, (_, w) in enumerate(names, 1) if w == "pool")


def criud_modules() -> list[str]:
    out = []
    for pkg in ("daemon", "api", "dump", "restore"):
        for p in sorted((Path(_repo.ROOT) / pkg).glob("*.py")):
            if p.stem not in ("__init__", "cli", "cli_archive", "cli_migrate"):
                out.append(f"criud.{pkg}.{p.stem}")
    return out


def cmd_modules() -> None:
    """Each criud module imported alone (with what it pulls in) over fastapi + uvicorn."""
    base = ["asyncio", "sqlite3", "logging", "json", "fastapi", "uvicorn", "pydantic"]
    rows = []
    for m in criud_modules():
        r = probe([base, [m]])
        rows.append((r[2] - r[1], m))
    print("| module (with what it imports) | + MiB over fastapi + uvicorn |\n|---|---:|")
    for delta, m in sorted(rows, reverse=True):
        if delta >= 0.2:
            print(f"| {m} | {delta:+.1f} |")


# -- a live daemon -----------------------------------------------------------------


def seeded_state(base: Path) -> Path:
    """A state dir with one real checkpoint and RECORDS - 1 copies of its record."""
    root = base / "seed"
    root.mkdir(parents=True)
    d = Daemon(root, CRIU, args=["--log-level", "warning"])
    d.start()
    pid = B.start_workload(B.workloads.HOLD)
    try:
        ck = d.client.checkpoint(pid, leave_running=True, labels={"bench": "api"})
    finally:
        B.kill(pid)
        d.stop()
    B._seed_records(d.state_dir, ck["id"], RECORDS)
    return d.state_dir


def status(pid: int) -> dict[str, float]:
    out = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "RssFile", "Threads"):
                n = int(v.split()[0])
                out[k] = n if k == "Threads" else round(n / 1024, 1)
    return out


def smaps(pid: int) -> dict[str, float]:
    """RSS (MiB) by kind of mapping: the main heap, thread arenas, other anonymous, files."""
    groups: dict[str, float] = defaultdict(float)
    name = ""
    start = 0
    with open(f"/proc/{pid}/smaps", encoding="utf-8", errors="replace") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and not line.startswith(("Rss", "Size")) and ":" not in head[0]:
                start = int(head[0].split("-")[0], 16)
                name = head[5] if len(head) > 5 else ""
            elif head[0] == "Rss:":
                groups[kind(name, start)] += int(head[1]) / 1024
    return {k: round(v, 1) for k, v in sorted(groups.items(), key=lambda kv: -kv[1])}


def kind(name: str, start: int) -> str:
    if name == "[heap]":
        return "anon: main heap (brk: glibc's main arena, small objects)"
    if name.startswith("["):
        return f"anon: {name}"
    if not name:
        # glibc's thread arenas are 64 MiB-aligned heaps (HEAP_MAX_SIZE).
        if start % (64 << 20) == 0:
            return "anon: glibc thread arenas"
        return "anon: mmap (pymalloc arenas, big blocks)"
    for lib in ("pydantic_core", "protobuf", "google", "zstandard", "orjson", "httptools"):
        if lib in name:
            return f"file: {lib}"
    if "python3" in name or "libpython" in name:
        return "file: python + stdlib .so"
    base = os.path.basename(name)
    for lib in ("libcrypto", "libssl", "libsqlite3", "libc.so", "libstdc++", "ld-linux"):
        if base.startswith(lib):
            return f"file: {lib.removesuffix('.so')}"
    return "file: other"


def start_daemon(base: Path, state: Path, env: dict[str, str], args: list[str]) -> Daemon:
    root = Path(tempfile.mkdtemp(prefix="d-", dir=base))
    shutil.copytree(state, root / "state", symlinks=True)
    d = Daemon(root, CRIU, extra_env=env, args=["--log-level", "warning", *args])
    d.state_dir = root / "state"
    d.start(timeout=60)
    # As bench.py's api section: a second after readiness, nothing served yet.
    time.sleep(1.0)
    return d


WATCHED = (
    "zstandard",
    "tarfile",
    "gzip",
    "google.protobuf",
    "prometheus_client",
    "rich",
    "psutil",
    "pydantic.v1.main",  # "pydantic.v1" itself: also its blocked attempts
    "click",
    "multiprocessing",
    "email",
)


def imported(log: str) -> list[str]:
    mods = {
        ln.rsplit("|", 1)[-1].strip() for ln in log.splitlines() if ln.startswith("import time:")
    }
    return [w for w in WATCHED if w in mods]


VARIANTS: list[tuple[str, dict[str, str], list[str]]] = [
    ("as run", {}, []),
    # The operator's MALLOC_ARENA_MAX wins over criud.daemon.memory.one_heap.
    ("glibc's heap per thread (MALLOC_ARENA_MAX=16)", {"MALLOC_ARENA_MAX": "16"}, []),
    ("--criu-pool 0 (no protobuf)", {}, ["--criu-pool", "0"]),
]


def cmd_daemon(runs: int) -> None:
    base = Path(tempfile.mkdtemp(prefix="memmap-", dir="/dev/shm"))
    print(f"load at start: {loadavg()}")
    try:
        state = seeded_state(base)
        d = start_daemon(base, state, {"PYTHONPROFILEIMPORTTIME": "1"}, [])
        print("watched modules loaded at idle:", imported(d.log_path.read_text()))
        print("smaps:", json.dumps(smaps(d.pid), indent=1))
        d.stop()
        got: dict[str, list[dict[str, float]]] = defaultdict(list)
        for i in range(runs):
            for name, env, args in VARIANTS[i % len(VARIANTS) :] + VARIANTS[: i % len(VARIANTS)]:
                d = start_daemon(base, state, env, args)
                row = status(d.pid)
                d.client.request("GET", "/v1/checkpoints")
                time.sleep(0.5)
                row["after one list"] = status(d.pid)["VmRSS"]
                got[name].append(row)
                d.stop()
        for name, rows in got.items():
            med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
            print(f"{name}: {med}")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"load at end: {loadavg()}")


def rev_env(rev: str, base: Path) -> dict[str, str]:
    """The environment that runs the daemon from git rev ("." : this worktree, as installed)."""
    return {} if rev == "." else {"PYTHONPATH": str(rev_tree(rev, base))}


def rev_tree(rev: str, base: Path) -> Path:
    """The code at git rev as an importable criud package (PYTHONPATH goes first)."""
    tree = base / f"rev-{rev.replace('/', '_')}"
    pkg = tree / "criud"
    pkg.mkdir(parents=True)
    arch = subprocess.run(
        ["git", "-C", _repo.ROOT, "archive", rev, "daemon", "api", "dump", "restore"],
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(pkg)], input=arch, check=True)
    (pkg / "__init__.py").write_text("")
    return tree


def cmd_pair(old: str, new: str, runs: int) -> None:
    base = Path(tempfile.mkdtemp(prefix="mempair-", dir="/dev/shm"))
    print(f"load at start: {loadavg()}")
    try:
        envs = {"old": rev_env(old, base), "new": rev_env(new, base)}
        state = seeded_state(base)
        sides: dict[str, list[float]] = {"old": [], "new": []}
        after: dict[str, list[float]] = {"old": [], "new": []}
        for i in range(runs):
            for side in ("old", "new") if i % 2 == 0 else ("new", "old"):
                d = start_daemon(base, state, envs[side], [])
                sides[side].append(status(d.pid)["VmRSS"])
                d.client.request("GET", "/v1/checkpoints")
                time.sleep(0.5)
                after[side].append(status(d.pid)["VmRSS"])
                d.stop()
        for side, v in sides.items():
            print(
                f"{side} ({old if side == 'old' else new}): idle median "
                f"{statistics.median(v):.1f} MiB {v}; after one list "
                f"{statistics.median(after[side]):.1f} MiB"
            )
        for what, got in (("idle", sides), ("after one list", after)):
            diffs = [n - o for o, n in zip(got["old"], got["new"], strict=True)]
            print(f"paired new - old, {what}: median {statistics.median(diffs):+.1f} MiB")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"load at end: {loadavg()}")


def main() -> int:
    what = sys.argv[1] if len(sys.argv) > 1 else "imports"
    if what == "imports":
        cmd_imports(int(sys.argv[2]) if len(sys.argv) > 2 else 5)
    elif what == "variants":
        cmd_variants(int(sys.argv[2]) if len(sys.argv) > 2 else 5)
    elif what == "modules":
        cmd_modules()
    elif what == "daemon":
        cmd_daemon(int(sys.argv[2]) if len(sys.argv) > 2 else 3)
    elif what == "pair":
        cmd_pair(sys.argv[2], sys.argv[3], int(sys.argv[4]) if len(sys.argv) > 4 else 6)
    else:
        print(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
