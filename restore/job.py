"""The restore job: one restore of a checkpoint, top to bottom.

`run` reads as the restore happens:

1. validate: the caller's fd handles, the checkpoint (done, the caller's,
   not busy), the OCI rules;
2. expand the stdio shorthand (criud.restore.stdio) and resolve the inherit
   mappings against the checkpoint's manifest;
3. lease the fd handles and 4. open the caller's paths (as the caller), all
   into one FdMap, which owns every fd the worker will get;
5. OCI: prepare the bundle (criud.restore.oci; a terminal container's
   /dev/console binds the new pty slave) and hand in its namespaces;
6. place the tree in its cgroup;
7. run criu (through the runtime's runner, in a fresh run dir);
8. adopt the restored root: verify it, record it running, and give it to
   the supervisor to watch.

The job imports only the daemon's leaf modules; what it needs of the
running daemon (the store, criu, the handle store, the path opener, the
supervisor, the checkpoint lookup and lock) comes in as a `RestoreRuntime`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

from criud.daemon import (
    creds,
    criu_errors,
    imgdir,
    kprobe,
    names,
    operations,
    orphans,
    procutil,
)
from criud.daemon.caller import Caller
from criud.daemon.config import Settings
from criud.daemon.criu import Criu, Held, LogFile, RunAs
from criud.daemon.errors import (
    CheckpointNotReady,
    CriudError,
    InvalidBundle,
    InvalidCgroup,
    PermissionDenied,
    PidInUse,
    RestoreUnverified,
    RootExited,
    WrongFdType,
)
from criud.daemon.handles import HandleStore, Leases, require_unix
from criud.daemon.store import CheckpointRecord, RestoreRecord, RestoreState, Store
from criud.dump import images
from criud.dump.manifest import Manifest
from criud.dump.options import DumpOptions
from criud.restore import mappings, stdio
from criud.restore.argv import PIDFILE, RESTORE_LOG, restore_argv
from criud.restore.paths import Creds, PathOpener, PathRequest
from criud.restore.worker import FdMap

if TYPE_CHECKING:
    # Imported where used: only lazy restores and OCI bundles need them
    # (with dump/'s and the archives', about 0.7 MiB of an idle daemon).
    from criud.restore import lazy as lazy_pages

log = logging.getLogger("criud.restore")

# The most of a run dir's pidfile the daemon reads (pstree.img's bound is
# criud.dump.images.PSTREE_CAP).
PIDFILE_CAP = 64


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
    # Run the tree before its memory is in (criud.restore.lazy).
    lazy: bool = False


class Children(Protocol):
    """The supervisor, as a restore needs it."""

    def hold(self) -> contextlib.AbstractContextManager[None]: ...
    def sweep(self) -> int: ...
    def watch_restore(self, restore_id: str, pid: int, pidfd: int) -> None: ...
    def watch_lazy(self, restore_id: str, watcher: Coroutine[Any, Any, None]) -> None: ...


class RestoreRuntime(Protocol):
    """What the running daemon lends a restore job."""

    settings: Settings
    store: Store
    criu: Criu
    handles: HandleStore
    paths: PathOpener

    @property
    def children(self) -> Children:
        """The supervisor: holds sweeps, reaps, watches the restored root."""
        ...

    async def checkpoint_for(self, ref: str, caller: Caller) -> CheckpointRecord:
        """The caller's checkpoint ref (CheckpointNotFound as for a stranger's)."""
        ...

    def busy(
        self, ckpt_id: str, message: str, shared: bool = False
    ) -> contextlib.AbstractContextManager[None]:
        """Mark a checkpoint in use for the block; Busy(message) if it is already.

        shared: other shared users may hold it at once (restores of a tree
        in its own pid namespace: clones), never a delete.
        """
        ...

    def pin(self, ckpt_id: str, message: str) -> Callable[[], None]:
        """A shared hold that outlives the block (a lazy restore's); returns its release."""
        ...


async def run(rt: RestoreRuntime, spec: RestoreSpec, caller: Caller) -> RestoreRecord:
    """Restore a checkpoint, handing in the mapped fds; return the running restore."""
    _check_handles(rt, spec, caller)
    if spec.lazy:
        kprobe.require(rt.criu, "lazy_restore", f"lazy restore of {spec.checkpoint!r}")
    operations.report(phase="preparing")
    ckpt = await rt.checkpoint_for(spec.checkpoint, caller)
    # Nothing of a restore's reading can be watched: its total only.
    operations.report(bytes_total=ckpt.size_bytes)
    if ckpt.state != "done":
        raise CheckpointNotReady(f"checkpoint {spec.checkpoint!r} is {ckpt.state}")
    busy = f"checkpoint {spec.checkpoint!r} is being restored or deleted"
    manifest = Manifest.from_json(ckpt.manifest)
    if spec.lazy and creds.run_as_of(manifest.run_as) is not None:
        kprobe.require_user_uffd(f"lazy restore of {spec.checkpoint!r}")
    # A tree in its own pid namespace is restored into a fresh one each
    # time: copies of it may be restored at once (clones).  Any other
    # would collide on its pids.
    with rt.busy(ckpt.id, busy, shared=manifest.pidns_init):
        _check_caller(ckpt.id, manifest, spec, caller)
        resolved = mappings.resolve(_with_stdio(rt, spec, manifest, caller), manifest)
        cgroup = check_cgroup(spec.cgroup, rt.settings.cgroup_parent) if spec.cgroup else None
        with Leases(rt.handles, caller.uid) as leases, FdMap() as fds:
            await _inherit(rt, resolved, leases, fds, caller)
            check_fd_types(fds.inherited, manifest)
            oci_args: tuple[str, ...] = ()
            if manifest.oci is not None:
                images_dir = rt.settings.checkpoints_dir / ckpt.id
                oci_args = await _prepare_oci(manifest, spec, cgroup, fds, images_dir)
                # The bundle's cgroup comes with its args; no criud placement.
                cgroup = None
            job = _Job(rt, ckpt, manifest, caller, fds, spec.lazy, _held(leases, fds))
            return await job.restore(cgroup, oci_args)


# -- 1. validate ----------------------------------------------------------------


def _check_handles(rt: RestoreRuntime, spec: RestoreSpec, caller: Caller) -> None:
    """Handles first: an unusable one (unknown, expired, consumed, another uid's) is wrong
    whatever the checkpoint."""
    for h_id in [s.handle for s in spec.inherit if s.handle] + [spec.stdio or ""]:
        if h_id:
            require_unix(caller)
            rt.handles.get(h_id, caller.uid)


def _check_caller(ckpt_id: str, manifest: Manifest, spec: RestoreSpec, caller: Caller) -> None:
    """A non-root caller restores only trees that ran as itself, and no OCI container."""
    creds.check_owner(
        {int(p): u for p, u in manifest.uids.items()}, caller, f"restore of checkpoint {ckpt_id}"
    )
    if spec.oci_bundle is not None and manifest.oci is None:
        raise InvalidBundle(f"checkpoint {ckpt_id} is not of an OCI container")
    if manifest.oci is not None and not caller.is_root:
        raise PermissionDenied("OCI bundles are for root callers only")


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


# -- 2. resolve --------------------------------------------------------------------


def _with_stdio(
    rt: RestoreRuntime, spec: RestoreSpec, manifest: Manifest, caller: Caller
) -> tuple[mappings.InheritSpec, ...]:
    """spec's mappings, plus those its stdio handle stands for (criud.restore.stdio)."""
    if spec.stdio is None:
        return spec.inherit
    h = rt.handles.get(spec.stdio, caller.uid)
    return stdio.expand(spec.inherit, spec.stdio, len(h.fds), manifest)


# -- 3, 4. lease handles, open paths ----------------------------------------------


async def _inherit(
    rt: RestoreRuntime,
    resolved: Sequence[mappings.ResolvedMapping],
    leases: Leases,
    fds: FdMap,
    caller: Caller,
) -> None:
    """Put every mapped fd into fds under its key: handles' fds (duplicated), then paths."""
    paths: list[PathRequest] = []
    path_keys: list[str] = []
    for r in resolved:
        s = r.spec
        if s.path is not None:
            paths.append(PathRequest(s.path, s.mode or "r", s.type))
            path_keys.append(r.key)
            continue
        assert s.handle is not None and s.index is not None
        fds.hand_over(fds.dup(leases.fd(s.handle, s.index)), r.key)
    if paths:
        # Opened in a child with the caller's uid, gid and connect-time
        # groups, root's too: no caller's path is resolved in the daemon.
        opened = await rt.paths.open(paths, Creds(caller.uid, caller.gid, caller.groups))
        owned = [fds.own(fd) for fd in opened]
        for fd, key in zip(owned, path_keys, strict=True):
            fds.hand_over(fd, key)


def _held(leases: Leases, fds: FdMap) -> Held | None:
    """The run's handed-in fds, if they all came from one fd handle (whose worker may serve it).

    The runner checks the rest: every inherit fd is one of these, and the
    handle's worker holds exactly them.
    """
    handle, origin = leases.only, fds.origins
    return Held(handle, origin) if handle is not None and origin else None


def check_fd_types(inherit: Sequence[tuple[int, str]], manifest: Manifest) -> None:
    """A namespace key needs an fd of a namespace of its type; a terminal's, a terminal."""
    stdio.check_terminals(inherit, manifest)
    for fd, key in inherit:
        ns_type = manifest.namespace_type(key)
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


# -- 5. OCI -----------------------------------------------------------------------


async def _prepare_oci(
    manifest: Manifest, spec: RestoreSpec, cgroup: str | None, fds: FdMap, images_dir: Path
) -> tuple[str, ...]:
    """Fit the checkpoint into its bundle; hand in the namespaces it joins; its criu args."""
    from criud.restore import oci as restore_oci
    from criud.restore import oci_archive

    saved = manifest.oci
    assert saved is not None
    if oci_archive.is_imported(saved):
        # A Podman export: its rootfs changes go over the new bundle's rootfs.
        await asyncio.to_thread(oci_archive.prepare_bundle, spec.oci_bundle, images_dir)
    bundle = spec.oci_bundle or str(saved["bundle"])
    # A terminal container's /dev/console binds the new pty slave handed in.
    console = restore_oci.console_source(fds.inherited, manifest.external_tty_keys())
    prepared = await asyncio.to_thread(
        restore_oci.prepare, saved, bundle, spec.oci_name, cgroup, manifest.network_lock, console
    )
    for key, path in prepared.ns_files.items():
        try:
            fd = fds.own(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
        except OSError as e:
            raise InvalidBundle(
                f"cannot open {path} (namespace {key}) named by the bundle: {e.strerror}",
                bundle=bundle,
            ) from e
        fds.hand_over(fd, key)
    return prepared.args


# -- 6, 7, 8. cgroup, criu, adopt ---------------------------------------------------


class _Job:
    """One restore from its record's insertion to its adopted root."""

    def __init__(
        self,
        rt: RestoreRuntime,
        ckpt: CheckpointRecord,
        manifest: Manifest,
        caller: Caller,
        fds: FdMap,
        lazy: bool = False,
        held: Held | None = None,
    ) -> None:
        self.rt, self.ckpt, self.manifest, self.caller, self.fds = rt, ckpt, manifest, caller, fds
        self.lazy = lazy
        self.held = held
        self.run_as = creds.run_as_of(manifest.run_as)
        self.images_dir = rt.settings.checkpoints_dir / ckpt.id
        self.id = names.new_id()
        # The plan with criu's pid and start, once criu runs: what to kill
        # if the restore does not finish.
        self.spawned: dict[str, Any] | None = None
        # criu was killed (the daemon's timeout, or a signal from anyone): it
        # cleaned nothing up.
        self.criu_killed = False

    async def restore(self, cgroup: str | None, oci_args: tuple[str, ...]) -> RestoreRecord:
        """Record the restore, run criu, adopt its root; the record says how it ended."""
        try:
            images_fd = self.fds.own(imgdir.open_dir(self.images_dir))
        except OSError as e:
            raise CheckpointNotReady(
                f"checkpoint {self.ckpt.id} has no images: {e.strerror}"
            ) from e
        tree = await _read_pstree_soon(self.ckpt.id, images_fd, self.run_as)
        pids = sorted({p for t in tree for p in [t["pid"], *t["threads"]]})
        expected_root: int | None = None
        if not self.manifest.pidns_init:
            # A tree in a pid namespace of its own gets a fresh namespace at
            # restore: its pids cannot be taken.  Otherwise they must be
            # free, and the root comes back with the pid it had.
            await self._wait_pids_free(pids)
            expected_root = tree[0]["pid"]
        plan = await self._insert_record(pids)
        try:
            procs_files = await asyncio.to_thread(make_cgroups, cgroup) if cgroup else []
            await self._run_criu(images_fd, cgroup, oci_args, procs_files, plan, expected_root)
        except RootExited:
            raise  # recorded as exited already
        except BaseException as e:
            if isinstance(e, asyncio.CancelledError) or self.criu_killed:
                await self._kill_leftovers()
            await self._fail(e)
            raise
        out = await self.rt.store.run(self.rt.store.get_restore, self.id)
        assert out is not None
        log.info("restore %s of checkpoint %s: pid %s", self.id, self.ckpt.id, out.pid)
        return out

    async def _wait_pids_free(self, pids: Sequence[int]) -> None:
        """Wait (bounded) for the image's pids to be gone; PidInUse if they stay."""
        deadline = time.monotonic() + self.rt.settings.pid_wait_s
        # A dumped root is usually reaped within a few ms of criu's exit: a
        # fixed 50 ms poll cost a whole period for a 2 ms late reap (issue
        # 13), so start at 1 ms and back off to 50 ms for PID 1's slow reaps.
        delay = 0.001
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
            self.rt.children.sweep()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)

    async def _insert_record(self, pids: Sequence[int]) -> dict[str, Any]:
        """Record the restore before criu runs, with what it will create (orphan recovery)."""
        pidns = self.manifest.pidns_init
        # A restored task holds criu's uid until the restorer gives it its
        # own: either may be what a killed restore left.
        uids = {self.run_as.uid if self.run_as else os.getuid()}
        uids.update(u for ids in self.manifest.uids.values() for u in ids)
        # A tree in its own pid namespace gets host pids nobody knows yet.
        plan = orphans.plan([] if pidns else pids, uids, pidns)
        rec = RestoreRecord(
            id=self.id,
            checkpoint_id=self.ckpt.id,
            state=RestoreState.RESTORING,
            started_at=time.time(),
            owner_uid=self.caller.uid,
            tree_pids=plan,
            lazy=self.lazy or None,
        )
        await self.rt.store.run(self.rt.store.insert_restore, rec)
        return plan

    async def _kill_leftovers(self) -> None:
        """Kill the tasks criu forked for a restore that did not finish.

        A cancel (or the daemon's stop, or criu's timeout) kills criu
        mid-restore, and what it had forked stays, half restored or even
        running, holding the image's pids.  They are recognised as at start-up after a crash
        (criud.daemon.orphans: a recorded pid, started after criu, as one
        of the recorded uids, and a child of the daemon or of another
        recorded pid), killed through pidfds, and reaped by the
        supervisor's sweep.  Only then: criu that failed on its own has
        killed its tasks already.
        """
        if self.spawned is None:
            return
        with contextlib.suppress(Exception):
            # criu's orphans went to the daemon, its subreaper.
            killed, left = await asyncio.to_thread(
                orphans.kill_leftovers, self.spawned, self.rt.settings.pid_wait_s, (os.getpid(),)
            )
            if killed:
                log.warning(
                    "restore %s did not finish: killed pids %s%s",
                    self.id,
                    killed,
                    f" ({left} not reaped yet)" if left else "",
                )

    async def _fail(self, e: BaseException) -> None:
        """The one place a restore is recorded as failed (now, or once the disk has room)."""
        changes: dict[str, Any] = {"state": RestoreState.FAILED, "finished_at": time.time()}
        if isinstance(e, CriudError):
            changes["error"] = {"code": e.code, "detail": e.detail}
        with contextlib.suppress(Exception):
            await self.rt.store.settle(self.rt.store.update_restore, self.id, **changes)

    async def _run_criu(
        self,
        images_fd: int,
        cgroup: str | None,
        oci_args: tuple[str, ...],
        procs_files: list[str],
        plan: dict[str, Any],
        expected_root: int | None,
    ) -> None:
        """Run criu restore in a fresh run dir; adopt the verified root.

        criu writes its pidfile and stats into the run dir (its -W), which
        the daemon made under the root-only state dir: the images dir stays
        read-only.  Its log goes to a file the daemon creates in the images
        dir (root's 0600, unreachable by path for anyone else).
        """
        rt, run_as = self.rt, self.run_as
        ids = (run_as.uid, run_as.gid) if run_as is not None else None
        # The run dir is the daemon's own, and small: made and removed
        # inline (some 60 µs, against 150 µs through a thread; bench/hops.py).
        run_fd = self.fds.own(imgdir.make_run_dir(rt.settings.run_dir, self.id, ids))
        try:
            log_fd = self.fds.own(imgdir.create_log(images_fd, RESTORE_LOG))
            images_arg = imgdir.criu_dir(self.images_dir, images_fd, ids, writable=False)
            if run_as is not None:
                self.fds.hand_over(images_fd)  # named /proc/self/fd/N
            self.fds.hand_over(run_fd)
            argv = self._argv(images_arg, run_fd, cgroup, oci_args)
            server = await self._start_lazy(images_arg, run_fd, images_fd)
            try:
                # Hold orphan sweeps from spawn until the restored root is
                # watched: it is our child from the moment criu forks it.
                operations.report(phase="restoring")
                with rt.children.hold():
                    await self._criu_restore(argv, log_fd, procs_files, plan)
                    await adopt(rt, self.id, run_fd, run_as, expected_root)
            except BaseException:
                if server is not None:
                    await server.stop()
                raise
            if server is not None:
                # The images stay until the server has read every page.
                release = rt.pin(self.ckpt.id, f"checkpoint {self.ckpt.id} is being restored")
                rt.children.watch_lazy(self.id, server.watch(rt.store, release))
        finally:
            imgdir.remove_dir(rt.settings.run_dir, self.id)

    async def _start_lazy(
        self, images_arg: Path, run_fd: int, images_fd: int
    ) -> lazy_pages.Server | None:
        """For a lazy restore, its lazy-pages server, listening in the run dir; else None."""
        if not self.lazy:
            return None
        from criud.restore import lazy as lazy_pages

        server = lazy_pages.Server(self.rt.criu, self.id)
        try:
            await server.start(images_arg, run_fd, images_fd, self.run_as)
        except BaseException:
            await server.stop()
            raise
        return server

    async def _criu_restore(
        self, argv: list[str], log_fd: int, procs_files: list[str], plan: dict[str, Any]
    ) -> None:
        """Run criu restore with the map's fds; its failure, classified, if it fails."""
        rt = self.rt
        result = await rt.criu.run(
            argv,
            LogFile(log_fd, self.images_dir / RESTORE_LOG),
            pass_fds=self.fds.pass_fds,
            run_as=self.run_as,
            cgroup_procs=procs_files,
            on_spawn=self._criu_spawned(plan),
            held=self.held,
        )
        if not result.ok:
            # criu that died by a signal, the daemon's (timeout) or anyone
            # else's, cleaned nothing up: what it forked must be killed.
            self.criu_killed = result.stopped is not None or result.returncode < 0
            raise await criu_errors.failure(
                rt.criu,
                f"restore of checkpoint {self.ckpt.id}",
                result,
                "restore",
                self.ckpt.id,
                rt.settings.checkpoints_dir,
            )

    def _argv(
        self, images_arg: Path, run_fd: int, cgroup: str | None, oci_args: tuple[str, ...]
    ) -> list[str]:
        """criu's restore argv; the --inherit-fd arguments come from the fd map."""
        return restore_argv(
            images_arg,
            DumpOptions.from_dict(self.ckpt.options),
            self.fds.inherit_args(),
            # With OCI the bundle's arguments carry the dump's lock.
            network_lock=None if oci_args else self.manifest.network_lock,
            unprivileged=self.run_as is not None,
            cgroup_root=cgroup,
            extra=oci_args,
            work_dir=Path(f"/proc/self/fd/{run_fd}"),
            lazy=self.lazy,
        )

    def _criu_spawned(self, plan: dict[str, Any]) -> Callable[[int], Awaitable[None]]:
        """on_spawn for the restore's criu: add its pid and start to the record."""

        async def record(criu_pid: int) -> None:
            # Restored tasks are forked by criu, never before it started.
            info = {**plan, "criu_pid": criu_pid, "criu_start": procutil.proc_start(criu_pid)}
            self.spawned = info
            await self.rt.store.run(self.rt.store.update_restore, self.id, tree_pids=info)

        return record


# A pstree.img this small (some 200 tasks) parses inline in well under
# 100 µs; a bigger one, or a dir a previous release left unsealed, is read
# in a thread.
_INLINE_PSTREE_MAX = 8 << 10


async def _read_pstree_soon(
    ckpt_id: str, images_fd: int, run_as: RunAs | None
) -> list[dict[str, Any]]:
    """_read_pstree, inline when it is small work."""
    try:
        small = imgdir.is_sealed(images_fd) and (
            os.stat("pstree.img", dir_fd=images_fd, follow_symlinks=False).st_size
            <= _INLINE_PSTREE_MAX
        )
    except OSError:
        small = False  # _read_pstree says what is wrong
    if small:
        return _read_pstree(ckpt_id, images_fd, run_as, sealed=True)
    return await asyncio.to_thread(_read_pstree, ckpt_id, images_fd, run_as)


def _read_pstree(
    ckpt_id: str, images_fd: int, run_as: RunAs | None, sealed: bool = False
) -> list[dict[str, Any]]:
    """Seal the images dir if a previous release left it the owner's; read its pstree.

    sealed: the caller has just seen the dir sealed (one fstat less).
    """
    try:
        if not sealed and not imgdir.is_sealed(images_fd):
            imgdir.seal(images_fd, run_as.uid if run_as is not None else 0)
            log.info("sealed checkpoint %s (left writable by a previous release)", ckpt_id)
        tree = images.pstree_in(images_fd)
    except imgdir.UnsafeEntry as e:
        raise imgdir.tampered(ckpt_id, e) from None
    except (OSError, images.ImageError) as e:
        raise CheckpointNotReady(f"checkpoint {ckpt_id} has no readable pstree.img: {e}") from e
    if not tree:
        raise CheckpointNotReady(f"checkpoint {ckpt_id}: pstree.img lists no task")
    return tree


def make_cgroups(cgroup: str) -> list[str]:
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


# -- 8. adopt the root ------------------------------------------------------------------


class AdoptRuntime(Protocol):
    """What adopting a restored root needs: the store and the supervisor."""

    store: Store

    @property
    def children(self) -> Children:
        """The supervisor."""
        ...


async def adopt(
    rt: AdoptRuntime, restore_id: str, run_fd: int, run_as: RunAs | None, expected: int | None
) -> None:
    """Verify the root criu reported, record it running and hand it to the supervisor.

    A root that is gone, or already exited (a zombie of ours), is recorded
    as running and then exited, and the restore answers RootExited: the
    tree was restored, but there is nothing left to watch.
    """
    # A pidfile, one pidfd and two short /proc reads, then a stats file of
    # a few hundred bytes: inline, well below a thread hop's cost.
    root, pidfd = restored_root(restore_id, run_fd, run_as, expected)
    if pidfd is None:
        await _record_exited(rt, restore_id, None, None, None, f"pid {root} is gone")
    try:
        status = _exit_status(pidfd)
        stats = images.stats_in(run_fd, "stats-restore")
        await rt.store.run(
            rt.store.update_restore,
            restore_id,
            state=RestoreState.RUNNING,
            pid=root,
            ns_pid=(procutil.ns_pids(root) or [root])[-1],
            proc_start=procutil.proc_start(root),
            stats=stats,
        )
    except BaseException:
        os.close(pidfd)
        raise
    if status is None:
        rt.children.watch_restore(restore_id, root, pidfd)  # owns pidfd from here
        return
    os.close(pidfd)
    code, sig = status
    how = f"exited {code}" if sig is None else f"was killed by signal {sig}"
    await _record_exited(rt, restore_id, root, code, sig, f"pid {root} {how}")


def _exit_status(pidfd: int) -> tuple[int | None, int | None] | None:
    """(exit code, signal) of our child behind pidfd if it has exited (reaping it); else None."""
    info = os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOHANG)
    if info is None:
        return None
    if info.si_code == os.CLD_EXITED:
        return info.si_status, None
    return None, info.si_status


async def _record_exited(
    rt: AdoptRuntime,
    restore_id: str,
    pid: int | None,
    code: int | None,
    sig: int | None,
    what: str,
) -> NoReturn:
    """A restored root that ended before it was watched: recorded exited; RootExited."""
    err = RootExited(
        f"restore {restore_id}: criu restored the tree, but its root {what} before "
        "the daemon could watch it",
        exit_code=code,
        exit_signal=sig,
    )
    now = time.time()
    if pid is None:
        await rt.store.run(rt.store.update_restore, restore_id, state=RestoreState.RUNNING)
    await rt.store.run(
        rt.store.update_restore,
        restore_id,
        state=RestoreState.EXITED,
        finished_at=now,
        exit_code=code,
        exit_signal=sig,
        error={"code": err.code, "detail": err.detail},
    )
    raise err


def _parse_pid(data: bytes) -> int | None:
    """The pid in a pidfile criu wrote ("1234", no newline), or None."""
    m = re.fullmatch(rb"\s*([1-9][0-9]{0,9})\s*", data)
    return int(m.group(1)) if m else None


def restored_root(
    restore_id: str, run_fd: int, run_as: RunAs | None, expected: int | None
) -> tuple[int, int | None]:
    """The restored root criu reported, checked; (pid, pidfd), pidfd None if it is gone.

    Believed only if it is our own child (so it cannot be recycled while
    the supervisor holds sweeps), runs as the uid criu ran as, and is the
    image's root pid where pids are kept.  Anything else: RestoreUnverified,
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
        return pid, None
    try:
        why = procutil.not_our_child(pid, run_as.uid if run_as is not None else None)
        if why is not None:
            raise RestoreUnverified(f"{what}: the reported root pid {pid} {why}")
    except BaseException:
        os.close(pidfd)
        raise
    return pid, pidfd
