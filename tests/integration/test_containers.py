"""Containers: namespaced trees, engine-held stdio, network namespaces handed over SCM_RIGHTS."""

from __future__ import annotations

import os
import subprocess
import time

from tests.integration.helpers import Daemon, Procs, read_line, wait_for

LOOP = "i=0; while :; do echo hello $i; i=$((i+1)); sleep 0.1; done"


def _num(line: bytes) -> int:
    return int(line.split()[1])


def _drain(fd: int, last: int) -> int:
    """Read what a dead writer left, to EOF; return the last number seen."""
    data = b""
    while chunk := os.read(fd, 65536):
        data += chunk
    for line in data.splitlines():
        last = _num(line)
    return last


def _ns_init(unshare: subprocess.Popen[bytes]) -> int:
    """The pid (on the host) of the init that `unshare --fork` started."""

    def child() -> int | None:
        try:
            with open(f"/proc/{unshare.pid}/task/{unshare.pid}/children") as f:
                kids = f.read().split()
        except OSError:
            return None
        return int(kids[0]) if kids else None

    return wait_for(child, 10, what="the namespace's init")


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
    init = _ns_init(u)
    first = _num(read_line(r))
    with open(f"/proc/{init}/status") as f:
        assert f"NSpid:\t{init}\t1\n" in f.read()

    ck = daemon.client.checkpoint(init, name="ns-tree")
    assert ck["state"] == "done"
    assert set(ck["namespaces"]) >= {"pid", "uts", "ipc", "net"}
    key = f"pipe:[{os.fstat(r).st_ino}]"
    assert ck["external"] == [key]
    u.wait(timeout=10)
    last = _drain(r, first)
    os.close(r)

    # The image's pids (1 and its child) live in the tree's own pid
    # namespace: host pid 1 being taken does not matter.
    new_r, new_w = os.pipe()
    t0 = time.monotonic()
    res = daemon.client.restore("ns-tree", fds={key: new_w})
    os.close(new_w)
    procs.adopt(res["pid"])
    assert res["ns_pid"] == 1
    with open(f"/proc/{res['pid']}/status") as f:
        nspid = next(ln for ln in f if ln.startswith("NSpid:")).split()[1:]
    assert nspid == [str(res["pid"]), "1"]
    assert _num(read_line(new_r)) == last + 1
    print(f"namespaced restore: {(time.monotonic() - t0) * 1000:.0f} ms")
    # The restored init is in fresh namespaces, not the host's.
    for ns in ("pid", "net", "uts", "ipc"):
        assert (
            os.stat(f"/proc/{res['pid']}/ns/{ns}").st_ino != os.stat(f"/proc/self/ns/{ns}").st_ino
        )
    daemon.client.signal(res["id"], "SIGKILL")
    wait_for(
        lambda: daemon.client.get_restore(res["id"])["state"] == "exited",
        10,
        what="restored init to exit",
    )
    os.close(new_r)
