"""Opening path-form inherit fds as the caller, in a child with the caller's credentials.

The daemon is root, and a path a caller names must open exactly as it
would for the caller, never in the daemon's own context.  Credentials
switched in a daemon thread are not enough: /proc/self/fd/N and other
magic links would still resolve in the daemon's process, handing out the
daemon's own fds, and an open() of a FIFO blocks the thread for good.

So each request's paths are opened by a short-lived child: the daemon's own
interpreter running a small stdlib-only opener, which first of all sets its
groups, gid and uid (real, effective, saved, and so fs) to the caller's and
checks that no capability is left, and only then reads the request.  (It
execs as root and drops after: subprocess's user= would drop before exec,
and the caller may not be allowed to run the daemon's interpreter, say one
under /root.)  The opener resolves with openat2(RESOLVE_NO_MAGICLINKS),
checks the file type on an O_PATH fd before opening anything for real, opens
with O_NONBLOCK so nothing can block, then clears O_NONBLOCK and sends the
fds back with SCM_RIGHTS.  The whole exchange is bounded by a timeout; the
child is killed and reaped on every path out.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import socket
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from criud.daemon import childproc
from criud.daemon.errors import (
    FifoNoReader,
    InheritOpenerFailed,
    InheritPathError,
    InheritPathTimeout,
    InheritPathWrongType,
)
from criud.daemon.fdpass import FdPassError, recv_reply

log = logging.getLogger("criud.paths")

MODES = ("r", "w", "a", "r+")
# Opens in flight at once, per caller uid and in all: a caller naming paths
# that hang (a stuck FUSE mount) ties up its own slots, not everyone's.
MAX_PER_UID = 4
MAX_TOTAL = 16
# After a kill, how long to wait for the child to be reaped before leaving
# that to a background task (a child in uninterruptible sleep dies late).
REAP_WAIT_S = 2.0

# The opener, run by `python -I -S -c`: stdlib only, no site, no environment.
# argv: daemon pid, the caller's uid, gid, groups (comma-separated).  stdin: the
# request, [[path, mode, type], ...].  fd 1: a SOCK_SEQPACKET socket for the
# one reply, {"ok": n} with n fds, or {"error": {...}} with none.
OPENER = r"""
import ctypes, errno, fcntl, json, os, socket, stat, struct, sys

SYS_OPENAT2 = {"x86_64": 437, "aarch64": 437}
RESOLVE_NO_MAGICLINKS = 0x02
FLAGS = {"r": os.O_RDONLY, "w": os.O_WRONLY | os.O_TRUNC,
         "a": os.O_WRONLY | os.O_APPEND, "r+": os.O_RDWR}
KINDS = ((stat.S_ISDIR, "directory"), (stat.S_ISSOCK, "socket"),
         (stat.S_ISBLK, "block device"), (stat.S_ISFIFO, "FIFO"),
         (stat.S_ISCHR, "character device"), (stat.S_ISREG, "regular file"))
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long


class Refused(Exception):
    pass


def openat2(path, flags, mode=0):
    how = struct.pack("QQQ", flags, mode, RESOLVE_NO_MAGICLINKS)
    nr = SYS_OPENAT2[os.uname().machine]
    fd = libc.syscall(ctypes.c_long(nr), ctypes.c_int(-100), ctypes.c_char_p(os.fsencode(path)),
                      ctypes.c_char_p(how), ctypes.c_size_t(len(how)))
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return int(fd)


def kind_of(m):
    return next((name for test, name in KINDS if test(m)), "special file")


def check_type(m, want):
    if want == "fifo":
        if not stat.S_ISFIFO(m):
            raise Refused("wrong_type",
                          f'it is a {kind_of(m)}, not the FIFO "type": "fifo" asks for')
    elif stat.S_ISFIFO(m):
        raise Refused("wrong_type", 'it is a FIFO: say "type": "fifo" to open one')
    elif not (stat.S_ISREG(m) or stat.S_ISCHR(m)):
        raise Refused("wrong_type", f"it is a {kind_of(m)}: only regular files, character "
                      "devices and (with \"type\": \"fifo\") FIFOs can be inherited")


def open_one(path, mode, want):
    base = os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
    for _ in range(3):
        try:
            pfd = openat2(path, os.O_PATH | os.O_CLOEXEC)
        except FileNotFoundError:
            if mode not in ("w", "a") or want == "fifo":
                raise
            try:
                # A new regular file, made by the caller; O_EXCL: never into
                # whatever appeared there meanwhile (we go round again).
                return openat2(path, FLAGS[mode] | os.O_CREAT | os.O_EXCL | base, 0o644)
            except FileExistsError:
                continue
        try:
            m = os.fstat(pfd).st_mode
            check_type(m, want)
            # Reopening the O_PATH fd opens exactly the inode just checked.
            try:
                return os.open(f"/proc/self/fd/{pfd}", FLAGS[mode] | base)
            except OSError as e:
                if e.errno == errno.ENXIO and stat.S_ISFIFO(m):
                    raise Refused("fifo_no_reader", "nobody has the FIFO open for reading") from e
                raise
        finally:
            os.close(pfd)
    raise OSError(errno.EAGAIN, "the path kept changing while it was opened")


def become(uid, gid, groups):
    # Single-threaded after exec: these set the whole process's ids.  Groups
    # and gid first, while we may still; setresuid to a non-zero uid then
    # clears every capability.  Checked, not trusted.
    os.setgroups(groups)
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.getresuid() != (uid,) * 3 or os.getresgid() != (gid,) * 3:
        os._exit(3)
    if sorted(set(os.getgroups())) != sorted(set(groups)):
        os._exit(3)
    if uid != 0:
        with open("/proc/self/status") as f:
            caps = [ln.split()[1] for ln in f if ln.startswith(("CapPrm:", "CapEff:", "CapAmb:"))]
        if any(int(c, 16) for c in caps):
            os._exit(3)


def main():
    uid, gid = int(sys.argv[2]), int(sys.argv[3])
    become(uid, gid, sorted({int(g) for g in sys.argv[4].split(",") if g}))
    # Die with the daemon, and not at all if it is gone already.
    libc.prctl(1, 9, 0, 0, 0)
    if os.getppid() != int(sys.argv[1]):
        os._exit(4)
    out = socket.socket(fileno=1)
    fds, reply, i = [], None, 0
    try:
        for i, (path, mode, want) in enumerate(json.load(sys.stdin)):
            fd = open_one(path, mode, want)
            fds.append(fd)
            # O_NONBLOCK only kept the open from blocking: the restored
            # process gets the ordinary, blocking semantics.
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        reply = {"ok": len(fds)}
    except Refused as e:
        reply = {"error": {"index": i, "kind": e.args[0], "message": e.args[1]}}
    except OSError as e:
        name = errno.errorcode.get(e.errno or 0, str(e.errno))
        reply = {"error": {"index": i, "kind": "errno", "errno": name, "message": e.strerror}}
    if "error" in reply:
        fds = []
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))] if fds else []
    out.sendmsg([json.dumps(reply).encode()], anc)


main()
"""


@dataclasses.dataclass(frozen=True)
class PathRequest:
    """One path to open: its mode (r, w, a, r+) and, for a FIFO, type "fifo"."""

    path: str
    mode: str = "r"
    type: str | None = None


@dataclasses.dataclass(frozen=True)
class Creds:
    """Whom to open as: uid, gid and every supplementary group."""

    uid: int
    gid: int
    groups: tuple[int, ...]


SpawnGuard = Callable[[], contextlib.AbstractContextManager[object]]


class PathOpener:
    """Opens caller paths in a child with the caller's credentials."""

    def __init__(
        self,
        timeout_s: float,
        running: set[int],
        spawn_guard: SpawnGuard = contextlib.nullcontext,
        program: str = OPENER,
    ) -> None:
        self.timeout_s = timeout_s
        # Pids of our children the orphan sweep must leave alone (shared
        # with Criu.running), and the guard that holds the sweep while a
        # child exists that is not in there yet.
        self._running = running
        self._spawn_guard = spawn_guard
        self._program = program
        self._python = os.path.realpath(sys.executable)
        self._total = asyncio.Semaphore(MAX_TOTAL)
        self._per_uid: dict[int, tuple[asyncio.Semaphore, int]] = {}
        self._reaping = childproc.Reaper(self._running.discard)

    async def open(self, requests: Sequence[PathRequest], creds: Creds) -> list[int]:
        """Open every request as creds; the fds (O_CLOEXEC, in order) are the caller's to close.

        Raises a CriudError naming the first path that failed; no fd leaks.
        """
        for r in requests:
            if not os.path.isabs(r.path):
                raise InheritPathError(f"inherit path {r.path!r} must be absolute", path=r.path)
        if not requests:
            return []
        try:
            async with asyncio.timeout(self.timeout_s):
                async with self._slot(creds.uid):
                    return await self._run(requests, creds)
        except TimeoutError:
            raise InheritPathTimeout(
                f"opening {', '.join(repr(r.path) for r in requests)} took longer than "
                f"{self.timeout_s:g}s (a hung filesystem?)",
                paths=[r.path for r in requests],
            ) from None

    @contextlib.asynccontextmanager
    async def _slot(self, uid: int) -> AsyncIterator[None]:
        sem, users = self._per_uid.get(uid) or (asyncio.Semaphore(MAX_PER_UID), 0)
        self._per_uid[uid] = (sem, users + 1)
        try:
            async with sem, self._total:
                yield
        finally:
            sem, users = self._per_uid[uid]
            if users == 1:
                del self._per_uid[uid]
            else:
                self._per_uid[uid] = (sem, users - 1)

    async def _run(self, requests: Sequence[PathRequest], creds: Creds) -> list[int]:
        kind = socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC
        ours, theirs = socket.socketpair(socket.AF_UNIX, kind)
        proc: asyncio.subprocess.Process | None = None
        try:
            with theirs:
                proc = await self._spawn(theirs.fileno(), creds)
            payload = json.dumps([[r.path, r.mode, r.type] for r in requests]).encode()
            _, err = await proc.communicate(payload)
            self._running.discard(proc.pid)
            return self._answer(ours, requests, proc.returncode, err)
        finally:
            ours.close()
            if proc is not None and proc.returncode is None:
                # Timed out or cancelled: never leave the child behind.
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                self._reaping.reap(proc)

    async def _spawn(self, sock_fd: int, creds: Creds) -> asyncio.subprocess.Process:
        # Held from fork until the pid is in _running: the orphan sweep must
        # not reap a child asyncio waits for.
        with self._spawn_guard():
            try:
                proc = await asyncio.create_subprocess_exec(
                    self._python,
                    "-I",
                    "-S",
                    "-c",
                    self._program,
                    str(os.getpid()),
                    str(creds.uid),
                    str(creds.gid),
                    ",".join(map(str, creds.groups)),
                    stdin=asyncio.subprocess.PIPE,
                    stdout=sock_fd,
                    stderr=asyncio.subprocess.PIPE,
                    close_fds=True,
                    start_new_session=True,
                    cwd="/",
                    env={},
                )
            except OSError as e:
                raise InheritOpenerFailed(
                    f"cannot run the path opener {self._python}: {e.strerror}"
                ) from e
            self._running.add(proc.pid)
        return proc

    def _answer(
        self, sock: socket.socket, requests: Sequence[PathRequest], rc: int | None, err: bytes
    ) -> list[int]:
        """Read the child's one reply off sock: the fds, or the error it names."""
        try:
            data, owned = recv_reply(sock)
        except (BlockingIOError, FdPassError) as e:
            raise InheritOpenerFailed(
                f"the path opener exited {rc} without a usable answer ({e}): "
                + err.decode("utf-8", "replace")[-300:].strip()
            ) from None
        with owned:
            try:
                doc: Any = json.loads(data) if data else {}
            except ValueError:
                doc = {}
            if not isinstance(doc, dict):
                doc = {}
            if "ok" in doc and doc["ok"] == len(requests) == len(owned):
                return owned.detach()
        raise _error(doc.get("error"), requests, rc)


def _error(err: Any, requests: Sequence[PathRequest], rc: int | None) -> Exception:
    """The CriudError for the child's error reply."""
    if not isinstance(err, dict) or not isinstance(err.get("index"), int):
        return InheritOpenerFailed(f"the path opener (exit {rc}) gave no usable answer")
    r = requests[err["index"]]
    message = str(err.get("message"))
    where = f"{r.path!r} ({r.mode})"
    if err.get("kind") == "wrong_type":
        return InheritPathWrongType(f"cannot inherit {where}: {message}", path=r.path)
    if err.get("kind") == "fifo_no_reader":
        return FifoNoReader(f"cannot open FIFO {where} for writing: {message}", path=r.path)
    name = str(err.get("errno"))
    if name == "ELOOP":
        message += " (magic links such as /proc/PID/fd/N are never followed)"
    return InheritPathError(f"cannot open {where}: {message}", path=r.path, errno=name)
