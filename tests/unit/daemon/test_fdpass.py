"""criud.daemon.fdpass: receiving fds over a real SOCK_SEQPACKET socketpair."""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Iterator, Sequence

import pytest

from criud.daemon.fdpass import (
    MAX_FDS,
    MAX_PAYLOAD,
    FdPassError,
    OwnedFds,
    parse_payload,
    peer_creds,
    recv_message,
    send_fds,
)

from .._helpers import open_fds


@pytest.fixture
def pair(fd_leak_check) -> Iterator[tuple[socket.socket, socket.socket]]:
    """(client, server) ends of a fresh seqpacket socketpair; checks for fd leaks."""
    client, server = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server.setblocking(False)
    with client, server:
        yield client, server


def _send_pipes(client: socket.socket, n: int, payload: bytes = b"{}") -> set[int]:
    """Send the read ends of n fresh pipes; close every local copy; return their inodes."""
    local: list[int] = []
    try:
        for _ in range(n):
            r, w = os.pipe()
            local += [r, w]
        reads = local[0::2]
        inodes = {os.fstat(fd).st_ino for fd in reads}
        send_fds(client, payload, reads)
        return inodes
    finally:
        for fd in local:
            os.close(fd)


def test_one_fd_round_trip(pair) -> None:
    client, server = pair
    r, w = os.pipe()
    try:
        send_fds(client, b'{"ttl_s": 5}', [r])
        data, owned = recv_message(server)
        with owned:
            assert data == b'{"ttl_s": 5}'
            assert len(owned) == 1
            (fd,) = owned.fds
            assert fd not in (r, w)
            assert os.fstat(fd).st_ino == os.fstat(r).st_ino
            assert os.get_inheritable(fd) is False  # MSG_CMSG_CLOEXEC
            with cloexec_guard(owned.fds):
                pass
            os.write(w, b"hi")
            assert os.read(fd, 2) == b"hi"
        assert owned.closed
        assert owned.fds == []
        with pytest.raises(OSError):
            os.fstat(fd)
    finally:
        os.close(r)
        os.close(w)


def test_max_fds_accepted_all_cloexec(pair) -> None:
    client, server = pair
    inodes = _send_pipes(client, MAX_FDS)
    data, owned = recv_message(server)
    with owned:
        assert data == b"{}"
        assert len(owned) == MAX_FDS
        assert {os.fstat(fd).st_ino for fd in owned.fds} == inodes
        assert not any(os.get_inheritable(fd) for fd in owned.fds)


def test_no_fds(pair) -> None:
    client, server = pair
    client.send(b'{"ttl_s": 1}')
    with pytest.raises(FdPassError) as ei:
        recv_message(server)
    assert ei.value.code == "no_fds"


def test_empty_on_closed_peer(pair) -> None:
    client, server = pair
    client.close()
    with pytest.raises(FdPassError) as ei:
        recv_message(server)
    assert ei.value.code == "empty"


def test_nothing_to_read_is_blocking_io(pair) -> None:
    _, server = pair
    with pytest.raises(BlockingIOError):
        recv_message(server)


def test_too_many_fds_all_closed(pair) -> None:
    client, server = pair
    before = open_fds()
    _send_pipes(client, MAX_FDS + 1)
    with pytest.raises(FdPassError) as ei:
        recv_message(server)
    assert ei.value.code == "too_many_fds"
    assert str(MAX_FDS + 1) in ei.value.message
    assert open_fds() == before


@pytest.mark.parametrize("n", [2 * MAX_FDS + 1, 200])
def test_truncated_ancillary_no_leak(pair, n: int) -> None:
    client, server = pair
    before = open_fds()
    _send_pipes(client, n)
    with pytest.raises(FdPassError) as ei:
        recv_message(server)
    assert ei.value.code == "truncated"
    assert open_fds() == before


def test_payload_too_large_closes_fds(pair) -> None:
    client, server = pair
    client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * MAX_PAYLOAD)
    before = open_fds()
    _send_pipes(client, 2, payload=b" " * (MAX_PAYLOAD + 10))
    with pytest.raises(FdPassError) as ei:
        recv_message(server)
    assert ei.value.code == "payload_too_large"
    assert open_fds() == before


def test_payload_of_max_size_is_fine(pair) -> None:
    client, server = pair
    client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * MAX_PAYLOAD)
    _send_pipes(client, 1, payload=b" " * MAX_PAYLOAD)
    data, owned = recv_message(server)
    with owned:
        assert len(data) == MAX_PAYLOAD
        assert len(owned) == 1


def test_other_ancillary_refused_and_fds_closed(pair) -> None:
    client, server = pair
    # With SO_PASSCRED the kernel adds SCM_CREDENTIALS to every message.
    server.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    before = open_fds()
    _send_pipes(client, 3)
    with pytest.raises(FdPassError) as ei:
        recv_message(server)
    assert ei.value.code == "bad_ancillary"
    assert str(socket.SCM_CREDENTIALS) in ei.value.message
    assert open_fds() == before


def test_recv_failed_on_bad_socket() -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with s:
        s.setblocking(False)
        with pytest.raises(FdPassError) as ei:
            recv_message(s)  # not connected: ENOTCONN
    assert ei.value.code == "recv_failed"


def test_message_boundaries_kept(pair) -> None:
    client, server = pair
    _send_pipes(client, 1, payload=b"first")
    _send_pipes(client, 2, payload=b"second")
    d1, o1 = recv_message(server)
    d2, o2 = recv_message(server)
    with o1, o2:
        assert (d1, len(o1)) == (b"first", 1)
        assert (d2, len(o2)) == (b"second", 2)


def test_peer_creds_are_ours(pair) -> None:
    client, server = pair
    assert peer_creds(server) == (os.getpid(), os.getuid(), os.getgid())
    assert peer_creds(client) == (os.getpid(), os.getuid(), os.getgid())


def test_owned_fds_close_once(fd_leak_check) -> None:
    r, w = os.pipe()
    owned = OwnedFds([r, w])
    assert owned.fds == [r, w]
    owned.fds.append(99)  # a copy: the owned list is not exposed
    assert len(owned) == 2
    owned.close()
    assert owned.closed
    # A second close must not close whatever reuses the numbers now.
    r2, w2 = os.pipe()
    try:
        owned.close()
        os.fstat(r2)
        os.fstat(w2)
    finally:
        os.close(r2)
        os.close(w2)


def test_owned_fds_close_tolerates_already_closed(fd_leak_check) -> None:
    r, w = os.pipe()
    os.close(r)
    OwnedFds([r, w]).close()  # no EBADF escapes
    with pytest.raises(OSError):
        os.fstat(w)


@contextlib.contextmanager
def cloexec_guard(fds: Sequence[int]) -> Iterator[None]:
    """Assert that fds are close-on-exec while inside."""
    for fd in fds:
        assert not os.get_inheritable(fd), fd
    yield


def test_cloexec_guard_catches_inheritable(fd_leak_check) -> None:
    r, w = os.pipe()
    try:
        os.set_inheritable(r, True)
        with pytest.raises(AssertionError), cloexec_guard([r, w]):
            pass
    finally:
        os.close(r)
        os.close(w)


# -- parse_payload ------------------------------------------------------------------


def test_payload_empty_or_blank() -> None:
    assert parse_payload(b"", 1, 60) == (None, None)
    assert parse_payload(b"  \n", 3, 60) == (None, None)
    assert parse_payload(b"{}", 3, 60) == (None, None)


def test_payload_full() -> None:
    ttl, names = parse_payload(json.dumps({"ttl_s": 30, "names": ["a", "b"]}).encode(), 2, 60)
    assert ttl == 30.0
    assert isinstance(ttl, float)
    assert names == ["a", "b"]


@pytest.mark.parametrize("ttl", [0.001, 1, 59.5, 60])
def test_ttl_in_bounds(ttl: float) -> None:
    assert parse_payload(json.dumps({"ttl_s": ttl}).encode(), 1, 60) == (float(ttl), None)


@pytest.mark.parametrize(
    "raw",
    ["0", "-1", "60.0001", "61", "1e9", "true", "false", '"5"', "[5]", "NaN", "Infinity"],
)
def test_ttl_out_of_bounds(raw: str) -> None:
    with pytest.raises(FdPassError) as ei:
        parse_payload(b'{"ttl_s": ' + raw.encode() + b"}", 1, 60)
    assert ei.value.code == "bad_payload"
    assert "ttl_s" in ei.value.message


def test_ttl_null_means_default() -> None:
    assert parse_payload(b'{"ttl_s": null}', 1, 60) == (None, None)


@pytest.mark.parametrize(
    "data",
    [b"{", b"not json", b"\xff\xfe\x00", b"[1, 2]", b'"s"', b"5", b"null"],
)
def test_bad_json(data: bytes) -> None:
    with pytest.raises(FdPassError) as ei:
        parse_payload(data, 1, 60)
    assert ei.value.code == "bad_payload"


def test_unknown_keys() -> None:
    with pytest.raises(FdPassError) as ei:
        parse_payload(b'{"ttl_s": 1, "zzz": 1, "aaa": 2}', 1, 60)
    assert ei.value.code == "bad_payload"
    assert "['aaa', 'zzz']" in ei.value.message


@pytest.mark.parametrize(("names", "count"), [(["a"], 2), (["a", "b", "c"], 2), ([], 1)])
def test_names_count_mismatch(names: list[str], count: int) -> None:
    with pytest.raises(FdPassError) as ei:
        parse_payload(json.dumps({"names": names}).encode(), count, 60)
    assert ei.value.code == "bad_payload"
    assert f"{len(names)} names for {count} fds" in ei.value.message


@pytest.mark.parametrize("names", ["ab", [""], [1], ["x" * 257], {"a": 1}, [None]])
def test_names_shape(names: object) -> None:
    with pytest.raises(FdPassError) as ei:
        parse_payload(json.dumps({"names": names}).encode(), 1, 60)
    assert ei.value.code == "bad_payload"


def test_name_of_256_chars_ok() -> None:
    assert parse_payload(json.dumps({"names": ["x" * 256]}).encode(), 1, 60) == (
        None,
        ["x" * 256],
    )


def test_peer_groups_are_the_connect_time_ones(fd_leak_check) -> None:
    # SO_PEERGROUPS: what the peer had when the pair was made, not later.
    from criud.daemon.caller import peer_caller

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        who = peer_caller(a)
        assert who.pid == os.getpid() and who.uid == os.getuid()
        assert sorted(who.groups) == sorted(os.getgroups())
    if os.geteuid() != 0:
        return
    saved = os.getgroups()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        os.setgroups([4321, 4322])
        a2, b2 = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    finally:
        os.setgroups(saved)
    with a, b, a2, b2:
        assert sorted(peer_caller(a).groups) == sorted(saved)
        assert sorted(peer_caller(a2).groups) == [4321, 4322]


def test_peer_groups_beyond_python_getsockopt_limit(fd_leak_check) -> None:
    # More than 256 groups do not fit Python's 1024-byte getsockopt buffer.
    if os.geteuid() != 0:
        pytest.skip("needs root")
    from criud.daemon.fdpass import peer_groups

    many = list(range(50000, 50400))
    saved = os.getgroups()
    try:
        os.setgroups(many)
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    finally:
        os.setgroups(saved)
    with a, b:
        assert sorted(peer_groups(a)) == many


def test_recv_reply_takes_zero_or_more_fds(pair: tuple[socket.socket, socket.socket]) -> None:
    from criud.daemon.fdpass import recv_reply

    client, server = pair
    client.send(b'{"error": 1}')
    data, owned = recv_reply(server)
    assert data == b'{"error": 1}' and len(owned) == 0
    r, w = os.pipe()
    try:
        send_fds(client, b"{}", [r, w])
    finally:
        os.close(r)
        os.close(w)
    data, owned = recv_reply(server)
    with owned:
        assert len(owned) == 2
        assert all(not os.get_inheritable(fd) for fd in owned.fds)
    with pytest.raises(BlockingIOError):
        recv_reply(server)
    client.close()
    assert recv_reply(server)[0] == b""
