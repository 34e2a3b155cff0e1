"""The daemon's service: what the API can ask of it, without HTTP.

A thin facade.  Each mutating call passes the shutdown gate and the
caller's operation quota (`_operation`), is written to the audit log
(`_audited`), and hands the work to its job: criud.dump.job for a
checkpoint, criud.restore.job for a restore, each given this service as its
runtime.  Reads (get, list, logs) and deletes are here, as are the locks
the jobs take (a pid being dumped, a checkpoint being restored or deleted).
Children belong to the supervisor (criud.daemon.supervisor), records to the
store.  Nothing here blocks the event loop.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import functools
import logging
import os
import platform
import pwd
import resource
import shutil
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from criud.daemon import (
    events,
    imgdir,
    kdat,
    kprobe,
    logfmt,
    names,
    operations,
    procutil,
    retention,
)
from criud.daemon.audit import AuditLog
from criud.daemon.caller import Caller
from criud.daemon.config import Settings
from criud.daemon.criu import Criu
from criud.daemon.errors import (
    Busy,
    CheckpointNotFound,
    CheckpointNotReady,
    ClientGone,
    CriudError,
    FilterRequired,
    InvalidRequest,
    LogNotFound,
    NoSpace,
    NotRunning,
    OperationCancelled,
    OperationEnded,
    OperationNotFound,
    PermissionDenied,
    ProcessNotFound,
    RestoreNotFound,
    ShuttingDown,
)
from criud.daemon.handles import FdHandle, HandleStore, require_unix
from criud.daemon.metrics import Metrics
from criud.daemon.operations import Operation, OperationTable, OpState, Progress
from criud.daemon.quotas import CheckpointQuota, FdBudget, Quotas, Usage
from criud.daemon.store import CheckpointRecord, RestoreRecord, Store
from criud.daemon.supervisor import Supervisor
from criud.dump import inspect as proc_inspect
from criud.dump import job as dump_job
from criud.dump import preflight as dump_preflight
from criud.dump.argv import DUMP_LOG
from criud.dump.job import TMP_PREFIX, CheckpointSpec
from criud.dump.manifest import Manifest
from criud.restore import job as restore_job
from criud.restore.argv import RESTORE_LOG
from criud.restore.job import RestoreSpec
from criud.restore.paths import PathOpener

if TYPE_CHECKING:
    # Archives and migrations load on their first request, not at start:
    # these modules and what they alone import are about 0.7 MiB of an idle
    # daemon's RSS (bench/memory_map.py pair, docs/benchmarks.md).
    from criud.daemon import archive
    from criud.dump import export as export_job
    from criud.dump import migrate as migrate_job
    from criud.restore import importer as import_job
    from criud.restore import incoming as incoming_job

log = logging.getLogger("criud.service")
T = TypeVar("T")

# The most of a criu log the API returns.
LOG_CAP = 16 << 20

__all__ = ["CheckpointSpec", "CriudService", "RestoreSpec"]


def _uid_of(owner: str) -> int | None:
    """The uid an owner names: a number as it is, a user name looked up (None: no such user)."""
    if owner.isdigit():
        return int(owner)
    try:
        return pwd.getpwnam(owner).pw_uid
    except KeyError:
        return None


def _unpublished(event: str, owner_uid: int | None, /, **data: Any) -> None:
    """EventBus.publish's stand-in with --observability off: nothing is made or kept."""


def _ckpt_summary(rec: CheckpointRecord) -> dict[str, Any]:
    return {"checkpoint": rec.id, "name": rec.name, "size_bytes": rec.size_bytes}


def _restore_summary(rec: RestoreRecord) -> dict[str, Any]:
    return {"restore": rec.id, "checkpoint": rec.checkpoint_id, "pid": rec.pid}


@functools.cache
def _own_version() -> str:
    """criud's installed version, read once: importlib.metadata scans the
    installed distributions on every call (about 45% of a GET /v1/version
    under load, measured with py-spy)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("criud")
    except PackageNotFoundError:
        return "unknown"


class CriudService:
    """Everything the API can ask of the daemon (criud.api.service.Service)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = Store(settings.db_path)
        self.criu = Criu(
            settings.criu,
            timeout_s=settings.criu_timeout_s or None,
            gone_grace_s=settings.criu_gone_grace_s,
        )
        self.handles = HandleStore()
        self.quotas = Quotas(
            settings,
            FdBudget(resource.getrlimit(resource.RLIMIT_NOFILE)[0], settings.fd_reserve),
            self.handles.usage,
        )
        # Checkpoints kept per caller: the dump path here reserves through
        # it, and so does any other path that makes a checkpoint (an import).
        self.checkpoint_quota = CheckpointQuota(settings, self._checkpoint_usage)
        self.children = Supervisor(self.store, self.criu, settings.pid_wait_s)
        self.audit = AuditLog(settings.state_dir / "audit.log")
        self.paths = PathOpener(
            settings.path_open_timeout_s, self.children.running, self.children.hold
        )
        self.events = events.EventBus()
        self.operations = OperationTable()
        self.metrics = Metrics(
            {
                "criud_restores_running": (
                    "Restored trees running now (their roots watched by the supervisor)",
                    lambda: self.children.restores_running,
                ),
                "criud_fd_handles": ("fd handles held", lambda: len(self.handles)),
                "criud_fd_handle_fds": ("fds the fd handles hold", lambda: self.handles.usage.fds),
                "criud_event_subscribers": (
                    "Readers of /v1/events now",
                    lambda: len(self.events.subscribers),
                ),
            }
        )
        self.handles.on_expire = self._handle_expired
        self.handles.on_add = self._handle_added
        self.handles.on_end = lambda h: self.criu.drop_held(h.id)
        self.children.on_exit = self._restore_exited
        self.started_at = time.time()
        self._busy_pids: set[int] = set()
        # Checkpoints in use: held alone (a delete, an export, a restore that
        # keeps its pids), or by shared holders (restores of a tree in its
        # own pid namespace, lazy restores' pins), counted.
        self._busy_excl: set[str] = set()
        self._busy_shared: collections.Counter[str] = collections.Counter()
        self._ops: set[asyncio.Task[Any]] = set()
        self.accepting = True
        self.kdat_cache = False
        # Incoming migrations (open page servers and their half-made
        # checkpoints): made with the first, see the incoming property.
        self._incoming: incoming_job.IncomingTable | None = None
        # The daemon's own namespaces, read once: introspection compares with them.
        self._daemon_ns = proc_inspect.own_namespaces()

    @property
    def incoming(self) -> incoming_job.IncomingTable:
        """The open incoming migrations (their module loads with the first)."""
        if self._incoming is None:
            from criud.restore import incoming as incoming_job

            self._incoming = incoming_job.IncomingTable()
        return self._incoming

    async def _checkpoint_usage(self, uid: int) -> Usage:
        count, size = await self.store.run(self.store.checkpoint_usage, uid)
        return Usage(count, size)

    @property
    def list_generation(self) -> int:
        """Bumped on every write to checkpoints (the API caches its list by it)."""
        return self.store.generation

    # -- lifecycle ----------------------------------------------------------------

    def prepare_dirs(self) -> None:
        """Create the state dir (0700), its checkpoints and run dirs; sync, at start-up."""
        for d in (self.settings.state_dir, self.settings.checkpoints_dir, self.settings.run_dir):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(d, 0o700)

    async def start(self) -> None:
        """Probe criu, open the store, recover from a previous run, start reaping."""
        # criu caches its kernel probe (~33 ms of every run here) only on a
        # tmpfs at its build-time RUNDIR; mount one there before the first
        # criu run (the start-up check writes the cache).  Never fatal.
        self.kdat_cache = await asyncio.to_thread(kdat.ensure_kdat_tmpfs, kdat.KDAT_DIR)
        await self.criu.probe()
        self.criu.start_pool(self.settings.criu_pool)
        await asyncio.to_thread(self.prepare_dirs)
        # Lazy restore, pre-dump, post-copy: feature checks, and real
        # attempts where a check cannot tell (criud.daemon.kprobe).
        self.criu.supports = await kprobe.probe(self.criu, self.settings.run_dir)
        await asyncio.to_thread(self.store.open)
        self.audit.start()
        ck = await self.store.run(self.store.interrupt_unfinished)
        if ck:
            log.warning("marked interrupted: checkpoints %s", ck)
        await self.children.recover()
        await asyncio.to_thread(self._remove_tmp_dirs)
        # Ids and states only: reading every full record (a manifest each)
        # cost start-up time and left the daemon's heap the larger for it.
        states = await self.store.run(self.store.checkpoint_states)
        await asyncio.to_thread(self._reconcile_dirs, states)
        await self.children.start()

    def _remove_tmp_dirs(self) -> None:
        for entry in os.scandir(self.settings.checkpoints_dir):
            if entry.name.startswith(TMP_PREFIX) and entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
        # Run dirs of restores a previous daemon did not finish (rmtree never
        # follows a link, whoever owns what is inside).
        try:
            imgdir.clear_dir(self.settings.run_dir)
        except OSError as e:
            log.warning("cannot clear %s: %s", self.settings.run_dir, e)

    def _reconcile_dirs(self, states: dict[str, str]) -> None:
        """Make the checkpoints dir agree with the records after a crash.

        A dir with no record (the daemon died between mkdir and insert, or a
        record was deleted and the rmtree did not finish) is removed.  A
        checkpoint that is not done keeps only its criu logs: its images were
        never complete.
        """
        for entry in os.scandir(self.settings.checkpoints_dir):
            if entry.name.startswith(TMP_PREFIX) or not entry.is_dir(follow_symlinks=False):
                continue
            state = states.get(entry.name)
            if state is None:
                shutil.rmtree(entry.path, ignore_errors=True)
            elif state != "done":
                # Through the dir's fd: a dir of the previous release may
                # be a user's, with anything planted in it.
                try:
                    fd = imgdir.open_dir(Path(entry.path))
                    try:
                        imgdir.keep_only(fd, (DUMP_LOG, RESTORE_LOG))
                    finally:
                        os.close(fd)
                except OSError as e:
                    log.warning("cannot clean %s: %s", entry.path, e)

    async def stop(self) -> None:
        """Stop accepting work, let running operations finish (bounded), then close."""
        self.accepting = False
        if self._ops:
            _, pending = await asyncio.wait(self._ops, timeout=self.settings.shutdown_grace_s)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._incoming is not None:
            from criud.restore import incoming as incoming_job

            for inc in list(self._incoming.items.values()):
                with contextlib.suppress(Exception):
                    await incoming_job.abort(self, self._incoming, inc)
        self.handles.close_all()
        await self.criu.close_pool()
        await self.children.stop(self.settings.shutdown_grace_s)
        # What is still unsettled is left as dumping/restoring: the next
        # start marks it interrupted.
        await self.store.stop_settling()
        await asyncio.to_thread(self.store.close)
        await asyncio.to_thread(self.audit.stop)

    # -- the gate, the audit, the locks ---------------------------------------------

    def _operation(self, op: Operation, coro: Coroutine[Any, Any, Any], caller: Caller) -> None:
        """Start coro as op's task, one the shutdown path waits for (caller's quota permitting)."""
        if not self.accepting:
            coro.close()
            raise ShuttingDown("the daemon is shutting down; retry against the next one")
        try:
            self.quotas.begin_op(caller.uid)
        except CriudError:
            coro.close()
            raise
        task = asyncio.ensure_future(coro)
        self._ops.add(task)
        task.add_done_callback(self._ops.discard)
        # Counted until the task ends, not the request: a client that goes
        # away leaves its operation running, and in its quota.
        task.add_done_callback(lambda _: self.quotas.end_op(caller.uid))
        op.task = task
        self.operations.add(op)

    def _submit(
        self,
        kind: str,
        caller: Caller,
        target: dict[str, Any],
        job: Callable[[], Awaitable[T]],
        summary: Callable[[T], dict[str, Any]],
    ) -> Operation:
        """Start an operation in the background: its task audits and observes the job."""
        op = Operation(names.new_id(), kind, caller.uid, target)

        def audited() -> Awaitable[T]:
            # The job's coroutine is made only once the gate has let it in.
            return self._audited(kind, caller, target, job(), lambda r: getattr(r, "id", ""))

        try:
            self._operation(op, self._observed(op, audited, summary), caller)
        except CriudError as e:
            self.record(kind, caller, target, e.code, detail=e.detail)
            raise
        return op

    async def _wait(self, op: Operation) -> Any:
        """The operation's result, waited for; a client that goes away does not end it."""
        assert op.task is not None
        try:
            return await asyncio.shield(op.task)
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if op.state is OpState.CANCELLED and not (me is not None and me.cancelling()):
                # Cancelled by DELETE /v1/operations/{id}, not this request ending.
                assert op.error is not None
                raise op.error from None
            raise

    def record(
        self, action: str, caller: Caller, target: dict[str, Any], outcome: str, **extra: Any
    ) -> None:
        """Write one audit entry for a mutating call."""
        self.audit.record(
            action=action,
            uid=caller.uid,
            pid=caller.pid,
            transport="tcp" if caller.via_tcp else "unix",
            target=target,
            outcome=outcome,
            **extra,
        )

    async def _audited(
        self,
        action: str,
        caller: Caller,
        target: dict[str, Any],
        coro: Awaitable[T],
        result_id: Callable[[T], str] | None = None,
    ) -> T:
        """Await coro and record its outcome in the audit log."""
        try:
            try:
                result = await coro
            except OSError as e:
                if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                # The daemon's own writes (dirs, logs, renames) in its state dir.
                raise NoSpace(
                    f"{action} failed: {e.strerror} ({e.filename or 'state dir'})",
                    hint="free space in the daemon's state dir and retry",
                ) from e
        except CriudError as e:
            self.record(action, caller, target, e.code, detail=e.detail)
            raise
        except BaseException as e:
            self.record(action, caller, target, "error", detail=type(e).__name__)
            raise
        extra = {"id": result_id(result)} if result_id is not None else {}
        self.record(action, caller, target, "ok", **extra)
        return result

    async def _observed(
        self,
        op: Operation,
        job: Callable[[], Awaitable[T]],
        summary: Callable[[T], dict[str, Any]],
    ) -> T:
        """Await the job with its operation's events and metrics; record how op ended.

        Runs inside the operation's task (_operation): a client that goes
        away does not end it, and the events tell how it really ended.
        """
        kind, observe = op.kind, self.settings.observability
        pub = self.events.publish if observe else _unpublished
        # This task's own context (and what it starts): its log lines carry
        # op's id, and its job's progress reports reach op.
        logfmt.current_operation.set(op.id)
        if observe:
            operations.current.set(operations.Reporter(op, self._progressed))
        pub(events.OPERATION_STARTED, op.owner_uid, operation=op.id, kind=kind, target=op.target)
        if observe:
            self.metrics.started(kind)
        t0 = time.monotonic()
        ended, state, err = events.OPERATION_FAILED, OpState.FAILED, None
        fields: dict[str, Any] = {"code": "internal_error", "detail": ""}
        result: T | None = None
        try:
            result = await job()
            ended, state, fields = events.OPERATION_DONE, OpState.DONE, summary(result)
            if observe:
                op.progress.phase = "done"
            if observe:
                self._account(op, result)
            return result
        except CriudError as e:
            err = e
            raise
        except asyncio.CancelledError:
            if op.cancel_requested:
                state = OpState.CANCELLED
                err = OperationCancelled(f"{kind} operation {op.id} was cancelled", operation=op.id)
            else:
                # Only stop() cancels otherwise, past its grace.
                err = ShuttingDown(f"the daemon stopped before {kind} operation {op.id} ended")
            raise
        except BaseException as e:
            # A bug (the audit log has it too): no more than its type leaves here.
            err = CriudError(f"{kind} operation {op.id} failed: {type(e).__name__}")
            raise
        finally:
            if err is not None:
                fields = {"code": err.code, "detail": err.detail}
            op.end(state, result, err)
            took = time.monotonic() - t0
            if observe:
                self.metrics.ended(kind, fields.get("code"), took)
            pub(ended, op.owner_uid, operation=op.id, kind=kind, duration_s=took, **fields)

    def _progressed(self, op: Operation) -> None:
        """An operation's progress changed (the Reporter's rate limit passed): publish it."""
        self.events.publish(
            events.OPERATION_PROGRESS,
            op.owner_uid,
            operation=op.id,
            kind=op.kind,
            phase=op.progress.phase,
            **op.progress.as_dict(),
        )

    def _account(self, op: Operation, result: Any) -> None:
        """A done operation's bytes (and a dump's frozen time) into the metrics."""
        if isinstance(result, CheckpointRecord):
            self.metrics.checkpointed(result.size_bytes, result.stats)
        elif isinstance(result, RestoreRecord):
            # What the restore read: the checkpoint's images, whose size it reported.
            self.metrics.restored(op.progress.bytes_total)

    def event_stream(self, caller: Caller, since: int | None) -> AsyncIterator[bytes]:
        """The caller's Server-Sent Events: root (and TCP) all of them, a user its own."""
        return self.events.stream(None if caller.is_root else caller.uid, since)

    def metrics_text(self, caller: Caller) -> tuple[bytes, str]:
        """The Prometheus exposition and its content type; root's (and TCP's, with the token)."""
        if not caller.is_root:
            raise PermissionDenied("the metrics are root's to read")
        return self.metrics.render()

    def _handle_added(self, h: FdHandle) -> None:
        """Start a worker holding the new handle's fds, where a root worker can serve its restore.

        The worker is root's criu: it serves trees root's criu restores.
        Root's handles, then, and anyone's where root's criu restores every
        tree.  Where it lacks CAP_SYS_RESOURCE (this kind of VM) a user's
        tree is restored by criu run as its owner, on the CLI path (the
        owner's criu cannot open the root daemon's /proc/<pid>/fd that RPC
        names dirs by), and a user's handle gets no worker.
        """
        if h.owner_uid == 0 or not self.criu.unprivileged_for_users:
            self.criu.prestart(h.id, h.owned.fds)

    def _handle_expired(self, h: FdHandle) -> None:
        self.events.publish(events.FD_HANDLE_EXPIRED, h.owner_uid, handle=h.id, fds=len(h.fds))

    def _restore_exited(
        self, restore_id: str, owner: int | None, code: int | None, sig: int | None
    ) -> None:
        self.events.publish(
            events.RESTORE_EXITED, owner, restore=restore_id, exit_code=code, exit_signal=sig
        )

    @contextlib.contextmanager
    def busy_pid(self, pid: int) -> Iterator[None]:
        """Mark pid as being checkpointed for the block; Busy if it is already."""
        if pid in self._busy_pids:
            raise Busy(f"pid {pid} is being checkpointed already", pid=pid)
        self._busy_pids.add(pid)
        try:
            yield
        finally:
            self._busy_pids.discard(pid)

    @contextlib.contextmanager
    def busy(self, ckpt_id: str, message: str, shared: bool = False) -> Iterator[None]:
        """Mark a checkpoint in use (restored, deleted) for the block; Busy if it is already.

        shared holders (clones' restores) may hold it together; an exclusive
        one (a delete, an export, any other restore) only alone.
        """
        release = self._hold(ckpt_id, message, shared)
        try:
            yield
        finally:
            release()

    def pin(self, ckpt_id: str, message: str) -> Callable[[], None]:
        """A shared hold that outlives a block (a lazy restore's images); its release.

        Taken by a job inside its own busy block, so never refused: it only
        keeps the checkpoint held once that block ends.
        """
        self._busy_shared[ckpt_id] += 1
        return self._release(ckpt_id, shared=True)

    def _hold(self, ckpt_id: str, message: str, shared: bool) -> Callable[[], None]:
        if ckpt_id in self._busy_excl or (self._busy_shared[ckpt_id] and not shared):
            raise Busy(message, checkpoint=ckpt_id)
        if shared:
            self._busy_shared[ckpt_id] += 1
        else:
            self._busy_excl.add(ckpt_id)
        return self._release(ckpt_id, shared)

    def _release(self, ckpt_id: str, shared: bool) -> Callable[[], None]:
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            if not shared:
                self._busy_excl.discard(ckpt_id)
            elif self._busy_shared[ckpt_id] > 1:
                self._busy_shared[ckpt_id] -= 1
            else:
                del self._busy_shared[ckpt_id]

        return release

    # -- info and introspection -----------------------------------------------------

    def version(self) -> dict[str, Any]:
        """criud's, criu's and the kernel's versions, and what criu supports."""
        return {
            "criud": _own_version(),
            "criu": {"version": self.criu.version, "path": self.criu.path},
            "kernel": platform.release(),
            "features": dict(self.criu.features),
            "supports": {m: c.as_dict() for m, c in self.criu.supports.items()},
            "kdat_cache": self.kdat_cache,
        }

    def network_lock(self, needed: bool) -> str | None:
        """The --network-lock method a dump passes (criud.dump.job.network_lock)."""
        return dump_job.network_lock(self.criu, needed)

    async def inspect_process(self, pid: int, caller: Caller) -> proc_inspect.Tree:
        """The tree rooted at pid with every fd classified, as the caller may see it."""
        try:
            # A big tree is read partly by a forked child of ours: the orphan
            # sweep must leave that child to inspect_tree to reap.
            with self.children.hold():
                tree = await asyncio.to_thread(proc_inspect.inspect_tree, pid, self._daemon_ns)
        except ProcessLookupError:
            raise ProcessNotFound(f"no process with pid {pid}", pid=pid) from None
        if not caller.is_root:
            visible = proc_inspect.visible_to(tree, caller.uid)
            if visible is None:
                # As if it did not exist: a caller learns nothing of others' trees.
                raise ProcessNotFound(f"no process with pid {pid}", pid=pid)
            tree = visible
        return tree

    async def preflight(
        self, spec: CheckpointSpec, caller: Caller, pre_dump: bool = False
    ) -> dump_preflight.Report:
        """What would block a checkpoint of spec.pid, and which option resolves it.

        Freezes nothing and writes nothing.
        """
        if spec.name is not None:
            names.check_name(spec.name)
        tree = await self.inspect_process(spec.pid, caller)

        def free() -> int:
            st = os.statvfs(self.settings.checkpoints_dir)
            return st.f_bavail * st.f_frsize

        return dump_preflight.preflight(
            tree, spec.options, self.criu.features, await asyncio.to_thread(free), pre_dump
        )

    # -- checkpoints --------------------------------------------------------------

    async def get_checkpoint(
        self, ref: str, caller: Caller, owner: str | None = None
    ) -> CheckpointRecord:
        """A checkpoint by id, by the caller's own name, or by "owner/name".

        Names are unique per owner, and a bare name is always the caller's
        own (root's too): another user's checkpoint takes its id or its
        owner, given as "owner/ref" or as owner (a path's ?owner=).  A
        caller who may not see it gets the same 404 as for one that does
        not exist.
        """
        if owner is None:
            owner, ref = names.split_ref(ref)
        else:
            names.check_owner(owner)
            names.check_ref(ref)
        shown = ref if owner is None else f"{owner}/{ref}"
        missing = CheckpointNotFound(f"no checkpoint {shown!r}")
        if owner is None:
            uid: int | None = caller.uid
        else:
            uid = await asyncio.to_thread(_uid_of, owner)
            if uid is None or not (caller.is_root or uid == caller.uid):
                raise missing
        # Root's bare id reaches anyone's checkpoint; a name never does.
        id_owner = None if caller.is_root and owner is None else uid
        rec = await self.store.run(self.store.find_checkpoint, ref, uid, id_owner)
        if rec is None or not (caller.is_root or rec.owner_uid == caller.uid):
            raise missing
        return rec

    async def checkpoint_for(self, ref: str, caller: Caller) -> CheckpointRecord:
        """The checkpoint a restore names (the restore job's lookup)."""
        return await self.get_checkpoint(ref, caller)

    async def list_checkpoints(
        self, caller: Caller, labels: dict[str, str] | None = None
    ) -> list[CheckpointRecord]:
        """The checkpoints the caller may see, optionally only those with all these labels."""
        recs = await self.store.run(self.store.list_checkpoints, summary=True)
        out = [r for r in recs if caller.is_root or r.owner_uid == caller.uid]
        if labels:
            out = [r for r in out if all(r.labels.get(k) == v for k, v in labels.items())]
        return out

    def start_checkpoint(self, spec: CheckpointSpec, caller: Caller) -> Operation:
        """Start a dump of the tree of spec.pid in the background (?wait=false)."""
        target = {"pid": spec.pid, "name": spec.name}
        return self._submit(
            "checkpoint", caller, target, lambda: self._checkpoint_job(spec, caller), _ckpt_summary
        )

    async def _checkpoint_job(self, spec: CheckpointSpec, caller: Caller) -> CheckpointRecord:
        """The dump, inside the caller's checkpoint quota; then the per-pid retention."""
        adding = 0
        if self.checkpoint_quota.bytes_apply(caller.uid):
            # Judged before criu runs: a dump without leave_running ends
            # the tree, so one refused after it would lose the process.
            adding = (await self.preflight(spec, caller))["estimated_image_bytes"]
        async with self.checkpoint_quota.reserve(caller.uid, adding):
            rec = await dump_job.run(self, spec, caller)
        if self.settings.max_checkpoints_per_pid > 0:
            await self._keep_newest(rec, caller)
        return rec

    async def _keep_newest(self, rec: CheckpointRecord, caller: Caller) -> None:
        """Delete the owner's older checkpoints of rec's pid past --max-checkpoints-per-pid.

        Never fails the checkpoint just made: one in use is left for the
        next time, and an error is logged.
        """
        keep = self.settings.max_checkpoints_per_pid
        recs = await self.store.run(self.store.list_checkpoints, summary=True)
        for old in retention.beyond_newest(recs, rec.owner_uid, rec.pid, keep):
            target = {"checkpoint": old.id, "reason": "retention"}
            try:
                await self._remove(old, reason="retention")
            except (CriudError, OSError) as e:
                log.warning("retention: checkpoint %s kept: %s", old.id, e)
                continue
            self.record("delete_checkpoint", caller, target, "ok")

    async def checkpoint(self, spec: CheckpointSpec, caller: Caller) -> CheckpointRecord:
        """Dump the tree of spec.pid; return the done checkpoint or raise."""
        rec: CheckpointRecord = await self._wait(self.start_checkpoint(spec, caller))
        return rec

    async def delete_checkpoint(self, ref: str, caller: Caller, owner: str | None = None) -> None:
        """Delete a checkpoint's images and record."""
        target = {"checkpoint": ref, **({"owner": owner} if owner is not None else {})}
        await self._audited(
            "delete_checkpoint", caller, target, self._delete_checkpoint(ref, caller, owner)
        )

    async def _delete_checkpoint(self, ref: str, caller: Caller, owner: str | None) -> None:
        rec = await self.get_checkpoint(ref, caller, owner)
        await self._remove(rec, f"checkpoint {ref!r} is in use")

    async def _remove(
        self, rec: CheckpointRecord, in_use: str | None = None, reason: str | None = None
    ) -> bool:
        """Delete a checkpoint's images and record; Busy if a dump or a restore uses it.

        False if it was gone already (another delete got there first).
        """
        in_use = in_use or f"checkpoint {rec.name or rec.id!r} is in use"
        if rec.state == "dumping":
            raise Busy(in_use, checkpoint=rec.id)
        with self.busy(rec.id, in_use):
            # Read again under the lock: rec may be a list's, taken before.
            if await self.store.run(self.store.get_checkpoint, rec.id) is None:
                return False
            await asyncio.to_thread(shutil.rmtree, self.settings.checkpoints_dir / rec.id, True)
            await self.store.run(self.store.delete_checkpoint, rec.id)
        extra = {"reason": reason} if reason is not None else {}
        self.events.publish(
            events.CHECKPOINT_DELETED, rec.owner_uid, checkpoint=rec.id, name=rec.name, **extra
        )
        return True

    async def delete_checkpoints(
        self,
        caller: Caller,
        older_than: str | None,
        labels: list[str],
        owner: str | None = None,
    ) -> dict[str, list[dict[str, Any]]]:
        """Delete the caller's checkpoints (root: anyone's, or owner's) matching every filter.

        At least one of older_than and labels is required.  Returns the
        deleted checkpoints and the skipped ones (in use), each with why.
        """
        target: dict[str, Any] = {"older_than": older_than, "labels": labels}
        if owner is not None:
            target["owner"] = owner
        return await self._audited(
            "delete_checkpoints",
            caller,
            target,
            self._delete_checkpoints(caller, older_than, labels, owner),
            lambda r: " ".join(d["id"] for d in r["deleted"]),
        )

    async def _delete_checkpoints(
        self, caller: Caller, older_than: str | None, labels: list[str], owner: str | None
    ) -> dict[str, list[dict[str, Any]]]:
        if older_than is None and not labels:
            raise FilterRequired(
                "a bulk delete needs older_than or label (or both): "
                "an empty filter never means every checkpoint"
            )
        cutoff = None if older_than is None else retention.parse_older_than(older_than, time.time())
        f = retention.BulkFilter(
            cutoff, retention.parse_labels(labels), await self._lane(caller, owner)
        )
        recs = await self.store.run(self.store.list_checkpoints, summary=True)
        deleted: list[dict[str, Any]] = []
        skipped: list[dict[str, Any]] = []
        for rec in retention.select(recs, f):
            one = {"id": rec.id, "name": rec.name, "owner_uid": rec.owner_uid}
            try:
                if await self._remove(rec):
                    deleted.append({**one, "size_bytes": rec.size_bytes})
            except Busy as e:
                skipped.append({**one, "code": e.code, "detail": e.detail})
        return {"deleted": deleted, "skipped": skipped}

    async def _lane(self, caller: Caller, owner: str | None) -> int | None:
        """Whose checkpoints a bulk delete may reach: the caller's own; root's, anyone's."""
        if owner is None:
            return None if caller.is_root else caller.uid
        names.check_owner(owner)
        uid = await asyncio.to_thread(_uid_of, owner)
        if caller.is_root:
            if uid is None:
                raise InvalidRequest(f"owner {owner!r}: no such user")
            return uid
        if uid != caller.uid:
            raise PermissionDenied("only root may delete another owner's checkpoints")
        return uid

    async def checkpoint_log(
        self, ref: str, op: str, caller: Caller, owner: str | None = None
    ) -> str:
        """A checkpoint's criu log of op (dump or restore), as text."""
        rec = await self.get_checkpoint(ref, caller, owner)
        if op not in ("dump", "restore"):
            raise InvalidRequest("op must be dump or restore")
        name = DUMP_LOG if op == "dump" else RESTORE_LOG
        data = await asyncio.to_thread(self._read_log, rec.id, name)
        if data is None:
            raise LogNotFound(f"checkpoint {ref!r} has no {op} log")
        return data.decode("utf-8", "replace")

    def _read_log(self, ckpt_id: str, name: str) -> bytes | None:
        """A log of a checkpoint's dir, through the dir's fd: never a link, a fifo, or unbounded."""
        try:
            dfd = imgdir.open_dir(self.settings.checkpoints_dir / ckpt_id)
        except FileNotFoundError:
            return None
        try:
            return imgdir.read_small(dfd, name, LOG_CAP, tail=True)
        except FileNotFoundError:
            return None
        except imgdir.UnsafeEntry as e:
            raise imgdir.tampered(ckpt_id, e) from None
        finally:
            os.close(dfd)

    # -- archives (export, import) ------------------------------------------------------

    async def export_checkpoint(
        self, ref: str, compression: str, caller: Caller, owner: str | None = None
    ) -> archive.Export:
        """Start streaming a checkpoint as an archive (an "export" operation).

        Everything that can be refused (lookup, state, compression, a
        tampered dir, the busy lock, the quota) is, before the first byte:
        the route answers a problem then.  The checkpoint is held busy (no
        delete, no restore) until the last chunk is out.
        """
        from criud.daemon import archive
        from criud.dump import export as export_job

        rec = await self.get_checkpoint(ref, caller, owner)
        if rec.state != "done":
            raise CheckpointNotReady(f"checkpoint {ref!r} is {rec.state}", checkpoint=rec.id)
        archive.check_compression(compression)
        meta = {"criud": self.version()["criud"], "criu": self.criu.version}
        meta["kernel"] = platform.release()
        stack = contextlib.ExitStack()
        # The busy lock is let go as soon as the worker has read everything
        # (outbox.on_end), or with the rest on any other way out.
        hold = contextlib.ExitStack()
        stack.callback(hold.close)
        hold.enter_context(self.busy(rec.id, f"checkpoint {ref!r} is in use"))
        try:
            path = self.settings.checkpoints_dir / rec.id
            prep = await asyncio.to_thread(export_job.prepare, path, rec, compression, meta)
            stack.callback(prep.close)
            progress = Progress(phase="exporting", bytes_done=0, bytes_total=prep.tar_size)
            outbox = archive.Outbox(
                asyncio.get_running_loop(), stall_s=self.settings.archive_stall_s
            )
            outbox.on_end = hold.close
            op = self._submit(
                "export",
                caller,
                {"checkpoint": rec.id, "compression": compression},
                lambda: self._export(rec, prep, outbox, progress, stack),
                lambda r: {**_ckpt_summary(r), "bytes": progress.bytes_done},
            )
        except BaseException:
            stack.close()
            raise
        op.progress = progress
        return archive.Export(
            prep.filename, prep.content_length, compression, outbox.chunks(), op.id
        )

    async def _export(
        self,
        rec: CheckpointRecord,
        prep: export_job.Prepared,
        outbox: archive.Outbox,
        progress: Progress,
        stack: contextlib.ExitStack,
    ) -> CheckpointRecord:
        from criud.daemon import archive
        from criud.dump import export as export_job

        with stack:
            work = archive.in_thread(
                export_job.produce,
                prep,
                outbox,
                progress,
                self.settings.export_zstd_level,
                self.settings.export_zstd_threads,
                name="criud-export",
            )
            try:
                await asyncio.shield(work)
            except archive.Stopped:
                raise ClientGone(f"the client stopped reading the export of {rec.id}") from None
            except asyncio.CancelledError:
                # The reader learns why before the worker's own "stopped".
                outbox.finish(OperationCancelled(f"the export of {rec.id} was cancelled"))
                raise
            finally:
                # Cancelled (DELETE, shutdown): the reader's side says stop,
                # and the images dir stays open until the worker let go.
                outbox.stopped.set()
                if not work.done():
                    await asyncio.wait([work], timeout=self.settings.shutdown_grace_s)
        return rec

    async def import_archive(
        self,
        body: AsyncIterator[bytes],
        name: str | None,
        content_digest: str | None,
        digest_header: str | None,
        caller: Caller,
    ) -> CheckpointRecord:
        """Import an archive (the request body) as a new checkpoint of the caller's."""
        from criud.daemon import archive
        from criud.restore import importer as import_job

        digest = archive.parse_digest(content_digest, digest_header)
        spec = import_job.ImportSpec(
            name=name,
            digest=digest,
            limits=self.archive_limits,
            stall_s=self.settings.archive_stall_s,
        )
        progress = Progress(phase="importing", bytes_done=0)
        op = self._submit(
            "import",
            caller,
            {"name": name},
            lambda: self._import_job(spec, body, caller, progress),
            _ckpt_summary,
        )
        op.progress = progress
        rec: CheckpointRecord = await self._wait(op)
        return rec

    async def _import_job(
        self,
        spec: import_job.ImportSpec,
        body: AsyncIterator[bytes],
        caller: Caller,
        progress: Progress,
    ) -> CheckpointRecord:
        """An import, inside the caller's checkpoint quota like a dump.

        The count is judged before the body is read; the bytes once they are
        unpacked (an archive's size says little of its images'), before the
        checkpoint is committed.
        """
        from criud.restore import importer as import_job

        async with self.checkpoint_quota.reserve(caller.uid, 0) as held:
            return await import_job.run(self, spec, body, caller, progress, admit=held.resize)

    @property
    def archive_limits(self) -> archive.Limits:
        """What an imported archive may unpack to (the settings' caps)."""
        from criud.daemon import archive

        s = self.settings
        return archive.Limits(
            max_bytes=s.import_max_bytes,
            max_ratio=s.import_max_ratio,
            max_members=s.import_max_members,
        )

    # -- migrations (criud.dump.migrate: the source; criud.restore.incoming: the destination)

    def start_migration(self, spec: migrate_job.MigrationSpec, caller: Caller) -> Operation:
        """Move a tree (or a checkpoint) to another daemon, in the background."""
        from criud.dump import migrate as migrate_job

        target = {
            "pid": spec.pid,
            "checkpoint": spec.checkpoint,
            "destination": spec.target.url,
        }
        return self._submit(
            "migration",
            caller,
            target,
            lambda: migrate_job.run(self, spec, caller),
            lambda r: {"checkpoint": r.checkpoint, "destination": r.destination},
        )

    async def migrate(
        self, spec: migrate_job.MigrationSpec, caller: Caller
    ) -> migrate_job.MigrationResult:
        """Move a tree (or a checkpoint) to another daemon; the destination's checkpoint."""
        result: migrate_job.MigrationResult = await self._wait(self.start_migration(spec, caller))
        return result

    async def drop_checkpoint(self, rec: CheckpointRecord) -> None:
        """Remove a local checkpoint a migration made (its images went elsewhere)."""
        await self._remove(rec, reason="migrated")

    def export_meta(self) -> dict[str, Any]:
        """criud.json's writer fields: criud's and criu's versions, the kernel."""
        return {
            "criud": self.version()["criud"],
            "criu": self.criu.version,
            "kernel": platform.release(),
        }

    async def open_incoming(
        self, caller: Caller, name: str | None, tls: bool, local: str | None, peer: str | None
    ) -> dict[str, object]:
        """Open a one-shot page server for an incoming migration (the destination's side)."""
        from criud.restore import incoming as incoming_job

        inc = await self._audited(
            "open_incoming",
            caller,
            {"name": name, "tls": tls, "from": peer},
            incoming_job.open_incoming(self, self.incoming, caller, name, tls, local, peer),
            lambda i: i.id,
        )
        return inc.as_dict()

    async def get_incoming(self, inc_id: str, caller: Caller) -> dict[str, object]:
        """An incoming migration's state, and the bytes its page server has received."""
        from criud.restore import incoming as incoming_job

        inc = self.incoming.get(inc_id, caller)
        got = await asyncio.to_thread(incoming_job.received, self, inc)
        return {**inc.as_dict(), "bytes_received": got}

    async def commit_incoming(
        self,
        inc_id: str,
        body: AsyncIterator[bytes],
        content_digest: str | None,
        digest_header: str | None,
        caller: Caller,
    ) -> CheckpointRecord:
        """The remaining images of an incoming migration; its committed checkpoint."""
        from criud.daemon import archive
        from criud.restore import importer as import_job
        from criud.restore import incoming as incoming_job

        inc = self.incoming.get(inc_id, caller)
        spec = import_job.ImportSpec(
            name=inc.name,
            digest=archive.parse_digest(content_digest, digest_header),
            limits=self.archive_limits,
            stall_s=self.settings.archive_stall_s,
        )
        progress = Progress(phase="importing", bytes_done=0)

        async def job() -> CheckpointRecord:
            async with self.checkpoint_quota.reserve(caller.uid, 0) as held:
                return await incoming_job.commit(
                    self, self.incoming, inc, spec, body, caller, progress, admit=held.resize
                )

        op = self._submit("migration_in", caller, {"migration": inc_id}, job, _ckpt_summary)
        op.progress = progress
        rec: CheckpointRecord = await self._wait(op)
        return rec

    async def abort_incoming(self, inc_id: str, caller: Caller) -> None:
        """Abort an incoming migration: its page server killed, its dir removed."""
        from criud.restore import incoming as incoming_job

        inc = self.incoming.get(inc_id, caller)
        await self._audited(
            "abort_incoming",
            caller,
            {"migration": inc_id},
            incoming_job.abort(self, self.incoming, inc),
        )

    # -- restores -----------------------------------------------------------------

    def start_restore(self, spec: RestoreSpec, caller: Caller) -> Operation:
        """Start a restore in the background (?wait=false)."""
        target: dict[str, Any] = {"checkpoint": spec.checkpoint, "inherit_fds": len(spec.inherit)}
        if spec.stdio is not None:
            target["stdio"] = spec.stdio
        return self._submit(
            "restore", caller, target, lambda: restore_job.run(self, spec, caller), _restore_summary
        )

    async def restore(self, spec: RestoreSpec, caller: Caller) -> RestoreRecord:
        """Restore a checkpoint, handing in the mapped fds; return the running restore."""
        rec: RestoreRecord = await self._wait(self.start_restore(spec, caller))
        return rec

    async def restore_copies(self, specs: list[RestoreSpec], caller: Caller) -> list[RestoreRecord]:
        """Restore copies of one checkpoint at once (clones); all of them run, or none.

        Only a tree rooted in its own pid namespace: each copy gets a fresh
        one, so the copies' pids never collide.  Each copy is an ordinary
        restore (its own operation, record and fds); if any fails, the
        copies that did start are killed and the first failure answers.
        """
        ckpt = await self.get_checkpoint(specs[0].checkpoint, caller)
        if ckpt.state == "done" and not Manifest.from_json(ckpt.manifest).pidns_init:
            raise InvalidRequest(
                f"checkpoint {specs[0].checkpoint!r} cannot be restored in copies: its tree "
                "is not rooted in a pid namespace of its own (its pids would collide)"
            )
        results = await asyncio.gather(
            *(self.restore(s, caller) for s in specs), return_exceptions=True
        )
        done = [r for r in results if isinstance(r, RestoreRecord)]
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            for r in done:
                with contextlib.suppress(CriudError):
                    await self.signal_restore(r.id, signal.SIGKILL, caller)
            raise failed[0]
        return done

    # -- operations ---------------------------------------------------------------

    def get_operation(self, op_id: str, caller: Caller) -> Operation:
        """One operation the caller may see (404 as for one that does not exist otherwise)."""
        op = self.operations.get(op_id) if names.is_id(op_id) else None
        if op is None or not (caller.is_root or op.owner_uid == caller.uid):
            raise OperationNotFound(f"no operation {op_id!r}")
        return op

    def list_operations(self, caller: Caller, state: str | None = None) -> list[Operation]:
        """The operations the caller may see (the running ones, and the latest ended)."""
        return self.operations.list(
            None if caller.is_root else caller.uid, OpState(state) if state else None
        )

    async def cancel_operation(self, op_id: str, caller: Caller) -> Operation:
        """Cancel a running operation and wait (bounded) until it has unwound.

        A dump's criu is killed (the target goes on running, untraced) and
        its partial images removed; the record says failed.
        """
        target = {"operation": op_id}
        try:
            op = self.get_operation(op_id, caller)
            if op.state is not OpState.RUNNING or op.task is None:
                raise OperationEnded(f"operation {op_id} is {op.state}", state=str(op.state))
        except CriudError as e:
            self.record("cancel_operation", caller, target, e.code, detail=e.detail)
            raise
        op.cancel_requested = True
        op.task.cancel()
        await asyncio.wait([op.task], timeout=self.settings.shutdown_grace_s)
        self.record("cancel_operation", caller, target, "ok", state=str(op.state))
        return op

    async def get_restore(self, restore_id: str, caller: Caller) -> RestoreRecord:
        """One restore the caller may see (404 as for one that does not exist otherwise)."""
        if not names.is_id(restore_id):
            raise RestoreNotFound(f"no restore {restore_id!r}")
        rec = await self.store.run(self.store.get_restore, restore_id)
        if rec is None or not (caller.is_root or rec.owner_uid == caller.uid):
            raise RestoreNotFound(f"no restore {restore_id!r}")
        return rec

    async def list_restores(self, caller: Caller) -> list[RestoreRecord]:
        """The restores the caller may see."""
        recs = await self.store.run(self.store.list_restores)
        return [r for r in recs if caller.is_root or r.owner_uid == caller.uid]

    async def signal_restore(self, restore_id: str, signo: int, caller: Caller) -> RestoreRecord:
        """Signal a restored tree's root through a pidfd."""
        return await self._audited(
            "signal",
            caller,
            {"restore": restore_id, "signal": signo},
            self._signal_restore(restore_id, signo, caller),
        )

    async def _signal_restore(self, restore_id: str, signo: int, caller: Caller) -> RestoreRecord:
        rec = await self.get_restore(restore_id, caller)
        if rec.state != "running" or rec.pid is None:
            raise NotRunning(f"restore {restore_id} is {rec.state}")
        try:
            sig = signal.Signals(signo)
        except ValueError:
            raise InvalidRequest(f"unknown signal {signo}") from None
        # Signal through a pidfd checked against the recorded start time, so
        # a recycled pid is never hit.
        try:
            pidfd = procutil.pidfd_open(rec.pid)
        except ProcessLookupError:
            raise NotRunning(f"restore {restore_id} has exited") from None
        try:
            if procutil.proc_start(rec.pid) != rec.proc_start:
                raise NotRunning(f"restore {restore_id} has exited")
            signal.pidfd_send_signal(pidfd, sig)
        finally:
            os.close(pidfd)
        return rec

    # -- fd handles ---------------------------------------------------------------

    def list_handles(self, caller: Caller) -> list[FdHandle]:
        """The caller's fd handles (unix socket only)."""
        require_unix(caller)
        return self.handles.list(caller.uid)

    def delete_handle(self, handle_id: str, caller: Caller) -> None:
        """Close one of the caller's fd handles now."""
        require_unix(caller)
        target = {"handle": handle_id}
        try:
            self.handles.delete(handle_id, caller.uid)
        except CriudError as e:
            self.record("delete_handle", caller, target, e.code, detail=e.detail)
            raise
        self.record("delete_handle", caller, target, "ok")
