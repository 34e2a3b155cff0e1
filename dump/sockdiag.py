"""Unix sockets, their peers and names, via NETLINK_SOCK_DIAG.

/proc/net/unix lists unix sockets but not who they are connected to; the
kernel's sock_diag interface answers that (UDIAG_SHOW_PEER), and names each
socket's bound address (UDIAG_SHOW_NAME).  We need the peer to tell whether a
socketpair or a connected socket leads outside the tree, and the type and
peer's name to tell which criu option can cope with it: ``--ext-unix-sk``
reconnects only a datagram socket whose peer has a name (measured with criu
4.2.1; a stream or seqpacket half needs ``--external unix[ino]``).

sock_diag answers for the namespace the netlink socket was created in.  For
a target in another network namespace we create that socket from a
short-lived thread that setns()es into the target's namespace: the socket
stays bound to that namespace, the thread (and its namespace switch) is
gone before we use it, so no thread of the daemon ever runs in a foreign
namespace.
"""

from __future__ import annotations

import ctypes
import os
import socket
import struct
import threading
from typing import NamedTuple

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3
UDIAG_SHOW_NAME = 0x1
UDIAG_SHOW_PEER = 0x4
UNIX_DIAG_NAME = 0
UNIX_DIAG_PEER = 2
CLONE_NEWNET = 0x40000000

# Loaded once, here: dlopen() takes a loader lock, and a child forked from
# the daemon (criud.daemon.forkmap) must not need a lock another thread of
# the daemon may have held at the fork.
_libc = ctypes.CDLL(None, use_errno=True)

_NLMSGHDR = struct.Struct("=IHHII")
_REQ = struct.Struct("=BBHIII8x")  # family, protocol, pad, states, ino, show, cookie
_MSG = struct.Struct("=BBBBI8x")  # family, type, state, pad, ino, cookie
_RTA = struct.Struct("=HH")
_U32 = struct.Struct("=I")

# sock_diag reports a unix socket's state with the TCP state numbers.
_DIAG_STATES = {1: "ESTABLISHED", 2: "SYN_SENT", 7: "CLOSE", 10: "LISTEN"}
# /proc/net/unix uses the socket-layer SS_* numbers instead.
_PROC_STATES = {1: "CLOSE", 2: "SYN_SENT", 3: "ESTABLISHED", 4: "CLOSE"}
_TYPES: dict[int, str] = {
    int(socket.SOCK_STREAM): "stream",
    int(socket.SOCK_DGRAM): "dgram",
    int(socket.SOCK_SEQPACKET): "seqpacket",
}


class UnixSock(NamedTuple):
    """One unix socket as the kernel describes it.

    A NamedTuple, not a frozen dataclass: a dump of a busy namespace builds
    thousands of these, and a frozen dataclass's __init__ costs several times
    as much.
    """

    inode: int
    # "stream", "dgram" or "seqpacket"; None when unknown.
    type: str | None = None
    # "LISTEN", "ESTABLISHED" (connected), "CLOSE" (unconnected), "SYN_SENT".
    state: str | None = None
    # The peer's inode when connected and sock_diag could say; else None.
    peer: int | None = None
    # The bound address: a path, "@name" for an abstract name, None if unbound.
    name: str | None = None


def _decode_name(raw: bytes) -> str:
    # An abstract name starts with a NUL byte; `ss` and /proc show it as "@".
    if raw.startswith(b"\0"):
        return "@" + raw[1:].decode("utf-8", "replace")
    return raw.rstrip(b"\0").decode("utf-8", "replace")


def _open_netlink() -> socket.socket:
    return socket.socket(
        socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG
    )


def _query(nl: socket.socket | None = None) -> dict[int, UnixSock]:
    """Dump every unix socket of the netlink socket's namespace (ours by default)."""
    own = nl is None
    sock = _open_netlink() if nl is None else nl
    try:
        return _dump(sock)
    finally:
        if own:
            sock.close()


def _dump(nl: socket.socket) -> dict[int, UnixSock]:
    out: dict[int, UnixSock] = {}
    req = _REQ.pack(socket.AF_UNIX, 0, 0, 0xFFFFFFFF, 0, UDIAG_SHOW_PEER | UDIAG_SHOW_NAME)
    hdr = _NLMSGHDR.pack(
        _NLMSGHDR.size + len(req), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, 1, 0
    )
    nl.sendto(hdr + req, (0, 0))
    # The hot loop of a big namespace (thousands of sockets): locals, and
    # one unpack per header.
    hdr_at, msg_at, rta_at, u32_at = (
        _NLMSGHDR.unpack_from,
        _MSG.unpack_from,
        _RTA.unpack_from,
        _U32.unpack_from,
    )
    types, states = _TYPES, _DIAG_STATES
    hsize, msize, rsize = _NLMSGHDR.size, _MSG.size, _RTA.size
    while True:
        data = nl.recv(1 << 16)
        if not data:
            return out
        off = 0
        end_all = len(data)
        while off + hsize <= end_all:
            length, mtype, _, _, _ = hdr_at(data, off)
            if mtype == NLMSG_DONE:
                return out
            if mtype == NLMSG_ERROR:
                (err,) = struct.unpack_from("=i", data, off + hsize)
                raise OSError(-err, os.strerror(-err))
            body = off + hsize
            _, stype, state, _, ino = msg_at(data, body)
            peer = 0
            name: str | None = None
            a = body + msize
            end = off + length
            while a + rsize <= end:
                alen, atype = rta_at(data, a)
                if alen < rsize:
                    break
                if atype == UNIX_DIAG_PEER:
                    (peer,) = u32_at(data, a + rsize)
                elif atype == UNIX_DIAG_NAME and alen > rsize:
                    name = _decode_name(data[a + rsize : a + alen])
                a += (alen + 3) & ~3
            out[ino] = UnixSock(ino, types.get(stype), states.get(state), peer or None, name)
            if length == 0:
                break
            off += (length + 3) & ~3


def _netns_inode(pid: int | str) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


def _same_netns(pid: int) -> bool:
    theirs = _netns_inode(pid)
    return theirs is not None and theirs == _netns_inode("thread-self")


def _netlink_in_netns_of(pid: int) -> socket.socket:
    """A sock_diag socket bound to pid's network namespace.

    Created by a throw-away thread that setns()es first: a socket belongs to
    the namespace it was created in, whatever thread uses it later.
    """
    nsfd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    got: list[socket.socket] = []
    failed: list[OSError] = []

    def enter() -> None:
        if int(_libc.setns(nsfd, CLONE_NEWNET)) != 0:
            err = ctypes.get_errno()
            failed.append(OSError(err, f"setns into the netns of {pid}: {os.strerror(err)}"))
            return
        try:
            got.append(_open_netlink())
        except OSError as e:
            failed.append(e)

    try:
        t = threading.Thread(target=enter, name=f"criud-netns-{pid}", daemon=True)
        t.start()
        t.join()
    finally:
        os.close(nsfd)
    if failed:
        raise failed[0]
    return got[0]


def _proc_unix_sockets(pid: int) -> dict[int, UnixSock]:
    """Unix sockets from /proc/<pid>/net/unix: types, states and names, no peers."""
    out: dict[int, UnixSock] = {}
    try:
        with open(f"/proc/{pid}/net/unix", encoding="utf-8", errors="replace") as f:
            f.readline()
            for line in f:
                # Num RefCount Protocol Flags Type St Inode [Path]
                parts = line.split(None, 7)
                if len(parts) < 7:
                    continue
                ino = int(parts[6])
                name = parts[7].rstrip("\n") if len(parts) > 7 else None
                out[ino] = UnixSock(
                    inode=ino,
                    type=_TYPES.get(int(parts[4], 16)),
                    state=_PROC_STATES.get(int(parts[5], 16)),
                    name=name or None,
                )
    except (OSError, ValueError):
        pass
    return out


def unix_sockets(pid: int) -> dict[int, UnixSock]:
    """Map every unix socket inode in pid's network namespace to its description.

    Peers come from sock_diag.  If it cannot answer (no netlink, or no right
    to enter the target's namespace) we fall back to /proc/<pid>/net/unix,
    which knows the sockets but not their peers: such sockets have peer None
    and are never judged external.
    """
    try:
        if _same_netns(pid):
            return _query()
        nl = _netlink_in_netns_of(pid)
        with nl:
            return _query(nl)
    except OSError:
        return _proc_unix_sockets(pid)


def _proc_unix(pid: int) -> dict[int, int | None]:
    """The fallback's view as a peer map: every socket known, no peer."""
    return dict.fromkeys(_proc_unix_sockets(pid))


def unix_peers(pid: int) -> dict[int, int | None]:
    """Map every unix socket inode in pid's network namespace to its peer's inode."""
    return {ino: s.peer for ino, s in unix_sockets(pid).items()}
