"""Containers: namespaced trees, engine-held stdio, network namespaces handed over SCM_RIGHTS."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time

import pytest

from criud.api.client import CriudClientError
from tests.integration.helpers import (
    Daemon,
    Procs,
    drain_after,
    hello_num,
    kill_restore,
    ns_init,
    read_line,
    restore_into_pipe,
    wait_for,
)

LOOP = "i=0; while :; do echo hello $i; i=$((i+1)); sleep 0.1; done"


def test_pid_uts_ipc_net_namespaced_tree(daemon: Daemon, procs: Procs) -> None:
    r, w = os.pipe()
    u = procs.spawn(
        [
            "unshare",
            "--pid",
            "--fork",
            "--uts",
            "--ipc",
            "--net",
            "--kill-child",
            "setsid",
            "sh",
            "-c",
            LOOP,
        ],
        stdout=w,
    )
    os.close(w)
    init = ns_init(u.pid)
    first = hello_num(read_line(r))
    with open(f"/proc/{init}/status") as f:
        assert f"NSpid:\t{init}\t1\n" in f.read()

    ck = daemon.client.checkpoint(init, name="ns-tree")
    assert ck["state"] == "done"
    assert set(ck["namespaces"]) >= {"pid", "uts", "ipc", "net"}
    key = f"pipe:[{os.fstat(r).st_ino}]"
    assert ck["external"] == [key]
    last = drain_after(u, r, first)

    # The image's pids (1 and its child) live in the tree's own pid
    # namespace: host pid 1 being taken does not matter.
    t0 = time.monotonic()
    res, new_r = restore_into_pipe(daemon.client, procs, "ns-tree", key)
    assert res["ns_pid"] == 1
    with open(f"/proc/{res['pid']}/status") as f:
        nspid = next(ln for ln in f if ln.startswith("NSpid:")).split()[1:]
    assert nspid == [str(res["pid"]), "1"]
    assert hello_num(read_line(new_r)) == last + 1
    print(f"namespaced restore: {(time.monotonic() - t0) * 1000:.0f} ms")
    # The restored init is in fresh namespaces, not the host's.
    for ns in ("pid", "net", "uts", "ipc"):
        assert (
            os.stat(f"/proc/{res['pid']}/ns/{ns}").st_ino != os.stat(f"/proc/self/ns/{ns}").st_ino
        )
    kill_restore(daemon.client, res["id"], "restored init")
    os.close(new_r)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, timeout=30, capture_output=True)


def test_external_netns_handed_over_by_fd(daemon: Daemon, procs: Procs) -> None:
    tag = f"{os.getpid() % 100000}"
    ns1, ns2 = f"criud-t1-{tag}", f"criud-t2-{tag}"
    _ip("netns", "add", ns1)
    _ip("netns", "add", ns2)
    try:
        # The tree's netns, made by the test, with a veth address in it.
        _ip("link", "add", f"cv1-{tag}", "type", "veth", "peer", "name", f"cv2-{tag}")
        _ip("link", "set", f"cv1-{tag}", "netns", ns1)
        _ip("link", "set", f"cv2-{tag}", "netns", ns2)
        _ip("-n", ns1, "addr", "add", "198.18.0.1/24", "dev", f"cv1-{tag}")
        _ip("-n", ns1, "link", "set", f"cv1-{tag}", "up")
        # nsenter --net only: `ip netns exec` would add a mount namespace.
        # (start_new_session makes it a session leader; nsenter execs sleep.)
        p = procs.spawn(["nsenter", f"--net=/run/netns/{ns1}", "sleep", "1000"])
        wait_for(
            lambda: (
                os.path.exists(f"/proc/{p.pid}/exe")
                and os.readlink(f"/proc/{p.pid}/exe").endswith("sleep")
            ),
            10,
            what="sleep in ns1",
        )
        ns1_ino = os.stat(f"/run/netns/{ns1}").st_ino
        assert os.stat(f"/proc/{p.pid}/ns/net").st_ino == ns1_ino

        with pytest.raises(CriudClientError) as e:  # the host's netns: nothing to leave out
            daemon.client.checkpoint(
                os.getpid(),
                leave_running=True,
                external_namespaces=[{"type": "net", "key": "extnet"}],
            )
        assert e.value.status == 422

        ck = daemon.client.checkpoint(p.pid, external_namespaces=[{"type": "net", "key": "extnet"}])
        assert ck["external"] == ["extnet"]
        assert ck["options"]["external_namespaces"] == [{"type": "net", "key": "extnet"}]
        assert ck["namespaces"]["net"] == ns1_ino
        p.wait(timeout=10)

        with pytest.raises(CriudClientError) as e:  # no mapping for the namespace
            daemon.client.restore(ck["id"])
        assert e.value.code == "missing_inherit_fd" and e.value.problem["keys"] == ["extnet"]
        r, w = os.pipe()
        try:
            with pytest.raises(CriudClientError) as e:  # an fd, but not a netns
                daemon.client.restore(ck["id"], fds={"extnet": w})
            assert e.value.status == 422 and e.value.code == "wrong_fd_type"
        finally:
            os.close(r)
            os.close(w)
        assert pid_gone_or_zombie(p.pid)

        fd = os.open(f"/run/netns/{ns2}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            res = daemon.client.restore(ck["id"], fds={"extnet": fd})
        finally:
            os.close(fd)
        procs.adopt(res["pid"])
        ns2_ino = os.stat(f"/run/netns/{ns2}").st_ino
        assert os.stat(f"/proc/{res['pid']}/ns/net").st_ino == ns2_ino
        with open(f"/proc/{res['pid']}/net/dev") as f:
            assert f"cv2-{tag}" in f.read()  # it sees ns2's interfaces
        kill_restore(daemon.client, res["id"], "restored sleep")
    finally:
        subprocess.run(["ip", "netns", "del", ns1], timeout=30, check=False)
        subprocess.run(["ip", "netns", "del", ns2], timeout=30, check=False)


def pid_gone_or_zombie(pid: int) -> bool:
    from tests.integration.helpers import pid_gone, proc_state

    return pid_gone(pid) or proc_state(pid) == "Z"


def test_restore_into_a_cgroup(daemon: Daemon, procs: Procs) -> None:
    from criud.daemon.procutil import cgroup_mounts

    name = f"criud/t{os.getpid()}"
    p = procs.spawn(["sleep", "1000"])
    ck = daemon.client.checkpoint(p.pid)
    p.wait(timeout=10)
    for bad in ("../etc", "other/x", "criud", "criud/../x", "/criud/a b"):
        with pytest.raises(CriudClientError) as e:
            daemon.client.request("POST", "/v1/restores", {"checkpoint": ck["id"], "cgroup": bad})
        assert e.value.status == 422, bad
    res = daemon.client.request("POST", "/v1/restores", {"checkpoint": ck["id"], "cgroup": name})[1]
    procs.adopt(res["pid"])
    try:
        with open(f"/proc/{res['pid']}/cgroup") as f:
            lines = f.read().splitlines()
        by_ctrl = {ln.split(":")[1]: ln.split(":")[2] for ln in lines}
        for ctrl in ("freezer", "memory", "pids", ""):
            if any(ctrl in c.split(",") for c in by_ctrl) or ctrl == "":
                key = next(c for c in by_ctrl if ctrl in c.split(",") or c == ctrl)
                assert by_ctrl[key] == f"/{name}", (ctrl, lines)
    finally:
        kill_restore(daemon.client, res["id"], "restored sleep")
        for m in cgroup_mounts():
            for d in (os.path.join(m, name), os.path.join(m, "criud")):
                with contextlib.suppress(OSError):
                    os.rmdir(d)
