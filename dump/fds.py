"""Reading a process tree's file descriptors and naming them as CRIU does.

This is the one module that classifies fds: the dump-time manifest and the
introspection API both use it.  It reads /proc directly (psutil does not
expose fd targets, inodes and flags together) and is synchronous: callers
run it in a thread.

The CRIU key of an fd is the string CRIU matches ``--inherit-fd fd[N]:KEY``
against: ``pipe:[ino]`` and ``socket:[ino]`` as /proc shows them, a regular
file's (or fifo's) path relative to the root, without the leading slash, and
``tty[rdev:dev]`` for terminals.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import stat
from collections.abc import Iterable

from criud.dump import sockdiag

# Access modes as criud reports them.
_ACCMODE = {os.O_RDONLY: "r", os.O_WRONLY: "w", os.O_RDWR: "rw"}

# Character devices CRIU treats as terminals: pty slaves and masters, vt,
# serial, /dev/tty and /dev/console.
_TTY_MAJORS = {4, 5, 136, 137, 138, 139, 140, 141, 142, 143, 128, 129, 130, 131, 132, 133, 134, 135}


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

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class TaskInfo:
    """One process of a tree, with its threads and fds."""

    pid: int
    ppid: int
    tids: list[int]
    fds: list[FdInfo]


def tty_key(st: os.stat_result) -> str:
    """Return CRIU's inherit key for a terminal: tty[rdev:dev], in hex."""
    return f"tty[{st.st_rdev & 0xFFFFFFFF:x}:{st.st_dev & 0xFFFFFFFF:x}]"


def path_key(path: str) -> str:
    """Return CRIU's inherit key for a file path: the path without its leading '/'."""
    return path.lstrip("/")


def _read_flags(pid: int, fd: int) -> int | None:
    try:
        with open(f"/proc/{pid}/fdinfo/{fd}", encoding="ascii") as f:
            for line in f:
                if line.startswith("flags:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        return None
    return None


def _socket_kinds(pid: int) -> dict[int, str]:
    """Map socket inode -> kind, from the target's own network namespace."""
    kinds: dict[int, str] = {}
    tables = (
        ("tcp", "tcp"),
        ("tcp6", "tcp"),
        ("udp", "udp"),
        ("udp6", "udp"),
        ("raw", "raw"),
        ("raw6", "raw"),
        ("netlink", "netlink"),
        ("packet", "packet"),
    )
    for table, kind in tables:
        try:
            with open(f"/proc/{pid}/net/{table}", encoding="ascii") as f:
                header = f.readline().split()
                col = _inode_column(table, header)
                for line in f:
                    parts = line.split()
                    if len(parts) > col:
                        with contextlib.suppress(ValueError):
                            kinds[int(parts[col])] = kind
        except OSError:
            continue
    return kinds


def _inode_column(table: str, header: list[str]) -> int:
    if table == "netlink":
        return 9  # sk Eth Pid Groups Rmem Wmem Dump Locks Drops Inode
    if table == "packet":
        return 8  # sk RefCnt Type Proto Iface R Rmem User Inode
    # tcp/udp/raw: the header splits "tx_queue rx_queue" and "tr tm->when",
    # so count from the data lines' layout instead: inode is column 9.
    return 9


def classify(
    pid: int, fd: int, unix_peers: dict[int, int | None], sock_kinds: dict[int, str]
) -> FdInfo | None:
    """Describe fd of pid, or None if it closed meanwhile."""
    base = f"/proc/{pid}/fd/{fd}"
    try:
        target = os.readlink(base)
        st = os.stat(base)
    except OSError:
        return None
    flags = _read_flags(pid, fd)
    mode = _ACCMODE.get((flags or 0) & os.O_ACCMODE, "rw") if flags is not None else "?"
    append = bool(flags and flags & os.O_APPEND)
    info = FdInfo(
        fd=fd, type="other", key=target, mode=mode, target=target, inode=st.st_ino, append=append
    )

    if target.startswith("pipe:["):
        info.type = "pipe"
    elif target.startswith("socket:["):
        if st.st_ino in unix_peers:
            info.type = "unix"
            info.peer = unix_peers[st.st_ino]
        else:
            info.type = sock_kinds.get(st.st_ino, "socket")
    elif target.startswith("anon_inode:"):
        name = target[len("anon_inode:") :].strip("[]")
        info.type = {
            "eventfd": "eventfd",
            "eventpoll": "epoll",
            "signalfd": "signalfd",
            "timerfd": "timerfd",
            "inotify": "inotify",
            "pidfd": "pidfd",
            "fanotify": "fanotify",
        }.get(name, "other")
    elif target.startswith("/memfd:"):
        info.type = "memfd"
    elif target.startswith("/"):
        deleted = target.endswith(" (deleted)")
        if stat.S_ISFIFO(st.st_mode):
            info.type = "fifo"
        elif stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) in _TTY_MAJORS:
            info.type = "tty"
            info.key = tty_key(st)
        elif stat.S_ISREG(st.st_mode):
            info.type = "deleted" if deleted else "file"
        elif stat.S_ISDIR(st.st_mode):
            info.type = "dir"
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            info.type = "device"
        if info.type != "tty":
            info.key = path_key(target)
    return info


def _tids(pid: int) -> list[int]:
    try:
        return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return [pid]


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
        data = f.read()
    # The comm field may hold spaces and parentheses: split after the last ')'.
    return int(data[data.rindex(")") + 2 :].split()[1])


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for tid in _tids(pid):
        try:
            with open(f"/proc/{pid}/task/{tid}/children", encoding="ascii") as f:
                out.extend(int(c) for c in f.read().split())
        except OSError:
            continue
    return out


def tree_pids(root: int) -> list[int]:
    """Return root and its descendants, parents before children."""
    order: list[int] = []
    queue = [root]
    seen: set[int] = set()
    while queue:
        pid = queue.pop(0)
        if pid in seen:
            continue
        seen.add(pid)
        order.append(pid)
        queue.extend(_children(pid))
    return order


def _fd_numbers(pid: int) -> list[int]:
    try:
        return sorted(int(n) for n in os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return []


def read_tree(root: int) -> list[TaskInfo]:
    """Read every task of the tree rooted at root, with classified fds.

    Raises ProcessLookupError if root does not exist.
    """
    if not os.path.exists(f"/proc/{root}/stat"):
        raise ProcessLookupError(root)
    unix_peers = sockdiag.unix_peers(root)
    sock_kinds = _socket_kinds(root)
    tasks: list[TaskInfo] = []
    for pid in tree_pids(root):
        try:
            ppid = _ppid(pid)
        except (OSError, ValueError):
            continue  # exited while we walked
        fds = [i for n in _fd_numbers(pid) if (i := classify(pid, n, unix_peers, sock_kinds))]
        tasks.append(TaskInfo(pid=pid, ppid=ppid, tids=_tids(pid), fds=fds))
    mark_external(tasks)
    return tasks


def mark_external(tasks: Iterable[TaskInfo]) -> None:
    """Flag fds whose other end the tree does not hold.

    A pipe or fifo is external when the tree holds only its read end or only
    its write end; a unix socket when its peer's inode is not held by the tree.
    """
    tasks = list(tasks)
    ends: dict[str, set[str]] = {}
    sockets_held: set[int] = set()
    for t in tasks:
        for f in t.fds:
            if f.type in ("pipe", "fifo"):
                ends.setdefault(f.key, set()).update(f.mode if f.mode != "?" else "")
            elif f.inode is not None and f.target.startswith("socket:["):
                sockets_held.add(f.inode)
    for t in tasks:
        for f in t.fds:
            if f.type in ("pipe", "fifo"):
                held = ends.get(f.key, set())
                f.external = not ("r" in held and "w" in held)
            elif f.type == "unix" and f.peer:
                f.external = f.peer not in sockets_held
