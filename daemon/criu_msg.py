"""criu's RPC messages for the warm workers: argv translated to a request, replies read.

The argv builders (criud.dump.argv, criud.restore.argv) stay the one
description of a run; `to_request` translates the subset a warm
`criu swrk` worker (criud.daemon.criu_rpc) can run into criu's own RPC
message (generated from criu's images/rpc.proto by deploy/gen-criu-rpc),
and names why anything else must take the CLI path.  protobuf loads with
this module, which the runner imports at its first warm run, not at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Literal

from criud.daemon import criu_rpc_pb2 as rpc
from criud.daemon.criu_rpc import Notify, Worker

_FD_PREFIX = "/proc/self/fd/"
# criud.restore.worker.FdMap's `--inherit-fd fd[N]:key`.
_INHERIT_RE = re.compile(r"fd\[(\d+)\]:(.+)", re.DOTALL)

# Flags that map one-to-one onto a boolean of criu_opts.
_BOOL_FLAGS = {
    "--leave-running": "leave_running",
    "--shell-job": "shell_job",
    "--tcp-established": "tcp_established",
    "--ext-unix-sk": "ext_unix_sk",
    "--file-locks": "file_locks",
    "--restore-sibling": "rst_sibling",
}
_LOCKS = {
    "iptables": rpc.IPTABLES,
    "nftables": rpc.NFTABLES,
    "skip": rpc.SKIP,
}


@dataclasses.dataclass
class Request:
    """A run as criu's RPC request, plus what the runner does around it."""

    req: rpc.criu_req
    # The daemon's fd of criu's work dir (the log and pidfile land there).
    work_dir_fd: int | None
    # The images dir as a path, when it was given as one (a dump's work dir).
    images_dir: Path | None
    # Written by the runner from the reply: criu's RPC has no pidfile.
    pidfile: str | None

    @property
    def is_dump(self) -> bool:
        return self.req.type == rpc.DUMP


def _fd_of(path: str, pass_fds: Sequence[int]) -> int | None:
    """The daemon's fd behind /proc/self/fd/N (pass_fds keeps fd numbers in the child)."""
    n = int(path[len(_FD_PREFIX) :])
    return n if n in pass_fds else None


def to_request(
    argv: Sequence[str],
    pass_fds: Sequence[int],
    log_name: str,
    held: Mapping[int, int] | None = None,
) -> Request | str:
    """Translate a dump or restore argv into an RPC request, or say why it cannot be.

    held maps an fd of the run (in pass_fds) to the number the worker holds
    the same file at (an fd handle's worker, HandleWorkers): each
    `--inherit-fd fd[N]:key` becomes an inherit_fd entry naming the
    worker's number.  Each reason is a case the CLI path keeps:
    an --inherit-fd whose fd the worker does not hold (swrk can only
    inherit fds already in its own table), an fd handed over that the
    request cannot name through the daemon's /proc/<pid>/fd (a run as the
    tree's owner, who cannot open the root daemon's fds), and any flag
    this table does not know (OCI bundles' mount and cgroup options).
    criu opens log_name in its work dir: the runner checks the dir first.
    """
    if not argv or argv[0] not in ("dump", "restore"):
        return f"criu {argv[:1]} has no RPC form here"
    # images_dir_fd is "required" in the proto, -1 meaning "see images_dir".
    opts = rpc.criu_opts(log_file=log_name, images_dir_fd=-1)
    req = rpc.criu_req(type=rpc.DUMP if argv[0] == "dump" else rpc.RESTORE, opts=opts)
    # The request holds a copy: fill in the copy.
    opts = req.opts
    out = Request(req, None, None, None)
    used: set[int] = set()
    it = iter(argv[1:])
    for arg in it:
        if arg == "--inherit-fd":
            why = _inherit(next(it, ""), req, held or {}, used)
        else:
            why = _translate(arg, it, opts, out, pass_fds, used)
        if why is not None:
            return why
    if set(pass_fds) - used:
        return "an fd is handed over that the warm worker does not hold (inherit fds)"
    if opts.images_dir_fd == -1 and not opts.HasField("images_dir"):
        return "no images dir"
    return out


def _inherit(val: str, req: rpc.criu_req, held: Mapping[int, int], used: set[int]) -> str | None:
    """One --inherit-fd into an entry naming the worker's own fd; or why it cannot be."""
    m = _INHERIT_RE.fullmatch(val)
    if m is None:
        return f"--inherit-fd {val!r} is not fd[N]:key"
    fd = int(m.group(1))
    if fd not in held:
        return f"--inherit-fd fd[{fd}] names an fd the warm worker does not hold"
    used.add(fd)
    req.opts.inherit_fd.append(rpc.inherit_fd(key=m.group(2), fd=held[fd]))
    return None


def _translate(
    arg: str,
    it: Iterator[str],
    opts: rpc.criu_opts,
    out: Request,
    pass_fds: Sequence[int],
    used: set[int],
) -> str | None:
    """One argv element (and its value, taken from it) into opts; or why it cannot be."""
    if arg in ("--no-default-config", "-d"):
        # RPC reads no config file unless given one; RPC restores always detach.
        return None
    if arg in _BOOL_FLAGS:
        setattr(opts, _BOOL_FLAGS[arg], True)
        return None
    if arg == "-v4":
        opts.log_level = 4
        return None
    val = next(it, None)
    if val is None:
        return f"{arg} without a value"
    return _translate_value(arg, val, opts, out, pass_fds, used)


def _translate_value(
    arg: str,
    val: str,
    opts: rpc.criu_opts,
    out: Request,
    pass_fds: Sequence[int],
    used: set[int],
) -> str | None:
    """A flag with a value into opts; or why it cannot be."""
    if arg in ("-D", "-W") and val.startswith(_FD_PREFIX):
        fd = _fd_of(val, pass_fds)
        if fd is None:
            return f"{val} names an fd that is not handed over"
        used.add(fd)
        if arg == "-D":
            opts.images_dir_fd = fd
        else:
            opts.work_dir_fd = out.work_dir_fd = fd
    elif arg == "-D":
        opts.images_dir = val
        out.images_dir = Path(val)
    elif arg == "-W":
        return "a work dir by path"
    elif arg == "-t":
        opts.pid = int(val)
    elif arg == "-o":
        if val != "-":
            return "a log by path"
    elif arg == "--pidfile":
        out.pidfile = val
    elif arg == "--network-lock":
        if val not in _LOCKS:
            return f"network lock {val}"
        opts.network_lock = _LOCKS[val]
    elif arg == "--external":
        opts.external.append(val)
    elif arg == "--cgroup-root":
        opts.cg_root.append(rpc.cgroup_root(path=val))
    else:
        # OCI bundles' mount and cgroup options, --inherit-fd, anything new.
        return f"criu flag {arg} has no RPC translation here"
    return None


async def exchange(w: Worker, req: rpc.criu_req) -> None:
    """Send the one request (SEQPACKET: one message, never split)."""
    await asyncio.get_running_loop().sock_sendall(w.sock, req.SerializeToString())


def is_notify(resp: rpc.criu_resp) -> bool:
    """Whether a message from the worker is a notification (criu waits for its answer)."""
    return bool(resp.type == rpc.NOTIFY and resp.HasField("notify"))


async def answer_notify(w: Worker, ok: bool) -> None:
    """Answer criu's notification: go on (ok) or fail the run there.

    A worker gone meanwhile is not an error here: the wait sees it exit.
    """
    req = rpc.criu_req(type=rpc.NOTIFY, notify_success=ok)
    with contextlib.suppress(ConnectionError):
        await exchange(w, req)


class Talk:
    """One run's messages from its worker: notifications answered, then the reply."""

    def __init__(self, w: Worker, notify: Notify | None) -> None:
        self._w, self._notify = w, notify
        self.replied = False
        self.reply: rpc.criu_resp | None = None

    async def heard(self) -> bool:
        """The worker's socket was readable: whether that was the reply (or a hang-up).

        A notification is answered with what notify says, and the wait goes on.
        """
        resp = next_message(self._w)
        if resp is False:
            return False  # a stale wake: the message was read already
        if self._notify is not None and resp is not None and is_notify(resp):
            ok = await self._notify(resp.notify.script)
            await answer_notify(self._w, ok)
            return False
        self.replied, self.reply = True, resp
        return True


def reply(w: Worker) -> rpc.criu_resp | None:
    """The worker's reply, once it has exited; None if it died before answering."""
    resp = next_message(w)
    return None if resp is False else resp


def next_message(w: Worker) -> rpc.criu_resp | Literal[False] | None:
    """The worker's next message; None if it hung up (or garbled it); False: none yet.

    A reader woken for a message another wake already took finds none (the
    loop polls before it runs the callbacks a poll queued).
    """
    try:
        data = w.sock.recv(1 << 16)
    except BlockingIOError:
        return False
    except ConnectionError:
        return None
    if not data:
        return None
    resp = rpc.criu_resp()
    try:
        resp.ParseFromString(data)
    except Exception:  # protobuf's DecodeError: a garbled reply is no reply
        return None
    return resp
