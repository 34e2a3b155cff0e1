"""Terminals, FIFOs and the `stdio` shorthand: container stdio handed over like pipes (issue 17).

Real ptys (os.openpty), real FIFOs, real criu, through the daemon's sockets.
The test plays the engine: it holds the pty master or the FIFO's reader
outside the tree, and hands a new slave or FIFO end in at restore.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import stat
import struct
import subprocess
import sys
import tempfile
import termios
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from criud.api.client import CriudClientError
from tests.integration.helpers import Daemon, Procs, pid_gone, proc_state, wait_for

# A session leader on the pty at fds 0-2: takes it as its controlling
# terminal, prints a tick with its terminal, its foreground group, its group
# and the window size, and echoes every line typed at it.
TTY_TREE = r"""
import fcntl, os, select, sys, termios
fcntl.ioctl(0, termios.TIOCSCTTY, 0)
i = 0
while True:
    cols, rows = os.get_terminal_size(0)
    print(f"tick {i} {os.ttyname(0)} fg={os.tcgetpgrp(0)} pg={os.getpgrp()} size={cols}x{rows}",
          flush=True)
    i += 1
    if select.select([0], [], [], 0.1)[0]:
        print("got " + sys.stdin.readline().strip(), flush=True)
"""

# Reads lines from stdin and answers each on stdout and stderr; ticks on both.
STDIO_TREE = r"""
import os, select, sys
i = 0
while True:
    print(f"tick {i}", flush=True)
    print(f"etick {i}", file=sys.stderr, flush=True)
    i += 1
    if select.select([0], [], [], 0.1)[0]:
        line = sys.stdin.readline()
        if line:
            print("out " + line.strip(), flush=True)
            print("err " + line.strip(), file=sys.stderr, flush=True)
"""

HELLO = r"""
import sys, time
i = 0
while True:
    sys.stdout.write(f"hello {i}\n")
    sys.stdout.flush()
    i += 1
    time.sleep(0.05)
"""


def read_until(fd: int, want: Callable[[str], bool], timeout: float = 15.0) -> str:
    """Read lines from fd (a pty master or a pipe) until one satisfies want; return it."""
    buf = b""
    deadline = time.monotonic() + timeout
    while True:
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            text = line.decode(errors="replace").strip("\r")
            if want(text):
                return text
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no wanted line within {timeout}s (left {buf[-200:]!r})")
        if select.select([fd], [], [], left)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the pty's slave side is all closed
                chunk = b""
            if not chunk:
                raise AssertionError(f"EOF while waiting (left {buf[-200:]!r})")
            buf += chunk


def drain_ticks(fd: int, last: int, timeout: float = 10.0) -> int:
    """Read what a dead tree left on a pty master or pipe, to EOF; the last tick seen."""
    data = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not select.select([fd], [], [], 0.5)[0]:
            continue
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: a pty master whose slaves are all closed
            break
        if not chunk:
            break
        data += chunk
    else:
        raise AssertionError("no EOF from the dead tree's output")
    for line in data.decode(errors="replace").splitlines():
        if line.strip("\r").startswith("tick "):
            last = tick_of(line.strip("\r"))
    return last


def tick_of(line: str) -> int:
    return int(line.split()[1])


def is_tick(line: str) -> bool:
    return line.startswith("tick ")


def raw(master: int) -> None:
    """No echo on the engine's side, so what it reads is only what the tree wrote."""
    attrs = termios.tcgetattr(master)
    attrs[3] &= ~termios.ECHO
    termios.tcsetattr(master, termios.TCSANOW, attrs)


def set_winsize(master: int, rows: int, cols: int) -> None:
    fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def tty_key_of(fd: int) -> str:
    st = os.fstat(fd)
    return f"tty[{st.st_rdev:x}:{st.st_dev:x}]"


def proc_stat(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    return data[data.rindex(")") + 2 :].split()


def dead(pid: int) -> bool:
    return pid_gone(pid) or proc_state(pid) == "Z"


@contextlib.contextmanager
def new_pty() -> Iterator[tuple[int, int]]:
    master, slave = os.openpty()
    try:
        yield master, slave
    finally:
        for fd in (master, slave):
            with contextlib.suppress(OSError):
                os.close(fd)


def start_tty_tree(procs: Procs, slave: int) -> subprocess.Popen[bytes]:
    # start_new_session: its own session, so it can take the pty as its terminal.
    return procs.python(TTY_TREE, stdin=slave, stdout=slave, stderr=slave)


# -- a plain tree on a pty --------------------------------------------------------------


@pytest.mark.parametrize("form", ["key", "pid_fd"])
def test_pty_tree_restored_onto_a_new_pty(daemon: Daemon, procs: Procs, form: str) -> None:
    with new_pty() as (master, slave), new_pty() as (master2, slave2):
        raw(master)
        key = tty_key_of(slave)
        p = start_tty_tree(procs, slave)
        os.close(slave)
        first = read_until(master, is_tick)
        assert f"fg={p.pid} pg={p.pid}" in first

        tree = daemon.client.inspect_pid(p.pid)
        fd0 = next(f for f in tree["tasks"][0]["fds"] if f["fd"] == 0)
        assert fd0["type"] == "tty" and fd0["key"] == key and fd0["external"] is True
        pre = daemon.client.preflight(p.pid)
        assert pre["ok"] is True, pre
        assert pre["restore_keys"] == [key]

        ck = daemon.client.checkpoint(p.pid)  # no shell_job
        assert ck["external"] == [key]
        assert all(f["external"] for f in ck["fds"] if f["fd"] in (0, 1, 2))
        p.wait(timeout=10)
        last = drain_ticks(master, tick_of(first))

        raw(master2)
        new_name = os.ttyname(slave2)
        new_rdev = os.fstat(slave2).st_rdev
        fds = {key: slave2} if form == "key" else {(p.pid, 0): slave2}
        r = daemon.client.restore(ck["id"], fds=fds)
        procs.adopt(r["pid"])
        os.close(slave2)
        # The engine sets the window size on its new master.
        set_winsize(master2, 33, 101)
        line = read_until(master2, lambda s: is_tick(s) and "size=101x33" in s)
        assert tick_of(line) > last
        pid = r["pid"]
        # Its terminal is the new pty, and it is again the foreground group there.
        assert f" {new_name} fg={pid} pg={pid} " in line, line
        st = proc_stat(pid)
        assert int(st[3]) == pid  # session leader
        assert int(st[4]) == new_rdev  # tty_nr: its controlling terminal
        # Input typed on the new master reaches the tree.
        os.write(master2, b"ping\n")
        read_until(master2, lambda s: s == "got ping")
        daemon.client.signal(r["id"], "SIGKILL")
        wait_for(lambda: dead(pid), 10, what="restored tree to die")
