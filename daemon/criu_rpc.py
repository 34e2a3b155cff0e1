"""criu's RPC for the warm pool: argv translated to a request, and the workers.

The argv builders (criud.dump.argv, criud.restore.argv) stay the one
description of a run; `to_request` translates the subset a warm
`criu swrk` worker can run into criu's own RPC message (generated from
criu's images/rpc.proto by deploy/gen-criu-rpc), and names why anything
else must take the CLI path.  `WarmPool` keeps pre-started workers, each on
a SOCK_SEQPACKET socketpair, ready to serve one request: criu refuses
keep_open for dump and restore, so a worker that has served is gone and the
pool starts another off the request path.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path

from criud.daemon import criu_rpc_pb2 as rpc

log = logging.getLogger("criud.criu")

_FD_PREFIX = "/proc/self/fd/"

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


def to_request(argv: Sequence[str], pass_fds: Sequence[int], log_name: str) -> Request | str:
    """Translate a dump or restore argv into an RPC request, or say why it cannot be.

    Each reason is a case the CLI path keeps:
    an --inherit-fd (a warm worker holds no fds of the request: swrk can
    only inherit fds already in its own table), an fd handed over that the
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
        why = _translate(arg, it, opts, out, pass_fds, used)
        if why is not None:
            return why
    if set(pass_fds) - used:
        return "an fd is handed over that the warm worker does not hold (inherit fds)"
    if opts.images_dir_fd == -1 and not opts.HasField("images_dir"):
        return "no images dir"
    return out


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


# -- the workers -------------------------------------------------------------------


@dataclasses.dataclass
class Worker:
    """A started `criu swrk`, waiting for its one request on sock."""

    proc: asyncio.subprocess.Process
    sock: socket.socket

    def close(self) -> None:
        """Kill the worker (if it still runs) and close our end; the pid is reaped by asyncio."""
        with contextlib.suppress(ProcessLookupError):
            if self.proc.returncode is None:
                self.proc.kill()
        self.sock.close()


Spawner = Callable[[Sequence[str], int], Awaitable[asyncio.subprocess.Process]]


class WarmPool:
    """Pre-started criu swrk workers; take() one, fill() to start its replacement."""

    def __init__(
        self,
        size: int,
        argv_for: Callable[[int], list[str]],
        spawn: Spawner,
        forget: Callable[[int], None],
    ) -> None:
        self.size = size
        # forget(pid): the runner stops counting a worker it will never wait for.
        self._forget = forget
        # argv_for(fd) is the worker's command line for its socket at fd.
        self._argv_for = argv_for
        self._spawn = spawn
        self._ready: list[Worker] = []
        self._starting = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        # Counted for /metrics and the benchmark: served warm vs fell back.
        self.taken = 0
        self.missed = 0

    async def start_one(self) -> Worker:
        """Start a worker now (also used on demand): a socketpair, criu swrk on its end."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            # Both ends are CLOEXEC; pass_fds hands the worker its own end only.
            proc = await self._spawn(self._argv_for(theirs.fileno()), theirs.fileno())
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        return Worker(proc, ours)

    def fill(self) -> None:
        """Top the pool up in the background (never on a request's path)."""
        while not self._closed and len(self._ready) + self._starting < self.size:
            self._starting += 1
            task = asyncio.get_running_loop().create_task(self._add())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _add(self) -> None:
        try:
            w = await self.start_one()
        except Exception as e:
            # The CLI path still works; the next take() tries again.
            log.warning("cannot start a warm criu worker: %s", e)
            return
        finally:
            self._starting -= 1
        if self._closed:
            w.close()
            await w.proc.wait()
            self._forget(w.proc.pid)
        else:
            self._ready.append(w)

    def take(self) -> Worker | None:
        """A ready worker (the pool refills behind it), or None when none is left."""
        w = None
        while self._ready:
            cand = self._ready.pop(0)
            if cand.proc.returncode is None:
                w = cand
                break
            # Died while idle (killed by someone): drop it.
            cand.sock.close()
            self._forget(cand.proc.pid)
        if w is None:
            self.missed += 1
            self.fill()
        else:
            # The replacement starts once this request is done (the runner
            # calls fill()): on 2 cores a worker's exec and library loading
            # would otherwise compete with the request it replaces.
            self.taken += 1
        return w

    @property
    def pids(self) -> list[int]:
        """The idle workers' pids."""
        return [w.proc.pid for w in self._ready]

    async def close(self) -> None:
        """Stop refilling; kill and reap every idle worker."""
        self._closed = True
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        ready, self._ready = self._ready, []
        for w in ready:
            w.close()
        await asyncio.gather(*(w.proc.wait() for w in ready), return_exceptions=True)
        for w in ready:
            self._forget(w.proc.pid)


async def exchange(w: Worker, req: rpc.criu_req) -> None:
    """Send the one request (SEQPACKET: one message, never split)."""
    await asyncio.get_running_loop().sock_sendall(w.sock, req.SerializeToString())


def reply(w: Worker) -> rpc.criu_resp | None:
    """The worker's reply, once it has exited; None if it died before answering."""
    try:
        data = w.sock.recv(1 << 16)
    except (BlockingIOError, ConnectionError):
        return None
    if not data:
        return None
    resp = rpc.criu_resp()
    try:
        resp.ParseFromString(data)
    except Exception:  # protobuf's DecodeError: a garbled reply is no reply
        return None
    return resp


def write_pidfile(dir_fd: int, name: str, pid: int) -> None:
    """Write criu's pidfile as the CLI would have, into the run dir the daemon owns."""
    fd = os.open(
        name,
        os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
        0o600,
        dir_fd=dir_fd,
    )
    try:
        os.write(fd, f"{pid}".encode())
    finally:
        os.close(fd)
