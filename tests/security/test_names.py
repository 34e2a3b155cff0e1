"""Checkpoint names belong to their owner: no cross-user conflicts, leaks or squatting.

A name is unique per owner uid.  A bare name resolves among the caller's
own checkpoints only (root's too: root reaches another user's checkpoint
by id, by `owner/name` in a body or on the CLI, or by `?owner=` in a path).
"""

from __future__ import annotations

import secrets
import subprocess
from typing import Any

from tests.integration.helpers import Daemon, Procs, wait_for
from tests.security.users import Accounts, User, call_as, calls_as, spawn_as, uid_of

SLEEP = ["sleep", "1000"]


def _tag() -> str:
    # The daemon is shared by the session: a fresh name per test.
    return "web" + secrets.token_hex(3)


def _checkpoint(
    user: User, daemon: Daemon, pid: int, name: str, leave_running: bool = True
) -> tuple[int, Any]:
    body = {"pid": pid, "name": name, "leave_running": leave_running}
    return call_as(user, daemon, "POST", "/v1/checkpoints", body)


def _root(daemon: Daemon, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    from criud.api.client import CriudClientError

    try:
        return daemon.client.request(method, path, body)
    except CriudClientError as e:
        return e.status, e.problem


def test_two_users_use_the_same_name(users: Accounts, sdaemon: Daemon, procs: Procs) -> None:
    name = _tag()
    st, alice_ck = _checkpoint(users.alice, sdaemon, spawn_as(procs, users.alice, SLEEP), name)
    assert st == 201, alice_ck
    bob_pid = spawn_as(procs, users.bob, SLEEP)
    # Another user's name is no obstacle, and so nothing to learn from.
    st, bob_ck = _checkpoint(users.bob, sdaemon, bob_pid, name)
    assert st == 201, bob_ck
    assert bob_ck["owner_uid"] == users.bob.uid and alice_ck["owner_uid"] == users.alice.uid
    # Bob's own duplicate is a conflict; its answer names only bob's name.
    st, doc = _checkpoint(users.bob, sdaemon, bob_pid, name)
    assert (st, doc["code"]) == (409, "name_taken"), doc
    assert alice_ck["id"] not in str(doc) and users.alice.name not in str(doc)
    # Each user's bare name reaches its own checkpoint.
    for user, ck in ((users.alice, alice_ck), (users.bob, bob_ck)):
        st, doc = call_as(user, sdaemon, "GET", f"/v1/checkpoints/{name}")
        assert (st, doc["id"], doc["owner_uid"]) == (200, ck["id"], user.uid)
    # A list shows each checkpoint's owner; root sees both under one name.
    _, listed = _root(sdaemon, "GET", "/v1/checkpoints")
    mine = {c["id"]: c["owner_uid"] for c in listed if c["name"] == name}
    assert mine == {alice_ck["id"]: users.alice.uid, bob_ck["id"]: users.bob.uid}


def test_root_bare_name_never_reaches_a_users_checkpoint(
    users: Accounts, sdaemon: Daemon, procs: Procs
) -> None:
    name = _tag()
    # No supplementary groups: criu runs as bob with none, and cannot setgroups.
    bob = users.bob
    setpriv = ["setpriv", f"--reuid={bob.uid}", f"--regid={bob.gid}", "--clear-groups"]
    bob_pid = procs.spawn([*setpriv, *SLEEP], cwd="/").pid
    wait_for(lambda: uid_of(bob_pid) == bob.uid, 10, what="bob's sleep")
    st, bob_ck = _checkpoint(users.bob, sdaemon, bob_pid, name, leave_running=False)
    assert st == 201, bob_ck
    procs.popens[-1].wait(timeout=10)  # criu killed it; reap it so its pid is free
    # Root has no checkpoint of that name: every bare use is a 404, bob's is untouched.
    for method, path, body in [
        ("GET", f"/v1/checkpoints/{name}", None),
        ("GET", f"/v1/checkpoints/{name}/log", None),
        ("POST", "/v1/restores", {"checkpoint": name}),
        ("DELETE", f"/v1/checkpoints/{name}", None),
    ]:
        st, doc = _root(sdaemon, method, path, body)
        assert (st, doc["code"]) == (404, "checkpoint_not_found"), (method, path, doc)
    assert call_as(users.bob, sdaemon, "GET", f"/v1/checkpoints/{bob_ck['id']}")[0] == 200

    # Root's own checkpoint of that name is what its bare name means.
    root_proc = procs.spawn(SLEEP)
    st, root_ck = _root(
        sdaemon,
        "POST",
        "/v1/checkpoints",
        {"pid": root_proc.pid, "name": name, "leave_running": True},
    )
    assert st == 201 and root_ck["owner_uid"] == 0, root_ck
    assert _root(sdaemon, "GET", f"/v1/checkpoints/{name}")[1]["id"] == root_ck["id"]

    # bob's is reached by ?owner= (uid or name) in a path, owner/name in a body.
    for owner in (str(users.bob.uid), users.bob.name):
        st, doc = _root(sdaemon, "GET", f"/v1/checkpoints/{name}?owner={owner}")
        assert (st, doc["id"]) == (200, bob_ck["id"]), doc
        st, text = _root(sdaemon, "GET", f"/v1/checkpoints/{name}/log?owner={owner}")
        assert st == 200 and "Dumping finished successfully" in text
    st, rs = _root(sdaemon, "POST", "/v1/restores", {"checkpoint": f"{users.bob.name}/{name}"})
    assert st == 201, rs
    procs.adopt(rs["pid"])
    assert rs["checkpoint"] == bob_ck["id"] and uid_of(rs["pid"]) == users.bob.uid
    assert _root(sdaemon, "POST", f"/v1/restores/{rs['id']}/signal", {"signal": "KILL"})[0] == 200

    # Deleting root's bare name deletes root's; bob's goes only by owner.
    assert _root(sdaemon, "DELETE", f"/v1/checkpoints/{name}")[0] == 204
    assert call_as(users.bob, sdaemon, "GET", f"/v1/checkpoints/{name}")[0] == 200
    st, _ = _root(sdaemon, "DELETE", f"/v1/checkpoints/{name}?owner={users.bob.uid}")
    assert st == 204
    assert call_as(users.bob, sdaemon, "GET", f"/v1/checkpoints/{name}")[0] == 404


def test_owner_form_never_crosses_users(users: Accounts, sdaemon: Daemon, procs: Procs) -> None:
    name = _tag()
    st, alice_ck = _checkpoint(users.alice, sdaemon, spawn_as(procs, users.alice, SLEEP), name)
    assert st == 201, alice_ck
    absent = f"{name}x"
    answers = {}
    for ref in (name, absent):
        for owner in (str(users.alice.uid), users.alice.name):
            answers[ref, owner] = calls_as(
                users.bob,
                sdaemon,
                [
                    ("GET", f"/v1/checkpoints/{ref}?owner={owner}", None),
                    ("GET", f"/v1/checkpoints/{ref}/log?owner={owner}", None),
                    ("POST", "/v1/restores", {"checkpoint": f"{owner}/{ref}"}),
                    ("DELETE", f"/v1/checkpoints/{ref}?owner={owner}", None),
                ],
            )
    for (ref, owner), got in answers.items():
        for st, doc in got:
            assert (st, doc["code"]) == (404, "checkpoint_not_found"), (ref, owner, doc)
            assert alice_ck["id"] not in str(doc)
        # Alice's checkpoint and one that does not exist are told apart by nothing.
        twin = answers[absent, owner] if ref == name else answers[name, owner]
        assert [d["detail"].replace(absent, name) for _, d in got] == [
            d["detail"].replace(absent, name) for _, d in twin
        ]
    assert call_as(users.alice, sdaemon, "GET", f"/v1/checkpoints/{name}")[0] == 200
    # Bob's owner form naming himself works like his bare name.
    bob_pid = spawn_as(procs, users.bob, SLEEP)
    st, bob_ck = _checkpoint(users.bob, sdaemon, bob_pid, name)
    assert st == 201, bob_ck
    st, doc = call_as(users.bob, sdaemon, "GET", f"/v1/checkpoints/{name}?owner={users.bob.name}")
    assert (st, doc["id"]) == (200, bob_ck["id"])


def test_cli_takes_owner_slash_name(users: Accounts, sdaemon: Daemon, procs: Procs) -> None:
    name = _tag()
    st, bob_ck = _checkpoint(users.bob, sdaemon, spawn_as(procs, users.bob, SLEEP), name)
    assert st == 201, bob_ck
    for ref in (f"{users.bob.uid}/{name}", f"{users.bob.name}/{name}"):
        out = subprocess.run(
            sdaemon.cli("--json", "inspect", ref), capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        assert '"id": "' + bob_ck["id"] + '"' in out.stdout
    out = subprocess.run(sdaemon.cli("inspect", name), capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "No such checkpoint" in out.stderr
    out = subprocess.run(sdaemon.cli("ls"), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    row = next(ln for ln in out.stdout.splitlines() if bob_ck["id"] in ln)
    assert users.bob.name in row.split()
