"""Lazy restores and clones as real users (issue 15).

A user's lazy restore runs its `criu lazy-pages` as that user (as its
restore's criu), reads the images only through the daemon's dir fd, and
pins the checkpoint against a delete.  Where that criu would run as the
user without userfaultfd (root lacks CAP_SYS_RESOURCE and
vm.unprivileged_userfaultfd is 0, as on this machine), the request is
refused up front: never a criu with CAP_SYS_PTRACE for the user.  Another
user can neither restore the checkpoint in copies or lazily nor learn that
it exists.
"""

from __future__ import annotations

from criud.daemon.criu import CAP_SYS_RESOURCE, has_cap
from criud.daemon.kprobe import UFFD_SYSCTL
from tests.integration.helpers import Daemon, Procs, pid_gone, wait_for
from tests.security.users import Accounts, call_as, spawn_as


def _status_uid(pid: int) -> list[int]:
    with open(f"/proc/{pid}/status") as f:
        line = next(ln for ln in f if ln.startswith("Uid:"))
    return [int(x) for x in line.split()[1:]]


def test_user_lazy_restore_runs_as_the_user_and_pins_the_images(
    users: Accounts, sdaemon: Daemon, procs: Procs
) -> None:
    alice, bob = users.alice, users.bob
    pid = spawn_as(procs, alice, ["sleep", "1000"])
    st, ck = call_as(alice, sdaemon, "POST", "/v1/checkpoints", {"pid": pid})
    assert st == 201, ck
    procs.popens[-1].wait(timeout=10)
    wait_for(lambda: pid_gone(pid), 15, what=f"pid {pid} to be reaped")

    # bob: the same 404 as for a checkpoint that does not exist, copies or lazy.
    for body in ({"copies": 2}, {"lazy": True}):
        st, out = call_as(bob, sdaemon, "POST", "/v1/restores", {"checkpoint": ck["id"], **body})
        assert st == 404 and out["code"] == "checkpoint_not_found", out

    st, r = call_as(alice, sdaemon, "POST", "/v1/restores", {"checkpoint": ck["id"], "lazy": True})
    as_owner = not has_cap(CAP_SYS_RESOURCE)
    if as_owner and UFFD_SYSCTL.read_text().strip() != "1":
        # Her criu would run as her, without userfaultfd: refused up front,
        # nothing made (no restore record), never a ptrace-capable criu.
        assert st == 422 and r["code"] == "unsupported_by_kernel", r
        assert r["feature"] == "unprivileged_userfaultfd", r
        st, mine = call_as(alice, sdaemon, "GET", "/v1/restores")
        assert st == 200 and all(x["checkpoint"] != ck["id"] for x in mine)
        st, _ = call_as(alice, sdaemon, "DELETE", f"/v1/checkpoints/{ck['id']}")
        assert st == 204
        return
    assert st == 201, str(r)
    procs.adopt(r["pid"])
    assert r["lazy"] is True and r["state"] == "running"
    assert _status_uid(r["pid"]) == [alice.uid] * 4
    # Pinned while the server runs: her delete waits for lazy_done_at.
    wait_for(
        lambda: call_as(alice, sdaemon, "GET", f"/v1/restores/{r['id']}")[1]["lazy_done_at"],
        30,
        what="the lazy pages",
    )
    st, rec = call_as(alice, sdaemon, "GET", f"/v1/restores/{r['id']}")
    assert rec["error"] is None and rec["pages_lazy"] is not None, rec
    st, _ = call_as(alice, sdaemon, "POST", f"/v1/restores/{r['id']}/signal", {"signal": "KILL"})
    assert st == 200
    st, _ = call_as(alice, sdaemon, "DELETE", f"/v1/checkpoints/{ck['id']}")
    assert st == 204
