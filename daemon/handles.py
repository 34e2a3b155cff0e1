"""fd handles: fds a client handed over the fd socket, waiting for a restore.

A handle belongs to the uid that sent it (SO_PEERCRED); only that uid or
root may use it.  It expires after its ttl and its fds are closed then.  A
successful restore consumes it; after a failed one it stays usable.

All methods run on the event loop thread; no locking is needed.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import os
import secrets
import time
from collections.abc import Callable

from criud.daemon.caller import Caller
from criud.daemon.errors import BadFdHandle, FdHandleNotFound, PermissionDenied
from criud.daemon.fdpass import OwnedFds
from criud.daemon.quotas import HandleUsage
from criud.dump import fds as fdinfo

# How many ended handles we remember, to tell "expired" from "never existed".
_TOMBSTONES = 4096


@dataclasses.dataclass
class HandleFd:
    """One fd inside a handle, described once when it arrives."""

    index: int
    type: str
    inode: int | None
    key: str
    mode: str
    name: str | None


@dataclasses.dataclass
class FdHandle:
    """fds received in one message on the fd socket."""

    id: str
    owner_uid: int
    owner_pid: int
    owned: OwnedFds
    fds: list[HandleFd]
    created_at: float
    expires_at: float
    # Restores currently using the fds; expiry waits for them to finish.
    leases: int = 0
    # Set once the handle may no longer be used (expired, consumed, deleted)
    # while a lease still keeps its fds open; end_reason says why.
    expired: bool = False
    end_reason: str = "expired"
    timer: asyncio.TimerHandle | None = None

    def fd(self, index: int) -> int:
        return self.owned.fds[index]


def describe(fd: int, index: int, name: str | None) -> HandleFd:
    """Describe one of our own fds: type, inode, key, mode."""
    info = fdinfo.classify(os.getpid(), fd, {}, {})
    if info is None:
        return HandleFd(index=index, type="other", inode=None, key="?", mode="?", name=name)
    return HandleFd(
        index=index, type=info.type, inode=info.inode, key=info.key, mode=info.mode, name=name
    )


class HandleStore:
    """The live fd handles of the daemon."""

    def __init__(self) -> None:
        self._handles: dict[str, FdHandle] = {}
        # What the live handles hold, per uid: the quotas read it.
        self.usage = HandleUsage()
        self._ended: collections.OrderedDict[str, str] = collections.OrderedDict()
        # Told of each handle that ends by expiry (the service publishes an event).
        self.on_expire: Callable[[FdHandle], None] | None = None
        # Told of each new handle, and of each handle's end whatever the
        # reason, while its fds are still open (criu's handle workers).
        self.on_add: Callable[[FdHandle], None] | None = None
        self.on_end: Callable[[FdHandle], None] | None = None

    def __len__(self) -> int:
        return len(self._handles)

    def add(
        self, owner_uid: int, owner_pid: int, owned: OwnedFds, names: list[str] | None, ttl: float
    ) -> FdHandle:
        """Take ownership of owned and return the new handle."""
        now = time.time()
        fds = [describe(fd, i, names[i] if names else None) for i, fd in enumerate(owned.fds)]
        h = FdHandle(
            id=secrets.token_hex(16),
            owner_uid=owner_uid,
            owner_pid=owner_pid,
            owned=owned,
            fds=fds,
            created_at=now,
            expires_at=now + ttl,
        )
        self._handles[h.id] = h
        self.usage.add(owner_uid, len(h.fds))
        h.timer = asyncio.get_running_loop().call_later(ttl, self._expire, h.id)
        if self.on_add is not None:
            self.on_add(h)
        return h

    def list(self, uid: int) -> list[FdHandle]:
        """Handles visible to uid (root sees all)."""
        return [h for h in self._handles.values() if uid == 0 or h.owner_uid == uid]

    def _end(self, handle_id: str, why: str) -> None:
        h = self._handles.pop(handle_id, None)
        if h is None:
            return
        if h.timer is not None:
            h.timer.cancel()
        if self.on_end is not None:
            self.on_end(h)
        h.owned.close()
        self.usage.remove(h.owner_uid, len(h.fds))
        self._ended[handle_id] = why
        if why == "expired" and self.on_expire is not None:
            self.on_expire(h)
        while len(self._ended) > _TOMBSTONES:
            self._ended.popitem(last=False)

    def _expire(self, handle_id: str) -> None:
        h = self._handles.get(handle_id)
        if h is None:
            return
        if h.leases:
            # A restore is using the fds right now: close when it releases.
            h.expired = True
            return
        self._end(handle_id, "expired")

    def get(self, handle_id: str, uid: int) -> FdHandle:
        """Return a usable handle for uid, or raise a 4xx naming what is wrong."""
        h = self._handles.get(handle_id)
        if h is None or h.expired:
            why = h.end_reason if h is not None else self._ended.get(handle_id, "unknown")
            raise BadFdHandle(f"fd handle {handle_id!r} is {why}", handle=handle_id, reason=why)
        if uid != 0 and h.owner_uid != uid:
            raise BadFdHandle(
                f"fd handle {handle_id!r} belongs to another uid",
                handle=handle_id,
                reason="other_uid",
            )
        return h

    def lease(self, h: FdHandle) -> None:
        """Mark h as in use by a restore: expiry waits until release."""
        h.leases += 1

    def release(self, h: FdHandle, consumed: bool) -> None:
        """End a restore's use of h; consume it if that restore succeeded.

        Another restore may hold a lease on the same handle right now, about
        to pass its fds to criu: the fds are closed only when the last lease
        goes, and the handle is unusable from this moment on.
        """
        h.leases -= 1
        if consumed:
            h.expired = True
            h.end_reason = "consumed"
        if h.expired and not h.leases:
            self._end(h.id, h.end_reason)

    def delete(self, handle_id: str, uid: int) -> None:
        """Close a handle's fds now (DELETE /v1/fd-handles/{id})."""
        h = self._handles.get(handle_id)
        if h is None:
            raise FdHandleNotFound(f"no fd handle {handle_id!r}")
        if uid != 0 and h.owner_uid != uid:
            raise PermissionDenied(f"fd handle {handle_id!r} belongs to another uid")
        if h.leases:
            h.expired = True
            h.end_reason = "deleted"
            return
        self._end(handle_id, "deleted")

    def close_all(self) -> None:
        """Close every handle (shutdown)."""
        for hid in list(self._handles):
            self._end(hid, "closed")


def require_unix(caller: Caller) -> None:
    """fd handles exist only for callers on the unix socket."""
    if caller.via_tcp:
        raise PermissionDenied(
            "fd handles are only available over the unix socket (SCM_RIGHTS needs one)"
        )


class Leases:
    """The handles one restore uses: leased once each, released together.

    On leaving the block the handles are released, consumed if the block
    succeeded (a restore that worked uses its handles up) and usable again
    if it raised.
    """

    def __init__(self, store: HandleStore, uid: int) -> None:
        self._store = store
        self._uid = uid
        self._held: list[FdHandle] = []

    def fd(self, handle_id: str, index: int) -> int:
        """The fd at index of the caller's handle, leased for this restore."""
        h = self._store.get(handle_id, self._uid)
        if not 0 <= index < len(h.fds):
            raise BadFdHandle(
                f"fd handle {handle_id!r} has {len(h.fds)} fds; index {index} is out of range",
                handle=handle_id,
                reason="bad_index",
            )
        if h not in self._held:
            self._store.lease(h)
            self._held.append(h)
        return h.fd(index)

    @property
    def only(self) -> str | None:
        """The id of the one handle leased, or None if none or several are."""
        return self._held[0].id if len(self._held) == 1 else None

    def __enter__(self) -> Leases:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        held, self._held = self._held, []
        for h in held:
            self._store.release(h, consumed=exc_type is None)
