"""The warm criu pool's lifecycle, against the real daemon and real criu.

A worker killed mid-request, the daemon SIGKILLed (no worker outlives it),
16 requests at once against a pool of 2, and the fds a worker holds.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from criud.api.client import CriudClientError
from criud.daemon.procutil import children
from tests.integration.helpers import (
    Daemon,
    Procs,
    fd_table,
    pid_gone,
    pool_workers,
    proc_state,
    temp_root,
    wait_for,
)

pytestmark = __import__("pytest").mark.criu


def _two_workers(daemon_pid: int) -> list[int]:
    """Wait for the pool's 2 idle workers; their pids."""
    return wait_for(
        lambda: len(pool_workers(daemon_pid)) >= 2 and pool_workers(daemon_pid), what="2 workers"
    )


def _tracer(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("TracerPid:"):
                return int(line.split()[1])
    return 0


def test_worker_killed_mid_dump_leaves_target_running(procs: Procs) -> None:
    with temp_root() as root:
        d = Daemon(root).start()
        try:
            warm = wait_for(
                lambda: len(pool_workers(d.pid)) >= 2 and pool_workers(d.pid), what="2 workers"
            )
            # 256 MiB of touched pages: the dump runs long enough to be hit.
            p = procs.python(
                "import sys, time\nb = b'x' * (256 << 20)\nsys.stdout.write('ok\\n')\n"
                "sys.stdout.flush()\ntime.sleep(1000)\n",
                stdout=-1,
            )
            assert p.stdout is not None and p.stdout.readline() == b"ok\n"
            res: dict[str, Any] = {}

            def dump() -> None:
                try:
                    res["ok"] = d.client.checkpoint(p.pid)
                except CriudClientError as e:
                    res["err"] = e

            t = threading.Thread(target=dump)
            t.start()
            # criu seizes the target with ptrace: its tracer is the worker.
            worker = wait_for(lambda: _tracer(p.pid), timeout=30, interval=0.002, what="seize")
            assert worker in warm, "the dump should run on a warm worker"
            os.kill(worker, signal.SIGKILL)
            t.join(60)
            assert not t.is_alive()
            err = res.get("err")
            assert isinstance(err, CriudClientError), res
            assert 400 <= err.status < 600
            assert err.problem.get("code") not in (None, "internal_error"), err.problem
            assert "SIGKILL" in err.problem.get("detail", ""), err.problem
            # The target is left running: not stopped, not traced.
            wait_for(lambda: _tracer(p.pid) == 0, what="untraced")
            assert p.poll() is None
            assert proc_state(p.pid) in ("S", "R")
            # The pool is back to strength, and the next dump works.
            wait_for(lambda: len(pool_workers(d.pid)) >= 2, what="refill")
            q = procs.spawn(["sleep", "1000"])
            d.client.checkpoint(q.pid)
        finally:
            assert d.stop() == 0


def test_daemon_sigkill_leaves_no_worker() -> None:
    with temp_root() as root:
        d = Daemon(root).start()
        try:
            warm = wait_for(
                lambda: len(pool_workers(d.pid)) >= 2 and pool_workers(d.pid), what="workers"
            )
        finally:
            d.kill()
        # pdeathsig: each worker is killed with the daemon; reaped by init.
        for pid in warm:
            wait_for(lambda pid=pid: pid_gone(pid), timeout=10, what=f"worker {pid} gone")


def test_sixteen_at_once_on_a_pool_of_two(procs: Procs) -> None:
    with temp_root() as root:
        d = Daemon(root, args=["--criu-pool", "2", "--log-level", "debug"]).start()
        try:
            wait_for(lambda: len(pool_workers(d.pid)) >= 2, what="2 workers")
            targets = [procs.spawn(["sleep", "1000"]) for _ in range(16)]
            results: list[Any] = [None] * 16

            def dump(i: int) -> None:
                try:
                    results[i] = d.client.checkpoint(targets[i].pid)
                except CriudClientError as e:
                    results[i] = e

            threads = [threading.Thread(target=dump, args=(i,)) for i in range(16)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            assert all(isinstance(r, dict) and r["state"] == "done" for r in results), results
            for p in targets:
                p.wait(timeout=10)

            def restore(i: int) -> None:
                try:
                    results[i] = d.client.restore(results[i]["id"])
                    procs.adopt(results[i]["pid"])
                except CriudClientError as e:
                    results[i] = e

            ckpts = list(results)
            threads = [threading.Thread(target=restore, args=(i,)) for i in range(16)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            assert all(isinstance(r, dict) and r["state"] == "running" for r in results), (
                results,
                ckpts,
            )
            # Both paths served: warm workers, then the CLI once none was idle.
            assert "no idle warm worker" in d.log_path.read_text(errors="replace")
        finally:
            assert d.stop() == 0


def test_workers_hold_no_daemon_fds(procs: Procs) -> None:
    with temp_root() as root:
        d = Daemon(root).start()
        try:
            # The daemon holds a client's fds, a connection, its store...
            r, w = os.pipe()
            h = d.client.send_fds([r, w])
            p = procs.spawn(["sleep", "1000"])
            d.client.checkpoint(p.pid)
            # ...and the workers started after that hold none of it.
            wait_for(lambda: len(pool_workers(d.pid)) >= 2, what="refill")
            for pid in pool_workers(d.pid):
                table = fd_table(pid)
                sock = {n: t for n, t in table.items() if n > 2}
                assert {table[0], table[1], table[2]} == {"/dev/null"}, table
                assert len(sock) == 1 and next(iter(sock.values())).startswith("socket:["), table
            # A worker killed while idle is dropped, not handed a request.
            idle = pool_workers(d.pid)
            for pid in idle:
                os.kill(pid, signal.SIGKILL)
            q = procs.spawn(["sleep", "1000"])
            assert d.client.checkpoint(q.pid)["state"] == "done"
            assert h["handle"] in {x["handle"] for x in d.client.fd_handles()}
            os.close(r)
            os.close(w)
        finally:
            assert d.stop() == 0


# A worker that never answers: the request's timeout applies as to the CLI.
SILENT_SWRK = """#!/bin/sh
[ "$1" = swrk ] && exec sleep 600
exec {criu} "$@"
"""


def test_silent_worker_times_out(procs: Procs) -> None:
    from tests.integration.helpers import CRIU

    with temp_root() as root:
        wrapper = Path(root) / "criu-silent"
        wrapper.write_text(SILENT_SWRK.format(criu=CRIU))
        wrapper.chmod(0o755)
        d = Daemon(root, criu=str(wrapper), args=["--criu-timeout", "2"]).start()
        try:
            # The workers are `sleep`s here, not `criu swrk`.
            wait_for(lambda: len(children(d.pid)) >= 2, what="2 workers")
            p = procs.spawn(["sleep", "1000"])
            t0 = time.monotonic()
            try:
                d.client.checkpoint(p.pid)
                raise AssertionError("the checkpoint should time out")
            except CriudClientError as e:
                assert e.status == 504 and e.code == "criu_timeout", e.problem
            assert 2 <= time.monotonic() - t0 < 30
            assert p.poll() is None and _tracer(p.pid) == 0
        finally:
            assert d.stop() == 0


def test_answered_dump_worker_is_reaped_by_its_waiter(procs: Procs) -> None:
    # A warm dump returns on criu's answer, before its worker has exited
    # (issue 13).  The worker must still be reaped by asyncio, never by
    # the orphan sweep (which would leave asyncio an unknown child), and
    # leave no zombie.
    with temp_root() as root:
        d = Daemon(root).start()
        try:
            used: set[int] = set()
            for _ in range(4):
                idle = set(_two_workers(d.pid))
                p = procs.spawn(["sleep", "1000"])
                ck = d.client.checkpoint(p.pid, leave_running=True)
                assert ck["state"] == "done"
                d.client.delete(ck["id"])
                # Served warm: one of the idle workers did it and is gone.
                wait_for(lambda: idle - set(pool_workers(d.pid)), what="a worker taken")  # noqa: B023
                used |= idle - set(pool_workers(d.pid))

            def settled() -> bool:
                kids = children(d.pid)
                zombies = [k for k in kids if proc_state(k) == "Z"]
                return not zombies and len(pool_workers(d.pid)) == 2 and len(kids) == 2

            wait_for(settled, what="the answered workers reaped, the pool refilled")
            assert len(used) == 4 and all(pid_gone(pid) for pid in used)
            log = d.log()
            assert "Unknown child process" not in log, log
        finally:
            assert d.stop() == 0
