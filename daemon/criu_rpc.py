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
import re
import socket
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Literal

from criud.daemon import childproc
from criud.daemon import criu_rpc_pb2 as rpc

log = logging.getLogger("criud.criu")

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


# -- the workers -------------------------------------------------------------------


@dataclasses.dataclass
class Worker:
    """A started `criu swrk`, waiting for its one request on sock."""

    proc: childproc.Proc
    sock: socket.socket
    # The fds besides its socket the worker holds, at these numbers (an fd
    # handle's, HandleWorkers); a pool worker holds none.
    held: tuple[int, ...] = ()

    def close(self) -> None:
        """Kill the worker (if it still runs) and close our end; the pid is reaped by asyncio."""
        with contextlib.suppress(ProcessLookupError):
            if self.proc.returncode is None:
                self.proc.kill()
        self.sock.close()


# spawn(argv, fds): start argv holding exactly fds (the worker's socket first).
Spawner = Callable[[Sequence[str], Sequence[int]], Awaitable[childproc.Proc]]
# A dump's notification handler: criu's action name -> go on (True) or fail
# the dump there (False).
Notify = Callable[[str], Awaitable[bool]]


async def start_worker(
    argv_for: Callable[[int], list[str]], spawn: Spawner, fds: tuple[int, ...] = ()
) -> Worker:
    """A socketpair and `criu swrk` on its end, holding that end and fds (at their numbers)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        # Every fd here is CLOEXEC; pass_fds hands the worker exactly these.
        proc = await spawn(argv_for(theirs.fileno()), (theirs.fileno(), *fds))
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    ours.setblocking(False)
    return Worker(proc, ours, fds)


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

    def fill(self) -> None:
        """Top the pool up in the background (never on a request's path)."""
        while not self._closed and len(self._ready) + self._starting < self.size:
            self._starting += 1
            task = asyncio.get_running_loop().create_task(self._add())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _add(self) -> None:
        try:
            w = await start_worker(self._argv_for, self._spawn)
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


class HandleWorkers:
    """Workers started for fd handles, each holding exactly its handle's fds.

    swrk can inherit only fds already in its own table, so a restore with
    inherit fds cannot use a pool worker.  When a handle arrives, a worker
    is started holding its socket and the handle's fds (at the daemon's
    numbers: pass_fds keeps them), so its exec and library loading overlap
    the client's restore request.  A worker lives as long as its handle:
    the restore takes it, or the handle's end (used, deleted, expired)
    kills it.  At most `limit` live at once: past that a handle gets none
    and its restore takes the CLI path, so no caller can make the daemon
    run more criu processes than that, whatever its handle quota.
    """

    def __init__(
        self,
        limit: int,
        argv_for: Callable[[int], list[str]],
        spawn: Spawner,
        forget: Callable[[int], None],
    ) -> None:
        self.limit = limit
        self._argv_for = argv_for
        self._spawn = spawn
        self._forget = forget
        # Per handle: the start (a task until the worker runs, then done).
        self._workers: dict[str, asyncio.Task[Worker | None]] = {}
        self._reaping = childproc.Reaper(self._forget)
        # Counted for the logs and the benchmark.
        self.started = 0
        self.taken = 0

    def __len__(self) -> int:
        return len(self._workers)

    def start(self, key: str, fds: Sequence[int]) -> bool:
        """Start a worker for handle key holding fds, in the background; False over the limit."""
        if key in self._workers or len(self._workers) >= self.limit:
            return False
        # A task: the fd socket answers its client first, and the spawn
        # (fork, exec) runs on the next turn of the loop.
        self._workers[key] = asyncio.get_running_loop().create_task(self._start(tuple(fds)))
        self.started += 1
        return True

    async def _start(self, fds: tuple[int, ...]) -> Worker | None:
        try:
            return await start_worker(self._argv_for, self._spawn, fds)
        except Exception as e:
            log.warning("cannot start a criu worker for an fd handle: %s", e)
            return None

    async def take(self, key: str, fds: set[int]) -> Worker | None:
        """Handle key's worker if it runs and holds exactly fds (then it is the caller's); or None.

        A worker holding more than the run hands over stays with its
        handle (the CLI serves the run): a worker never holds an fd its
        request does not name.
        """
        task = self._workers.get(key)
        if task is None:
            return None
        w = await asyncio.shield(task)
        if w is None or set(w.held) != fds or self._workers.get(key) is not task:
            return None
        del self._workers[key]
        if w.proc.returncode is not None:
            # Killed while idle (by someone): drop it.
            self._discard(w)
            return None
        self.taken += 1
        return w

    def drop(self, key: str) -> None:
        """The handle ended: kill its worker (once started) and reap it off the loop's path."""
        task = self._workers.pop(key, None)
        if task is None:
            return
        if task.done():
            self._reap_task(task)
        else:
            task.add_done_callback(self._reap_task)

    def _reap_task(self, task: asyncio.Task[Worker | None]) -> None:
        if not task.cancelled() and task.exception() is None:
            w = task.result()
            if w is not None:
                self._discard(w)

    def _discard(self, w: Worker) -> None:
        w.close()
        self._reaping.reap(w.proc)

    async def close(self) -> None:
        """Kill and reap every handle's worker (shutdown)."""
        starting = list(self._workers.values())
        for key in list(self._workers):
            self.drop(key)
        await asyncio.gather(*starting, return_exceptions=True)
        await asyncio.sleep(0)  # the starts' done callbacks queue their reaps
        await self._reaping.drain()


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
