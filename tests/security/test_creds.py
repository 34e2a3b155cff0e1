"""The credentials criu runs with, and what a daemon killed mid-restore leaves.

Root here lacks CAP_SYS_RESOURCE, so a user's tree is dumped and restored by
criu running as its owner (setpriv, --unprivileged).  These tests act as
real users through the real sockets.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from criud.daemon import orphans
from criud.daemon.procutil import children
from tests.integration.helpers import (
    Daemon,
    Procs,
    _shared_src,
    other_children,
    pid_gone,
    proc_state,
    read_line,
    temp_root,
    wait_for,
)
from tests.security.users import CALLS, Accounts, User, call_as, spawn_as

# A system interpreter for processes users dump: criu, running as the user,
# must stat the exe's path, and the venv's (even its target) may sit in a
# dir the user cannot search.
PY = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else os.path.realpath(sys.executable)


def status_field(pid: int, name: str) -> list[int]:
    """The numbers of one /proc/<pid>/status line (Uid:, Gid:, Groups:)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return [int(x) for x in line.split()[1:]]
    raise AssertionError(f"no {name} in /proc/{pid}/status")


def running_untraced(pid: int) -> bool:
    if proc_state(pid) not in ("S", "R"):
        return False
    with open(f"/proc/{pid}/status") as f:
        return "TracerPid:\t0\n" in f.read()


# -- 6: a user's restore keeps the tree's supplementary groups -----------------------


def test_user_with_groups_checkpoints_and_restores(
    users: Accounts, sdaemon: Daemon, procs: Procs
) -> None:
    alice = users.alice
    assert len(alice.groups) >= 3 and set(users.extra_gids) <= set(alice.groups)
    pid = spawn_as(procs, alice, ["sleep", "1000"])
    assert tuple(status_field(pid, "Groups")) == alice.groups

    # Not leave_running: the process is killed, as an engine's checkpoint does.
    st, ck = call_as(alice, sdaemon, "POST", "/v1/checkpoints", {"pid": pid})
    assert st == 201, ck
    assert ck["state"] == "done"
    procs.popens[-1].wait(timeout=10)
    wait_for(lambda: pid_gone(pid), 15, what=f"pid {pid} to be reaped")

    st, r = call_as(alice, sdaemon, "POST", "/v1/restores", {"checkpoint": ck["id"]})
    assert st == 201, r
    procs.adopt(r["pid"])
    assert r["state"] == "running"
    assert status_field(r["pid"], "Uid") == [alice.uid] * 4
    assert status_field(r["pid"], "Gid") == [alice.gid] * 4
    assert tuple(status_field(r["pid"], "Groups")) == alice.groups
    # And it keeps running.
    st, again = call_as(alice, sdaemon, "GET", f"/v1/restores/{r['id']}")
    assert st == 200 and again["state"] == "running"
    assert running_untraced(r["pid"])


# -- 10: mixed ids in a tree are refused before anything is frozen ------------------

# Run as root, then become `uid` with the given resuid/resgid and groups, and sleep.
MIXED = r"""
import json, os, sys, time
ruid, euid, suid, rgid, egid, sgid = json.loads(sys.argv[1])
os.setgroups(json.loads(sys.argv[2]))
os.setresgid(rgid, egid, sgid)
os.setresuid(ruid, euid, suid)
print("ready", flush=True)
time.sleep(1000)
"""


def spawn_mixed(procs: Procs, ids: list[int], groups: tuple[int, ...]) -> int:
    r, w = os.pipe()
    try:
        p = procs.spawn(
            [PY, "-c", MIXED, json.dumps(ids), json.dumps(list(groups))],
            stdout=w,
            cwd="/",
        )
        os.close(w)
        assert read_line(r, 20).strip() == b"ready"
    finally:
        os.close(r)
    return p.pid


def assert_refused_untouched(
    user: User | None, daemon: Daemon, pid: int, status: int, code: str
) -> dict[str, Any]:
    before = set(os.listdir(daemon.state_dir / "checkpoints"))
    if user is None:
        st, body = daemon_call(daemon, "POST", "/v1/checkpoints", {"pid": pid})
    else:
        st, body = call_as(user, daemon, "POST", "/v1/checkpoints", {"pid": pid})
    assert (st, body.get("code")) == (status, code), body
    assert running_untraced(pid)
    # No record, no dir: the refusal came before anything was written.
    assert all(c.get("pid") != pid for c in daemon.client.checkpoints())
    assert set(os.listdir(daemon.state_dir / "checkpoints")) == before
    return dict(body)


def daemon_call(daemon: Daemon, method: str, path: str, body: Any) -> tuple[int, Any]:
    from criud.api.client import CriudClientError

    try:
        st, doc = daemon.client.request(method, path, body)
    except CriudClientError as e:
        return e.status, e.problem
    return st, doc


def test_mixed_ids_are_refused_before_freezing(
    users: Accounts, sdaemon: Daemon, procs: Procs
) -> None:
    bob = users.bob
    other = users.extra_gids[0]  # a group bob is not in
    # bob's process, setgid: its effective gid is another group.
    setgid = spawn_mixed(procs, [bob.uid] * 3 + [bob.gid, other, bob.gid], bob.groups)
    assert status_field(setgid, "Gid") == [bob.gid, other, bob.gid, other]
    # bob's process that kept a saved uid of 0: it could become root again.
    saved0 = spawn_mixed(procs, [bob.uid, bob.uid, 0] + [bob.gid] * 3, bob.groups)
    assert status_field(saved0, "Uid") == [bob.uid, bob.uid, 0, bob.uid]

    body = assert_refused_untouched(bob, sdaemon, setgid, 403, "mixed_credentials")
    assert str(other) in body["detail"]
    body = assert_refused_untouched(bob, sdaemon, saved0, 403, "mixed_credentials")
    assert "0" in body["detail"].split("uids")[1]
    # Root cannot dump them either here (no CAP_SYS_RESOURCE, and criu as the
    # owner is impossible with mixed ids): a clear refusal, not a criu failure.
    assert_refused_untouched(None, sdaemon, saved0, 422, "needs_cap_sys_resource")
    assert_refused_untouched(None, sdaemon, setgid, 422, "needs_cap_sys_resource")
    # A uniform tree of bob's still checkpoints, as bob and as root.
    plain = spawn_as(procs, bob, ["sleep", "1000"])
    st, ck = call_as(bob, sdaemon, "POST", "/v1/checkpoints", {"pid": plain, "leave_running": True})
    assert st == 201, ck
    st, ck = daemon_call(sdaemon, "POST", "/v1/checkpoints", {"pid": plain, "leave_running": True})
    assert st == 201, ck


def test_a_leftover_with_a_saved_uid_of_root_is_not_the_users(
    users: Accounts, procs: Procs
) -> None:
    # What a cancelled restore of alice's kills (criud.daemon.orphans): a
    # recorded pid, started after criu, a child of the daemon, as one of the
    # tree's uids.  A task whose real uid is alice's but whose saved uid is 0
    # can become root again: it is not alice's leftover, whatever else fits.
    alice = users.alice
    info = orphans.plan([], [alice.uid], False)
    saved0 = spawn_mixed(procs, [alice.uid, alice.uid, 0] + [alice.gid] * 3, alice.groups)
    assert status_field(saved0, "Uid") == [alice.uid, alice.uid, 0, alice.uid]
    euid0 = spawn_mixed(procs, [alice.uid, 0, alice.uid] + [alice.gid] * 3, alice.groups)
    assert status_field(euid0, "Uid")[:3] == [alice.uid, 0, alice.uid]
    for pid in (saved0, euid0):
        got = orphans.kill_leftovers({**info, "pids": [pid]}, 0, (os.getpid(),))
        assert got == ([], []), pid
        assert running_untraced(pid)
    # The same, wholly alice's: killed (the check still finds real leftovers).
    plain = spawn_mixed(procs, [alice.uid] * 3 + [alice.gid] * 3, alice.groups)
    killed, _ = orphans.kill_leftovers({**info, "pids": [plain]}, 0, (os.getpid(),))
    assert killed == [plain]
    assert procs.popens[-1].wait(timeout=10) == -signal.SIGKILL


# -- 7: SIGKILL of the daemon during a restore --------------------------------------

# Touch `mib` MiB (so a restore takes a while), say so, and sleep.
BIG = r"""
import sys, time
buf = bytearray(int(sys.argv[1]) << 20)
for i in range(0, len(buf), 4096):
    buf[i] = 1
open(sys.argv[2], "w").close()
time.sleep(3600)
"""


def popen_calls_as(user: User, daemon: Daemon, calls: list[Any]) -> subprocess.Popen[str]:
    """Start API calls as user in the background (the daemon will die under them)."""
    return subprocess.Popen(
        [
            *user.setpriv(),
            PY,
            "-c",
            CALLS,
            str(daemon.socket),
            str(daemon.fd_socket),
            json.dumps(calls),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd="/",
        env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(_shared_src())},
    )


def criu_child(daemon_pid: int) -> int | None:
    # A warm worker is idle root's criu; bob's runs as the CLI.
    for c in other_children(daemon_pid):
        try:
            if Path(f"/proc/{c}/comm").read_text().strip() == "criu":
                return c
        except OSError:
            continue
    return None


def test_daemon_killed_mid_restore_leaves_no_orphan(users: Accounts, procs: Procs) -> None:
    # bob's, not root's: the interesting case is criu running as the owner
    # (the uid the recovery must recognise is bob's, not the daemon's).
    bob = users.bob
    args = ["--socket-group", users.sock_group]
    with temp_root() as root:
        # A ready file, not a pipe: the dumped tree must hold nothing external.
        (root / "bob").mkdir()
        os.chown(root / "bob", bob.uid, bob.gid)
        ready = root / "bob" / "ready"
        p = procs.spawn([*bob.setpriv(), PY, "-c", BIG, "768", str(ready)], cwd="/")
        wait_for(ready.exists, 120, what="768 MiB to be touched")
        pid = p.pid
        d = Daemon(root, args=args).start()
        try:
            st, ck = call_as(bob, d, "POST", "/v1/checkpoints", {"pid": pid})
            assert st == 201, ck
            p.wait(timeout=30)
            wait_for(lambda: pid_gone(pid), 15, what=f"pid {pid} to be reaped")

            bg = popen_calls_as(bob, d, [("POST", "/v1/restores", {"checkpoint": ck["id"]})])
            try:
                criu = wait_for(
                    lambda: criu_child(d.pid) or bg.poll() is not None,
                    60,
                    0.005,
                    what="criu to start",
                )
                assert bg.poll() is None, bg.communicate()
                # Once criu has forked the tree's root, the restore is under way.
                wait_for(lambda: not pid_gone(pid), 60, 0.005, what="criu to fork the root")
                procs.adopt(pid)
                d.kill()
                wait_for(lambda: pid_gone(criu), 15, what="criu to die with the daemon")
            finally:
                bg.communicate(timeout=60)
        finally:
            d.stop()

        d2 = Daemon(root, args=args).start()
        try:
            # The restart killed what the dead restore left, and said so.
            wait_for(lambda: pid_gone(pid), 15, what=f"orphan {pid} to be gone")
            (rs,) = d2.client.restores()
            assert rs["state"] == "failed", rs
            assert rs["error"]["code"] == "daemon_restarted", rs
            assert str(pid) in rs["error"]["detail"]
            # The images are good for a new restore.
            st, again = call_as(bob, d2, "POST", "/v1/restores", {"checkpoint": ck["id"]})
            assert st == 201, again
            procs.adopt(again["pid"])
            assert again["pid"] == pid
            assert status_field(pid, "Uid") == [bob.uid] * 4
            assert running_untraced(pid)
            os.kill(pid, signal.SIGKILL)
        finally:
            assert d2.stop() == 0


# -- 8b: a tree that grows during its dump: checked, never lost ---------------------------

# A shell that starts a short-lived child every few ms: the dump's walk and
# criu's freeze race against it.
FORKER = ["sh", "-c", "while :; do sleep 0.005 & wait; done"]
# The same, its children running a setuid-root program (euid 0 while it runs).
SETUID_FORKER = ["sh", "-c", "while :; do mount >/dev/null & wait; done"]


def _dump_outcomes(users: Accounts, d: Daemon, procs: Procs, argv: list[str]) -> list[str]:
    """Dump fresh trees of argv as bob; check each outcome; what each one was."""
    seen: list[str] = []
    for _ in range(6):
        pid = spawn_as(procs, users.bob, argv)
        st, doc = call_as(users.bob, d, "POST", "/v1/checkpoints", {"pid": pid})
        assert st != 500, doc
        if st == 201:
            # A checkpoint: the tree ends as criu would have ended it.
            assert doc["state"] == "done", doc
            procs.popens[-1].wait(timeout=10)
            seen.append("done")
            continue
        # Refused: nothing was taken from the tree, and it goes on.
        assert proc_state(pid) in ("S", "R"), (st, doc, proc_state(pid))
        kids = set(children(pid))
        wait_for(lambda: set(children(pid)) - kids, 10, what="the refused tree to go on")  # noqa: B023
        with open(f"/proc/{pid}/status") as f:
            assert "TracerPid:\t0\n" in f.read(), "criu let go of it"
        seen.append(str(doc.get("code")))
    return seen


def test_a_tree_that_forks_during_its_dump_is_checkpointed(
    users: Accounts, sdaemon: Daemon, procs: Procs
) -> None:
    # criu leaves a non-root caller's tree stopped (--leave-stopped) until
    # the daemon has checked what it dumped: a child forked after the walk
    # holds, stopped, the ids it was dumped with, and is checked then.
    # Before, such a dump was refused (tree_changed) on every try, after
    # criu had killed the tree: the process was lost.
    seen = _dump_outcomes(users, sdaemon, procs, FORKER)
    assert "done" in seen, seen


def test_a_tree_with_a_setuid_child_is_refused_and_runs_on(
    users: Accounts, sdaemon: Daemon, procs: Procs
) -> None:
    # A child running a setuid-root program (euid 0) is never checkpointed
    # for bob: refused before the freeze (the walk saw it) or after it
    # (tree_changed), and either way the tree is resumed, not lost.
    seen = _dump_outcomes(users, sdaemon, procs, SETUID_FORKER)
    refusals = {"mixed_credentials", "permission_denied", "tree_changed"}
    assert refusals & set(seen), seen
