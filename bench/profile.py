"""Sample the daemon with py-spy while it serves one benchmark's requests.

    pip install py-spy          # into the venv; not a dependency of criud
    python bench/profile.py api [--records 1000] [--seconds 10] [--clients 50] [--svg out.svg]
    python bench/profile.py small [--cycles 40]
    python bench/profile.py processes [--seconds 10]   # GET /v1/processes/{pid}, 200 x 50 fds
    python bench/profile.py sse [--seconds 10]   # GET /v1/version, 100 SSE readers fed 40 events/s

Starts a real daemon, attaches `py-spy record` to it, drives the requests
(api: GET /v1/checkpoints over one keep-alive connection, back to back, or
with --clients N from bench/apiload.py's N clients, the bench's load;
small: checkpoint + restore of a `sleep`), then prints the functions the
event loop thread spent its busy time in, inclusive, with their share.
See docs/benchmarks.md for what the profiles showed.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import apiload
import workloads

import bench
from criud.api.client import UnixConnection
from criud.daemon import kdat

IDLE = ("select (selectors.py", "EpollSelector.select", "poll (selectors.py")


IDLE_WORKER = ("_worker (concurrent/futures/thread.py", "wait (threading.py", "get (queue.py")


def summarize(raw: Path, top: int = 40, thread: str = "MainThread") -> str:
    """Inclusive busy samples per function of one thread, from py-spy's raw output."""
    incl: collections.Counter[str] = collections.Counter()
    total = busy = 0
    for line in raw.read_text().splitlines():
        stack, _, n_s = line.rpartition(" ")
        n = int(n_s)
        frames = stack.split(";")
        if not frames[0].endswith(f": {thread}"):
            continue
        total += n
        if any(f.startswith(IDLE) for f in frames[-2:]) or frames[-1].startswith(IDLE_WORKER):
            continue
        busy += n
        seen: set[str] = set()
        for f in frames[1:]:
            name, _, loc = f.partition(" (")
            key = f"{name} ({loc.split(':')[0]}"
            if key not in seen:
                seen.add(key)
                incl[key + ")"] += n
    lines = [f"{thread}: {total} samples, {busy} busy ({100 * busy / max(total, 1):.0f}%)"]
    skip = ("runpy", "asyncio/", "uvicorn/", "starlette/", "cli.py", "server.py")
    shown = 0
    for k, v in incl.most_common():
        if any(s in k for s in skip):
            continue
        lines.append(f"{100 * v / max(busy, 1):5.1f}%  {k}")
        shown += 1
        if shown >= top:
            break
    return "\n".join(lines)


def _sse_load(d: bench.Daemon, seconds: float, readers: int = 100) -> int:
    """The observability bench's worst condition: readers fed 40 events/s, API under load."""
    stop = threading.Event()
    src = threading.Thread(target=bench._event_source, args=(d.new_client(), stop))
    src.start()
    subs = bench.SseSubscribers(d.socket, readers)
    n = 0
    t0 = time.perf_counter()
    try:
        while time.perf_counter() - t0 < seconds:
            n += len(bench._version_load(d.socket, 10, 50))
    finally:
        stop.set()
        src.join(5)
        subs.close()
    return n


def _api_clients(d: bench.Daemon, clients: int, seconds: float) -> int:
    """The bench's load (bench/apiload.py) for the time given; the requests answered."""
    ld = apiload.run_load(str(d.socket), d.pid, clients=clients, per=10**9, seconds=seconds)
    print({k: v for k, v in ld.items() if k.endswith(("ms", "rps", "request", "errors"))})
    return int(ld["requests"])


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["api", "small", "processes", "sse"])
    p.add_argument("--records", type=int, default=1000)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--cycles", type=int, default=40)
    p.add_argument("--clients", type=int, default=1, help="api: keep-alive clients")
    p.add_argument("--criu", default="/usr/local/sbin/criu")
    p.add_argument("--svg", type=Path, help="also write a flame graph")
    p.add_argument("--raw", type=Path, help="also keep py-spy's raw samples there")
    p.add_argument("--rate", type=int, default=250)
    p.add_argument(
        "--threads", nargs="*", default=["criud-db_0"], help="other threads to summarize"
    )
    a = p.parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    kdat.ensure_kdat_tmpfs(kdat.KDAT_DIR)
    root = Path(tempfile.mkdtemp(prefix="criud-profile-", dir="/dev/shm"))
    d = bench.Daemon(root / "d", a.criu)
    try:
        c = d.start().new_client()
        if a.what == "api":
            pid = bench.start_workload(workloads.HOLD)
            ck = c.checkpoint(pid, leave_running=True)
            bench.kill(pid)
            d.stop()
            bench._seed_records(d.state_dir, ck["id"], a.records)
            c = d.start().new_client()
        tree = 0
        if a.what == "processes":
            scratch = workloads.scratch_dir(root, "files")
            tree = bench.start_workload(workloads.TREE, "200", "50", str(scratch))
        raw = root / "raw.txt"
        cmd = [
            spy,
            "record",
            "--idle",
            "--threads",
            "--format",
            "raw",
            "-r",
            str(a.rate),
            "-o",
            str(raw),
        ]
        rec = subprocess.Popen(
            [*cmd, "--pid", str(d.pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        svg = None
        if a.svg:
            svg = subprocess.Popen(
                [spy, "record", "-r", str(a.rate), "-o", str(a.svg), "--pid", str(d.pid)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        time.sleep(1.0)
        n = 0
        t0 = time.perf_counter()
        if a.what == "api" and a.clients > 1:
            n = _api_clients(d, a.clients, a.seconds)
        elif a.what == "api":
            conn = UnixConnection(str(d.socket), 60)
            while time.perf_counter() - t0 < a.seconds:
                conn.request("GET", "/v1/checkpoints")
                conn.getresponse().read()
                n += 1
            conn.close()
        elif a.what == "sse":
            n = _sse_load(d, a.seconds)
        elif a.what == "processes":
            while time.perf_counter() - t0 < a.seconds:
                c.request("GET", f"/v1/processes/{tree}")
                n += 1
        else:
            for _ in range(a.cycles):
                pid = bench.spawn_sleep()
                ck = c.checkpoint(pid)
                bench.reap_dumped(pid)
                r = c.restore(ck["id"])
                bench.TRACK.add(int(r["pid"]))
                bench.criud_restore_kill(c, r)
                c.delete(ck["id"])
                n += 1
        wall = time.perf_counter() - t0
        for proc in (rec, svg):
            if proc is not None:
                proc.send_signal(signal.SIGINT)
                proc.wait(timeout=60)
        each = wall / max(n, 1) * 1e3
        print(f"{a.what}: {n} in {wall:.1f} s ({each:.1f} ms each, under py-spy at {a.rate} Hz)")
        print(summarize(raw))
        if a.raw:
            shutil.copyfile(raw, a.raw)
        for t in a.threads:
            print(summarize(raw, 15, t))
    finally:
        if tree:
            bench.os.kill(tree, signal.SIGTERM)  # it kills and reaps its children
            bench.wait_gone(tree, 30, strict=False)
        d.stop()
        bench.TRACK.kill_all()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
