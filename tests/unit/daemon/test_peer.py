"""criud.daemon.peer: the destination's url and token, checked before anything connects."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from criud.daemon import peer
from criud.daemon.config import Settings
from criud.daemon.errors import InvalidRequest, MigrationFailed, MigrationRefused


def test_target_parse_takes_literal_addresses_only() -> None:
    t = peer.Target.parse("http://10.1.2.3:8420", "tok")
    assert (t.host, t.port, t.url) == ("10.1.2.3", 8420, "http://10.1.2.3:8420")
    assert peer.Target.parse("http://[::1]:80/", "tok").url == "http://[::1]:80"
    for bad in (
        "http://localhost:80",  # a name: the daemon resolves nothing for a caller
        "https://10.0.0.1:80",
        "http://10.0.0.1",  # no port
        "http://10.0.0.1:80/v1/x",
        "file:///etc/passwd",
        "http://10.0.0.1:99999",
    ):
        with pytest.raises(InvalidRequest):
            peer.Target.parse(bad, "tok")
    for token in ("", "a\r\nX-Injected: 1", "x" * 5000):
        with pytest.raises(InvalidRequest):
            peer.Target.parse("http://10.0.0.1:80", token)


def test_token_is_not_in_repr() -> None:
    assert "secret" not in repr(peer.Target.parse("http://10.0.0.1:80", "secret"))


def test_tls_args_need_all_three() -> None:
    with pytest.raises(InvalidRequest):
        peer.criu_tls_args(Settings())
    from pathlib import Path

    s = Settings(tls_cacert=Path("/c"), tls_cert=Path("/a"), tls_key=Path("/k"))
    assert peer.criu_tls_args(s) == [
        "--tls", "--tls-cacert", "/c", "--tls-cert", "/a", "--tls-key", "/k",
    ]  # fmt: skip


async def _serve_once(answer: bytes) -> tuple[asyncio.Server, int]:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.readuntil(b"\r\n\r\n")
        w.write(answer)
        await w.drain()
        w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def test_call_maps_answers_to_errors() -> None:
    async def run() -> None:
        ok = b'HTTP/1.1 201 Created\r\nContent-Length: 9\r\n\r\n{"id":1}\n'
        server, port = await _serve_once(ok)
        async with server:
            got = await peer.call(peer.Target("127.0.0.1", port, "t"), "POST", "/x", {})
        assert got == {"id": 1}
        body = b'{"code":"unauthorized","detail":"no"}'
        refused = b"HTTP/1.1 401 Unauthorized\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        server, port = await _serve_once(refused)
        async with server:
            with pytest.raises(MigrationRefused) as ei:
                await peer.call(peer.Target("127.0.0.1", port, "t"), "POST", "/x", {})
        assert ei.value.extra["problem"]["code"] == "unauthorized"
        server, port = await _serve_once(b"garbage\r\n\r\n")
        async with server:
            with pytest.raises(MigrationFailed):
                await peer.call(peer.Target("127.0.0.1", port, "t"), "GET", "/x")
        # Nobody listening: MigrationFailed, not an OSError.
        with pytest.raises(MigrationFailed):
            await peer.call(peer.Target("127.0.0.1", port, "t"), "GET", "/x")

    asyncio.run(run())


def test_an_answer_before_the_body_is_over_ends_a_streamed_call() -> None:
    """A migration's commit is opened while its dump runs; a refusal then must come through.

    Before, the call sent the whole body first: a body still waiting for a
    failed dump hid the destination's reason (its page server's no_space).
    """

    async def run() -> None:
        body = b'{"code":"no_space","detail":"full"}'
        refused = b"HTTP/1.1 507 Insufficient Storage\r\nContent-Length: %d\r\n\r\n%s" % (
            len(body),
            body,
        )
        server, port = await _serve_once(refused)

        async def never_done() -> AsyncIterator[bytes]:
            yield b"head of the archive"
            await asyncio.Event().wait()  # the dump never ends
            yield b"never"

        async with server:
            target = peer.Target("127.0.0.1", port, "t")
            call = peer.call(target, "PUT", "/x", stream=never_done())
            with pytest.raises(MigrationRefused) as ei:
                await asyncio.wait_for(call, 10)
        assert ei.value.extra["problem"]["code"] == "no_space"

    asyncio.run(run())
