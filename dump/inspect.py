"""Introspection of a live process tree: what a checkpoint of it would meet.

``inspect_tree(pid)`` describes the tree rooted at pid as JSON-able data:
each task's ids, credentials, state, threads, session, namespaces, cgroups,
memory and controlling terminal, every fd (classified by criud.dump.fds, the
one fd classifier), TCP/UDP endpoints, the file locks the tree holds and the
shared-memory files it keeps open.  criud.dump.preflight judges that data
against dump options without touching /proc again.

Everything is read from /proc directly, relative to an open /proc/<pid>
directory so a pid reused mid-walk cannot mix two processes.  psutil would
read the same files but pays a Process object and per-call checks for each
of them: what it can give of a task costs x1.6-2.0 (bench/proc_readers.py,
row task), without the namespaces, cgroups and NSpid, and a 200-task tree has no
time for that.  Nor has it the memory figures a dump's estimate needs:
memory_info() is /proc/<pid>/statm, whose "shared" is RssFile + RssShmem in
one, while shmem is copied into the images and file pages are not (speed is
no reason here: row memory puts the two within 30% either way).

Synchronous and blocking: the daemon calls it in a thread.
"""

from __future__ import annotations

import copy
import os
import threading
from collections.abc import Mapping
from typing import TypedDict

from criud.daemon import forkmap
from criud.daemon.errors import FD_EXHAUSTION
from criud.dump import fds as fdmod

# The namespaces criu cares about, as named under /proc/<pid>/ns.
NAMESPACES = ("cgroup", "ipc", "mnt", "net", "pid", "time", "user", "uts")

# Pty slaves: majors 136-143 (UNIX98_PTY_SLAVE_MAJOR and the 7 after it).
_PTS_MAJORS = range(136, 144)


class Uids(TypedDict):
    real: int
    effective: int
    saved: int
    fs: int


class Threads(TypedDict):
    count: int
    tids: list[int]


class Namespace(TypedDict):
    # The namespace's inode number (what `readlink /proc/<pid>/ns/X` shows in
    # brackets); None when it could not be read.
    id: int | None
    # True when it is not the daemon's own namespace of that kind.
    differs: bool


class Memory(TypedDict):
    """Bytes.  rss and shared as psutil's memory_info reports them."""

    rss: int
    shared: int  # file-backed + shmem resident pages
    private: int  # rss - shared: anonymous memory, what a dump copies
    shmem: int  # resident shared memory (tmpfs, /dev/shm, memfd, shared anon)


class Tty(TypedDict):
    nr: int  # tty_nr from /proc/<pid>/stat
    major: int
    minor: int
    name: str | None  # "pts/3", "tty1", or None when criud does not know the major


class Task(TypedDict):
    pid: int
    ppid: int
    comm: str
    cmdline: list[str]
    state: str  # one letter, as in /proc/<pid>/stat
    uids: Uids
    gids: Uids
    threads: Threads
    sid: int
    pgid: int
    # The pid in each pid namespace, outermost first (NSpid in status); the
    # last one is the pid the task sees for itself.
    nspid: list[int]
    # The session id likewise; an innermost 0 means the session leader is
    # outside the task's pid namespace.
    nssid: list[int]
    tty: Tty | None
    namespaces: dict[str, Namespace]
    cgroup: list[str]
    memory: Memory
    fds: list[fdmod.Fd]
    # True when visible_to() hid this task's fds and namespaces.
    redacted: bool


class Lock(TypedDict):
    pid: int
    fd: int | None  # None: /proc/locks names the task but no fd of it matched
    key: str | None
    type: str  # FLOCK, POSIX, OFDLCK, LEASE...
    mode: str  # READ or WRITE
    id: str  # MAJ:MIN:INODE of the locked file, as /proc/locks prints it


class Shm(TypedDict):
    key: str
    inode: int | None
    bytes: int
    pids: list[int]


class Tree(TypedDict):
    root: int
    tasks: list[Task]
    # Keys whose other end the tree does not hold (as the dump manifest
    # computes them); a restore must supply each of them.
    external: list[str]
    locks: list[Lock]
    # memfd and /dev/shm files the tree holds open, each counted once.
    shm: list[Shm]


def own_namespaces() -> dict[str, int]:
    """The calling process's namespace ids (inode numbers), by name."""
    out: dict[str, int] = {}
    for name in NAMESPACES:
        try:
            out[name] = os.stat(f"/proc/self/ns/{name}").st_ino
        except OSError:
            continue  # a kernel without that namespace kind (time < 5.6)
    return out


_READ_SIZE = 65536


def _read_at(dirfd: int, name: str) -> bytes:
    """The whole of /proc/<pid>/<name>, read relative to the pid's directory."""
    f = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dirfd)
    try:
        chunks = []
        while True:
            b = os.read(f, _READ_SIZE)
            chunks.append(b)
            # These files (seq_file, and cmdline) fill a read as far as they
            # can: a short one was the end, and a read more to see EOF would
            # cost a syscall per file per task.
            if len(b) < _READ_SIZE:
                break
        return b"".join(chunks)
    finally:
        os.close(f)


def _ids(value: str) -> Uids:
    real, eff, saved, fs = (int(x) for x in value.split()[:4])
    return {"real": real, "effective": eff, "saved": saved, "fs": fs}


def _kb(status: Mapping[str, str], key: str) -> int:
    # "    2224 kB"; absent for kernel threads (no mm).
    v = status.get(key)
    return int(v.split()[0]) * 1024 if v else 0


def _tty(nr: int) -> Tty | None:
    if nr == 0:
        return None
    # new_encode_dev: minor's low byte, then the major, then the minor's rest.
    major = (nr >> 8) & 0xFFF
    minor = (nr & 0xFF) | ((nr >> 12) & 0xFFF00)
    name: str | None = None
    if major in _PTS_MAJORS:
        name = f"pts/{(major - 136) * 256 + minor}"
    elif major == 4 and minor < 64:
        name = f"tty{minor}"
    elif major == 4:
        name = f"ttyS{minor - 64}"
    return {"nr": nr, "major": major, "minor": minor, "name": name}


def _task_namespaces(dirfd: int, daemon_ns: Mapping[str, int]) -> dict[str, Namespace]:
    """Each namespace of the task at dirfd (/proc/<pid>), and whether it differs from ours."""
    namespaces: dict[str, Namespace] = {}
    for name in NAMESPACES:
        # "net:[4026531840]": the number is the namespace's inode.  The
        # link's text costs a third of a stat() through it (1.4 us, not
        # 4.4), and a tree of 200 tasks has 1 600 of them.
        try:
            link = os.readlink(f"ns/{name}", dir_fd=dirfd)
            ino: int | None = int(link[link.index("[") + 1 : -1])
        except (OSError, ValueError):
            ino = None
        ours = daemon_ns.get(name)
        namespaces[name] = {
            "id": ino,
            "differs": ino is not None and ours is not None and ino != ours,
        }
    return namespaces


def _status_line(line: str) -> tuple[str, str]:
    k, _, v = line.partition(":")
    return k, v.strip()


def _memory(status: dict[str, str]) -> Memory:
    """A task's memory in KiB, from its status."""
    anon, file_, shmem = _kb(status, "RssAnon"), _kb(status, "RssFile"), _kb(status, "RssShmem")
    return {"rss": _kb(status, "VmRSS"), "shared": file_ + shmem, "private": anon, "shmem": shmem}


def memory_of(pid: int) -> Memory | None:
    """One task's memory figures, read as inspect_tree reads them; None if it is gone."""
    try:
        dirfd = os.open(f"/proc/{pid}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except (FileNotFoundError, ProcessLookupError):
        return None
    try:
        text = _read_at(dirfd, "status").decode("utf-8", "replace")
    except (FileNotFoundError, ProcessLookupError):
        return None
    finally:
        os.close(dirfd)
    return memory_from_status(text)


def memory_from_status(text: str) -> Memory:
    """A task's memory figures from the text of its status file (any of its threads')."""
    return _memory(dict(_status_line(line) for line in text.splitlines()))


def _read_task(pid: int, daemon_ns: Mapping[str, int]) -> Task | None:
    """One task's description, without fds; None if it exited meanwhile."""
    try:
        dirfd = os.open(f"/proc/{pid}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in FD_EXHAUSTION:
            raise  # our fd table is full, not the task gone: never a 404
        return None
    try:
        stat = _read_at(dirfd, "stat").decode("utf-8", "replace")
        status_text = _read_at(dirfd, "status").decode("utf-8", "replace")
        cmdline = _read_at(dirfd, "cmdline")
        cgroup = _read_at(dirfd, "cgroup").decode("utf-8", "replace")
        namespaces = _task_namespaces(dirfd, daemon_ns)
        status = dict(_status_line(line) for line in status_text.splitlines())
        # Most tasks have one thread: its tid is the pid, and listing
        # /proc/<pid>/task would cost four syscalls more per task.
        if status.get("Threads") == "1":
            tids = [pid]
        else:
            tids = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except OSError as e:
        if e.errno in FD_EXHAUSTION:
            raise
        return None
    except ValueError:
        return None
    finally:
        os.close(dirfd)

    # comm may hold spaces and parentheses: it ends at the last ')'.
    close = stat.rindex(")")
    comm = stat[stat.index("(") + 1 : close]
    fields = stat[close + 2 :].split()
    if status.get("Tgid", str(pid)) != str(pid):
        # A thread id: /proc answers for it, but it is not a process (and
        # /proc does not list it); a tree is rooted at a process.
        return None
    return {
        "pid": pid,
        "ppid": int(fields[1]),
        "comm": comm,
        "cmdline": [a.decode("utf-8", "replace") for a in cmdline.split(b"\0")[:-1]],
        "state": fields[0],
        "uids": _ids(status.get("Uid", "0 0 0 0")),
        "gids": _ids(status.get("Gid", "0 0 0 0")),
        "threads": {"count": len(tids), "tids": tids},
        "sid": int(fields[3]),
        "pgid": int(fields[2]),
        "nspid": [int(x) for x in status.get("NSpid", str(pid)).split()],
        "nssid": [int(x) for x in status.get("NSsid", fields[3]).split()],
        "tty": _tty(int(fields[4])),
        "namespaces": namespaces,
        "cgroup": cgroup.splitlines(),
        "memory": _memory(status),
        "fds": [],
        "redacted": False,
    }


def _orphan_locks(
    tasks: list[Task], scan: fdmod.ProcScan, matched: set[tuple[int, str]]
) -> list[Lock]:
    # A lock /proc/locks credits to a task of the tree that no fd showed
    # (e.g. a file whose st_dev differs from the lock's superblock, as on
    # overlayfs): report it without an fd rather than miss it.
    out: list[Lock] = []
    pids = {t["pid"] for t in tasks}
    for lk in scan.locks:
        if lk.pid in pids and (lk.pid, lk.id) not in matched:
            out.append(
                {
                    "pid": lk.pid,
                    "fd": None,
                    "key": None,
                    "type": lk.type,
                    "mode": lk.mode,
                    "id": lk.id,
                }
            )
            matched.add((lk.pid, lk.id))
    return out


# Below this many tasks a tree is walked in one process: forking the daemon
# (~4 ms) would cost more than the second core saves.
SPLIT_MIN_TASKS = 32
_SPLIT = threading.Lock()

# What reading one task gives: the task with its fds (JSON form), the locks
# its fds hold, and the shared-memory files among them.  Plain data, so that
# a forked reader can send it back with marshal.
_TaskRead = tuple[Task, list[Lock], list[Shm]]


def _read_one(pid: int, ns: Mapping[str, int], scan: fdmod.ProcScan) -> _TaskRead | None:
    task = _read_task(pid, ns)
    if task is None:
        return None
    fds = fdmod.read_fds(pid, scan)
    locks: list[Lock] = []
    shm: list[Shm] = []
    for f in fds:
        for desc in f.get("locks", ()):
            type_, mode, ident = desc.split(" ", 2)
            locks.append(
                {
                    "pid": pid,
                    "fd": f["fd"],
                    "key": f["key"],
                    "type": type_,
                    "mode": mode,
                    "id": ident,
                }
            )
        if f["type"] == "memfd" or f["target"].startswith("/dev/shm/"):
            shm.append(
                {
                    "key": f["key"],
                    "inode": f.get("inode"),
                    "bytes": f.get("size") or 0,
                    "pids": [pid],
                }
            )
    task["fds"] = fds
    return task, locks, shm


def inspect_tree(pid: int, daemon_ns: dict[str, int] | None = None, split: bool = True) -> Tree:
    """Describe the live tree rooted at pid; ProcessLookupError if pid does not exist.

    daemon_ns is the daemon's own namespace ids (own_namespaces(), read once
    at start-up); each task's namespaces are marked as differing from it.
    With split, a big tree on a machine with two CPUs or more is read by
    this process and a forked child side by side (criud.daemon.forkmap):
    the caller must keep a subreaper's orphan sweep away from that child.
    """
    if not os.path.exists(f"/proc/{pid}/stat"):
        raise ProcessLookupError(pid)
    ns = own_namespaces() if daemon_ns is None else daemon_ns
    scan = fdmod.ProcScan()
    pids = fdmod.tree_pids(pid)
    # One split walk at a time: with a second core busy already, another
    # fork would only add its cost (and a copy of the daemon per request).
    if (
        split
        and len(pids) >= SPLIT_MIN_TASKS
        and forkmap.usable_cpus() > 1
        and _SPLIT.acquire(blocking=False)
    ):
        try:
            read = forkmap.map_split(lambda p: _read_one(p, ns, scan), pids)
        finally:
            _SPLIT.release()
    else:
        read = [_read_one(p, ns, scan) for p in pids]
    if read[0] is None:
        raise ProcessLookupError(pid)
    tasks: list[Task] = []
    locks: list[Lock] = []
    shm: dict[tuple[str, int | None], Shm] = {}
    for got in read:
        if got is None:
            continue  # a descendant exited while we walked
        task, task_locks, task_shm = got
        tasks.append(task)
        locks += task_locks
        for s in task_shm:
            entry = shm.setdefault((s["key"], s["inode"]), s)
            if entry is not s and s["pids"][0] not in entry["pids"]:
                entry["pids"].append(s["pids"][0])
    # External-ness needs the whole tree: one end of a pipe may be anywhere in it.
    external = fdmod.mark_external(t["fds"] for t in tasks)
    matched = {(lk["pid"], lk["id"]) for lk in locks}
    return {
        "root": pid,
        "tasks": tasks,
        "external": external,
        "locks": locks + _orphan_locks(tasks, scan, matched),
        "shm": list(shm.values()),
    }


def _owned_by(task: Task, uid: int) -> bool:
    u = task["uids"]
    return u["real"] == uid and u["effective"] == uid and u["saved"] == uid


def visible_to(tree: Tree, uid: int) -> Tree | None:
    """The part of tree a caller with this uid may see; None if none of it.

    Root sees everything.  Anyone else must own the tree's root task (its
    real uid): otherwise None, which the API answers with 404 like any pid
    the caller cannot see, so probing reveals no other user's process.
    Inside an owned tree, a task that is not wholly the caller's (real,
    effective and saved uid) keeps its ids, state and memory, which /proc
    shows everyone, but loses its fds, namespaces and cgroups, which /proc
    shows only to who may ptrace it (a setuid child, for one).
    """
    if uid == 0:
        return tree
    if not tree["tasks"] or tree["tasks"][0]["uids"]["real"] != uid:
        return None
    out = copy.deepcopy(tree)
    hidden: set[int] = set()
    for t in out["tasks"]:
        if _owned_by(t, uid):
            continue
        hidden.add(t["pid"])
        t["fds"] = []
        t["cgroup"] = []
        t["namespaces"] = {
            n: {"id": None, "differs": v["differs"]} for n, v in t["namespaces"].items()
        }
        t["redacted"] = True
    if hidden:
        keep = {str(f["key"]) for t in out["tasks"] for f in t["fds"] if f.get("external")}
        out["external"] = [k for k in out["external"] if k in keep]
        out["locks"] = [lk for lk in out["locks"] if lk["pid"] not in hidden]
        shm: list[Shm] = []
        for s in out["shm"]:
            s["pids"] = [p for p in s["pids"] if p not in hidden]
            if s["pids"]:
                shm.append(s)
        out["shm"] = shm
    return out
