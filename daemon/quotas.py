"""Quotas per caller, and the daemon's own fd budget: no one caller exhausts the daemon.

What one caller can pin in the daemon is bounded:
- connections, per uid on each unix socket (API and fd socket), and for all
  non-root uids together, so root always has room; TCP connections have
  their own pool (per remote address and in total), so clients that have
  not yet shown a token cannot take the unix sockets' room;
- fd handles and the fds they hold, per uid;
- checkpoints and restores in flight, per uid;
- checkpoints kept, per uid, by count and by bytes (CheckpointQuota), off
  unless configured.
Root is never held to a per-uid cap: it has the room the others leave (the
checkpoint quota holds root too with --quota-root).

Over all of that sits the fd budget.  Every connection and every handed-in
fd is an fd of the daemon's; at its RLIMIT_NOFILE the daemon could no
longer accept, open /proc, run criu or even receive root's fds.  So new
connections and handles are refused while the daemon still has room:
non-root callers together stop at limit - 2 x reserve, root at
limit - reserve, and the last reserve is left to the daemon's own work
(criu's pipes and logs, /proc walks, the store).

Everything here runs on the event loop thread: no locking.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import resource
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Literal

from criud.daemon.config import Settings
from criud.daemon.errors import (
    OutOfFds,
    QuotaBytesExceeded,
    QuotaExceeded,
    TooManyConnections,
    TooManyHandles,
    TooManyHeldFds,
    TooManyOperations,
)

log = logging.getLogger("criud.quotas")

Pool = Literal["api", "fd", "tcp"]

# How often the count of the daemon's other fds (the store, logs, criu's
# pipes, restored trees' pidfds) is taken again from /proc/self/fd.
REBASE_INTERVAL_S = 1.0


def raise_nofile() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard one; return the soft limit now in force.

    Raising the hard limit needs CAP_SYS_RESOURCE, which root may lack (it
    does in some VMs): the unit sets LimitNOFILE= for that.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError) as e:
            log.warning("cannot raise RLIMIT_NOFILE from %d to %d: %s", soft, hard, e)
            return soft
        return hard
    return soft


def count_open_fds() -> int:
    """How many fds this process has open (less the one that lists them)."""
    # psutil's num_fds() is this very listdir, behind an import start-up would pay.
    return len(os.listdir("/proc/self/fd")) - 1


def auto_reserve(limit: int) -> int:
    """The default reserve: an eighth of the limit, at least 32, at most 1024."""
    return max(32, min(1024, limit // 8))


class FdBudget:
    """The daemon's fds, split between callers (connections, handles) and its own work."""

    def __init__(
        self,
        limit: int,
        reserve: int = 0,
        measure: Callable[[], int] = count_open_fds,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.reserve = reserve or auto_reserve(limit)
        self._measure = measure
        self._clock = clock
        self._base = 0
        self._measured_at: float | None = None

    def ceiling(self, root: bool) -> int:
        """How many fds the daemon may have open once a caller's new fds are in."""
        top = self.limit - self.reserve
        return top if root else top - self.reserve

    def room(self, held: int, n: int, root: bool) -> bool:
        """Whether n more caller fds fit, with held caller fds open now."""
        now = self._clock()
        if self._measured_at is None or now - self._measured_at >= REBASE_INTERVAL_S:
            # The fds that are not callers' are counted, not assumed: they
            # include restored trees' pidfds and whatever criu runs hold.
            self._measured_at = now
            try:
                self._base = max(0, self._measure() - held)
            except OSError:
                return False  # not even /proc/self/fd could be opened: no room
        return self._base + held + n <= self.ceiling(root)


@dataclasses.dataclass
class Ticket:
    """One admitted connection; give it back with Quotas.disconnect."""

    pool: Pool
    key: int | str
    counted_nonroot: bool
    open: bool = True


class HandleUsage:
    """What the fd handles hold now; HandleStore keeps it up to date."""

    def __init__(self) -> None:
        self.by_uid: collections.Counter[int] = collections.Counter()
        self.fds_by_uid: collections.Counter[int] = collections.Counter()
        self.fds = 0

    def add(self, uid: int, n: int) -> None:
        self.by_uid[uid] += 1
        self.fds_by_uid[uid] += n
        self.fds += n

    def remove(self, uid: int, n: int) -> None:
        self.by_uid[uid] -= 1
        self.fds_by_uid[uid] -= n
        self.fds -= n
        if self.by_uid[uid] <= 0:
            del self.by_uid[uid]
            del self.fds_by_uid[uid]


class Quotas:
    """Admits connections, handles and operations, or refuses them with a clear error."""

    def __init__(self, settings: Settings, budget: FdBudget, handles: HandleUsage) -> None:
        self.settings = settings
        self.budget = budget
        self.handles = handles
        self._conns: collections.Counter[tuple[Pool, int | str]] = collections.Counter()
        # api and fd: non-root connections; tcp: all of them.
        self._pool_totals: collections.Counter[Pool] = collections.Counter()
        self.connections = 0
        self._ops: collections.Counter[int] = collections.Counter()

    def _held(self) -> int:
        return self.connections + self.handles.fds

    def _check_budget(self, n: int, root: bool, what: str) -> None:
        if not self.budget.room(self._held(), n, root):
            raise OutOfFds(
                f"{what} refused: the daemon keeps its last file descriptors for "
                f"{'its own work' if root else 'root and its own work'}; retry shortly",
                limit=self.budget.limit,
            )

    # -- connections ------------------------------------------------------------

    def connect(self, pool: Pool, key: int | str) -> Ticket:
        """Admit a new connection: key is the peer's uid (unix) or address (tcp)."""
        s = self.settings
        if pool == "tcp":
            per_key, total, who = s.max_tcp_conns_per_addr, s.max_tcp_conns, f"address {key}"
            nonroot = True
        else:
            per_key, total, who = s.max_conns_per_uid, s.max_conns_nonroot, f"uid {key}"
            nonroot = key != 0
        where = {"api": "the API socket", "fd": "the fd socket", "tcp": "the TCP listener"}[pool]
        if nonroot:
            if self._conns[pool, key] >= per_key:
                raise TooManyConnections(
                    f"{who} already has {per_key} connections open on {where}; "
                    "close some or retry shortly",
                    limit=per_key,
                )
            if self._pool_totals[pool] >= total:
                raise TooManyConnections(
                    f"{where} has {total} connections open "
                    f"{'in all' if pool == 'tcp' else 'from callers other than root'}; "
                    "retry shortly",
                    limit=total,
                )
        self._check_budget(1, not nonroot, "connection")
        self._conns[pool, key] += 1
        if nonroot:
            self._pool_totals[pool] += 1
        self.connections += 1
        return Ticket(pool, key, nonroot)

    def disconnect(self, t: Ticket) -> None:
        """Give back a connection's place (idempotent)."""
        if not t.open:
            return
        t.open = False
        self._conns[t.pool, t.key] -= 1
        if self._conns[t.pool, t.key] <= 0:
            del self._conns[t.pool, t.key]
        if t.counted_nonroot:
            self._pool_totals[t.pool] -= 1
        self.connections -= 1

    # -- fd handles ---------------------------------------------------------------

    def admit_handle(self, uid: int, n: int) -> None:
        """Raise unless uid may hold a new handle of n fds."""
        s = self.settings
        if uid != 0:
            if self.handles.by_uid[uid] >= s.max_handles_per_uid:
                raise TooManyHandles(
                    f"uid {uid} holds {s.max_handles_per_uid} fd handles already; "
                    "use or delete some (DELETE /v1/fd-handles/{id})",
                    limit=s.max_handles_per_uid,
                )
            held = self.handles.fds_by_uid[uid]
            if held + n > s.max_handle_fds_per_uid:
                raise TooManyHeldFds(
                    f"uid {uid}'s handles hold {held} fds; {n} more would pass its cap of "
                    f"{s.max_handle_fds_per_uid}",
                    limit=s.max_handle_fds_per_uid,
                )
        self._check_budget(n, uid == 0, f"a handle of {n} fds")

    # -- operations ---------------------------------------------------------------

    def begin_op(self, uid: int) -> None:
        """Count an operation of uid in flight, or raise if uid is at its cap."""
        cap = self.settings.max_ops_per_uid
        if uid != 0 and self._ops[uid] >= cap:
            raise TooManyOperations(
                f"uid {uid} has {cap} checkpoints or restores in flight; wait for one to finish",
                limit=cap,
            )
        self._ops[uid] += 1

    def end_op(self, uid: int) -> None:
        self._ops[uid] -= 1
        if self._ops[uid] <= 0:
            del self._ops[uid]


# -- checkpoints kept ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Usage:
    """What one uid's checkpoints hold: records and image bytes."""

    count: int
    bytes: int


# Reads a uid's usage from the store (finished records only: the ones being
# made are held here, as reservations).
UsageReader = Callable[[int], Awaitable[Usage]]


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


class CheckpointQuota:
    """How many checkpoints, and how many bytes of them, one caller may keep.

    The count is of records (a failed dump's keeps its log and shows in the
    list); the bytes are the images' sizes.  A checkpoint being made holds a
    reservation (one record, its estimated bytes) from the check until it is
    recorded done or failed, so concurrent dumps of one caller cannot all
    pass one check.  The bytes of a dump are known only once it is done:
    it is judged before, by the tree's estimated image size; a dump that
    turns out bigger is kept (deleting it could lose the process it ended).
    """

    def __init__(self, settings: Settings, usage: UsageReader) -> None:
        self.settings = settings
        self._usage = usage
        self._held_count: collections.Counter[int] = collections.Counter()
        self._held_bytes: collections.Counter[int] = collections.Counter()
        # Bumped on each release: a usage read that a release overlapped
        # may predate the released checkpoint's record, so it is read again.
        self._releases = 0

    def applies(self, uid: int) -> bool:
        """Whether uid is held to any checkpoint limit."""
        s = self.settings
        limited = s.max_checkpoints_per_uid > 0 or s.max_checkpoint_bytes_per_uid > 0
        return limited and (uid != 0 or s.quota_root)

    def bytes_apply(self, uid: int) -> bool:
        """Whether uid is held to a byte limit (then a dump needs its tree's estimate)."""
        return self.settings.max_checkpoint_bytes_per_uid > 0 and self.applies(uid)

    async def usage(self, uid: int) -> Usage:
        """uid's recorded usage plus what its checkpoints in the making hold."""
        for _ in range(8):
            seen = self._releases
            recorded = await self._usage(uid)
            if seen == self._releases:
                break
        return Usage(recorded.count + self._held_count[uid], recorded.bytes + self._held_bytes[uid])

    async def check(self, uid: int, adding_bytes: int) -> None:
        """Raise QuotaExceeded (409) or QuotaBytesExceeded (507) unless uid may add one checkpoint.

        adding_bytes: the new checkpoint's size, or its estimate (0: unknown).
        """
        if self.applies(uid):
            self._judge(uid, await self.usage(uid), adding_bytes)

    @contextlib.asynccontextmanager
    async def reserve(self, uid: int, adding_bytes: int) -> AsyncIterator[Reservation]:
        """check(), then hold one record and adding_bytes for uid until the block ends.

        End the block once the new checkpoint's record says how it ended.
        A path that learns the real size as it goes (an import) tells the
        reservation with Reservation.resize, which judges the bytes again.
        """
        if not self.applies(uid):
            yield Reservation(self, uid, adding_bytes, held=False)
            return
        # No await between the judgement and the hold: on the event loop,
        # two reservations of one uid can never both pass on the same usage.
        self._judge(uid, await self.usage(uid), adding_bytes)
        held = Reservation(self, uid, adding_bytes, held=True)
        self._held_count[uid] += 1
        self._held_bytes[uid] += adding_bytes
        try:
            yield held
        finally:
            self._releases += 1
            self._held_count[uid] -= 1
            self._held_bytes[uid] -= held.bytes
            if self._held_count[uid] <= 0:
                del self._held_count[uid]
                self._held_bytes.pop(uid, None)

    async def _resize(self, r: Reservation, nbytes: int) -> None:
        now = await self.usage(r.uid)
        # The count was judged when the reservation was made; only the
        # bytes change, and this reservation's own are not counted twice.
        self._judge_bytes(r.uid, now.bytes - r.bytes, nbytes)
        self._held_bytes[r.uid] += nbytes - r.bytes
        r.bytes = nbytes

    def _judge(self, uid: int, now: Usage, adding_bytes: int) -> None:
        cap = self.settings.max_checkpoints_per_uid
        if cap and now.count + 1 > cap:
            raise QuotaExceeded(
                f"uid {uid} has {now.count} checkpoints, its limit is {cap}: delete some "
                "(DELETE /v1/checkpoints?older_than=...) and retry",
                limit=cap,
                usage=now.count,
            )
        self._judge_bytes(uid, now.bytes, adding_bytes)

    def _judge_bytes(self, uid: int, used: int, adding_bytes: int) -> None:
        cap = self.settings.max_checkpoint_bytes_per_uid
        if cap and used + adding_bytes > cap:
            raise QuotaBytesExceeded(
                f"uid {uid}'s checkpoints hold {_mib(used)}; this one needs about "
                f"{_mib(adding_bytes)} more, past its limit of {_mib(cap)}: delete some "
                "and retry",
                limit=cap,
                usage=used,
                needed=adding_bytes,
            )


@dataclasses.dataclass
class Reservation:
    """The place one checkpoint in the making holds in its owner's quota."""

    quota: CheckpointQuota
    uid: int
    bytes: int
    # False: the owner is held to no limit, and nothing is held.
    held: bool

    async def resize(self, nbytes: int) -> None:
        """The size is now known to be nbytes; QuotaBytesExceeded if that is past the limit."""
        if self.held and self.quota.bytes_apply(self.uid):
            await self.quota._resize(self, nbytes)
        self.bytes = nbytes
