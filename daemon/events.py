"""The daemon's event bus: what happened, for `GET /v1/events` (Server-Sent Events).

A bounded ring of the latest events, each with an id that only grows, so a
client that reconnects (`?since=`, `Last-Event-ID`) is replayed what it
missed, as far back as the ring goes.  Each subscriber has a bounded queue
of its own.  publish never blocks and never waits for a reader: a
subscriber whose queue is full is dropped on the spot and told so with one
final "lagged" event (the client reconnects with `since=` and gets what
the ring still holds).  No reader can make the daemon hold more than
RING + QUEUE events per subscriber, however slowly it reads.

Every event names its owner (the uid whose operation, restore, checkpoint
or handle it concerns); a subscriber created for a non-root uid is given
only that uid's events.

Loop-thread only: publish and subscribe run on the daemon's event loop
(routes, the supervisor's exit callbacks, the handles' timers), so the
ring and the queues need no lock.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson

# What an event is (the SSE `event:` field, and "event" in its data).
OPERATION_STARTED = "operation.started"
OPERATION_PROGRESS = "operation.progress"
OPERATION_DONE = "operation.done"
OPERATION_FAILED = "operation.failed"
RESTORE_EXITED = "restore.exited"
CHECKPOINT_DELETED = "checkpoint.deleted"
FD_HANDLE_EXPIRED = "fd_handle.expired"
LAGGED = "lagged"

RING = 1024
QUEUE = 256
# The most events one write to a reader carries.
BATCH = 64
# How long after a publish the readers are woken: events published
# meanwhile share one write per reader.
FLUSH_S = 0.005
# How many readers one turn of the event loop wakes.  A flush wakes the
# rest a slice per turn, so a request that arrives meanwhile waits for one
# slice of readers' writes, not for all of them (100 readers' writes are
# about 3 ms of the loop here).
WAKE_SLICE = 16


def _resolve(fut: asyncio.Future[bool], value: bool) -> None:
    if not fut.done():
        fut.set_result(value)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


# A comment line sent when nothing happened for this long: proxies keep the
# stream open, and a client that went away is noticed.
KEEPALIVE_S = 15.0


@dataclasses.dataclass(frozen=True)
class Event:
    """One thing that happened, as subscribers get it."""

    id: int
    event: str
    owner_uid: int | None
    time: float
    data: dict[str, Any]

    def sse(self) -> bytes:
        """The event as one Server-Sent Events message (id 0: no `id:` line).

        Encoded once, by the first reader that sends it: every other reader
        of the same event sends the same bytes.
        """
        return self._encoded

    @functools.cached_property
    def _encoded(self) -> bytes:
        body = {**self.data, "id": self.id, "event": self.event, "time": self.time}
        if self.owner_uid is not None:
            body["owner_uid"] = self.owner_uid
        head = b"id: %d\n" % self.id if self.id else b""
        return head + b"event: %s\ndata: %s\n\n" % (self.event.encode(), orjson.dumps(body))


class Subscriber:
    """One reader's bounded queue; lagged once publish found it full."""

    def __init__(self, uid: int | None, backlog: list[Event], size: int) -> None:
        self.uid = uid
        # The replay, then what publish hands in (at most size of those).
        self._backlog = collections.deque(backlog)
        self._queue: collections.deque[Event] = collections.deque()
        self._size = size
        # What the reader awaits while its queue is empty (next): set by a
        # wake-up (True) or its keepalive timer (False).
        self._waiter: asyncio.Future[bool] | None = None
        # The keepalive timer, armed by the first wait and moved on only
        # when it fires: a busy reader does not push a timer into the
        # loop's heap and cancel it at every event.
        self._timer: asyncio.TimerHandle | None = None
        self._quiet_until = 0.0
        self.lagged_at: int | None = None

    def sees(self, ev: Event) -> bool:
        return self.uid is None or ev.owner_uid == self.uid

    def offer(self, ev: Event, wake: bool = True) -> bool:
        """Queue ev (wake: and wake the reader now); False (and lagged) if the queue is full.

        A lagged reader is always woken at once: its stream ends there.
        """
        if len(self._queue) >= self._size:
            self.lagged_at = ev.id
            self._queue.clear()
            self._rouse()
            return False
        self._queue.append(ev)
        if wake:
            self._rouse()
        return True

    def wake(self) -> None:
        """Let the reader send what is queued."""
        if self._queue:
            self._rouse()

    def _rouse(self) -> None:
        if self._waiter is not None:
            _resolve(self._waiter, True)

    async def next(self, timeout: float) -> Event | None:
        """The next event; None after timeout s of nothing; StopAsyncIteration once lagged."""
        if self._backlog:
            return self._backlog.popleft()
        if self.lagged_at is not None:
            raise StopAsyncIteration
        if not self._queue:
            if not await self._wait(timeout):
                return None
            if self.lagged_at is not None:
                raise StopAsyncIteration
        return self._queue.popleft()

    async def _wait(self, timeout: float) -> bool:
        """Until woken (True) or timeout s passed (False).

        A bare future: asyncio.wait_for would make a task and a timer per
        wait, and a woken reader would take two steps of the loop, not one.
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bool] = loop.create_future()
        self._waiter = fut
        self._quiet_until = loop.time() + timeout
        if self._timer is None:
            self._timer = loop.call_at(self._quiet_until, self._tick)
        try:
            return await fut
        finally:
            self._waiter = None

    def _tick(self) -> None:
        """The keepalive timer: end a wait that has lasted its timeout, else move on."""
        self._timer = None
        if self._waiter is None:
            return  # the reader is sending: its next wait arms the timer again
        loop = asyncio.get_running_loop()
        # The loop may run a timer up to its clock's resolution early.
        if loop.time() + 0.001 >= self._quiet_until:
            _resolve(self._waiter, False)
        else:
            self._timer = loop.call_at(self._quiet_until, self._tick)

    def close(self) -> None:
        """Stop the keepalive timer: the stream is over."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def ready(self, limit: int) -> list[Event]:
        """Up to limit events that are there now, without waiting (none once lagged)."""
        out: list[Event] = []
        while len(out) < limit and self._backlog:
            out.append(self._backlog.popleft())
        while len(out) < limit and self._queue and self.lagged_at is None:
            out.append(self._queue.popleft())
        return out

    def __len__(self) -> int:
        return len(self._backlog) + len(self._queue)


class EventBus:
    """The ring and the live subscribers."""

    def __init__(self, ring: int = RING, queue: int = QUEUE) -> None:
        self._ring: collections.deque[Event] = collections.deque(maxlen=ring)
        self._queue = queue
        self._next = 1
        self.subscribers: set[Subscriber] = set()
        # The pending wake-up of the readers (publish).
        self._flush: asyncio.TimerHandle | None = None

    @property
    def last_id(self) -> int:
        return self._next - 1

    def publish(self, event: str, owner_uid: int | None, /, **data: Any) -> Event:
        """Record an event and hand it to every subscriber that may see it; never blocks.

        Readers are woken by one flush FLUSH_S later, not here: what is
        published meanwhile goes out in the same write to each, and the
        writes never come before the answer of the request that caused the
        event (the event loop runs callbacks in order, and a reader woken
        now would write first).  Without a running loop (tests) they are
        woken at once.
        """
        ev = Event(self._next, event, owner_uid, time.time(), data)
        self._next += 1
        self._ring.append(ev)
        loop = _running_loop()
        for sub in [s for s in self.subscribers if s.sees(ev)]:
            if not sub.offer(ev, wake=loop is None):
                # Dropped here, not when its reader notices: a reader that
                # never reads again must not keep the subscription alive.
                self.subscribers.discard(sub)
        if loop is not None and self._flush is None and self.subscribers:
            self._flush = loop.call_later(FLUSH_S, self._wake_all)
        return ev

    def _wake_all(self) -> None:
        self._flush = None
        self._wake_slice(list(self.subscribers))

    def _wake_slice(self, subs: list[Subscriber]) -> None:
        """Wake WAKE_SLICE readers now, the rest from the next turn of the loop on.

        call_soon puts the rest behind the I/O the loop polls meanwhile, so
        API requests get their turn between slices.  A reader that left
        meanwhile is woken for nothing (wake is a no-op without a waiter).
        """
        for sub in subs[:WAKE_SLICE]:
            sub.wake()
        if len(subs) > WAKE_SLICE:
            asyncio.get_running_loop().call_soon(self._wake_slice, subs[WAKE_SLICE:])

    def subscribe(self, uid: int | None, since: int | None = None) -> Subscriber:
        """A new subscriber for uid (None: everything), replayed the ring's events after since."""
        ring = [] if since is None else [e for e in self._ring if e.id > since]
        sub = Subscriber(uid, [e for e in ring if uid is None or e.owner_uid == uid], self._queue)
        self.subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        self.subscribers.discard(sub)
        sub.close()

    async def stream(
        self, uid: int | None, since: int | None, keepalive: float = KEEPALIVE_S
    ) -> AsyncIterator[bytes]:
        """The SSE byte stream of one subscriber, ending with "lagged" if it falls behind."""
        sub = self.subscribe(uid, since)
        try:
            # A first comment: the client sees the stream is open at once.
            yield b": criud events\n\n"
            while True:
                try:
                    ev = await sub.next(keepalive)
                except StopAsyncIteration:
                    break
                if ev is None:
                    yield b": keepalive\n\n"
                    continue
                # What else is queued goes in the same write: one send per
                # burst, not per event, for each reader.
                more = sub.ready(BATCH - 1)
                yield b"".join([ev.sse(), *(e.sse() for e in more)])
            # No id: the client's Last-Event-ID stays the last event it got,
            # so reconnecting with it replays what it missed.
            lagged = Event(
                0,
                LAGGED,
                uid,
                time.time(),
                {"detail": "this reader fell behind and was dropped; reconnect with since="},
            )
            yield lagged.sse()
        finally:
            self.unsubscribe(sub)
