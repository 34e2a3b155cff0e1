"""The import job: an archive from the request body becomes a new, done checkpoint.

The body is read on the event loop and handed (bounded, criud.daemon.
archive.Inbox) to a worker thread that hashes it, decompresses it under
the caps and unpacks it safely (criud.daemon.archive.extract) into a stage
dir inside a fresh `.tmp-<id>` dir of the checkpoints dir.  Then the
layout is decided, criud.json (hostile input) validated, the images moved
up beside their stage, sealed as a dump's are, and the dir renamed to its
id; only then is the record inserted.  Any failure (a bad archive, a wrong
digest, a full disk, a cancel, a client gone) removes the tmp dir: nothing
is left behind.  A daemon killed mid-import leaves a `.tmp-` dir that the
next start removes.

The imported checkpoint belongs to the caller, whatever criud.json says;
a non-root caller's is restored with criu running as that caller (the
manifest's run_as is the caller's own ids), and only if every task of the
tree ran as that caller (the restore's own check of the manifest's uids).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

from criud.daemon import archive, creds, imgdir, names
from criud.daemon.archive import Extracted, Limits
from criud.daemon.caller import Caller
from criud.daemon.config import Settings
from criud.daemon.errors import (
    ArchiveInvalid,
    ArchiveLayoutUnknown,
    ArchiveManifestInvalid,
    ArchiveTooLarge,
    ArchiveUnsafeName,
    ClientGone,
    CriudError,
    DigestMismatch,
    InvalidName,
    ManifestInvalid,
    NameTaken,
    PermissionDenied,
)
from criud.daemon.jsonlimits import MAX_DEPTH, json_depth
from criud.daemon.operations import Progress
from criud.daemon.store import CheckpointRecord, CheckpointState, Store
from criud.dump import images
from criud.dump.argv import DUMP_LOG
from criud.dump.export import FORMAT, IMAGES_PREFIX, MANIFEST_NAME, STATS
from criud.dump.job import TMP_PREFIX
from criud.dump.manifest import Manifest
from criud.dump.options import DumpOptions
from criud.restore import oci_archive

log = logging.getLogger("criud.import")

STAGE = "stage"
# As the API accepts label keys (criud.api.models.LABEL_KEY).
_LABEL_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-/]{0,62}")
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
MANIFEST_CAP = 64 << 20
# The body is handed to the worker thread in pieces of about this size.
_BATCH = 1 << 20
# How long a cancelled import waits for its worker thread to stop writing.
_THREAD_GRACE_S = 30.0


@dataclasses.dataclass(frozen=True)
class ImportSpec:
    name: str | None
    # (hashlib name, digest) the client sent (Content-Digest / Digest).
    digest: tuple[str, bytes] | None
    limits: Limits
    # A body that brings nothing for this long is taken for abandoned.
    stall_s: float = 300.0


class ImportRuntime(Protocol):
    """What the running daemon lends an import job."""

    settings: Settings
    store: Store


@dataclasses.dataclass
class _Unpacked:
    files: list[Extracted]
    compression: str
    digest: bytes | None
    raw_bytes: int


class _Body:
    """The raw body as the worker reads it: hashed, counted, capped."""

    def __init__(self, src: archive.Inbox, algo: str | None, cap: int) -> None:
        self.src, self.cap, self.count = src, cap, 0
        self.hash = hashlib.new(algo) if algo else None

    def read(self, n: int, /) -> bytes:
        data = self.src.read(n)
        self.count += len(data)
        if self.count > self.cap:
            raise ArchiveTooLarge(f"the archive is larger than {self.cap} bytes", limit=self.cap)
        if self.hash is not None:
            self.hash.update(data)
        return data


def _unpack(inbox: archive.Inbox, stage_fd: int, spec: ImportSpec) -> _Unpacked:
    """Extract the body into stage_fd, then read it to its end (the digest covers all)."""
    body = _Body(inbox, spec.digest[0] if spec.digest else None, spec.limits.max_bytes)
    files, compression = archive.extract(body, stage_fd, spec.limits)
    # Whatever follows the tar's end (padding, trailing frames) is hashed too.
    while body.read(archive.CHUNK):
        pass
    digest = body.hash.digest() if body.hash is not None else None
    return _Unpacked(files, compression, digest, body.count)


async def _receive(
    body: AsyncIterator[bytes], inbox: archive.Inbox, progress: Progress, stall_s: float
) -> None:
    """Feed the request body to the worker; abort it if the body does not come whole."""
    # The server hands the body over in socket-sized pieces (64 KiB or so);
    # batching them to ~1 MiB makes each hand-off to the thread worth its cost.
    buf = bytearray()
    it = aiter(body)
    try:
        while True:
            try:
                # asyncio.timeout, not wait_for: wait_for runs anext in a
                # task of its own, and a cancel of this one (DELETE of the
                # operation) then waited for the next body piece (seen: 30 s).
                async with asyncio.timeout(stall_s):
                    chunk = await anext(it)
            except StopAsyncIteration:
                break
            except TimeoutError:
                raise ClientGone(f"the archive's body stalled for {stall_s:g} s") from None
            progress.add_bytes(len(chunk))
            buf += chunk
            if len(buf) >= _BATCH:
                await inbox.put(bytes(buf))
                buf.clear()
        if buf:
            await inbox.put(bytes(buf))
    except (CriudError, asyncio.CancelledError):
        inbox.abort()
        raise
    except Exception as e:
        # The server's ClientDisconnect, a broken body: the client's doing.
        inbox.abort()
        raise ClientGone(f"the archive did not arrive whole ({type(e).__name__})") from e
    inbox.close()


async def _receive_and_unpack(
    body: AsyncIterator[bytes], stage_fd: int, spec: ImportSpec, progress: Progress
) -> _Unpacked:
    """Run the receiver (event loop) and the unpacker (thread) together; both end here."""
    inbox = archive.Inbox(asyncio.get_running_loop())
    feed = asyncio.ensure_future(_receive(body, inbox, progress, spec.stall_s))
    work = archive.in_thread(_unpack, inbox, stage_fd, spec, name="criud-import")
    try:
        both: list[asyncio.Future[Any]] = [feed, work]
        await asyncio.wait(both, return_when=asyncio.FIRST_EXCEPTION)
        if feed.done() and feed.exception() is not None:
            # The client went away (or sent garbage framing): its error, not
            # the worker's "stopped".
            await asyncio.wait([work], timeout=_THREAD_GRACE_S)
            raise feed.exception()  # type: ignore[misc]
        result = await work
        await feed
        return result
    finally:
        if not feed.done():
            feed.cancel()
        inbox.abort()
        # The worker writes into the stage: it must have stopped before the
        # caller removes it (it stops at its next read, the inbox aborted).
        if not work.done():
            await asyncio.wait([work], timeout=_THREAD_GRACE_S)
        with contextlib.suppress(BaseException):
            await asyncio.gather(feed, return_exceptions=True)


async def run(
    rt: ImportRuntime,
    spec: ImportSpec,
    body: AsyncIterator[bytes],
    caller: Caller,
    progress: Progress,
    admit: Callable[[int], Awaitable[None]] | None = None,
) -> CheckpointRecord:
    """Import the archive body as a new checkpoint of the caller's; return its record.

    admit, when given, is awaited with the images' size once they are
    unpacked and before the checkpoint is committed: the caller's byte
    quota judges the real size there, and its refusal leaves nothing.
    """
    if spec.name is not None:
        names.check_name(spec.name)
        await _check_free(rt, spec.name, caller)
    ckpt_id = names.new_id()
    os.mkdir(rt.settings.checkpoints_dir / f"{TMP_PREFIX}{ckpt_id}", 0o700)
    return await run_into(rt, spec, body, caller, progress, ckpt_id, admit)


async def run_into(
    rt: ImportRuntime,
    spec: ImportSpec,
    body: AsyncIterator[bytes],
    caller: Caller,
    progress: Progress,
    ckpt_id: str,
    admit: Callable[[int], Awaitable[None]] | None = None,
    origin: str | None = None,
) -> CheckpointRecord:
    """Import the body into the existing `.tmp-<ckpt_id>` dir and commit it; removed on failure.

    The dir may hold images already (an incoming migration's pages, which
    its page server wrote): a member that collides with one is refused.
    origin, when given, is the record's (else the archive's kind says).
    """
    tmp = rt.settings.checkpoints_dir / f"{TMP_PREFIX}{ckpt_id}"
    final = rt.settings.checkpoints_dir / ckpt_id
    try:
        tmp_fd = imgdir.open_dir(tmp)
        try:
            rec = await _import_into(rt, spec, body, caller, progress, ckpt_id, tmp_fd)
        finally:
            os.close(tmp_fd)
        if origin is not None:
            rec = dataclasses.replace(rec, origin=origin)
        if admit is not None:
            await admit(rec.size_bytes or 0)
        await asyncio.to_thread(os.rename, tmp, final)
        try:
            await rt.store.run(rt.store.insert_checkpoint, rec)
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, final, True)
            raise
    except BaseException:
        await asyncio.to_thread(shutil.rmtree, tmp, True)
        raise
    log.info("imported checkpoint %s (%s bytes of images)", ckpt_id, rec.size_bytes)
    return rec


async def _check_free(rt: ImportRuntime, name: str, caller: Caller) -> None:
    """NameTaken now, before the body is read, if the caller has a checkpoint of that name."""
    if await rt.store.run(rt.store.find_checkpoint, name, caller.uid, caller.uid) is not None:
        raise NameTaken(f"a checkpoint named {name!r} exists already", name=name)


async def _import_into(
    rt: ImportRuntime,
    spec: ImportSpec,
    body: AsyncIterator[bytes],
    caller: Caller,
    progress: Progress,
    ckpt_id: str,
    tmp_fd: int,
) -> CheckpointRecord:
    os.mkdir(STAGE, 0o700, dir_fd=tmp_fd)
    stage_fd = os.open(STAGE, _DIR, dir_fd=tmp_fd)
    try:
        got = await _receive_and_unpack(body, stage_fd, spec, progress)
        if spec.digest is not None and got.digest != spec.digest[1]:
            raise DigestMismatch(
                f"the body's {spec.digest[0]} does not match the digest sent with it",
                algorithm=spec.digest[0],
            )
        doc = await asyncio.to_thread(_criud_doc, stage_fd, got.files)
    finally:
        os.close(stage_fd)
    manifest, ckpt = _validate(doc, caller)
    name = spec.name if spec.name is not None else _name_from(ckpt)
    if spec.name is None and name is not None:
        await _check_free(rt, name, caller)
    size, stats = await asyncio.to_thread(_lay_out, ckpt_id, tmp_fd, got.files)
    now = time.time()
    return CheckpointRecord(
        id=ckpt_id,
        name=name,
        pid=manifest.tasks[0].pid if manifest.tasks else _int_or(ckpt.get("pid"), 0),
        state=CheckpointState.DONE,
        created_at=now,
        finished_at=now,
        options=_options(ckpt.get("options")),
        labels=_labels(ckpt.get("labels")),
        owner_uid=caller.uid,
        size_bytes=size,
        criu_version=_str_or(ckpt.get("criu_version")),
        stats=stats,
        manifest=manifest.to_json(),
        external_keys=list(manifest.external),
        origin=("import:criud" if layout_of(got.files) == "criud" else oci_archive.ORIGIN_PODMAN),
    )


# -- the archive's layout and its criud.json (hostile input, all of it) ---------------


def layout_of(files: list[Extracted]) -> str:
    """Which kind of archive was unpacked: "criud" or "podman"; ArchiveLayoutUnknown else.

    criud's own has criud.json; a Podman/CRI-O export has spec.dump,
    config.dump and checkpoint/ (ARCHIVE-IFACE.md).
    """
    have = {f.name for f in files}
    if MANIFEST_NAME in have:
        return "criud"
    if {"spec.dump", "config.dump"} <= have and any(n.startswith(IMAGES_PREFIX) for n in have):
        return "podman"
    raise ArchiveLayoutUnknown(
        f"the archive has no {MANIFEST_NAME} (criud's archive) nor spec.dump, config.dump "
        "and checkpoint/ (a Podman/CRI-O export)"
    )


def _criud_doc(stage_fd: int, files: list[Extracted]) -> dict[str, Any]:
    """criud.json, parsed, after the members were checked against criud.sha256."""
    have = {f.name for f in files}
    if layout_of(files) == "podman":
        # A Podman export: criud.restore.oci_archive reads it (hostile input).
        return oci_archive.podman_doc(stage_fd, FORMAT)
    if archive.SUMS_NAME not in have:
        raise ArchiveInvalid(f"criud's archive has no {archive.SUMS_NAME}")
    if not any(n.startswith(IMAGES_PREFIX) for n in have):
        raise ArchiveLayoutUnknown("criud's archive has no checkpoint/ images")
    try:
        sums = imgdir.read_small(stage_fd, archive.SUMS_NAME, MANIFEST_CAP)
        raw = imgdir.read_small(stage_fd, MANIFEST_NAME, MANIFEST_CAP)
    except imgdir.UnsafeEntry as e:
        raise ArchiveManifestInvalid(f"{MANIFEST_NAME} or {archive.SUMS_NAME}: {e}") from None
    archive.check_sums(files, sums)
    if json_depth(raw) > MAX_DEPTH:
        raise ArchiveManifestInvalid(f"{MANIFEST_NAME} nests deeper than {MAX_DEPTH} levels")
    try:
        doc = json.loads(raw)
    except ValueError as e:
        raise ArchiveManifestInvalid(f"{MANIFEST_NAME} is not JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ArchiveManifestInvalid(f"{MANIFEST_NAME} is not a format {FORMAT} criud manifest")
    return doc


def _validate(doc: dict[str, Any], caller: Caller) -> tuple[Manifest, dict[str, Any]]:
    """The manifest to keep, and the checkpoint's recorded fields; owner forced to caller.

    A non-root caller gets a manifest whose run_as is its own uid (and
    groups it holds): criu restores the tree as the caller, whatever the
    archive claims.  A tree whose tasks ran as anyone else is refused here
    (the restore would refuse it too, but the caller learns it now, and
    nothing is kept).
    """
    ckpt = doc.get("checkpoint")
    if not isinstance(ckpt, dict):
        raise ArchiveManifestInvalid(f"{MANIFEST_NAME} has no checkpoint object")
    try:
        manifest = Manifest.from_json(doc.get("manifest") or {})
    except ManifestInvalid as e:
        raise ArchiveManifestInvalid(f"{MANIFEST_NAME}: {e.detail}") from None
    if caller.is_root:
        return manifest, ckpt
    others = sorted({u for ids in manifest.uids.values() for u in ids} - {caller.uid})
    if others:
        raise PermissionDenied(
            f"the archive's tree ran as uid {', '.join(map(str, others))}: a non-root caller "
            f"imports only trees that ran as itself (uid {caller.uid})",
            uids=others,
        )
    if manifest.oci is not None:
        raise PermissionDenied("OCI checkpoints are root's to import (their restore is root's)")
    return dataclasses.replace(manifest, run_as=_callers_run_as(manifest, caller)), ckpt


def _callers_run_as(manifest: Manifest, caller: Caller) -> tuple[Any, ...]:
    """What criu restores a non-root caller's import as: the caller's uid, and groups it holds.

    The archive's gid and groups are kept (criu must run with the tree's
    groups to give them back) only if the caller holds each of them: it
    never runs with a group the caller does not have.
    """
    claimed = creds.run_as_of(manifest.run_as)
    gid = claimed.gid if claimed is not None else caller.gid
    groups = tuple(claimed.groups) if claimed is not None else caller.groups
    held = {caller.gid, *caller.groups}
    foreign = sorted({gid, *groups} - held)
    if foreign:
        raise PermissionDenied(
            f"the archive's tree ran with group {', '.join(map(str, foreign))}, which uid "
            f"{caller.uid} does not hold: a non-root caller imports only its own trees",
            gids=foreign,
        )
    return (caller.uid, gid, list(groups))


def _name_from(ckpt: dict[str, Any]) -> str | None:
    name = ckpt.get("name")
    if name is None:
        return None
    try:
        names.check_name(name)
    except InvalidName:
        return None
    return str(name)


def _int_or(v: Any, default: int) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else default


def _str_or(v: Any) -> str | None:
    return v[:200] if isinstance(v, str) else None


def _options(v: Any) -> dict[str, object]:
    """The dump options, checked field by field (the restore repeats some as criu flags)."""
    if v is None:
        return DumpOptions().as_dict()
    if not isinstance(v, dict):
        raise ArchiveManifestInvalid("checkpoint.options is not an object")
    for f in dataclasses.fields(DumpOptions):
        if f.name in v and f.type == "bool" and not isinstance(v[f.name], bool):
            raise ArchiveManifestInvalid(f"checkpoint.options.{f.name} is not a boolean")
    ext = v.get("external") or []
    ns = v.get("external_namespaces") or []
    if not (isinstance(ext, list) and all(isinstance(k, str) for k in ext)):
        raise ArchiveManifestInvalid("checkpoint.options.external is not a list of keys")
    if not (
        isinstance(ns, list)
        and all(
            isinstance(n, dict) and isinstance(n.get("type"), str) and isinstance(n.get("key"), str)
            for n in ns
        )
    ):
        raise ArchiveManifestInvalid("checkpoint.options.external_namespaces is malformed")
    return DumpOptions.from_dict(v).as_dict()


def _labels(v: Any) -> dict[str, str]:
    """The labels, as the API would accept them (others dropped, never kept raw)."""
    if not isinstance(v, dict):
        return {}
    out = {
        k: val
        for k, val in v.items()
        if isinstance(k, str)
        and isinstance(val, str)
        and _LABEL_KEY.fullmatch(k)
        and len(val) <= 256
        and "\0" not in val
    }
    return dict(list(out.items())[:64])


def _lay_out(ckpt_id: str, tmp_fd: int, files: list[Extracted]) -> tuple[int, dict[str, int]]:
    """Images up into the checkpoint's dir, the rest into archive/; seal; (size, stats)."""
    stage = os.open(STAGE, _DIR, dir_fd=tmp_fd)
    try:
        ck = os.open(IMAGES_PREFIX.rstrip("/"), _DIR, dir_fd=stage)
        try:
            for f in files:
                _place(f.name, stage, ck, tmp_fd)
            if os.listdir(ck):
                raise ArchiveUnsafeName("checkpoint/ holds subdirs: criu's images dir has none")
        finally:
            os.close(ck)
        os.rmdir(IMAGES_PREFIX.rstrip("/"), dir_fd=stage)
        for f in files:
            if "/" not in f.name and f.name not in (DUMP_LOG, STATS):
                os.chmod(f.name, imgdir.SEALED_FILE_MODE, dir_fd=stage, follow_symlinks=False)
        os.fchmod(stage, 0o755)
    finally:
        os.close(stage)
    os.rename(STAGE, imgdir.ARCHIVE_SUBDIR, src_dir_fd=tmp_fd, dst_dir_fd=tmp_fd)
    try:
        size = imgdir.seal(tmp_fd, 0)
    except imgdir.UnsafeEntry as e:
        raise imgdir.tampered(ckpt_id, e) from None
    return size, images.stats_in(tmp_fd, STATS)


def _place(name: str, stage: int, ck: int, tmp_fd: int) -> None:
    """Move one extracted member where it belongs (images and logs up; others stay).

    The dirs are the daemon's own, fresh and root-only, so the check for a
    name taken and the rename after it cannot be raced.
    """
    if name.startswith(IMAGES_PREFIX):
        base = name[len(IMAGES_PREFIX) :]
        if "/" in base:
            raise ArchiveUnsafeName(f"member {name!r}: criu's images dir has no subdirs")
        src = ck
    elif name in (DUMP_LOG, STATS):
        base, src = name, stage
    else:
        return
    taken = base in (imgdir.ARCHIVE_SUBDIR, STAGE)
    with contextlib.suppress(FileNotFoundError):
        os.stat(base, dir_fd=tmp_fd, follow_symlinks=False)
        taken = True
    if taken:
        raise ArchiveUnsafeName(f"member {name!r} collides with another one", member=name)
    os.rename(base, base, src_dir_fd=src, dst_dir_fd=tmp_fd)
