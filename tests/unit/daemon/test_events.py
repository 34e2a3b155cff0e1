"""The event bus: ids, replay, per-uid filtering, and the bound on a slow subscriber."""

from __future__ import annotations

import asyncio

from criud.daemon.events import LAGGED, EventBus


def test_ids_grow_and_the_ring_keeps_the_latest() -> None:
    bus = EventBus(ring=3)
    evs = [bus.publish("x", 0, n=i) for i in range(5)]
    assert [e.id for e in evs] == [1, 2, 3, 4, 5]
    sub = bus.subscribe(None, since=0)
    assert len(sub) == 3  # only what the ring still holds: 3, 4, 5


def test_a_user_is_replayed_and_given_only_its_own() -> None:
    bus = EventBus()
    bus.publish("x", 1000)
    bus.publish("x", 0)
    sub = bus.subscribe(1000, since=0)
    bus.publish("x", 1001)
    bus.publish("x", 1000)
    assert len(sub) == 2


def test_a_full_queue_drops_the_subscriber_and_ends_with_lagged() -> None:
    async def main() -> list[bytes]:
        bus = EventBus(queue=4)
        stream = bus.stream(None, None, keepalive=0.1)
        first = await anext(stream)  # subscribes
        for i in range(10):
            bus.publish("x", 0, n=i)
        # Dropped at the fifth publish: nothing held for it any more.
        assert not bus.subscribers
        return [first] + [chunk async for chunk in stream]

    chunks = asyncio.run(main())
    assert chunks[0].startswith(b":")
    assert chunks[-1].startswith(b"event: " + LAGGED.encode())
    # What it had queued when it fell behind is dropped too: the bound holds.
    assert len(chunks) == 2


def test_sse_framing() -> None:
    ev = EventBus().publish("operation.done", 0, kind="checkpoint")
    assert ev.sse().startswith(b"id: 1\nevent: operation.done\ndata: {")
    assert ev.sse().endswith(b"\n\n")
