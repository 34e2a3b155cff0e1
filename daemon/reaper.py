"""Reaping: restored roots (watched by pidfd) and orphans (we are a subreaper).

The daemon is a child subreaper, and criu restores trees with
--restore-sibling, so a restored root is our child; when a restored root
dies, its own orphans become ours too.  Two rules keep this correct:

* Never waitpid(-1).  It would steal the status of a criu process asyncio is
  waiting for, and turn a failed criu into "success".  We reap only pids we
  can name: watched roots through their pidfd, and zombie children that are
  neither criu runs nor watched roots.
* Between spawning criu and registering its pid (or the restored root's pid)
  a child exists that we do not know yet.  While anything is in that window
  (``hold()``), the orphan sweep does nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable, Iterator

from criud.daemon import procutil

log = logging.getLogger("criud.reaper")

ExitCallback = Callable[[int | None, int | None], None]
SWEEP_INTERVAL_S = 1.0


class Reaper:
    """Watches restored roots and reaps orphans without blocking the loop."""

    def __init__(self, criu_running: set[int]) -> None:
        self._criu_running = criu_running
        self._watched: dict[int, tuple[int, ExitCallback]] = {}  # pid -> (pidfd, cb)
        self._holds = 0
        self._sweeper: asyncio.Task[None] | None = None
        self._kick = asyncio.Event()

    @property
    def watching(self) -> int:
        """How many pids are watched."""
        return len(self._watched)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGCHLD, self._kick.set)
        self._sweeper = loop.create_task(self._sweep_loop())

    async def stop(self) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_signal_handler(signal.SIGCHLD)
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for pid in list(self._watched):
            self.unwatch(pid)

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Suspend orphan sweeps while a child we cannot name yet may exist."""
        self._holds += 1
        try:
            yield
        finally:
            self._holds -= 1

    def watched(self) -> set[int]:
        return set(self._watched)

    def watch(self, pid: int, pidfd: int, on_exit: ExitCallback) -> None:
        """Call on_exit(exit_code, signal) once pid exits; the Reaper owns pidfd."""
        self._watched[pid] = (pidfd, on_exit)
        asyncio.get_running_loop().add_reader(pidfd, self._on_ready, pid)

    def unwatch(self, pid: int) -> None:
        entry = self._watched.pop(pid, None)
        if entry is None:
            return
        pidfd, _ = entry
        asyncio.get_running_loop().remove_reader(pidfd)
        os.close(pidfd)

    def _on_ready(self, pid: int) -> None:
        entry = self._watched.get(pid)
        if entry is None:
            return
        pidfd, cb = entry
        code: int | None = None
        sig: int | None = None
        try:
            info = os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOHANG)
        except ChildProcessError:
            # Not our child (adopted after a daemon restart): the pidfd tells
            # us it exited, but its status went to its real parent.
            info = None
        if info is None and procutil.proc_state(pid) not in (None, "Z", "X"):
            return  # spurious wake-up
        if info is not None:
            if info.si_code == os.CLD_EXITED:
                code = info.si_status
            else:
                sig = info.si_status
        self.unwatch(pid)
        try:
            cb(code, sig)
        except Exception:
            log.exception("exit callback for pid %d failed", pid)

    async def _sweep_loop(self) -> None:
        while True:
            # asyncio.timeout, not wait_for: on 3.11, wait_for returns the
            # inner result when a cancel arrives just as it completes, and
            # a SIGCHLD at shutdown (the pool's workers killed) then ate
            # stop()'s cancel: this loop ran on and the daemon never exited.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SWEEP_INTERVAL_S):
                    await self._kick.wait()
            self._kick.clear()
            self.sweep()

    def sweep(self) -> int:
        """Reap zombie children that nobody else waits for; return how many."""
        if self._holds:
            return 0
        reaped = 0
        for child in procutil.children(os.getpid()):
            if child in self._criu_running or child in self._watched:
                continue
            if procutil.proc_state(child) != "Z":
                continue
            with contextlib.suppress(ChildProcessError):
                pid, _ = os.waitpid(child, os.WNOHANG)
                if pid:
                    reaped += 1
                    log.debug("reaped orphan %d", pid)
        return reaped
