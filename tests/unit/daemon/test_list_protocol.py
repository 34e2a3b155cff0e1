"""The list answered by the connection's protocol (PeerCredProtocol._answer_list).

A cached hit of a plain `GET /v1/checkpoints` is written by the protocol
before any ASGI cycle; every other form, and a miss, goes to the app
(FastList and FastAPI) as before.  The protocol's bytes must be those
uvicorn writes for FastList's answer.  Driven with a real socketpair for the
peer's credentials and a transport that records what is written.
"""

from __future__ import annotations

import asyncio
import socket
import time
from types import SimpleNamespace
from typing import Any

import pytest
import uvicorn
from uvicorn.server import ServerState

from criud.api.fastlist import FastList
from criud.daemon.server import protocol_for

BODY = b'[{"id":"x"}]' * 1000
PLAIN = b"GET /v1/checkpoints HTTP/1.1\r\nhost: localhost\r\n\r\n"
GEN = 7


class Recorder(asyncio.Transport):
    """A transport over a real unix socket (for SO_PEERCRED) that records the writes."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self.sock = sock
        self.out: list[bytes] = []
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.sock if name == "socket" else default

    def write(self, data: Any) -> None:
        self.out.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class App:
    """The app behind the protocol: FastList over a stub route that answers 204."""

    def __init__(self, state: Any) -> None:
        self.calls: list[str] = []
        self.fast = FastList(self._route, state)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.calls.append(scope["path"] + "?" + scope["query_string"].decode())
        await self.fast(scope, receive, send)

    async def _route(self, scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})


def _state(cached: bool) -> Any:
    # The root caller's unfiltered view of generation GEN (criud.api.checkpoints).
    cache = {(GEN, None, ()): BODY} if cached else {}
    return SimpleNamespace(service=SimpleNamespace(list_generation=GEN), list_cache=cache)


def _config(app: Any) -> uvicorn.Config:
    # The access log off, as the daemon runs it (with it on, the protocol's
    # path steps aside so that each request is logged).
    config = uvicorn.Config(
        app, http="httptools", lifespan="off", log_config=None, access_log=False
    )
    config.load()
    return config


def _server_state(config: uvicorn.Config) -> ServerState:
    # As uvicorn's server keeps it: a date (fixed here) and its server header.
    st = ServerState()
    st.default_headers = [(b"date", b"Thu, 01 Jan 2026 00:00:00 GMT"), *config.encoded_headers]
    return st


async def _serve(
    data: list[bytes], *, cached: bool = True, fast: bool = True, tcp: bool = False
) -> tuple[bytes, App, ServerState]:
    """Feed data to one connection's protocol; what it wrote, the app, the server state."""
    state = _state(cached)
    app = App(state)
    config = _config(app)
    server_state = _server_state(config)
    proto_cls = protocol_for(None, 10.0, state if fast else None)  # type: ignore[arg-type]
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        proto = proto_cls(config=config, server_state=server_state, app_state={})
        t = Recorder(a)
        proto.connection_made(t)
        if tcp:
            proto.app_state["tcp"] = True
        for chunk in data:
            proto.data_received(chunk)
            for _ in range(20):  # let a started ASGI cycle run to its end
                await asyncio.sleep(0)
        proto.connection_lost(None)
        return b"".join(t.out), app, server_state
    finally:
        a.close()
        b.close()


def _answer(body: bytes = BODY) -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\ndate: Thu, 01 Jan 2026 00:00:00 GMT\r\nserver: uvicorn\r\n"
        b"content-length: %d\r\ncontent-type: application/json\r\n\r\n" % len(body) + body
    )


def test_a_cached_list_is_answered_by_the_protocol_with_fastlists_bytes() -> None:
    out, app, st = asyncio.run(_serve([PLAIN, PLAIN]))
    assert out == _answer() * 2
    assert app.calls == []  # no ASGI cycle at all
    assert st.total_requests == 2
    # Byte for byte what uvicorn writes for FastList's answer to the same request.
    routed, app2, _ = asyncio.run(_serve([PLAIN, PLAIN], fast=False))
    assert app2.calls == ["/v1/checkpoints?"] * 2
    assert routed == out


def test_pipelined_requests_in_one_read_are_each_answered() -> None:
    out, app, _ = asyncio.run(_serve([PLAIN * 3]))
    assert out == _answer() * 3 and app.calls == []


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /v1/checkpoints?label=a%3Db HTTP/1.1\r\nhost: x\r\n\r\n",
        b"GET /v1/checkpoints/ HTTP/1.1\r\nhost: x\r\n\r\n",
        b"GET http://x/v1/checkpoints HTTP/1.1\r\nhost: x\r\n\r\n",
        b"HEAD /v1/checkpoints HTTP/1.1\r\nhost: x\r\n\r\n",
        b"POST /v1/checkpoints HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}",
        b"GET /v1/checkpoints HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n",
        b"GET /v1/checkpoints HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        b"GET /v1/checkpoints HTTP/1.0\r\nhost: x\r\n\r\n",
    ],
)
def test_other_forms_go_to_the_app(request_bytes: bytes) -> None:
    _, app, _ = asyncio.run(_serve([request_bytes]))
    assert len(app.calls) == 1


def test_a_miss_and_a_tcp_caller_go_to_the_app() -> None:
    _, app, _ = asyncio.run(_serve([PLAIN], cached=False))
    assert app.calls == ["/v1/checkpoints?"]
    out, app, _ = asyncio.run(_serve([PLAIN], tcp=True))
    # FastList leaves a TCP caller to the route (the token gate's), here the stub's 204.
    assert app.calls == ["/v1/checkpoints?"] and out.startswith(b"HTTP/1.1 204")


def test_a_request_behind_one_in_flight_waits_its_turn() -> None:
    # The first request's cycle (a miss: to the app) is still running when the
    # second, a hit, is parsed from the same read: it must not overtake it.
    async def run() -> tuple[bytes, App]:
        state = _state(True)
        app = App(state)
        gate = asyncio.Event()

        async def slow(scope: Any, receive: Any, send: Any) -> None:
            app.calls.append(scope["query_string"].decode())
            if scope["query_string"]:
                await gate.wait()
                await send({"type": "http.response.start", "status": 204, "headers": []})
                await send({"type": "http.response.body", "body": b""})
            else:
                await app.fast(scope, receive, send)

        config = _config(slow)
        server_state = ServerState()
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        proto = protocol_for(None, 10.0, state)(  # type: ignore[arg-type]
            config=config, server_state=server_state, app_state={}
        )
        t = Recorder(a)
        proto.connection_made(t)
        proto.data_received(b"GET /v1/checkpoints?via=app HTTP/1.1\r\nhost: x\r\n\r\n" + PLAIN)
        for _ in range(5):
            await asyncio.sleep(0)
        assert t.out == []  # the first is not answered yet; nothing overtook it
        gate.set()
        for _ in range(40):
            await asyncio.sleep(0)
        proto.connection_lost(None)
        a.close()
        b.close()
        return b"".join(t.out), app

    out, app = asyncio.run(run())
    assert out.startswith(b"HTTP/1.1 204 No Content\r\n")
    assert out.endswith(b"\r\n\r\n" + BODY)
    assert app.calls == ["via=app", ""]


async def _timed(steps: list[tuple[bytes, float]], timeout_s: float) -> tuple[bytes, bool]:
    """Feed (data, then sleep) steps to a protocol with this head timeout; (output, closed)."""
    state = _state(True)
    config = _config(App(state))
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    proto = protocol_for(None, timeout_s, state)(  # type: ignore[arg-type]
        config=config, server_state=_server_state(config), app_state={}
    )
    t = Recorder(a)
    try:
        proto.connection_made(t)
        for data, pause in steps:
            if data:
                proto.data_received(data)
            await asyncio.sleep(pause)
        return b"".join(t.out), t.closed
    finally:
        proto.connection_lost(None)
        a.close()
        b.close()


def test_prompt_heads_on_a_kept_alive_connection_outlive_the_head_timeout() -> None:
    # 8 requests 0.1 s apart: 0.8 s in all, each head well within 0.3 s of the last answer.
    out, closed = asyncio.run(_timed([(PLAIN, 0.1)] * 8, 0.3))
    assert out == _answer() * 8 and not closed


def test_a_head_left_unfinished_after_answers_still_times_out() -> None:
    t0 = time.monotonic()
    steps = [(PLAIN, 0.1), (PLAIN, 0.1), (b"GET /v1/check", 0.0)]
    out, closed = asyncio.run(_timed([*steps, (b"", 0.6)], 0.3))
    assert closed
    assert out.startswith(_answer() * 2 + b"HTTP/1.1 408 ")
    assert b'"code": "header_timeout"' in out
    assert time.monotonic() - t0 < 2.0


class FullSocket(Recorder):
    """A transport whose reader reads nothing: past `room` bytes it buffers, and
    past asyncio's default high-water mark (64 KiB) it pauses its protocol."""

    def __init__(self, sock: socket.socket, room: int) -> None:
        super().__init__(sock)
        self.room = room
        self.buffered = 0
        self.protocol: Any = None

    def write(self, data: Any) -> None:
        super().write(data)
        sent = min(len(data), self.room)
        self.room -= sent
        self.buffered += len(data) - sent
        if self.buffered > 64 * 1024:
            self.protocol.pause_writing()


def test_a_pipelined_flood_to_a_reader_that_reads_nothing_stays_bounded() -> None:
    # 1,000 plain GETs in one read, and a client that never reads: the
    # protocol writes answers only while the transport takes them, then
    # leaves the rest to uvicorn's cycle, which waits for the buffer to drain.
    async def run() -> tuple[int, int]:
        state = _state(True)
        config = _config(App(state))
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        proto = protocol_for(None, 10.0, state)(  # type: ignore[arg-type]
            config=config, server_state=_server_state(config), app_state={}
        )
        t = FullSocket(a, room=len(BODY) * 2)
        t.protocol = proto
        try:
            proto.connection_made(t)
            proto.data_received(PLAIN * 1000)
            for _ in range(50):
                await asyncio.sleep(0)
            out = len(b"".join(t.out)), t.buffered
            # The client goes away: the cycle waiting to write ends.
            proto.connection_lost(None)
            for _ in range(50):
                await asyncio.sleep(0)
            return out
        finally:
            a.close()
            b.close()

    written, buffered = asyncio.run(run())
    # What the socket takes, then up to the high-water mark and one answer
    # more in the transport's buffer; not 1,000 answers (12 MB here, 800 MB
    # with 1,000 records).
    room, high = len(BODY) * 2, 64 * 1024
    assert buffered <= high + len(_answer())
    assert written <= room + high + len(_answer())
