"""The export job: a done checkpoint as a streamed tar archive (criud.daemon.archive).

`prepare` (in a thread) opens the checkpoint's images dir, seals it if a
previous release left it unsealed, and lists the archive's members, each
opened through the dir's fd when the writer reaches it; `produce` (in a
thread too) writes the tar, compresses it and hands the chunks to an
Outbox the HTTP response reads.  Nothing is staged: the archive exists
only as the chunks in flight (a few MiB at most).

Layout: `checkpoint/<image>` for each of criu's images, `stats-dump` and
`dump.log` at the top, `criud.json` (the record and manifest), and the
writer's own `criud.sha256` last.  docs/archives.md has the fields.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from criud.daemon import archive, imgdir
from criud.daemon.archive import Member
from criud.daemon.errors import CheckpointNotReady, InvalidRequest
from criud.daemon.operations import Progress
from criud.daemon.store import CheckpointRecord
from criud.dump import oci_archive
from criud.dump.argv import DUMP_LOG
from criud.dump.manifest import Manifest

log = logging.getLogger("criud.export")

STATS = "stats-dump"
MANIFEST_NAME = "criud.json"
IMAGES_PREFIX = "checkpoint/"
# criud.json's format; a reader refuses one it does not know.
FORMAT = 1
# The images dir's files that are not criu images: the restore's log stays home.
_NOT_IMAGES = frozenset({DUMP_LOG, STATS, "restore.log"})
_SUFFIX = {"zstd": ".tar.zst", "gzip": ".tar.gz", "none": ".tar"}


@dataclasses.dataclass
class Prepared:
    """An export ready to stream: the open images dir and what goes into the archive."""

    dirfd: int
    members: list[Member]
    compression: str
    # The uncompressed tar's size (the Content-Length when compression is none).
    tar_size: int
    filename: str

    @property
    def content_length(self) -> int | None:
        """The response's size where it is known up front (uncompressed only)."""
        return self.tar_size if self.compression == "none" else None

    def close(self) -> None:
        """Close the images dir (after the last member was read)."""
        if self.dirfd >= 0:
            os.close(self.dirfd)
            self.dirfd = -1


def _opener(dirfd: int, name: str) -> Callable[[], BinaryIO]:
    def open_member() -> BinaryIO:
        return os.fdopen(imgdir.open_beneath(dirfd, name), "rb", buffering=0)

    return open_member


def _bytes_member(name: str, data: bytes) -> Member:
    return Member(name, len(data), lambda: io.BytesIO(data))


def manifest_json(rec: CheckpointRecord, meta: dict[str, Any]) -> bytes:
    """criud.json: the checkpoint's record and manifest, plus who wrote it (meta)."""
    doc = {
        "format": FORMAT,
        **meta,
        "checkpoint": {
            "id": rec.id,
            "name": rec.name,
            "pid": rec.pid,
            "owner_uid": rec.owner_uid,
            "created_at": rec.created_at,
            "finished_at": rec.finished_at,
            "size_bytes": rec.size_bytes,
            "options": rec.options,
            "labels": rec.labels,
            "criu_version": rec.criu_version,
            "stats": rec.stats,
            "origin": rec.origin or "dump",
        },
        "manifest": rec.manifest or {},
    }
    return json.dumps(doc, indent=1, sort_keys=True).encode()


def list_images(dirfd: int) -> list[Member]:
    """The images dir's files as archive members, images under checkpoint/ first."""
    images: list[Member] = []
    top: list[Member] = []
    for entry in sorted(os.scandir(dirfd), key=lambda e: e.name):
        st = entry.stat(follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode):
            # The daemon's own archive/ subdir (an import's other members).
            continue
        opener = _opener(dirfd, entry.name)
        if entry.name in _NOT_IMAGES:
            if entry.name != "restore.log":
                top.append(Member(entry.name, st.st_size, opener, mtime=int(st.st_mtime)))
            continue
        images.append(
            Member(IMAGES_PREFIX + entry.name, st.st_size, opener, mtime=int(st.st_mtime))
        )
    return images + top


def prepare(path: Path, rec: CheckpointRecord, compression: str, meta: dict[str, Any]) -> Prepared:
    """Open (and if needed seal) a checkpoint's dir and list its archive's members."""
    archive.check_compression(compression)
    try:
        dirfd = imgdir.open_dir(path)
    except FileNotFoundError:
        raise CheckpointNotReady(f"checkpoint {rec.id} has no images", checkpoint=rec.id) from None
    try:
        if not imgdir.is_sealed(dirfd):
            run_as = (rec.manifest or {}).get("run_as") or [0]
            imgdir.seal(dirfd, int(run_as[0]))
        if imgdir.has_chain(dirfd):
            # Its pages are spread over the pre-dump rounds (criu's parent
            # chain); an archive holds one flat images dir, and merging
            # criu's pagemaps is criu's business, not criud's.
            raise InvalidRequest(
                f"checkpoint {rec.id} was taken with pre-dumps: its pages span the "
                "pre-dump rounds' dirs, which an archive does not carry; export a "
                "checkpoint taken without pre-dumps (pre_dumps: 0)",
                checkpoint=rec.id,
            )
        members = [*list_images(dirfd), _bytes_member(MANIFEST_NAME, manifest_json(rec, meta))]
        manifest = Manifest.from_json(rec.manifest)
        if manifest.oci is not None:
            # spec.dump, config.dump, descriptors.json: Podman's and checkpointctl's.
            members += oci_archive.oci_members(rec, manifest, dirfd)
        archive.check_members(members)
        name = rec.name or rec.id
        return Prepared(
            dirfd, members, compression, archive.tar_size(members), name + _SUFFIX[compression]
        )
    except imgdir.UnsafeEntry as e:
        os.close(dirfd)
        raise imgdir.tampered(rec.id, e) from None
    except BaseException:
        os.close(dirfd)
        raise


def produce(
    prep: Prepared, outbox: archive.Outbox, progress: Progress, level: int, threads: int
) -> int:
    """Write the archive into outbox (a worker thread); return the bytes sent.

    progress counts the uncompressed tar (its total is known up front);
    the return value is what went out, compressed.
    """
    sent = 0

    def counted() -> Any:
        for chunk in archive.tar_stream(prep.members):
            progress.add_bytes(len(chunk))
            yield chunk

    try:
        # Two stages, two threads: the tar (reads and sha256) and the compressor.
        chunks = archive.compress(archive.threaded(counted()), prep.compression, level, threads)
        for chunk in archive.coalesce(chunks):
            outbox.put(chunk)
            sent += len(chunk)
    except BaseException as e:
        outbox.finish(e)
        raise
    outbox.finish()
    return sent
