"""Root's dumps walk the tree while criu holds it frozen (criud.dump.frozen, issue 13).

criu's argv is guessed from the root task (its stdio's pty slaves) and
checked against the walk at criu's post-dump stop: these tests drive the
guess right and wrong through the real daemon and real criu, and check
that a wrong guess leaves nothing behind and the dump runs again walk
first, with the externals a restore needs.
"""

from __future__ import annotations

import os
import select
import time
from pathlib import Path

from tests.integration.helpers import (
    Daemon,
    Procs,
    new_pty,
    pid_gone,
    proc_state,
    tty_key_of,
    wait_for,
)

# A lone process walks first below criud.dump.job.FROZEN_MIN_FDS fds: the
# trees here hold that many more (/dev/null, read-only) to walk frozen.
MORE_FDS = "import os\n_more = [os.open('/dev/null', os.O_RDONLY) for _ in range(70)]\n"

# criu logs this on the RPC path with notifications on (the frozen walk).
FROZEN_MARK = "RPC NOTIFY query-ext-files"
RETRY_MARK = "the dump runs again, walk first"
# ... after criu failed on its own (a pty slave without its master).
FAILED_MARK = "criu failed on an argv the walk corrects"
# ... after the daemon failed the dump at criu's post-dump stop.
REFUSED_MARK = "criu's argv differs from the walk's"

# Holds the pty slave named in argv[1] at fd 3 (stdio is /dev/null), says
# "ready" on it, then echoes a tick on it every 0.1 s.
ON_FD3 = r"""
import os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_NOCTTY)
assert fd == 3, fd
_more = [os.open("/dev/null", os.O_RDONLY) for _ in range(70)]
i = 0
while True:
    os.write(3, f"tick {i}\n".encode())
    i += 1
    time.sleep(0.1)
"""

# Opens a pty pair of its own and puts the slave on its fds 0-2; the master
# stays open in it.  Prints nothing.
OWN_PAIR = r"""
import os, time
_more = [os.open("/dev/null", os.O_RDONLY) for _ in range(70)]
m, s = os.openpty()
for n in (0, 1, 2):
    os.dup2(s, n)
os.close(s)
while True:
    time.sleep(1)
"""


def dump_log(daemon: Daemon, ckpt_id: str) -> str:
    return (daemon.state_dir / "checkpoints" / ckpt_id / "dump.log").read_text(errors="replace")


def read_tick(master: int, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    buf = b""
    while time.monotonic() < deadline:
        if select.select([master], [], [], 0.2)[0]:
            buf += os.read(master, 4096)
            if b"tick" in buf:
                return buf.decode(errors="replace")
    raise AssertionError(f"no tick within {timeout} s: {buf!r}")


def leftovers(daemon: Daemon) -> list[str]:
    return [p.name for p in (daemon.state_dir / "checkpoints").iterdir() if p.name.startswith(".")]


def records_of(daemon: Daemon, pid: int) -> list[dict[str, object]]:
    return [c for c in daemon.client.checkpoints() if c.get("pid") == pid]


def test_a_root_dump_walks_the_tree_criu_froze(daemon: Daemon, procs: Procs) -> None:
    r, w = os.pipe()
    try:
        key = f"pipe:[{os.fstat(w).st_ino}]"
        p = procs.python(MORE_FDS + "import time\ntime.sleep(1000)\n", stdout=w)
        wait_for(lambda: len(os.listdir(f"/proc/{p.pid}/fd")) >= 73, 10, what="its fds")
        before = daemon.client.inspect_pid(p.pid)
        ck = daemon.client.checkpoint(p.pid, leave_running=True)
    finally:
        os.close(r)
        os.close(w)
    assert FROZEN_MARK in dump_log(daemon, ck["id"])
    # The manifest is the walk's, as the walk-first dump would have it.
    assert ck["external"] == [key]
    fds = daemon.client.inspect(ck["id"])["fds"]
    walked = [(f["fd"], f["type"], f["key"], f["external"]) for f in before["tasks"][0]["fds"]]
    assert [(f["fd"], f["type"], f["key"], f["external"]) for f in fds] == walked
    assert ck["fd_summary"]["total"] == len(walked)
    assert RETRY_MARK not in daemon.log()


def test_a_pty_the_guess_missed_makes_the_dump_run_again(daemon: Daemon, procs: Procs) -> None:
    # The guess reads the root's fds 0-2 only: a pty slave at fd 3 whose
    # master is the test's is missed, and criu refuses "slave without
    # master"; the dump runs again walk first, which names it external.
    with new_pty() as (master, slave), new_pty() as (master2, slave2):
        key = tty_key_of(slave)
        p = procs.python(ON_FD3, os.ttyname(slave))
        read_tick(master)
        wait_for(lambda: len(os.listdir(f"/proc/{p.pid}/fd")) >= 74, 10, what="its fds")
        ck = daemon.client.checkpoint(p.pid)
        assert ck["external"] == [key]
        assert FROZEN_MARK not in dump_log(daemon, ck["id"])
        assert FAILED_MARK in daemon.log()
        # The failed run left no record and no images dir behind.
        assert [c["id"] for c in records_of(daemon, p.pid)] == [ck["id"]]
        assert leftovers(daemon) == []
        p.wait(timeout=10)
        # The key the walk found restores onto a new pty.
        r = daemon.client.restore(ck["id"], fds={key: slave2})
        procs.adopt(r["pid"])
        os.close(slave2)
        assert "tick" in read_tick(master2)
        daemon.client.signal(r["id"], "SIGKILL")
        wait_for(lambda: pid_gone(r["pid"]) or proc_state(r["pid"]) == "Z", 10, what="tree dead")


def test_a_wrong_guess_is_refused_at_post_dump_and_runs_again(daemon: Daemon, procs: Procs) -> None:
    # A pty slave on the root's stdio is guessed external, but the root
    # holds its master too: the walk says it is paired, criu is told to
    # fail at post-dump (the tree runs on), and the dump runs again.  (About
    # one run in ten here, criu refuses that argv on its own before
    # post-dump; the walk then says why, and the dump runs again all the
    # same.)
    p = procs.python(OWN_PAIR)
    wait_for(lambda: len(os.listdir(f"/proc/{p.pid}/fd")) >= 74, 10, what="pty pair open")
    ck = daemon.client.checkpoint(p.pid, leave_running=True)
    assert ck["external"] == []
    assert REFUSED_MARK in daemon.log() or FAILED_MARK in daemon.log()
    assert FROZEN_MARK not in dump_log(daemon, ck["id"])
    assert [c["id"] for c in records_of(daemon, p.pid)] == [ck["id"]]
    assert leftovers(daemon) == []
    assert p.poll() is None and proc_state(p.pid) in ("S", "R")
    # It restores as it was: both ends inside the tree, nothing to hand in.
    p.kill()
    p.wait(timeout=10)
    r = daemon.client.restore(ck["id"])
    procs.adopt(r["pid"])
    assert proc_state(r["pid"]) in ("S", "R")
    assert Path(f"/proc/{r['pid']}/fd/0").resolve().name.isdigit()


# A parent and 24 children, all `sleep`s holding only /dev/null: nothing
# of theirs is external.
FAMILY = r"""
import os, subprocess, sys, time
kids = [subprocess.Popen(["sleep", "1000"], stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(24)]
time.sleep(1000)
"""


def family(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [pid, *map(int, f.read().split())]
    except OSError:
        return []


def test_a_family_walked_beside_criu_is_recorded_as_it_is(daemon: Daemon, procs: Procs) -> None:
    # 25 tasks, walked while criu dumps them one by one: every dump records
    # exactly the fds the tasks hold, and nothing external.  (While criu
    # dumps a task, its parasite holds criu's fds there; the walk may read
    # the task then: criud.dump.job._as_left, tests/unit/dump/test_job.py.)
    p = procs.python(FAMILY)
    wait_for(lambda: len(family(p.pid)) == 25, 20, what="25 tasks")
    before = daemon.client.inspect_pid(p.pid)
    want = {(t["pid"], f["fd"], f["key"]) for t in before["tasks"] for f in t["fds"]}
    assert len(before["tasks"]) == 25
    for _ in range(8):
        ck = daemon.client.checkpoint(p.pid, leave_running=True)
        assert ck["external"] == [], ck["external"]
        assert FROZEN_MARK in dump_log(daemon, ck["id"])
        got = {(f["pid"], f["fd"], f["key"]) for f in daemon.client.inspect(ck["id"])["fds"]}
        assert got == want
        daemon.client.delete(ck["id"])
