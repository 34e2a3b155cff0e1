"""The warm criu pool's lifecycle, against the real daemon and real criu.

A worker killed mid-request, the daemon SIGKILLed (no worker outlives it),
16 requests at once against a pool of 2, and the fds a worker holds.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import threading
import time
from pathlib import Path
from typing import Any

from criud.api.client import CriudClientError
from criud.daemon.criu import HANDLE_WORKERS_MAX
from criud.daemon.procutil import children
from tests.integration.helpers import (
    Daemon,
    Procs,
    fd_table,
    pid_gone,
    pool_workers,
    proc_state,
    read_line,
    start_hello,
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
            # ...and the workers started after that hold none of it, but
            # for the handle's own worker (issue 13), which holds exactly
            # its handle's fds.
            wait_for(lambda: len(pool_workers(d.pid)) >= 3, what="refill")
            mine = wait_for(lambda: _holders(d.pid, r), what="the handle's worker")
            assert len(mine) == 1
            pipe = f"pipe:[{os.fstat(r).st_ino}]"
            table = _settled_table(mine[0])
            rest = sorted(t for n, t in table.items() if n > 2)
            assert rest[:2] == [pipe, pipe] and len(rest) == 3, table
            assert rest[2].startswith("socket:["), table
            for pid in pool_workers(d.pid):
                if pid in mine:
                    continue
                table = _settled_table(pid)
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


# -- workers started for fd handles (issue 13: restores with inherit fds) ----------


def _holders(daemon_pid: int, fd: int) -> list[int]:
    """The daemon's criu workers whose fd table holds the pipe behind our fd."""
    pipe = f"pipe:[{os.fstat(fd).st_ino}]"
    out = []
    for pid in pool_workers(daemon_pid):
        with contextlib.suppress(OSError):
            if pipe in fd_table(pid).values():
                out.append(pid)
    return out


def _settled_table(pid: int) -> dict[int, str]:
    """A worker's fd table once criu is past its start (the loader opens libraries as it goes)."""

    def table() -> dict[int, str] | None:
        t = fd_table(pid)
        return (
            t if all(v.startswith(("pipe:", "socket:", "/dev/null")) for v in t.values()) else None
        )

    return wait_for(table, what=f"worker {pid} to settle")


def _dead(pid: int) -> bool:
    return pid_gone(pid) or proc_state(pid) in ("Z", None)


def _eof(fd: int, timeout: float = 10.0) -> bool:
    """Whether reading fd (a pipe's read end) meets EOF within timeout: no writer is left."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if ready and os.read(fd, 4096) == b"":
            return True
    return False


def test_handle_workers_hold_exactly_their_fds() -> None:
    with temp_root() as root:
        d = Daemon(root).start()
        pipes = [os.pipe() for _ in range(4)]
        try:
            (r1, w1), (r2, w2), (r3, _), (_, w4) = pipes
            a = d.client.send_fds([w1])
            b = d.client.send_fds([w2, r3])
            wa = wait_for(lambda: _holders(d.pid, w1), what="handle a's worker")
            wb = wait_for(lambda: _holders(d.pid, w2), what="handle b's worker")
            assert len(wa) == 1 and len(wb) == 1 and wa != wb
            ino = {f"pipe:[{os.fstat(fd).st_ino}]" for fd in (r1, r2, r3)}

            def held(pid: int) -> list[str]:
                table = _settled_table(pid)
                assert {table[0], table[1], table[2]} == {"/dev/null"}, table
                return sorted(t for n, t in table.items() if n > 2)

            ta, tb = held(wa[0]), held(wb[0])
            p1, p2, p3 = (f"pipe:[{os.fstat(fd).st_ino}]" for fd in (r1, r2, r3))
            assert ta[:-1] == [p1] and ta[-1].startswith("socket:["), ta
            assert tb[:-1] == sorted([p2, p3]) and tb[-1].startswith("socket:["), tb
            # The pool's own workers hold none of a handle's fds.
            for pid in pool_workers(d.pid):
                if pid not in (wa[0], wb[0]):
                    with contextlib.suppress(OSError):
                        assert not ino & set(fd_table(pid).values()), pid
            # Deleting a handle kills its worker: nothing holds w1 but us.
            d.client.delete_fd_handle(a["handle"])
            wait_for(lambda: pid_gone(wa[0]), what="handle a's worker gone")
            os.close(w1)
            assert _eof(r1), "someone still holds the deleted handle's fd"
            # An expired handle's worker goes with it.
            c = d.client.send_fds([w4], ttl_s=0.5)
            wc = wait_for(lambda: _holders(d.pid, w4), what="handle c's worker")
            wait_for(lambda: pid_gone(wc[0]), what="expired handle's worker gone")
            assert c["handle"] not in {h["handle"] for h in d.client.fd_handles()}
            assert b["handle"] in {h["handle"] for h in d.client.fd_handles()}
        finally:
            assert d.stop() == 0
            for r, w in pipes:
                for fd in (r, w):
                    with contextlib.suppress(OSError):
                        os.close(fd)


def test_handle_workers_are_bounded() -> None:
    with temp_root() as root:
        d = Daemon(root).start()
        r, w = os.pipe()
        try:
            for _ in range(20):
                d.client.send_fds([w])
            time.sleep(1.0)
            # One worker per handle up to the cap, never one per handle sent.
            holders = wait_for(lambda: _holders(d.pid, w), what="handle workers")
            assert 1 <= len(holders) <= HANDLE_WORKERS_MAX, holders
        finally:
            assert d.stop() == 0
            os.close(r)
            os.close(w)


def test_daemon_sigkill_leaves_no_handle_worker() -> None:
    with temp_root() as root:
        d = Daemon(root).start()
        r, w = os.pipe()
        try:
            d.client.send_fds([w])
            held = wait_for(lambda: _holders(d.pid, w), what="the handle's worker")
            os.close(w)
        finally:
            d.kill()
        try:
            # Dead: gone, or a zombie where no init reaps (a pid namespace
            # of the test runner's own); a zombie holds no fds.
            for pid in held:
                wait_for(lambda pid=pid: _dead(pid), timeout=10, what=f"worker {pid} dead")
            assert _eof(r), "a worker outlived the daemon with the handle's fd"
        finally:
            os.close(r)


# Writes its count to stdout, with 256 MiB of touched pages: a restore long
# enough to be hit.
BIG_HELLO = (
    "import sys, time\nb = b'x' * (256 << 20)\ni = 0\nwhile True:\n"
    "    sys.stdout.write(f'hello {i}\\n'); sys.stdout.flush(); i += 1; time.sleep(0.05)\n"
)


def test_handle_worker_killed_mid_restore(procs: Procs) -> None:
    with temp_root() as root:
        d = Daemon(root, args=["--log-level", "debug"]).start()
        new_r, new_w = os.pipe()
        try:
            p, old_r = start_hello(procs, BIG_HELLO)
            read_line(old_r)
            ck = d.client.checkpoint(p.pid)
            p.wait(timeout=10)
            os.close(old_r)
            h = d.client.send_fds([new_w])
            worker = wait_for(lambda: _holders(d.pid, new_w), what="the handle's worker")[0]
            mapping = [{"key": ck["external"][0], "handle": h["handle"], "index": 0}]
            res: dict[str, Any] = {}

            def restore() -> None:
                try:
                    res["ok"] = d.client.restore(ck["id"], inherit_fds=mapping)
                except CriudClientError as e:
                    res["err"] = e

            t = threading.Thread(target=restore)
            t.start()
            # The worker forks the tree's root (its old pid) early, then fills its memory.
            wait_for(lambda: not pid_gone(ck["pid"]), timeout=30, interval=0.002, what="fork")
            os.kill(worker, signal.SIGKILL)
            t.join(60)
            assert not t.is_alive()
            if "ok" in res:
                procs.adopt(res["ok"]["pid"])
            err = res.get("err")
            assert isinstance(err, CriudClientError), res
            assert 400 <= err.status < 600
            assert err.problem.get("code") not in (None, "internal_error"), err.problem
            # Nothing half restored is left, and the handle is still usable:
            # the next restore (on the CLI: its worker is spent) goes on counting.
            wait_for(lambda: pid_gone(ck["pid"]), timeout=15, what="half-restored tree gone")
            assert h["handle"] in {x["handle"] for x in d.client.fd_handles()}
            r = d.client.restore(ck["id"], inherit_fds=mapping)
            procs.adopt(r["pid"])
            os.close(new_w)
            assert read_line(new_r).startswith(b"hello ")
            log = d.log_path.read_text(errors="replace")
            assert "restore: fd handle's own warm worker" in log
        finally:
            assert d.stop() == 0
            for fd in (new_r, new_w):
                with contextlib.suppress(OSError):
                    os.close(fd)


def _imported(log: str) -> set[str]:
    """The modules an interpreter run with PYTHONPROFILEIMPORTTIME=1 logged as imported."""
    return {line.rsplit("|", 1)[1].strip() for line in log.splitlines() if "import time:" in line}


def test_idle_daemon_holds_no_rpc_classes_until_criu_runs(procs: Procs) -> None:
    # criud.daemon.criu_msg (protobuf, 2.7 MiB) loads at the first warm run,
    # and uvicorn's command line never (daemon/memory.py): an idle daemon
    # with a warm pool holds neither, and the first dump still runs warm.
    with temp_root() as root:
        d = Daemon(root, extra_env={"PYTHONPROFILEIMPORTTIME": "1"}).start()
        try:
            warm = set(_two_workers(d.pid))
            d.client.checkpoints()
            idle = _imported(d.log_path.read_text(errors="replace"))
            assert "criud.daemon.criu_rpc" in idle, "the probe saw no pool start"
            assert not idle & {"criud.daemon.criu_msg", "google.protobuf", "uvicorn.main"}
            p = procs.spawn(["sleep", "60"])
            assert d.client.checkpoint(p.pid)["state"] == "done"
            after = _imported(d.log_path.read_text(errors="replace"))
            assert {"criud.daemon.criu_msg", "google.protobuf"} <= after
            assert "uvicorn.main" not in after
            # A worker served it: the pool's, gone once it answered.
            wait_for(lambda: any(pid_gone(w) for w in warm), timeout=10, what="a worker used")
        finally:
            d.stop()
