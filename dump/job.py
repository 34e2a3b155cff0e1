"""The checkpoint job: one dump of a process tree, top to bottom.

`run` pins the target (pidfd and start time), checks who may dump it and as
whom criu must run, and takes the per-pid lock; `_Dump` then reads the
tree, records the checkpoint (dumping), builds its typed Manifest, runs
criu into a fresh private dir, seals what criu wrote, and records the
checkpoint done.  Any failure ends in one place (`_Dump._fail`): the partial
images are thrown away (criu's log kept when criu itself failed) and the
record says failed, why, and what was known.

The job imports only the daemon's leaf modules; what it needs of the
running daemon comes in as a `DumpRuntime`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any, Protocol

from criud.daemon import creds, criu_errors, imgdir, kprobe, names, operations, procutil
from criud.daemon.caller import Caller
from criud.daemon.config import Settings
from criud.daemon.criu import Criu, CriuResult, LogFile, RunAs
from criud.daemon.errors import (
    CriudError,
    InvalidRequest,
    PermissionDenied,
    ProcessNotFound,
    TreeChanged,
)
from criud.daemon.store import CheckpointRecord, CheckpointState, Store
from criud.dump import fds as fdinfo
from criud.dump import frozen, images
from criud.dump import inspect as proc_inspect
from criud.dump import manifest as mf
from criud.dump import preflight as dump_preflight
from criud.dump.argv import DUMP_LOG, chained_argv, dump_argv, pre_dump_argv, round_link
from criud.dump.options import DumpOptions

log = logging.getLogger("criud.dump")

# A dump writes into this dir until it is sealed and renamed to its id.
TMP_PREFIX = ".tmp-"
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
# How often the images dir is looked at while criu writes it.
WATCH_INTERVAL_S = 0.25
# The log of each pre-dump round, in its round dir (the daemon creates it).
PRE_DUMP_LOG = "pre-dump.log"
# A lone process with fewer fds is walked before criu: its walk (about
# 15 us an fd) costs less than the frozen walk's stops, guess and checks
# (+0.8 ms on a small dump + restore, bench/versus.py, 30 pairs).
FROZEN_MIN_FDS = 64
# The frozen walk's post-dump check lists the fds of each task whose fd
# count changed since the walk (about 1 us an fd: 11 ms for 10,000); above
# this many in those tasks it runs in a thread.
INLINE_LISTING_MAX = 256
# Its count of each task's fds (one stat, some 2 us) runs in a thread for
# a tree of more tasks than this.
INLINE_COUNT_MAX = 256


@dataclasses.dataclass(frozen=True)
class CheckpointSpec:
    pid: int
    name: str | None
    options: DumpOptions
    labels: dict[str, str]
    # The OCI bundle of a runc container whose init is pid: criu options
    # are derived from its config.json as runc derives them.
    oci_bundle: str | None = None
    # Iterative pre-dumps asked before the final dump (0: none).  They need
    # soft-dirty tracking (criud.daemon.kprobe "pre_dump").
    pre_dumps: int = 0
    # More criu flags, built by a flow of its own (a migration's page
    # server, --leave-stopped); never from a request's text.
    extra_args: tuple[str, ...] = ()
    # Report the images dir's growth as progress; off where the pages go
    # elsewhere (a migration reports what its destination received).
    watch_images: bool = True


class DumpRuntime(Protocol):
    """What the running daemon lends a checkpoint job."""

    settings: Settings
    store: Store
    criu: Criu

    def busy_pid(self, pid: int) -> contextlib.AbstractContextManager[None]:
        """Mark pid as being checkpointed for the block; Busy if it is already."""
        ...


async def run(rt: DumpRuntime, spec: CheckpointSpec, caller: Caller) -> CheckpointRecord:
    """Dump the tree of spec.pid; return the done checkpoint or raise."""
    if spec.name is not None:
        names.check_name(spec.name)
    pid = spec.pid
    if spec.pre_dumps:
        # Before the pid is even pinned: nothing is frozen, nothing recorded.
        kprobe.require(rt.criu, "pre_dump", f"checkpoint of pid {pid} with pre-dumps")
        if "--page-server" in spec.extra_args:
            raise InvalidRequest("pre-dumps are not taken for a page-server dump")
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
        # The one walk of the tree (its tasks, fds and every thread's ids),
        # and the ownership check on it: a refused caller leaves no record
        # behind, and nothing is frozen.  A root's plain dump walks the tree
        # while criu holds it instead (criud.dump.frozen).
        guess = _guess(rt.criu, spec, caller)
        tree = await walk_tree(rt.criu, pid, caller) if guess is None else None
        with rt.busy_pid(pid):
            if guess is not None:
                done = await _Dump(rt, spec, caller, start, None, guess).run()
                if done is not None:
                    return done
                # The guess was wrong (or no warm worker was idle): criu gave
                # the tree back and nothing of that run is left; walk first.
                tree = await walk_tree(rt.criu, pid, caller)
            rec = await _Dump(rt, spec, caller, start, tree).run()
            assert rec is not None  # only a dump walking a frozen tree gives up
            return rec
    finally:
        os.close(pidfd)


def _guess(criu: Criu, spec: CheckpointSpec, caller: Caller) -> frozen.Guess | None:
    """criu's argv inputs guessed from the root task, where the tree may be walked frozen.

    Where root's criu may not dump everyone's tree (no CAP_SYS_RESOURCE),
    criu runs as a tree's owner when the tree is not wholly root's: that
    choice needs every task's ids before criu, so only a root task that is
    wholly root's is guessed for (a child that is not is found by the
    walk, and the dump runs again, walk first, as its owner).
    """
    plain = spec.oci_bundle is None and not spec.pre_dumps and not spec.extra_args
    if not frozen.applies(spec.options, caller, plain, criu.pool is not None):
        return None
    if not _holds_many_fds(spec.pid) and not procutil.children(spec.pid):
        return None  # a walk this small costs less than criu's stops
    text = _status(spec.pid, spec.pid)
    try:
        ids = creds.parse_status(text or "")
    except ValueError:
        return None
    if criu.unprivileged_for_users and not creds.roots_own({spec.pid: ids}):
        return None
    watched = operations.current.get() is not None
    estimate = _estimate([proc_inspect.memory_from_status(text or "")]) if watched else {}
    return frozen.guess(spec.pid, estimate)


async def tree_creds(
    criu: Criu, pid: int, caller: Caller
) -> tuple[dict[int, creds.TaskCreds], RunAs | None]:
    """Every task's ids, checked for caller; and what criu must run as (None: root)."""
    tree = await asyncio.to_thread(creds.read_tree, pid)
    if not tree:
        raise ProcessNotFound(f"pid {pid} exited", pid=pid)
    run_as = creds.choose_run_as(
        tree, caller, not criu.unprivileged_for_users, f"checkpoint of pid {pid}"
    )
    return tree, run_as


@dataclasses.dataclass(frozen=True)
class Tree:
    """What the one walk of a dump found: tasks with classified fds, ids, criu's credentials."""

    tasks: list[fdinfo.TaskInfo]
    ids: dict[int, creds.TaskCreds]
    run_as: RunAs | None
    # The dump's expected bytes and pages (an operation's progress), or {}.
    estimate: dict[str, int]


async def walk_tree(criu: Criu, pid: int, caller: Caller, frozen_by_criu: bool = False) -> Tree:
    """Walk the tree of pid once (fds and ids) and check the caller may dump it.

    One thread hop for the whole walk: the tasks and their fds
    (criud.dump.fds.read_tree), then the ids of every thread it found, read
    after the fds so that they are as close to criu's freeze as the walk
    allows.  A task forked after the walk listed the tree is not in it: the
    dump's pstree.img is checked against it afterwards (_check_dumped).
    frozen_by_criu: criu is dumping the tree (criud.dump.frozen), whose phase stays.
    """
    if not frozen_by_criu:
        operations.report(phase="inspecting")
    watched = operations.current.get() is not None
    try:
        tasks, ids, estimate = await asyncio.to_thread(_read_tree, pid, watched)
    except (ProcessLookupError, FileNotFoundError):
        raise ProcessNotFound(f"pid {pid} exited", pid=pid) from None
    if not ids:
        raise ProcessNotFound(f"pid {pid} exited", pid=pid)
    run_as = creds.choose_run_as(
        ids, caller, not criu.unprivileged_for_users, f"checkpoint of pid {pid}"
    )
    return Tree(tasks, ids, run_as, estimate)


# A frozen walk's outcome (_Dump._walk_frozen): the tree, its manifest, and
# whether that gives the argv criu runs with.
_FrozenWalked = tuple[Tree, mf.Manifest | None, bool]


def network_lock(criu: Criu, needed: bool) -> str | None:
    """The --network-lock method to pass, chosen by probing.

    criu's default lock runs iptables; where iptables is absent and the
    kernel supports it, nftables is used instead.  None: pass nothing (no
    network to lock, or the default works).
    """
    if not needed or shutil.which("iptables"):
        return None
    return "nftables" if criu.features.get("network_lock_nftables") else None


class _Dump:
    """One dump from its record's insertion to its sealed, renamed images dir."""

    def __init__(
        self,
        rt: DumpRuntime,
        spec: CheckpointSpec,
        caller: Caller,
        start: int,
        tree: Tree | None,
        guess: frozen.Guess | None = None,
    ) -> None:
        self.rt, self.spec, self.caller, self.start = rt, spec, caller, start
        # The walk's, before criu; or None, and guess: walked while criu holds the tree.
        self.tree, self.guess = tree, guess
        self.id = names.new_id()
        self.tmp = rt.settings.checkpoints_dir / f"{TMP_PREFIX}{self.id}"
        self.final = rt.settings.checkpoints_dir / self.id
        self.manifest: mf.Manifest | None = None

    async def run(self) -> CheckpointRecord | None:
        """Record, dump, seal and rename; the record says how it ended.

        None (only where the tree was to be walked frozen): nothing was
        kept, neither record nor images, and the dump must run walk first.
        """
        pid, rt = self.spec.pid, self.rt
        rec = await self._insert_record()
        try:
            # We generated the id; mkdir (not makedirs) never follows a link
            # at the last component and fails if anything is already there.
            os.mkdir(self.tmp, 0o700)
            out = await (self._dump_frozen() if self.guess is not None else self._dump_walked())
            if out is None:
                await asyncio.to_thread(shutil.rmtree, self.tmp)
                await rt.store.run(rt.store.delete_checkpoint, self.id)
                return None
            size, stats = out
            assert self.manifest is not None  # built by either path before criu's end
            operations.report(
                phase="writing", bytes_done=size, pages_done=stats.get("pages_written")
            )
            os.rename(self.tmp, self.final)  # one syscall in the daemon's own dir
            manifest = self.manifest.to_json()
            done: dict[str, Any] = {
                "state": CheckpointState.DONE,
                "finished_at": time.time(),
                "size_bytes": size,
                "stats": stats,
                "manifest": manifest,
            }
            await rt.store.run(rt.store.update_checkpoint, self.id, **done)
        except BaseException as e:
            await self._fail(e)
            raise
        log.info("checkpoint %s of pid %d: %d bytes", self.id, pid, size)
        # The record as the store now holds it, from what was just written:
        # reading it back would decode the whole manifest again (40 ms at
        # 10,000 fds) for what is in hand.
        external = list(manifest.get("external", []))
        return dataclasses.replace(rec, **done, external_keys=external)

    async def _dump_walked(self) -> tuple[int, dict[str, int]]:
        """The dump with the tree walked first (the walk already done, or done now)."""
        tree = self.tree
        assert tree is not None  # walked before this _Dump was made
        operations.report(**tree.estimate)
        self.manifest = await self._build_manifest(tree.tasks, tree.ids, tree.run_as)
        self._check_start()
        operations.report(phase="dumping")
        out = await self._dump(self.manifest, tree.run_as)
        assert out is not None  # only a frozen walk's dump gives up
        return out

    async def _dump_frozen(self) -> tuple[int, dict[str, int]] | None:
        """The dump with the tree walked while criu holds it (criud.dump.frozen).

        None: criu gave the tree back and nothing of the run is to be kept
        (no warm worker took it, the guess was wrong, or the walk failed).
        """
        assert self.guess is not None
        operations.report(**self.guess.estimate)
        self._check_start()
        operations.report(phase="dumping")
        return await self._dump(None, None)

    def _check_start(self) -> None:
        pid = self.spec.pid
        if procutil.proc_start(pid) != self.start:
            raise ProcessNotFound(f"pid {pid} exited (or was reused) before the dump", pid=pid)

    async def _walk_frozen(self, images_arg: Path, argv: list[str]) -> _FrozenWalked:
        """The walk; its manifest, built while criu still dumps (None: criu must run as the
        tree's owner); and whether that gives criu's argv (1 ms at 10,000 fds: compared
        here rather than at post-dump, with the tree frozen)."""
        tree = await walk_tree(self.rt.criu, self.spec.pid, self.caller, frozen_by_criu=True)
        operations.report(**tree.estimate)  # the whole tree's, not the root's alone
        if tree.run_as is not None:
            return tree, None, False
        m = await self._build_manifest(tree.tasks, tree.ids, None)
        return tree, m, self._argv(m, images_arg, None) == argv

    async def _accept(self, walked: _FrozenWalked, images_arg: Path, argv: list[str]) -> bool:
        """Whether criu ran with the argv this walk gives; if so, keep its manifest."""
        tree, m, agrees = walked
        if m is None:
            return False  # criu must run as the tree's owner
        tasks = await _left(tree.tasks)
        if tasks is not tree.tasks:
            tree = dataclasses.replace(tree, tasks=tasks)
            m = await self._build_manifest(tree.tasks, tree.ids, None)
            agrees = self._argv(m, images_arg, None) == argv
        if not agrees:
            return False
        self.tree, self.manifest = tree, m
        return True

    async def _insert_record(self) -> CheckpointRecord:
        spec, rt = self.spec, self.rt
        rec = CheckpointRecord(
            id=self.id,
            name=spec.name,
            pid=spec.pid,
            state=CheckpointState.DUMPING,
            created_at=time.time(),
            options=spec.options.as_dict(),
            labels=dict(spec.labels),
            owner_uid=self.caller.uid,
            criu_version=rt.criu.version,
        )
        # NameTaken if the caller has a checkpoint of that name already.
        await rt.store.run(rt.store.insert_checkpoint, rec)
        return rec

    async def _fail(self, e: BaseException) -> None:
        """The one failure path: drop partial images, record failed (name freed) and why.

        A failure of criu itself has put its log in the final dir already
        (_keep_log_only); anything else (a refusal, tampering, cancellation)
        leaves nothing but the record.
        """
        changes: dict[str, Any] = {
            "state": CheckpointState.FAILED,
            "name": None,
            "finished_at": time.time(),
        }
        if self.manifest is not None:
            changes["manifest"] = self.manifest.to_json()
        if isinstance(e, CriudError):
            changes["error"] = {"code": e.code, "detail": e.detail}
        with contextlib.suppress(Exception):
            await asyncio.to_thread(shutil.rmtree, self.tmp, True)
            await self.rt.store.settle(self.rt.store.update_checkpoint, self.id, **changes)

    async def _build_manifest(
        self, tasks: list[fdinfo.TaskInfo], ids: dict[int, creds.TaskCreds], run_as: RunAs | None
    ) -> mf.Manifest:
        """Everything the checkpoint records of the tree besides criu's images."""
        pid, opts = self.spec.pid, self.spec.options
        base = mf.build(tasks, opts.external)
        own_ns = own_namespaces(pid)
        ext = external_namespaces(pid, opts, own_ns, base)
        oci_record = None
        if self.spec.oci_bundle is not None:
            oci_record = await asyncio.to_thread(oci_probe, self.spec.oci_bundle, pid)
        return dataclasses.replace(
            base,
            pids=tuple(sorted({tid for t in tasks for tid in [t.pid, *t.tids]})),
            **creds.to_manifest(ids, run_as),
            namespaces=own_ns,
            # The tree is the init of a pid namespace of its own: its image
            # pids live in that namespace and never collide with the host's.
            pidns_init="pid" in own_ns and procutil.ns_pids(pid)[-1:] == [1],
            network_lock=self._network_lock(own_ns),
            ext_namespaces=ext,
            external=(*base.external, *(n.key for n in ext)),
            oci=oci_record,
        )

    async def _dump(
        self, m: mf.Manifest | None, run_as: RunAs | None
    ) -> tuple[int, dict[str, int]] | None:
        """Run criu dump into the tmp dir; seal what it wrote; (size, stats).

        m None: the tree is walked while criu holds it (criud.dump.frozen);
        None back means nothing was kept and the dump must run walk first.
        """
        tmp_fd = imgdir.open_dir(self.tmp)
        log_fd = -1
        try:
            # The daemon's own log file, created before the dir is the
            # owner's: criu gets it as stdout and never opens it by path.
            log_fd = imgdir.create_log(tmp_fd, DUMP_LOG)
            log_st = os.fstat(log_fd)
            ids = (run_as.uid, run_as.gid) if run_as is not None else None
            images_arg = imgdir.criu_dir(self.tmp, tmp_fd, ids, writable=True)
            if m is None:
                log_file = LogFile(log_fd, self.tmp / DUMP_LOG)
                result = await self._criu_frozen(images_arg, log_file, tmp_fd)
                if result is None:
                    return None
                chain = None
            else:
                argv = self._argv(m, images_arg, run_as)
                chain = await self._pre_dumps(argv, tmp_fd, run_as)
                if chain is not None:
                    argv = chained_argv(argv, round_link(self.spec.pre_dumps, final=True))
                result = await self._criu(argv, log_fd, tmp_fd, run_as)
            if not result.ok:
                await self._criu_failed(result, log_fd)
            assert self.manifest is not None
            return await self._seal(
                tmp_fd, run_as, {DUMP_LOG: (log_st.st_dev, log_st.st_ino)}, chain
            )
        finally:
            if log_fd >= 0:
                os.close(log_fd)
            os.close(tmp_fd)

    async def _criu(
        self, argv: list[str], log_fd: int, tmp_fd: int, run_as: RunAs | None
    ) -> CriuResult:
        """criu dump with argv, the images dir's growth watched as progress."""
        watch = _watching(tmp_fd) if self.spec.watch_images else contextlib.nullcontext()
        operations.report(phase="dumping")
        async with watch:
            return await self.rt.criu.run(
                argv,
                LogFile(log_fd, self.tmp / DUMP_LOG),
                pass_fds=[tmp_fd] if run_as is not None else [],
                run_as=run_as,
                watch_pid=self.spec.pid,
            )

    async def _criu_frozen(
        self, images_arg: Path, log_file: LogFile, tmp_fd: int
    ) -> CriuResult | None:
        """criu dump with the guessed argv on a warm worker, the tree walked meanwhile.

        None: no warm worker took it, or the walk found the guess wrong
        (criu failed the dump at post-dump, or on a pty slave the guess
        missed): the tree runs on, and nothing of the run is kept.
        """
        assert self.guess is not None
        argv = self._argv_guessed(images_arg, self.guess)

        async def accept(walked: _FrozenWalked) -> bool:
            return await self._accept(walked, images_arg, argv)

        walk = frozen.FrozenWalk(lambda: self._walk_frozen(images_arg, argv), accept)
        watch = _watching(tmp_fd) if self.spec.watch_images else contextlib.nullcontext()
        try:
            async with watch:
                result = await self.rt.criu.run_notified(
                    argv, log_file, walk.notify, watch_pid=self.spec.pid
                )
            if result is None or walk.retry:
                return None
            if not result.ok and await walk.disagrees():
                return None
            return result
        finally:
            await walk.settle()

    async def _criu_failed(self, result: CriuResult, log_fd: int) -> None:
        """Raise criu's failure, its log kept in the final dir."""
        err = await criu_errors.failure(
            self.rt.criu,
            f"dump of pid {self.spec.pid}",
            result,
            "dump",
            self.id,
            self.rt.settings.checkpoints_dir,
        )
        await asyncio.to_thread(_keep_log_only, self.tmp, self.final, log_fd)
        raise err

    async def _seal(
        self,
        tmp_fd: int,
        run_as: RunAs | None,
        expect: dict[str, tuple[int, int]],
        chain: imgdir.Chain | None,
    ) -> tuple[int, dict[str, int]]:
        """Seal what criu wrote; end or resume a tree criu left stopped."""
        assert self.manifest is not None
        owner = run_as.uid if run_as is not None else 0
        walked = self._walked(self.manifest)
        try:
            out = await asyncio.to_thread(
                _seal_dump, self.id, tmp_fd, owner, expect, chain, walked, run_as is None
            )
        except BaseException:
            if self._stops_tree():
                # Refused (tree_changed, tampering, a cancel): nothing
                # was taken from the tree, and it runs on.
                await asyncio.to_thread(signal_tree, self.spec.pid, owner, signal.SIGCONT)
            raise
        if self._stops_tree():
            await asyncio.to_thread(signal_tree, self.spec.pid, owner, signal.SIGKILL)
        return out

    async def _pre_dumps(
        self, argv: list[str], tmp_fd: int, run_as: RunAs | None
    ) -> imgdir.Chain | None:
        """The pre-dump rounds (spec.pre_dumps) into pre-1 .. pre-N, each sealed; their chain.

        Round k is `criu pre-dump --track-mem --prev-images-dir ../pre-<k-1>`:
        the tree runs on while its memory is copied, and each round copies
        only what changed since the one before (soft-dirty tracking); the
        final dump then stops the tree for the last changes alone.
        """
        if not self.spec.pre_dumps:
            return None
        rounds: dict[str, tuple[int, int]] = {}
        for k in range(1, self.spec.pre_dumps + 1):
            operations.report(phase=f"pre-dumping ({k}/{self.spec.pre_dumps})")
            name = f"{imgdir.ROUND_PREFIX}{k}"
            prev = round_link(k - 1) if k > 1 else None
            # The first round has no parent; each later one links the one before.
            chain = imgdir.Chain(tmp_fd, dict(rounds))
            if prev is not None:
                chain = imgdir.Chain(tmp_fd, dict(rounds), f"{imgdir.ROUND_PREFIX}{k - 1}", prev)
            rounds[name] = await self._pre_dump_round(argv, tmp_fd, name, prev, chain, run_as)
        last = f"{imgdir.ROUND_PREFIX}{self.spec.pre_dumps}"
        return imgdir.Chain(tmp_fd, rounds, last, round_link(self.spec.pre_dumps, final=True))

    async def _pre_dump_round(
        self,
        argv: list[str],
        tmp_fd: int,
        name: str,
        prev: str | None,
        chain: imgdir.Chain,
        run_as: RunAs | None,
    ) -> tuple[int, int]:
        """One pre-dump round into the daemon's new dir `name`; sealed; its (dev, ino)."""
        os.mkdir(name, 0o700, dir_fd=tmp_fd)
        fd = imgdir.open_dir_at(tmp_fd, name)
        log_fd = -1
        try:
            st = os.fstat(fd)
            log_fd = imgdir.create_log(fd, PRE_DUMP_LOG)
            log_st = os.fstat(log_fd)
            ids = (run_as.uid, run_as.gid) if run_as is not None else None
            images_arg = imgdir.criu_dir(self.tmp / name, fd, ids, writable=True)
            result = await self.rt.criu.run(
                pre_dump_argv(argv, images_arg, prev),
                LogFile(log_fd, self.tmp / name / PRE_DUMP_LOG),
                pass_fds=[fd] if run_as is not None else [],
                run_as=run_as,
                watch_pid=self.spec.pid,
            )
            if not result.ok:
                what = f"pre-dump {name} of pid {self.spec.pid}"
                root = self.rt.settings.checkpoints_dir
                err = await criu_errors.failure(self.rt.criu, what, result, "dump", self.id, root)
                await asyncio.to_thread(_keep_log_only, self.tmp, self.final, log_fd)
                raise err
            owner = run_as.uid if run_as is not None else 0
            expect = {PRE_DUMP_LOG: (log_st.st_dev, log_st.st_ino)}
            await asyncio.to_thread(_seal_dump, self.id, fd, owner, expect, chain)
            return st.st_dev, st.st_ino
        finally:
            if log_fd >= 0:
                os.close(log_fd)
            os.close(fd)

    def _walked(self, m: mf.Manifest) -> Walked | None:
        """What the dumped pstree.img may hold, for a caller the walk was checked for.

        Root may dump anything: None (nothing to check).  A tree in a pid
        namespace of its own has its images' pids in that namespace: only
        their number is compared there.
        """
        if self.caller.is_root:
            return None
        if "pid" in m.namespaces:
            return Walked(tids=None, count=len(m.pids))
        root = str(self.spec.pid)
        ids = None
        if self._stops_tree() and root in m.uids and root in m.gids:
            groups = tuple(sorted(m.groups or ()))
            ids = creds.TaskCreds(tuple(m.uids[root]), tuple(m.gids[root]), groups)
        return Walked(tids=frozenset(m.pids), count=len(m.pids), ids=ids)

    def _stops_tree(self) -> bool:
        """Whether criu leaves the dumped tree stopped, for the daemon to end after its checks.

        A non-root caller's dump is checked against the walk after criu ran
        (_check_dumped).  Had criu killed the tree at the end of the dump, a
        refusal there would lose the process; stopped, it is resumed on a
        refusal and killed once the checkpoint is sealed, as criu would.
        """
        return (
            not self.caller.is_root
            and not self.spec.options.leave_running
            and "--leave-stopped" not in self.spec.extra_args
        )

    def _argv_guessed(self, images_arg: Path, guess: frozen.Guess) -> list[str]:
        """The argv of a root's plain dump (frozen.applies) from the guess, not a walk.

        What the walk would give _argv, where no externals, bundle or flags
        are declared: the guessed ttys and the network lock.
        """
        lock = self._network_lock(own_namespaces(self.spec.pid))
        return self._argv_of(images_arg, None, (), guess.ttys, lock, (), None)

    def _argv(self, m: mf.Manifest, images_arg: Path, run_as: RunAs | None) -> list[str]:
        return self._argv_of(
            images_arg,
            run_as,
            tuple(m.external_unix_inodes(self.spec.options.external)),
            tuple(m.external_tty_keys()),
            m.network_lock,
            m.ext_namespaces,
            m.oci,
        )

    def _argv_of(
        self,
        images_arg: Path,
        run_as: RunAs | None,
        external_unix: tuple[int, ...],
        external_tty: tuple[str, ...],
        lock: str | None,
        ext_namespaces: tuple[mf.ExtNamespace, ...],
        oci_record: Mapping[str, Any] | None,
    ) -> list[str]:
        oci_extra: tuple[str, ...] = ()
        if oci_record is not None:
            from criud.dump import oci  # loaded by oci_probe

            # The bundle's arguments carry the network lock themselves.
            oci_extra = tuple(oci.dump_args_from_record(oci_record, network_lock=lock))
            lock = None
        return dump_argv(
            self.spec.pid,
            images_arg,
            self.spec.options,
            external_unix=external_unix,
            external_tty=external_tty,
            network_lock=lock,
            unprivileged=run_as is not None,
            external_ns=tuple((n.type, n.ino, n.key) for n in ext_namespaces),
            extra=(
                *oci_extra,
                *self.spec.extra_args,
                *(("--leave-stopped",) if self._stops_tree() else ()),
            ),
        )

    def _network_lock(self, own_ns: Mapping[str, int]) -> str | None:
        """The --network-lock method: for established TCP, or a network namespace of its own."""
        opts = self.spec.options
        return network_lock(self.rt.criu, opts.tcp_established or "net" in own_ns)


def _read_tree(
    pid: int, estimate: bool
) -> tuple[list[fdinfo.TaskInfo], dict[int, creds.TaskCreds], dict[str, int]]:
    """The tree's tasks and fds, every thread's ids; with estimate, its bytes and pages.

    Each thread's status file is read once: its ids (criud.daemon.creds),
    and for a task's main thread its memory too (the whole process's: the
    figures are per address space), for the estimate.  Threads that exit
    while we read are skipped (criu will not see them either).
    """
    tasks = fdinfo.read_tree(pid)
    ids: dict[int, creds.TaskCreds] = {}
    mems: list[proc_inspect.Memory] = []
    for t in tasks:
        for tid in t.tids:
            text = _status(t.pid, tid)
            if text is None:
                continue
            try:
                ids[tid] = creds.parse_status(text)
            except ValueError:
                continue
            if estimate and tid == t.pid:
                mems.append(proc_inspect.memory_from_status(text))
    return tasks, ids, _estimate(mems) if estimate else {}


def _holds_many_fds(pid: int) -> bool:
    """Whether pid holds FROZEN_MIN_FDS fds or more (a full listing of 10,000 takes 11 ms).

    fdinfo.fd_count's one stat where the kernel gives the count (6.2 and
    later); a listing that stops at FROZEN_MIN_FDS where it gives 0.
    """
    count = fdinfo.fd_count(pid)
    if count:
        return count >= FROZEN_MIN_FDS
    try:
        with os.scandir(f"/proc/{pid}/fd") as it:
            for n, _ in enumerate(it, 1):
                if n >= FROZEN_MIN_FDS:
                    return True
    except OSError:
        pass
    return False


async def _left(tasks: list[fdinfo.TaskInfo]) -> list[fdinfo.TaskInfo]:
    """_as_left, in a thread where its counts or listings would hold the event loop up."""
    if len(tasks) > INLINE_COUNT_MAX:
        return await asyncio.to_thread(_as_left, tasks)
    stale = _stale(tasks)
    if not stale:
        return tasks
    if sum(len(t.fds) for t in tasks if t.pid in stale) > INLINE_LISTING_MAX:
        return await asyncio.to_thread(_as_left, tasks, stale)
    return _as_left(tasks, stale)


def _stale(tasks: list[fdinfo.TaskInfo]) -> set[int]:
    """The tasks whose fds may differ from the walk's listing: their fd count does.

    The task is frozen, and holds what it held when the walk listed its
    fds, less what criu held there then: the same count means the same
    fds.  An unknown count (a kernel before 6.2 gives 0) is listed.
    """
    return {t.pid for t in tasks if t.listed is None or fdinfo.fd_count(t.pid) != t.listed}


def _as_left(tasks: list[fdinfo.TaskInfo], stale: set[int] | None = None) -> list[fdinfo.TaskInfo]:
    """The walked tasks without the fds criu's parasite held while the walk read them.

    A task criu is dumping holds criu's own fds for that while: the
    parasite's socket to criu, criu's log, the pipes its pages go through
    (compel's infect.c, criu's mem.c).  A walk beside criu may read a task
    then; by post-dump every task is cured and still frozen, so an fd the
    walk saw that the task no longer holds was criu's.  (A frozen task
    opens nothing: an fd the walk did not list is one it could not
    classify, left out as a walk-first dump leaves it out.)  Only the stale
    tasks (_stale; None: find them) are listed again.  The list itself
    comes back when no task lost an fd: what was built from it stands.
    """
    if stale is None:
        stale = _stale(tasks)
    out: list[fdinfo.TaskInfo] = []
    changed = False
    for t in tasks:
        if t.pid not in stale:
            out.append(t)
            continue
        now = set(fdinfo.fd_numbers(t.pid))
        walked = {f["fd"] for f in t.fds}
        if walked - now:
            changed = True
            t = dataclasses.replace(t, fds=[f for f in t.fds if f["fd"] in now])
        out.append(t)
    if not changed:
        return tasks
    fdinfo.mark_external([t.fds for t in out])
    return out


def _status(pid: int, tid: int) -> str | None:
    """/proc/<pid>/task/<tid>/status, or None if the thread is gone."""
    # os.open/os.read: a text-mode open() costs more than the read itself.
    try:
        fd = os.open(f"/proc/{pid}/task/{tid}/status", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.read(fd, 65536).decode("ascii", "replace")
    except OSError:
        return None
    finally:
        os.close(fd)


def _estimate(mems: list[proc_inspect.Memory]) -> dict[str, int]:
    """The dump's expected bytes and pages, from the tasks' memory as preflight reads it."""
    return {
        "bytes_total": dump_preflight.estimate_from_memory(mems),
        "pages_total": dump_preflight.dumped_memory(mems) // PAGE_SIZE,
    }


@contextlib.asynccontextmanager
async def _watching(dirfd: int) -> AsyncIterator[None]:
    """Report the images dir's growth as the operation's progress while the block runs.

    A timer on the event loop, each look a short thread job (a scandir and
    an lstat per image, imgdir.usage); nothing runs outside an operation.
    The watcher is stopped, not cancelled, and awaited: a look in flight
    finishes before the caller may close dirfd.
    """
    if operations.current.get() is None:
        yield
        return
    stop = asyncio.Event()
    # The watcher's own fd of the dir (CLOEXEC), closed when it ends: even a
    # second cancel of the caller never has it look at a closed, reused fd.
    own = os.dup(dirfd)

    async def watch() -> None:
        while True:
            try:
                await asyncio.wait_for(stop.wait(), WATCH_INTERVAL_S)
                return
            except TimeoutError:
                pass
            try:
                total, pages = await asyncio.to_thread(imgdir.usage, own)
            except OSError:
                return  # the dir went away: the dump is failing anyway
            operations.report(bytes_done=total, pages_done=pages // PAGE_SIZE)

    task = asyncio.ensure_future(watch())
    task.add_done_callback(lambda _: os.close(own))
    try:
        yield
    finally:
        stop.set()
        await asyncio.shield(task)


def oci_probe(bundle: str, pid: int) -> dict[str, Any]:
    """Read an OCI bundle and check pid is its container's init; return the record."""
    # Here, not at import: only an OCI bundle's dump needs them (with
    # restore/'s and the archives', about 0.7 MiB of an idle daemon).
    from criud.dump import oci, oci_archive

    try:
        spec, doc = oci.load_spec_doc(bundle)
        record = oci.to_record(spec, oci.probe(spec, pid))
        # Kept for an export's spec.dump (criud.dump.oci_archive): the
        # bundle's config.json as it was at dump time.
        record[oci_archive.SPEC_KEY] = doc
        return record
    except oci.OciError as e:
        e.extra.setdefault("bundle", bundle)
        raise


def external_namespaces(
    pid: int, opts: DumpOptions, own_ns: dict[str, int], m: mf.Manifest
) -> tuple[mf.ExtNamespace, ...]:
    """Check the namespaces the caller wants left out; return them with inodes."""
    out: list[mf.ExtNamespace] = []
    fd_keys = m.all_keys()
    for ns_type, key in opts.external_namespaces:
        if ns_type not in own_ns:
            raise InvalidRequest(
                f"external namespace {key!r}: pid {pid} shares the daemon's {ns_type} "
                "namespace, so there is none of its own to leave out",
                key=key,
            )
        if key in fd_keys or any(n.key == key for n in out):
            raise InvalidRequest(f"external namespace key {key!r} is used twice", key=key)
        out.append(mf.ExtNamespace(type=ns_type, key=key, ino=own_ns[ns_type]))
    return tuple(out)


def own_namespaces(pid: int) -> dict[str, int]:
    """Namespaces of the tree's root that differ from the daemon's: type -> inode."""
    mine = procutil.namespaces("self")
    theirs = procutil.namespaces(pid)
    return {ns: ino for ns, ino in theirs.items() if mine.get(ns) != ino}


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


@dataclasses.dataclass(frozen=True)
class Walked:
    """The threads the walk checked the caller's ids on (tids None: only how many)."""

    tids: frozenset[int] | None
    count: int
    # When criu left the tree stopped (_Dump._stops_tree): the ids every
    # thread of it holds; a thread the walk missed is checked against them.
    ids: creds.TaskCreds | None = None


def _ids_now(tid: int) -> creds.TaskCreds | None:
    """A thread's ids as /proc shows them now (None if it cannot be read)."""
    text = _status(tid, tid)
    try:
        return None if text is None else creds.parse_status(text)
    except ValueError:
        return None


def signal_tree(root: int, uid: int | None, signo: int) -> None:
    """signo to root and its descendants, each through a pidfd and only if wholly uid's.

    The tree is stopped (criu's --leave-stopped): none of it can fork or
    exit on its own.  Each task's children are listed before it is
    signalled, and a task is signalled only when its real, effective, saved
    and fs uids are all uid (None: whoever's; root's own dumps), read with
    its pidfd open: a pid its owner freed and someone else took is never
    signalled.
    """
    todo, seen = [root], set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            continue
        try:
            if uid is None or set(procutil.status_ids(pid, "Uid")) == {uid}:
                todo.extend(procutil.children(pid))
                signal.pidfd_send_signal(pidfd, signo)
        except (OSError, ValueError):
            pass  # gone meanwhile
        finally:
            os.close(pidfd)


def _seal_dump(
    ckpt_id: str,
    dirfd: int,
    owner: int,
    expect: dict[str, tuple[int, int]],
    chain: imgdir.Chain | None = None,
    walked: Walked | None = None,
    roots_only: bool = False,
) -> tuple[int, dict[str, int]]:
    """Seal a dumped dir (root's, read-only to others); then its size and stats.

    Only then is anything in it read: before, the owner could change it.
    With walked, the threads criu dumped are checked against it first.
    roots_only: root's criu wrote the dir, never the owner's (imgdir.seal).
    """
    try:
        size = imgdir.seal(dirfd, owner, expect, chain, roots_only)
    except imgdir.UnsafeEntry as e:
        raise imgdir.tampered(ckpt_id, e) from None
    if walked is not None:
        _check_dumped(ckpt_id, dirfd, walked)
    return size, images.stats_in(dirfd, "stats-dump")


def _check_dumped(ckpt_id: str, dirfd: int, walked: Walked) -> None:
    """Refuse a dump that holds a thread the walk never checked the caller's ids on.

    The dump's one walk reads the ids of the threads it found; a task forked
    after the walk listed the tree (and before criu froze it) was dumped
    unchecked.  Such a task may have exec'd a setuid program: restoring it
    would hand its ids to the caller.  criu froze exactly what pstree.img
    lists, so that list, against the walk's, closes the gap.
    """
    try:
        tree = images.pstree_in(dirfd)
    except (OSError, images.ImageError) as e:
        raise TreeChanged(f"checkpoint {ckpt_id}: its pstree.img is unreadable: {e}") from e
    dumped = [tid for t in tree for tid in (t["threads"] or [t["pid"]])]
    if walked.tids is not None:
        unchecked = sorted(set(dumped) - walked.tids)
    else:
        unchecked = [] if len(dumped) <= walked.count else dumped[walked.count :]
    if unchecked and walked.ids is not None:
        # The tree has stayed stopped since criu froze it (--leave-stopped):
        # a thread the walk missed holds now the very ids it was dumped
        # with, and can be checked here (a shell forking all the time was
        # refused on every try without this).
        unchecked = [tid for tid in unchecked if _ids_now(tid) != walked.ids]
    if unchecked:
        raise TreeChanged(
            f"checkpoint {ckpt_id}: the tree grew while it was dumped: criu dumped "
            f"{len(dumped)} threads, {len(unchecked)} of them (pid {unchecked[0]}) "
            "started after their owner was checked; try again",
            pids=unchecked[:16],
        )
