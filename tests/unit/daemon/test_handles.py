"""criud.daemon.handles: lifetime and ownership of received fd handles."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest

from criud.daemon.errors import BadFdHandle, FdHandleNotFound, PermissionDenied
from criud.daemon.fdpass import OwnedFds
from criud.daemon.handles import HandleStore, Leases, describe

T = TypeVar("T")
UID = 1000
TTL = 60.0


def run(fn: Callable[[], Awaitable[T]], timeout: float = 10.0) -> T:
    """Run an async test body on a fresh loop, bounded."""

    async def main() -> T:
        return await asyncio.wait_for(fn(), timeout)

    return asyncio.run(main())


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


class Pipes:
    """Pipes whose read ends go into handles; the write ends stay here."""

    def __init__(self) -> None:
        self.writers: list[int] = []

    def owned(self, n: int = 1) -> OwnedFds:
        reads = []
        for _ in range(n):
            r, w = os.pipe()
            os.set_inheritable(r, False)
            reads.append(r)
            self.writers.append(w)
        return OwnedFds(reads)

    def close(self) -> None:
        for w in self.writers:
            os.close(w)


@pytest.fixture
def pipes(fd_leak_check):
    p = Pipes()
    yield p
    p.close()


def test_add_get_and_describe(pipes: Pipes) -> None:
    async def body() -> None:
        hs = HandleStore()
        owned = pipes.owned(2)
        h = hs.add(UID, 4321, owned, ["in", "out"], TTL)
        try:
            assert len(hs) == 1
            assert len(h.id) == 32
            assert h.owner_uid == UID and h.owner_pid == 4321
            assert h.expires_at - h.created_at == pytest.approx(TTL)
            assert [f.index for f in h.fds] == [0, 1]
            assert [f.name for f in h.fds] == ["in", "out"]
            for i, f in enumerate(h.fds):
                ino = os.fstat(owned.fds[i]).st_ino
                assert f.type == "pipe"
                assert f.inode == ino
                assert f.key == f"pipe:[{ino}]"
                assert f.mode == "r"
                assert h.fd(i) == owned.fds[i]
            assert hs.get(h.id, UID) is h
            assert hs.get(h.id, 0) is h  # root may use anyone's handle
            assert hs.list(UID) == [h]
            assert hs.list(0) == [h]
            assert hs.list(UID + 1) == []
        finally:
            hs.close_all()
        assert owned.closed
        assert len(hs) == 0

    run(body)


def test_describe_other_kinds(fd_leak_check) -> None:
    a, b = socket.socketpair()
    efd = os.eventfd(0)
    try:
        d = describe(a.fileno(), 3, None)
        assert d.index == 3
        assert d.name is None
        assert d.inode == os.fstat(a.fileno()).st_ino
        assert d.key == f"socket:[{d.inode}]"
        assert d.mode == "rw"
        e = describe(efd, 0, "ev")
        assert (e.type, e.name) == ("eventfd", "ev")
        # An fd that is not open is described as "other", not an exception.
        closed = os.dup(efd)
        os.close(closed)
        gone = describe(closed, 1, None)
        assert (gone.type, gone.key, gone.inode, gone.mode) == ("other", "?", None, "?")
    finally:
        a.close()
        b.close()
        os.close(efd)


def test_other_uid_refused(pipes: Pipes) -> None:
    async def body() -> None:
        hs = HandleStore()
        h = hs.add(UID, 1, pipes.owned(), None, TTL)
        try:
            with pytest.raises(BadFdHandle) as ei:
                hs.get(h.id, UID + 1)
            assert ei.value.extra == {"handle": h.id, "reason": "other_uid"}
            assert ei.value.status == 422
            with pytest.raises(PermissionDenied):
                hs.delete(h.id, UID + 1)
            assert hs.get(h.id, UID) is h  # still there
        finally:
            hs.close_all()

    run(body)


def test_unknown_handle() -> None:
    async def body() -> None:
        hs = HandleStore()
        with pytest.raises(BadFdHandle) as ei:
            hs.get("f" * 32, 0)
        assert ei.value.extra["reason"] == "unknown"
        assert "unknown" in ei.value.detail
        with pytest.raises(FdHandleNotFound):
            hs.delete("f" * 32, 0)

    run(body)


def test_consumed(pipes: Pipes) -> None:
    async def body() -> None:
        hs = HandleStore()
        owned = pipes.owned(2)
        fds = owned.fds
        h = hs.add(UID, 1, owned, None, TTL)
        hs.lease(h)
        assert h.leases == 1
        hs.release(h, consumed=True)
        assert owned.closed
        assert not any(is_open(fd) for fd in fds)
        assert len(hs) == 0
        with pytest.raises(BadFdHandle) as ei:
            hs.get(h.id, UID)
        assert ei.value.extra == {"handle": h.id, "reason": "consumed"}
        assert h.timer is not None and h.timer.cancelled()

    run(body)


def test_failed_restore_keeps_handle(pipes: Pipes) -> None:
    async def body() -> None:
        hs = HandleStore()
        owned = pipes.owned()
        h = hs.add(UID, 1, owned, None, TTL)
        hs.lease(h)
        hs.release(h, consumed=False)
        assert h.leases == 0
        assert not owned.closed
        assert is_open(h.fd(0))
        assert hs.get(h.id, UID) is h
        hs.close_all()
        assert owned.closed

    run(body)


def test_expiry_closes_fds(pipes: Pipes) -> None:
    async def body() -> None:
        hs = HandleStore()
        owned = pipes.owned(3)
        fds = owned.fds
        h = hs.add(UID, 1, owned, None, 0.05)
        deadline = asyncio.get_running_loop().time() + 5
        while len(hs) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        assert len(hs) == 0
        assert owned.closed
        assert not any(is_open(fd) for fd in fds)
        with pytest.raises(BadFdHandle) as ei:
            hs.get(h.id, UID)
        assert ei.value.extra["reason"] == "expired"

    run(body)


def test_expiry_waits_for_lease(pipes: Pipes) -> None:
    async def body() -> None:
        hs = HandleStore()
        owned = pipes.owned()
        h = hs.add(UID, 1, owned, None, 0.05)
        hs.lease(h)
        deadline = asyncio.get_running_loop().time() + 5
        while not h.expired and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        assert h.expired
        # The restore using it still has working fds...
        assert not owned.closed
        assert is_open(h.fd(0))
        # ...but nobody new may pick it up.
        with pytest.raises(BadFdHandle) as ei:
            hs.get(h.id, UID)
        assert ei.value.extra["reason"] == "expired"
        # A failed restore releases: now it ends, as expired.
        hs.release(h, consumed=False)
        assert owned.closed
        assert len(hs) == 0
        with pytest.raises(BadFdHandle) as ei:
            hs.get(h.id, UID)
        assert ei.value.extra["reason"] == "expired"

    run(body)


def test_delete(pipes: Pipes) -> None:
    async def body() -> None:
        hs = HandleStore()
        owned = pipes.owned()
        h = hs.add(UID, 1, owned, None, TTL)
        hs.delete(h.id, UID)
        assert owned.closed
        assert len(hs) == 0
        with pytest.raises(BadFdHandle) as ei:
            hs.get(h.id, UID)
        assert ei.value.extra["reason"] == "deleted"
        with pytest.raises(FdHandleNotFound):
            hs.delete(h.id, UID)

    run(body)


def test_root_may_delete(pipes: Pipes) -> None:
    async def body() -> None:
        hs = HandleStore()
        owned = pipes.owned()
        h = hs.add(UID, 1, owned, None, TTL)
        hs.delete(h.id, 0)
        assert owned.closed

    run(body)


def test_delete_while_leased_waits(pipes: Pipes) -> None:
    async def body() -> None:
        hs = HandleStore()
        owned = pipes.owned()
        h = hs.add(UID, 1, owned, None, TTL)
        hs.lease(h)
        hs.delete(h.id, UID)
        assert not owned.closed
        with pytest.raises(BadFdHandle):
            hs.get(h.id, UID)
        hs.release(h, consumed=False)
        assert owned.closed
        assert len(hs) == 0

    run(body)


def test_close_all(pipes: Pipes) -> None:
    async def body() -> None:
        hs = HandleStore()
        owned = [pipes.owned() for _ in range(3)]
        handles = [hs.add(UID + i, 1, o, None, TTL) for i, o in enumerate(owned)]
        hs.close_all()
        assert len(hs) == 0
        assert all(o.closed for o in owned)
        for h in handles:
            with pytest.raises(BadFdHandle) as ei:
                hs.get(h.id, 0)
            assert ei.value.extra["reason"] == "closed"

    run(body)


def test_timer_after_end_is_harmless(pipes: Pipes) -> None:
    async def body() -> None:
        hs = HandleStore()
        h = hs.add(UID, 1, pipes.owned(), None, TTL)
        hs.delete(h.id, UID)
        hs._expire(h.id)  # a late timer must not resurrect or re-end it
        with pytest.raises(BadFdHandle) as ei:
            hs.get(h.id, UID)
        assert ei.value.extra["reason"] == "deleted"

    run(body)


def test_consume_waits_for_other_leases(pipes: Pipes) -> None:
    async def body() -> None:
        hs = HandleStore()
        owned = pipes.owned()
        h = hs.add(UID, 1, owned, None, TTL)
        # Two restores (of different checkpoints) map fds of the same handle.
        hs.lease(h)
        hs.lease(h)
        # The first one succeeds and consumes the handle...
        hs.release(h, consumed=True)
        # ...while the second still has to hand h.fd(0) to its criu.
        assert not owned.closed, "fds closed under a restore that still holds a lease"
        hs.release(h, consumed=False)
        assert owned.closed

    run(body)


def test_add_and_end_hooks_see_open_fds(pipes: Pipes) -> None:
    async def body() -> None:
        store = HandleStore()
        seen: list[tuple[str, str, bool]] = []
        store.on_add = lambda h: seen.append(("add", h.id, is_open(h.fd(0))))
        store.on_end = lambda h: seen.append(("end", h.id, is_open(h.fd(0))))
        a = store.add(UID, 1, pipes.owned(), None, TTL)
        b = store.add(UID, 1, pipes.owned(), None, 0.05)
        c = store.add(UID, 1, pipes.owned(), None, TTL)
        store.delete(a.id, UID)
        await asyncio.sleep(0.2)  # b expires
        store.lease(c)
        store.release(c, consumed=True)
        assert seen == [
            ("add", a.id, True),
            ("add", b.id, True),
            ("add", c.id, True),
            ("end", a.id, True),
            ("end", b.id, True),
            ("end", c.id, True),
        ]

    run(body)


def test_leases_name_their_only_handle(pipes: Pipes) -> None:
    async def body() -> None:
        store = HandleStore()
        a = store.add(UID, 1, pipes.owned(2), None, TTL)
        b = store.add(UID, 1, pipes.owned(), None, TTL)
        with Leases(store, UID) as leases:
            assert leases.only is None
            leases.fd(a.id, 0)
            leases.fd(a.id, 1)
            assert leases.only == a.id
            leases.fd(b.id, 0)
            assert leases.only is None
        store.close_all()

    run(body)
