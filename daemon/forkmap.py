"""Map a function over items on two cores: this process and a forked child.

Introspecting a big tree is tens of thousands of small /proc syscalls, each
wrapped in a little Python.  Threads do not help: the GIL hand-off around
every 2 us syscall costs more than the syscall (measured: 2 threads took 1.5x
as long as one).  A forked child has its own interpreter, so the two really
run side by side, and for a 200-task tree that saves more than the fork
costs (~3 ms for the daemon).

The work is not split in fixed halves.  The items' indices wait in a pipe,
and each process takes the next one (a 4-byte read, atomic on a pipe) when
it is free: on this VM one vCPU is often slower than the other for a while
(measured: a fixed half took 75 ms in one process and 115 ms in the other),
and a shared queue lets the faster one do more.

fork() in a threaded process is safe only for a child that keeps to what
the forking thread owns.  The child here runs fn over plain data, encodes
the results with marshal, writes them to a pipe and calls os._exit: no
logging, no locks of other threads, no asyncio, no database, no atexit
handlers.  fn must respect the same limits (see map_split).

The daemon is a subreaper that sweeps up zombie children it cannot name:
callers hold Reaper.hold() around map_split so the sweep leaves our child
for us to reap.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import marshal
import os
import select
import signal
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

# Pipes are sized up to /proc/sys/fs/pipe-max-size (1 MiB by default), which
# root may not exceed without CAP_SYS_RESOURCE; EPERM leaves 64 KiB.
PIPE_SIZE = 1 << 20
_INDEX = 4  # bytes per queued index

T = TypeVar("T")
R = TypeVar("R")

# Python 3.12+ warns on any fork() in a threaded process; this one is
# written for it (module docstring).
warnings.filterwarnings(
    "ignore", message=r".*use of fork\(\) may lead to deadlocks", category=DeprecationWarning
)


def usable_cpus() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except OSError:
        return os.cpu_count() or 1


def map_split(fn: Callable[[T], R], items: Sequence[T], timeout: float = 60.0) -> list[R]:
    """[fn(x) for x in items], computed by this process and a forked child.

    fn's results must be plain data that marshal can carry (None, numbers,
    strings, and lists, tuples and dicts of them), and fn must need nothing
    but the memory it finds and syscalls: no locks, no threads, no logging.
    Whatever the child does not deliver (it cannot be forked, fails, or is
    not done within timeout seconds) is computed here: the answer is the
    same, only slower.
    """
    n = len(items)
    if n < 2:
        return [fn(x) for x in items]
    q = _index_queue(n)
    if q is None:
        return [fn(x) for x in items]
    r, w = os.pipe2(os.O_CLOEXEC)
    # With room for the child's results (a 100-task half is ~0.7 MB), it
    # never waits for us to read.
    with contextlib.suppress(OSError):
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    try:
        child = os.fork()
    except OSError:
        for fd in (q, r, w):
            os.close(fd)
        return [fn(x) for x in items]
    if child == 0:  # pragma: no cover - runs in the child, which never returns
        _child(fn, items, q, w)
    os.close(w)
    deadline = time.monotonic() + timeout
    out: dict[int, Any] = {}
    theirs = _Frames(n)
    try:
        # Between our items, decode what the child has sent so far: work
        # done while the queue still has items is shared (the child takes
        # more of them), work done after is not.
        os.set_blocking(r, False)
        for i in _take(q):
            out[i] = fn(items[i])
            theirs.pump(r)
        while not theirs.eof:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([r], [], [], left)[0]:
                break
            theirs.pump(r)
    finally:
        os.close(q)
        os.close(r)
        _reap(child, deadline)
    out.update(theirs.results)
    # Indices the child took but did not deliver (it failed, or timed out).
    return [out[i] if i in out else fn(items[i]) for i in range(n)]


def _index_queue(n: int) -> int | None:
    """The read end of a pipe holding the indices 0..n-1; None if they do not fit."""
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        with contextlib.suppress(OSError):
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        data = b"".join(i.to_bytes(_INDEX, "little") for i in range(n))
        if len(data) > fcntl.fcntl(w, fcntl.F_GETPIPE_SZ):
            os.close(r)
            return None  # a tree of over 16 384 tasks without a bigger pipe
        os.write(w, data)
        return r
    finally:
        os.close(w)  # readers see EOF once the queue is empty


def _take(q: int) -> Iterator[int]:
    """Indices from the queue until it is empty (reads of 4 bytes are atomic)."""
    while True:
        b = os.read(q, _INDEX)
        if len(b) < _INDEX:
            return
        yield int.from_bytes(b, "little")


class _Frames:
    """The child's results as they arrive: frames of a 4-byte length, then
    marshal of (index, result)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.results: dict[int, Any] = {}
        self.eof = False
        self._buf = bytearray()
        self._broken = False

    def pump(self, fd: int) -> None:
        """Read what fd has without blocking, and decode the whole frames in it."""
        while not self.eof:
            try:
                b = os.read(fd, 1 << 20)
            except BlockingIOError:
                break
            if not b:
                self.eof = True
                break
            self.feed(b)

    def feed(self, data: bytes) -> None:
        if self._broken:
            return  # junk came before: nothing after it is trusted
        self._buf += data
        view = memoryview(self._buf)
        off = 0
        try:
            while off + _INDEX <= len(view):
                size = int.from_bytes(view[off : off + _INDEX], "little")
                if off + _INDEX + size > len(view):
                    break  # the rest of this frame is still on its way
                try:
                    entry = marshal.loads(view[off + _INDEX : off + _INDEX + size])
                except (ValueError, EOFError, TypeError):
                    self._broken = True  # junk: keep what came before it
                    break
                off += _INDEX + size
                if isinstance(entry, tuple) and len(entry) == 2 and entry[0] in range(self.n):
                    self.results[entry[0]] = entry[1]
        finally:
            view.release()
        del self._buf[:off]


def _child(fn: Callable[[T], R], items: Sequence[T], q: int, w: int) -> None:
    code = 1
    try:
        # asyncio's signal wake-up fd is the parent's: a signal meant for
        # this child must not be reported to the parent's event loop.
        signal.set_wakeup_fd(-1)
        # The daemon's handlers would only flag the child's copy of the
        # server to stop; a stop meant for the child (systemd's, say)
        # should end it.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        # The child lives for one answer: collecting garbage it is about to
        # throw away whole would only cost time (and copy-on-write pages).
        gc.disable()
        # Each result is sent as soon as it is ready: when the queue runs
        # dry, the parent has only the last one to wait for, not the
        # encoding of all of them.
        for i in _take(q):
            result: Any = fn(items[i])  # marshal-able by map_split's contract
            frame = marshal.dumps((i, result))
            data = memoryview(len(frame).to_bytes(_INDEX, "little") + frame)
            while data:
                data = data[os.write(w, data) :]
        code = 0
    except BaseException:  # the parent redoes what it does not get
        pass
    finally:
        os._exit(code)


def _reap(pid: int, deadline: float) -> None:
    """Wait for the child; kill it if it outlives the deadline."""
    while True:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if done:
            return
        if time.monotonic() >= deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            return
        time.sleep(0.001)
