"""The supervisor: the one owner of the daemon's children.

Every process the daemon starts or inherits is accounted for here: criu runs
(their pids sit in Criu.running until asyncio reaps them), restored roots
(watched by pidfd until they exit, and their exit recorded), orphans (reaped
by the Reaper's sweep, which the jobs hold off while a child exists that
nobody has named yet), and, after a restart, the roots a previous daemon
left running (re-adopted) and the half-done restores it left behind (their
tasks killed, their records failed; criud.daemon.orphans).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

from criud.daemon import orphans, procutil
from criud.daemon.criu import Criu
from criud.daemon.reaper import ExitCallback, Reaper
from criud.daemon.store import RestoreRecord, RestoreState, Store

log = logging.getLogger("criud.supervisor")


class Supervisor:
    """Owns criu's children, the restored roots and the orphans; records how roots end."""

    def __init__(self, store: Store, criu: Criu, pid_wait_s: float) -> None:
        self._store = store
        self._pid_wait_s = pid_wait_s
        self.reaper = Reaper(criu.running)
        # Its children share criu's "running" set: the orphan sweep leaves them alone.
        self.running = criu.running
        criu.spawn_guard = self.reaper.hold
        # Exit records being written (the loop holds tasks only weakly).
        self._bg: set[asyncio.Task[Any]] = set()
        # Lazy restores' lazy-pages servers, watched until they end.
        self._lazy: set[asyncio.Task[None]] = set()
        # Told (restore id, owner uid, exit code, signal) once an exit is recorded.
        self.on_exit: Callable[[str, int | None, int | None, int | None], None] | None = None

    # -- lifecycle ----------------------------------------------------------------

    async def recover(self) -> None:
        """Kill what restores a killed daemon left half-done, and fail their records."""
        await self._fail_unfinished_restores()

    async def start(self) -> None:
        """Start reaping, and watch the roots a previous daemon left running."""
        self.reaper.start()
        await self._adopt_running()

    async def stop(self, grace_s: float = 10.0) -> None:
        """Stop reaping and watching (the roots run on; the next daemon adopts them).

        Lazy restores' servers get grace_s to finish: one that dies with the
        daemon (setpriv --pdeathsig) leaves its tree's untouched pages
        unfilled.
        """
        if self._lazy:
            _, pending = await asyncio.wait(self._lazy, timeout=grace_s)
            for t in pending:
                log.warning("a lazy restore's pages are not all in at shutdown")
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await self.reaper.stop()

    # -- what the jobs use ----------------------------------------------------------

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Hold orphan sweeps while a child of ours may exist that nobody has named yet."""
        with self.reaper.hold():
            yield

    def sweep(self) -> int:
        """Reap the zombie children nobody waits for; return how many."""
        return self.reaper.sweep()

    @property
    def restores_running(self) -> int:
        """How many restored roots are watched now."""
        return self.reaper.watching

    def watch_lazy(self, restore_id: str, watcher: Coroutine[Any, Any, None]) -> None:
        """Run a lazy restore's server watcher (criud.restore.lazy) until its server ends."""
        task = asyncio.ensure_future(watcher)
        self._lazy.add(task)
        task.add_done_callback(self._lazy.discard)
        log.debug("restore %s: watching its lazy-pages server", restore_id)

    @property
    def lazy_running(self) -> int:
        """How many lazy restores still have pages to serve."""
        return len(self._lazy)

    def watch_restore(self, restore_id: str, pid: int, pidfd: int) -> None:
        """Watch a restored root (the reaper owns pidfd from now on); record its exit."""
        self.reaper.watch(pid, pidfd, self._exit_callback(restore_id))

    def _exit_callback(self, restore_id: str) -> ExitCallback:
        def on_exit(code: int | None, sig: int | None) -> None:
            log.info("restore %s exited: code %s signal %s", restore_id, code, sig)
            task = asyncio.get_running_loop().create_task(self._exited(restore_id, code, sig))
            self._bg.add(task)
            task.add_done_callback(self._bg.discard)

        return on_exit

    async def _exited(self, restore_id: str, code: int | None, sig: int | None) -> None:
        await self._store.settle(
            self._store.update_restore,
            restore_id,
            state=RestoreState.EXITED,
            finished_at=time.time(),
            exit_code=code,
            exit_signal=sig,
        )
        if self.on_exit is not None:
            # After the record: whoever the event wakes reads "exited".
            rec = await self._store.run(self._store.get_restore, restore_id)
            self.on_exit(restore_id, rec.owner_uid if rec else None, code, sig)

    # -- after a restart ----------------------------------------------------------

    async def _fail_unfinished_restores(self) -> None:
        """Kill what restores a killed daemon left half-done, and fail their records.

        See criud.daemon.orphans for how the tasks are recognised and what is
        not covered (trees rooted in their own pid namespace).
        """
        for r in await self._store.run(self._store.list_restores, RestoreState.RESTORING):
            info = r.tree_pids or {}
            killed, left = await asyncio.to_thread(
                orphans.kill_leftovers, info, max(self._pid_wait_s, 5.0)
            )
            detail = _leftover_detail(r, info, killed, left)
            log.warning("restore %s: %s", r.id, detail)
            await self._store.run(
                self._store.update_restore,
                r.id,
                state=RestoreState.FAILED,
                finished_at=time.time(),
                error={"code": "daemon_restarted", "detail": detail, "killed_pids": killed},
            )

    async def _adopt_running(self) -> None:
        """Watch again the restored trees a previous daemon left running."""
        for r in await self._store.run(self._store.list_restores, RestoreState.RUNNING):
            if r.pid is None:
                continue
            pidfd: int | None = None
            with contextlib.suppress(ProcessLookupError):
                pidfd = procutil.pidfd_open(r.pid)
            if pidfd is None or procutil.proc_start(r.pid) != r.proc_start:
                if pidfd is not None:
                    os.close(pidfd)
                await self._store.run(
                    self._store.update_restore,
                    r.id,
                    state=RestoreState.EXITED,
                    finished_at=time.time(),
                )
                continue
            self.watch_restore(r.id, r.pid, pidfd)
            log.info("adopted restore %s (pid %d)", r.id, r.pid)


def _leftover_detail(
    r: RestoreRecord, info: dict[str, Any], killed: list[int], left: list[int]
) -> str:
    """What a restore a killed daemon left behind was, and what was done about it."""
    detail = f"the daemon restarted while criu restored checkpoint {r.checkpoint_id}"
    if killed:
        detail += f"; killed the tasks it left: pids {', '.join(map(str, killed))}"
        if left:
            detail += f" (not yet reaped: {', '.join(map(str, left))})"
    elif not info:
        # Made by the previous release, which recorded nothing to look for.
        detail += "; no pids were recorded for it, so nothing it left was looked for"
    elif info.get("pidns"):
        detail += (
            "; its tree had a pid namespace of its own, whose host pids were never "
            "reported: any task left behind cannot be identified and was not killed"
        )
    else:
        detail += "; it left no task behind"
    return detail
