"""The one place that runs criu.

Argument lists are built elsewhere by pure functions (criud.dump.argv,
criud.restore.argv); this module spawns criu with them, with an explicit fd
map and nothing else, waits without blocking the event loop, and turns the
outcome into a CriuResult or a CriuUnavailable error.

Every run passes ``--no-default-config`` (so /etc/criu/default.conf or a
stray ~/.criu.conf never changes what we asked for) and its own log file.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import functools
import logging
import os
import re
import shutil
import socket
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from criud.daemon import childproc, imgdir, kprobe
from criud.daemon.errors import CriuFailed, CriuUnavailable, out_of_fds

if TYPE_CHECKING:
    # criu_rpc is imported where the warm pool starts, criu_msg (protobuf
    # and criu's RPC classes: 2.7 MiB of the daemon's RSS, bench/memory_map.py)
    # at the first run that could take a warm worker: an idle daemon, or one
    # run with --criu-pool 0, never holds them.
    from criud.daemon import criu_msg, criu_rpc

log = logging.getLogger("criud.criu")

FEATURES = (
    "mem_dirty_track",
    "uffd",
    "uffd-noncoop",
    "pidfd_store",
    "network_lock_nftables",
    "timens",
)

# Lines criu logs as "Error" on every run here that do not mean failure:
# root lacks CAP_SYS_RESOURCE in this kind of VM.  Success is the exit status.
_HARMLESS = (re.compile(r"RLIMIT_NOFILE"),)
# "(00.012345) Error (file.c:12): msg"; before criu sets its log up the
# timestamp is missing, and restorer lines carry "pie: PID: " in between.
_ERROR_RE = re.compile(r"^(?:\(\s*[\d.]+\)\s+)?(?:pie:\s+)?(?:\d+:\s+)?Error \(([^)]*)\):\s*(.*)$")
_VERSION_RE = re.compile(r"Version:\s*([0-9][0-9.]*)")


# The most criu workers started for fd handles alive at once (each holds
# its handle's fds until a restore takes it or the handle ends).
HANDLE_WORKERS_MAX = 8


@dataclasses.dataclass(frozen=True)
class Held:
    """A run's inherit fds that came from one fd handle, which may have a worker of its own.

    origin maps each fd of the run (a duplicate, in pass_fds) to the
    handle's fd it was duplicated from: the number its worker holds it at.
    """

    handle: str
    origin: Mapping[int, int]


# The most of a failed run's log read back for classification (head and
# tail beyond it); a -v4 log of a 1 GiB dump is ~866 KB.
LOG_READ_CAP = 16 << 20


@dataclasses.dataclass(frozen=True)
class LogFile:
    """A criu log the caller created and owns: criu gets fd as stdout and stderr.

    fd is open O_RDWR|O_APPEND, so the daemon reads the log back from it
    and never reopens path (only named in messages), which may lie in a dir
    the tree's owner could write.
    """

    fd: int
    path: Path


@dataclasses.dataclass
class CriuResult:
    """What one criu run left behind."""

    returncode: int
    log_path: Path
    first_error: str | None
    log_tail: list[str]
    # Why criud killed this criu, if it did: "target_gone" (the dumped
    # process died and criu did not finish), or "timeout".
    stopped: str | None = None
    # The log's lines (bounded), read back from its fd after a failure.
    log_lines: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def _pidfd_of(pid: int | None) -> int | None:
    """A pidfd of the process a dump works on (for Criu._wait), or None.

    Opened before criu starts, so a pid reused later cannot be mistaken for
    the target; a target already gone is criu's to report.
    """
    if pid is None:
        return None
    try:
        return os.pidfd_open(pid)
    except OSError:
        return None


def _wake(wake: dict[str, asyncio.Future[None]], what: str) -> None:
    """A reader's callback (Criu._wait): set wake[what] unless it is set already."""
    if not wake[what].done():
        wake[what].set_result(None)


async def _kill_late(proc: childproc.Proc, exited: asyncio.Future[Any], why: str) -> str:
    """Kill a criu whose time ran out (why), and wait for its exit; why."""
    log.warning("criu pid %d: killed (%s)", proc.pid, why)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    await exited
    return why


def _harmless(msg: str) -> bool:
    return any(p.search(msg) for p in _HARMLESS)


def first_error(lines: Sequence[str]) -> str | None:
    """Return criu's first meaningful error line (source location stripped)."""
    for line in lines:
        m = _ERROR_RE.match(line.rstrip("\n"))
        if m is None:
            continue
        msg = m.group(2).strip()
        if _harmless(msg):
            continue
        return msg
    # Some failures print nothing in criu's format (exec errors, usage).
    return None


def read_log(path: Path, tail: int = 20) -> tuple[str | None, list[str]]:
    """Return (first error, last `tail` lines) of a criu log."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.readlines()
    except OSError:
        return None, []
    return first_error(lines), [ln.rstrip("\n") for ln in lines[-tail:]]


def read_log_fd(fd: int, tail: int = 20) -> tuple[str | None, list[str], list[str]]:
    """(first error, last `tail` lines, all lines) of a criu log open at fd, bounded."""
    try:
        data = imgdir.read_fd(fd, LOG_READ_CAP, tail=True)
    except OSError:
        return None, [], []
    lines = data.decode("utf-8", "replace").splitlines(keepends=True)
    return first_error(lines), [ln.rstrip("\n") for ln in lines[-tail:]], lines


def parse_version(text: str) -> str | None:
    """Extract the version number from `criu --version` output."""
    m = _VERSION_RE.search(text)
    return m.group(1) if m else None


def version_tuple(version: str) -> tuple[int, ...]:
    """Turn '4.2.1' into (4, 2, 1) for comparisons."""
    return tuple(int(p) for p in version.split(".") if p.isdigit())


# What criu needs to dump and restore, as the owner of a tree, with
# --unprivileged (measured here: setpcap lets the restorer drop bounding caps).
UNPRIVILEGED_CAPS = "+checkpoint_restore,+setpcap"
CAP_SYS_RESOURCE = 24


def has_cap(cap: int) -> bool:
    """Whether this process has capability `cap` in its effective set."""
    # Read by hand: psutil has no call for capability sets.
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> cap & 1)
    except (OSError, ValueError):
        pass
    return False


@dataclasses.dataclass(frozen=True)
class RunAs:
    """The credentials criu runs with for a tree dumped as its owner."""

    uid: int
    gid: int
    # The tree's supplementary groups, sorted as the kernel keeps them.
    # criu's restorer skips setgroups when its own list already matches the
    # image's, and criu as a user has no CAP_SETGID to call it: so criu must
    # run with exactly these.
    groups: tuple[int, ...] = ()


def wrap_argv(
    setpriv: str | None, criu: str, argv: Sequence[str], run_as: RunAs | None
) -> list[str]:
    """The full command line: criu, under setpriv when we have it.

    setpriv --pdeathsig KILL makes criu die with the daemon: a dump whose
    daemon was SIGKILLed must not go on to finish and kill its target (a
    killed dump leaves the target running).  It costs one exec (~0.6 ms
    here), where a preexec_fn would force fork over vfork (~2 ms).  run_as
    runs criu as a tree's owner with just the capabilities --unprivileged
    needs.
    """
    if setpriv is None:
        return [criu, *argv]
    cmd = [setpriv, "--pdeathsig", "KILL"]
    if run_as is not None:
        groups = (
            f"--groups={','.join(map(str, run_as.groups))}" if run_as.groups else "--clear-groups"
        )
        cmd += [
            f"--reuid={run_as.uid}",
            f"--regid={run_as.gid}",
            groups,
            f"--inh-caps={UNPRIVILEGED_CAPS}",
            f"--ambient-caps={UNPRIVILEGED_CAPS}",
        ]
    return [*cmd, "--", criu, *argv]


def _log_dir_fd(req: criu_msg.Request) -> int | str:
    """An fd of the dir criu will open its RPC log in, checked to be root's alone; or why not.

    criu opens the log by name (O_CREAT|O_TRUNC, following links) in its
    work dir: the run dir of a restore, or the images dir of a dump.  Only
    a dir that no one but root can write is safe for that; any other goes
    the CLI way (the daemon's own log fd as criu's stdout).
    """
    if req.work_dir_fd is not None:
        fd = fcntl.fcntl(req.work_dir_fd, fcntl.F_DUPFD_CLOEXEC, 0)
    elif req.images_dir is not None:
        try:
            flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(req.images_dir, flags)
        except OSError as e:
            return f"images dir: {e.strerror}"
    else:
        return "no dir for the log"
    st = os.fstat(fd)
    if st.st_uid != 0 or st.st_mode & 0o022:
        os.close(fd)
        return "the log dir is writable by others than root"
    return fd


def _collect_log(dir_fd: int, log: LogFile) -> None:
    """Move what criu logged in its work dir into the daemon's log (if not the same file)."""
    log_ = logging.getLogger("criud.criu")
    name = log.path.name
    try:
        src = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return  # criu died before it opened its log
    try:
        a, b = os.fstat(src), os.fstat(log.fd)
        if (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino):
            return  # a dump: criu wrote into the daemon's log itself
        # Plain reads and writes: sendfile and copy_file_range refuse an
        # O_APPEND destination.
        left = LOG_READ_CAP
        while left > 0 and (chunk := os.read(src, min(left, 1 << 20))):
            os.write(log.fd, chunk)
            left -= len(chunk)
        os.unlink(name, dir_fd=dir_fd)
    except OSError as e:
        # The run's outcome stands; only its log is short.
        log_.warning("cannot copy criu's log into %s: %s", log.path, e)
    finally:
        os.close(src)


async def _result(rc: int, log: LogFile, stopped: str | None, errmsg: str = "") -> CriuResult:
    """How a run ended; its log read only on a failure.

    A -v4 log of a 1 GiB dump is ~17,000 lines (866 KB): a success needs
    none of it.  errmsg is a warm worker's reply message, a log line of
    criu's: the same filter applies (a full disk leaves no log, and the
    reply may then carry only the harmless rlimit complaint of a root
    without CAP_SYS_RESOURCE, which is no reason for the failure).
    """
    if rc == 0:
        return CriuResult(returncode=0, log_path=log.path, first_error=None, log_tail=[])
    err, tail, lines = await asyncio.to_thread(read_log_fd, log.fd)
    if err is None and errmsg:
        err = first_error(errmsg.splitlines()) or (None if _harmless(errmsg) else errmsg)
    return CriuResult(rc, log.path, err, tail, stopped=stopped, log_lines=lines)


# A log at most this long is copied on the event loop (some 100 µs); a
# longer one (a restore of a big tree at -v4) in a thread.
_INLINE_LOG_MAX = 256 << 10


async def _collect_log_soon(dir_fd: int, log: LogFile) -> None:
    """_collect_log, inline when criu's log is small; nothing when it is the daemon's own.

    A dump's criu writes the daemon's own log (its images dir is its
    work dir): nothing is copied, whatever its size (3.4 MB at -v4 for a
    100-task tree), no thread is woken and the file is not opened again
    to find that out.
    """
    try:
        st = os.stat(log.path.name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        st = None
    if st is not None and _same_file(st, log.fd):
        return  # a dump: criu wrote into the daemon's log itself, nothing to move
    if st is not None and st.st_size > _INLINE_LOG_MAX:
        await asyncio.to_thread(_collect_log, dir_fd, log)
    else:
        _collect_log(dir_fd, log)


def _same_file(st: os.stat_result, fd: int) -> bool:
    other = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (other.st_dev, other.st_ino)


def _write_pid(procs_file: str, pid: int) -> None:
    """Move pid into the cgroup whose cgroup.procs this is."""
    fd = os.open(procs_file, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, str(pid).encode())
    finally:
        os.close(fd)


def _join_cgroups(procs_files: tuple[str, ...]) -> None:
    """In the child before exec: move this process into each cgroup ("0" is self)."""
    for path in procs_files:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, b"0")
        finally:
            os.close(fd)


class Criu:
    """Spawns criu.  One instance per daemon."""

    def __init__(
        self, path: str, timeout_s: float | None = None, gone_grace_s: float = 10.0
    ) -> None:
        resolved = shutil.which(path) if os.sep not in path else path
        self.path = resolved or path
        # The longest a criu run may take (None: no bound); then it is killed.
        self.timeout_s = timeout_s
        # How long criu may go on once the process it dumps has died.  criu
        # kills a tree itself when a dump without leave_running is done, and
        # exits at once; a target killed mid-dump can leave criu waiting
        # forever (seen once here, in a CI run; criu issues 162 and 2618
        # report such hangs in wait4).
        self.gone_grace_s = gone_grace_s
        self.version: str | None = None
        self.setpriv = shutil.which("setpriv")
        # Without CAP_SYS_RESOURCE (some VMs drop it from the bounding set),
        # root's criu cannot dump another uid's tree ("Can't get rlimit"):
        # such trees are dumped and restored as their owner, --unprivileged.
        self.unprivileged_for_users = not has_cap(CAP_SYS_RESOURCE)
        self.features: dict[str, bool] = {}
        # What each mode (lazy_restore, pre_dump, ...) can do here, probed at
        # start-up by criud.daemon.kprobe; empty until then.
        self.supports: dict[str, kprobe.Capability] = {}
        # Pids of criu processes we spawned and have not reaped yet: the
        # orphan reaper must leave them to asyncio's child watcher.
        self.running: set[int] = set()
        # Entered around each spawn, until the pid is in `running`; the daemon
        # points it at Reaper.hold so no sweep sees an unnamed child.
        self.spawn_guard: Callable[[], contextlib.AbstractContextManager[object]] = (
            contextlib.nullcontext
        )
        # Pre-started `criu swrk` workers (start_pool); None: every run is the CLI.
        self.pool: criu_rpc.WarmPool | None = None
        # Workers that answered a dump and are still exiting.
        self._reaping = childproc.Reaper(self.running.discard)
        # Workers started for fd handles (prestart); None without a pool.
        self.handle_workers: criu_rpc.HandleWorkers | None = None

    def start_pool(self, size: int) -> None:
        """Keep size warm criu workers ready (0: none); they start in the background."""
        if size <= 0 or self.pool is not None:
            return
        from criud.daemon import criu_rpc  # here, not at import: see TYPE_CHECKING above

        async def spawn(cmd: Sequence[str], fds: Sequence[int]) -> childproc.Proc:
            # Before any request the worker logs nothing worth keeping;
            # each request names its own log (see _warm).
            return await self._spawn_worker(cmd, fds)

        self.pool = criu_rpc.WarmPool(
            size,
            # Under setpriv --pdeathsig KILL, as every criu run: an idle
            # worker dies with the daemon, SIGKILL included.  The exec
            # costs nothing on a request's path.
            lambda fd: wrap_argv(self.setpriv, self.path, ["swrk", str(fd)], None),
            spawn,
            self.running.discard,
        )
        self.pool.fill()

        async def spawn_holding(cmd: Sequence[str], fds: Sequence[int]) -> childproc.Proc:
            # On the loop, not from a thread: the handle's fds could be
            # closed (the handle deleted) and their numbers reused while a
            # thread forks, and the worker would hold a stranger's fd.
            dn = asyncio.subprocess.DEVNULL
            return await self._spawn(cmd, dn, dn, fds)

        self.handle_workers = criu_rpc.HandleWorkers(
            HANDLE_WORKERS_MAX,
            lambda fd: wrap_argv(self.setpriv, self.path, ["swrk", str(fd)], None),
            spawn_holding,
            self.running.discard,
        )

    def prestart(self, handle: str, fds: Sequence[int]) -> None:
        """Start a root worker holding exactly an fd handle's fds, for its restore to take."""
        if self.handle_workers is not None and not self.handle_workers.start(handle, fds):
            log.debug(
                "fd handle %s: no worker of its own (%d run already)", handle, HANDLE_WORKERS_MAX
            )

    def drop_held(self, handle: str) -> None:
        """An fd handle ended: kill its worker, if it has one."""
        if self.handle_workers is not None:
            self.handle_workers.drop(handle)

    async def close_pool(self) -> None:
        """Kill and reap the idle workers and the handles' workers; later runs use the CLI."""
        pool, self.pool = self.pool, None
        held, self.handle_workers = self.handle_workers, None
        if pool is not None:
            await pool.close()
        if held is not None:
            await held.close()
        # Answered workers exit on their own within a millisecond.
        await self._reaping.drain()

    async def _capture(self, *args: str) -> tuple[int, str]:
        proc = await self._spawn(
            [self.path, *args], asyncio.subprocess.PIPE, asyncio.subprocess.STDOUT
        )
        try:
            out, _ = await proc.communicate()
        finally:
            self.running.discard(proc.pid)
        return proc.returncode or 0, out.decode("utf-8", "replace")

    async def probe(self) -> None:
        """Learn criu's version and features; raise CriuUnavailable if it cannot work."""
        rc, out = await self._capture("--version")
        if rc != 0:
            raise CriuUnavailable(f"`{self.path} --version` exited {rc}: {out.strip()[:200]}")
        self.version = parse_version(out)
        rc, out = await self._capture("check", "--no-default-config")
        if rc != 0:
            tail = " | ".join(out.strip().splitlines()[-3:])
            raise CriuUnavailable(f"`{self.path} check` failed (exit {rc}): {tail}")
        results = await asyncio.gather(
            *(self._capture("check", "--no-default-config", "--feature", f) for f in FEATURES)
        )
        self.features = {f: rc == 0 for f, (rc, _) in zip(FEATURES, results, strict=True)}

    async def spawn_plain(
        self, cmd: Sequence[str], start_new_session: bool = False, capture: bool = False
    ) -> asyncio.subprocess.Process:
        """Start cmd as a child we own (in `running`, reaped by end()): probes, helpers.

        stdin and stdout are /dev/null unless capture (stdout and stderr piped).
        """
        out = asyncio.subprocess.PIPE if capture else asyncio.subprocess.DEVNULL
        err = asyncio.subprocess.STDOUT if capture else asyncio.subprocess.DEVNULL
        return await self._spawn(cmd, out, err, (), {"start_new_session": start_new_session})

    async def end(self, proc: asyncio.subprocess.Process) -> None:
        """Kill proc if it still runs, reap it, and forget it."""
        try:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            await asyncio.shield(proc.wait())
        finally:
            self.running.discard(proc.pid)

    async def start_server(
        self,
        argv: Sequence[str],
        log: LogFile,
        pass_fds: Sequence[int],
        run_as: RunAs | None,
        ready_s: float = 10.0,
    ) -> asyncio.subprocess.Process:
        """Start a criu that serves others (`lazy-pages`); return once it says it is ready.

        Always the CLI path: criu's RPC has no lazy-pages request, and the
        server must outlive the request that starts it.  criu writes one
        byte to its --status-fd once it listens; EOF (it exited) or no byte
        within ready_s is a failure: the server is killed and reaped, and
        CriuFailed carries the log's first error.  The caller owns the
        process from here (end() kills and reaps it).
        """
        self._check_executable()
        r, w = os.pipe()
        try:
            cmd = wrap_argv(self.setpriv, self.path, [*argv, "--status-fd", str(w)], run_as)
            proc = await self._spawn(cmd, log.fd, log.fd, [*pass_fds, w])
        except BaseException:
            os.close(r)
            raise
        finally:
            os.close(w)
        try:
            # The read returns the byte, or EOF once criu (the only other
            # holder of w) exits, or when end() below kills it.
            ready = asyncio.ensure_future(asyncio.to_thread(os.read, r, 1))
            done, _ = await asyncio.wait({ready}, timeout=ready_s)
            if ready in done and ready.result():
                return proc
            await self.end(proc)
            await ready
            err, tail, _ = await asyncio.to_thread(read_log_fd, log.fd)
            raise CriuFailed(
                f"criu {argv[0]} did not start: {err or 'no error logged'} (log: {log.path})",
                log_tail=tail,
            )
        except BaseException:
            await self.end(proc)
            raise
        finally:
            os.close(r)

    async def run(
        self,
        argv: Sequence[str],
        log: LogFile,
        pass_fds: Sequence[int] = (),
        run_as: RunAs | None = None,
        cgroup_procs: Sequence[str] = (),
        watch_pid: int | None = None,
        on_spawn: Callable[[int], Awaitable[None]] | None = None,
        held: Held | None = None,
    ) -> CriuResult:
        """Run `criu *argv`, logging to log.fd, handing over exactly pass_fds.

        watch_pid is the process a dump works on: once it is gone, criu gets
        gone_grace_s to finish before it is killed (CriuResult.stopped).
        on_spawn is awaited with criu's pid once it runs (a restore records
        it, so a daemon killed mid-restore can find what criu left).  held:
        a restore's fds from one fd handle, whose own worker may serve it.

        The child's stdin is /dev/null and its stdout/stderr are log.fd,
        which criu logs to with `-o -`: the daemon opened the file itself, so
        criu (maybe running as the tree's owner) never opens a log by path
        and nothing is chowned.  close_fds=True closes everything else: the
        daemon's sockets, SQLite and other handles' fds never reach criu or
        the tree it restores.  log.fd stays the caller's to close.
        """
        self._check_executable()
        log_fd = log.fd
        warm = await self._warm_any(argv, log, pass_fds, run_as, held)
        target = _pidfd_of(watch_pid)
        if warm is not None:
            return await self._run_warm(*warm, log, target, cgroup_procs, on_spawn)
        cmd = wrap_argv(self.setpriv, self.path, argv, run_as)
        extra: dict[str, object] = {}
        if cgroup_procs:
            # A restored tree inherits criu's cgroups when its image carries
            # none: put criu there before exec.  Only this path pays for a
            # preexec_fn (fork instead of vfork, ~2 ms).
            extra["preexec_fn"] = functools.partial(_join_cgroups, tuple(cgroup_procs))
        try:
            proc = await self._spawn(cmd, log_fd, log_fd, pass_fds, extra)
        except BaseException:
            if target is not None:
                os.close(target)
            raise
        rc, stopped = await self._supervise(proc, target, on_spawn)
        assert rc is not None  # no answer socket: it has exited
        return await _result(rc, log, stopped)

    async def run_notified(
        self,
        argv: Sequence[str],
        log: LogFile,
        notify: criu_rpc.Notify,
        watch_pid: int | None = None,
    ) -> CriuResult | None:
        """Run a root dump on a warm worker, awaiting notify(action) at each of criu's stops.

        criu's RPC stops a dump at named points (`notify_scripts`: "pre-dump",
        "query-ext-files" once the tree is frozen, "post-dump" once the images
        are written and before the tree is killed or resumed) and waits for
        the answer: notify's False fails the dump there, and criu resumes
        the tree.  None: no warm worker could take the run and nothing ran
        (the CLI has no such stops; the caller goes its own way).
        """
        self._check_executable()
        warm = self._warm(argv, log, (), None)
        if warm is None:
            return None
        w, req, dir_fd = warm
        req.req.opts.notify_scripts = True
        return await self._run_warm(w, req, dir_fd, log, _pidfd_of(watch_pid), (), None, notify)

    def _check_executable(self) -> None:
        # Under setpriv a missing criu is setpriv's exit 127, not an OSError
        # at the spawn: checked first, it stays a clear criu_unavailable.
        if not os.access(self.path, os.X_OK):
            raise CriuUnavailable(f"cannot run criu at {self.path}: not an executable file")

    def _warm(
        self, argv: Sequence[str], log_file: LogFile, pass_fds: Sequence[int], run_as: RunAs | None
    ) -> tuple[criu_rpc.Worker, criu_msg.Request, int] | None:
        """A warm worker and the run as its request (+ the log dir's fd), or None: the CLI.

        The CLI path stays for (each logged at debug level with its reason):
        a run as the tree's owner (a pre-started worker is root's, and the
        owner's criu could not open the root daemon's /proc/<pid>/fd that
        RPC names dirs by); whatever criu_msg.to_request refuses (inherit
        fds: a pool worker cannot hold them, only an fd handle's own worker
        can, see _warm_any); a log dir anyone but root can
        write (criu opens its RPC log by name there); no idle worker.
        """
        if self.pool is None:
            return None
        why = self._warm_refusal(argv, log_file, pass_fds, run_as)
        if isinstance(why, tuple):
            req, dir_fd = why
            w = self.pool.take()
            if w is not None:
                return w, req, dir_fd
            os.close(dir_fd)
            why = "no idle warm worker"
        log.debug("criu %s: CLI path: %s", argv[0] if argv else "?", why)
        return None

    async def _warm_any(
        self,
        argv: Sequence[str],
        log_file: LogFile,
        pass_fds: Sequence[int],
        run_as: RunAs | None,
        held: Held | None,
    ) -> tuple[criu_rpc.Worker, criu_msg.Request, int] | None:
        """A worker and the run as its request (+ the log dir's fd), or None: the CLI.

        The run's fd handle's own worker (prestart) if it holds exactly the
        fds the run hands over; else what _warm gives.
        """
        if held is None or self.handle_workers is None:
            return self._warm(argv, log_file, pass_fds, run_as)
        why = self._warm_refusal(argv, log_file, pass_fds, run_as, held.origin)
        if isinstance(why, tuple):
            req, dir_fd = why
            try:
                # Awaits the worker's spawn if it is still under way (a turn or two of the loop).
                w = await self.handle_workers.take(held.handle, set(held.origin.values()))
            except BaseException:
                os.close(dir_fd)
                raise
            if w is not None:
                log.debug("criu restore: fd handle's own warm worker (pid %d)", w.proc.pid)
                return w, req, dir_fd
            os.close(dir_fd)
            why = "the fd handle has no worker holding exactly its fds"
        log.debug("criu %s: not the fd handle's worker: %s", argv[0] if argv else "?", why)
        return self._warm(argv, log_file, pass_fds, run_as)

    @staticmethod
    def _warm_refusal(
        argv: Sequence[str],
        log_file: LogFile,
        pass_fds: Sequence[int],
        run_as: RunAs | None,
        held: Mapping[int, int] | None = None,
    ) -> tuple[criu_msg.Request, int] | str:
        """The request and its log dir's fd, or why the run must take the CLI path."""
        if run_as is not None:
            return "runs as the tree's owner"
        if "--lazy-pages" in argv:
            # A lazy restore meets its lazy-pages server through a socket in
            # its -W dir, which the CLI's argv names as is.
            return "a lazy restore"
        # Here, not at import (see TYPE_CHECKING above); the first warm
        # run pays protobuf's import, about 14 ms, once.
        from criud.daemon import criu_msg

        req = criu_msg.to_request(argv, pass_fds, log_file.path.name, held)
        if isinstance(req, str):
            return req
        dir_fd = _log_dir_fd(req)
        if isinstance(dir_fd, str):
            return dir_fd
        return req, dir_fd

    async def _run_warm(
        self,
        w: criu_rpc.Worker,
        req: criu_msg.Request,
        dir_fd: int,
        log_file: LogFile,
        target: int | None,
        cgroup_procs: Sequence[str],
        on_spawn: Callable[[int], Awaitable[None]] | None,
        notify: criu_rpc.Notify | None = None,
    ) -> CriuResult:
        """Serve the run on a warm worker; the result as the CLI run would have given it.

        With notify, criu's notifications (run_notified) are answered with
        what it returns while the wait goes on; the first other message is
        the reply.
        """
        from criud.daemon import criu_msg, criu_rpc  # loaded by _warm_refusal, start_pool

        async def started(pid: int) -> None:
            # The worker, not a child before exec, joins the cgroups: the
            # restored tree inherits them from it, as from the CLI's criu.
            for path in cgroup_procs:
                _write_pid(path, pid)
            await criu_msg.exchange(w, req.req)
            # Recorded while criu works, as on the CLI path (where criu
            # starts before on_spawn runs): a restore's record update costs
            # a store round trip that the request should not wait for.
            if on_spawn is not None:
                await on_spawn(pid)

        # A dump is done when criu answers: its images and stats are closed
        # before the reply, and the worker's exit is reaped in the
        # background.  A restore waits for the exit, since the restored
        # root becomes the daemon's child (to adopt) only when criu is gone.
        dump = req.is_dump
        talk = criu_msg.Talk(w, notify)
        try:
            rc, stopped = await self._supervise(
                w.proc, target, started, answer=w.sock if dump else None, on_answer=talk.heard
            )
            resp = talk.reply if talk.replied else criu_msg.reply(w)
            if resp is None and rc is None:
                # Woken without a reply: the worker died (or broke) mid-request.
                rc = await self._exit_of(w.proc)
            ok = resp is not None and resp.success
            if ok and req.pidfile is not None and req.work_dir_fd is not None:
                assert resp is not None
                criu_rpc.write_pidfile(req.work_dir_fd, req.pidfile, resp.restore.pid)
            await _collect_log_soon(dir_fd, log_file)
        finally:
            w.sock.close()
            os.close(dir_fd)
            if self.pool is not None:
                self.pool.fill()
        if ok:
            return await _result(0, log_file, stopped)
        # A worker that answered "failed" exits 0 or 1; one that never
        # answered was killed (rc < 0) or broke: never a success.
        return await _result(rc if rc else 1, log_file, stopped, resp.cr_errmsg if resp else "")

    async def _supervise(
        self,
        proc: childproc.Proc,
        target: int | None,
        on_spawn: Callable[[int], Awaitable[None]] | None,
        answer: socket.socket | None = None,
        on_answer: Callable[[], Awaitable[bool]] | None = None,
    ) -> tuple[int | None, str | None]:
        """Wait for criu (killing it if the target goes or time runs out); (rc, why stopped).

        target (a pidfd of the dumped process, or None) is closed here.
        With answer (a warm worker's socket), the wait also ends when the
        worker's reply is there: rc is then None, and the worker's exit is
        reaped in the background.
        """
        try:
            if on_spawn is not None:
                await on_spawn(proc.pid)
            stopped = await self._wait(proc, target, answer, on_answer)
            rc = proc.returncode
        except BaseException:
            # The caller gave up (shutdown, client gone) or on_spawn failed:
            # never leave a criu behind.  A killed dump leaves its target
            # running (measured).
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await asyncio.shield(proc.wait())
            raise
        finally:
            if proc.returncode is None:
                self._reaping.reap(proc)
            else:
                self.running.discard(proc.pid)
            if target is not None:
                os.close(target)
        return rc, stopped

    async def _exit_of(self, proc: childproc.Proc) -> int:
        """The exit status of a worker that hung up without answering (killed if it lingers)."""
        try:
            async with asyncio.timeout(5.0):
                return await asyncio.shield(proc.wait())
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            return await proc.wait()

    async def _spawn(
        self,
        cmd: Sequence[str],
        stdout: int,
        stderr: int,
        pass_fds: Sequence[int] = (),
        extra: dict[str, object] | None = None,
    ) -> asyncio.subprocess.Process:
        """Start criu with exactly pass_fds (stdin /dev/null); its pid joins `running`."""
        with self.spawn_guard():
            try:
                proc = await asyncio.create_subprocess_exec(
                    *cmd,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=stdout,
                    stderr=stderr,
                    pass_fds=tuple(pass_fds),
                    close_fds=True,
                    **(extra or {}),  # type: ignore[arg-type]
                )
            except OSError as e:
                raise self._spawn_error(e) from e
            self.running.add(proc.pid)
        return proc

    async def _spawn_worker(self, cmd: Sequence[str], pass_fds: Sequence[int]) -> childproc.Proc:
        """Start a warm worker from a thread (criud.daemon.childproc); its pid joins `running`.

        Workers are started right after a request's criu has answered,
        while the request is still being answered: on the loop, the spawn
        would stall it (criud.daemon.childproc says by how much).
        """
        with self.spawn_guard():
            try:
                child = await childproc.start(cmd, pass_fds)
            except OSError as e:
                raise self._spawn_error(e) from e
            self.running.add(child.pid)
        return child

    def _spawn_error(self, e: OSError) -> Exception:
        """A failed spawn as the caller's error: out of fds (503), or no usable criu."""
        return out_of_fds(e) or CriuUnavailable(f"cannot run criu at {self.path}: {e.strerror}")

    async def _wait(
        self,
        proc: childproc.Proc,
        target: int | None,
        answer: socket.socket | None = None,
        on_answer: Callable[[], Awaitable[bool]] | None = None,
    ) -> str | None:
        """Wait for criu (or its answer on answer); kill it past the timeout, or past
        the grace once target died.

        on_answer, awaited each time answer is readable, says whether that
        was the answer (True) or a message the wait goes on after (False).
        Returns why it was killed ("timeout", "target_gone"), or None.
        """
        loop = asyncio.get_running_loop()
        exited = asyncio.ensure_future(proc.wait())
        # Readers set these; "answered" is made anew after each message
        # the wait goes on after.
        wake: dict[str, asyncio.Future[None]] = {
            "gone": loop.create_future(),
            "answered": loop.create_future(),
        }
        if target is not None:
            loop.add_reader(target, _wake, wake, "gone")
        if answer is not None:
            loop.add_reader(answer.fileno(), _wake, wake, "answered")
        deadline = None if self.timeout_s is None else loop.time() + self.timeout_s
        why: str | None = None
        try:
            watch_gone = True
            while not exited.done():
                left = None if deadline is None else max(0.0, deadline - loop.time())
                waiting = {exited, wake["answered"], *((wake["gone"],) if watch_gone else ())}
                done, _ = await asyncio.wait(
                    waiting, timeout=left, return_when=asyncio.FIRST_COMPLETED
                )
                if wake["answered"] in done and on_answer is not None and not await on_answer():
                    wake["answered"] = loop.create_future()
                    continue
                if exited in done or wake["answered"] in done:
                    break
                if watch_gone and wake["gone"] in done:
                    watch_gone = False
                    grace = loop.time() + self.gone_grace_s
                    deadline = grace if deadline is None else min(deadline, grace)
                    why = "target_gone"
                    continue
                # The deadline passed (the overall one, or the grace).
                return await _kill_late(proc, exited, why or "timeout")
            return None
        finally:
            if target is not None:
                loop.remove_reader(target)
            if answer is not None:
                loop.remove_reader(answer.fileno())
            if not exited.done():
                exited.cancel()
