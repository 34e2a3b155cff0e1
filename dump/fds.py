"""Reading a process tree's file descriptors and naming them as CRIU does.

This is the one module that classifies fds: the dump-time manifest and the
introspection API (criud.dump.inspect) both use it.  It reads /proc directly
(psutil does not expose fd targets, inodes and flags together) and is
synchronous: callers run it in a thread.

The CRIU key of an fd is the string CRIU matches ``--inherit-fd fd[N]:KEY``
against: ``pipe:[ino]`` and ``socket:[ino]`` as /proc shows them, a regular
file's (or fifo's) path relative to the root, without the leading slash, and
``tty[rdev:dev]`` for terminals.

Types: pipe, fifo, file (regular), deleted (a regular file unlinked while
open), memfd, dir, device (a character or block device that is not a
terminal), tty (terminals: pty slaves and masters, vt, serial, /dev/tty),
unix, tcp, udp, netlink, packet, raw, socket (a socket no table names),
eventfd, epoll, signalfd, timerfd, inotify, fanotify, pidfd, and other.

Everything that costs a walk over /proc/net or /proc/locks is read once per
walk (ProcScan) and, for sockets, once per network namespace.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import socket
import stat
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from criud.daemon import procutil
from criud.daemon.errors import FD_EXHAUSTION
from criud.dump import sockdiag

# Access modes as criud reports them; an O_PATH fd's is "path".
_ACCMODE = {os.O_RDONLY: "r", os.O_WRONLY: "w", os.O_RDWR: "rw"}

# Character devices CRIU treats as terminals: pty slaves and masters, vt,
# serial, /dev/tty and /dev/console.
_TTY_MAJORS = {4, 5, 136, 137, 138, 139, 140, 141, 142, 143, 128, 129, 130, 131, 132, 133, 134, 135}
# Unix98 pty slaves (/dev/pts/N): majors 136-143 (UNIX98_PTY_SLAVE_MAJOR on).
_PTS_MAJORS = range(136, 144)
# A pty master is an fd of the multiplexer, /dev/ptmx or a devpts' own ptmx.
_PTMX_TARGETS = ("/dev/ptmx", "/dev/pts/ptmx")

_ANON_TYPES = {
    "eventfd": "eventfd",
    "eventpoll": "epoll",
    "signalfd": "signalfd",
    "timerfd": "timerfd",
    "inotify": "inotify",
    "pidfd": "pidfd",
    "fanotify": "fanotify",
}

# include/net/tcp_states.h; /proc/net/{tcp,udp}* print these in hex.
TCP_STATES = {
    1: "ESTABLISHED",
    2: "SYN_SENT",
    3: "SYN_RECV",
    4: "FIN_WAIT1",
    5: "FIN_WAIT2",
    6: "TIME_WAIT",
    7: "CLOSE",
    8: "CLOSE_WAIT",
    9: "LAST_ACK",
    10: "LISTEN",
    11: "CLOSING",
    12: "NEW_SYN_RECV",
}

# /proc/net tables: (file, kind, inode column).  tcp/udp/raw rows are
# "sl local remote st tx:rx tr:when retrnsmt uid timeout inode ..."; the
# header splits differently, so the column is fixed here, not read from it.
_NET_TABLES = (
    ("tcp", "tcp", 9),
    ("tcp6", "tcp", 9),
    ("udp", "udp", 9),
    ("udp6", "udp", 9),
    ("raw", "raw", 9),
    ("raw6", "raw", 9),
    ("netlink", "netlink", 9),  # sk Eth Pid Groups Rmem Wmem Dump Locks Drops Inode
    ("packet", "packet", 8),  # sk RefCnt Type Proto Iface R Rmem User Inode
)


@dataclasses.dataclass
class FdInfo:
    """One fd of one task."""

    fd: int
    type: str
    key: str
    mode: str
    target: str
    inode: int | None = None
    append: bool = False
    external: bool = False
    # For a unix socket: its peer's inode, when connected.
    peer: int | None = None
    # Bytes, for regular, deleted and memfd files (what a dump may copy).
    size: int | None = None
    # unix: "stream", "dgram" or "seqpacket".
    sock_type: str | None = None
    # Sockets: the TCP state name (LISTEN, ESTABLISHED, CLOSE...); unix
    # sockets use the same names (CLOSE: not connected).
    state: str | None = None
    # tcp/udp: "ip:port" ("[ip6]:port"); unix: the bound name, if any.
    local: str | None = None
    # tcp/udp: the remote "ip:port"; unix: the peer's bound name, if any.
    remote: str | None = None
    # File locks this fd holds, as "TYPE MODE MAJ:MIN:INODE" (the file's
    # identity as /proc/locks prints it), e.g. "FLOCK WRITE fe:00:1234".
    locks: tuple[str, ...] = ()
    # A pty end: the pair's index (N of /dev/pts/N), for the slave and for
    # the master (/dev/ptmx) alike; pty_master tells them apart.
    pty: int | None = None
    pty_master: bool = False

    @classmethod
    def of(cls, d: Mapping[str, Any]) -> FdInfo:
        """The FdInfo of an fd in its JSON form: as_dict's, or a walk's (read_fds)."""
        return cls(**d)

    def as_dict(self) -> dict[str, object]:
        """Every field, unset ones as None."""
        # Every field is a scalar or a tuple of str: a shallow copy is a deep
        # one, and dataclasses.asdict's recursion costs more than the whole
        # /proc read of a 10 000-fd tree.
        return dict(self.__dict__)


# An fd in its JSON form: what a tree is made of once read.  A walk
# (read_fds) gives the compact form, with only the fields that apply: fd,
# type, key, mode, target and external always; inode when known; append and
# locks only when set; a file's size, and a socket's peer, sock_type, state,
# local and remote, only when there is one; a pty end's pty index, and
# pty_master only when set.  A pipe is 90 bytes of JSON
# instead of 230.  FdInfo.of() turns either form into the typed view.
# Whole trees travel in this form (to the manifest, the API, and from a
# forked reader, criud.daemon.forkmap), so the tree-wide steps work on it.
Fd = dict[str, Any]


@dataclasses.dataclass
class TaskInfo:
    """One process of a tree, with its threads and fds."""

    pid: int
    ppid: int
    tids: list[int]
    fds: list[Fd]
    # How many fds the walk's listing of /proc/<pid>/fd held, classified or
    # not (None: unknown); what fd_count compares with.
    listed: int | None = None


@dataclasses.dataclass(frozen=True)
class InetSock:
    """One row of /proc/net/{tcp,tcp6,udp,udp6}."""

    proto: str  # "tcp" or "udp"
    state: str
    local: str
    remote: str


class NetTables:
    """The sockets of one network namespace, by inode.

    unix comes from sock_diag; inet and kinds from the /proc/net tables of
    pid, read only when a socket is not a unix one (a tree of socketpairs
    never needs them: 4 ms saved per walk).
    """

    def __init__(
        self,
        unix: dict[int, sockdiag.UnixSock],
        inet: dict[int, InetSock] | None = None,
        kinds: dict[int, str] | None = None,
        pid: int | None = None,
    ) -> None:
        self.unix = unix
        self._inet = inet
        self._kinds = kinds
        self._pid = pid

    def _proc_net(self) -> tuple[dict[int, InetSock], dict[int, str]]:
        if self._inet is None or self._kinds is None:
            if self._pid is None:
                self._inet, self._kinds = self._inet or {}, self._kinds or {}
            else:
                self._inet, self._kinds = _read_net_tables(self._pid)
        return self._inet, self._kinds

    @property
    def inet(self) -> dict[int, InetSock]:
        """tcp and udp sockets, with their state and addresses."""
        return self._proc_net()[0]

    @property
    def kinds(self) -> dict[int, str]:
        """Every socket a /proc/net table lists: tcp, udp, raw, netlink, packet."""
        return self._proc_net()[1]


@dataclasses.dataclass(frozen=True)
class FileLock:
    """One held lock of /proc/locks (waiters, shown with "->", are left out)."""

    type: str  # FLOCK, POSIX, OFDLCK, LEASE, DELEG
    mode: str  # READ or WRITE
    # The pid /proc/locks names: the lock's creator for FLOCK (the holder
    # may be a child that inherited the fd), -1 for OFD locks.
    pid: int
    major: int
    minor: int
    inode: int

    @property
    def id(self) -> str:
        """The file's identity as /proc/locks prints it: MAJ:MIN:INODE (hex, hex, decimal)."""
        return f"{self.major:02x}:{self.minor:02x}:{self.inode}"


def tty_key(st: os.stat_result) -> str:
    """Return CRIU's inherit key for a terminal: tty[rdev:dev], in hex."""
    return f"tty[{st.st_rdev & 0xFFFFFFFF:x}:{st.st_dev & 0xFFFFFFFF:x}]"


def path_key(path: str) -> str:
    """Return CRIU's inherit key for a file path: the path without its leading '/'."""
    return path.lstrip("/")


# -- /proc/net --------------------------------------------------------------------


def inet_address(hexaddr: str) -> str:
    """Turn /proc/net's "0100007F:1F90" into "127.0.0.1:8080" (IPv6 as "[::1]:8080")."""
    ip, _, port = hexaddr.partition(":")
    # The kernel prints the address as 32-bit words in host order (%08X of a
    # __be32 read as a native int), so each word's bytes come out reversed.
    raw = b"".join(struct.pack("=I", int(ip[i : i + 8], 16)) for i in range(0, len(ip), 8))
    if len(raw) == 4:
        return f"{socket.inet_ntop(socket.AF_INET, raw)}:{int(port, 16)}"
    return f"[{socket.inet_ntop(socket.AF_INET6, raw)}]:{int(port, 16)}"


def _read_net_tables(pid: int) -> tuple[dict[int, InetSock], dict[int, str]]:
    inet: dict[int, InetSock] = {}
    kinds: dict[int, str] = {}
    for table, kind, col in _NET_TABLES:
        try:
            with open(f"/proc/{pid}/net/{table}", encoding="ascii", errors="replace") as f:
                f.readline()
                rows = f.readlines()
        except OSError:
            continue
        for line in rows:
            parts = line.split()
            if len(parts) <= col:
                continue
            try:
                ino = int(parts[col])
            except ValueError:
                continue
            if ino == 0:
                continue  # TIME_WAIT and request sockets belong to no fd
            kinds[ino] = kind
            if kind in ("tcp", "udp"):
                try:
                    inet[ino] = InetSock(
                        proto=kind,
                        state=TCP_STATES.get(int(parts[3], 16), parts[3]),
                        local=inet_address(parts[1]),
                        remote=inet_address(parts[2]),
                    )
                except (ValueError, OSError, struct.error):
                    continue
    return inet, kinds


def _socket_kinds(pid: int) -> dict[int, str]:
    """Map socket inode -> kind, from the target's own network namespace."""
    return _read_net_tables(pid)[1]


def net_tables(pid: int) -> NetTables:
    """The socket tables of pid's network namespace (the /proc/net ones on first use)."""
    return NetTables(unix=sockdiag.unix_sockets(pid), pid=pid)


# -- /proc/locks ------------------------------------------------------------------


def parse_lock_line(line: str) -> FileLock | None:
    """Parse one /proc/locks line (or an fdinfo "lock:" line); None for waiters and junk."""
    if line.startswith("lock:"):
        line = line[len("lock:") :]
    parts = line.split()
    # "1: POSIX ADVISORY WRITE 1234 fe:00:56 0 EOF"; a waiter has "->" after the number.
    if len(parts) < 6 or parts[1] == "->":
        return None
    try:
        major, minor, ino = parts[5].split(":")
        return FileLock(
            type=parts[1],
            mode=parts[3],
            pid=int(parts[4]),
            major=int(major, 16),
            minor=int(minor, 16),
            inode=int(ino),
        )
    except ValueError:
        return None


def read_locks(path: str = "/proc/locks") -> list[FileLock]:
    """Every lock held on this host, as /proc/locks lists them."""
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            lines = f.readlines()
    except OSError:
        return []
    return [lk for line in lines if (lk := parse_lock_line(line)) is not None]


# -- one walk ---------------------------------------------------------------------


class ProcScan:
    """Caches for one walk over a tree: socket tables per netns, the host's locks.

    Reading /proc/net and sock_diag costs far more than one task's fds, so a
    walk reads them once for each network namespace it meets.
    """

    def __init__(self, locks: bool = True) -> None:
        self._nets: dict[int, NetTables] = {}
        # /proc/locks takes the kernel's global file_rwsem for writing and can
        # wait a whole RCU grace period (~12 ms measured after a quiet spell):
        # only introspection, which reports locks, reads it.  A dump leaves
        # locks to criu (file_locks).  Read on first use, so that the two
        # halves of a split walk (criud.daemon.forkmap) each wait for it
        # side by side rather than one after the other.
        self._want_locks = locks
        self._locks: list[FileLock] | None = None
        self._locked: set[tuple[int, int]] | None = None

    @property
    def locks(self) -> list[FileLock]:
        if self._locks is None:
            self._locks = read_locks() if self._want_locks else []
        return self._locks

    @property
    def locked(self) -> set[tuple[int, int]]:
        """(st_dev, st_ino) of every locked file, to compare with an fd's stat."""
        if self._locked is None:
            self._locked = {(os.makedev(lk.major, lk.minor), lk.inode) for lk in self.locks}
        return self._locked

    def net(self, pid: int) -> NetTables:
        """The socket tables of pid's network namespace."""
        ns = sockdiag._netns_inode(pid)
        if ns is None:
            # Not cached: the task is gone or hides its namespace.
            return net_tables(pid)
        tables = self._nets.get(ns)
        if tables is None:
            tables = self._nets[ns] = net_tables(pid)
        return tables


# -- classification ---------------------------------------------------------------


def _read_fdinfo(pid: int, fd: int) -> tuple[int | None, list[str]]:
    """Return (flags, lock lines) of /proc/<pid>/fdinfo/<fd>."""
    # Raw os.open/os.read: a text-mode open() costs more than the read itself,
    # and a walk may do this thousands of times.
    try:
        f = os.open(f"/proc/{pid}/fdinfo/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None, []
    try:
        data = os.read(f, 65536).decode("ascii", "replace")
    except OSError:
        return None, []
    finally:
        os.close(f)
    flags: int | None = None
    locks: list[str] = []
    for line in data.splitlines():
        if line.startswith("flags:"):
            try:
                flags = int(line.split()[1], 8)
            except (ValueError, IndexError):
                return None, []
        elif line.startswith("lock:"):
            locks.append(line)
    return flags, locks


# The kernel sets an fd symlink's permission bits from the file's f_mode
# (fs/proc/fd.c: read -> u+r, write -> u+w), so one lstat gives the access
# mode without opening fdinfo.  O_PATH fds have neither bit: not in here.
_LINK_MODES = {stat.S_IRUSR | stat.S_IWUSR: "rw", stat.S_IRUSR: "r", stat.S_IWUSR: "w"}


_USER_RW = stat.S_IRUSR | stat.S_IWUSR


def _bracket_inode(target: str) -> int | None:
    # "pipe:[123]" / "socket:[123]"
    try:
        return int(target[target.index("[") + 1 : -1])
    except ValueError:
        return None


def _describe_socket(d: Fd, ino: int, net: NetTables) -> None:
    u = net.unix.get(ino)
    if u is not None:
        d["type"] = "unix"
        if u.peer is not None:
            d["peer"] = u.peer
            peer = net.unix.get(u.peer)
            if peer is not None and peer.name is not None:
                d["remote"] = peer.name
        if u.type is not None:
            d["sock_type"] = u.type
        if u.state is not None:
            d["state"] = u.state
        if u.name is not None:
            d["local"] = u.name
        return
    i = net.inet.get(ino)
    if i is not None:
        d["type"] = i.proto
        d["state"], d["local"], d["remote"] = i.state, i.local, i.remote
        return
    d["type"] = net.kinds.get(ino, "socket")


def _classify_at(
    dirfd: int,
    pid: int,
    fd: int,
    net: NetTables | Callable[[], NetTables],
    locked: set[tuple[int, int]],
) -> Fd | None:
    """Describe fd of pid; dirfd is /proc/<pid>/fd, open.  None if fd closed meanwhile.

    The hot loop of a walk (10 000 fds in a big tree): as few syscalls as each
    kind allows, fdinfo only when it must, and the compact form (see Fd) built
    directly: a dataclass per fd, then a dict of it, cost more than the syscalls.
    """
    name = str(fd)
    try:
        target = os.readlink(name, dir_fd=dirfd)
        if target.startswith("socket:["):
            # A socket is always open read-write: no lstat for its mode; its
            # inode is in the link's text.
            d: Fd = {
                "fd": fd,
                "type": "socket",
                "key": target,
                "mode": "rw",
                "target": target,
                "external": False,
            }
            ino = _bracket_inode(target)
            if ino is not None:
                d["inode"] = ino
                _describe_socket(d, ino, net() if callable(net) else net)
            return d
        link_mode = _LINK_MODES.get(
            os.stat(name, dir_fd=dirfd, follow_symlinks=False).st_mode & _USER_RW
        )
    except OSError:
        return None
    d = {
        "fd": fd,
        "type": "other",
        "key": target,
        "mode": link_mode or "?",
        "target": target,
        "external": False,
    }
    need_fdinfo = link_mode is None

    if target.startswith("pipe:["):
        d["type"] = "pipe"
        ino = _bracket_inode(target)
        if ino is not None:
            d["inode"] = ino
    else:
        more = _describe_by_stat(d, pid, dirfd, name, target, locked)
        if more is None:
            return None
        need_fdinfo = need_fdinfo or more
    if need_fdinfo:
        _apply_fdinfo(d, pid, fd)
    return d


def _describe_by_stat(
    d: Fd, pid: int, dirfd: int, name: str, target: str, locked: set[tuple[int, int]]
) -> bool | None:
    """Fill d from a stat of the fd's file; whether fdinfo is needed too (None: fd closed)."""
    try:
        st = os.stat(name, dir_fd=dirfd)
    except OSError:
        return None
    need_fdinfo = False
    d["inode"] = st.st_ino
    if target.startswith("anon_inode:"):
        d["type"] = _ANON_TYPES.get(target[len("anon_inode:") :].strip("[]"), "other")
    elif target.startswith("/memfd:"):
        d["type"] = "memfd"
        d["size"] = st.st_size
    elif target.startswith("/"):
        _describe_path(d, st, pid)
        # O_APPEND matters only for a file open for writing (criu
        # size-checks every other file at restore), and only fdinfo
        # shows it: skip it for read-only fds, the commonest kind.
        if (d["type"] == "file" or d["type"] == "deleted") and "w" in d["mode"]:
            need_fdinfo = True
    if locked and (st.st_dev, st.st_ino) in locked:
        need_fdinfo = True  # fdinfo says whether this fd is the holder
    return need_fdinfo


def _apply_fdinfo(d: Fd, pid: int, fd: int) -> None:
    """The access mode, O_APPEND and the locks held, which only fdinfo shows."""
    flags, lock_lines = _read_fdinfo(pid, fd)
    if flags is not None:
        # An O_PATH fd's access bits read as O_RDONLY, yet it can read
        # nothing: it names a file, and says so.
        d["mode"] = "path" if flags & os.O_PATH else _ACCMODE.get(flags & os.O_ACCMODE, "rw")
        if flags & os.O_APPEND:
            d["append"] = True
    held = tuple(
        f"{lk.type} {lk.mode} {lk.id}" for line in lock_lines if (lk := parse_lock_line(line))
    )
    if held:
        d["locks"] = held


def pts_index(rdev: int) -> int:
    """The index N of /dev/pts/N from a slave's device number (as the kernel numbers them)."""
    # devpts makes MKDEV(136, N): past 255, N spills into the minor's upper
    # bits and the major stays 136.  136 + k with a small minor is the
    # legacy split of the same index space.
    return (os.major(rdev) - _PTS_MAJORS[0]) * 256 + os.minor(rdev)


def _master_index(pid: int, fd: int) -> int | None:
    """The pty index a master fd serves: fdinfo's "tty-index" line (None if absent)."""
    try:
        text = Path(f"/proc/{pid}/fdinfo/{fd}").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("tty-index:"):
            try:
                return int(line.split()[1])
            except (ValueError, IndexError):
                return None
    return None


def _describe_path(d: Fd, st: os.stat_result, pid: int) -> None:
    target = d["target"]
    if stat.S_ISFIFO(st.st_mode):
        d["type"] = "fifo"
    elif stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) in _TTY_MAJORS:
        d["type"] = "tty"
        d["key"] = tty_key(st)
        if os.major(st.st_rdev) in _PTS_MAJORS:
            d["pty"] = pts_index(st.st_rdev)
        elif target in _PTMX_TARGETS:
            # Masters are rare: one fdinfo read each says which slave they serve.
            d["pty_master"] = True
            index = _master_index(pid, d["fd"])
            if index is not None:
                d["pty"] = index
        return
    elif stat.S_ISREG(st.st_mode):
        d["type"] = "deleted" if target.endswith(" (deleted)") else "file"
        d["size"] = st.st_size
    elif stat.S_ISDIR(st.st_mode):
        d["type"] = "dir"
    elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        d["type"] = "device"
    d["key"] = path_key(target)


def classify(
    pid: int, fd: int, unix_peers: dict[int, int | None], sock_kinds: dict[int, str]
) -> FdInfo | None:
    """Describe fd of pid, or None if it closed meanwhile.

    For one fd at a time; a walk over many uses read_fds with a ProcScan.
    """
    net = NetTables(
        unix={ino: sockdiag.UnixSock(inode=ino, peer=p) for ino, p in unix_peers.items()},
        inet={},
        kinds=dict(sock_kinds),
    )
    try:
        dirfd = os.open(f"/proc/{pid}/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if fd == dirfd and pid == os.getpid():
            # Our own fd table, and fd was free: the kernel gave its number to
            # the directory we just opened.  fd itself is closed.
            return None
        d = _classify_at(dirfd, pid, fd, net, set())
        return None if d is None else FdInfo.of(d)
    finally:
        os.close(dirfd)


def read_fds(pid: int, scan: ProcScan | None = None) -> list[Fd]:
    """Every fd of pid, classified (Fd's compact form), in fd order; [] if pid is gone."""
    return _read_fds(pid, scan or ProcScan())[0]


def _read_fds(pid: int, scan: ProcScan) -> tuple[list[Fd], int | None]:
    """read_fds, and how many fd numbers its listing held (TaskInfo.listed)."""
    try:
        dirfd = os.open(f"/proc/{pid}/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in FD_EXHAUSTION:
            raise  # our own fd table is full: the task's fds are not "none"
        return [], None
    try:
        numbers = sorted(int(n) for n in os.listdir(dirfd))
        listed: int | None = len(numbers)
        if pid == os.getpid():
            # Reading our own table: leave out the directory fd of this walk.
            numbers = [n for n in numbers if n != dirfd]
            listed = None
        if not numbers:
            return [], listed
        # The socket tables (/proc/net/*, sock_diag: 2-6 ms each here) are
        # read only once a socket turns up; most small trees have none.
        cache: list[NetTables] = []

        def net() -> NetTables:
            if not cache:
                cache.append(scan.net(pid))
            return cache[0]

        fds = [i for n in numbers if (i := _classify_at(dirfd, pid, n, net, scan.locked))]
        return fds, listed
    except OSError:
        return [], None
    finally:
        os.close(dirfd)


# -- the tree ---------------------------------------------------------------------


def _tids(pid: int) -> list[int]:
    # Not psutil's threads(): it reads each thread's stat for its times (x15, bench row tids).
    try:
        return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return [pid]


def _ppid(pid: int) -> int:
    # Not psutil's ppid(): x3-4 per task of a walk (bench/proc_readers.py, row ppid).
    with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
        data = f.read()
    # The comm field may hold spaces and parentheses: split after the last ')'.
    return int(data[data.rindex(")") + 2 :].split()[1])


def tree_pids(root: int) -> list[int]:
    """Return root and its descendants, parents before children."""
    order: list[int] = []
    queue = collections.deque([root])
    seen: set[int] = set()
    while queue:
        pid = queue.popleft()
        if pid in seen:
            continue
        seen.add(pid)
        order.append(pid)
        queue.extend(procutil.children(pid))
    return order


def fd_count(pid: int) -> int | None:
    """How many fds pid holds now, from one stat of /proc/<pid>/fd; None if it is gone.

    Linux 6.2 and later give the count as the directory's size (the bits
    set in the fd table's open map); earlier kernels give 0.  A listing
    makes the kernel build a dentry per fd (11 ms for 10,000): this does
    not.
    """
    try:
        return os.stat(f"/proc/{pid}/fd").st_size
    except OSError:
        return None


def fd_numbers(pid: int) -> list[int]:
    """The fd numbers pid holds now, sorted; [] if it is gone."""
    try:
        return sorted(int(n) for n in os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return []


def read_tree(root: int) -> list[TaskInfo]:
    """Read every task of the tree rooted at root, with classified fds.

    Raises ProcessLookupError if root does not exist.  The project's own
    /proc reader, not psutil: this is a dump's hot path, and psutil's
    open_files() and net_connections("unix") took 227 ms on 10,000 fds where
    this took 170 ms, seeing only files and unix sockets (no pipes, ttys,
    peers' externality or modes); measured by bench/scaling_bench.py's tree.
    """
    if not os.path.exists(f"/proc/{root}/stat"):
        raise ProcessLookupError(root)
    scan = ProcScan(locks=False)
    tasks: list[TaskInfo] = []
    for pid in tree_pids(root):
        try:
            ppid = _ppid(pid)
        except (OSError, ValueError):
            continue  # exited while we walked
        fds, listed = _read_fds(pid, scan)
        tasks.append(TaskInfo(pid=pid, ppid=ppid, tids=_tids(pid), fds=fds, listed=listed))
    mark_external([t.fds for t in tasks])
    return tasks


def mark_external(tree: Iterable[Sequence[Fd]]) -> list[str]:
    """Flag fds whose other end the tree does not hold; return their keys.

    tree is the fds of each task.  A pipe or fifo is external when the tree
    holds only its read end or only its write end; a unix socket when its
    peer's inode is not held by the tree; a pty slave when no master of its
    index is (an engine's terminal: the engine holds the master).  The keys
    come once each, in the order the walk meets them.
    """
    tree = list(tree)
    ends: dict[str, str] = {}
    sockets_held: set[int] = set()
    # criu pairs a slave with a master by index alone (tty.c's active-pairs
    # bitmap), whatever devpts instance either lives in: so do we.
    masters = {f.get("pty") for fds in tree for f in fds if f.get("pty_master")}
    # Two passes over every fd of the tree (10 000 in a big one): plain
    # loops, and the rarer kinds skipped with one comparison.
    for fds in tree:
        for f in fds:
            t = f["type"]
            if t == "pipe" or t == "fifo":
                k = f["key"]
                ends[k] = ends.get(k, "") + f["mode"]
            elif f["target"].startswith("socket:[") and f.get("inode") is not None:
                sockets_held.add(f["inode"])
    external: dict[str, None] = {}
    for fds in tree:
        for f in fds:
            t = f["type"]
            if t == "pipe" or t == "fifo":
                held = ends[f["key"]]
                f["external"] = not ("r" in held and "w" in held)
            elif t == "unix" and f.get("peer"):
                f["external"] = f["peer"] not in sockets_held
            elif t == "tty" and f.get("pty") is not None and not f.get("pty_master"):
                # A master of unknown index (no tty-index in its fdinfo) may
                # be this slave's: then the slave is taken to be paired.
                f["external"] = f["pty"] not in masters and None not in masters
            if f["external"]:
                external[f["key"]] = None
    return list(external)
