"""criud.dump.fds (and sockdiag): classifying real fds of real processes."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from criud.dump import fds, sockdiag
from criud.dump.fds import FdInfo, TaskInfo, classify, mark_external, path_key, tty_key

from ._helpers import proc_state, wait_until

ME = os.getpid()


def info(fd: int, peers: dict[int, int | None] | None = None) -> FdInfo:
    peers = sockdiag.unix_peers(ME) if peers is None else peers
    got = classify(ME, fd, peers, fds._socket_kinds(ME))
    assert got is not None
    assert got.fd == fd
    return got


@pytest.fixture
def closing() -> Iterator[list[int]]:
    """fds to close after the test."""
    out: list[int] = []
    yield out
    for fd in out:
        os.close(fd)


# -- keys -------------------------------------------------------------------------


def test_path_key_strips_leading_slash() -> None:
    assert path_key("/tmp/a b/c") == "tmp/a b/c"
    assert path_key("//double") == "double"
    assert path_key("/") == ""
    assert path_key("rel/x") == "rel/x"


def test_tty_key_format() -> None:
    st = os.stat_result((0o20620, 3, 0x19, 1, 0, 5, 0, 0, 0, 0), {"st_rdev": 0x8801})
    assert tty_key(st) == "tty[8801:19]"
    big = os.stat_result((0o20620, 3, 0x1_0000_00AB, 1, 0, 5, 0, 0, 0, 0), {"st_rdev": 0x400})
    assert tty_key(big) == "tty[400:ab]"  # masked to 32 bits, lowercase hex


# -- classify, in this process ----------------------------------------------------


def test_pipe(closing: list[int]) -> None:
    r, w = os.pipe()
    closing += [r, w]
    ri, wi = info(r), info(w)
    ino = os.fstat(r).st_ino
    assert (ri.type, ri.key, ri.mode, ri.inode) == ("pipe", f"pipe:[{ino}]", "r", ino)
    assert (wi.type, wi.key, wi.mode) == ("pipe", f"pipe:[{ino}]", "w")
    assert ri.target == ri.key
    assert not ri.external


def test_unix_socketpair_peers() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        ia, ib = os.fstat(a.fileno()).st_ino, os.fstat(b.fileno()).st_ino
        peers = sockdiag.unix_peers(ME)
        assert peers[ia] == ib
        assert peers[ib] == ia
        got = info(a.fileno(), peers)
        assert (got.type, got.key, got.peer, got.mode) == ("unix", f"socket:[{ia}]", ib, "rw")


def test_unconnected_unix_socket_has_no_peer(tmp_path: Path) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with s:
        s.bind(str(tmp_path / "sock"))
        s.listen()
        ino = os.fstat(s.fileno()).st_ino
        peers = sockdiag.unix_peers(ME)
        assert ino in peers and peers[ino] is None
        got = info(s.fileno(), peers)
        assert got.type == "unix" and got.peer is None


def test_proc_unix_fallback_knows_sockets_not_peers() -> None:
    a, b = socket.socketpair()
    with a, b:
        ia, ib = os.fstat(a.fileno()).st_ino, os.fstat(b.fileno()).st_ino
        got = sockdiag._proc_unix(ME)
        assert got[ia] is None and got[ib] is None
        assert sockdiag._proc_unix(4_194_305) == {}
        assert sockdiag._same_netns(ME)
        assert not sockdiag._same_netns(4_194_305)


def test_unix_without_sockdiag_is_socket() -> None:
    a, b = socket.socketpair()
    with a, b:
        assert info(a.fileno(), peers={}).type == "socket"


@pytest.mark.parametrize(
    ("family", "kind", "addr", "expect"),
    [
        (socket.AF_INET, socket.SOCK_STREAM, ("127.0.0.1", 0), "tcp"),
        (socket.AF_INET, socket.SOCK_DGRAM, ("127.0.0.1", 0), "udp"),
        (socket.AF_INET6, socket.SOCK_STREAM, ("::1", 0), "tcp"),
        (socket.AF_INET6, socket.SOCK_DGRAM, ("::1", 0), "udp"),
    ],
)
def test_inet_sockets(family: int, kind: int, addr: tuple[str, int], expect: str) -> None:
    try:
        s = socket.socket(family, kind)
    except OSError as e:
        pytest.skip(f"no such socket here: {e}")
    with s:
        try:
            s.bind(addr)
        except OSError as e:
            pytest.skip(f"cannot bind {addr}: {e}")
        if kind == socket.SOCK_STREAM:
            s.listen()
        got = info(s.fileno())
        assert got.type == expect
        assert got.key == f"socket:[{os.fstat(s.fileno()).st_ino}]"


def test_netlink_socket() -> None:
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    with s:
        s.bind((0, 0))
        assert info(s.fileno()).type == "netlink"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs CAP_NET_RAW")
def test_packet_and_raw_sockets() -> None:
    p = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    r = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    with p, r:
        assert info(p.fileno()).type == "packet"
        assert info(r.fileno()).type == "raw"


def test_regular_file_modes(tmp_path: Path, closing: list[int]) -> None:
    f = tmp_path / "file.txt"
    f.write_text("x")
    ro = os.open(f, os.O_RDONLY)
    wo = os.open(f, os.O_WRONLY | os.O_APPEND)
    rw = os.open(f, os.O_RDWR)
    closing += [ro, wo, rw]
    key = str(f).lstrip("/")
    a, b, c = info(ro), info(wo), info(rw)
    assert (a.type, a.key, a.mode, a.append, a.target) == ("file", key, "r", False, str(f))
    assert (b.mode, b.append) == ("w", True)
    assert (c.mode, c.append) == ("rw", False)
    assert a.inode == f.stat().st_ino
    assert not a.key.startswith("/")


def test_deleted_file(tmp_path: Path, closing: list[int]) -> None:
    f = tmp_path / "gone"
    f.write_text("x")
    fd = os.open(f, os.O_RDONLY)
    closing.append(fd)
    f.unlink()
    got = info(fd)
    assert got.type == "deleted"
    assert got.target.endswith(" (deleted)")


def test_dir_device_fifo(tmp_path: Path, closing: list[int]) -> None:
    d = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    null = os.open("/dev/null", os.O_WRONLY)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    fi = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
    closing += [d, null, fi]
    assert (info(d).type, info(d).key) == ("dir", str(tmp_path).lstrip("/"))
    assert (info(null).type, info(null).key, info(null).mode) == ("device", "dev/null", "w")
    got = info(fi)
    assert (got.type, got.key, got.mode) == ("fifo", str(fifo).lstrip("/"), "rw")


def test_tty(closing: list[int]) -> None:
    try:
        master, slave = os.openpty()
    except OSError as e:
        pytest.skip(f"no pty: {e}")
    closing += [master, slave]
    s = info(slave)
    assert s.type == "tty"
    assert s.key == tty_key(os.fstat(slave))
    assert s.key.startswith("tty[") and s.key.endswith("]")
    assert s.target.startswith("/dev/pts/")
    m = info(master)
    assert m.type == "tty"
    assert m.key == tty_key(os.fstat(master))
    assert m.key != s.key


def test_anon_inodes(closing: list[int]) -> None:
    ev = os.eventfd(0)
    pidfd = os.pidfd_open(ME)
    closing += [ev, pidfd]
    ep = select.epoll()
    try:
        assert info(ev).type == "eventfd"
        assert info(ev).key == "anon_inode:[eventfd]"
        assert info(ep.fileno()).type == "epoll"
        assert info(pidfd).type == "pidfd"
    finally:
        ep.close()


def test_memfd(closing: list[int]) -> None:
    fd = os.memfd_create("criud-test")
    closing.append(fd)
    got = info(fd)
    assert got.type == "memfd"
    assert got.target.startswith("/memfd:criud-test")


def test_closed_fd_is_none() -> None:
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    assert classify(ME, r, {}, {}) is None


def test_as_dict_round_trip() -> None:
    f = FdInfo(3, "pipe", "pipe:[1]", "r", "pipe:[1]", inode=1, external=True)
    d = f.as_dict()
    assert d["external"] is True and d["peer"] is None
    assert FdInfo(**d) == f


# -- mark_external on synthetic trees ---------------------------------------------


def _fdi(fd: int, type_: str, key: str, mode: str, inode: int, peer: int | None = None) -> FdInfo:
    return FdInfo(fd, type_, key, mode, key, inode=inode, peer=peer)


def test_mark_external_pipes_and_sockets() -> None:
    t1 = TaskInfo(
        1,
        0,
        [1],
        [
            _fdi(0, "pipe", "pipe:[10]", "r", 10),  # both ends held (other in t2)
            _fdi(1, "pipe", "pipe:[11]", "w", 11),  # only the write end
            _fdi(2, "unix", "socket:[20]", "rw", 20, peer=21),  # peer held by t2
            _fdi(3, "unix", "socket:[30]", "rw", 30, peer=31),  # peer outside
            _fdi(4, "unix", "socket:[40]", "rw", 40, peer=None),  # unconnected
            _fdi(5, "fifo", "tmp/f", "r", 50),  # fifo, read only
            _fdi(6, "file", "tmp/x", "w", 60),
            _fdi(7, "pipe", "pipe:[12]", "?", 12),  # unknown mode
        ],
    )
    t2 = TaskInfo(
        2,
        1,
        [2],
        [_fdi(0, "pipe", "pipe:[10]", "w", 10), _fdi(1, "unix", "socket:[21]", "rw", 21, 20)],
    )
    mark_external([t1, t2])
    ext = {(t.pid, f.fd): f.external for t in (t1, t2) for f in t.fds}
    assert ext == {
        (1, 0): False,
        (1, 1): True,
        (1, 2): False,
        (1, 3): True,
        (1, 4): False,
        (1, 5): True,
        (1, 6): False,
        (1, 7): True,
        (2, 0): False,
        (2, 1): False,
    }


def test_mark_external_rw_fifo_is_internal() -> None:
    t = TaskInfo(1, 0, [1], [_fdi(0, "fifo", "tmp/f", "rw", 5)])
    mark_external([t])
    assert t.fds[0].external is False


# -- real process trees -----------------------------------------------------------

CHILD = r"""
import os, subprocess, sys, time
pa_r, pa_w = int(sys.argv[1]), int(sys.argv[2])
gc = subprocess.Popen(
    [sys.executable, "-c", "import time; time.sleep(60)"],
    pass_fds=(pa_w,), stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
)
os.close(pa_w)
print(gc.pid, flush=True)
time.sleep(60)
"""


@pytest.fixture
def tree() -> Iterator[dict[str, int]]:
    """A child + grandchild holding a mix of internal and external fds.

    pipe A: child holds the read end, grandchild the write end (internal).
    pipe B: child holds the read end, we keep the write end (external).
    socketpair C: child holds one end, we keep the other (external).
    socketpair D: child holds both ends (internal).
    """
    a_r, a_w = os.pipe()
    b_r, b_w = os.pipe()
    c1, c2 = socket.socketpair()
    d1, d2 = socket.socketpair()
    ours = [a_r, a_w, b_r, b_w]
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(a_r), str(a_w)],
        pass_fds=(a_r, a_w, b_r, c1.fileno(), d1.fileno(), d2.fileno()),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    gc_pid = 0
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        assert ready, "child did not report its grandchild in time"
        gc_pid = int(proc.stdout.readline())
        yield {
            "child": proc.pid,
            "grandchild": gc_pid,
            "a": os.fstat(a_r).st_ino,
            "b": os.fstat(b_r).st_ino,
            "c1": os.fstat(c1.fileno()).st_ino,
            "d1": os.fstat(d1.fileno()).st_ino,
            "d2": os.fstat(d2.fileno()).st_ino,
            "fd_a": a_r,
            "fd_b": b_r,
            "fd_c": c1.fileno(),
        }
    finally:
        # Kill only what we started: the child's own session/process group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        assert proc.stdout is not None
        proc.stdout.close()
        for fd in ours:
            os.close(fd)
        for s in (c1, c2, d1, d2):
            s.close()
        if gc_pid:
            # Reparented to init once the child died; init reaps it.
            assert wait_until(lambda: proc_state(gc_pid) in (None, "Z"), timeout=10)


def test_read_tree(tree: dict[str, int]) -> None:
    tasks = fds.read_tree(tree["child"])
    assert [t.pid for t in tasks] == [tree["child"], tree["grandchild"]]
    child, grandchild = tasks
    assert child.ppid == ME
    assert grandchild.ppid == tree["child"]
    assert child.tids == [tree["child"]]

    by_key = {f.key: f for f in child.fds}
    a = by_key[f"pipe:[{tree['a']}]"]
    assert (a.fd, a.type, a.mode, a.external) == (tree["fd_a"], "pipe", "r", False)
    b = by_key[f"pipe:[{tree['b']}]"]
    assert (b.fd, b.type, b.mode, b.external) == (tree["fd_b"], "pipe", "r", True)
    c = by_key[f"socket:[{tree['c1']}]"]
    assert (c.fd, c.type, c.external) == (tree["fd_c"], "unix", True)
    assert c.peer is not None
    for d in ("d1", "d2"):
        f = by_key[f"socket:[{tree[d]}]"]
        assert (f.type, f.external) == ("unix", False)
    # stdin is /dev/null; stdout is a pipe whose read end we hold: external.
    by_fd = {f.fd: f for f in child.fds}
    assert (by_fd[0].type, by_fd[0].key, by_fd[0].external) == ("device", "dev/null", False)
    out = by_fd[1]
    assert (out.type, out.mode, out.external) == ("pipe", "w", True)

    gc_keys = {f.key: f for f in grandchild.fds}
    ga = gc_keys[f"pipe:[{tree['a']}]"]
    assert (ga.mode, ga.external) == ("w", False)


def test_tree_pids_order(tree: dict[str, int]) -> None:
    assert fds.tree_pids(tree["child"]) == [tree["child"], tree["grandchild"]]
    assert fds.tree_pids(tree["grandchild"]) == [tree["grandchild"]]


def test_read_tree_missing_pid() -> None:
    # pid_max is at most 2^22: this pid cannot exist.
    with pytest.raises(ProcessLookupError):
        fds.read_tree(4_194_305)


def test_ppid_with_parentheses_in_comm(tmp_path: Path) -> None:
    link = tmp_path / "a) (b c"
    link.symlink_to("/bin/sleep")
    proc = subprocess.Popen(
        [str(link), "60"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert wait_until(lambda: _comm(proc.pid) == "a) (b c", timeout=10)
        assert fds._ppid(proc.pid) == ME
        assert proc.pid in fds.tree_pids(ME)
    finally:
        proc.kill()
        proc.wait(timeout=10)


def _comm(pid: int) -> str:
    with open(f"/proc/{pid}/comm", encoding="utf-8") as f:
        return f.read().rstrip("\n")
