"""GET /v1/events: a real checkpoint and restore seen as Server-Sent Events (issue 16)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from criud.api.client import CriudClientError
from tests.integration.helpers import (
    Daemon,
    Procs,
    checkpoint_hello,
    kill_restore,
    restore_into_pipe,
)
from tests.integration.sse import SseReader


@contextlib.contextmanager
def reader(daemon: Daemon, path: str = "/v1/events", **kw: Any) -> Iterator[SseReader]:
    r = SseReader(daemon.socket, path, **kw)
    try:
        assert r.status == 200, r.head
        assert "text/event-stream" in r.head
        yield r
    finally:
        r.close()


def _cycle(daemon: Daemon, procs: Procs) -> tuple[str, str]:
    """Checkpoint a counter, restore it, kill it, delete the checkpoint; (checkpoint, restore)."""
    c = daemon.client
    ck, key = checkpoint_hello(c, procs)
    r, rd = restore_into_pipe(c, procs, ck["id"], key)
    os.close(rd)
    kill_restore(c, r["id"])
    c.delete(ck["id"])
    return ck["id"], r["id"]


def test_checkpoint_and_restore_events_arrive_in_order(daemon: Daemon, procs: Procs) -> None:
    with reader(daemon) as ev:
        ck, rs = _cycle(daemon, procs)
        got = ev.take(6)
    assert [(e["event"], e.get("kind")) for e in got] == [
        ("operation.started", "checkpoint"),
        ("operation.done", "checkpoint"),
        ("operation.started", "restore"),
        ("operation.done", "restore"),
        ("restore.exited", None),
        ("checkpoint.deleted", None),
    ]
    assert got[1]["checkpoint"] == ck and got[1]["operation"] == got[0]["operation"]
    assert got[3]["restore"] == rs and got[3]["checkpoint"] == ck
    assert got[4]["restore"] == rs and got[4]["exit_signal"] == 9
    assert got[5]["checkpoint"] == ck
    ids = [int(e["sse_id"]) for e in got]
    assert ids == sorted(ids) and len(set(ids)) == 6
    assert all(e["owner_uid"] == 0 and e["sse_event"] == e["event"] for e in got)


def _gone_pid() -> int:
    """A pid that exited a moment ago (nothing reuses it that fast here)."""
    p = subprocess.Popen(["true"])
    p.wait(timeout=10)
    return p.pid


def test_failed_operation_event_carries_the_code(daemon: Daemon) -> None:
    pid = _gone_pid()
    with reader(daemon) as ev:
        with pytest.raises(CriudClientError) as e:
            daemon.client.checkpoint(pid)
        code = e.value.problem["code"]
        started, failed = ev.take(2)
    assert code == "process_not_found"
    assert started["event"] == "operation.started" and started["target"]["pid"] == pid
    assert failed["event"] == "operation.failed" and failed["code"] == code
    assert failed["operation"] == started["operation"]


def test_since_and_last_event_id_replay_from_the_ring(daemon: Daemon, procs: Procs) -> None:
    with reader(daemon) as ev:
        _cycle(daemon, procs)
        live = ev.take(6)
    first = int(live[0]["sse_id"])
    with reader(daemon, f"/v1/events?since={first}") as again:
        replay = again.take(5)
    assert [e["sse_id"] for e in replay] == [e["sse_id"] for e in live[1:]]
    # What a browser's EventSource sends when it reconnects.
    with reader(daemon, headers=[("Last-Event-ID", str(first + 2))]) as again:
        replay = again.take(3)
    assert [e["sse_id"] for e in replay] == [e["sse_id"] for e in live[3:]]
    # ?since= wins over the header; a bad header is a 422, not a stream.
    with reader(daemon, f"/v1/events?since={first + 4}", headers=[("Last-Event-ID", "1")]) as r:
        assert r.next()["sse_id"] == live[5]["sse_id"]
    bad = SseReader(daemon.socket, headers=[("Last-Event-ID", "x")])
    try:
        assert bad.status == 422
    finally:
        bad.close()


def _flood(daemon: Daemon, n: int) -> None:
    """2n events, cheaply: checkpoints of a pid that does not exist fail at once."""
    pid = _gone_pid()
    for _ in range(n):
        with contextlib.suppress(CriudClientError):
            daemon.client.checkpoint(pid)


def test_a_reader_that_stops_reading_is_dropped_with_lagged(daemon: Daemon) -> None:
    # A small receive buffer, and nothing read: the daemon's sends stall,
    # its queue for this reader fills, and publish drops it.
    with reader(daemon, rcvbuf=4096) as stalled, reader(daemon) as live:
        got: list[dict[str, Any]] = []
        # A reader that keeps up, in a thread, meanwhile.
        follower = threading.Thread(target=lambda: got.extend(live.take(3000, timeout=60)))
        follower.start()
        _flood(daemon, 1500)
        follower.join(timeout=90)
        assert not follower.is_alive()
        assert len(got) == 3000 and all(e["event"] != "lagged" for e in got)
        # Still connected, but no longer subscribed: nothing is queued for it.
        _, text = daemon.client.request("GET", "/metrics")
        assert "\ncriud_event_subscribers 1.0\n" in str(text)
        # The stalled reader reads again: what the socket held, "lagged", then the end.
        rest = stalled.rest(timeout=30)
    assert rest[-1]["event"] == "lagged" and rest[-1]["sse_id"] is None
    assert all(e["event"].startswith("operation.") for e in rest[:-1])
    assert len(rest) < 3000, "the stalled reader was never dropped"
    assert daemon.client.request("GET", "/healthz")[0] == 200


def test_an_expired_fd_handle_is_an_event(daemon: Daemon) -> None:
    r, w = os.pipe()
    try:
        with reader(daemon) as ev:
            h = daemon.client.send_fds([r, w], ttl_s=0.5)
            got = ev.next(timeout=10)
    finally:
        os.close(r)
        os.close(w)
    assert got["event"] == "fd_handle.expired"
    assert got["handle"] == h["handle"] and got["fds"] == 2 and got["owner_uid"] == 0
