"""Soak: many checkpoint/restore cycles of distinct processes, 8 clients at once (issue: soak).

Each cycle starts a fresh process, checkpoints it (criu kills it), reaps it,
restores it, checks that it runs, kills it through the API, waits until the
daemon has seen it exit, and deletes the checkpoint.  One cycle in four uses
a Python process writing to a pipe, so the restore also hands a new pipe over
the fd socket and the cycle reads the restored process's next line from it.

No cycle may fail, and afterwards the daemon's fd count must be back to what
it was after the warm-up, and its RSS within 5% of it.

`make test` runs the short form (CRIUD_SOAK_CYCLES, default 16); `make soak`
runs 200 cycles and prints the figures (also written as JSON to the test's
tmp dir, and to $CRIUD_SOAK_REPORT when set).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import signal
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from criud.api.client import Client
from tests.integration.helpers import (
    Daemon,
    Procs,
    counter,
    pid_gone,
    proc_state,
    read_line,
    running_daemon,
    wait_for,
)

CYCLES = int(os.environ.get("CRIUD_SOAK_CYCLES", "16"))
CLIENTS = 8
# Cycles run before the baseline is taken: Python allocates on first use
# (thread pools, caches, the store), and that is not a leak.
WARMUP = CLIENTS
RSS_TOLERANCE = 0.05

# Writes "tick N" to stdout every 20 ms.
TICKER = counter("tick", 0.02)


def vm_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


@pytest.fixture
def soak_daemon() -> Iterator[Daemon]:
    """A daemon of the soak's own, so its fd count and RSS are the soak's alone."""
    with running_daemon() as d:
        yield d


def _wait_exited(c: Client, restore_id: str) -> dict[str, Any]:
    def exited() -> dict[str, Any] | None:
        r = c.get_restore(restore_id)
        return r if r["state"] == "exited" else None

    return wait_for(exited, 20, what=f"restore {restore_id} to be seen as exited")


def _sleep_cycle(c: Client, procs: Procs, i: int) -> None:
    p = procs.spawn(["sleep", "1000"])
    ck = c.checkpoint(p.pid, name=f"soak-{i}", labels={"soak": "1"})
    assert ck["state"] == "done" and ck["external"] == [], ck
    assert p.wait(timeout=20) == -signal.SIGKILL
    r = c.restore(ck["id"])
    procs.adopt(r["pid"])
    assert r["state"] == "running" and r["pid"] == p.pid, r
    assert proc_state(r["pid"]) in ("S", "R")
    with open(f"/proc/{r['pid']}/cmdline", "rb") as f:
        assert f.read().split(b"\0")[:2] == [b"sleep", b"1000"]
    _finish(c, ck, r)


def _pipe_cycle(c: Client, procs: Procs, i: int) -> None:
    r_old, w_old = os.pipe()
    r_new = w_new = -1
    try:
        p = procs.python(TICKER, stdout=w_old)
        os.close(w_old)
        w_old = -1
        assert read_line(r_old, 20).startswith(b"tick ")
        ck = c.checkpoint(p.pid, name=f"soak-{i}", labels={"soak": "1"})
        key = f"pipe:[{os.fstat(r_old).st_ino}]"
        assert ck["external"] == [key], ck["external"]
        assert p.wait(timeout=20) == -signal.SIGKILL
        r_new, w_new = os.pipe()
        r = c.restore(ck["id"], fds={key: w_new})
        procs.adopt(r["pid"])
        os.close(w_new)
        w_new = -1
        assert r["state"] == "running" and r["pid"] == p.pid, r
        # The restored process carries on writing, into the new pipe.
        assert read_line(r_new, 20).startswith(b"tick")
        _finish(c, ck, r)
    finally:
        for fd in (r_old, w_old, r_new, w_new):
            if fd >= 0:
                os.close(fd)


def _finish(c: Client, ck: dict[str, Any], r: dict[str, Any]) -> None:
    assert c.get_restore(r["id"])["state"] == "running"
    c.signal(r["id"], "SIGKILL")
    done = _wait_exited(c, r["id"])
    assert done["exit_signal"] == signal.SIGKILL and done["exit_code"] is None, done
    wait_for(lambda: pid_gone(r["pid"]), 20, what=f"restored pid {r['pid']} to be reaped")
    c.delete(ck["id"])


def _cycle(d: Daemon, procs: Procs, i: int) -> tuple[float, str | None]:
    """Run cycle i; return (seconds, None) or (seconds, what went wrong)."""
    c = Client(str(d.socket), str(d.fd_socket), timeout=120)
    t0 = time.monotonic()
    try:
        (_pipe_cycle if i % 4 == 3 else _sleep_cycle)(c, procs, i)
    except Exception:
        return time.monotonic() - t0, f"cycle {i}:\n{traceback.format_exc()}"
    return time.monotonic() - t0, None


def _run(d: Daemon, procs: Procs, first: int, count: int) -> list[tuple[float, str | None]]:
    with concurrent.futures.ThreadPoolExecutor(max_workers=CLIENTS) as ex:
        return list(ex.map(lambda i: _cycle(d, procs, i), range(first, first + count)))


def _quiet_fd_count(d: Daemon, settle_s: float = 1.0, timeout: float = 15) -> int:
    """The daemon's fd count once it has held still for settle_s."""
    seen = [d.fd_count(), time.monotonic()]

    def still() -> bool:
        n = d.fd_count()
        if n != seen[0]:
            seen[:] = [n, time.monotonic()]
        return time.monotonic() - seen[1] >= settle_s

    wait_for(still, timeout, what="the daemon's fd count to hold still")
    return int(seen[0])


def test_soak_checkpoint_restore_cycles(soak_daemon: Daemon, procs: Procs, tmp_path: Path) -> None:
    d = soak_daemon
    warm = _run(d, procs, 0, WARMUP)
    assert not [e for _, e in warm if e], "\n".join(e for _, e in warm if e)
    fd_before = _quiet_fd_count(d)
    rss_before = vm_rss_kib(d.pid)

    t0 = time.monotonic()
    results = _run(d, procs, WARMUP, CYCLES)
    elapsed = time.monotonic() - t0
    failures = [e for _, e in results if e]

    with contextlib.suppress(AssertionError):
        wait_for(lambda: d.fd_count() == fd_before, 15, what="fd count back to baseline")
    fd_after = _quiet_fd_count(d)
    rss_after = vm_rss_kib(d.pid)
    durations = sorted(s for s, _ in results)
    figures = {
        "cycles": CYCLES,
        "clients": CLIENTS,
        "warmup_cycles": WARMUP,
        "failures": len(failures),
        "seconds": round(elapsed, 2),
        "cycles_per_s": round(CYCLES / elapsed, 2),
        "cycle_s_median": round(durations[len(durations) // 2], 3),
        "cycle_s_max": round(durations[-1], 3),
        "fd_before": fd_before,
        "fd_after": fd_after,
        "rss_kib_before": rss_before,
        "rss_kib_after": rss_after,
        "rss_change_pct": round(100 * (rss_after - rss_before) / rss_before, 2),
    }
    report = json.dumps(figures, indent=2)
    (tmp_path / "soak.json").write_text(report + "\n")
    if out := os.environ.get("CRIUD_SOAK_REPORT"):
        Path(out).write_text(report + "\n")
    print(
        f"\nsoak: {CYCLES} cycles, {CLIENTS} clients, {elapsed:.1f} s "
        f"({figures['cycles_per_s']} cycles/s, median {figures['cycle_s_median']} s); "
        f"failures {len(failures)}; fds {fd_before} -> {fd_after}; "
        f"RSS {rss_before} -> {rss_after} KiB ({figures['rss_change_pct']:+}%)\n{report}"
    )

    assert not failures, "\n".join(failures[:5]) + f"\n\ndaemon log:\n{d.log()}"
    assert d.client.checkpoints() == []
    assert all(r["state"] == "exited" for r in d.client.restores())
    assert d.client.fd_handles() == []
    assert fd_after == fd_before, figures
    assert rss_after <= rss_before * (1 + RSS_TOLERANCE), figures
    assert d.client.request("GET", "/healthz")[1] == {"status": "ok"}
    assert "Traceback" not in d.log_path.read_text(errors="replace")
