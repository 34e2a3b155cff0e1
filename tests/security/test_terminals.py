"""Terminals and the stdio shorthand as a non-root user (issue 17).

A user restores its own tree onto a new pty handed over the fd socket, with
its own handle; another user's handle is refused, whatever the shorthand.
"""

from __future__ import annotations

import os
import time

from tests.integration.helpers import Daemon, Procs, wait_for
from tests.integration.test_stdio import (
    dead,
    drain_ticks,
    is_tick,
    new_pty,
    proc_stat,
    raw,
    read_until,
    tick_of,
)
from tests.security.test_paths import checkpoint_as, spawn_target
from tests.security.users import Accounts, User, call_as, run_as

# A session leader on its pty (setsid -c: TIOCSCTTY), ticking.  Shell, not
# python: criu, running as the user, must reach every mapped file by path.
TICKS = "i=0; while :; do echo tick $i; i=$((i+1)); sleep 0.1; done"

# As the user: hand fds (numbers inherited from us) to the daemon; print the handle.
SEND = r"""
import sys
from criud.api.client import Client
c = Client(sys.argv[1], sys.argv[2], timeout=60)
print(c.send_fds([int(n) for n in sys.argv[3].split(",")])["handle"])
"""


def send_as(user: User, daemon: Daemon, fds: list[int]) -> str:
    out = run_as(
        user,
        SEND,
        str(daemon.socket),
        str(daemon.fd_socket),
        ",".join(map(str, fds)),
        pass_fds=fds,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_user_restores_its_pty_tree_onto_a_new_pty(
    users: Accounts, sdaemon: Daemon, procs: Procs
) -> None:
    bob = users.bob
    with new_pty() as (master, slave), new_pty() as (master2, slave2):
        raw(master)
        # Not a process group leader, so setsid(1) needs no fork: p is the root.
        p = spawn_target(
            procs,
            bob,
            ["setsid", "-c", "sh", "-c", TICKS],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=False,
        )
        os.close(slave)
        first = read_until(master, is_tick)
        (ck,) = checkpoint_as(bob, sdaemon, p.pid)  # no shell_job
        p.wait(timeout=10)
        last = drain_ticks(master, tick_of(first))

        # Another user's handle is refused for the shorthand, as for a mapping.
        alices = send_as(users.alice, sdaemon, [slave2, slave2, slave2])
        st, doc = call_as(
            bob, sdaemon, "POST", "/v1/restores", {"checkpoint": ck, "stdio": {"handle": alices}}
        )
        assert st == 422 and doc["code"] == "bad_fd_handle", doc
        assert "another uid" in doc["detail"]

        raw(master2)
        new_rdev = os.fstat(slave2).st_rdev
        handle = send_as(bob, sdaemon, [slave2, slave2, slave2])
        os.close(slave2)
        body = {"checkpoint": ck, "stdio": {"handle": handle}}
        st, r = call_as(bob, sdaemon, "POST", "/v1/restores", body)
        # The tree's last `sleep 0.1` was killed with it and left a zombie
        # for PID 1, which here reaps orphans late (CRIU-NOTES), at times
        # later than the daemon's 3 s pid wait: 409 pid_in_use is then the
        # daemon's right answer, and an engine retries.  So do we, bounded.
        deadline = time.monotonic() + 30
        while st == 409 and r.get("code") == "pid_in_use" and time.monotonic() < deadline:
            time.sleep(1)
            st, r = call_as(bob, sdaemon, "POST", "/v1/restores", body)
        assert st == 201, r
        procs.adopt(r["pid"])
        pid = r["pid"]
        try:
            assert tick_of(read_until(master2, is_tick)) > last
            # Its session, controlling terminal (the new pty) and foreground group.
            st = proc_stat(pid)
            assert (int(st[3]), int(st[4]), int(st[5])) == (pid, new_rdev, pid)
            with open(f"/proc/{pid}/status") as f:
                assert f"Uid:\t{bob.uid}\t{bob.uid}" in f.read()
        finally:
            os.kill(pid, 9)
            wait_for(lambda: dead(pid), 10, what="restored tree to die")
