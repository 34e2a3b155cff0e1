"""Races, crashes, shutdown and injected criu faults: never lose a process or a checkpoint."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from criud.api.client import CriudClientError
from criud.daemon.procutil import children
from tests.integration.helpers import (
    CRIU,
    Daemon,
    Procs,
    pid_gone,
    proc_state,
    small_state_dir,
    start_hello,
    temp_root,
    wait_for,
)

FILL = r"""
import os, sys, time
buf = bytearray(os.urandom(int(sys.argv[1]) << 20))
open(sys.argv[2], "w").close()
while True:
    time.sleep(3600)
"""


def fill(procs: Procs, mib: int, tmp: Path) -> subprocess.Popen[bytes]:
    ready = tmp / f"ready-{mib}-{len(procs.popens)}"
    p = procs.python(FILL, str(mib), str(ready))
    wait_for(ready.exists, 120, what=f"{mib} MiB to be filled")
    return p


def running_untraced(pid: int) -> bool:
    """Running or sleeping, neither stopped nor traced (criu has let go)."""
    if proc_state(pid) not in ("S", "R"):
        return False
    with open(f"/proc/{pid}/status") as f:
        return "TracerPid:\t0\n" in f.read()


def call(fn: Any, *a: Any, **kw: Any) -> Any:
    try:
        return fn(*a, **kw)
    except (CriudClientError, OSError) as e:  # OSError: the daemon went away
        return e


def test_second_operation_on_same_pid_is_busy(daemon: Daemon, procs: Procs, tmp_path: Path) -> None:
    p = fill(procs, 256, tmp_path)
    with concurrent.futures.ThreadPoolExecutor(2) as ex:
        futs = [
            ex.submit(call, daemon.client.checkpoint, p.pid, leave_running=True) for _ in range(2)
        ]
        results = [f.result(timeout=120) for f in futs]
    errors = [r for r in results if isinstance(r, CriudClientError)]
    oks = [r for r in results if isinstance(r, dict)]
    assert len(oks) == 1 and oks[0]["state"] == "done"
    assert len(errors) == 1 and errors[0].status == 409 and errors[0].code == "busy"
    assert running_untraced(p.pid)


def test_independent_checkpoints_run_in_parallel(
    daemon: Daemon, procs: Procs, tmp_path: Path
) -> None:
    a, b = fill(procs, 256, tmp_path), fill(procs, 256, tmp_path)
    with concurrent.futures.ThreadPoolExecutor(2) as ex:
        fa = ex.submit(daemon.client.checkpoint, a.pid, leave_running=True)
        fb = ex.submit(daemon.client.checkpoint, b.pid, leave_running=True)
        ca, cb = fa.result(timeout=120), fb.result(timeout=120)
    # Each started before the other finished: neither waited behind the other.
    assert ca["created_at"] < cb["finished_at"] and cb["created_at"] < ca["finished_at"]


def test_restore_while_pids_taken_is_pid_in_use(daemon: Daemon, procs: Procs) -> None:
    p = procs.spawn(["sleep", "1000"])
    ck = daemon.client.checkpoint(p.pid, leave_running=True)
    with pytest.raises(CriudClientError) as e:
        daemon.client.restore(ck["id"])
    assert e.value.status == 409 and e.value.code == "pid_in_use"
    assert e.value.problem["pids"] == [p.pid]
    assert running_untraced(p.pid)
    # Refused before criu ran: no restore was recorded for this checkpoint.
    assert all(r["checkpoint"] != ck["id"] for r in daemon.client.restores())


def test_sigkill_mid_dump_leaves_target_running(procs: Procs, tmp_path: Path) -> None:
    p = fill(procs, 1024, tmp_path)
    with temp_root() as root:
        d = Daemon(root).start()
        ckdir = d.state_dir / "checkpoints"
        with concurrent.futures.ThreadPoolExecutor(1) as ex:
            fut = ex.submit(call, d.client.checkpoint, p.pid, name="interrupted")
            # Wait until criu is writing pages, then kill the daemon outright.
            wait_for(
                lambda: any(
                    f.name.startswith("pages-") for t in ckdir.glob(".tmp-*") for f in t.iterdir()
                ),
                60,
                interval=0.01,
                what="criu to start writing pages",
            )
            d.kill()
            assert isinstance(fut.result(timeout=60), OSError)  # its connection is gone
        # criu died with the daemon (pdeathsig) and let go of the target.
        wait_for(lambda: running_untraced(p.pid), 15, what="target to run again, untraced")
        assert p.poll() is None
        d2 = Daemon(root).start()
        try:
            cks = d2.client.checkpoints()
            assert [c["state"] for c in cks] == ["interrupted"]
            assert cks[0]["name"] is None
            assert not list(ckdir.glob(".tmp-*"))
            # The name is free and the same process checkpoints fine now.
            ck = d2.client.checkpoint(p.pid, name="interrupted", leave_running=True)
            assert ck["state"] == "done"
        finally:
            assert d2.stop() == 0


def test_sigterm_lets_a_running_dump_finish(procs: Procs, tmp_path: Path) -> None:
    p = fill(procs, 512, tmp_path)
    with temp_root() as root:
        d = Daemon(root).start()
        ckdir = d.state_dir / "checkpoints"
        with concurrent.futures.ThreadPoolExecutor(1) as ex:
            fut = ex.submit(call, d.client.checkpoint, p.pid, leave_running=True)
            wait_for(
                lambda: list(ckdir.glob(".tmp-*")), 30, interval=0.01, what="the dump to start"
            )
            assert d.proc is not None
            d.proc.send_signal(signal.SIGTERM)
            result = fut.result(timeout=120)
        assert isinstance(result, dict), result
        assert result["state"] == "done"
        assert d.proc.wait(timeout=60) == 0
        assert not d.socket.exists()
        assert running_untraced(p.pid)


def _fault_daemon(root: Path, fault: int | None) -> Daemon:
    env = {"CRIU_FAULT": str(fault)} if fault is not None else {}
    return Daemon(root, extra_env=env).start()


@pytest.mark.parametrize("fault", [1, 3, 5])
def test_dump_fault_clear_error_target_runs_retry_works(
    procs: Procs, tmp_path: Path, fault: int
) -> None:
    p = fill(procs, 64, tmp_path)
    with temp_root() as root:
        d = _fault_daemon(root, fault)
        try:
            with pytest.raises(CriudClientError) as e:
                d.client.checkpoint(p.pid, name="faulty")
            assert 400 <= e.value.status < 500
            assert e.value.problem["log_url"] and e.value.detail.startswith("dump of pid")
            wait_for(lambda: running_untraced(p.pid), 15, what="target to run, untraced")
            assert not list((d.state_dir / "checkpoints").glob(".tmp-*"))
        finally:
            assert d.stop() == 0
        d = _fault_daemon(root, None)
        try:
            ck = d.client.checkpoint(p.pid, name="faulty")
            assert ck["state"] == "done"
            p.wait(timeout=10)
            r = d.client.restore("faulty")
            procs.adopt(r["pid"])
            assert r["state"] == "running"
        finally:
            assert d.stop() == 0


def test_fault_136_criu_aborts_on_a_failing_dump(procs: Procs) -> None:
    # In criu 4.2.1, fault 136 makes a dump that is already failing abort()
    # instead of exiting: pair it with a dump criu refuses (a socketpair end
    # whose peer is outside the tree).
    import socket

    ours, theirs = socket.socketpair()
    p = procs.spawn(["sleep", "1000"], stdin=theirs)
    theirs.close()
    try:
        with temp_root() as root:
            d = _fault_daemon(root, 136)
            try:
                with pytest.raises(CriudClientError) as e:
                    d.client.checkpoint(p.pid)
                assert "killed by SIGABRT" in e.value.detail, e.value.detail
                assert e.value.problem["exit_code"] == -signal.SIGABRT
                wait_for(lambda: running_untraced(p.pid), 15, what="target to run, untraced")
                # Retry with the blocker resolved (the socket declared
                # external): the same daemon, still faulty, now succeeds.
                key = next(
                    f["key"]
                    for f in d.client.inspect(e.value.problem["log_url"].split("/")[3])["fds"]
                    if f["fd"] == 0
                )
                ck = d.client.checkpoint(p.pid, external=[key], leave_running=True)
                assert ck["state"] == "done"
                assert running_untraced(p.pid)
            finally:
                assert d.stop() == 0
    finally:
        ours.close()


def test_restore_fault_6_leaves_nothing_and_images_reusable(procs: Procs) -> None:
    p, rd = start_hello(procs)
    os.read(rd, 100)
    with temp_root() as root:
        d = _fault_daemon(root, 6)
        try:
            ck = d.client.checkpoint(p.pid)
            p.wait(timeout=10)
            key = ck["external"][0]
            new_r, new_w = os.pipe()
            h = d.client.send_fds([new_w])
            with pytest.raises(CriudClientError) as e:
                d.client.restore(
                    ck["id"], inherit_fds=[{"key": key, "handle": h["handle"], "index": 0}]
                )
            assert e.value.detail.startswith("restore of checkpoint")
            wait_for(lambda: pid_gone(p.pid), 15, what="no leftover task of the failed restore")
            # The handle survived the failure and its fd is intact.
            listed = {x["handle"]: x for x in d.client.fd_handles()}
            assert listed[h["handle"]]["fds"][0]["inode"] == os.fstat(new_w).st_ino
            assert d.client.get_restore(d.client.restores()[-1]["id"])["state"] == "failed"
        finally:
            assert d.stop() == 0
        d = _fault_daemon(root, None)
        try:
            r = d.client.restore(ck["id"], fds={key: new_w})
            procs.adopt(r["pid"])
            os.close(new_w)
            assert os.read(new_r, 100).startswith(b"hello ")
        finally:
            os.close(new_r)
            os.close(rd)
            assert d.stop() == 0


def test_enospc_dump_fails_cleanly(procs: Procs, tmp_path: Path) -> None:
    p = fill(procs, 64, tmp_path)
    with temp_root() as root, small_state_dir(root, "8m"):
        d = Daemon(root).start()
        try:
            with pytest.raises(CriudClientError) as e:
                d.client.checkpoint(p.pid, name="too-big")
            assert e.value.status == 507 and e.value.code == "no_space"
            assert "space" in (e.value.problem.get("criu_error") or e.value.detail).lower()
            wait_for(lambda: running_untraced(p.pid), 15, what="target to run, untraced")
            ckdir = d.state_dir / "checkpoints"
            assert not list(ckdir.glob(".tmp-*"))
            leftovers = [f.name for c in ckdir.iterdir() for f in c.iterdir()]
            assert leftovers == ["dump.log"], leftovers  # partial images removed
        finally:
            assert d.stop() == 0


# A criu whose dumps hang (as a real one can, once its target is killed at a
# bad moment); everything else goes to the real criu.  The mark tells the
# test the dump has started.
HANGING_CRIU = """#!/bin/sh
for a in "$@"; do
    if [ "$a" = dump ]; then
        : > {mark}
        exec sleep 600
    fi
done
exec {criu} "$@"
"""


def _hanging_daemon(root: Path, *args: str) -> Daemon:
    wrapper = root / "criu-hangs"
    wrapper.write_text(HANGING_CRIU.format(mark=root / "dump-started", criu=CRIU))
    wrapper.chmod(0o755)
    # The wrapper stands in for the CLI's `criu dump`: no warm workers, whose
    # requests come over RPC (test_criu_pool covers a worker that hangs).
    return Daemon(root, criu=str(wrapper), args=["--criu-pool", "0", *args]).start()


def test_a_criu_past_its_timeout_is_killed(procs: Procs) -> None:
    with temp_root() as root:
        d = _hanging_daemon(root, "--criu-timeout", "2")
        try:
            p = procs.spawn(["sleep", "1000"])
            t0 = time.monotonic()
            with pytest.raises(CriudClientError) as e:
                d.client.checkpoint(p.pid, name="hangs")
            took = time.monotonic() - t0
            assert e.value.status == 504 and e.value.code == "criu_timeout", e.value.problem
            assert "--criu-timeout" in e.value.problem["hint"]
            assert 2 <= took < 30
            # Nothing left behind: the target runs on, criu is gone, and the
            # checkpoint says it failed.
            assert running_untraced(p.pid)
            wait_for(lambda: children(d.pid) == [], 10, what="the killed criu to be reaped")
            ck_id = e.value.problem["log_url"].split("/")[3]
            assert d.client.inspect(ck_id)["state"] == "failed"
        finally:
            assert d.stop() == 0, d.log()


def test_a_dump_whose_process_died_is_not_waited_for(procs: Procs) -> None:
    # The overall timeout is long; the process's death ends the wait.
    with temp_root() as root:
        d = _hanging_daemon(root, "--criu-timeout", "600", "--criu-gone-grace", "1")
        try:
            p = procs.spawn(["sleep", "1000"])
            with concurrent.futures.ThreadPoolExecutor(1) as ex:
                fut = ex.submit(call, d.client.checkpoint, p.pid)
                wait_for((root / "dump-started").exists, 30, what="the dump to start")
                t0 = time.monotonic()
                os.kill(p.pid, signal.SIGKILL)
                err = fut.result(timeout=60)
            took = time.monotonic() - t0
            assert isinstance(err, CriudClientError), err
            assert err.status == 409 and err.code == "process_gone", err.problem
            assert "went away" in err.problem["detail"]
            assert 1 <= took < 30
            wait_for(lambda: children(d.pid) == [], 10, what="the killed criu to be reaped")
        finally:
            assert d.stop() == 0, d.log()
