"""criud.daemon.quotas: per-uid caps, pools, root's room and the fd budget."""

from __future__ import annotations

import asyncio
import json
import resource
import socket

import pytest

from criud.daemon.config import Settings
from criud.daemon.errors import (
    HeaderTimeout,
    OutOfFds,
    QuotaBytesExceeded,
    QuotaExceeded,
    TooManyConnections,
    TooManyHandles,
    TooManyHeldFds,
    TooManyOperations,
)
from criud.daemon.fdpass import OwnedFds
from criud.daemon.handles import HandleStore
from criud.daemon.quotas import (
    CheckpointQuota,
    FdBudget,
    HandleUsage,
    Quotas,
    Usage,
    auto_reserve,
    raise_nofile,
)
from criud.daemon.server import raw_problem

BOB, ALICE = 1001, 1002


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def quotas(others: int = 10, limit: int = 10_000, **kw: int | float) -> Quotas:
    """Quotas over a budget whose non-caller fds are `others`, measured by a fake."""
    settings = Settings(**kw)  # type: ignore[arg-type]
    budget = FdBudget(limit, settings.fd_reserve, measure=lambda: others, clock=Clock())
    return Quotas(settings, budget, HandleUsage())


def test_auto_reserve_bounds() -> None:
    assert auto_reserve(64) == 32
    assert auto_reserve(1024) == 128
    assert auto_reserve(20_000) == 1024
    assert auto_reserve(1 << 20) == 1024


def test_budget_ceilings_leave_root_and_the_daemon_room() -> None:
    b = FdBudget(1000, reserve=100, measure=lambda: 50, clock=Clock())
    assert (b.ceiling(root=True), b.ceiling(root=False)) == (900, 800)
    assert b.room(held=0, n=750, root=False)
    assert not b.room(held=0, n=751, root=False)
    assert b.room(held=0, n=850, root=True)
    assert not b.room(held=0, n=851, root=True)


def test_budget_counts_the_daemons_other_fds_again_after_a_while() -> None:
    others = [50]
    clock = Clock()
    b = FdBudget(1000, reserve=100, measure=lambda: others[0], clock=clock)
    assert b.room(0, 750, root=False)
    others[0] = 500  # e.g. criu runs, restored trees' pidfds
    assert b.room(0, 750, root=False), "measured at most once a second"
    clock.now += 1.0
    assert not b.room(0, 750, root=False)
    assert b.room(0, 300, root=False)


def test_budget_without_a_count_has_no_room() -> None:
    def full() -> int:
        raise OSError(24, "Too many open files")

    assert not FdBudget(1000, measure=full, clock=Clock()).room(0, 1, root=True)


def test_connections_per_uid_and_for_all_non_root() -> None:
    q = quotas(max_conns_per_uid=2, max_conns_nonroot=3)
    bob = [q.connect("api", BOB) for _ in range(2)]
    with pytest.raises(TooManyConnections, match=f"uid {BOB}"):
        q.connect("api", BOB)
    # Per socket: bob's fd socket connections are counted apart.
    fd = q.connect("fd", BOB)
    alice = q.connect("api", ALICE)
    with pytest.raises(TooManyConnections, match="other than root"):
        q.connect("api", 1003)
    # Root is held to neither cap.
    roots = [q.connect("api", 0) for _ in range(50)]
    assert q.connections == 2 + 1 + 1 + 50
    q.disconnect(bob[0])
    q.disconnect(bob[0])  # idempotent
    q.connect("api", 1003)
    for t in [*bob[1:], fd, alice, *roots]:
        q.disconnect(t)
    assert q.connections == 1


def test_tcp_pool_is_its_own_per_address_and_in_total() -> None:
    q = quotas(max_tcp_conns_per_addr=2, max_tcp_conns=3, max_conns_nonroot=1)
    q.connect("tcp", "127.0.0.2")
    q.connect("tcp", "127.0.0.2")
    with pytest.raises(TooManyConnections, match=r"address 127\.0\.0\.2"):
        q.connect("tcp", "127.0.0.2")
    q.connect("tcp", "127.0.0.3")
    with pytest.raises(TooManyConnections, match="TCP listener has 3"):
        q.connect("tcp", "127.0.0.4")
    # The unix sockets' room is untouched by TCP.
    q.connect("api", BOB)
    q.connect("api", 0)


def test_connections_stop_at_the_fd_budget_root_last() -> None:
    q = quotas(others=0, limit=200, fd_reserve=50, max_conns_per_uid=1000, max_conns_nonroot=1000)
    for _ in range(100):
        q.connect("api", BOB)
    with pytest.raises(OutOfFds, match="root and its own work"):
        q.connect("api", BOB)
    with pytest.raises(OutOfFds):
        q.connect("tcp", "127.0.0.1")  # not known to be root: non-root's ceiling
    for _ in range(50):
        q.connect("fd", 0)
    with pytest.raises(OutOfFds, match="its own work"):
        q.connect("fd", 0)


def test_handles_per_uid_fds_per_uid_and_the_budget() -> None:
    q = quotas(others=0, limit=400, fd_reserve=50, max_handles_per_uid=3)
    q.admit_handle(BOB, 64)
    for _ in range(3):
        q.handles.add(BOB, 10)
    with pytest.raises(TooManyHandles):
        q.admit_handle(BOB, 1)
    q.admit_handle(0, 64)  # root: no per-uid cap
    q.handles.remove(BOB, 10)
    q.handles.remove(BOB, 10)
    q.handles.remove(BOB, 10)
    q.handles.add(BOB, 1000)
    with pytest.raises(TooManyHeldFds):
        q.admit_handle(BOB, 25)
    q.handles.remove(BOB, 1000)
    assert q.handles.by_uid == {} and q.handles.fds == 0
    q.handles.add(ALICE, 290)
    with pytest.raises(OutOfFds):
        q.admit_handle(BOB, 11)
    q.admit_handle(0, 60)


def test_operations_per_uid() -> None:
    q = quotas(max_ops_per_uid=2)
    q.begin_op(BOB)
    q.begin_op(BOB)
    with pytest.raises(TooManyOperations, match="2 checkpoints or restores"):
        q.begin_op(BOB)
    q.begin_op(ALICE)
    for _ in range(10):
        q.begin_op(0)
    q.end_op(BOB)
    q.begin_op(BOB)


def test_handle_store_keeps_usage_current() -> None:
    async def run() -> None:
        store = HandleStore()
        a, b = socket.socketpair()
        with a, b:
            import os

            h = store.add(BOB, 1, OwnedFds([os.dup(a.fileno()), os.dup(b.fileno())]), None, 60)
            assert (store.usage.by_uid[BOB], store.usage.fds_by_uid[BOB]) == (1, 2)
            store.delete(h.id, BOB)
            assert store.usage.fds == 0 and BOB not in store.usage.by_uid

    asyncio.run(run())


def test_raise_nofile_reaches_the_hard_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 256), hard))
        assert raise_nofile() == hard
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize(
    ("err", "status"),
    [(TooManyConnections("full", limit=3), 503), (HeaderTimeout("slow", timeout_s=1.0), 408)],
)
def test_raw_problem_is_a_whole_http_answer(err: Exception, status: int) -> None:
    raw = raw_problem(err)  # type: ignore[arg-type]
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0].startswith(f"HTTP/1.1 {status} ")
    assert "connection: close" in lines
    assert f"content-length: {len(body)}" in lines
    doc = json.loads(body)
    assert doc["status"] == status and doc["code"] == err.code  # type: ignore[attr-defined]


# -- checkpoints kept (CheckpointQuota) ---------------------------------------------


class FakeUsage:
    """A store's usage per uid; `pause` makes each read wait until released."""

    def __init__(self) -> None:
        self.by_uid: dict[int, Usage] = {}
        self.reads = 0

    async def __call__(self, uid: int) -> Usage:
        self.reads += 1
        await asyncio.sleep(0)
        return self.by_uid.get(uid, Usage(0, 0))


def ckpt_quota(**kw: int | bool) -> tuple[CheckpointQuota, FakeUsage]:
    usage = FakeUsage()
    return CheckpointQuota(Settings(**kw), usage), usage  # type: ignore[arg-type]


def test_checkpoint_quota_is_off_by_default_and_root_is_exempt() -> None:
    q, _ = ckpt_quota()
    assert not q.applies(BOB) and not q.applies(0)
    q, _ = ckpt_quota(max_checkpoints_per_uid=1)
    assert q.applies(BOB) and not q.applies(0) and not q.bytes_apply(BOB)
    q, _ = ckpt_quota(max_checkpoint_bytes_per_uid=10, quota_root=True)
    assert q.applies(0) and q.bytes_apply(0)


def test_over_the_count_is_409_naming_limit_and_usage() -> None:
    q, usage = ckpt_quota(max_checkpoints_per_uid=3)
    usage.by_uid[BOB] = Usage(3, 0)
    with pytest.raises(QuotaExceeded) as e:
        asyncio.run(q.check(BOB, 0))
    assert (e.value.status, e.value.code) == (409, "quota_exceeded")
    assert e.value.extra == {"limit": 3, "usage": 3}
    assert "3 checkpoints" in e.value.detail and "limit is 3" in e.value.detail
    asyncio.run(q.check(ALICE, 0))  # alice's usage is her own


def test_over_the_bytes_is_507_naming_limit_usage_and_need() -> None:
    q, usage = ckpt_quota(max_checkpoint_bytes_per_uid=100 << 20)
    usage.by_uid[BOB] = Usage(1, 60 << 20)
    asyncio.run(q.check(BOB, 40 << 20))  # exactly at the limit fits
    with pytest.raises(QuotaBytesExceeded) as e:
        asyncio.run(q.check(BOB, (40 << 20) + 1))
    assert (e.value.status, e.value.code) == (507, "quota_exceeded")
    assert e.value.extra == {"limit": 100 << 20, "usage": 60 << 20, "needed": (40 << 20) + 1}
    assert "100.0 MiB" in e.value.detail


def _three_at_once(q: CheckpointQuota, size: int) -> list[str]:
    """Three reservations of size by bob at once, each held until all have tried."""

    async def scenario() -> list[str]:
        outcomes: list[str] = []
        gate = asyncio.Event()

        async def dump(n: int) -> None:
            try:
                async with q.reserve(BOB, size):
                    outcomes.append(f"in{n}")
                    await gate.wait()
            except QuotaExceeded as e:
                outcomes.append(str(e.status))

        tasks = [asyncio.ensure_future(dump(n)) for n in range(3)]
        await asyncio.sleep(0.01)
        gate.set()
        await asyncio.gather(*tasks)
        # Released: nothing is held any more.
        assert await q.usage(BOB) == Usage(0, 0)
        return sorted(outcomes)

    return asyncio.run(scenario())


def test_reservations_hold_room_for_dumps_in_flight() -> None:
    q, _ = ckpt_quota(max_checkpoints_per_uid=2)
    assert _three_at_once(q, 0) == ["409", "in0", "in1"]
    q, _ = ckpt_quota(max_checkpoint_bytes_per_uid=100)
    assert _three_at_once(q, 40) == ["507", "in0", "in1"]


def test_a_usage_read_overlapping_a_release_is_read_again() -> None:
    q, usage = ckpt_quota(max_checkpoints_per_uid=1)

    async def scenario() -> None:
        async with q.reserve(BOB, 0):
            read = asyncio.ensure_future(q.usage(BOB))
            await asyncio.sleep(0)
            # The dump's record lands (done) while the read is in flight,
            # and its reservation ends: the read must see the record.
            usage.by_uid[BOB] = Usage(1, 0)
        assert await read == Usage(1, 0)
        assert usage.reads >= 2

    asyncio.run(scenario())


def test_a_reservation_resized_is_judged_again_on_its_bytes_alone() -> None:
    q, usage = ckpt_quota(max_checkpoints_per_uid=1, max_checkpoint_bytes_per_uid=100)
    usage.by_uid[BOB] = Usage(0, 30)

    async def scenario() -> None:
        async with q.reserve(BOB, 10) as r:
            # Its own record and bytes are not counted twice: 30 + 70 fits.
            await r.resize(70)
            assert await q.usage(BOB) == Usage(1, 100)
            with pytest.raises(QuotaBytesExceeded) as e:
                await r.resize(71)
            assert e.value.extra["usage"] == 30
            assert r.bytes == 70
        assert await q.usage(BOB) == Usage(0, 30)
        # Not held to a limit: resize only records the size.
        async with q.reserve(0, 0) as r:
            await r.resize(1 << 40)

    asyncio.run(scenario())
