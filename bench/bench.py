"""criud against raw criu, in one run, interleaved side by side.

    python bench/bench.py            # full run (make bench)
    python bench/bench.py --quick    # < 2 minutes (make bench-quick)
    python bench/bench.py --only small,api

Runs the real daemon (``python -m criud.daemon.cli serve`` on temporary
paths) and real criu, as root.  Sections:

  small          a `sleep`, dump + restore: raw criu vs criud
  memory         64 MiB .. 1 GiB of random data, images on tmpfs and on disk
  concurrency    8 x 128 MiB checkpointed through criud at once vs one by one
  api            GET /v1/checkpoints with 1,000 records, 50 keep-alive clients
  fd             fd hand-off: fds sent -> first byte from the restored tree
  introspection  a tree of 200 processes x 50 fds: GET /v1/processes/{pid}
  observability  events + metrics on vs off (interleaved small cycles); GET /v1/version
                 p99 with 0 vs 100 SSE subscribers
  scaling        dump time as fds (10 .. 10,000) and tasks (1 .. 100) grow: raw criu vs
                 criud, interleaved (bench/scaling_bench.py; chart docs/benchmarks-scaling.png)

"Raw criu" runs the criu CLI with the argv criud builds (criud.dump.argv,
criud.restore.argv), with images on the same filesystem as the daemon's
state dir.  Two raw binaries are compared: the criu criud runs (built by
deploy/install-criu with RUNDIR=/run/criud/kdat, so its kernel probe is
cached on the tmpfs criud keeps there) and a default build (RUNDIR=/run,
which is not a tmpfs on this machine, so it probes the kernel every run).
Before starting any daemon the harness calls
criud.daemon.kdat.ensure_kdat_tmpfs() itself, as the daemon does at start-up.

Results: bench/results/<date>-<hostname>[-quick].json; a full run also
rewrites the generated part of docs/benchmarks.md and docs/benchmarks.png.
Times are wall clock as a caller sees them.  The machine is noisy: read
medians.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import functools
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import _repo  # noqa: F401 - the repo root on sys.path, for the tests' helpers
import apiload
import archive_bench
import lazy_bench
import migration_bench
import report
import scaling_bench
import workloads

from criud.api.client import Client, CriudClientError, UnixConnection
from criud.daemon import kdat, names, procutil
from criud.daemon.criu import parse_version, read_log
from criud.daemon.store import Store
from criud.dump import fds as fdinfo
from criud.dump.argv import DUMP_LOG, dump_argv
from criud.dump.options import DumpOptions
from criud.restore.argv import PIDFILE, RESTORE_LOG, restore_argv
from criud.restore.worker import FdMap
from tests.integration.helpers import Daemon as TestDaemon

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TMPFS_BASE = Path("/dev/shm")
DISK_BASE = Path("/var/tmp")
CODE_DIRS = ("daemon", "api", "dump", "restore")
SECTIONS = (
    "small",
    "memory",
    "concurrency",
    "api",
    "fd",
    "introspection",
    "archive",
    "observability",
    "lazy",
    "migration",
    "scaling",
)

# Full and quick sizes of every section.
PROFILES: dict[str, dict[str, Any]] = {
    "full": {
        "small_rounds": 30,
        "mem_sizes": [64, 256, 1024],
        "mem_reps": 5,
        "warm_gib": 4,
        "conc_procs": 8,
        "conc_mib": 128,
        "conc_reps": 5,
        "api_records": 1000,
        "api_clients": 50,
        "api_per_client": 100,
        "api_seconds": 20.0,
        "api_rounds": 7,
        "api_procs": 2,
        "fd_pairs": 20,
        "tree_procs": 200,
        "tree_fds": 50,
        "tree_reps": 20,
        "archive_mib": 1024,
        "archive_reps": 5,
        "obs_rounds": 40,
        "obs_subscribers": 100,
        "obs_clients": 10,
        "obs_requests": 300,
        "obs_alternations": 4,
        "lazy_rounds": 7,
        "lazy_mib": 1024,
        "clone_rounds": 7,
        "clone_copies": 10,
        "mig_sizes": [256, 1024],
        "mig_reps": 5,
        # 21, not 10: a median of 10 pairs' ratios moved by several per
        # cent between runs of the same code on this VM (docs/benchmarks.md,
        # "Big trees"); an odd count makes it one pair's ratio.
        "scaling_rounds": 21,
    },
    "quick": {
        "small_rounds": 10,
        "mem_sizes": [64, 256],
        "mem_reps": 2,
        "warm_gib": 2,
        "conc_procs": 8,
        "conc_mib": 128,
        "conc_reps": 2,
        "api_records": 1000,
        "api_clients": 50,
        "api_per_client": 20,
        "api_seconds": 5.0,
        "api_rounds": 1,
        "api_procs": 2,
        "fd_pairs": 6,
        "tree_procs": 200,
        "tree_fds": 50,
        "tree_reps": 7,
        "archive_mib": 256,
        "archive_reps": 2,
        "obs_rounds": 12,
        "obs_subscribers": 100,
        "obs_clients": 10,
        "obs_requests": 100,
        "obs_alternations": 2,
        "lazy_rounds": 3,
        "lazy_mib": 1024,
        "clone_rounds": 3,
        "clone_copies": 10,
        "mig_sizes": [256],
        "mig_reps": 2,
        "scaling_rounds": 4,
    },
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- statistics ------------------------------------------------------------------


def pct(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) of values, linearly interpolated."""
    v = sorted(values)
    if not v:
        return float("nan")
    k = (len(v) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def summary_ms(seconds: Sequence[float]) -> dict[str, Any]:
    ms = [s * 1000 for s in seconds]
    return {
        "n": len(ms),
        "median_ms": round(statistics.median(ms), 2),
        "p90_ms": round(pct(ms, 0.9), 2),
        "min_ms": round(min(ms), 2),
        "samples_ms": [round(x, 2) for x in ms],
    }


def gbps(nbytes: int, seconds: float) -> float:
    return round(nbytes / seconds / 1e9, 3)


# -- process hygiene -------------------------------------------------------------


class Tracker:
    """Processes this run started or restored: killed at exit, by pid, if still ours."""

    def __init__(self) -> None:
        self._procs: dict[int, int | None] = {}

    def add(self, pid: int) -> None:
        self._procs[pid] = procutil.proc_start(pid)

    def done(self, pid: int) -> None:
        self._procs.pop(pid, None)

    def kill_all(self) -> None:
        for pid, start in list(self._procs.items()):
            if start is not None and procutil.proc_start(pid) == start:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                wait_gone(pid, 5, strict=False)
            self._procs.pop(pid, None)


TRACK = Tracker()


def wait_gone(pid: int, timeout: float = 10.0, strict: bool = True) -> None:
    """Wait until pid is gone (reaping it if it is our child)."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        if not os.path.exists(f"/proc/{pid}"):
            return
        if time.monotonic() > deadline:
            if strict:
                raise RuntimeError(f"pid {pid} still there after {timeout} s")
            return
        time.sleep(0.002)


def kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    wait_gone(pid)
    TRACK.done(pid)


def start_workload(script: str, *args: str, stdout: int | None = None) -> int:
    p = workloads.start(script, *args, stdout=stdout)
    TRACK.add(p.pid)
    return p.pid


def spawn_sleep() -> int:
    p = subprocess.Popen(
        ["sleep", "1000"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
    )
    TRACK.add(p.pid)
    return p.pid


def reap_dumped(pid: int) -> None:
    """After a dump without --leave-running: the target is dead; reap it."""
    wait_gone(pid)
    TRACK.done(pid)


# -- raw criu --------------------------------------------------------------------


class CriuFailed(RuntimeError):
    pass


def drop_kdat() -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(kdat.KDAT_DIR / kdat.KDAT_FILE)


def _run_criu(criu: str, argv: list[str], log_path: Path, pass_fds: Sequence[int] = ()) -> None:
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        rc = subprocess.run(
            [criu, *argv],
            stdin=subprocess.DEVNULL,
            stdout=fd,
            stderr=fd,
            pass_fds=tuple(pass_fds),
            close_fds=True,
        ).returncode
    finally:
        os.close(fd)
    if rc != 0:
        err, tail = read_log(log_path)
        raise CriuFailed(f"criu {argv[0]} exited {rc}: {err or tail[-3:]}")


def raw_dump(criu: str, pid: int, images: Path, opts: DumpOptions | None = None) -> float:
    """`criu dump` with criud's argv; returns seconds."""
    images.mkdir(mode=0o700)
    argv = dump_argv(pid, images, opts or DumpOptions())
    t0 = time.perf_counter()
    _run_criu(criu, argv, images / DUMP_LOG)
    return time.perf_counter() - t0


def raw_restore(
    criu: str, images: Path, inherit: Sequence[tuple[int, str]] = ()
) -> tuple[float, int]:
    """`criu restore` with criud's argv; returns (seconds, restored root pid)."""
    with contextlib.suppress(FileNotFoundError):
        (images / PIDFILE).unlink()
    with FdMap() as fds:
        for fd, key in inherit:
            fds.hand_over(fds.dup(fd), key)
        argv = restore_argv(images, DumpOptions(), fds.inherit_args())
        t0 = time.perf_counter()
        _run_criu(criu, argv, images / RESTORE_LOG, pass_fds=fds.pass_fds)
        t = time.perf_counter() - t0
    pid = int((images / PIDFILE).read_text().strip())
    TRACK.add(pid)
    return t, pid


def dir_bytes(path: Path) -> int:
    return sum(e.stat().st_size for e in os.scandir(path) if e.is_file())


def warm_memory(gib: int) -> float:
    """Make the kernel (and the VM under it) hand out pages once: returns seconds.

    On this VM the first touch of a page the guest never used is several
    times slower than later ones (a 1 GiB dump to tmpfs: 4.9 s the first
    time, 0.8 s after).  Allocating and freeing a tmpfs file of gib GiB
    first keeps that one-time cost out of every section.
    """
    t0 = time.perf_counter()
    path = TMPFS_BASE / f"criud-bench-warm-{os.getpid()}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.posix_fallocate(fd, 0, gib << 30)
    finally:
        os.close(fd)
        os.unlink(path)
    return round(time.perf_counter() - t0, 2)


# -- the daemon ------------------------------------------------------------------


class Daemon(TestDaemon):
    """The tests' daemon (tests.integration.helpers), quieter and with patience for big runs."""

    def __init__(
        self, root: Path, criu: str, state_dir: Path | None = None, args: Sequence[str] = ()
    ) -> None:
        root.mkdir(parents=True, exist_ok=True)
        super().__init__(root, criu, args=["--log-level", "warning", *args])
        if state_dir is not None:
            self.state_dir = state_dir

    def start(self, timeout: float = 60.0) -> Daemon:
        super().start(timeout)
        return self

    def new_client(self) -> Client:
        """A client of its own (one per thread), with room for the longest dump."""
        return Client(str(self.socket), str(self.fd_socket), timeout=600)

    def rss_mib(self) -> float:
        with open(f"/proc/{self.pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
        return float("nan")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 90.0) -> int | None:
        return super().stop(sig, timeout)


@contextlib.contextmanager
def running_daemon(
    root: Path, criu: str, state_dir: Path | None = None, args: Sequence[str] = ()
) -> Iterator[Daemon]:
    d = Daemon(root, criu, state_dir, args)
    d.start()
    try:
        yield d
    finally:
        d.stop()


def criud_restore_kill(c: Client, restore: dict[str, Any]) -> None:
    """Kill a tree criud restored (it is the daemon's child) and wait until it is gone."""
    pid = int(restore["pid"])
    with contextlib.suppress(CriudClientError):
        c.signal(restore["id"], "SIGKILL")
    wait_gone(pid)
    TRACK.done(pid)


# -- 1. small process overhead ---------------------------------------------------


def bench_small(cfg: dict[str, Any], env: dict[str, Any], base: Path) -> dict[str, Any]:
    """A sleep, dump + restore, 5 ways, interleaved (rotating order)."""
    root = Path(tempfile.mkdtemp(prefix="small-", dir=base))
    criu, criu_default = env["criu"], env["criu_default"]
    sides = ["raw_default", "raw_cold", "raw_warm", "criud_cold", "criud_warm"]
    if criu_default is None:
        sides.remove("raw_default")
    rows: dict[str, dict[str, list[float]]] = {
        s: {"dump": [], "restore": [], "total": []} for s in sides
    }
    with running_daemon(root / "d", criu) as d:
        c = d.new_client()
        for i in range(cfg["small_rounds"]):
            order = sides[i % len(sides) :] + sides[: i % len(sides)]
            for side in order:
                pid = spawn_sleep()
                cold = side.endswith("cold") or side == "raw_default"
                if side.startswith("raw"):
                    binary = criu_default if side == "raw_default" else criu
                    images = root / f"{side}-{i}"
                    if cold:
                        drop_kdat()
                    td = raw_dump(binary, pid, images)
                    reap_dumped(pid)
                    if cold:
                        drop_kdat()
                    tr, rp = raw_restore(binary, images)
                    kill(rp)
                    shutil.rmtree(images)
                else:
                    if cold:
                        drop_kdat()
                    t0 = time.perf_counter()
                    ck = c.checkpoint(pid)
                    td = time.perf_counter() - t0
                    reap_dumped(pid)
                    if cold:
                        drop_kdat()
                    t0 = time.perf_counter()
                    r = c.restore(ck["id"])
                    tr = time.perf_counter() - t0
                    TRACK.add(int(r["pid"]))
                    criud_restore_kill(c, r)
                    c.delete(ck["id"])
                rows[side]["dump"].append(td)
                rows[side]["restore"].append(tr)
                rows[side]["total"].append(td + tr)
        # Leave the cache warm for what follows.
        c.request("GET", "/v1/version")
    shutil.rmtree(root, ignore_errors=True)
    out: dict[str, Any] = {"rounds": cfg["small_rounds"], "sides": {}}
    for side in sides:
        out["sides"][side] = {k: summary_ms(v) for k, v in rows[side].items()}
    tot = {s: out["sides"][s]["total"] for s in sides}
    out["criud_added_median_ms"] = round(
        tot["criud_warm"]["median_ms"] - tot["raw_warm"]["median_ms"], 2
    )
    # Issue 13's figure: the median of each round's own difference (the
    # two ran back to back, so a slow moment of the machine hits both).
    out["criud_added_paired_ms"] = round(
        statistics.median(
            a - b
            for a, b in zip(rows["criud_warm"]["total"], rows["raw_warm"]["total"], strict=True)
        )
        * 1e3,
        2,
    )
    out["criud_added_p90_ms"] = round(tot["criud_warm"]["p90_ms"] - tot["raw_warm"]["p90_ms"], 2)
    out["criud_added_cold_median_ms"] = round(
        tot["criud_cold"]["median_ms"] - tot["raw_cold"]["median_ms"], 2
    )
    if "raw_default" in tot:
        out["criud_vs_raw_default_ratio"] = round(
            tot["criud_warm"]["median_ms"] / tot["raw_default"]["median_ms"], 3
        )
    return out


# -- 2. memory scaling -----------------------------------------------------------


def _mem_cycle(
    side: str, mib: int, criu: str, c: Client, root: Path, tag: str
) -> tuple[float, float, int]:
    pid = start_workload(workloads.FILL, str(mib))
    if side == "raw":
        images = root / f"raw-{tag}"
        td = raw_dump(criu, pid, images)
        reap_dumped(pid)
        size = dir_bytes(images)
        tr, rp = raw_restore(criu, images)
        kill(rp)
        shutil.rmtree(images)
    else:
        t0 = time.perf_counter()
        ck = c.checkpoint(pid)
        td = time.perf_counter() - t0
        reap_dumped(pid)
        size = int(ck.get("size_bytes") or 0)
        t0 = time.perf_counter()
        r = c.restore(ck["id"])
        tr = time.perf_counter() - t0
        TRACK.add(int(r["pid"]))
        criud_restore_kill(c, r)
        c.delete(ck["id"])
    return td, tr, size


def bench_memory(cfg: dict[str, Any], env: dict[str, Any], base: Path) -> dict[str, Any]:
    criu = env["criu"]
    out: dict[str, Any] = {
        "reps": cfg["mem_reps"],
        "sizes_mib": cfg["mem_sizes"],
        "by_location": {},
    }
    for loc, loc_base in (("tmpfs", TMPFS_BASE), ("disk", DISK_BASE)):
        root = Path(tempfile.mkdtemp(prefix="criud-bench-mem-", dir=loc_base))
        res: dict[str, Any] = {"dir": str(loc_base)}
        try:
            with running_daemon(root / "d", criu) as d:
                c = d.new_client()
                # One untimed cycle first: the first pages a filesystem (and the
                # VM under it) hands out are much slower than later ones.
                warm = max(cfg["mem_sizes"])
                log(f"memory/{loc}: warm-up cycle of {warm} MiB")
                _mem_cycle("raw", warm, criu, c, root, "warmup")
                for mib in cfg["mem_sizes"]:
                    rows: dict[str, list[float]] = {
                        "raw_dump": [],
                        "raw_restore": [],
                        "criud_dump": [],
                        "criud_restore": [],
                    }
                    sizes: dict[str, int] = {}
                    for rep in range(cfg["mem_reps"]):
                        order = ["raw", "criud"] if rep % 2 == 0 else ["criud", "raw"]
                        for side in order:
                            td, tr, size = _mem_cycle(side, mib, criu, c, root, f"{mib}-{rep}")
                            rows[f"{side}_dump"].append(td)
                            rows[f"{side}_restore"].append(tr)
                            sizes[side] = size
                            if loc == "disk":
                                os.sync()
                    med = {k: statistics.median(v) for k, v in rows.items()}
                    payload = mib << 20
                    res[str(mib)] = {
                        **{f"{k}_s": round(v, 3) for k, v in med.items()},
                        **{f"{k}_gbps": gbps(payload, v) for k, v in med.items()},
                        "dump_ratio": round(med["criud_dump"] / med["raw_dump"], 3),
                        "restore_ratio": round(med["criud_restore"] / med["raw_restore"], 3),
                        # Median of the per-rep ratios (each rep's two runs are
                        # adjacent in time, so slow spells of the machine cancel).
                        **{
                            f"{op}_ratio_paired": round(
                                statistics.median(
                                    c / r
                                    for c, r in zip(
                                        rows[f"criud_{op}"], rows[f"raw_{op}"], strict=True
                                    )
                                ),
                                3,
                            )
                            for op in ("dump", "restore")
                        },
                        "image_bytes": sizes,
                        "samples_s": {k: [round(x, 4) for x in v] for k, v in rows.items()},
                    }
                    r = res[str(mib)]
                    log(
                        f"memory/{loc} {mib} MiB: dump raw {r['raw_dump_s']}s criud "
                        f"{r['criud_dump_s']}s (x{r['dump_ratio']}); restore raw "
                        f"{r['raw_restore_s']}s criud {r['criud_restore_s']}s "
                        f"(x{r['restore_ratio']})"
                    )
        finally:
            shutil.rmtree(root, ignore_errors=True)
        out["by_location"][loc] = res
    return out


# -- 3. concurrency --------------------------------------------------------------


def _run_batch(jobs: list[Callable[[], float]], concurrent: bool) -> tuple[float, list[float]]:
    lat: list[float] = [0.0] * len(jobs)
    errors: list[BaseException] = []
    if not concurrent:
        t0 = time.perf_counter()
        for i, job in enumerate(jobs):
            lat[i] = job()
        return time.perf_counter() - t0, lat
    barrier = threading.Barrier(len(jobs) + 1)

    def run(i: int, job: Callable[[], float]) -> None:
        barrier.wait()
        try:
            lat[i] = job()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i, j)) for i, j in enumerate(jobs)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return wall, lat


def _criud_job(d: Daemon, pid: int, made: list[tuple[Client, str]]) -> float:
    cl = d.new_client()  # each thread its own client
    t0 = time.perf_counter()
    ck = cl.checkpoint(pid, leave_running=True)
    t = time.perf_counter() - t0
    made.append((cl, ck["id"]))  # list.append is atomic
    return t


def _raw_job(criu: str, pid: int, images: Path) -> float:
    return raw_dump(criu, pid, images, DumpOptions(leave_running=True))


def bench_concurrency(cfg: dict[str, Any], env: dict[str, Any], base: Path) -> dict[str, Any]:
    """N processes checkpointed (leave_running) through criud at once vs one by one."""
    criu = env["criu"]
    n, mib = cfg["conc_procs"], cfg["conc_mib"]
    root = Path(tempfile.mkdtemp(prefix="conc-", dir=base))
    pids = [start_workload(workloads.FILL, str(mib)) for _ in range(n)]
    total = n * (mib << 20)
    walls: dict[str, list[float]] = {
        "criud_seq": [],
        "criud_conc": [],
        "raw_seq": [],
        "raw_conc": [],
    }
    lats: dict[str, list[float]] = {k: [] for k in walls}
    try:
        with running_daemon(root / "d", criu) as d:
            # Untimed: one concurrent round first (first-touch of tmpfs pages).
            warm = d.new_client()
            for p in pids:
                warm.delete(warm.checkpoint(p, leave_running=True)["id"])
            for rep in range(cfg["conc_reps"]):
                modes = ["criud_seq", "criud_conc", "raw_seq", "raw_conc"]
                if rep % 2:
                    modes.reverse()
                for mode in modes:
                    made: list[tuple[Client, str]] = []
                    if mode.startswith("criud"):
                        jobs = [functools.partial(_criud_job, d, p, made) for p in pids]
                    else:
                        jobs = [
                            functools.partial(_raw_job, criu, p, root / f"{mode}-{rep}-{k}")
                            for k, p in enumerate(pids)
                        ]
                    wall, lat = _run_batch(jobs, concurrent=mode.endswith("conc"))
                    walls[mode].append(wall)
                    lats[mode].extend(lat)
                    for cl, ck_id in made:
                        cl.delete(ck_id)
                    for k in range(n):
                        shutil.rmtree(root / f"{mode}-{rep}-{k}", ignore_errors=True)
                    log(f"concurrency {mode}: {wall:.2f} s for {n} x {mib} MiB")
    finally:
        for p in pids:
            kill(p)
        shutil.rmtree(root, ignore_errors=True)
    out: dict[str, Any] = {"procs": n, "mib_each": mib, "reps": cfg["conc_reps"], "modes": {}}
    for mode, w in walls.items():
        wall = statistics.median(w)
        out["modes"][mode] = {
            "wall_s": round(wall, 3),
            "gbps": gbps(total, wall),
            "per_dump_median_s": round(statistics.median(lats[mode]), 3),
            "walls_s": [round(x, 3) for x in w],
        }
    m = out["modes"]
    out["criud_speedup"] = round(m["criud_seq"]["wall_s"] / m["criud_conc"]["wall_s"], 3)
    out["raw_speedup"] = round(m["raw_seq"]["wall_s"] / m["raw_conc"]["wall_s"], 3)
    return out


# -- 4. API latency and memory ---------------------------------------------------


def _seed_records(state_dir: Path, template_id: str, n: int) -> None:
    """Insert n-1 copies of a real checkpoint record straight into the store."""
    store = Store(state_dir / "criud.db")
    store.open()
    try:
        # The connection allows any thread, and nothing else uses it now.
        tmpl = store.get_checkpoint(template_id)
        assert tmpl is not None
        store.db.execute("BEGIN")
        for i in range(n - 1):
            rec = type(tmpl)(**{**tmpl.__dict__})
            rec.id = names.new_id()
            rec.name = f"bench-{i:05d}"
            rec.created_at = tmpl.created_at + (i + 1) * 1e-3
            rec.finished_at = rec.created_at
            store.insert_checkpoint(rec)
        store.db.execute("COMMIT")
    finally:
        store.close()


# The reference for the API section: the same bytes, as an asyncio server
# with nothing else to do answers them to the same clients.  It bounds what
# this harness (50 client threads of this process, on the same cores as the
# server) can measure on this machine: the daemon cannot beat it.
STATIC_SERVER = r"""
import asyncio, os, socket, sys
body = open(sys.argv[2], "rb").read()
head = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n" % len(body)
head += b"content-type: application/json\r\n\r\n"
class Static(asyncio.Protocol):
    def connection_made(self, t):
        self.t, self.buf = t, b""
        # As criud's SendRoom: the whole answer in one send().
        t.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, 32, 2 << 20)
    def data_received(self, data):
        self.buf += data
        while b"\r\n\r\n" in self.buf:
            _, _, self.buf = self.buf.partition(b"\r\n\r\n")
            self.t.write(head)
            self.t.write(body)
async def main():
    await asyncio.get_running_loop().create_unix_server(Static, sys.argv[1])
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


def _api_load(cfg: dict[str, Any], sock: str, server_pid: int, body_len: int) -> dict[str, Any]:
    """GET /v1/checkpoints from the clients of bench/apiload.py (worker processes)."""
    return apiload.run_load(
        sock,
        server_pid,
        clients=cfg["api_clients"],
        per=cfg["api_per_client"],
        seconds=cfg["api_seconds"],
        body_len=body_len,
        procs=cfg["api_procs"],
    )


@contextlib.contextmanager
def static_server(root: Path, body: bytes) -> Iterator[tuple[str, int]]:
    """The reference server (STATIC_SERVER) answering body; (socket path, pid)."""
    sock, data = root / "static.sock", root / "static.json"
    data.write_bytes(body)
    p = subprocess.Popen(
        [sys.executable, "-c", STATIC_SERVER, str(sock), str(data)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        yield str(sock), p.pid
    finally:
        p.kill()
        p.wait(timeout=30)


def _single_client(sock: str, n: int = 20) -> tuple[dict[str, Any], bytes]:
    """Unloaded latency: one keep-alive client, one request at a time; and the body."""
    conn = UnixConnection(sock, 60)
    single: list[float] = []
    body = b""
    for _ in range(n):
        t = time.perf_counter()
        conn.request("GET", "/v1/checkpoints")
        r = conn.getresponse()
        body = r.read()
        single.append(time.perf_counter() - t)
    conn.close()
    return {k: v for k, v in summary_ms(single).items() if k != "samples_ms"}, body


def bench_api(cfg: dict[str, Any], env: dict[str, Any], base: Path) -> dict[str, Any]:
    criu = env["criu"]
    root = Path(tempfile.mkdtemp(prefix="api-", dir=base))
    n = cfg["api_records"]
    out: dict[str, Any] = {"records": n, "clients": cfg["api_clients"]}
    try:
        # A fresh daemon's idle RSS, before it has served anything much.
        d = Daemon(root / "d", criu)
        d.start()
        time.sleep(1.0)
        out["rss_idle_empty_mib"] = d.rss_mib()
        pid = start_workload(workloads.HOLD)
        ck = d.new_client().checkpoint(pid, leave_running=True, labels={"bench": "api"})
        kill(pid)
        d.stop()
        t0 = time.perf_counter()
        _seed_records(d.state_dir, ck["id"], n)
        out["seeded_s"] = round(time.perf_counter() - t0, 3)
        out["seeding"] = (
            f"1 real checkpoint (leave_running) + {n - 1} copies of its record inserted "
            "with criud.daemon.store.Store while the daemon was stopped"
        )
        d.start()
        c = d.new_client()
        time.sleep(1.0)
        out["rss_idle_mib"] = d.rss_mib()
        status, listed = c.request("GET", "/v1/checkpoints")
        assert status == 200 and len(listed) == n, (status, len(listed))
        out["response_bytes"] = len(json.dumps(listed))
        out["single_client"], body = _single_client(str(d.socket))
        # The daemon, then the reference with its very bytes, then the
        # daemon again: pairs the two under the same load of the machine.
        rounds: list[dict[str, Any]] = []
        with static_server(root, body) as (ssock, spid):
            out["reference_single_client"] = _single_client(ssock)[0]
            for i in range(cfg["api_rounds"]):
                if i % 2 == 0:
                    rounds.append({"criud": _api_load(cfg, str(d.socket), d.pid, len(body))})
                    rounds[-1]["reference"] = _api_load(cfg, ssock, spid, len(body))
                else:
                    ref = _api_load(cfg, ssock, spid, len(body))
                    crit = _api_load(cfg, str(d.socket), d.pid, len(body))
                    rounds.append({"criud": crit, "reference": ref})
        out["rounds"] = rounds
        out["load"] = _median_load([r["criud"] for r in rounds])
        out["reference"] = _median_load([r["reference"] for r in rounds])
        out["rss_after_mib"] = d.rss_mib()
        d.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return out


def _median_load(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of each figure over the rounds (requests and errors summed)."""
    out: dict[str, Any] = dict(runs[0])
    for k, v in runs[0].items():
        if k in ("requests", "errors"):
            out[k] = sum(r[k] for r in runs)
        elif isinstance(v, float):
            out[k] = round(statistics.median(r[k] for r in runs), 3)
    out["rounds"] = len(runs)
    return out


# -- 7. events and metrics ------------------------------------------------------


def raw_small_cycle(criu: str, root: Path, i: int) -> float:
    """One dump + restore of a fresh sleep with raw criu (criud's argv), images under root; s."""
    pid = spawn_sleep()
    images = root / f"raw-{i}"
    td = raw_dump(criu, pid, images)
    reap_dumped(pid)
    tr, rp = raw_restore(criu, images)
    kill(rp)
    shutil.rmtree(images)
    return td + tr


def _small_cycle(c: Client, pid: int | None = None) -> float:
    """One checkpoint + restore of a sleep (pid, or a new one) through criud; seconds."""
    pid = spawn_sleep() if pid is None else pid
    t0 = time.perf_counter()
    ck = c.checkpoint(pid)
    td = time.perf_counter() - t0
    reap_dumped(pid)
    t0 = time.perf_counter()
    r = c.restore(ck["id"])
    tr = time.perf_counter() - t0
    TRACK.add(int(r["pid"]))
    criud_restore_kill(c, r)
    c.delete(ck["id"])
    return td + tr


class SseSubscribers:
    """n raw readers of /v1/events on one thread that reads and drops what they get."""

    def __init__(self, sock: Path, n: int) -> None:
        import selectors

        self.sel = selectors.DefaultSelector()
        self.socks: list[socket.socket] = []
        self.received = 0
        for _ in range(n):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            s.connect(str(sock))
            s.sendall(b"GET /v1/events HTTP/1.0\r\nHost: criud\r\n\r\n")
            s.setblocking(False)
            self.sel.register(s, selectors.EVENT_READ)
            self.socks.append(s)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while not self.stop.is_set():
            for key, _ in self.sel.select(0.1):
                with contextlib.suppress(BlockingIOError):
                    self.received += len(key.fileobj.recv(65536))  # type: ignore[union-attr]

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        for s in self.socks:
            self.sel.unregister(s)
            s.close()


def _version_load(sock: Path, clients: int, per: int) -> list[float]:
    """clients keep-alive threads, per GET /v1/version each; every latency, seconds."""
    lat: list[list[float]] = [[] for _ in range(clients)]
    barrier = threading.Barrier(clients)

    def client(i: int) -> None:
        cn = UnixConnection(str(sock), 60)
        cn.connect()
        barrier.wait()
        try:
            for _ in range(per):
                t = time.perf_counter()
                cn.request("GET", "/v1/version")
                r = cn.getresponse()
                r.read()
                lat[i].append(time.perf_counter() - t)
        finally:
            cn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [x for v in lat for x in v]


def _event_source(c: Client, stop: threading.Event) -> None:
    """Two events (started, failed) every 50 ms: a restore of no checkpoint, no criu run."""
    while not stop.wait(0.05):
        with contextlib.suppress(CriudClientError):
            c.restore("bench-no-such-checkpoint")


def _in_process_us(n: int = 5000) -> float:
    """What events and metrics do for one checkpoint + restore, run in this process; µs.

    Per operation: two events published to one reader's queue and encoded
    for it, the in-flight gauge up and down, the counter and histogram, the
    bytes (and a dump's frozen time).  The socket write to the reader is
    not in it: the interleaved cycles above include it.
    """
    from criud.daemon.events import EventBus
    from criud.daemon.metrics import Metrics

    bus, metrics = EventBus(), Metrics({})
    sub = bus.subscribe(None)
    stats = {"frozen_time_us": 4200, "pages_written": 30}
    t0 = time.perf_counter()
    for _ in range(n):
        for kind in ("checkpoint", "restore"):
            bus.publish("operation.started", 0, operation="x" * 24, kind=kind, target={"pid": 1})
            metrics.started(kind)
            metrics.ended(kind, None, 0.02)
            if kind == "checkpoint":
                metrics.checkpointed(180_000, stats)
            else:
                metrics.restored(180_000)
            bus.publish("operation.done", 0, operation="x" * 24, kind=kind, duration_s=0.02)
        for ev in sub.ready(8):
            ev.sse()
    return round((time.perf_counter() - t0) / n * 1e6, 1)


class _StreamOnly:
    """The part of the daemon service /v1/events uses: its event stream."""

    def __init__(self, bus: Any) -> None:
        self.bus = bus

    def version(self) -> dict[str, str]:
        return {"criud": "bench"}

    def event_stream(self, caller: Any, since: int | None) -> Any:
        return self.bus.stream(None, since)


async def _sse_readers_cpu(readers: int, pairs: int) -> tuple[float, int]:
    """CPU seconds the loop spent delivering pairs x 2 events to readers; bytes framed.

    The real app (every middleware, the route, the response) serves the
    readers; each send is framed by h11 as uvicorn does and then dropped,
    so only the socket write is missing.  CPU time, not wall time: the
    flush delay the loop sleeps through is not cost.
    """
    import h11

    from criud.api.app import create_app
    from criud.daemon.caller import Caller
    from criud.daemon.events import EventBus

    bus = EventBus()
    app = create_app(_StreamOnly(bus))
    got = [0] * readers
    gone = asyncio.get_running_loop().create_future()

    def reader(i: int) -> Any:
        conn = h11.Connection(h11.SERVER)
        conn.receive_data(b"GET /v1/events HTTP/1.1\r\nHost: criud\r\n\r\n")
        conn.next_event()

        async def send(message: Any) -> None:
            if message["type"] == "http.response.start":
                conn.send(h11.Response(status_code=200, headers=message["headers"]))
            elif message.get("body"):
                got[i] += len(conn.send(h11.Data(data=message["body"])) or b"")

        async def receive() -> Any:
            await asyncio.shield(gone)
            return {"type": "http.disconnect"}

        scope = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1", "method": "GET", "scheme": "http", "path": "/v1/events",
            "raw_path": b"/v1/events", "query_string": b"", "root_path": "",
            "headers": [(b"host", b"criud")], "client": None, "server": None,
            "state": {"peer": Caller(uid=0, gid=0, pid=1), "tcp": False},
        }  # fmt: skip
        return app(scope, receive, send)

    tasks = [asyncio.create_task(reader(i)) for i in range(readers)]
    while not all(got):  # each has its first comment: subscribed
        await asyncio.sleep(0.001)
    start = sum(got)
    t0 = time.process_time()
    for _ in range(pairs):
        before = list(got)
        bus.publish("operation.started", 0, operation="x" * 24, kind="restore", target={})
        bus.publish("operation.failed", 0, operation="x" * 24, code="not_found", detail="no")
        # The flush comes FLUSH_S later; the loop sleeps meanwhile (no CPU).
        while any(g == b for g, b in zip(got, before, strict=True)):
            await asyncio.sleep(0.002)
    cpu = time.process_time() - t0
    gone.set_result(None)
    await asyncio.gather(*tasks, return_exceptions=True)
    return cpu, sum(got) - start


def _sse_us_per_event_reader(readers: int = 100, pairs: int = 200) -> float:
    """In-process CPU per event per reader of /v1/events (framed, not written); µs."""
    cpu, _ = asyncio.run(_sse_readers_cpu(readers, pairs))
    return round(cpu / (2 * pairs * readers) * 1e6, 2)


def bench_observability(cfg: dict[str, Any], env: dict[str, Any], base: Path) -> dict[str, Any]:
    """Events and metrics on vs off (interleaved cycles); API p99 with 0 vs n SSE readers."""
    root = Path(tempfile.mkdtemp(prefix="obs-", dir=base))
    out: dict[str, Any] = {"rounds": cfg["obs_rounds"]}
    try:
        with (
            running_daemon(root / "on", env["criu"]) as on,
            running_daemon(root / "off", env["criu"], args=["--observability", "off"]) as off,
        ):
            # The on side as it runs in earnest: someone follows its events.
            watch = SseSubscribers(on.socket, 1)
            sides = {"on": on.new_client(), "off": off.new_client()}
            for c in sides.values():
                _small_cycle(c)  # warm both
            rows: dict[str, list[float]] = {"on": [], "off": []}
            for i in range(cfg["obs_rounds"]):
                for side in ("on", "off") if i % 2 == 0 else ("off", "on"):
                    rows[side].append(_small_cycle(sides[side]))
            watch.close()
        out["sides"] = {k: summary_ms(v) for k, v in rows.items()}
        pairs = [a - b for a, b in zip(rows["on"], rows["off"], strict=True)]
        out["added_median_ms"] = round(
            out["sides"]["on"]["median_ms"] - out["sides"]["off"]["median_ms"], 3
        )
        out["paired_diff_median_ms"] = round(statistics.median(pairs) * 1000, 3)
        out["in_process_us_per_cycle"] = _in_process_us()
        out["sse_us_per_event_reader"] = _sse_us_per_event_reader(cfg["obs_subscribers"])
        out["subscribers"] = _bench_subscribers(cfg, env, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return out


def _bench_subscribers(cfg: dict[str, Any], env: dict[str, Any], root: Path) -> dict[str, Any]:
    """GET /v1/version under load: 0 vs n SSE readers, with no events and with a steady flow.

    The four conditions alternate, so the machine's drift falls on all of
    them alike.  The flow: a restore of no checkpoint every 50 ms (two
    events each, started and failed; no criu runs), from a thread that
    runs in the with-events conditions only.
    """
    n, nc, per = cfg["obs_subscribers"], cfg["obs_clients"], cfg["obs_requests"]
    conds = [(0, False), (n, False), (0, True), (n, True)]
    lat: dict[tuple[int, bool], list[float]] = {k: [] for k in conds}
    received = 0
    with running_daemon(root / "sse", env["criu"]) as d:
        _version_load(d.socket, nc, 20)  # warm
        for _ in range(cfg["obs_alternations"]):
            for readers, flowing in conds:
                stop = threading.Event()
                src = threading.Thread(target=_event_source, args=(d.new_client(), stop))
                if flowing:
                    src.start()
                subs = SseSubscribers(d.socket, readers) if readers else None
                time.sleep(0.3)
                lat[(readers, flowing)] += _version_load(d.socket, nc, per)
                stop.set()
                if flowing:
                    src.join(5)
                if subs is not None:
                    received += subs.received
                    subs.close()
    res: dict[str, Any] = {"subscribers": n, "clients": nc, "requests_each": per}
    for (readers, flowing), v in lat.items():
        res[f"{readers}{'_events' if flowing else ''}"] = {
            "requests": len(v),
            "p50_ms": round(pct(v, 0.5) * 1000, 2),
            "p99_ms": round(pct(v, 0.99) * 1000, 2),
        }
    res["p99_ratio_idle"] = round(res[str(n)]["p99_ms"] / res["0"]["p99_ms"], 3)
    res["p99_ratio_events"] = round(res[f"{n}_events"]["p99_ms"] / res["0_events"]["p99_ms"], 3)
    res["sse_bytes_received"] = received
    return res


# -- 5. fd hand-off latency ------------------------------------------------------


class FirstByte:
    """A thread blocked on a pipe's read end; notes when the first byte arrives."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.at: float | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        if os.read(self.fd, 1):
            self.at = time.perf_counter()

    def wait(self, timeout: float = 30) -> float:
        self.thread.join(timeout)
        if self.at is None:
            raise RuntimeError("no byte from the restored tree")
        return self.at


def _writer() -> tuple[int, int, str]:
    """A WRITER whose stdout is a pipe we read; returns (pid, read end, its key)."""
    r, w = os.pipe()
    pid = start_workload(workloads.WRITER, stdout=w)
    os.close(w)
    key = f"pipe:[{os.fstat(r).st_ino}]"
    assert os.read(r, 1) == b"x"
    return pid, r, key


FD_SIDES = ("raw", "criud", "criud_cli")


def _fd_once(side: str, criu: str, clients: dict[str, Client], images: Path) -> tuple[float, float]:
    """One hand-off on side: (fds sent -> first byte, fds sent -> call returned), seconds."""
    pid, old_r, key = _writer()
    c = clients.get(side)
    if c is None:
        raw_dump(criu, pid, images)
    else:
        ck = c.checkpoint(pid)
    reap_dumped(pid)
    # The hand-off alone: a warm worker that served the dump is replaced
    # in the background, and its start must not land in the measurement.
    time.sleep(0.05)
    new_r, new_w = os.pipe()
    fb = FirstByte(new_r)
    t0 = time.perf_counter()
    if c is None:
        _, rp = raw_restore(criu, images, [(new_w, key)])
    else:
        r = c.restore(ck["id"], fds={key: new_w})
        rp = int(r["pid"])
        TRACK.add(rp)
    t_call = time.perf_counter()
    os.close(new_w)
    t1 = fb.wait()
    if c is None:
        kill(rp)
        shutil.rmtree(images)
    else:
        criud_restore_kill(c, r)
        c.delete(ck["id"])
    os.close(old_r)
    os.close(new_r)
    return t1 - t0, t_call - t0


def bench_fd(cfg: dict[str, Any], env: dict[str, Any], base: Path) -> dict[str, Any]:
    """Hand-offs, interleaved in rotating order: raw criu; criud as deployed, whose fd
    handle starts a warm worker holding its fds; criud with no warm pool (`--criu-pool 0`:
    the CLI path every inherit-fd restore took before issue 13)."""
    criu = env["criu"]
    root = Path(tempfile.mkdtemp(prefix="fd-", dir=base))
    rows: dict[str, list[float]] = {s: [] for s in FD_SIDES}
    call: dict[str, list[float]] = {s: [] for s in FD_SIDES}
    try:
        with (
            running_daemon(root / "d", criu) as d,
            running_daemon(root / "c", criu, args=["--criu-pool", "0"]) as dc,
        ):
            clients = {"criud": d.new_client(), "criud_cli": dc.new_client()}
            for i in range(cfg["fd_pairs"]):
                k = i % len(FD_SIDES)
                for side in FD_SIDES[k:] + FD_SIDES[:k]:
                    first, returned = _fd_once(side, criu, clients, root / f"raw-{i}")
                    rows[side].append(first)
                    call[side].append(returned)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    out: dict[str, Any] = {"pairs": cfg["fd_pairs"], "sides": {}}
    for side in rows:
        out["sides"][side] = {
            "first_byte": summary_ms(rows[side]),
            "call_returned": {k: v for k, v in summary_ms(call[side]).items() if k != "samples_ms"},
        }
    s = out["sides"]
    for side in ("criud", "criud_cli"):
        name = "criud_added" if side == "criud" else "criud_cli_added"
        out[f"{name}_median_ms"] = round(
            s[side]["first_byte"]["median_ms"] - s["raw"]["first_byte"]["median_ms"], 2
        )
        # Each round's own difference: the rounds share the machine's load.
        diffs = [a - b for a, b in zip(rows[side], rows["raw"], strict=True)]
        out[f"{name}_paired_median_ms"] = round(statistics.median(diffs) * 1000, 2)
    return out


# -- 6. introspection ------------------------------------------------------------


def bench_introspection(cfg: dict[str, Any], env: dict[str, Any], base: Path) -> dict[str, Any]:
    criu = env["criu"]
    root = Path(tempfile.mkdtemp(prefix="tree-", dir=base))
    scratch = workloads.scratch_dir(root, "files")
    nprocs, nfds = cfg["tree_procs"], cfg["tree_fds"]
    t0 = time.perf_counter()
    pid = start_workload(workloads.TREE, str(nprocs), str(nfds), str(scratch))
    out: dict[str, Any] = {
        "procs": nprocs,
        "fds_each": nfds,
        "built_in_s": round(time.perf_counter() - t0, 2),
    }
    try:
        tasks = fdinfo.read_tree(pid)
        out["tasks_seen"] = len(tasks)
        out["fds_seen"] = sum(len(t.fds) for t in tasks)
        # In-process, for reference (and the fallback).
        direct: list[float] = []
        for _ in range(cfg["tree_reps"]):
            t = time.perf_counter()
            fdinfo.read_tree(pid)
            direct.append(time.perf_counter() - t)
        out["read_tree_in_process"] = summary_ms(direct)
        fallback = "read_tree_in_process"
        try:  # the function the endpoint is being built on, where it exists yet
            from criud.dump.inspect import inspect_tree
        except ImportError:
            inspect_tree = None
        if inspect_tree is not None:
            timed: list[float] = []
            for _ in range(cfg["tree_reps"]):
                t = time.perf_counter()
                inspect_tree(pid)
                timed.append(time.perf_counter() - t)
            out["inspect_tree_in_process"] = summary_ms(timed)
            fallback = "inspect_tree_in_process"
        with running_daemon(root / "d", criu) as d:
            c = d.new_client()
            path = f"/v1/processes/{pid}"
            try:
                status, body = c.request("GET", path)
            except CriudClientError as e:
                status, body = e.status, e.problem
            out["endpoint_status"] = status
            if status == 200:
                # The answer's time is from sending the request to its last
                # byte received (what the daemon controls); decoding the JSON
                # is the client's and is reported beside it, for Python's
                # json module.  A new connection each time, as Client does.
                answer: list[float] = []
                decode: list[float] = []
                size = 0
                for _ in range(cfg["tree_reps"]):
                    conn = UnixConnection(str(d.socket), 120)
                    try:
                        t = time.perf_counter()
                        conn.request("GET", path)
                        resp = conn.getresponse()
                        raw = resp.read()
                        t1 = time.perf_counter()
                    finally:
                        conn.close()
                    assert resp.status == 200, raw[:200]
                    json.loads(raw)
                    answer.append(t1 - t)
                    decode.append(time.perf_counter() - t1)
                    size = len(raw)
                out["endpoint"] = summary_ms(answer)
                out["client_json_decode"] = summary_ms(decode)
                out["endpoint_with_decode_median_ms"] = round(
                    statistics.median(a + b for a, b in zip(answer, decode, strict=True)) * 1000, 2
                )
                out["measured"] = (
                    f"GET {path.replace(str(pid), '{pid}')} through the daemon, "
                    "request sent to last byte received"
                )
                out["response_bytes"] = size
            else:
                out["endpoint_answer"] = body if isinstance(body, dict) else str(body)[:200]
                fn = fallback.replace("_in_process", "")
                mod = "criud.dump.inspect" if fn == "inspect_tree" else "criud.dump.fds"
                out["measured"] = (
                    f"{mod}.{fn}(pid) in-process, as GET /v1/processes/{{pid}} answered {status}"
                )
        key = "endpoint" if status == 200 else fallback
        out["headline_ms"] = out[key]["median_ms"]
        out["headline_p90_ms"] = out[key]["p90_ms"]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        wait_gone(pid, 30, strict=False)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)  # its own session and group
        TRACK.done(pid)
        shutil.rmtree(root, ignore_errors=True)
    return out


# -- environment and main --------------------------------------------------------


def loadavg() -> list[float]:
    """1, 5 and 15 minute load averages: how busy the machine was (we run on it too)."""
    with contextlib.suppress(OSError):
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    return []


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def criu_version(path: str) -> str | None:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10)
    except OSError:
        return None
    return parse_version(out.stdout)


def fs_of(path: Path) -> str:
    return "tmpfs" if kdat.is_tmpfs(path) else "not tmpfs"


def default_criu(version: str, build: bool) -> str | None:
    """A criu built with the default RUNDIR (/run), as a stock install has."""
    path = Path(f"/var/cache/criud/criu-{version}-default-rundir")
    if path.exists():
        return str(path)
    if not build:
        return None
    log(f"building a default-RUNDIR criu {version} for the raw side (one-time, ~30 s)")
    rc = subprocess.run(["bash", str(HERE / "build-default-criu"), str(path)]).returncode
    return str(path) if rc == 0 and path.exists() else None


def git_commit() -> str | None:
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        return subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    return None


def criud_source() -> dict[str, Any]:
    """Which criud code runs: the work tree (and whether it differs from HEAD) or elsewhere.

    PYTHONPATH=<dir with criud/{daemon,api,dump,restore}> benchmarks another
    checkout (e.g. `git archive HEAD`) without touching the venv; the daemon
    inherits it.
    """
    import criud.daemon

    src = Path(criud.daemon.__file__).resolve().parent.parent
    out: dict[str, Any] = {"path": str(src), "work_tree": src == REPO}
    if src == REPO:
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            st = subprocess.run(
                ["git", "-C", str(REPO), "status", "--porcelain", "--", *CODE_DIRS],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            out["uncommitted_changes"] = bool(st.strip())
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer reps and sizes: < 2 minutes")
    p.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    p.add_argument("--criu", default=shutil.which("criu") or "/usr/local/sbin/criu")
    p.add_argument(
        "--criu-default",
        default=None,
        help="default-RUNDIR criu for the raw side "
        "(default: /var/cache/criud/criu-<v>-default-rundir, built if missing)",
    )
    p.add_argument("--no-build", action="store_true", help="never build the default criu")
    p.add_argument("--out-dir", type=Path, default=HERE / "results")
    p.add_argument(
        "--docs",
        choices=["auto", "yes", "no"],
        default="auto",
        help="rewrite docs/benchmarks.md (generated part) and docs/benchmarks.png "
        "(auto: after a full run of every section)",
    )
    args = p.parse_args()
    if os.geteuid() != 0:
        print("bench: must run as root (criu needs it)", file=sys.stderr)
        return 1
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in only if s not in SECTIONS]
    if bad:
        p.error(f"unknown section(s) {bad}; choose from {SECTIONS}")
    profile = "quick" if args.quick else "full"
    cfg = PROFILES[profile]
    started = time.perf_counter()

    # The daemon will do this itself once wired in; until then, and to be
    # sure, the harness mounts criu's kdat tmpfs before any daemon starts.
    kdat_ok = kdat.ensure_kdat_tmpfs(kdat.KDAT_DIR)
    version = criu_version(args.criu) or "unknown"
    criu_default = args.criu_default or default_criu(version, build=not args.no_build)
    env: dict[str, Any] = {"criu": args.criu, "criu_default": criu_default}
    now = datetime.datetime.now(datetime.UTC)
    meta = {
        "date": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "hostname": socket.gethostname(),
        "cpu_model": cpu_model(),
        "cpus": os.cpu_count(),
        "mem_total_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "criu_version": version,
        "criu": args.criu,
        "criu_kdat_dir": str(kdat.KDAT_DIR) if kdat.built_with_kdat_dir(args.criu) else None,
        "criu_default": criu_default,
        "kdat_cache_usable": kdat_ok,
        "run_fs": fs_of(Path("/run")),
        "loadavg_start": loadavg(),
        "criud_commit": git_commit(),
        "criud_source": criud_source(),
        "profile": profile,
        "sections": only,
    }
    log(f"{profile} run of {', '.join(only)}; criu {version} at {args.criu}; kdat cache {kdat_ok}")
    if {"memory", "concurrency"} & set(only):
        meta["warm_memory_s"] = warm_memory(cfg["warm_gib"])
        log(f"touched {cfg['warm_gib']} GiB of tmpfs pages first: {meta['warm_memory_s']} s")
    results: dict[str, Any] = {"meta": meta}
    base = Path(tempfile.mkdtemp(prefix="criud-bench-", dir=TMPFS_BASE))
    fns = {
        "small": bench_small,
        "memory": bench_memory,
        "concurrency": bench_concurrency,
        "api": bench_api,
        "fd": bench_fd,
        "introspection": bench_introspection,
        "archive": archive_bench.bench_archive,
        "observability": bench_observability,
        "lazy": lazy_bench.bench_lazy,
        "migration": migration_bench.bench_section,
        "scaling": scaling_bench.bench_section,
    }
    try:
        for name in only:
            log(f"section {name}")
            t0 = time.perf_counter()
            results[name] = fns[name](cfg, env, base)
            results[name]["section_s"] = round(time.perf_counter() - t0, 1)
            log(f"section {name} done in {results[name]['section_s']} s")
    finally:
        TRACK.kill_all()
        shutil.rmtree(base, ignore_errors=True)
    meta["duration_s"] = round(time.perf_counter() - started, 1)
    meta["loadavg_end"] = loadavg()
    results["targets"] = report.targets(results)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    suffix = "-quick" if args.quick else ""
    out = args.out_dir / f"{now.strftime('%Y-%m-%d')}-{meta['hostname']}{suffix}.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    md = report.markdown(results)
    print(md)
    log(f"wrote {out.relative_to(REPO) if out.is_relative_to(REPO) else out}")
    full = not args.quick and set(only) == set(SECTIONS)
    if args.docs == "yes" or (args.docs == "auto" and full):
        report.update_docs(md, REPO / "docs" / "benchmarks.md", out)
        if "memory" in results:
            report.chart(results, REPO / "docs" / "benchmarks.png")
        if "scaling" in results:
            scaling_bench.chart(results["scaling"], REPO / "docs" / "benchmarks-scaling.png")
        log("updated docs/benchmarks.md and docs/benchmarks.png")
    log(f"total {meta['duration_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
