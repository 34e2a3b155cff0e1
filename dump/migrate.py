"""The source's side of a migration: a running tree (or a checkpoint) to another daemon.

A tree (`pid`):
1. the destination is asked to open a one-shot page server
   (POST /v1/migrations/incoming, with its token): a refusal ends here,
   before anything is frozen;
2. the tree is dumped by criud.dump.job with `--page-server --address A
   --port P` (and criu's TLS flags where asked) and `--leave-stopped`: the
   pages stream to the destination; the few other images (~50 KiB) stay in
   a local checkpoint; the tree is left stopped, not killed;
3. those images go to the destination as criud's archive (PUT
   /v1/migrations/incoming/{id}/images), which commits its checkpoint;
4. only then is the source tree killed (SIGKILL, it is stopped) and the
   local checkpoint removed.  Any failure before the commit: the destination
   is told to abort (DELETE), the tree gets SIGCONT and runs on, the local
   checkpoint is removed.  criu itself resumes the tree if the dump fails.

Why --leave-stopped: a plain dump kills the tree at its end, before the
other images are out; a failed transfer would lose it.  --leave-running
would let the tree run on and diverge (write output, answer peers) while
the destination gets its state from before.  Stopped, the tree does
neither; the cost is the transfer of the other images and the commit
(a few ms for ~50 KiB), added to the downtime.

A checkpoint (`checkpoint`): it is exported as an archive straight into
the destination's import (POST /v1/checkpoints/import); same answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable
from typing import Any, Protocol

from criud.daemon import archive, kprobe, operations, peer
from criud.daemon.caller import Caller
from criud.daemon.errors import (
    CheckpointNotReady,
    CriudError,
    InvalidRequest,
    MigrationFailed,
    PermissionDenied,
)
from criud.daemon.operations import Progress
from criud.daemon.store import CheckpointRecord
from criud.dump import export
from criud.dump import job as dump_job
from criud.dump.options import DumpOptions

log = logging.getLogger("criud.migrate")

INCOMING = "/v1/migrations/incoming"
# How often the destination is asked what it received, while the pages go.
WATCH_INTERVAL_S = 0.25
# How often it is asked whether criu has connected yet, to open the commit.
EARLY_POLL_S = 0.02
# How long a failed dump waits for the early commit's answer (the reason).
COMMIT_ERROR_WAIT_S = 2.0
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@dataclasses.dataclass(frozen=True)
class MigrationSpec:
    """What to move where: exactly one of pid and checkpoint."""

    target: peer.Target
    pid: int | None = None
    checkpoint: str | None = None
    name: str | None = None
    options: DumpOptions = dataclasses.field(default_factory=DumpOptions)
    labels: dict[str, str] = dataclasses.field(default_factory=dict)
    # None: TLS when this daemon has a CA, certificate and key configured.
    tls: bool | None = None
    # A remote lazy (post-copy) dump: probed, and refused where it does not work.
    post_copy: bool = False


@dataclasses.dataclass(frozen=True)
class MigrationResult:
    """The destination's checkpoint, and where the time went (seconds)."""

    id: str
    checkpoint: str
    destination: str
    source_pid: int | None
    tls: bool
    timing: dict[str, float]
    bytes_sent: int
    destination_checkpoint: dict[str, Any]


class MigrateRuntime(dump_job.DumpRuntime, Protocol):
    """What the running daemon lends a migration, beyond a dump's needs."""

    def busy(self, ckpt_id: str, message: str) -> contextlib.AbstractContextManager[None]:
        """Hold a checkpoint against deletes and restores for the block."""
        ...

    async def checkpoint_for(self, ref: str, caller: Caller) -> CheckpointRecord:
        """The caller's checkpoint by name or id (404 for a stranger's)."""
        ...

    async def drop_checkpoint(self, rec: CheckpointRecord) -> None:
        """Remove a local checkpoint (record and images) the migration made."""
        ...

    def export_meta(self) -> dict[str, Any]:
        """Who writes an archive (criud.json's criud, criu and kernel)."""
        ...


async def run(rt: MigrateRuntime, spec: MigrationSpec, caller: Caller) -> MigrationResult:
    """Move spec's tree (or checkpoint) to spec.target; the destination's checkpoint id."""
    if not caller.is_root:
        # The daemon would connect wherever a caller names: root's only.
        raise PermissionDenied("migrations are root's (or a token holder's)")
    if (spec.pid is None) == (spec.checkpoint is None):
        raise InvalidRequest("a migration names exactly one of pid and checkpoint")
    if spec.post_copy:
        # Before the destination is asked or anything frozen.  The probe
        # (criud.daemon.kprobe) reports post-copy unsupported on every host
        # today, with why; a probe that one day says yes must not fall
        # through to a pre-copy move that ignores the request.
        kprobe.require(rt.criu, "post_copy_migration", "a post-copy migration")
        raise InvalidRequest("post-copy migration is not implemented by this criud")
    tls = _tls_wanted(rt, spec)
    if spec.checkpoint is not None:
        return await _ship_checkpoint(rt, spec, caller, spec.checkpoint)
    assert spec.pid is not None
    return await _Move(rt, spec, caller, spec.pid, tls).run()


def _tls_wanted(rt: MigrateRuntime, spec: MigrationSpec) -> bool:
    have = rt.settings.tls_cacert is not None
    if spec.tls and not have:
        raise InvalidRequest("TLS was asked for, but this daemon has no --tls-cacert/cert/key")
    return have if spec.tls is None else spec.tls


class _Move:
    """One live migration of a tree, from the destination's page server to its commit."""

    def __init__(
        self, rt: MigrateRuntime, spec: MigrationSpec, caller: Caller, pid: int, tls: bool
    ) -> None:
        self.rt, self.spec, self.caller, self.pid, self.tls = rt, spec, caller, pid, tls
        self.t0 = time.monotonic()
        self.wall0 = time.time()
        self.incoming: str | None = None
        self.local: CheckpointRecord | None = None
        # Whether the early commit (the PUT) was opened on the destination.
        self.committing = False

    async def run(self) -> MigrationResult:
        # Refused callers and gone pids leave the destination untouched.
        await dump_job.tree_creds(self.rt.criu, self.pid, self.caller)
        operations.report(phase="opening")
        inc = await peer.call(
            self.spec.target, "POST", INCOMING, {"name": self.spec.name, "tls": self.tls}
        )
        self.incoming = str(inc["id"])
        try:
            return await self._push(str(inc["address"]), int(inc["port"]))
        except BaseException as e:
            await self._undo(e)
            raise
        finally:
            if self.local is not None:
                with contextlib.suppress(Exception):
                    await self.rt.drop_checkpoint(self.local)

    async def _push(self, address: str, port: int) -> MigrationResult:
        t_dump = time.monotonic()
        # The commit (PUT of the other images) is opened while the pages are
        # still pushed: the destination's request handling and its wait for
        # the page server overlap the dump, and only the ~50 KiB body and the
        # import are left for after it (the tree is stopped by then).
        dumped: asyncio.Future[CheckpointRecord] = asyncio.get_running_loop().create_future()
        commit = asyncio.ensure_future(self._commit(dumped))
        try:
            self.local = await self._dump(address, port, commit)
        except BaseException:
            await _cancelled(commit)
            raise
        pages_s = time.monotonic() - t_dump
        operations.report(phase="sending")
        t_send = time.monotonic()
        dumped.set_result(self.local)
        try:
            got, sent = await commit
        finally:
            await _cancelled(commit)
        other_s = time.monotonic() - t_send
        if not self.spec.options.leave_running:
            await _signal_tree(self.local, signal.SIGKILL)
        stats = self.local.stats or {}
        timing = {
            "frozen": stats.get("frozen_time_us", 0) / 1e6,
            "pages": pages_s,
            "other_images": other_s,
            "total": time.monotonic() - self.t0,
        }
        log.info(
            "migrated pid %d to %s as %s: %s", self.pid, self.spec.target.url, got["id"], timing
        )
        return MigrationResult(
            id=str(got["id"]),
            checkpoint=str(got["id"]),
            destination=self.spec.target.url,
            source_pid=self.pid,
            tls=self.tls,
            timing=timing,
            bytes_sent=sent,
            destination_checkpoint=got,
        )

    async def _commit(self, dumped: asyncio.Future[CheckpointRecord]) -> tuple[dict[str, Any], int]:
        """PUT the other images, opened once criu pushes (or the dump is over), sent once done.

        Opened no earlier than the destination's page server has its
        connection: a commit there before any source connected is refused.
        """
        while not dumped.done():
            inc = await peer.call(self.spec.target, "GET", f"{INCOMING}/{self.incoming}")
            if inc.get("state") != "waiting":
                break
            await asyncio.wait([dumped], timeout=EARLY_POLL_S)
        self.committing = True
        path = f"{INCOMING}/{self.incoming}/images"
        return await _send(self.rt, dumped, self.spec.target, "PUT", path, "none")

    async def _dump(
        self, address: str, port: int, commit: asyncio.Future[tuple[dict[str, Any], int]]
    ) -> CheckpointRecord:
        """The dump, pages to the page server; the tree left stopped (or running)."""
        args = ["--page-server", "--address", address, "--port", str(port)]
        if self.tls:
            args += peer.criu_tls_args(self.rt.settings)
        opts = self.spec.options
        if not opts.leave_running:
            args.append("--leave-stopped")
        spec = dump_job.CheckpointSpec(
            pid=self.pid,
            name=None,
            options=opts,
            labels=dict(self.spec.labels),
            extra_args=tuple(args),
            watch_images=False,
        )
        try:
            async with self._watching_destination():
                return await dump_job.run(self.rt, spec, self.caller)
        except CriudError as e:
            theirs = await self._their_error() or await self._commit_error(commit)
            why = f" (the destination's page server: {theirs['detail']})" if theirs else ""
            raise MigrationFailed(
                f"migration of pid {self.pid}: the dump failed: {e.detail}{why}",
                cause=e.code,
                destination_error=theirs,
                **{k: v for k, v in e.extra.items() if k in ("hint", "log_tail", "criu_error")},
            ) from e

    @contextlib.asynccontextmanager
    async def _watching_destination(self) -> AsyncIterator[None]:
        """While the block runs, report the bytes the destination received as progress."""
        if operations.current.get() is None:
            yield
            return

        async def watch() -> None:
            while True:
                await asyncio.sleep(WATCH_INTERVAL_S)
                try:
                    inc = await peer.call(self.spec.target, "GET", f"{INCOMING}/{self.incoming}")
                except CriudError:
                    return
                got = inc.get("bytes_received")
                if isinstance(got, int):
                    operations.report(bytes_done=got, pages_done=got // PAGE_SIZE)

        task = asyncio.ensure_future(watch())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task

    async def _their_error(self) -> dict[str, Any] | None:
        """Why the destination's page server failed, if it did (a full disk, say)."""
        # The page server may still be writing its own account down: a
        # short, bounded wait while it is "receiving".
        for _ in range(20):
            try:
                inc = await peer.call(self.spec.target, "GET", f"{INCOMING}/{self.incoming}")
            except CriudError:
                return None
            err = inc.get("error")
            if isinstance(err, dict):
                return err
            if inc.get("state") != "receiving":
                return None
            await asyncio.sleep(0.1)
        return None

    async def _commit_error(
        self, commit: asyncio.Future[tuple[dict[str, Any], int]]
    ) -> dict[str, Any] | None:
        """The destination's answer to an early commit, if its page server failed first.

        That commit ends the incoming migration itself (so the state the
        destination answers GET with is gone): its refusal says why.
        """
        if not self.committing:
            return None
        # Its own failure (or the timeout) is what is looked at below; a
        # cancellation of this migration still propagates.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(commit), COMMIT_ERROR_WAIT_S)
        if not commit.done() or commit.cancelled():
            return None
        err = commit.exception()
        problem = err.extra.get("problem") if isinstance(err, CriudError) else None
        if isinstance(problem, dict) and problem.get("code"):
            return {"code": problem["code"], "detail": problem.get("detail")}
        return None

    async def _undo(self, e: BaseException) -> None:
        """After a failure: the destination aborts; a stopped source tree runs on."""
        if self.local is not None and not self.spec.options.leave_running:
            await _signal_tree(self.local, signal.SIGCONT)
        elif self.local is None:
            # A failed dump left its (failed) record: the migration's, removed.
            await self._drop_failed()
        with contextlib.suppress(CriudError, OSError):
            await peer.call(self.spec.target, "DELETE", f"{INCOMING}/{self.incoming}")
        log.warning("migration of pid %d failed (%s); the tree runs on", self.pid, e)

    async def _drop_failed(self) -> None:
        recs = await self.rt.store.run(self.rt.store.list_checkpoints)
        for rec in recs:
            if rec.pid == self.pid and rec.state == "failed" and rec.created_at >= self.wall0 - 1:
                with contextlib.suppress(Exception):
                    await self.rt.drop_checkpoint(rec)


async def _signal_tree(rec: CheckpointRecord, signo: int) -> None:
    """Send signo to the tree the dump left stopped (SIGKILL once committed, else SIGCONT).

    Through pidfds from the dumped root down (criud.dump.job.signal_tree):
    stopped tasks cannot exit, and a pid freed by another's SIGKILL and
    taken by someone else is never signalled.  The tree may be anyone's
    the caller was allowed to migrate (its ids were checked before).
    """
    await asyncio.to_thread(dump_job.signal_tree, rec.pid, None, signo)


async def _send(
    rt: MigrateRuntime,
    rec: Awaitable[CheckpointRecord],
    target: peer.Target,
    method: str,
    path: str,
    compression: str,
) -> tuple[dict[str, Any], int]:
    """Stream rec's images as criud's archive in a request body; (the answer, bytes sent).

    The request goes out at once; its body waits for rec (a live
    migration's dump may still be running).
    """
    body = _ArchiveBody(rt, compression)
    try:
        answer = await peer.call(target, method, path, stream=body.chunks(rec))
    finally:
        sent = await body.close()
    return answer, sent


class _ArchiveBody:
    """A checkpoint's archive as a request body, produced in a thread; closed on every path."""

    def __init__(self, rt: MigrateRuntime, compression: str) -> None:
        self.rt, self.compression = rt, compression
        self.stack = contextlib.ExitStack()
        self.outbox: archive.Outbox | None = None
        self.work: asyncio.Future[int] | None = None

    async def chunks(self, pending: Awaitable[CheckpointRecord]) -> AsyncIterator[bytes]:
        rec = await pending
        rt = self.rt
        self.stack.enter_context(rt.busy(rec.id, f"checkpoint {rec.id} is being migrated"))
        ckpt_dir = rt.settings.checkpoints_dir / rec.id
        prep = await asyncio.to_thread(
            export.prepare, ckpt_dir, rec, self.compression, rt.export_meta()
        )
        self.stack.callback(prep.close)
        progress = Progress(phase="sending", bytes_done=0, bytes_total=prep.tar_size)
        self.outbox = archive.Outbox(
            asyncio.get_running_loop(), stall_s=rt.settings.archive_stall_s
        )
        self.work = archive.in_thread(
            export.produce,
            prep,
            self.outbox,
            progress,
            rt.settings.export_zstd_level,
            rt.settings.export_zstd_threads,
            name="criud-migrate",
        )
        async for chunk in _counted(self.outbox, progress):
            yield chunk

    async def close(self) -> int:
        """Stop the producer, wait for it (bounded), release the images; the bytes it wrote."""
        try:
            if self.outbox is not None:
                self.outbox.stopped.set()
            if self.work is None:
                return 0
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(asyncio.shield(self.work), 30)
            if self.work.done() and not self.work.cancelled() and not self.work.exception():
                return self.work.result()
            return 0
        finally:
            self.stack.close()


async def _cancelled(task: asyncio.Future[Any]) -> None:
    """Cancel task if it still runs and wait for it to end (its error is not ours)."""
    if not task.done():
        task.cancel()
    with contextlib.suppress(BaseException):
        await task


async def _counted(outbox: archive.Outbox, progress: Progress) -> AsyncIterator[bytes]:
    async for chunk in outbox.chunks():
        operations.report(bytes_done=progress.bytes_done, bytes_total=progress.bytes_total)
        yield chunk


async def _ship_checkpoint(
    rt: MigrateRuntime, spec: MigrationSpec, caller: Caller, ref: str
) -> MigrationResult:
    """An existing checkpoint, exported into the destination's import: same answer."""
    t0 = time.monotonic()
    rec = await rt.checkpoint_for(ref, caller)
    if rec.state != "done":
        raise CheckpointNotReady(f"checkpoint {ref!r} is {rec.state}", checkpoint=rec.id)
    operations.report(phase="sending")
    name = spec.name or rec.name
    path = "/v1/checkpoints/import" + (f"?{urllib.parse.urlencode({'name': name})}" if name else "")
    ready: asyncio.Future[CheckpointRecord] = asyncio.get_running_loop().create_future()
    ready.set_result(rec)
    got, sent = await _send(rt, ready, spec.target, "POST", path, "zstd")
    took = time.monotonic() - t0
    return MigrationResult(
        id=str(got["id"]),
        checkpoint=str(got["id"]),
        destination=spec.target.url,
        source_pid=None,
        tls=False,
        timing={"frozen": 0.0, "pages": 0.0, "other_images": took, "total": took},
        bytes_sent=sent,
        destination_checkpoint=got,
    )
