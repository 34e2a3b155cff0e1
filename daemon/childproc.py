"""Children started off the event loop, waited for through their pidfd on it.

asyncio starts a subprocess on the loop's own thread: the fork, exec and
the wait for exec's outcome block the loop for about a millisecond (more
on a loaded 2-core machine, where a ticker on the loop saw a p99 delay of
28-35 ms while workers were spawned on it, against 5-6 ms with the spawns
in a thread).  The warm criu pool refills right after a request's criu
answers, while the request is still being answered: its workers start in
a thread instead, and `Child` gives the runner the same surface as
asyncio's Process (pid, returncode, wait, kill).

Reaping stays exact: the pid is only ever waited for by its own Child
(waitpid on that pid, once the pidfd says it exited), and the Popen object
is told the status so the subprocess module never waits for it as well.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import Callable, Sequence
from typing import Protocol


class Proc(Protocol):
    """What the criu runner needs of a child: asyncio's Process, or a Child."""

    @property
    def pid(self) -> int: ...
    @property
    def returncode(self) -> int | None: ...
    async def wait(self) -> int: ...
    def kill(self) -> None: ...


class Child:
    """A started child, watched by pidfd on the loop that made this object."""

    def __init__(self, popen: subprocess.Popen[bytes], loop: asyncio.AbstractEventLoop) -> None:
        self._popen = popen
        self._loop = loop
        self.pid = popen.pid
        self.returncode: int | None = None
        self._exited: asyncio.Future[int] = loop.create_future()
        # Our child, not reaped by anyone else (its pid sits in the runner's
        # `running` set, which the orphan sweep leaves alone): a pidfd
        # names exactly it.  A child that has already exited is a zombie,
        # and its pidfd is readable at once.
        self._pidfd = os.pidfd_open(self.pid)
        loop.add_reader(self._pidfd, self._on_exit)

    def _on_exit(self) -> None:
        pid, status = os.waitpid(self.pid, os.WNOHANG)
        if pid == 0:
            return  # woken early; the pidfd stays readable until it exits
        self._loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        self.returncode = os.waitstatus_to_exitcode(status)
        # subprocess would otherwise waitpid() it again (Popen.__del__).
        self._popen.returncode = self.returncode
        self._exited.set_result(self.returncode)

    async def wait(self) -> int:
        """Its exit status as asyncio gives it: the code, or -signal."""
        return await asyncio.shield(self._exited)

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            # By pidfd: the pid cannot have been reused while we hold it.
            signal.pidfd_send_signal(self._pidfd, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def popen(cmd: Sequence[str], pass_fds: Sequence[int]) -> subprocess.Popen[bytes]:
    """Start cmd with stdin, stdout and stderr on /dev/null and only pass_fds (in a thread)."""
    dn = subprocess.DEVNULL
    return subprocess.Popen(
        list(cmd), stdin=dn, stdout=dn, stderr=dn, pass_fds=tuple(pass_fds), close_fds=True
    )


async def start(cmd: Sequence[str], pass_fds: Sequence[int] = ()) -> Child:
    """Start cmd from a thread, off the loop; its Child, watched on this loop."""
    loop = asyncio.get_running_loop()
    started = loop.run_in_executor(None, popen, cmd, pass_fds)
    try:
        return Child(await asyncio.shield(started), loop)
    except asyncio.CancelledError:
        # The thread starts it all the same (Popen returns once exec ran):
        # never leave it running unwatched.
        child = Child(await started, loop)
        child.kill()
        await child.wait()
        raise


class Reaper:
    """Children waited for in the background, each by a task kept until it is done.

    A child whose parent no longer waits on it in the foreground (a criu
    worker that has answered, a path opener that has replied, a worker
    thrown away) must still be reaped, and its pid forgotten by whoever
    counts it only then: the orphan sweep never takes a child still in its
    runner's set for someone else's.  The loop holds tasks weakly; this set
    keeps each wait alive until it ends.
    """

    def __init__(self, forget: Callable[[int], None]) -> None:
        self._forget = forget
        self._tasks: set[asyncio.Task[None]] = set()

    def reap(self, proc: Proc) -> None:
        """Wait for proc in the background; forget its pid once it is gone."""

        async def wait() -> None:
            try:
                await proc.wait()
            finally:
                self._forget(proc.pid)

        task = asyncio.get_running_loop().create_task(wait())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        """Wait until every child handed over so far (and any reaped meanwhile) is gone."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
