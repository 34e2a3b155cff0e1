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
import struct
import subprocess
import tempfile
import termios
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from criud.api.client import CriudClientError
from tests.integration.helpers import (
    Daemon,
    Procs,
    new_pty,
    pid_gone,
    proc_state,
    tty_key_of,
    wait_for,
)

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


def proc_stat(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    return data[data.rindex(")") + 2 :].split()


def dead(pid: int) -> bool:
    return pid_gone(pid) or proc_state(pid) == "Z"


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
        assert all(
            f["external"] for f in daemon.client.inspect(ck["id"])["fds"] if f["fd"] in (0, 1, 2)
        )
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


# -- FIFOs ------------------------------------------------------------------------------


@contextlib.contextmanager
def fifo_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="criud-fifo-", dir="/tmp"))
    try:
        yield d
    finally:
        for f in d.iterdir():
            f.unlink()
        d.rmdir()


def fifo_reader(path: Path) -> int:
    """The engine's end: a FIFO made and held open for reading before the writer comes."""
    if not path.exists():
        os.mkfifo(path, 0o600)
    return os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)


def hello_num(line: str) -> int:
    word, n = line.split()
    assert word == "hello", line
    return int(n)


def drain_hellos(fd: int, last: int) -> int:
    data = b""
    deadline = time.monotonic() + 10
    while True:
        assert time.monotonic() < deadline, "the FIFO did not reach EOF"
        if not select.select([fd], [], [], 0.5)[0]:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        data += chunk
    for line in data.decode().splitlines():
        last = hello_num(line)
    return last


@pytest.mark.parametrize("form", ["fd", "path"])
def test_fifo_stdout_replaced(daemon: Daemon, procs: Procs, form: str) -> None:
    with fifo_dir() as d:
        old = d / "c1-stdout"
        r = fifo_reader(old)
        w = os.open(old, os.O_WRONLY | os.O_CLOEXEC)
        p = procs.python(HELLO, stdout=w)
        os.close(w)
        first = hello_num(read_until(r, lambda s: s.startswith("hello")))
        key = str(old).lstrip("/")
        ck = daemon.client.checkpoint(p.pid)
        assert ck["external"] == [key]
        (out,) = [f for f in daemon.client.inspect(ck["id"])["fds"] if f["fd"] == 1]
        assert (out["type"], out["key"], out["external"]) == ("fifo", key, True)
        p.wait(timeout=10)
        last = drain_hellos(r, first)
        os.close(r)

        # The engine's new FIFO for the restored container, its reader open first.
        new = d / "c2-stdout"
        r2 = fifo_reader(new)
        try:
            if form == "fd":
                w2 = os.open(new, os.O_WRONLY | os.O_CLOEXEC)
                res = daemon.client.restore(ck["id"], fds={key: w2})
                os.close(w2)
            else:
                m = {"key": key, "path": str(new), "mode": "w", "type": "fifo"}
                res = daemon.client.restore(ck["id"], inherit_fds=[m])
            procs.adopt(res["pid"])
            assert hello_num(read_until(r2, lambda s: s.startswith("hello"))) == last + 1
            assert os.stat(f"/proc/{res['pid']}/fd/1").st_ino == new.stat().st_ino
            daemon.client.signal(res["id"], "SIGKILL")
            wait_for(lambda: dead(res["pid"]), 10, what="restored writer to die")
        finally:
            os.close(r2)


def test_fifo_without_reader_is_a_clear_4xx(daemon: Daemon, procs: Procs) -> None:
    with fifo_dir() as d:
        old = d / "c1-stdout"
        r = fifo_reader(old)
        w = os.open(old, os.O_WRONLY | os.O_CLOEXEC)
        p = procs.python(HELLO, stdout=w)
        os.close(w)
        read_until(r, lambda s: s.startswith("hello"))
        ck = daemon.client.checkpoint(p.pid)
        p.wait(timeout=10)
        os.close(r)
        new = d / "c2-stdout"
        os.mkfifo(new, 0o600)  # nobody reads it
        key = str(old).lstrip("/")
        t0 = time.monotonic()
        with pytest.raises(CriudClientError) as e:
            m = {"key": key, "path": str(new), "mode": "w", "type": "fifo"}
            daemon.client.restore(ck["id"], inherit_fds=[m])
        assert e.value.status == 409 and e.value.code == "fifo_no_reader", e.value.problem
        assert time.monotonic() - t0 < 10
        # Without "type": "fifo", a FIFO path is refused outright, never opened.
        with pytest.raises(CriudClientError) as e:
            daemon.client.restore(ck["id"], paths={key: (str(new), "w")})
        assert e.value.status == 422 and "fifo" in e.value.detail.lower()
        # The checkpoint is still there to restore once the engine reads.
        r2 = fifo_reader(new)
        try:
            m = {"key": key, "path": str(new), "mode": "w", "type": "fifo"}
            res = daemon.client.restore(ck["id"], inherit_fds=[m])
            procs.adopt(res["pid"])
            read_until(r2, lambda s: s.startswith("hello"))
            daemon.client.signal(res["id"], "SIGKILL")
            wait_for(lambda: dead(res["pid"]), 10, what="restored writer to die")
        finally:
            os.close(r2)


# -- the stdio shorthand ----------------------------------------------------------------


def start_stdio_tree(procs: Procs, d: Path) -> tuple[subprocess.Popen[bytes], int, int, Path]:
    """STDIO_TREE on a pipe (0), a pty (1, no controlling tty) and a log file (2).

    Returns the process, the pipe's write end, the pty master, and the log.
    """
    r, w = os.pipe()
    master, slave = os.openpty()
    log = d / "c1.log"
    err = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    p = procs.python(STDIO_TREE, stdin=r, stdout=slave, stderr=err)
    for fd in (r, slave, err):
        os.close(fd)
    raw(master)
    return p, w, master, log


def checkpoint_stdio_tree(
    daemon: Daemon, procs: Procs, d: Path
) -> tuple[dict[str, Any], int, Path]:
    """start_stdio_tree, checkpoint it (so it dies), read what it left on its pty.

    Returns the checkpoint, the last tick seen, and the old log.
    """
    p, w, master, log = start_stdio_tree(procs, d)
    try:
        first = tick_of(read_until(master, is_tick))
        ck = daemon.client.checkpoint(p.pid)
        p.wait(timeout=10)
        last = drain_ticks(master, first)
    finally:
        os.close(w)
        os.close(master)
    return ck, last, log


def check_new_stdio(procs: Procs, pid: int, w: int, master: int, log: Path, last: int) -> None:
    """The restored tree reads the new pipe and writes to the new pty and log."""
    assert tick_of(read_until(master, is_tick)) > last
    os.write(w, b"ping\n")
    read_until(master, lambda s: s == "out ping")
    wait_for(lambda: b"err ping" in log.read_bytes(), 10, what="stderr in the new log")
    assert b"etick" in log.read_bytes()


def test_stdio_shorthand_pipe_pty_and_file(daemon: Daemon, procs: Procs) -> None:
    with fifo_dir() as d:
        ck, last, log = checkpoint_stdio_tree(daemon, procs, d)
        kinds = {
            f["fd"]: (f["type"], f["external"]) for f in daemon.client.inspect(ck["id"])["fds"]
        }
        assert kinds[0] == ("pipe", True) and kinds[1] == ("tty", True)
        assert kinds[2] == ("file", False)

        r2, w2 = os.pipe()
        with new_pty() as (master2, slave2):
            raw(master2)
            log2 = d / "c2.log"
            err2 = os.open(log2, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
            try:
                res = daemon.client.restore(ck["id"], stdio=[r2, slave2, err2])
            finally:
                for fd in (r2, err2):
                    os.close(fd)
                os.close(slave2)
            procs.adopt(res["pid"])
            try:
                check_new_stdio(procs, res["pid"], w2, master2, log2, last)
                # The old log was left alone.
                assert b"err ping" not in log.read_bytes()
            finally:
                os.close(w2)
                daemon.client.signal(res["id"], "SIGKILL")
                wait_for(lambda: dead(res["pid"]), 10, what="restored tree to die")


def test_stdio_needs_three_fds_and_a_terminal_for_a_pty(daemon: Daemon, procs: Procs) -> None:
    with fifo_dir() as d:
        ck, _, _ = checkpoint_stdio_tree(daemon, procs, d)
        r2, w2 = os.pipe()
        try:
            with pytest.raises(CriudClientError) as e:
                daemon.client.restore(ck["id"], stdio=[r2, w2])
            assert e.value.status == 422 and e.value.code == "bad_fd_handle"
            assert "exactly 3" in e.value.detail
            # A pipe where the tree had its pty: refused before criu runs.
            with pytest.raises(CriudClientError) as e:
                daemon.client.restore(ck["id"], stdio=[r2, w2, w2])
            assert e.value.status == 422 and e.value.code == "wrong_fd_type"
            assert "pty slave" in e.value.detail
        finally:
            os.close(r2)
            os.close(w2)


def test_cli_restore_stdio_hands_over_its_own_0_1_2(daemon: Daemon, procs: Procs) -> None:
    with fifo_dir() as d:
        ck, last, _ = checkpoint_stdio_tree(daemon, procs, d)

        r2, w2 = os.pipe()
        with new_pty() as (master2, slave2):
            raw(master2)
            log2 = d / "c2.log"
            err2 = os.open(log2, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
            # The shell's 0, 1 and 2: a pipe, a pty and a file.
            cli = subprocess.run(
                daemon.cli("restore", ck["id"], "--stdio"),
                stdin=r2,
                stdout=slave2,
                stderr=err2,
                timeout=60,
                check=False,
            )
            for fd in (r2, err2, slave2):
                os.close(fd)
            assert cli.returncode == 0, log2.read_text()
            # Its report went to its stdout, the pty, before the tree's ticks.
            line = read_until(master2, lambda s: s.startswith("restore "))
            pid = int(line.split("pid ")[1].split()[0])
            procs.adopt(pid)
            try:
                check_new_stdio(procs, pid, w2, master2, log2, last)
            finally:
                os.close(w2)
                os.kill(pid, 9)
                wait_for(lambda: dead(pid), 10, what="restored tree to die")


def test_stdio_leaves_other_external_fds_to_their_own_mappings(
    daemon: Daemon, procs: Procs
) -> None:
    # stdout and one more fd (number w3, as passed) are pipes whose read ends we hold.
    r1, w1 = os.pipe()
    r3, w3 = os.pipe()
    p = procs.python(HELLO, stdout=w1, pass_fds=(w3,))
    os.close(w3)
    os.close(w1)
    read_until(r1, lambda s: s.startswith("hello"))
    ck = daemon.client.checkpoint(p.pid)
    fd3_key = next(f["key"] for f in daemon.client.inspect(ck["id"])["fds"] if f["fd"] == w3)
    assert fd3_key in ck["external"]
    p.wait(timeout=10)
    os.close(r1)
    os.close(r3)
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    r2, w2 = os.pipe()
    r4, w4 = os.pipe()
    try:
        with pytest.raises(CriudClientError) as e:
            daemon.client.restore(ck["id"], stdio=[null, w2, null])
        assert e.value.status == 422 and e.value.code == "missing_inherit_fd"
        assert e.value.problem["keys"] == [fd3_key]
        res = daemon.client.restore(ck["id"], stdio=[null, w2, null], fds={(p.pid, w3): w4})
        procs.adopt(res["pid"])
        os.close(w2)
        os.close(w4)
        read_until(r2, lambda s: s.startswith("hello"))
        daemon.client.signal(res["id"], "SIGKILL")
        wait_for(lambda: dead(res["pid"]), 10, what="restored writer to die")
    finally:
        for fd_ in (null, r2, r4):
            os.close(fd_)
        for fd_ in (w2, w4):
            with contextlib.suppress(OSError):
                os.close(fd_)
