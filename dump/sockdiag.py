"""Unix socket peers via NETLINK_SOCK_DIAG.

/proc/net/unix lists unix sockets but not who they are connected to; the
kernel's sock_diag interface answers that (UDIAG_SHOW_PEER).  We need the peer
to tell whether a socketpair or a connected socket leads outside the tree.
"""

from __future__ import annotations

import os
import socket
import struct

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3
UDIAG_SHOW_PEER = 0x4
UNIX_DIAG_PEER = 2

_NLMSGHDR = struct.Struct("=IHHII")
_REQ = struct.Struct("=BBHIII8x")  # family, protocol, pad, states, ino, show, cookie
_MSG = struct.Struct("=BBBBI8x")  # family, type, state, pad, ino, cookie
_RTA = struct.Struct("=HH")


def _align(n: int) -> int:
    return (n + 3) & ~3


def _query() -> dict[int, int | None]:
    peers: dict[int, int | None] = {}
    with socket.socket(
        socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG
    ) as nl:
        req = _REQ.pack(socket.AF_UNIX, 0, 0, 0xFFFFFFFF, 0, UDIAG_SHOW_PEER)
        hdr = _NLMSGHDR.pack(
            _NLMSGHDR.size + len(req), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, 1, 0
        )
        nl.sendto(hdr + req, (0, 0))
        while True:
            data = nl.recv(1 << 16)
            off = 0
            while off + _NLMSGHDR.size <= len(data):
                length, mtype, _, _, _ = _NLMSGHDR.unpack_from(data, off)
                if mtype == NLMSG_DONE:
                    return peers
                if mtype == NLMSG_ERROR:
                    (err,) = struct.unpack_from("=i", data, off + _NLMSGHDR.size)
                    raise OSError(-err, os.strerror(-err))
                body = off + _NLMSGHDR.size
                _, _, _, _, ino = _MSG.unpack_from(data, body)
                peer: int | None = None
                a = body + _MSG.size
                while a + _RTA.size <= off + length:
                    alen, atype = _RTA.unpack_from(data, a)
                    if alen < _RTA.size:
                        break
                    if atype == UNIX_DIAG_PEER:
                        (peer,) = struct.unpack_from("=I", data, a + _RTA.size)
                    a += _align(alen)
                peers[ino] = peer or None
                if length == 0:
                    break
                off += _align(length)


def _same_netns(pid: int) -> bool:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return False


def _proc_unix(pid: int) -> dict[int, int | None]:
    out: dict[int, int | None] = {}
    try:
        with open(f"/proc/{pid}/net/unix", encoding="ascii", errors="replace") as f:
            f.readline()
            for line in f:
                parts = line.split()
                if len(parts) >= 7:
                    out[int(parts[6])] = None
    except (OSError, ValueError):
        pass
    return out


def unix_peers(pid: int) -> dict[int, int | None]:
    """Map every unix socket inode in pid's network namespace to its peer's inode.

    sock_diag answers for the caller's own namespace only; for a target in
    another namespace we fall back to /proc/<pid>/net/unix, which knows the
    sockets but not their peers (peer None: not judged external).
    """
    if _same_netns(pid):
        try:
            return _query()
        except OSError:
            pass
    return _proc_unix(pid)
