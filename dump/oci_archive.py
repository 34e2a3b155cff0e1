"""Podman's checkpoint archive members for an OCI checkpoint, export side.

`podman container restore --import` and checkpointctl read, besides criu's
images under `checkpoint/`:

- `spec.dump`: the container's config.json at dump time (criud keeps it in
  the checkpoint's OCI record, under SPEC_KEY, from the dump on);
- `config.dump`: Podman's container config, of which import needs `runtime`,
  `rootfsImageName` and `rootfsImageID` (an image that exists locally) and
  checkpointctl shows `id`, `name`, `createdTime` and `checkpointedTime`;
- `checkpoint/descriptors.json`: runc's list of what the init's fds 0, 1 and
  2 were ("pipe:[123]", "/dev/null"); runc's restore hands the engine's new
  pipes in for the pipe entries.

Where the image name and id come from, first match wins: the checkpoint's
labels `oci/image-name` and `oci/image-id` (the engine knows its image; a
checkpoint request passes them as labels); the annotations CRI-O and
containerd's CRI put in config.json; what an imported Podman export said.
The container id and name likewise: labels `oci/container-id` and
`oci/container-name`, else the checkpoint's own id and name.

`rootfs-diff.tar` is not taken at dump time: criud sees the container's
rootfs only while it runs, and by export time an engine has usually
unmounted it; the changes would have to be tarred from the overlay's upper
dir during the dump.  Podman's import treats the member as optional.  A
checkpoint imported from a Podman export keeps its `rootfs-diff.tar` and
`deleted.files` (in the checkpoint's archive/ subdir), and exports them
again.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import os
import posixpath
import re
import stat
from collections.abc import Callable, Mapping
from typing import Any, BinaryIO

from criud.daemon import imgdir
from criud.daemon.archive import Member
from criud.daemon.store import CheckpointRecord
from criud.dump.manifest import Manifest

# The OCI record's key for the bundle's config.json document.
SPEC_KEY = "spec"
SPEC_DUMP = "spec.dump"
CONFIG_DUMP = "config.dump"
DESCRIPTORS = "checkpoint/descriptors.json"
# Members of an imported export that its archive/ subdir keeps, exported again.
KEPT_MEMBERS = ("rootfs-diff.tar", "deleted.files")
# runc is the runtime criud's bundle support mirrors (docs/containers.md).
RUNTIME = "runc"

LABEL_IMAGE_NAME = "oci/image-name"
LABEL_IMAGE_ID = "oci/image-id"
LABEL_CONTAINER_ID = "oci/container-id"
LABEL_CONTAINER_NAME = "oci/container-name"
# Engines' own annotations naming the image, in config.json.
IMAGE_NAME_ANNOTATIONS = (
    "io.kubernetes.cri-o.ImageName",
    "io.kubernetes.cri.image-name",
    "org.opencontainers.image.ref.name",
)
IMAGE_ID_ANNOTATIONS = ("io.kubernetes.cri-o.ImageRef", "io.kubernetes.cri.image-ref")
CREATED_ANNOTATION = "io.kubernetes.cri-o.Created"
# checkpointctl decodes createdTime into a Go time.Time: RFC 3339 or nothing.
_RFC3339 = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?(Z|[+-][0-9]{2}:[0-9]{2})"
)


def _json_member(name: str, doc: Any) -> Member:
    data = json.dumps(doc, indent=1, sort_keys=False).encode()
    return Member(name=name, size=len(data), open=lambda: io.BytesIO(data), mode=0o600)


def _rfc3339(ts: float | None) -> str:
    when = datetime.datetime.fromtimestamp(ts or 0, datetime.UTC)
    return when.isoformat().replace("+00:00", "Z")


def _is_time(value: object) -> bool:
    return isinstance(value, str) and _RFC3339.fullmatch(value) is not None


def _first(*values: object) -> str:
    return next((v for v in values if isinstance(v, str) and v), "")


def config_dump(record: CheckpointRecord, saved: Mapping[str, Any]) -> dict[str, Any]:
    """config.dump's fields for a checkpoint (see the module doc for their sources)."""
    spec = saved.get(SPEC_KEY) or {}
    notes = spec.get("annotations") if isinstance(spec, dict) else None
    notes = notes if isinstance(notes, dict) else {}
    podman = saved.get("podman") or {}
    labels = record.labels
    # Podman's ids are 64 hex digits; a stable one is derived from the checkpoint.
    derived_id = hashlib.sha256(f"criud:{record.id}".encode()).hexdigest()
    return {
        "id": _first(labels.get(LABEL_CONTAINER_ID), podman.get("id"), derived_id),
        "name": _first(
            labels.get(LABEL_CONTAINER_NAME), podman.get("name"), record.name, record.id
        ),
        "runtime": RUNTIME,
        "rootfsImageName": _first(
            labels.get(LABEL_IMAGE_NAME),
            *(notes.get(k) for k in IMAGE_NAME_ANNOTATIONS),
            podman.get("rootfsImageName"),
        ),
        "rootfsImageID": _first(
            labels.get(LABEL_IMAGE_ID),
            *(notes.get(k) for k in IMAGE_ID_ANNOTATIONS),
            podman.get("rootfsImageID"),
        ),
        "createdTime": _first(
            *(t for t in (notes.get(CREATED_ANNOTATION), podman.get("createdTime")) if _is_time(t)),
            _rfc3339(record.created_at),
        ),
        "checkpointedTime": _rfc3339(record.finished_at or record.created_at),
    }


def descriptors(manifest: Manifest) -> list[str]:
    """runc's descriptors.json: what the root task's fds 0, 1, 2 were, as /proc shows them.

    That is the fd's link target ("pipe:[123]", "/dev/null"), which criud's
    manifest keeps.  An fd the root had closed reads as /dev/null (runc's
    restore acts only on the pipe entries).
    """
    root = manifest.tasks[0] if manifest.tasks else None
    by_fd = {f["fd"]: f for f in root.fds} if root is not None else {}
    out: list[str] = []
    for n in (0, 1, 2):
        f = by_fd.get(n)
        if f is None:
            out.append("/dev/null")
        elif f.get("target"):
            out.append(str(f["target"]))
        else:
            # A record without its target: criu's key, a path's without its "/".
            key = str(f["key"])
            out.append("/" + key if f["type"] in ("file", "device", "fifo", "dir") else key)
    return out


def oci_members(record: CheckpointRecord, manifest: Manifest, images_dirfd: int) -> list[Member]:
    """spec.dump, config.dump and checkpoint/descriptors.json for an OCI checkpoint.

    A checkpoint imported from an archive may hold descriptors.json among
    its images already (images_dirfd): it is then exported from there.
    """
    saved = manifest.oci or {}
    members: list[Member] = []
    spec = saved.get(SPEC_KEY)
    if isinstance(spec, dict):
        members.append(_json_member(SPEC_DUMP, spec))
    members.append(_json_member(CONFIG_DUMP, config_dump(record, saved)))
    try:
        os.stat(posixpath.basename(DESCRIPTORS), dir_fd=images_dirfd, follow_symlinks=False)
    except FileNotFoundError:
        members.append(_json_member(DESCRIPTORS, descriptors(manifest)))
    members += kept_rootfs_members(images_dirfd)
    return members


def kept_rootfs_members(images_dirfd: int) -> list[Member]:
    """rootfs-diff.tar and deleted.files kept in the checkpoint's archive/ subdir.

    An imported Podman export keeps them there (the import job); exported
    again, they go back to the top of the archive.
    """
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        sub = os.open(imgdir.ARCHIVE_SUBDIR, flags, dir_fd=images_dirfd)
    except (FileNotFoundError, NotADirectoryError):
        return []
    members: list[Member] = []
    try:
        for name in KEPT_MEMBERS:
            try:
                st = os.stat(name, dir_fd=sub, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode):
                members.append(Member(name, st.st_size, _opener(images_dirfd, name), mode=0o644))
    finally:
        os.close(sub)
    return members


def _opener(images_dirfd: int, name: str) -> Callable[[], BinaryIO]:
    def open_member() -> BinaryIO:
        # Opened again when written: the export runs after this listing.
        sub = os.open(
            imgdir.ARCHIVE_SUBDIR,
            os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
            dir_fd=images_dirfd,
        )
        try:
            return os.fdopen(imgdir.open_beneath(sub, name), "rb")
        finally:
            os.close(sub)

    return open_member
