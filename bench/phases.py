"""Where a request's time goes inside the daemon: wall time per phase.

    python bench/phases.py [--cycles 40] [--mib 128] [--what-if lazy-net,fdinfo-locks]

Starts the real daemon in a child process whose key functions (criu runs,
/proc walks, store calls, image reads...) are wrapped to record their wall
time, drives dump + restore cycles of a `sleep` through it, and prints the
median time per phase per cycle next to the client-side total.  Sampling
profilers show CPU; most of a small request is waiting (criu, threads), which
this shows directly.  Used for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import collections
import functools
import importlib
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

# Dotted names of the functions timed, in the daemon's process.
WRAP = [
    "criud.dump.job.run",
    "criud.dump.job._Dump.run",
    "criud.dump.job._Dump._dump",
    "criud.dump.job.tree_creds",
    "criud.restore.job.run",
    "criud.restore.job._Job.restore",
    "criud.restore.job._Job._wait_pids_free",
    "criud.restore.job.adopt",
    "criud.dump.images.stats_in",
    "criud.daemon.service.CriudService.get_checkpoint",
    "criud.daemon.service.CriudService.delete_checkpoint",
    "criud.daemon.criu.Criu.run",
    "criud.daemon.criu.Criu._run_warm",
    "criud.daemon.criu_msg.exchange",
    "criud.daemon.store.Store.run",
    "criud.dump.fds.read_tree",
    "criud.dump.images.parse_pstree",
    "criud.dump.manifest.build",
    "criud.daemon.imgdir.seal",
]

_records: dict[str, list[float]] = collections.defaultdict(list)
# Labels split by an argument: Criu.run by criu's command (dump/restore).
_SPLIT = {"Criu.run": lambda a, k: str((a[1] if len(a) > 1 else k.get("argv", ["?"]))[0])}


def _resolve(dotted: str) -> tuple[Any, str] | None:
    parts = dotted.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for p in parts[i:-1]:
            obj = getattr(obj, p, None)
            if obj is None:
                return None
        return (obj, parts[-1]) if hasattr(obj, parts[-1]) else None
    return None


def _wrap(owner: Any, attr: str, label: str) -> None:
    raw = owner.__dict__.get(attr) if isinstance(owner, type) else None
    is_static = isinstance(raw, staticmethod)
    fn = raw.__func__ if is_static else getattr(owner, attr)
    wrapped: Any
    if asyncio.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def awrapper(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return await fn(*a, **k)
            finally:
                split = _SPLIT.get(label)
                name = f"{label} {split(a, k)}" if split else label
                _records[name].append(time.perf_counter() - t)

        wrapped = awrapper
    else:

        @functools.wraps(fn)
        def wrapper(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                _records[label].append(time.perf_counter() - t)

        wrapped = wrapper
    setattr(owner, attr, staticmethod(wrapped) if is_static else wrapped)


class _LazyNet:
    """Stands for fds.NetTables; reads the socket tables on first use only."""

    def __init__(self, load: Any) -> None:
        self._load = load
        self._tables: Any = None

    def __getattr__(self, name: str) -> Any:
        if self._tables is None:
            self._tables = self._load()
        return getattr(self._tables, name)


def _what_if(names: str) -> None:
    """Apply proposed fixes in this process, to measure them before they land."""
    if "lazy-net" in names:
        # Read /proc/net/* (and sock_diag) only for a task that holds a socket.
        fds = importlib.import_module("criud.dump.fds")
        orig = fds.ProcScan.net
        fds.ProcScan.net = lambda self, pid: _LazyNet(lambda: orig(self, pid))
    if "fdinfo-locks" in names:
        # No /proc/locks: reading it takes the global file_rwsem for write,
        # an RCU grace period (~12 ms here) unless one ran just before.  A
        # fix reads each file fd's own "lock:" lines in fdinfo instead;
        # a `sleep` has no file fds, so this stands for that fix here.
        fds = importlib.import_module("criud.dump.fds")
        fds.read_locks = lambda path="/proc/locks": []


def daemon_main() -> None:
    """Entry point of the instrumented daemon (argv as criud's CLI)."""
    out = os.environ["PHASES_OUT"]
    _what_if(os.environ.get("PHASES_WHAT_IF", ""))
    for dotted in WRAP:
        r = _resolve(dotted)
        if r is not None:
            _wrap(r[0], r[1], dotted.rsplit(".", 2)[-2] + "." + dotted.rsplit(".", 1)[-1])
    # core calls fdinfo.read_tree, images.parse_pstree, imgdir.seal through
    # module attributes, so patching the attributes is enough.
    atexit.register(lambda: Path(out).write_text(json.dumps(_records)))
    from criud.daemon.cli import main

    sys.exit(main())


def driver() -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench

    p = argparse.ArgumentParser()
    p.add_argument("--cycles", type=int, default=40)
    p.add_argument("--criu", default="/usr/local/sbin/criu")
    p.add_argument("--what-if", default="", help="proposed fixes to apply: lazy-net,fdinfo-locks")
    p.add_argument("--mib", type=int, default=0, help="checkpoint a FILL of MiB instead of a sleep")
    p.add_argument(
        "--leave-running", action="store_true", help="dump with leave_running, no restore"
    )
    a = p.parse_args()
    os.environ["PHASES_WHAT_IF"] = a.what_if
    from criud.daemon import kdat

    kdat.ensure_kdat_tmpfs(kdat.KDAT_DIR)
    root = Path(bench.tempfile.mkdtemp(prefix="criud-phases-", dir="/dev/shm"))
    out = root / "phases.json"
    os.environ["PHASES_OUT"] = str(out)
    d = bench.Daemon(root / "d", a.criu)
    real = bench.sys.executable
    # Start the instrumented entry point instead of `-m criud.daemon.cli`.
    orig_popen = bench.subprocess.Popen

    def popen(argv: list[str], **kw: Any) -> Any:
        if argv[:3] == [real, "-m", "criud.daemon.cli"]:
            argv = [real, __file__, "--as-daemon", *argv[3:]]
        return orig_popen(argv, **kw)

    bench.subprocess.Popen = popen  # type: ignore[assignment]
    d.start()
    c = d.new_client()
    bench.subprocess.Popen = orig_popen  # type: ignore[assignment]
    client: dict[str, list[float]] = {"dump": [], "restore": []}
    raw: dict[str, list[float]] = {"dump": [], "restore": []}
    try:
        for _ in range(a.cycles):
            pid = (
                bench.start_workload(bench.workloads.FILL, str(a.mib))
                if a.mib
                else bench.spawn_sleep()
            )
            t = time.perf_counter()
            ck = c.checkpoint(pid, leave_running=a.leave_running)
            client["dump"].append(time.perf_counter() - t)
            if a.leave_running:
                c.delete(ck["id"])
                bench.kill(pid)
                client["restore"].append(0.0)
                continue
            bench.reap_dumped(pid)
            t = time.perf_counter()
            r = c.restore(ck["id"])
            client["restore"].append(time.perf_counter() - t)
            bench.TRACK.add(int(r["pid"]))
            bench.criud_restore_kill(c, r)
            c.delete(ck["id"])
            if not a.mib:
                # Raw criu, same binary and cache, right after: the reference.
                pid = bench.spawn_sleep()
                images = root / "raw"
                raw["dump"].append(bench.raw_dump(a.criu, pid, images))
                bench.reap_dumped(pid)
                t_restore, rp = bench.raw_restore(a.criu, images)
                raw["restore"].append(t_restore)
                bench.kill(rp)
                bench.shutil.rmtree(images)
    finally:
        d.stop()
        bench.TRACK.kill_all()
    rec = json.loads(out.read_text())
    bench.shutil.rmtree(root, ignore_errors=True)
    n = a.cycles
    dump, restore = (statistics.median(client[k]) * 1e3 for k in ("dump", "restore"))
    print(f"criud, client side, median of {n}: dump {dump:.2f} ms, restore {restore:.2f} ms")
    if raw["dump"]:
        dump, restore = (statistics.median(raw[k]) * 1e3 for k in ("dump", "restore"))
        print(f"raw criu (interleaved), median: dump {dump:.2f} ms, restore {restore:.2f} ms")
    print(f"{'phase':40s} {'calls/cycle':>11s} {'median ms':>10s} {'ms/cycle':>9s}")
    for label, v in sorted(rec.items(), key=lambda kv: -sum(kv[1])):
        med, per = statistics.median(v) * 1e3, sum(v) / n * 1e3
        print(f"{label:40s} {len(v) / n:11.1f} {med:10.2f} {per:9.2f}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--as-daemon":
        sys.argv = ["criud", *sys.argv[2:]]
        daemon_main()
    else:
        sys.exit(driver())
