"""The event bus: ids, replay, per-uid filtering, and the bound on a slow subscriber."""

from __future__ import annotations

import asyncio

from criud.daemon.events import FLUSH_S, LAGGED, WAKE_SLICE, Event, EventBus, Subscriber


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


def test_a_flush_wakes_the_readers_a_slice_per_turn_of_the_loop() -> None:
    """Requests get the loop between slices: no turn runs more than WAKE_SLICE readers."""

    async def main() -> list[int]:
        bus = EventBus()
        subs = [bus.subscribe(None) for _ in range(3 * WAKE_SLICE + 5)]
        got: list[Event] = []

        async def read(sub: Subscriber) -> None:
            ev = await sub.next(10)
            assert ev is not None
            got.append(ev)

        readers = [asyncio.create_task(read(s)) for s in subs]
        await asyncio.sleep(0)  # every reader waits
        seen: list[int] = []
        loop = asyncio.get_running_loop()

        def turn() -> None:
            # Once per turn of the loop: how many readers have run so far.
            seen.append(len(got))
            if len(got) < len(subs) and len(seen) < 10_000:
                loop.call_soon(turn)

        bus.publish("x", 0)
        turn()
        await asyncio.wait_for(asyncio.gather(*readers), FLUSH_S * 200)
        return seen

    seen = asyncio.run(main())
    assert seen[-1] == 3 * WAKE_SLICE + 5
    steps = [b - a for a, b in zip([0, *seen], seen, strict=False)]
    assert max(steps) <= WAKE_SLICE, steps
    assert len([s for s in steps if s]) >= 4


def test_a_waiting_reader_costs_no_task_of_its_own() -> None:
    """One task per reader (its own), none per wait: a wake-up is one step of the loop."""

    async def main() -> tuple[int, int, list[Event | None]]:
        bus = EventBus()
        before = len(asyncio.all_tasks())
        subs = [bus.subscribe(None) for _ in range(10)]
        readers = [asyncio.create_task(s.next(0.2)) for s in subs[:9]]
        await asyncio.sleep(0)
        during = len(asyncio.all_tasks()) - before
        bus.publish("x", 0)
        got = await asyncio.gather(*readers)
        # A reader that came after it waits for nothing: its keepalive timer ends the wait.
        got.append(await bus.subscribe(None).next(0.05))
        return during, len(bus.subscribers), got

    during, live, got = asyncio.run(main())
    assert during == 9
    assert live == 11
    assert all(e is not None and e.event == "x" for e in got[:9])
    assert got[9] is None


def test_the_keepalive_counts_from_the_last_wait_not_the_first() -> None:
    """The one keepalive timer moves on: a reader fed at 0.1 s gets its keepalive 0.3 s later."""

    async def main() -> tuple[Event | None, Event | None, float]:
        bus = EventBus()
        sub = bus.subscribe(None)
        loop = asyncio.get_running_loop()
        loop.call_later(0.1, bus.publish, "x", 0)
        first = await sub.next(0.3)
        t = loop.time()
        second = await sub.next(0.3)
        return first, second, loop.time() - t

    first, second, waited = asyncio.run(main())
    assert first is not None and first.event == "x"
    assert second is None and 0.29 <= waited < 1.0
