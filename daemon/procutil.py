"""Small /proc helpers: start times, pidfds, subreaping.

These read /proc themselves rather than through psutil: each is on a path
taken per request or per task (bench/proc_readers.py times them against
psutil, 10,000 calls a side, interleaved: psutil costs 1.7 to 4 times as
much per call, and 64 times or more for children), or answers what psutil has no
call for (exact start ticks, the fs uid, thread ids, namespaces, NSpid,
cgroup mounts).  psutil is used where neither holds (criud.daemon.orphans).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

from criud.daemon.errors import FD_EXHAUSTION

PR_SET_CHILD_SUBREAPER = 36

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def set_child_subreaper() -> None:
    """Make orphaned descendants (and restored roots) our children, so we reap them."""
    if _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def stat_fields(pid: int) -> list[str]:
    """Fields of /proc/<pid>/stat after the comm field (field 3 is index 0)."""
    with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
        data = f.read()
    return data[data.rindex(")") + 2 :].split()


def proc_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, or None if it is gone."""
    # Not psutil's create_time(): float seconds built on /proc/stat's whole-second
    # btime, not the exact ticks records compare (and x1.7-2.1, bench row start_time).
    try:
        return int(stat_fields(pid)[19])
    except (OSError, ValueError, IndexError):
        return None


def proc_state(pid: int) -> str | None:
    """The one-letter state (R, S, Z, ...) of pid, or None if it is gone."""
    # The reaper asks it of every child on each sweep: psutil's status() is x2.1-2.6
    # (bench/proc_readers.py, row state).
    try:
        return stat_fields(pid)[0]
    except (OSError, IndexError):
        return None


def status_ids(pid: int, key: str) -> list[int]:
    """The ids of a "Uid:" or "Gid:" line of /proc/<pid>/status (real, effective, saved, fs)."""
    with open(f"/proc/{pid}/status", encoding="utf-8", errors="replace") as f:
        for line in f:
            # The Name line comes first and the kernel escapes newlines in
            # it, so a comm cannot forge a line of its own.
            if line.startswith(f"{key}:"):
                return [int(x) for x in line.split()[1:5]]
    raise ValueError(f"no {key} line for pid {pid}")


def not_our_child(pid: int, uid: int | None) -> str | None:
    """Why pid is not a child of this process running as uid (None if it is).

    uid None: any uid.  Checked through /proc; call it with a pidfd of pid
    open, so a pid that died in between reads as gone rather than as a
    stranger that took its number (a child's pid stays ours until reaped).
    """
    # Not psutil: its uids() stops at the saved uid and the fs uid counts here
    # too; and a restore's answer waits on it (x2.1-3.0, bench row ppid_uids).
    try:
        ppid = int(stat_fields(pid)[1])
        uids = status_ids(pid, "Uid")
    except (OSError, ValueError, IndexError):
        return "cannot be read in /proc"
    if ppid != os.getpid():
        return f"is a child of pid {ppid}, not of the daemon"
    if uid is not None and any(u != uid for u in uids):
        return f"runs as uids {'/'.join(map(str, uids))}, not {uid}"
    return None


def pid_exists(pid: int) -> bool:
    """Whether /proc knows pid (as a process or a thread)."""
    # Not psutil.pid_exists: it says False for a thread id, which holds the pid all the same.
    return os.path.exists(f"/proc/{pid}")


def pidfd_open(pid: int) -> int:
    """Open a pidfd for pid; raise ProcessLookupError if it is gone."""
    # Python's os.pidfd_open already returns an O_CLOEXEC descriptor.
    return os.pidfd_open(pid)


def children(pid: int) -> list[int]:
    """Direct children of pid, across all its threads; [] if it is gone."""
    # psutil's children() reads the stat of every process on the host: x64-135 with
    # about 100 processes (bench/proc_readers.py, row children), for each task of a walk.
    out: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError as e:
        if e.errno in FD_EXHAUSTION:
            raise
        return out
    for tid in tids:
        # os.open/os.read: a text-mode open() costs more than the read, and
        # introspecting a big tree does this for every task.
        try:
            f = os.open(f"/proc/{pid}/task/{tid}/children", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            if e.errno in FD_EXHAUSTION:
                raise  # our fd table is full: a tree cut short would look whole
            continue
        try:
            chunks = []
            while b := os.read(f, 65536):
                chunks.append(b)
        except OSError:
            continue
        finally:
            os.close(f)
        out.extend(int(c) for c in b"".join(chunks).split())
    return out


NS_TYPES = ("cgroup", "ipc", "mnt", "net", "pid", "time", "user", "uts")


def namespaces(pid: int | str) -> dict[str, int]:
    """Namespace inode of each type for pid ("self" for the daemon)."""
    out: dict[str, int] = {}
    for ns in NS_TYPES:
        try:
            out[ns] = os.stat(f"/proc/{pid}/ns/{ns}").st_ino
        except OSError:
            continue
    return out


def ns_pids(pid: int) -> list[int]:
    """pid as seen in each nested pid namespace, outermost first (NSpid)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return [int(x) for x in line.split()[1:]]
    except (OSError, ValueError):
        pass
    return []


# The v1 controllers a restore is placed in (besides the v2 hierarchy).
CGROUP_V1_CONTROLLERS = ("freezer", "memory", "pids")


def cgroup_mounts() -> list[str]:
    """Mount points of the cgroup hierarchies a restore is placed in.

    v1 hierarchies carrying freezer, memory or pids, and the v2 (unified)
    hierarchy wherever it is mounted, read from /proc/self/mountinfo.
    """
    out: list[str] = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fstype, _, options = [*right.split(), "", "", ""][:3]
            mount_point = left.split()[4]
            if fstype == "cgroup2" or (
                fstype == "cgroup" and set(options.split(",")) & set(CGROUP_V1_CONTROLLERS)
            ):
                out.append(mount_point)
    return out


# ioctl(fd, NS_GET_NSTYPE) answers the CLONE_NEW* flag of a namespace fd,
# however it was opened (/proc/PID/ns/net, or a bind mount like /run/netns/x).
NS_GET_NSTYPE = 0xB703
_CLONE_FLAGS = {
    0x00020000: "mnt",
    0x02000000: "cgroup",
    0x04000000: "uts",
    0x08000000: "ipc",
    0x10000000: "user",
    0x20000000: "pid",
    0x40000000: "net",
    0x00000080: "time",
}


def ns_type_of(fd: int) -> str | None:
    """The namespace type behind fd, or None if it is not a namespace."""
    import fcntl

    try:
        return _CLONE_FLAGS.get(fcntl.ioctl(fd, NS_GET_NSTYPE))
    except OSError:
        return None
