"""Checkpoint and restore real processes through the daemon (issue: foundation)."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from criud.api.client import CriudClientError
from criud.daemon.procutil import children
from tests.integration.helpers import Daemon, Procs, pid_gone, proc_state, wait_for

SLEEP = ["sleep", "1000"]

# A process that fills 256 MiB with random data and, on SIGUSR1, writes the
# sha256 of that memory (computed by itself) to the path in argv[1].
MEMORY_HOG = r"""
import hashlib, os, signal, sys
out = sys.argv[1]
buf = bytearray(os.urandom(256 << 20))
def report(*_):
    digest = hashlib.sha256(buf).hexdigest()
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        f.write(digest)
    os.rename(tmp, out)
signal.signal(signal.SIGUSR1, report)
with open(out + ".ready", "w") as f:
    f.write("1")
while True:
    signal.pause()
"""


def test_version_reports_criu_and_features(daemon: Daemon) -> None:
    v = daemon.client.version()
    assert v["criu"]["version"].split(".")[:2] >= ["4", "2"]
    assert set(v["features"]) == {
        "mem_dirty_track",
        "uffd",
        "uffd-noncoop",
        "pidfd_store",
        "network_lock_nftables",
        "timens",
    }
    assert v["kernel"] == os.uname().release
    # Issue 15: what each mode can do here, probed at start-up.
    assert set(v["supports"]) >= {"lazy_restore", "pre_dump", "post_copy_migration", "clones"}


def test_sleep_checkpoint_list_restore_kill_exited(daemon: Daemon, procs: Procs) -> None:
    p = procs.spawn(SLEEP)
    ck = daemon.client.checkpoint(p.pid, name="sleeper-1")
    assert ck["state"] == "done"
    assert ck["pid"] == p.pid
    assert ck["size_bytes"] > 0
    assert ck["stats"]["pages_written"] > 0
    assert ck["stats"]["frozen_time_us"] > 0
    assert ck["criu_version"]
    assert p.wait(timeout=10) == -signal.SIGKILL  # criu kills the tree after a dump

    listed = {c["id"]: c for c in daemon.client.checkpoints()}
    assert listed[ck["id"]]["name"] == "sleeper-1"

    r = daemon.client.restore("sleeper-1")
    assert r["state"] == "running"
    assert r["pid"] == p.pid  # --restore-sibling keeps the dumped pid
    procs.adopt(r["pid"])
    assert proc_state(r["pid"]) in ("S", "R")
    assert "restore_time_us" in r["stats"]
    with open(f"/proc/{r['pid']}/cmdline", "rb") as f:
        assert f.read().split(b"\0")[:2] == [b"sleep", b"1000"]
    assert daemon.client.get_restore(r["id"])["state"] == "running"
    assert any(x["id"] == r["id"] for x in daemon.client.restores())

    daemon.client.signal(r["id"], "SIGKILL")
    done = wait_for(
        lambda: (x := daemon.client.get_restore(r["id"]))["state"] == "exited" and x,
        10,
        what="restore to be seen as exited",
    )
    assert done["exit_signal"] == signal.SIGKILL
    assert done["exit_code"] is None
    wait_for(lambda: pid_gone(r["pid"]), 10, what="restored pid to be reaped")


def test_exit_code_is_recorded(daemon: Daemon, procs: Procs, tmp_path: Path) -> None:
    go = tmp_path / "go"
    p = procs.spawn(["sh", "-c", f"while [ ! -e {go} ]; do sleep 0.05; done; exit 7"])
    ck = daemon.client.checkpoint(p.pid)
    p.wait(timeout=10)
    r = daemon.client.restore(ck["id"])
    procs.adopt(r["pid"])
    go.write_text("")
    done = wait_for(
        lambda: (x := daemon.client.get_restore(r["id"]))["state"] == "exited" and x,
        15,
        what="restored shell to exit",
    )
    assert done["exit_code"] == 7
    assert done["exit_signal"] is None


def test_256mib_memory_checksum_survives(daemon: Daemon, procs: Procs, tmp_path: Path) -> None:
    out = tmp_path / "digest"
    p = procs.python(MEMORY_HOG, str(out))
    wait_for(lambda: Path(f"{out}.ready").exists(), 60, what="256 MiB to be filled")
    os.kill(p.pid, signal.SIGUSR1)
    before = wait_for(lambda: out.exists() and out.read_text(), 30, what="first digest")
    out.unlink()

    ck = daemon.client.checkpoint(p.pid, name="hog")
    assert ck["stats"]["pages_written"] >= (256 << 20) // 4096
    p.wait(timeout=10)
    r = daemon.client.restore("hog")
    procs.adopt(r["pid"])
    daemon.client.signal(r["id"], signal.SIGUSR1)
    after = wait_for(lambda: out.exists() and out.read_text(), 30, what="digest after restore")
    assert after == before
    assert len(after) == len(hashlib.sha256().hexdigest())


def test_parent_and_two_children_keep_their_pids(daemon: Daemon, procs: Procs) -> None:
    p = procs.spawn(["sh", "-c", "sleep 1000 & sleep 1000 & wait"])
    kids = wait_for(
        lambda: children(p.pid) if len(children(p.pid)) == 2 else None, 10, what="two children"
    )
    ck = daemon.client.checkpoint(p.pid)
    assert sorted(t["pid"] for t in _tasks(daemon, ck["id"])) == sorted([p.pid, *kids])
    p.wait(timeout=10)
    r = daemon.client.restore(ck["id"])
    procs.adopt(r["pid"])
    for k in kids:
        procs.adopt(k)
    assert r["pid"] == p.pid
    assert sorted(children(r["pid"])) == sorted(kids)
    for k in kids:
        with open(f"/proc/{k}/cmdline", "rb") as f:
            assert f.read().startswith(b"sleep\0")


def test_leave_running(daemon: Daemon, procs: Procs) -> None:
    p = procs.spawn(SLEEP)
    ck = daemon.client.checkpoint(p.pid, leave_running=True)
    assert ck["options"]["leave_running"] is True
    assert p.poll() is None
    assert proc_state(p.pid) == "S"  # running (sleeping), neither stopped nor traced
    with open(f"/proc/{p.pid}/status") as f:
        assert "TracerPid:\t0" in f.read()
    p.kill()
    p.wait(timeout=10)
    r = daemon.client.restore(ck["id"])
    procs.adopt(r["pid"])
    assert r["pid"] == p.pid and proc_state(r["pid"]) in ("S", "R")


def test_external_unix_socket_refused_with_criu_reason(daemon: Daemon, procs: Procs) -> None:
    ours, theirs = socket.socketpair()
    try:
        p = procs.spawn(SLEEP, stdin=theirs)
        theirs.close()
        with pytest.raises(CriudClientError) as e:
            daemon.client.checkpoint(p.pid, name="extsk")
        err = e.value
        assert err.status == 422
        assert err.code == "external_unix_socket"
        assert "socket:[" in err.problem["hint"]
        assert "xternal" in err.detail or "unix" in err.detail.lower()
        assert err.problem["criu_error"]
        assert err.problem["criu_error"] in err.detail
        assert err.problem["log_url"].endswith("op=dump")
        assert err.problem["log_tail"]
        # The target keeps running, and the log is still there to read.
        assert p.poll() is None and proc_state(p.pid) == "S"
        ck_id = err.problem["log_url"].split("/")[3]
        assert "Error" in daemon.client.log(ck_id, "dump")
        assert daemon.client.inspect(ck_id)["state"] == "failed"
        # The name is free again for a retry.
        p2 = procs.spawn(SLEEP)
        assert daemon.client.checkpoint(p2.pid, name="extsk", leave_running=True)["state"] == "done"
    finally:
        ours.close()


def test_delete_then_404(daemon: Daemon, procs: Procs) -> None:
    p = procs.spawn(SLEEP)
    ck = daemon.client.checkpoint(p.pid, name="to-delete", leave_running=True)
    ck_dir = daemon.state_dir / "checkpoints" / ck["id"]
    assert (ck_dir / "pstree.img").exists()
    daemon.client.delete("to-delete")
    assert not ck_dir.exists()
    for ref in ("to-delete", ck["id"]):
        with pytest.raises(CriudClientError) as e:
            daemon.client.inspect(ref)
        assert e.value.status == 404 and e.value.code == "checkpoint_not_found"


def test_missing_pid_and_bad_names(daemon: Daemon, procs: Procs) -> None:
    p = procs.spawn(["true"])
    p.wait(timeout=10)
    with pytest.raises(CriudClientError) as e:
        daemon.client.checkpoint(p.pid)
    assert e.value.status == 404 and e.value.code == "process_not_found"
    for bad in ("../etc", "a/b", ".hidden", "x" * 129, "a..b"):
        with pytest.raises(CriudClientError) as e:
            daemon.client.checkpoint(os.getpid(), name=bad)
        assert e.value.status == 422, bad
        assert e.value.code in ("invalid_name", "invalid_request"), bad


def test_name_taken(daemon: Daemon, procs: Procs) -> None:
    p = procs.spawn(SLEEP)
    daemon.client.checkpoint(p.pid, name="dup-name", leave_running=True)
    with pytest.raises(CriudClientError) as e:
        daemon.client.checkpoint(p.pid, name="dup-name", leave_running=True)
    assert e.value.status == 409 and e.value.code == "name_taken"


def test_cli_roundtrip(daemon: Daemon, procs: Procs) -> None:

    p = procs.spawn(SLEEP)
    base = daemon.cli()
    out = subprocess.run(
        [*base, "checkpoint", str(p.pid), "--name", "cli-1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "cli-1" in out.stdout and "done" in out.stdout
    p.wait(timeout=10)
    ls = subprocess.run([*base, "ls"], capture_output=True, text=True, timeout=30)
    assert "cli-1" in ls.stdout and ls.stdout.startswith("ID")
    rs = subprocess.run(
        [*base, "--json", "restore", "cli-1"], capture_output=True, text=True, timeout=60
    )
    assert rs.returncode == 0, rs.stderr
    import json

    pid = json.loads(rs.stdout)["pid"]
    procs.adopt(pid)
    assert pid == p.pid
    bad = subprocess.run([*base, "inspect", "no-such"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 1
    assert "No such checkpoint" in bad.stderr


def _tasks(daemon: Daemon, ck_id: str) -> list[dict[str, int]]:
    fds = daemon.client.inspect(ck_id)["fds"]
    return [{"pid": pid} for pid in sorted({f["pid"] for f in fds})]
