"""A root dump's walk of the tree, taken while criu holds the tree frozen.

The walk reads every fd of the tree (criud.dump.fds); criu then reads them
all again.  Before criu ran, the walk cost what criu's own dump of the tree
costs at scale: 150 ms of 240 at 10,000 fds (docs/benchmarks.md, "Big
trees").  criu's RPC stops a dump at named points and waits for its
client's answer (`notify_scripts`): "query-ext-files" right after it froze
the tree, "post-dump" once the images are written and before it kills or
resumes the tree.  The walk runs between the two, in a thread, beside
criu, on exactly the tree criu dumps.

criu's argv must be fixed before that.  What it takes from the walk is
guessed from the root task alone (guess): its stdio's pty slaves (an
engine's terminal, whose master the engine holds).  At "post-dump" the argv
the walk gives is compared with the one criu ran with; a difference fails
the dump there (criu resumes the tree, the images are thrown away) and the
dump runs again the walk-first way.  Only root's plain dumps take this
path (applies): whatever else criu's argv needs from the walk (declared
external sockets and namespaces, an OCI bundle, pre-dumps, a page server)
or a caller whose ids must be checked before anything is frozen keeps the
walk first.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from criud.daemon.caller import Caller
from criud.dump import fds as fdinfo
from criud.dump.options import DumpOptions

log = logging.getLogger("criud.dump")

# criu's notifications (criu/action-scripts.c's action names).
FROZEN = "query-ext-files"  # sent after collect_pstree() seized the whole tree
DUMPED = "post-dump"  # images written; the tree is still frozen

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Guess:
    """What criu's argv takes from a walk, guessed from the root task alone."""

    # Keys of the pty slaves on the root's fds 0-2, taken to be external.
    ttys: tuple[str, ...]
    # The progress estimate from the root task's memory (the walk gives
    # the whole tree's moments into the freeze).
    estimate: dict[str, int] = dataclasses.field(default_factory=dict)


def applies(opts: DumpOptions, caller: Caller, plain: bool, pooled: bool) -> bool:
    """Whether a dump may walk its tree while criu holds it (plain: no bundle,
    pre-dumps or extra flags; pooled: a warm criu pool runs)."""
    return (
        caller.is_root and plain and pooled and not opts.external and not opts.external_namespaces
    )


def guess(pid: int, estimate: dict[str, int]) -> Guess:
    """criu's argv inputs from the root task alone (and the caller's estimate, kept)."""
    ttys: list[str] = []
    for fd in (0, 1, 2):
        f = fdinfo.classify(pid, fd, {}, {})
        if f is None or f.type != "tty" or f.pty is None or f.pty_master:
            continue  # not a pty slave
        if f.key not in ttys:
            ttys.append(f.key)
    return Guess(tuple(ttys), estimate)


class FrozenWalk(Generic[T]):
    """criu's notification handler for one dump: the walk, and its check at post-dump.

    walk() reads the tree (in a thread); accept(tree) says whether criu's
    argv is the one the walk gives (and keeps what it built from it).
    """

    def __init__(
        self, walk: Callable[[], Awaitable[T]], accept: Callable[[T], Awaitable[bool]]
    ) -> None:
        self._walk, self._accept = walk, accept
        self._task: asyncio.Future[T] | None = None
        # criu was told to fail at post-dump: the guess was wrong, or the
        # walk failed (the walk-first dump then meets the same error, a
        # refusal before anything is written).  Nothing was kept.
        self.retry = False

    async def notify(self, action: str) -> bool:
        """Answer one of criu's notifications: go on, or fail the dump there."""
        if action == FROZEN and self._task is None:
            self._task = asyncio.ensure_future(self._walk())
        elif action == DUMPED:
            if self._task is None:  # no freeze was announced: walk now, still frozen
                self._task = asyncio.ensure_future(self._walk())
            try:
                ok = await self._accept(await self._task)
            except Exception as e:
                log.info("walk of a frozen tree failed (%s): the dump runs again, walk first", e)
                ok = False
            else:
                if not ok:
                    log.info("criu's argv differs from the walk's: the dump runs again, walk first")
            self.retry = not ok
            return ok
        return True

    async def disagrees(self) -> bool:
        """After criu failed on its own: whether the walk gives another argv (then retry).

        criu refuses a pty slave whose master it does not dump unless the
        slave is named external: a guess that missed one fails before
        post-dump.  A walk that never started or failed says nothing.
        """
        if self._task is None:
            return False
        try:
            differs = not await self._accept(await self._task)
        except Exception:
            return False
        if differs:
            log.info("criu failed on an argv the walk corrects: the dump runs again, walk first")
        return differs

    async def settle(self) -> None:
        """Wait for a walk still under way (a thread cannot be cancelled).

        Its outcome is taken here too: a walk that failed where nothing
        awaited it (the request was cancelled) is not logged as lost.
        """
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
