"""The daemon's core: checkpoints, restores and fd handles, without HTTP.

Routes in criud.api call one method here each.  Methods validate, take the
per-pid or per-checkpoint lock, run criu through criud.daemon.criu, and keep
the store's records in step.  Anything slow (criu, /proc walks, file work)
is awaited or runs in a thread: nothing here blocks the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import os
import platform
import pwd
import re
import resource
import shutil
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from criud.daemon import creds, criu_errors, imgdir, kdat, names, orphans, procutil
from criud.daemon.audit import AuditLog
from criud.daemon.caller import Caller
from criud.daemon.config import Settings
from criud.daemon.criu import Criu, CriuResult, LogFile, RunAs
from criud.daemon.errors import (
    BadFdHandle,
    Busy,
    CheckpointNotFound,
    CheckpointNotReady,
    CheckpointTampered,
    CriudError,
    CriuTimeout,
    InvalidBundle,
    InvalidCgroup,
    InvalidRequest,
    LogNotFound,
    NoSpace,
    NotRunning,
    PermissionDenied,
    PidInUse,
    ProcessGone,
    ProcessNotFound,
    RestoreNotFound,
    RestoreUnverified,
    ShuttingDown,
    WrongFdType,
)
from criud.daemon.fdpass import OwnedFds
from criud.daemon.handles import FdHandle, HandleStore
from criud.daemon.quotas import FdBudget, Quotas
from criud.daemon.reaper import Reaper
from criud.daemon.store import CheckpointRecord, NameConflict, RestoreRecord, Store
from criud.dump import fds as fdinfo
from criud.dump import images, oci
from criud.dump import inspect as proc_inspect
from criud.dump import manifest as mf
from criud.dump import preflight as dump_preflight
from criud.dump.argv import DUMP_LOG, dump_argv
from criud.dump.options import DumpOptions
from criud.restore import mappings, stdio
from criud.restore.argv import PIDFILE, RESTORE_LOG, restore_argv
from criud.restore.paths import Creds, PathOpener, PathRequest

log = logging.getLogger("criud.core")
T = TypeVar("T")

TMP_PREFIX = ".tmp-"
# Below this much free space, a criu failure without a recognisable error
# line is taken for a full disk (criu cannot write that line either).
_FULL_BYTES = 1 << 20
# Bounds on what the daemon reads from an images dir (a pstree of some
# 100,000 tasks stays far below its cap).
LOG_CAP = 16 << 20
PSTREE_CAP = 16 << 20
STATS_CAP = 1 << 20
PIDFILE_CAP = 64


@dataclasses.dataclass(frozen=True)
class CheckpointSpec:
    pid: int
    name: str | None
    options: DumpOptions
    labels: dict[str, str]
    # The OCI bundle of a runc container whose init is pid: criu options
    # are derived from its config.json as runc derives them.
    oci_bundle: str | None = None


@dataclasses.dataclass(frozen=True)
class RestoreSpec:
    checkpoint: str
    inherit: tuple[mappings.InheritSpec, ...] = ()
    # A cgroup path beneath settings.cgroup_parent to place the tree in.
    cgroup: str | None = None
    # For a checkpoint of an OCI container: the bundle to restore into (the
    # checkpoint's own when None) and the new container's name.
    oci_bundle: str | None = None
    oci_name: str | None = None
    # An fd handle of three fds for the root task's 0, 1 and 2 (criud.restore.stdio).
    stdio: str | None = None


_CGROUP_RE = re.compile(r"/?[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*/?")


def check_cgroup(path: str, parent: str) -> str:
    """Normalise a restore's cgroup path; it must lie strictly beneath parent."""
    if len(path) > 256 or _CGROUP_RE.fullmatch(path) is None:
        raise InvalidCgroup(f"cgroup {path!r}: use names of [A-Za-z0-9_.-] joined by /")
    parts = path.strip("/").split("/")
    if any(p in (".", "..") for p in parts):
        raise InvalidCgroup(f"cgroup {path!r}: no . or .. components")
    base = parent.strip("/").split("/")
    if parts[: len(base)] != base or len(parts) <= len(base):
        raise InvalidCgroup(f"cgroup {path!r} must lie beneath /{'/'.join(base)}/")
    return "/" + "/".join(parts)


def _images_for(
    path: Path, fd: int, run_as: RunAs | None, writable: bool
) -> tuple[Path, list[int]]:
    """The images dir (open at fd) as criu should name it, and the fds it must inherit.

    As root, criu takes the path.  As a tree's owner it could not traverse
    the 0700 state dir, so the dir is handed over as its open fd and named
    /proc/self/fd/N: a magic link, which needs no search permission on the
    path it came from.  writable (a dump): the dir, which the daemon made
    for this dump, is chowned to the owner; a restore reads the sealed dir.
    """
    if run_as is None:
        return path, []
    if writable:
        os.fchown(fd, run_as.uid, run_as.gid)
    return Path(f"/proc/self/fd/{fd}"), [fd]


def _tampered(ckpt_id: str, e: imgdir.UnsafeEntry) -> CheckpointTampered:
    return CheckpointTampered(
        f"checkpoint {ckpt_id}: {e}; a criu images dir holds only regular files "
        "the daemon or criu made, so it was tampered with and is not used",
        checkpoint=ckpt_id,
    )


def _parse_pid(data: bytes) -> int | None:
    """The pid in a pidfile criu wrote ("1234", no newline), or None."""
    m = re.fullmatch(rb"\s*([1-9][0-9]{0,9})\s*", data)
    return int(m.group(1)) if m else None


def _read_stats(dirfd: int, name: str) -> dict[str, int]:
    """criu's stats file `name` of dirfd as counters; {} when missing or unreadable."""
    try:
        return images.parse_stats(imgdir.read_small(dirfd, name, STATS_CAP), name)
    except (OSError, imgdir.UnsafeEntry, images.ImageError) as e:
        log.warning("cannot read %s: %s", name, e)
        return {}


def _uid_of(owner: str) -> int | None:
    """The uid an owner names: a number as it is, a user name looked up (None: no such user)."""
    if owner.isdigit():
        return int(owner)
    try:
        return pwd.getpwnam(owner).pw_uid
    except KeyError:
        return None


def _log_url(ckpt_id: str, op: str) -> str:
    return f"/v1/checkpoints/{ckpt_id}/log?op={op}"


class Core:
    """Everything the API can ask of the daemon."""

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
        self.reaper = Reaper(self.criu.running)
        self.audit = AuditLog(settings.state_dir / "audit.log")
        self.criu.spawn_guard = self.reaper.hold
        # Its children share criu's "running" set: the orphan sweep leaves them alone.
        self.paths = PathOpener(settings.path_open_timeout_s, self.criu.running, self.reaper.hold)
        self.started_at = time.time()
        self._busy_pids: set[int] = set()
        self._busy_ckpts: set[str] = set()
        self._ops: set[asyncio.Task[Any]] = set()
        self._bg: set[asyncio.Task[Any]] = set()
        # Record updates a full disk refused, retried until they land.
        self._settling: set[asyncio.Task[None]] = set()
        self.accepting = True
        self.kdat_cache = False
        # The daemon's own namespaces, read once: introspection compares with them.
        self._daemon_ns = proc_inspect.own_namespaces()

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
        await asyncio.to_thread(self.prepare_dirs)
        await asyncio.to_thread(self.store.open)
        self.audit.start()
        ck = await self.store.run(self.store.interrupt_unfinished)
        if ck:
            log.warning("marked interrupted: checkpoints %s", ck)
        await self._fail_unfinished_restores()
        await asyncio.to_thread(self._remove_tmp_dirs)
        await self._reconcile_dirs()
        self.reaper.start()
        await self._adopt_running()

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

    async def _fail_unfinished_restores(self) -> None:
        """Kill what restores a killed daemon left half-done, and fail their records.

        See criud.daemon.orphans for how the tasks are recognised and what is
        not covered (trees rooted in their own pid namespace).
        """
        for r in await self.store.run(self.store.list_restores, "restoring"):
            info = r.tree_pids or {}
            killed, left = await asyncio.to_thread(
                orphans.kill_leftovers, info, max(self.settings.pid_wait_s, 5.0)
            )
            detail = f"the daemon restarted while criu restored checkpoint {r.checkpoint_id}"
            if killed:
                detail += f"; killed the tasks it left: pids {', '.join(map(str, killed))}"
                if left:
                    detail += f" (not yet reaped: {', '.join(map(str, left))})"
            elif not info:
                # Made by the previous release, which recorded nothing to look for.
                detail += "; no pids were recorded for it, so nothing it left was looked for"
            elif info.get("pidns"):
                detail += (
                    "; its tree had a pid namespace of its own, whose host pids were never "
                    "reported: any task left behind cannot be identified and was not killed"
                )
            else:
                detail += "; it left no task behind"
            log.warning("restore %s: %s", r.id, detail)
            await self.store.run(
                self.store.update_restore,
                r.id,
                state="failed",
                finished_at=time.time(),
                error={"code": "daemon_restarted", "detail": detail, "killed_pids": killed},
            )

    async def _reconcile_dirs(self) -> None:
        """Make the checkpoints dir agree with the records after a crash.

        A dir with no record (the daemon died between mkdir and insert, or a
        record was deleted and the rmtree did not finish) is removed.  A
        checkpoint that is not done keeps only its criu logs: its images were
        never complete.
        """
        recs = {r.id: r for r in await self.store.run(self.store.list_checkpoints)}

        def sweep() -> None:
            for entry in os.scandir(self.settings.checkpoints_dir):
                if entry.name.startswith(TMP_PREFIX) or not entry.is_dir(follow_symlinks=False):
                    continue
                rec = recs.get(entry.name)
                if rec is None:
                    shutil.rmtree(entry.path, ignore_errors=True)
                elif rec.state != "done":
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

        await asyncio.to_thread(sweep)

    async def _adopt_running(self) -> None:
        """Watch again the restored trees a previous daemon left running."""
        for r in await self.store.run(self.store.list_restores, "running"):
            if r.pid is None:
                continue
            pidfd: int | None = None
            with contextlib.suppress(ProcessLookupError):
                pidfd = procutil.pidfd_open(r.pid)
            if pidfd is None or procutil.proc_start(r.pid) != r.proc_start:
                if pidfd is not None:
                    os.close(pidfd)
                await self.store.run(
                    self.store.update_restore, r.id, state="exited", finished_at=time.time()
                )
                continue
            self.reaper.watch(r.pid, pidfd, self._exit_callback(r.id))
            log.info("adopted restore %s (pid %d)", r.id, r.pid)

    async def stop(self) -> None:
        """Stop accepting work, let running operations finish (bounded), then close."""
        self.accepting = False
        if self._ops:
            _, pending = await asyncio.wait(self._ops, timeout=self.settings.shutdown_grace_s)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        self.handles.close_all()
        await self.reaper.stop()
        # What is still unsettled is left as dumping/restoring: the next
        # start marks it interrupted.
        for t in self._settling:
            t.cancel()
        await asyncio.gather(*self._settling, return_exceptions=True)
        await asyncio.to_thread(self.store.close)
        await asyncio.to_thread(self.audit.stop)

    async def _operation(self, coro: Any, caller: Caller) -> Any:
        """Run an operation as a task the shutdown path can wait for (caller's quota permitting)."""
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
        # shield: a client that goes away must not cancel criu half-way; the
        # operation finishes and its record says how it ended.
        return await asyncio.shield(task)

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

    # -- info ---------------------------------------------------------------------

    def version(self) -> dict[str, Any]:
        from importlib.metadata import PackageNotFoundError, version

        try:
            ours = version("criud")
        except PackageNotFoundError:
            ours = "unknown"
        return {
            "criud": ours,
            "criu": {"version": self.criu.version, "path": self.criu.path},
            "kernel": platform.release(),
            "features": dict(self.criu.features),
            "kdat_cache": self.kdat_cache,
        }

    def network_lock(self, needed: bool) -> str | None:
        """The --network-lock method to pass, chosen by probing.

        criu's default lock runs iptables; where iptables is absent and the
        kernel supports it, nftables is used instead.  None: pass nothing
        (no network to lock, or the default works).
        """
        if not needed or shutil.which("iptables"):
            return None
        return "nftables" if self.criu.features.get("network_lock_nftables") else None

    # -- introspection ------------------------------------------------------------

    async def inspect_process(self, pid: int, caller: Caller) -> proc_inspect.Tree:
        """The tree rooted at pid with every fd classified, as the caller may see it."""
        try:
            # A big tree is read partly by a forked child of ours: the orphan
            # sweep must leave that child to inspect_tree to reap.
            with self.reaper.hold():
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

    def _visible(self, rec: CheckpointRecord, caller: Caller) -> bool:
        return caller.is_root or rec.owner_uid == caller.uid

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
        if rec is None or not self._visible(rec, caller):
            raise missing
        return rec

    async def list_checkpoints(
        self, caller: Caller, labels: dict[str, str] | None = None
    ) -> list[CheckpointRecord]:
        recs = await self.store.run(self.store.list_checkpoints, summary=True)
        out = [r for r in recs if self._visible(r, caller)]
        if labels:
            out = [r for r in out if all(r.labels.get(k) == v for k, v in labels.items())]
        return out

    async def checkpoint(self, spec: CheckpointSpec, caller: Caller) -> CheckpointRecord:
        """Dump the tree of spec.pid; return the done checkpoint or raise."""
        target = {"pid": spec.pid, "name": spec.name}
        op = self._operation(self._checkpoint(spec, caller), caller)
        return await self._audited("checkpoint", caller, target, op, lambda r: r.id)

    async def _checkpoint(self, spec: CheckpointSpec, caller: Caller) -> CheckpointRecord:
        if spec.name is not None:
            names.check_name(spec.name)
        pid = spec.pid
        # Pin the target now: a pidfd refers to this process, not to whoever
        # reuses its pid later; the start time is checked again before criu.
        try:
            pidfd = procutil.pidfd_open(pid)
        except ProcessLookupError:
            raise ProcessNotFound(f"no process with pid {pid}", pid=pid) from None
        try:
            start = procutil.proc_start(pid)
            if start is None:
                raise ProcessNotFound(f"no process with pid {pid}", pid=pid)
            if spec.oci_bundle is not None and not caller.is_root:
                # Restoring a bundle writes mountpoints into its rootfs as root.
                raise PermissionDenied("OCI bundles are for root callers only")
            # Ownership (and uniform ids) first: a refused caller leaves no
            # record behind, and nothing is frozen.
            await self._tree_creds(pid, caller)
            if pid in self._busy_pids:
                raise Busy(f"pid {pid} is being checkpointed already", pid=pid)
            self._busy_pids.add(pid)
            try:
                return await self._dump(spec, caller, start)
            finally:
                self._busy_pids.discard(pid)
        finally:
            os.close(pidfd)

    @staticmethod
    def _oci_probe(bundle: str, pid: int) -> dict[str, Any]:
        """Read an OCI bundle and check pid is its container's init; return the record."""
        try:
            spec = oci.load_spec(bundle)
            return oci.to_record(spec, oci.probe(spec, pid))
        except oci.OciError as e:
            raise InvalidBundle(str(e), bundle=bundle) from e

    @staticmethod
    def _oci_prepare(saved: dict[str, Any], bundle: str) -> tuple[oci.OciSpec, dict[str, str]]:
        """Load the bundle to restore into, check it fits, create its mountpoints."""
        try:
            new_spec = oci.load_spec(bundle)
            oci.check_compatible(saved, new_spec)
            ns_files = oci.restore_ns_files(saved, new_spec)
            oci.ensure_mountpoints(new_spec)
        except oci.OciError as e:
            raise InvalidBundle(str(e), bundle=bundle) from e
        return new_spec, ns_files

    @staticmethod
    def _external_namespaces(
        pid: int, opts: DumpOptions, own_ns: dict[str, int], manifest: dict[str, Any]
    ) -> list[dict[str, Any]]:
        """Check the namespaces the caller wants left out; return them with inodes."""
        out: list[dict[str, Any]] = []
        fd_keys = mf.all_keys(manifest)
        for ns_type, key in opts.external_namespaces:
            if ns_type not in own_ns:
                raise InvalidRequest(
                    f"external namespace {key!r}: pid {pid} shares the daemon's {ns_type} "
                    "namespace, so there is none of its own to leave out",
                    key=key,
                )
            if key in fd_keys or any(n["key"] == key for n in out):
                raise InvalidRequest(f"external namespace key {key!r} is used twice", key=key)
            out.append({"type": ns_type, "key": key, "ino": own_ns[ns_type]})
        return out

    @staticmethod
    def _own_namespaces(pid: int) -> dict[str, int]:
        """Namespaces of the tree's root that differ from the daemon's: type -> inode."""
        mine = procutil.namespaces("self")
        theirs = procutil.namespaces(pid)
        return {ns: ino for ns, ino in theirs.items() if mine.get(ns) != ino}

    async def _tree_creds(
        self, pid: int, caller: Caller
    ) -> tuple[dict[int, creds.TaskCreds], RunAs | None]:
        """Every task's ids, checked for caller; and what criu must run as (None: root)."""
        tree = await asyncio.to_thread(creds.read_tree, pid)
        if not tree:
            raise ProcessNotFound(f"pid {pid} exited", pid=pid)
        run_as = creds.choose_run_as(
            tree, caller, not self.criu.unprivileged_for_users, f"checkpoint of pid {pid}"
        )
        return tree, run_as

    async def _dump(self, spec: CheckpointSpec, caller: Caller, start: int) -> CheckpointRecord:
        pid, opts = spec.pid, spec.options
        try:
            tasks = await asyncio.to_thread(fdinfo.read_tree, pid)
        except (ProcessLookupError, FileNotFoundError):
            raise ProcessNotFound(f"pid {pid} exited", pid=pid) from None
        # Read again after the tree walk (a task may have forked since), and
        # before the record: a refusal leaves nothing behind.
        tree_creds, run_as = await self._tree_creds(pid, caller)
        ckpt_id = names.new_id()
        rec = CheckpointRecord(
            id=ckpt_id,
            name=spec.name,
            pid=pid,
            state="dumping",
            created_at=time.time(),
            options=opts.as_dict(),
            labels=dict(spec.labels),
            owner_uid=caller.uid,
            criu_version=self.criu.version,
        )
        try:
            await self.store.run(self.store.insert_checkpoint, rec)
        except NameConflict:
            raise names_taken(spec.name) from None
        tmp = self.settings.checkpoints_dir / f"{TMP_PREFIX}{ckpt_id}"
        final = self.settings.checkpoints_dir / ckpt_id
        finished = False
        try:
            # We generated ckpt_id; mkdir (not makedirs) never follows a link
            # at the last component and fails if anything is already there.
            os.mkdir(tmp, 0o700)
            manifest = mf.build(tasks, opts.external)
            manifest["pids"] = sorted({tid for t in tasks for tid in [t.pid, *t.tids]})
            # uids, gids (all four of each, by tid), groups and run_as.
            manifest.update(creds.to_manifest(tree_creds, run_as))
            own_ns = self._own_namespaces(pid)
            manifest["namespaces"] = own_ns
            # The tree is the init of a pid namespace of its own: its image
            # pids live in that namespace and never collide with the host's.
            manifest["pidns_init"] = "pid" in own_ns and procutil.ns_pids(pid)[-1:] == [1]
            lock = self.network_lock(opts.tcp_established or "net" in own_ns)
            manifest["network_lock"] = lock
            manifest["ext_namespaces"] = self._external_namespaces(pid, opts, own_ns, manifest)
            manifest["external"] += [n["key"] for n in manifest["ext_namespaces"]]
            oci_extra: tuple[str, ...] = ()
            if spec.oci_bundle is not None:
                manifest["oci"] = await asyncio.to_thread(self._oci_probe, spec.oci_bundle, pid)
                # The bundle's arguments carry the network lock themselves.
                oci_extra = tuple(oci.dump_args_from_record(manifest["oci"], network_lock=lock))
                lock = None
            if procutil.proc_start(pid) != start:
                raise ProcessNotFound(f"pid {pid} exited (or was reused) before the dump", pid=pid)
            tmp_fd = imgdir.open_dir(tmp)
            log_fd = -1
            try:
                # The daemon's own log file, created before the dir is the
                # owner's: criu gets it as stdout and never opens it by path.
                log_fd = imgdir.create_log(tmp_fd, DUMP_LOG)
                log_st = os.fstat(log_fd)
                images_arg, keep = _images_for(tmp, tmp_fd, run_as, writable=True)
                argv = dump_argv(
                    pid,
                    images_arg,
                    opts,
                    external_unix=tuple(mf.external_unix_inodes(manifest, opts.external)),
                    external_tty=tuple(mf.external_tty_keys(manifest)),
                    network_lock=lock,
                    unprivileged=run_as is not None,
                    external_ns=tuple(
                        (n["type"], n["ino"], n["key"]) for n in manifest["ext_namespaces"]
                    ),
                    extra=oci_extra,
                )
                result = await self.criu.run(
                    argv,
                    LogFile(log_fd, tmp / DUMP_LOG),
                    pass_fds=keep,
                    run_as=run_as,
                    watch_pid=pid,
                )
                if not result.ok:
                    err = await self._criu_error(f"dump of pid {pid}", result, ckpt_id, "dump")
                    await asyncio.to_thread(self._keep_log_only, tmp, final, log_fd)
                    await self._fail_checkpoint(ckpt_id, manifest, err)
                    finished = True
                    raise err
                owner = run_as.uid if run_as is not None else 0
                expect = {DUMP_LOG: (log_st.st_dev, log_st.st_ino)}
                try:
                    size, stats = await asyncio.to_thread(
                        self._seal_dump, ckpt_id, tmp_fd, owner, expect
                    )
                except CheckpointTampered as e:
                    # Thrown away by the finally below; the record says why.
                    await self._fail_checkpoint(ckpt_id, manifest, e)
                    raise
            finally:
                if log_fd >= 0:
                    os.close(log_fd)
                os.close(tmp_fd)
            await asyncio.to_thread(os.rename, tmp, final)
            await self.store.run(
                self.store.update_checkpoint,
                ckpt_id,
                state="done",
                finished_at=time.time(),
                size_bytes=size,
                stats=stats,
                manifest=manifest,
            )
            finished = True
            log.info("checkpoint %s of pid %d: %d bytes", ckpt_id, pid, size)
        finally:
            if not finished:
                # Any other failure (or cancellation): throw the partial images
                # away and say so in the record; never list it as done.
                await asyncio.to_thread(shutil.rmtree, tmp, True)
                with contextlib.suppress(Exception):
                    await self._fail_checkpoint(ckpt_id)
        done = await self.store.run(self.store.get_checkpoint, ckpt_id)
        assert done is not None
        return done

    async def _fail_checkpoint(
        self,
        ckpt_id: str,
        manifest: dict[str, Any] | None = None,
        err: CriudError | None = None,
    ) -> None:
        """Record a dump as failed (its name freed), with what it knew and why."""
        changes: dict[str, Any] = {"state": "failed", "name": None, "finished_at": time.time()}
        if manifest is not None:
            changes["manifest"] = manifest
        if err is not None:
            changes["error"] = {"code": err.code, "detail": err.detail}
        await self._settle(self.store.update_checkpoint, ckpt_id, **changes)

    @staticmethod
    def _keep_log_only(tmp: Path, final: Path, log_fd: int) -> None:
        """After a failed dump: drop the partial images, keep criu's log.

        The log is the daemon's own file, named again in the root-only final
        dir by linking its open fd: nothing in tmp, which the owner could
        write, is opened or moved by name, and a full disk needs no copy.
        """
        os.mkdir(final, 0o700)
        dfd = imgdir.open_dir(final)
        try:
            # A dst_dir_fd makes this linkat(AT_SYMLINK_FOLLOW), which links
            # the file behind the magic link (plain link() would link the
            # /proc symlink itself and fail with EXDEV).
            os.link(f"/proc/self/fd/{log_fd}", DUMP_LOG, dst_dir_fd=dfd, follow_symlinks=True)
        except OSError as e:
            log.warning("cannot keep the log of the failed dump in %s: %s", final, e)
        finally:
            os.close(dfd)
        shutil.rmtree(tmp, ignore_errors=True)

    @staticmethod
    def _seal_dump(
        ckpt_id: str, dirfd: int, owner: int, expect: dict[str, tuple[int, int]]
    ) -> tuple[int, dict[str, int]]:
        """Seal a dumped dir (root's, read-only to others); then its size and stats.

        Only then is anything in it read: before, the owner could change it.
        """
        try:
            size = imgdir.seal(dirfd, owner, expect)
        except imgdir.UnsafeEntry as e:
            raise _tampered(ckpt_id, e) from None
        return size, _read_stats(dirfd, "stats-dump")

    async def _criu_error(self, what: str, result: CriuResult, ckpt_id: str, op: str) -> CriudError:
        """Turn a failed criu run into the error with the code and hint that name the fix."""
        rc = result.returncode
        how = f"criu was killed by {signal.Signals(-rc).name}" if rc < 0 else f"criu exited {rc}"
        reason = result.first_error or "no error line in its log"
        cls: type[CriudError]
        if result.stopped == "target_gone":
            how = (
                "the process went away, and criu, still running "
                f"{self.criu.gone_grace_s:g} s later, was killed"
            )
            cls, hint = ProcessGone, criu_errors.hint_of("process_gone")
        elif result.stopped == "timeout":
            how = f"criu ran longer than --criu-timeout ({self.criu.timeout_s:g} s) and was killed"
            cls = CriuTimeout
            hint = (
                "criu hung, or the dump needs longer than the timeout allows: read the log, "
                "and raise --criu-timeout if criu was still working"
            )
        else:
            # The whole log, not only its first error line: some causes (a
            # task killed mid-dump) show only in the lines after it.
            code, hint = await asyncio.to_thread(
                criu_errors.classify, result.first_error, result.log_lines, op
            )
            if code == criu_errors.FALLBACK and await asyncio.to_thread(self._state_dir_full):
                # criu could not even write its log's error line.
                code, hint = "no_space", criu_errors.hint_of("no_space")
            cls = criu_errors.error_class(code)
        return cls(
            f"{what} failed: {how}: {reason}",
            criu_error=result.first_error,
            hint=hint,
            exit_code=result.returncode,
            log_tail=result.log_tail,
            log_url=_log_url(ckpt_id, op),
        )

    def _state_dir_full(self) -> bool:
        """Whether the images' filesystem is (all but) full, as after a dump it filled."""
        try:
            st = os.statvfs(self.settings.checkpoints_dir)
        except OSError:
            return False
        return st.f_bavail * st.f_frsize < _FULL_BYTES or (st.f_files > 0 and st.f_favail == 0)

    async def delete_checkpoint(self, ref: str, caller: Caller, owner: str | None = None) -> None:
        """Delete a checkpoint's images and record."""
        target = {"checkpoint": ref, **({"owner": owner} if owner is not None else {})}
        await self._audited(
            "delete_checkpoint", caller, target, self._delete_checkpoint(ref, caller, owner)
        )

    async def _delete_checkpoint(self, ref: str, caller: Caller, owner: str | None) -> None:
        rec = await self.get_checkpoint(ref, caller, owner)
        if rec.state == "dumping" or rec.id in self._busy_ckpts:
            raise Busy(f"checkpoint {ref!r} is in use", checkpoint=rec.id)
        self._busy_ckpts.add(rec.id)
        try:
            await asyncio.to_thread(shutil.rmtree, self.settings.checkpoints_dir / rec.id, True)
            await self.store.run(self.store.delete_checkpoint, rec.id)
        finally:
            self._busy_ckpts.discard(rec.id)

    async def checkpoint_log(
        self, ref: str, op: str, caller: Caller, owner: str | None = None
    ) -> str:
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
            raise _tampered(ckpt_id, e) from None
        finally:
            os.close(dfd)

    # -- restores -----------------------------------------------------------------

    async def get_restore(self, restore_id: str, caller: Caller) -> RestoreRecord:
        if not names.is_id(restore_id):
            raise RestoreNotFound(f"no restore {restore_id!r}")
        rec = await self.store.run(self.store.get_restore, restore_id)
        if rec is None or not (caller.is_root or rec.owner_uid == caller.uid):
            raise RestoreNotFound(f"no restore {restore_id!r}")
        return rec

    async def list_restores(self, caller: Caller) -> list[RestoreRecord]:
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

    async def _settle(self, update: Callable[..., None], row_id: str, **changes: Any) -> None:
        """Record how an operation ended, now, or as soon as the disk has room.

        A record left "dumping" would hold its name and refuse deletion
        until a restart: when a full disk refuses the update, it is retried
        in the background (backing off to 2 s) until it lands.
        """
        try:
            await self.store.run(update, row_id, **changes)
        except NoSpace:
            log.warning(
                "%s %s: disk full; retrying the update in the background", update.__name__, row_id
            )
            task = asyncio.get_running_loop().create_task(
                self._settle_later(update, row_id, changes)
            )
            self._settling.add(task)
            task.add_done_callback(self._settling.discard)

    async def _settle_later(
        self, update: Callable[..., None], row_id: str, changes: dict[str, Any]
    ) -> None:
        delay = 0.1
        while True:
            await asyncio.sleep(delay)
            try:
                await self.store.run(update, row_id, **changes)
            except NoSpace:
                delay = min(delay * 2, 2.0)
                continue
            log.info("%s %s: settled after the disk had room", update.__name__, row_id)
            return

    def _exit_callback(self, restore_id: str) -> Any:
        def on_exit(code: int | None, sig: int | None) -> None:
            log.info("restore %s exited: code %s signal %s", restore_id, code, sig)
            task = asyncio.get_running_loop().create_task(
                self._settle(
                    self.store.update_restore,
                    restore_id,
                    state="exited",
                    finished_at=time.time(),
                    exit_code=code,
                    exit_signal=sig,
                )
            )

            # Keep a reference: the loop holds tasks only weakly.
            self._bg.add(task)
            task.add_done_callback(self._bg.discard)

        return on_exit

    async def restore(self, spec: RestoreSpec, caller: Caller) -> RestoreRecord:
        """Restore a checkpoint, handing in the mapped fds; return the running restore."""
        target = {"checkpoint": spec.checkpoint, "inherit_fds": len(spec.inherit)}
        if spec.stdio is not None:
            target["stdio"] = spec.stdio
        op = self._operation(self._restore(spec, caller), caller)
        return await self._audited("restore", caller, target, op, lambda r: r.id)

    async def _restore(self, spec: RestoreSpec, caller: Caller) -> RestoreRecord:
        # Handles are checked first: an unusable handle (unknown, expired,
        # consumed, another uid's) is wrong whatever the checkpoint.
        for h_id in [s.handle for s in spec.inherit if s.handle] + [spec.stdio or ""]:
            if h_id:
                self._no_tcp_handles(caller)
                self.handles.get(h_id, caller.uid)
        ckpt = await self.get_checkpoint(spec.checkpoint, caller)
        if ckpt.state != "done":
            raise CheckpointNotReady(f"checkpoint {spec.checkpoint!r} is {ckpt.state}")
        if ckpt.id in self._busy_ckpts:
            raise Busy(
                f"checkpoint {spec.checkpoint!r} is being restored or deleted", checkpoint=ckpt.id
            )
        manifest = ckpt.manifest or {"tasks": [], "external": []}
        # A non-root caller restores only trees that ran as itself.
        creds.check_owner(
            {int(p): u for p, u in (manifest.get("uids") or {}).items()},
            caller,
            f"restore of checkpoint {ckpt.id}",
        )
        resolved = mappings.resolve(self._with_stdio(spec, manifest, caller), manifest)
        cgroup = check_cgroup(spec.cgroup, self.settings.cgroup_parent) if spec.cgroup else None
        saved_oci = manifest.get("oci")
        if spec.oci_bundle is not None and saved_oci is None:
            raise InvalidBundle(f"checkpoint {ckpt.id} is not of an OCI container")
        if saved_oci is not None and not caller.is_root:
            raise PermissionDenied("OCI bundles are for root callers only")
        self._busy_ckpts.add(ckpt.id)
        leased: list[FdHandle] = []
        opened = OwnedFds()
        ok = False
        try:
            inherit: list[tuple[int, str]] = []
            paths: list[PathRequest] = []
            for r in resolved:
                s = r.spec
                if s.path is not None:
                    paths.append(PathRequest(s.path, s.mode or "r", s.type))
                    continue
                assert s.handle is not None and s.index is not None
                h = self.handles.get(s.handle, caller.uid)
                if not 0 <= s.index < len(h.fds):
                    raise BadFdHandle(
                        f"fd handle {s.handle!r} has {len(h.fds)} fds; "
                        f"index {s.index} is out of range",
                        handle=s.handle,
                        reason="bad_index",
                    )
                if h not in leased:
                    self.handles.lease(h)
                    leased.append(h)
                inherit.append((h.fd(s.index), r.key))
            if paths:
                fds = await self._open_paths(paths, caller)
                for fd in fds:
                    opened.add(fd)
                path_keys = [r.key for r in resolved if r.spec.path is not None]
                inherit.extend(zip(fds, path_keys, strict=True))
            self._check_fd_types(inherit, manifest)
            extra: tuple[str, ...] = ()
            if saved_oci is not None:
                bundle = spec.oci_bundle or str(saved_oci["bundle"])
                new_spec, ns_files = await asyncio.to_thread(self._oci_prepare, saved_oci, bundle)
                ns_fds = {}
                for key, path in ns_files.items():
                    try:
                        ns_fds[key] = opened.add(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
                    except OSError as e:
                        raise InvalidBundle(
                            f"cannot open {path} (namespace {key}) named by the bundle: "
                            f"{e.strerror}",
                            bundle=bundle,
                        ) from e
                try:
                    oci_cgroup = cgroup or oci.restore_cgroup_root(new_spec, spec.oci_name)
                    extra = tuple(
                        oci.restore_args(
                            saved_oci,
                            new_spec,
                            cgroup_root=oci_cgroup,
                            ns_fds=ns_fds,
                            network_lock=manifest.get("network_lock"),
                            console=oci.console_source(inherit, mf.external_tty_keys(manifest)),
                        )
                    )
                except oci.OciError as e:
                    raise InvalidBundle(str(e), bundle=bundle) from e
                inherit_extra = list(ns_fds.values())
                # The bundle's cgroup comes with its args; no criud placement.
                cgroup = None
            else:
                inherit_extra = []
            rec = await self._run_restore(ckpt, inherit, caller, cgroup, extra, inherit_extra)
            ok = True
            return rec
        finally:
            opened.close()
            for h in leased:
                self.handles.release(h, consumed=ok)
            self._busy_ckpts.discard(ckpt.id)

    def _with_stdio(
        self, spec: RestoreSpec, manifest: dict[str, Any], caller: Caller
    ) -> tuple[mappings.InheritSpec, ...]:
        """spec's mappings, plus those its stdio handle stands for."""
        if spec.stdio is None:
            return spec.inherit
        h = self.handles.get(spec.stdio, caller.uid)
        return stdio.expand(spec.inherit, spec.stdio, len(h.fds), manifest)

    @staticmethod
    def _check_fd_types(inherit: Sequence[tuple[int, str]], manifest: dict[str, Any]) -> None:
        """A namespace key needs an fd of a namespace of its type; a terminal's, a terminal."""
        stdio.check_terminals(inherit, manifest)
        for fd, key in inherit:
            ns_type = mf.namespace_type(manifest, key)
            if ns_type is None:
                continue
            got = procutil.ns_type_of(fd)
            if got != ns_type:
                what = f"a {got} namespace" if got else "no namespace"
                raise WrongFdType(
                    f"{key!r} needs an fd of a {ns_type} namespace; the fd given is {what}",
                    key=key,
                    got=got,
                )

    async def _open_paths(self, paths: Sequence[PathRequest], caller: Caller) -> list[int]:
        """Open path-form inherits in a child with the caller's uid, gid and connect-time groups.

        Root too: no caller's path is ever resolved in the daemon's own process.
        """
        return await self.paths.open(paths, Creds(caller.uid, caller.gid, caller.groups))

    @staticmethod
    def _make_cgroups(cgroup: str) -> list[str]:
        """Create cgroup in every hierarchy we place restores in; return its cgroup.procs."""
        out: list[str] = []
        for mount in procutil.cgroup_mounts():
            d = Path(mount) / cgroup.lstrip("/")
            try:
                d.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise InvalidCgroup(f"cannot create cgroup {d}: {e.strerror}") from e
            out.append(str(d / "cgroup.procs"))
        if not out:
            raise InvalidCgroup("no cgroup hierarchy with freezer, memory, pids or v2 is mounted")
        return out

    async def _wait_pids_free(self, pids: Sequence[int]) -> None:
        """Wait (bounded) for the image's pids to be gone; PidInUse if they stay."""
        deadline = time.monotonic() + self.settings.pid_wait_s
        while True:
            taken = [p for p in pids if procutil.pid_exists(p)]
            if not taken:
                return
            # Zombies of the dumped tree go away once their parent (or PID 1,
            # about once a second here) reaps them: worth waiting for.
            if time.monotonic() >= deadline:
                raise PidInUse(
                    f"pids of the checkpoint are in use: {', '.join(map(str, taken))}",
                    pids=taken,
                )
            self.reaper.sweep()
            await asyncio.sleep(0.05)

    @staticmethod
    def _orphan_plan(
        manifest: dict[str, Any], pids: Sequence[int], run_as: RunAs | None
    ) -> dict[str, Any]:
        """The restore's record of what it will create (see criud.daemon.orphans)."""
        pidns = bool(manifest.get("pidns_init"))
        # A restored task holds criu's uid until the restorer gives it its
        # own: either may be what a killed restore left.
        uids = {run_as.uid if run_as else os.getuid()}
        uids.update(u for ids in (manifest.get("uids") or {}).values() for u in ids)
        # A tree in its own pid namespace gets host pids nobody knows yet.
        return orphans.plan([] if pidns else pids, uids, pidns)

    def _criu_spawned(
        self, restore_id: str, plan: dict[str, Any]
    ) -> Callable[[int], Awaitable[None]]:
        """on_spawn for a restore's criu: add its pid and start to the record."""

        async def record(criu_pid: int) -> None:
            # Restored tasks are forked by criu, never before it started.
            info = {**plan, "criu_pid": criu_pid, "criu_start": procutil.proc_start(criu_pid)}
            await self.store.run(self.store.update_restore, restore_id, tree_pids=info)

        return record

    async def _run_restore(
        self,
        ckpt: CheckpointRecord,
        inherit: list[tuple[int, str]],
        caller: Caller,
        cgroup: str | None = None,
        extra: tuple[str, ...] = (),
        extra_fds: Sequence[int] = (),
    ) -> RestoreRecord:
        images_dir = self.settings.checkpoints_dir / ckpt.id
        manifest = ckpt.manifest or {}
        run_as = creds.run_as_of(manifest)
        try:
            images_fd = imgdir.open_dir(images_dir)
        except OSError as e:
            raise CheckpointNotReady(f"checkpoint {ckpt.id} has no images: {e.strerror}") from e
        try:
            tree = await asyncio.to_thread(self._restore_pstree, ckpt.id, images_fd, run_as)
            pids = sorted({p for t in tree for p in [t["pid"], *t["threads"]]})
            expected_root: int | None = None
            if not manifest.get("pidns_init"):
                # A tree in a pid namespace of its own gets a fresh namespace at
                # restore: its pids cannot be taken.  Otherwise they must be
                # free, and the root comes back with the pid it had.
                await self._wait_pids_free(pids)
                expected_root = tree[0]["pid"]
            restore_id = names.new_id()
            # Before criu runs: what it will create, so a restarted daemon can
            # find and kill what a killed one left (criud.daemon.orphans).
            plan = self._orphan_plan(manifest, pids, run_as)
            rec = RestoreRecord(
                id=restore_id,
                checkpoint_id=ckpt.id,
                state="restoring",
                started_at=time.time(),
                owner_uid=caller.uid,
                tree_pids=plan,
            )
            await self.store.run(self.store.insert_restore, rec)
            opts = DumpOptions.from_dict(ckpt.options)
            lock = None if extra else manifest.get("network_lock")
            procs_files: list[str] = []
            if cgroup is not None:
                procs_files = await asyncio.to_thread(self._make_cgroups, cgroup)
            images_arg, keep = _images_for(images_dir, images_fd, run_as, writable=False)

            def build(work_dir: Path) -> list[str]:
                return restore_argv(
                    images_arg,
                    opts,
                    inherit,
                    network_lock=lock,
                    unprivileged=run_as is not None,
                    cgroup_root=cgroup,
                    extra=extra,
                    work_dir=work_dir,
                )

            await self._criu_restore(
                ckpt.id,
                restore_id,
                build,
                images_fd,
                [*(fd for fd, _ in inherit), *keep, *extra_fds],
                run_as,
                procs_files,
                expected_root,
                plan,
            )
        finally:
            os.close(images_fd)
        out = await self.store.run(self.store.get_restore, restore_id)
        assert out is not None
        log.info("restore %s of checkpoint %s: pid %s", restore_id, ckpt.id, out.pid)
        return out

    @staticmethod
    def _restore_pstree(ckpt_id: str, images_fd: int, run_as: RunAs | None) -> list[dict[str, Any]]:
        """Seal the images dir if a previous release left it the owner's; read its pstree."""
        try:
            if not imgdir.is_sealed(images_fd):
                imgdir.seal(images_fd, run_as.uid if run_as is not None else 0)
                log.info("sealed checkpoint %s (left writable by a previous release)", ckpt_id)
            tree = images.parse_pstree(imgdir.read_small(images_fd, "pstree.img", PSTREE_CAP))
        except imgdir.UnsafeEntry as e:
            raise _tampered(ckpt_id, e) from None
        except (OSError, images.ImageError) as e:
            raise CheckpointNotReady(f"checkpoint {ckpt_id} has no readable pstree.img: {e}") from e
        if not tree:
            raise CheckpointNotReady(f"checkpoint {ckpt_id}: pstree.img lists no task")
        return tree

    async def _criu_restore(
        self,
        ckpt_id: str,
        restore_id: str,
        build: Callable[[Path], list[str]],
        images_fd: int,
        pass_fds: list[int],
        run_as: RunAs | None,
        procs_files: list[str],
        expected_root: int | None,
        plan: dict[str, Any],
    ) -> None:
        """Run criu restore in a fresh run dir; record the verified root as running.

        criu writes its pidfile and stats into the run dir (its -W), which
        the daemon made under the root-only state dir: the images dir stays
        read-only.  Its log goes to a file the daemon creates in the images
        dir (root's 0600, unreachable by path for anyone else).
        """
        run_fd = await asyncio.to_thread(
            imgdir.make_run_dir,
            self.settings.run_dir,
            restore_id,
            (run_as.uid, run_as.gid) if run_as is not None else None,
        )
        log_fd = -1
        registered = False
        error: dict[str, Any] | None = None
        try:
            log_fd = imgdir.create_log(images_fd, RESTORE_LOG)
            argv = build(Path(f"/proc/self/fd/{run_fd}"))
            # Hold orphan sweeps from spawn until the restored root is watched:
            # it is our child from the moment criu forks it.
            with self.reaper.hold():
                result = await self.criu.run(
                    argv,
                    LogFile(log_fd, self.settings.checkpoints_dir / ckpt_id / RESTORE_LOG),
                    pass_fds=[*pass_fds, run_fd],
                    run_as=run_as,
                    cgroup_procs=procs_files,
                    on_spawn=self._criu_spawned(restore_id, plan),
                )
                if not result.ok:
                    raise await self._criu_error(
                        f"restore of checkpoint {ckpt_id}", result, ckpt_id, "restore"
                    )
                root, pidfd = await asyncio.to_thread(
                    self._restored_root, restore_id, run_fd, run_as, expected_root
                )
                try:
                    start = procutil.proc_start(root)
                    stats = await asyncio.to_thread(_read_stats, run_fd, "stats-restore")
                    await self.store.run(
                        self.store.update_restore,
                        restore_id,
                        state="running",
                        pid=root,
                        ns_pid=(procutil.ns_pids(root) or [root])[-1],
                        proc_start=start,
                        stats=stats,
                    )
                except BaseException:
                    os.close(pidfd)
                    raise
                self.reaper.watch(root, pidfd, self._exit_callback(restore_id))
                registered = True
        except CriudError as e:
            error = {"code": e.code, "detail": e.detail}
            raise
        finally:
            if log_fd >= 0:
                os.close(log_fd)
            os.close(run_fd)
            await asyncio.to_thread(imgdir.remove_dir, self.settings.run_dir, restore_id)
            if not registered:
                with contextlib.suppress(Exception):
                    await self._settle(
                        self.store.update_restore,
                        restore_id,
                        state="failed",
                        finished_at=time.time(),
                        **({"error": error} if error else {}),
                    )

    @staticmethod
    def _restored_root(
        restore_id: str, run_fd: int, run_as: RunAs | None, expected: int | None
    ) -> tuple[int, int]:
        """The restored root criu reported, checked; (pid, pidfd).

        Believed only if it is our own child (so it cannot be recycled while
        the reaper is held), runs as the uid criu ran as, and is the image's
        root pid where pids are kept.  Anything else: RestoreUnverified,
        and nothing is recorded to signal.
        """
        what = f"restore {restore_id}"
        try:
            pid = _parse_pid(imgdir.read_small(run_fd, PIDFILE, PIDFILE_CAP))
        except (OSError, imgdir.UnsafeEntry) as e:
            raise RestoreUnverified(f"{what}: cannot read criu's pidfile: {e}") from None
        if pid is None:
            raise RestoreUnverified(f"{what}: criu's pidfile holds no pid")
        if expected is not None and pid != expected:
            raise RestoreUnverified(
                f"{what}: criu reported pid {pid}, but the image's root is pid {expected}"
            )
        try:
            pidfd = procutil.pidfd_open(pid)
        except ProcessLookupError:
            raise RestoreUnverified(f"{what}: the reported root pid {pid} is gone") from None
        try:
            why = procutil.not_our_child(pid, run_as.uid if run_as is not None else None)
            if why is not None:
                raise RestoreUnverified(f"{what}: the reported root pid {pid} {why}")
        except BaseException:
            os.close(pidfd)
            raise
        return pid, pidfd

    # -- fd handles ---------------------------------------------------------------

    def _no_tcp_handles(self, caller: Caller) -> None:
        if caller.via_tcp:
            raise PermissionDenied(
                "fd handles are only available over the unix socket (SCM_RIGHTS needs one)"
            )

    def list_handles(self, caller: Caller) -> list[FdHandle]:
        self._no_tcp_handles(caller)
        return self.handles.list(caller.uid)

    def delete_handle(self, handle_id: str, caller: Caller) -> None:
        self._no_tcp_handles(caller)
        target = {"handle": handle_id}
        try:
            self.handles.delete(handle_id, caller.uid)
        except CriudError as e:
            self.record("delete_handle", caller, target, e.code, detail=e.detail)
            raise
        self.record("delete_handle", caller, target, "ok")


def names_taken(name: str | None) -> CriudError:
    from criud.daemon.errors import NameTaken

    return NameTaken(f"a checkpoint named {name!r} exists already", name=name)
