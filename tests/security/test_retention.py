"""Retention across users: a bulk delete stays in its caller's lane; quotas are per caller.

Bob is the attacker, a real member of the socket group with processes of
his own.  His `DELETE /v1/checkpoints?...` must never reach alice's
checkpoints, whatever filter or owner he names; and when he is over his
quota (count: 409, bytes: 507, both `quota_exceeded`), alice, under hers,
still checkpoints.
"""

from __future__ import annotations

import os
import secrets
import sys
from typing import Any

from tests.integration.helpers import Daemon, Procs, temp_root, wait_for
from tests.security.users import Accounts, User, call_as, spawn_as

SLEEP = ["sleep", "1000"]
FAT = "import sys, time\nb = bytes([1]) * (int(sys.argv[1]) << 20)\ntime.sleep(1000)\n"


def _checkpoint(user: User, daemon: Daemon, pid: int, **kw: Any) -> tuple[int, Any]:
    body = {"pid": pid, "leave_running": True, **kw}
    return call_as(user, daemon, "POST", "/v1/checkpoints", body)


def _root_ids(daemon: Daemon) -> set[str]:
    return {c["id"] for c in daemon.client.checkpoints()}


def _rss_mib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:")) >> 10


def test_bulk_delete_never_reaches_another_users_checkpoints(
    users: Accounts, sdaemon: Daemon, procs: Procs
) -> None:
    tag = "shared" + secrets.token_hex(3)
    st, alice_ck = _checkpoint(
        users.alice, sdaemon, spawn_as(procs, users.alice, SLEEP), labels={"team": tag}
    )
    assert st == 201, alice_ck
    st, bob_ck = _checkpoint(
        users.bob, sdaemon, spawn_as(procs, users.bob, SLEEP), labels={"team": tag}
    )
    assert st == 201, bob_ck

    # Bob's widest filters match both; only his own goes.
    st, doc = call_as(
        users.bob, sdaemon, "DELETE", f"/v1/checkpoints?older_than=0s&label=team={tag}"
    )
    assert st == 200, doc
    assert [d["id"] for d in doc["deleted"]] == [bob_ck["id"]], doc
    # Alice's is not even listed as skipped: bob learns nothing of it.
    assert doc["skipped"] == [], doc
    assert alice_ck["id"] in _root_ids(sdaemon)

    # Naming alice as the owner is refused outright, by uid or by name.
    for owner in (str(users.alice.uid), users.alice.name, "0"):
        st, doc = call_as(
            users.bob, sdaemon, "DELETE", f"/v1/checkpoints?older_than=0s&owner={owner}"
        )
        assert (st, doc["code"]) == (403, "permission_denied"), (owner, doc)
    assert alice_ck["id"] in _root_ids(sdaemon)
    # His own name as owner is his own lane.
    st, doc = call_as(
        users.bob,
        sdaemon,
        "DELETE",
        f"/v1/checkpoints?older_than=0s&owner={users.bob.name}&label=team={tag}",
    )
    assert st == 200 and doc["deleted"] == [], doc

    # Root reaches alice's through ?owner=.
    st, doc = sdaemon.client.request(
        "DELETE", f"/v1/checkpoints?label=team={tag}&owner={users.alice.name}"
    )
    assert [d["id"] for d in doc["deleted"]] == [alice_ck["id"]], doc


def test_quota_over_for_bob_leaves_alice_room(users: Accounts, procs: Procs) -> None:
    args = [
        "--socket-group",
        users.sock_group,
        "--max-checkpoints-per-uid",
        "2",
        "--max-checkpoint-bytes-per-uid",
        "48M",
    ]
    with temp_root() as root:
        d = Daemon(root, args=args).start()
        try:
            _quota_scenario(users, d, procs)
        finally:
            rc = d.stop()
            assert rc == 0, f"daemon exited {rc} on SIGTERM: {d.log()}"


def _quota_scenario(users: Accounts, d: Daemon, procs: Procs) -> None:
    python = os.path.realpath(sys.executable)
    fat = spawn_as(procs, users.bob, [python, "-c", FAT, "64"])
    wait_for(lambda: _rss_mib(fat) >= 64, 30, what="bob's process to fill 64 MiB")
    # Not leave_running: the refusal must come before criu ever runs.
    st, doc = call_as(users.bob, d, "POST", "/v1/checkpoints", {"pid": fat})
    assert (st, doc["code"]) == (507, "quota_exceeded"), doc
    assert doc["limit"] == 48 << 20, doc
    assert os.path.exists(f"/proc/{fat}") and _rss_mib(fat) >= 64

    small = spawn_as(procs, users.bob, SLEEP)
    for _ in range(2):
        st, doc = _checkpoint(users.bob, d, small)
        assert st == 201, doc
    st, doc = _checkpoint(users.bob, d, small)
    assert (st, doc["code"]) == (409, "quota_exceeded"), doc
    assert (doc["limit"], doc["usage"]) == (2, 2), doc
    # Bob's quota is his alone: alice still checkpoints, and so does root.
    st, doc = _checkpoint(users.alice, d, spawn_as(procs, users.alice, SLEEP))
    assert st == 201, doc
    st, doc = d.client.request(
        "POST", "/v1/checkpoints", {"pid": procs.spawn(SLEEP).pid, "leave_running": True}
    )
    assert st == 201, doc
