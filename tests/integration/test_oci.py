"""runc containers checkpointed and restored through criud by bundle (issue: containers)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from criud.api.client import CriudClientError
from tests.integration import oci_helpers as oh
from tests.integration.helpers import (
    Daemon,
    Procs,
    drain_hello,
    hello_num,
    kill_restore,
    read_line,
    temp_root,
    wait_for,
)

pytestmark = pytest.mark.skipif(oh.missing() is not None, reason=str(oh.missing()))


def test_busybox_container_restored_under_a_new_name(daemon: Daemon, procs: Procs) -> None:
    with temp_root() as root, oh.runc_env(root / "runc") as runc:
        data = root / "data"
        data.mkdir()
        bundle = oh.build_bundle(root / "b1", binds={"/data": str(data)})
        r, w = os.pipe()
        init = runc.run_detached(bundle, "criud-b1", w)
        os.close(w)
        first = hello_num(read_line(r))

        t0 = time.monotonic()
        ck = daemon.client.checkpoint(init, name="busybox", oci={"bundle": str(bundle)})
        dump_s = time.monotonic() - t0
        assert ck["state"] == "done"
        assert ck["external"] == [f"pipe:[{os.fstat(r).st_ino}]"]
        assert set(ck["namespaces"]) >= {"pid", "mnt", "uts", "ipc"}
        key = ck["external"][0]
        wait_for(lambda: oh_gone(init), 10, what="the container's init to be gone")
        last = drain_hello(r, first)
        os.close(r)

        # A copy of the bundle under a new name: new rootfs dir, new bind source.
        data2 = root / "data2"
        data2.mkdir()
        bundle2 = oh.copy_bundle(bundle, root / "b2", rootfs="rootfs2", binds={"/data": str(data2)})
        new_r, new_w = os.pipe()
        t0 = time.monotonic()
        res = daemon.client.restore(
            "busybox", fds={key: new_w}, oci={"bundle": str(bundle2), "name": "criud-b2"}
        )
        restore_s = time.monotonic() - t0
        os.close(new_w)
        procs.adopt(res["pid"])
        try:
            assert res["ns_pid"] == 1 and res["pid"] != init
            assert hello_num(read_line(new_r)) == last + 1  # keeps printing into the new pipe
            with open(f"/proc/{res['pid']}/mountinfo") as f:
                mounts = f.read()
            assert str(bundle2 / "rootfs2") in mounts and str(data2) in mounts
            print(
                f"busybox via criud: checkpoint {dump_s * 1000:.0f} ms, "
                f"restore {restore_s * 1000:.0f} ms"
            )
        finally:
            kill_restore(daemon.client, res["id"], "restored container")
            os.close(new_r)
            oh.remove_cgroup("/criud-b2")


def oh_gone(pid: int) -> bool:
    from tests.integration.helpers import pid_gone, proc_state

    return pid_gone(pid) or proc_state(pid) == "Z"


def test_bad_bundles_refused(daemon: Daemon, procs: Procs, tmp_path: Path) -> None:
    p = procs.spawn(["sleep", "1000"])
    for bundle, word in ((str(tmp_path / "nope"), "no such directory"), ("relative/x", "")):
        with pytest.raises(CriudClientError) as e:
            daemon.client.checkpoint(p.pid, leave_running=True, oci={"bundle": bundle})
        assert e.value.status == 422
        assert word in e.value.detail
    with temp_root() as root:
        bundle = oh.build_bundle(root / "b")
        # A plain sleep is not this bundle's container init.
        with pytest.raises(CriudClientError) as e:
            daemon.client.checkpoint(p.pid, leave_running=True, oci={"bundle": str(bundle)})
        assert e.value.status == 422 and e.value.code == "invalid_bundle"
    assert p.poll() is None


def test_terminal_container_restored_onto_a_new_pty(daemon: Daemon, procs: Procs) -> None:
    import termios

    from tests.integration.test_stdio import dead, drain_ticks, new_pty, raw, read_until

    with temp_root() as root, oh.runc_env(root / "runc") as runc:
        loop = "i=0; while true; do echo tick $i $(tty); i=$((i+1)); sleep 0.1; done"
        bundle = oh.build_bundle(root / "t1", args=("sh", "-c", loop), terminal=True)
        console = oh.ConsoleSocket(root / "console.sock")
        try:
            init = runc.run_detached(
                bundle, "criud-t1", subprocess.DEVNULL, console_socket=console.path
            )
            master = console.accept()
        finally:
            console.close()
        try:
            raw(master)
            first = read_until(master, lambda s: s.startswith("tick "))
            ck = daemon.client.checkpoint(init, name="term", oci={"bundle": str(bundle)})
            (key,) = ck["external"]
            assert key.startswith("tty[")
            wait_for(lambda: oh_gone(init), 10, what="the container's init to be gone")
            last = drain_ticks(master, int(first.split()[1]))
        finally:
            os.close(master)

        bundle2 = oh.copy_bundle(bundle, root / "t2", rootfs="rootfs2")
        with new_pty() as (master2, slave2):
            raw(master2)
            new_rdev = os.fstat(slave2).st_rdev
            res = daemon.client.restore(
                "term", fds={key: slave2}, oci={"bundle": str(bundle2), "name": "criud-t2"}
            )
            os.close(slave2)
            procs.adopt(res["pid"])
            try:
                line = read_until(master2, lambda s: s.startswith("tick "))
                assert int(line.split()[1]) > last
                # It keeps running, on the new pty: a later tick.
                later = read_until(master2, lambda s: s.startswith("tick "))
                assert int(later.split()[1]) > int(line.split()[1])
                assert termios.tcgetattr(master2)  # the master is alive
                # The container's /dev/console is the new slave too, and its
                # init's fds 0-2 are that slave.
                assert os.stat(f"/proc/{res['pid']}/root/dev/console").st_rdev == new_rdev
                assert os.stat(f"/proc/{res['pid']}/fd/1").st_rdev == new_rdev
            finally:
                daemon.client.signal(res["id"], "SIGKILL")
                wait_for(lambda: dead(res["pid"]), 10, what="restored container to exit")
                oh.remove_cgroup("/criud-t2")
