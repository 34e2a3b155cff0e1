"""Receiving file descriptors over a unix socket (SCM_RIGHTS), safely.

CPython's socket.recv_fds ignores its flags argument, so the fds it returns
are inheritable, and it never reports MSG_CTRUNC.  We call recvmsg ourselves
with MSG_CMSG_CLOEXEC and check every flag.  Whatever happens, every fd the
kernel installed in our table is either handed to an OwnedFds or closed.
"""

from __future__ import annotations

import array
import contextlib
import errno
import json
import os
import socket
import struct
from collections.abc import Callable, Sequence
from typing import Any

from criud.daemon.errors import CriudError
from criud.daemon.jsonlimits import MAX_DEPTH, json_depth

MAX_FDS = 64
MAX_PAYLOAD = 64 * 1024
# Room for more than MAX_FDS so an over-long message is seen whole and refused
# as too_many_fds rather than silently truncated; anything beyond that still
# sets MSG_CTRUNC, which we refuse too.
_ANC_FDS = 2 * MAX_FDS
_ANC_SPACE = socket.CMSG_SPACE(_ANC_FDS * 4)
_UCRED = struct.Struct("3i")


class FdPassError(CriudError):
    """A message on the fd socket was refused; code is stable, message is for people.

    The fd socket answers with its own reply (criud.daemon.fdsock), not
    problem+json, so each refusal keeps the code it always had there.
    """

    status = 400
    title = "Refused fd message"

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class OwnedFds:
    """A list of fds that this object closes exactly once, on every path."""

    def __init__(self, fds: Sequence[int] = ()) -> None:
        self._fds: list[int] = list(fds)
        self.closed = False

    @property
    def fds(self) -> list[int]:
        return list(self._fds)

    def add(self, fd: int) -> int:
        """Take ownership of one more fd; return it."""
        assert not self.closed, "adding to closed OwnedFds"
        self._fds.append(fd)
        return fd

    def detach(self) -> list[int]:
        """Give up ownership: return the fds, which the caller now closes."""
        fds, self._fds = self._fds, []
        return fds

    def __len__(self) -> int:
        return len(self._fds)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = []

    def __enter__(self) -> OwnedFds:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# SO_PEERGROUPS (Linux 4.13): the peer's supplementary groups as they were
# when it connected.  Python names no constant for it.
SO_PEERGROUPS = 59
# Python's getsockopt takes at most 1024 bytes: 256 groups.  Beyond that,
# libc's getsockopt with room for NGROUPS_MAX (65536).
_GROUPS_FAST = 1024
_NGROUPS_MAX = 65536


def peer_groups(sock: socket.socket) -> tuple[int, ...]:
    """The supplementary groups of a connected unix socket's peer, captured at connect."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, _GROUPS_FAST)
    except OSError as e:
        if e.errno != errno.ERANGE:
            raise
        raw = _peer_groups_big(sock.fileno())
    arr = array.array("I")
    arr.frombytes(raw[: len(raw) - len(raw) % arr.itemsize])
    return tuple(arr)


def _peer_groups_big(fd: int) -> bytes:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(_NGROUPS_MAX * 4)
    size = ctypes.c_uint32(len(buf))
    if libc.getsockopt(fd, socket.SOL_SOCKET, SO_PEERGROUPS, buf, ctypes.byref(size)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return buf.raw[: size.value]


def peer_creds(sock: socket.socket) -> tuple[int, int, int]:
    """Return (pid, uid, gid) of the peer of a connected unix socket."""
    pid, uid, gid = _UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    )
    return pid, uid, gid


def _collect_fds(ancdata: list[tuple[int, int, bytes]]) -> tuple[list[int], list[int]]:
    """Split ancillary data into (received fds, unexpected cmsg types)."""
    fds: list[int] = []
    others: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - (len(data) % arr.itemsize)])
            fds.extend(arr)
        else:
            others.append(kind)
    return fds, others


def _recv_checked(
    sock: socket.socket, max_fds: int, check: Callable[[bytes, list[int]], None] | None = None
) -> tuple[bytes, OwnedFds]:
    """One recvmsg with MSG_CMSG_CLOEXEC, checked; every fd it carried closed on refusal.

    Refused: truncated ancillary data (MSG_CTRUNC: the fds that fit were
    still installed), a payload over MAX_PAYLOAD, anything but SCM_RIGHTS,
    more than max_fds fds, and whatever `check` raises FdPassError for.
    Raises BlockingIOError if nothing is there yet.
    """
    try:
        data, ancdata, flags, _ = sock.recvmsg(
            MAX_PAYLOAD + 1, _ANC_SPACE, socket.MSG_CMSG_CLOEXEC | socket.MSG_DONTWAIT
        )
    except BlockingIOError:
        raise
    except OSError as e:
        raise FdPassError("recv_failed", f"recvmsg failed: {e.strerror}") from e
    fds, others = _collect_fds(ancdata)
    owned = OwnedFds(fds)
    try:
        if flags & socket.MSG_CTRUNC:
            raise FdPassError(
                "truncated", "ancillary data was truncated: too many fds in one message"
            )
        if flags & socket.MSG_TRUNC or len(data) > MAX_PAYLOAD:
            raise FdPassError("payload_too_large", f"payload larger than {MAX_PAYLOAD} bytes")
        if others:
            raise FdPassError(
                "bad_ancillary", f"only SCM_RIGHTS is accepted, got cmsg types {others}"
            )
        if check is not None:
            check(data, fds)
        if len(fds) > max_fds:
            raise FdPassError("too_many_fds", f"{len(fds)} fds sent; at most {max_fds} per message")
    except FdPassError:
        owned.close()
        raise
    return data, owned


def _one_or_more_fds(data: bytes, fds: list[int]) -> None:
    if not fds:
        if not data:
            raise FdPassError("empty", "empty message (connection closed?)")
        raise FdPassError("no_fds", "the message carries no fds (send 1 to 64 with SCM_RIGHTS)")


def recv_message(sock: socket.socket) -> tuple[bytes, OwnedFds]:
    """Receive one client message with 1 to MAX_FDS fds; FdPassError (fds closed) if refused.

    sock must be readable (the caller waits); SOCK_SEQPACKET keeps message
    boundaries, so one recvmsg is one client message.
    """
    return _recv_checked(sock, MAX_FDS, _one_or_more_fds)


def parse_payload(data: bytes, count: int, max_ttl: float) -> tuple[float | None, list[str] | None]:
    """Validate the JSON payload of an fd message: optional ttl_s and names."""
    if not data.strip():
        return None, None
    if json_depth(data) > MAX_DEPTH:
        # json.loads would recurse into a RecursionError, not a ValueError.
        raise FdPassError("bad_payload", f"payload nested deeper than {MAX_DEPTH} levels")
    try:
        doc: Any = json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise FdPassError("bad_payload", f"payload is not JSON: {e}") from e
    if not isinstance(doc, dict):
        raise FdPassError("bad_payload", "payload must be a JSON object")
    unknown = set(doc) - {"ttl_s", "names"}
    if unknown:
        raise FdPassError("bad_payload", f"unknown payload keys: {sorted(unknown)}")
    ttl = doc.get("ttl_s")
    if ttl is not None and (
        isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 0 < ttl <= max_ttl
    ):
        raise FdPassError("bad_payload", f"ttl_s must be a number in (0, {max_ttl:g}]")
    names = doc.get("names")
    if names is not None:
        if not isinstance(names, list) or not all(
            isinstance(n, str) and 0 < len(n) <= 256 for n in names
        ):
            raise FdPassError("bad_payload", "names must be a list of non-empty strings")
        if len(names) != count:
            raise FdPassError("bad_payload", f"{len(names)} names for {count} fds")
    return (float(ttl) if ttl is not None else None), names


def send_fds(sock: socket.socket, payload: bytes, fds: Sequence[int]) -> None:
    """Send one message with fds (the client side)."""
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    sock.sendmsg([payload], anc)


def recv_reply(sock: socket.socket, max_fds: int = MAX_FDS) -> tuple[bytes, OwnedFds]:
    """Receive one message with 0 to max_fds fds (a reply of our own child).

    Checked as strictly as a client's message; at EOF the data is empty.
    """
    return _recv_checked(sock, max_fds)
