"""criu's warm workers: pre-started `criu swrk` processes on socketpairs.

`WarmPool` keeps pre-started workers, each on a SOCK_SEQPACKET socketpair,
ready to serve one request: criu refuses keep_open for dump and restore, so
a worker that has served is gone and the pool starts another off the
request path.  `HandleWorkers` starts one per fd handle, holding exactly
its fds.  What goes over the socket is criud.daemon.criu_msg's: this
module never loads protobuf, so a daemon that keeps workers warm but has
not run criu yet does not hold it (2.7 MiB; docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Sequence

from criud.daemon import childproc

log = logging.getLogger("criud.criu")

# -- the workers -------------------------------------------------------------------


@dataclasses.dataclass
class Worker:
    """A started `criu swrk`, waiting for its one request on sock."""

    proc: childproc.Proc
    sock: socket.socket
    # The fds besides its socket the worker holds, at these numbers (an fd
    # handle's, HandleWorkers); a pool worker holds none.
    held: tuple[int, ...] = ()

    def close(self) -> None:
        """Kill the worker (if it still runs) and close our end; the pid is reaped by asyncio."""
        with contextlib.suppress(ProcessLookupError):
            if self.proc.returncode is None:
                self.proc.kill()
        self.sock.close()


# spawn(argv, fds): start argv holding exactly fds (the worker's socket first).
Spawner = Callable[[Sequence[str], Sequence[int]], Awaitable[childproc.Proc]]
# A dump's notification handler: criu's action name -> go on (True) or fail
# the dump there (False).
Notify = Callable[[str], Awaitable[bool]]


async def start_worker(
    argv_for: Callable[[int], list[str]], spawn: Spawner, fds: tuple[int, ...] = ()
) -> Worker:
    """A socketpair and `criu swrk` on its end, holding that end and fds (at their numbers)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        # Every fd here is CLOEXEC; pass_fds hands the worker exactly these.
        proc = await spawn(argv_for(theirs.fileno()), (theirs.fileno(), *fds))
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    ours.setblocking(False)
    return Worker(proc, ours, fds)


class WarmPool:
    """Pre-started criu swrk workers; take() one, fill() to start its replacement."""

    def __init__(
        self,
        size: int,
        argv_for: Callable[[int], list[str]],
        spawn: Spawner,
        forget: Callable[[int], None],
    ) -> None:
        self.size = size
        # forget(pid): the runner stops counting a worker it will never wait for.
        self._forget = forget
        # argv_for(fd) is the worker's command line for its socket at fd.
        self._argv_for = argv_for
        self._spawn = spawn
        self._ready: list[Worker] = []
        self._starting = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        # Counted for /metrics and the benchmark: served warm vs fell back.
        self.taken = 0
        self.missed = 0

    def fill(self) -> None:
        """Top the pool up in the background (never on a request's path)."""
        while not self._closed and len(self._ready) + self._starting < self.size:
            self._starting += 1
            task = asyncio.get_running_loop().create_task(self._add())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _add(self) -> None:
        try:
            w = await start_worker(self._argv_for, self._spawn)
        except Exception as e:
            # The CLI path still works; the next take() tries again.
            log.warning("cannot start a warm criu worker: %s", e)
            return
        finally:
            self._starting -= 1
        if self._closed:
            w.close()
            await w.proc.wait()
            self._forget(w.proc.pid)
        else:
            self._ready.append(w)

    def take(self) -> Worker | None:
        """A ready worker (the pool refills behind it), or None when none is left."""
        w = None
        while self._ready:
            cand = self._ready.pop(0)
            if cand.proc.returncode is None:
                w = cand
                break
            # Died while idle (killed by someone): drop it.
            cand.sock.close()
            self._forget(cand.proc.pid)
        if w is None:
            self.missed += 1
            self.fill()
        else:
            # The replacement starts once this request is done (the runner
            # calls fill()): on 2 cores a worker's exec and library loading
            # would otherwise compete with the request it replaces.
            self.taken += 1
        return w

    @property
    def pids(self) -> list[int]:
        """The idle workers' pids."""
        return [w.proc.pid for w in self._ready]

    async def close(self) -> None:
        """Stop refilling; kill and reap every idle worker."""
        self._closed = True
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        ready, self._ready = self._ready, []
        for w in ready:
            w.close()
        await asyncio.gather(*(w.proc.wait() for w in ready), return_exceptions=True)
        for w in ready:
            self._forget(w.proc.pid)


class HandleWorkers:
    """Workers started for fd handles, each holding exactly its handle's fds.

    swrk can inherit only fds already in its own table, so a restore with
    inherit fds cannot use a pool worker.  When a handle arrives, a worker
    is started holding its socket and the handle's fds (at the daemon's
    numbers: pass_fds keeps them), so its exec and library loading overlap
    the client's restore request.  A worker lives as long as its handle:
    the restore takes it, or the handle's end (used, deleted, expired)
    kills it.  At most `limit` live at once: past that a handle gets none
    and its restore takes the CLI path, so no caller can make the daemon
    run more criu processes than that, whatever its handle quota.
    """

    def __init__(
        self,
        limit: int,
        argv_for: Callable[[int], list[str]],
        spawn: Spawner,
        forget: Callable[[int], None],
    ) -> None:
        self.limit = limit
        self._argv_for = argv_for
        self._spawn = spawn
        self._forget = forget
        # Per handle: the start (a task until the worker runs, then done).
        self._workers: dict[str, asyncio.Task[Worker | None]] = {}
        self._reaping = childproc.Reaper(self._forget)
        # Counted for the logs and the benchmark.
        self.started = 0
        self.taken = 0

    def __len__(self) -> int:
        return len(self._workers)

    def start(self, key: str, fds: Sequence[int]) -> bool:
        """Start a worker for handle key holding fds, in the background; False over the limit."""
        if key in self._workers or len(self._workers) >= self.limit:
            return False
        # A task: the fd socket answers its client first, and the spawn
        # (fork, exec) runs on the next turn of the loop.
        self._workers[key] = asyncio.get_running_loop().create_task(self._start(tuple(fds)))
        self.started += 1
        return True

    async def _start(self, fds: tuple[int, ...]) -> Worker | None:
        try:
            return await start_worker(self._argv_for, self._spawn, fds)
        except Exception as e:
            log.warning("cannot start a criu worker for an fd handle: %s", e)
            return None

    async def take(self, key: str, fds: set[int]) -> Worker | None:
        """Handle key's worker if it runs and holds exactly fds (then it is the caller's); or None.

        A worker holding more than the run hands over stays with its
        handle (the CLI serves the run): a worker never holds an fd its
        request does not name.
        """
        task = self._workers.get(key)
        if task is None:
            return None
        w = await asyncio.shield(task)
        if w is None or set(w.held) != fds or self._workers.get(key) is not task:
            return None
        del self._workers[key]
        if w.proc.returncode is not None:
            # Killed while idle (by someone): drop it.
            self._discard(w)
            return None
        self.taken += 1
        return w

    def drop(self, key: str) -> None:
        """The handle ended: kill its worker (once started) and reap it off the loop's path."""
        task = self._workers.pop(key, None)
        if task is None:
            return
        if task.done():
            self._reap_task(task)
        else:
            task.add_done_callback(self._reap_task)

    def _reap_task(self, task: asyncio.Task[Worker | None]) -> None:
        if not task.cancelled() and task.exception() is None:
            w = task.result()
            if w is not None:
                self._discard(w)

    def _discard(self, w: Worker) -> None:
        w.close()
        self._reaping.reap(w.proc)

    async def close(self) -> None:
        """Kill and reap every handle's worker (shutdown)."""
        starting = list(self._workers.values())
        for key in list(self._workers):
            self.drop(key)
        await asyncio.gather(*starting, return_exceptions=True)
        await asyncio.sleep(0)  # the starts' done callbacks queue their reaps
        await self._reaping.drain()


def write_pidfile(dir_fd: int, name: str, pid: int) -> None:
    """Write criu's pidfile as the CLI would have, into the run dir the daemon owns."""
    fd = os.open(
        name,
        os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
        0o600,
        dir_fd=dir_fd,
    )
    try:
        os.write(fd, f"{pid}".encode())
    finally:
        os.close(fd)
