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
from criud.dump.fds import FdInfo, classify, mark_external, path_key, tty_key

from .._helpers import proc_state, wait_until

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


def test_o_path_fd_is_mode_path(tmp_path: Path, closing: list[int]) -> None:
    # Its access bits read as O_RDONLY, but an O_PATH fd reads nothing.
    f = tmp_path / "file.txt"
    f.write_text("x")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    a = os.open(f, os.O_PATH)
    b = os.open(fifo, os.O_PATH)
    closing += [a, b]
    assert (info(a).type, info(a).mode) == ("file", "path")
    assert (info(b).type, info(b).mode) == ("fifo", "path")


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
    # Both ends name the pair's index, N of /dev/pts/N; only the master is one.
    assert s.pty == m.pty == int(s.target.rsplit("/", 1)[1])
    assert m.pty_master is True and s.pty_master is False


def test_pty_slave_external_unless_the_tree_holds_its_master(closing: list[int]) -> None:
    try:
        master, slave = os.openpty()
        other, other_slave = os.openpty()
    except OSError as e:
        pytest.skip(f"no pty: {e}")
    closing += [master, slave, other, other_slave]
    s, m, o = (info(fd).as_dict() for fd in (slave, master, other))
    # The slave alone: its master is outside (an engine's terminal).
    assert mark_external([[dict(s)]]) == [s["key"]]
    # Its own master in the tree (another task's): a pair, nothing external.
    assert mark_external([[dict(s)], [dict(m)]]) == []
    # Another pty's master does not pair with it.
    assert mark_external([[dict(s), dict(o)]]) == [s["key"]]


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


def _fdi(
    fd: int, type_: str, key: str, mode: str, inode: int, peer: int | None = None
) -> dict[str, object]:
    return FdInfo(fd, type_, key, mode, key, inode=inode, peer=peer).as_dict()


def test_mark_external_pipes_and_sockets() -> None:
    t1 = [
        _fdi(0, "pipe", "pipe:[10]", "r", 10),  # both ends held (other in t2)
        _fdi(1, "pipe", "pipe:[11]", "w", 11),  # only the write end
        _fdi(2, "unix", "socket:[20]", "rw", 20, peer=21),  # peer held by t2
        _fdi(3, "unix", "socket:[30]", "rw", 30, peer=31),  # peer outside
        _fdi(4, "unix", "socket:[40]", "rw", 40, peer=None),  # unconnected
        _fdi(5, "fifo", "tmp/f", "r", 50),  # fifo, read only
        _fdi(6, "file", "tmp/x", "w", 60),
        _fdi(7, "pipe", "pipe:[12]", "?", 12),  # unknown mode
        _fdi(8, "pipe", "pipe:[11]", "w", 11),  # the same end again: one key
    ]
    t2 = [_fdi(0, "pipe", "pipe:[10]", "w", 10), _fdi(1, "unix", "socket:[21]", "rw", 21, 20)]
    keys = mark_external([t1, t2])
    ext = {(pid, f["fd"]): f["external"] for pid, t in ((1, t1), (2, t2)) for f in t}
    assert ext == {
        (1, 0): False,
        (1, 1): True,
        (1, 2): False,
        (1, 3): True,
        (1, 4): False,
        (1, 5): True,
        (1, 6): False,
        (1, 7): True,
        (1, 8): True,
        (2, 0): False,
        (2, 1): False,
    }
    # Each external key once, in the order the walk met them.
    assert keys == ["pipe:[11]", "socket:[30]", "tmp/f", "pipe:[12]"]


def test_mark_external_takes_compact_fds() -> None:
    # A walk's form leaves out what does not apply (no peer, no inode).
    pipe = {"fd": 0, "type": "pipe", "key": "pipe:[10]", "mode": "r", "target": "pipe:[10]"}
    lone = {"fd": 1, "type": "unix", "key": "socket:[20]", "mode": "rw", "target": "socket:[20]"}
    gone = {**lone, "fd": 2, "key": "socket:[30]", "target": "socket:[30]", "peer": 31}
    tree = [[{**f, "external": False} for f in (pipe, lone, gone)]]
    tree[0][1]["inode"], tree[0][2]["inode"] = 20, 30
    assert mark_external(tree) == ["pipe:[10]", "socket:[30]"]
    assert tree[0][1]["external"] is False


def test_read_fds_leaves_out_what_does_not_apply() -> None:
    r, w = os.pipe()
    srv = socket.socket()
    try:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        by_fd = {f["fd"]: f for f in fds.read_fds(ME)}
        ino = os.fstat(r).st_ino
        assert by_fd[r] == {
            "fd": r,
            "type": "pipe",
            "key": f"pipe:[{ino}]",
            "mode": "r",
            "target": f"pipe:[{ino}]",
            "external": False,
            "inode": ino,
        }
        tcp = by_fd[srv.fileno()]
        assert (tcp["type"], tcp["state"], tcp["local"]) == (
            "tcp",
            "LISTEN",
            f"127.0.0.1:{srv.getsockname()[1]}",
        )
        assert not {"peer", "sock_type", "size", "append", "locks"} & tcp.keys()
        # FdInfo.of fills what was left out with the defaults.
        assert FdInfo.of(by_fd[w]).peer is None and FdInfo.of(by_fd[w]).append is False
    finally:
        srv.close()
        os.close(r)
        os.close(w)


def test_mark_external_rw_fifo_is_internal() -> None:
    t = [_fdi(0, "fifo", "tmp/f", "rw", 5)]
    assert mark_external([t]) == []
    assert t[0]["external"] is False


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

    by_key = {f["key"]: f for f in child.fds}
    a = by_key[f"pipe:[{tree['a']}]"]
    assert (a["fd"], a["type"], a["mode"], a["external"]) == (tree["fd_a"], "pipe", "r", False)
    b = by_key[f"pipe:[{tree['b']}]"]
    assert (b["fd"], b["type"], b["mode"], b["external"]) == (tree["fd_b"], "pipe", "r", True)
    c = by_key[f"socket:[{tree['c1']}]"]
    assert (c["fd"], c["type"], c["external"]) == (tree["fd_c"], "unix", True)
    assert c["peer"] is not None
    for d in ("d1", "d2"):
        f = by_key[f"socket:[{tree[d]}]"]
        assert (f["type"], f["external"]) == ("unix", False)
    # stdin is /dev/null; stdout is a pipe whose read end we hold: external.
    by_fd = {f["fd"]: f for f in child.fds}
    assert (by_fd[0]["type"], by_fd[0]["key"], by_fd[0]["external"]) == (
        "device",
        "dev/null",
        False,
    )
    out = by_fd[1]
    assert (out["type"], out["mode"], out["external"]) == ("pipe", "w", True)

    gc_keys = {f["key"]: f for f in grandchild.fds}
    ga = gc_keys[f"pipe:[{tree['a']}]"]
    assert (ga["mode"], ga["external"]) == ("w", False)


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


# -- sockets in detail: states, addresses, names ---------------------------------


@pytest.mark.parametrize(
    ("hexaddr", "expect"),
    [
        ("0100007F:1F90", "127.0.0.1:8080"),
        ("00000000:0000", "0.0.0.0:0"),
        ("00000000000000000000000001000000:0035", "[::1]:53"),
        ("0000000000000000FFFF00000100007F:01BB", "[::ffff:127.0.0.1]:443"),
    ],
)
def test_inet_address(hexaddr: str, expect: str) -> None:
    assert fds.inet_address(hexaddr) == expect


def _mine(fd: int) -> FdInfo:
    got = [f for f in fds.read_fds(ME) if f["fd"] == fd]
    assert len(got) == 1
    return FdInfo.of(got[0])


def test_tcp_listen_and_established_details() -> None:
    srv = socket.socket()
    with srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        port = srv.getsockname()[1]
        cli = socket.create_connection(("127.0.0.1", port))
        conn, peer = srv.accept()
        with cli, conn:
            lst = _mine(srv.fileno())
            assert (lst.type, lst.state, lst.local, lst.remote) == (
                "tcp",
                "LISTEN",
                f"127.0.0.1:{port}",
                "0.0.0.0:0",
            )
            c = _mine(cli.fileno())
            assert (c.state, c.local, c.remote) == (
                "ESTABLISHED",
                f"127.0.0.1:{peer[1]}",
                f"127.0.0.1:{port}",
            )
            assert c.key == f"socket:[{os.fstat(cli.fileno()).st_ino}]"


def test_tcp6_details() -> None:
    try:
        s = socket.socket(socket.AF_INET6)
        s.bind(("::1", 0))
    except OSError as e:
        pytest.skip(f"no IPv6 loopback: {e}")
    with s:
        s.listen()
        got = _mine(s.fileno())
        assert (got.type, got.state, got.local) == ("tcp", "LISTEN", f"[::1]:{s.getsockname()[1]}")


def test_unix_types_and_names(tmp_path: Path) -> None:
    path = str(tmp_path / "srv.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dg = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    with srv, dg:
        srv.bind(path)
        srv.listen()
        dg.bind(f"\0criud-test-{ME}")
        cli = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with cli:
            cli.connect(path)
            conn, _ = srv.accept()
            with conn:
                s = _mine(srv.fileno())
                assert (s.type, s.sock_type, s.state, s.local) == ("unix", "stream", "LISTEN", path)
                c = _mine(cli.fileno())
                assert (c.sock_type, c.state, c.local) == ("stream", "ESTABLISHED", None)
                # The client's peer is the accepted socket, which has the server's name.
                assert c.peer == os.fstat(conn.fileno()).st_ino
                assert c.remote == path
                d = _mine(dg.fileno())
                assert (d.sock_type, d.state, d.local) == ("dgram", "CLOSE", f"@criud-test-{ME}")


def test_seqpacket_pair() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        got = sockdiag.unix_sockets(ME)[os.fstat(a.fileno()).st_ino]
        assert (got.type, got.state, got.peer, got.name) == (
            "seqpacket",
            "ESTABLISHED",
            os.fstat(b.fileno()).st_ino,
            None,
        )


def test_proc_unix_sockets_fallback_has_types_and_names(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    with s:
        s.bind(path)
        got = sockdiag._proc_unix_sockets(ME)[os.fstat(s.fileno()).st_ino]
        assert (got.type, got.name, got.peer) == ("dgram", path, None)


# -- sizes, modes, locks ----------------------------------------------------------


def test_sizes(tmp_path: Path, closing: list[int]) -> None:
    f = tmp_path / "sized"
    f.write_bytes(b"x" * 1234)
    fd = os.open(f, os.O_RDONLY)
    m = os.memfd_create("criud-size")
    os.ftruncate(m, 8192)
    r, w = os.pipe()
    closing += [fd, m, r, w]
    assert _mine(fd).size == 1234
    assert _mine(m).size == 8192
    assert _mine(r).size is None


def test_o_path_fd_mode_falls_back_to_fdinfo(tmp_path: Path, closing: list[int]) -> None:
    f = tmp_path / "p"
    f.write_text("x")
    fd = os.open(f, os.O_PATH)
    closing.append(fd)
    # An O_PATH fd's link has neither permission bit; fdinfo says O_PATH
    # (and O_RDONLY, which it is not: it reads nothing).
    assert _mine(fd).mode == "path"


def test_append_is_read_for_writable_files(tmp_path: Path, closing: list[int]) -> None:
    f = tmp_path / "log"
    f.write_text("")
    wa = os.open(f, os.O_WRONLY | os.O_APPEND)
    rwa = os.open(f, os.O_RDWR | os.O_APPEND)
    closing += [wa, rwa]
    assert (_mine(wa).mode, _mine(wa).append) == ("w", True)
    assert (_mine(rwa).mode, _mine(rwa).append) == ("rw", True)


def test_read_fds_of_self_leaves_out_its_own_dir_fd() -> None:
    before = {int(n) for n in os.listdir("/proc/self/fd")}
    listed = {f["fd"] for f in fds.read_fds(ME)}
    # listdir's own fd shows in `before` but is closed by now.
    assert listed <= before
    assert all(f["target"] != f"/proc/{ME}/fd" for f in fds.read_fds(ME))


def test_fd_locks(tmp_path: Path) -> None:
    import fcntl

    with open(tmp_path / "a", "w") as a, open(tmp_path / "b", "w") as b:
        fcntl.flock(a, fcntl.LOCK_EX)
        fcntl.lockf(b, fcntl.LOCK_EX)
        st = os.fstat(a.fileno())
        ida = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        assert _mine(a.fileno()).locks == (f"FLOCK WRITE {ida}",)
        assert _mine(b.fileno()).locks[0].startswith("POSIX WRITE ")
        held = {(lk.type, lk.id) for lk in fds.read_locks() if lk.pid == ME}
        assert ("FLOCK", ida) in held
    # Closing releases them: nothing of ours is left in /proc/locks.
    assert not [lk for lk in fds.read_locks() if lk.pid == ME]


@pytest.mark.parametrize(
    ("line", "expect"),
    [
        (
            "1: POSIX  ADVISORY  WRITE 19265 fe:00:2156919 128 128",
            fds.FileLock("POSIX", "WRITE", 19265, 0xFE, 0, 2156919),
        ),
        (
            "lock:\t2: FLOCK  ADVISORY  READ 7 00:1c:42 0 EOF",
            fds.FileLock("FLOCK", "READ", 7, 0, 0x1C, 42),
        ),
        (
            "3: OFDLCK ADVISORY  WRITE -1 08:01:5 0 EOF",
            fds.FileLock("OFDLCK", "WRITE", -1, 8, 1, 5),
        ),
        ("4: -> FLOCK  ADVISORY  WRITE 8 00:1c:42 0 EOF", None),  # a waiter holds nothing
        ("garbage", None),
        ("5: POSIX ADVISORY WRITE x fe:00:1 0 EOF", None),
    ],
)
def test_parse_lock_line(line: str, expect: fds.FileLock | None) -> None:
    assert fds.parse_lock_line(line) == expect


def test_lock_id_format() -> None:
    assert fds.FileLock("POSIX", "READ", 1, 0xFE, 0, 12).id == "fe:00:12"
    assert fds.FileLock("POSIX", "READ", 1, 259, 0x1AB, 12).id == "103:1ab:12"


def test_read_locks_from_a_file(tmp_path: Path) -> None:
    p = tmp_path / "locks"
    p.write_text(
        "1: POSIX  ADVISORY  WRITE 10 fe:00:1 0 EOF\n"
        "1: -> POSIX  ADVISORY  WRITE 11 fe:00:1 0 EOF\n"
    )
    assert [lk.pid for lk in fds.read_locks(str(p))] == [10]
    assert fds.read_locks(str(tmp_path / "none")) == []


def test_scan_caches_tables_per_netns(tree: dict[str, int]) -> None:
    scan = fds.ProcScan()
    assert scan.net(ME) is scan.net(tree["child"])


def test_as_dict_matches_dataclasses_asdict() -> None:
    import dataclasses

    f = FdInfo(3, "tcp", "socket:[1]", "rw", "socket:[1]", inode=1, state="LISTEN", locks=("x",))
    assert f.as_dict() == dataclasses.asdict(f)
    assert list(f.as_dict()) == [x.name for x in dataclasses.fields(FdInfo)]


def test_the_walk_counts_every_fd_it_listed() -> None:
    # TaskInfo.listed is what the walk's listing held (the post-dump check
    # compares it with fd_count); on Linux 6.2+ fd_count is the same figure.
    r, w = os.pipe()
    p = subprocess.Popen(["sleep", "60"], stdin=subprocess.DEVNULL, stdout=w, pass_fds=(r,))
    try:
        # In its sleep: past the loader and the locale files it opens and closes.
        assert wait_until(lambda: _wchan(p.pid) == "hrtimer_nanosleep")
        (task,) = fds.read_tree(p.pid)
        assert task.listed == len(os.listdir(f"/proc/{p.pid}/fd")) == len(task.fds)
        count = fds.fd_count(p.pid)
        assert count in (task.listed, 0)  # 0: a kernel before 6.2
    finally:
        p.kill()
        p.wait(timeout=10)
        os.close(r)
        os.close(w)


def _wchan(pid: int) -> str:
    with open(f"/proc/{pid}/wchan") as f:
        return f.read()
