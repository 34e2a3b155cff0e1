"""criud.daemon.server: the send room of a connection, and the protocol's head cap."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

from criud.daemon import memory
from criud.daemon.server import MAX_HEAD, SEND_ROOM_MAX, PeerCredProtocol, SendRoom


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def _sndbuf(s: socket.socket) -> int:
    return s.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)


@pytest.mark.skipif(os.geteuid() != 0, reason="SO_SNDBUFFORCE needs CAP_NET_ADMIN")
def test_send_room_widens_never_narrows_and_is_capped(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, _ = pair
    a.setblocking(False)
    room = SendRoom(a)
    room.fit(1 << 20)
    # The kernel doubles what it is given, for its own bookkeeping.
    assert _sndbuf(a) == 2 << 20
    # So a whole 1 MiB answer goes in one send(), nobody reading yet.
    assert a.send(b"x" * (1 << 20)) == 1 << 20
    room.fit(4096)
    assert _sndbuf(a) == 2 << 20
    room.fit(1 << 30)
    assert _sndbuf(a) == 2 * SEND_ROOM_MAX


def test_head_cap_is_h11s() -> None:
    # The protocol keeps the bound uvicorn's h11 protocol had (its default).
    h11 = pytest.importorskip("h11")
    assert h11._connection.DEFAULT_MAX_INCOMPLETE_EVENT_SIZE == MAX_HEAD
    assert PeerCredProtocol.header_timeout_s > 0


def test_release_is_safe_to_call() -> None:
    memory.release()
    memory.release()
