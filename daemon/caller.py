"""Who is calling: the identity every core method acts for."""

from __future__ import annotations

import dataclasses
import socket

from criud.daemon.fdpass import peer_creds, peer_groups


@dataclasses.dataclass(frozen=True)
class Caller:
    """Who is asking: SO_PEERCRED and SO_PEERGROUPS, both as of connect()."""

    uid: int
    gid: int
    pid: int
    # Token-authenticated TCP callers act as root but cannot use fd handles,
    # which only exist for unix socket peers.
    via_tcp: bool = False
    # Supplementary groups, captured by the kernel when the peer connected.
    # Never read later from /proc/<pid>: the pid may by then be another
    # process's, in other groups.
    groups: tuple[int, ...] = ()

    @property
    def is_root(self) -> bool:
        return self.uid == 0


def peer_caller(sock: socket.socket) -> Caller:
    """The Caller at the other end of a connected unix socket; OSError if unreadable."""
    pid, uid, gid = peer_creds(sock)
    return Caller(uid=uid, gid=gid, pid=pid, groups=peer_groups(sock))
