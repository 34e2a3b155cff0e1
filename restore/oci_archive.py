"""Podman's checkpoint archives, restore side: import one, and restore it into a new bundle.

A `podman container checkpoint --export` archive (see docs/archives.md)
holds criu's images under `checkpoint/`, runc's `checkpoint/descriptors.json`
(the targets of the container init's fds 0-2), `spec.dump` (the container's
config.json at dump time), `config.dump` (Podman's container config) and
`rootfs-diff.tar` (what the container changed in its rootfs).  criud's
archive import (criud.daemon.archive, the import job) unpacks it safely and
calls `from_podman`, which reads those files as hostile input and builds
what a criud checkpoint records: the manifest (the root task's fds 0-2 with
their criu keys; pipes external, as the engine held their other end) and the
OCI record criud.restore.oci restores from, derived from spec.dump alone.

`prepare_bundle` runs before such a checkpoint is restored: it applies
rootfs-diff.tar (and Podman's deleted.files) over the new bundle's rootfs,
through dir fds and without following a symlink, and gives the rootfs root
the mode the images recorded (criu checks it: "bad mode").
"""

from __future__ import annotations

import dataclasses
import json
import os
import posixpath
import re
import shutil
import stat
import struct
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from criud.daemon import imgdir
from criud.daemon.errors import InvalidBundle, PodmanArchiveInvalid, RootfsDiffUnsafe
from criud.daemon.jsonlimits import MAX_DEPTH, json_depth
from criud.dump import images, oci, oci_archive
from criud.dump.manifest import ExtNamespace, Manifest, Task

if TYPE_CHECKING:
    # Imported by apply_rootfs_diff, the one user: not a start-up cost
    # (criud.daemon.archive says why).
    import tarfile

SPEC_DUMP = "spec.dump"
CONFIG_DUMP = "config.dump"
CHECKPOINT_DIR = "checkpoint"
DESCRIPTORS = "descriptors.json"
ROOTFS_DIFF = "rootfs-diff.tar"
DELETED_FILES = "deleted.files"
# The import job keeps an archive's top-level members (spec.dump,
# config.dump, rootfs-diff.tar, ...) in this subdir of the checkpoint's dir.
ARCHIVE_DIR = imgdir.ARCHIVE_SUBDIR
ORIGIN_PODMAN = "import:podman"
# spec.dump parses against this placeholder: Podman's paths are absolute,
# and an imported checkpoint is always restored into a bundle named then.
IMPORT_BUNDLE = "/"

# Podman writes some 20 KiB of each; anything near these is not Podman's.
JSON_CAP = 4 << 20
DESCRIPTORS_CAP = 64 << 10
FILES_IMG_CAP = 64 << 20
DELETED_CAP = 16 << 20
DIFF_MEMBERS_CAP = 1 << 20
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_BRACKET_RE = re.compile(r"(pipe|socket):\[([0-9]{1,20})\]")
# criu's files.img: FileEntry.type REG is 1, its RegFileEntry is field 3,
# whose name is field 6 and mode field 10 (images/fdinfo.proto, regfile.proto).
FILES_MAGIC = 0x56303138
_FD_TYPE_REG, _FE_REG, _REG_NAME, _REG_MODE = 1, 3, 6, 10


@dataclasses.dataclass(frozen=True)
class PodmanImport:
    """What a Podman export stands for as a criud checkpoint (ARCHIVE-IFACE.md)."""

    manifest: Manifest
    # The OCI record (criud.dump.oci.to_record's shape), marked imported.
    oci: dict[str, Any]
    # config.dump's container name, when it is usable as a checkpoint name.
    name_hint: str


# -- reading the archive's files ---------------------------------------------------


def _read_json(dirfd: int, name: str, cap: int) -> Any:
    """A small JSON file of dirfd, decoded; PodmanArchiveInvalid for anything amiss."""
    try:
        data = imgdir.read_small(dirfd, name, cap)
    except FileNotFoundError:
        raise PodmanArchiveInvalid(f"the archive has no {name}", member=name) from None
    except (OSError, imgdir.UnsafeEntry) as e:
        raise PodmanArchiveInvalid(f"{name}: {e}", member=name) from None
    if json_depth(data) > MAX_DEPTH:
        raise PodmanArchiveInvalid(f"{name} nests deeper than {MAX_DEPTH}", member=name)
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise PodmanArchiveInvalid(f"{name} is not valid JSON: {e}", member=name) from None


def _open_subdir(dirfd: int, name: str) -> int:
    """A subdir of dirfd, never through a symlink."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(name, flags, dir_fd=dirfd)
    except FileNotFoundError:
        raise PodmanArchiveInvalid(f"the archive has no {name}/", member=name) from None
    except OSError as e:
        raise PodmanArchiveInvalid(f"{name}/: {e.strerror}", member=name) from None


def parse_descriptors(doc: object) -> list[str]:
    """runc's descriptors.json: the targets of the init's fds 0, 1 and 2, in order."""
    if not isinstance(doc, list) or not 1 <= len(doc) <= 3:
        raise PodmanArchiveInvalid(f"{DESCRIPTORS} must be a list of 1 to 3 fd targets")
    for i, target in enumerate(doc):
        if not isinstance(target, str) or not target or len(target) > 4096 or "\0" in target:
            raise PodmanArchiveInvalid(f"{DESCRIPTORS}[{i}] must be a non-empty path or pipe")
    return list(doc)


def fd_record(fd: int, target: str) -> dict[str, Any]:
    """A manifest fd record (criud.dump.fds' shape) for one descriptors.json target.

    A pipe or socket is external: the engine held its other end, so a
    restore must hand in a new one.  A path is reopened by criu in the
    container's mount namespace, as at any restore.  A terminal is refused:
    its criu key (tty[rdev:dev]) cannot be derived from a path.
    """
    rec: dict[str, Any] = {"fd": fd, "mode": "?", "target": target, "external": False}
    m = _BRACKET_RE.fullmatch(target)
    if m is not None:
        return {
            **rec,
            "type": m.group(1),
            "key": target,
            "inode": int(m.group(2)),
            "external": True,
        }
    if target.startswith(("/dev/pts/", "/dev/console", "/dev/tty")):
        raise PodmanArchiveInvalid(
            f"fd {fd} of the container is the terminal {target}: importing a terminal "
            "container (podman run -t) is not supported"
        )
    if target.startswith("/"):
        kind = "device" if target.startswith("/dev/") else "file"
        return {**rec, "type": kind, "key": oci.abs_path(target, DESCRIPTORS).lstrip("/")}
    if target.startswith("anon_inode:"):
        return {**rec, "type": "other", "key": target}
    raise PodmanArchiveInvalid(f"{DESCRIPTORS}[{fd}]: {target!r} is not a pipe, socket or path")


def _pstree(ckpt_fd: int) -> list[dict[str, Any]]:
    try:
        tasks = images.pstree_in(ckpt_fd)
    except FileNotFoundError:
        raise PodmanArchiveInvalid("the archive has no checkpoint/pstree.img") from None
    except (OSError, imgdir.UnsafeEntry, images.ImageError) as e:
        raise PodmanArchiveInvalid(f"checkpoint/pstree.img: {e}") from None
    if not tasks:
        raise PodmanArchiveInvalid("checkpoint/pstree.img lists no task")
    return tasks


# -- the record and the manifest ----------------------------------------------------


def host_cgroup_v1(mountinfo: str) -> list[tuple[str, str]]:
    """(name, host mountpoint) of each cgroup v1 hierarchy mounted whole in mountinfo.

    runc bind-mounts each one into a container without a cgroup namespace,
    at <cgroup mount>/<name>, and declares it an external mount there.
    """
    out: list[tuple[str, str]] = []
    for m in oci.parse_mountinfo(mountinfo):
        if m.fstype == "cgroup" and m.root == "/":
            out.append((posixpath.basename(m.mountpoint), m.mountpoint))
    return out


def _cgroup_mounts(spec: oci.OciSpec, hierarchies: Sequence[tuple[str, str]]) -> list[Any]:
    if spec.namespace("cgroup") is not None:
        return []
    dests = [m.destination for m in spec.mounts if m.type == "cgroup"]
    path = spec.cgroups_path if (spec.cgroups_path or "").startswith("/") else "/"
    return [
        oci.CgroupMount(posixpath.join(d, name), name, host, str(path))
        for d in dests[:1]
        for name, host in hierarchies
    ]


def _podman_fields(config: Mapping[str, Any]) -> dict[str, str]:
    """config.dump's fields worth keeping (for a re-export and for `criud ls`)."""
    keep = ("id", "name", "rootfsImageName", "rootfsImageID", "createdTime", "runtime")
    return {k: v[:4096] for k in keep if isinstance(v := config.get(k), str)}


def imported_record(
    spec: oci.OciSpec,
    spec_doc: Mapping[str, Any],
    config: Mapping[str, Any],
    hierarchies: Sequence[tuple[str, str]],
) -> dict[str, Any]:
    """The OCI record of a Podman export: to_record's, from spec.dump and this host.

    What runc declared external at dump follows from spec.dump alone: every
    bind mount, the masked paths (one /dev/null key), the default devices,
    and the cgroup v1 hierarchies (this host's: the restore's).  Keys the
    images do not use are ignored by criu.  Namespaces given by path have no
    inode here (ino 0): the restore hands them in by key from the new bundle.
    """
    found = oci.ContainerProbe(
        pid=0,
        masked_files=spec.masked_paths,
        ns_inodes={n.type: 0 for n in spec.namespaces if n.path and n.type in oci.EXTERNAL_NS_KEYS},
        cgroup_mounts=tuple(_cgroup_mounts(spec, hierarchies)),
    )
    record = oci.to_record(spec, found)
    record.update(bundle=None, pid=0, origin=ORIGIN_PODMAN, podman=_podman_fields(config))
    record[oci_archive.SPEC_KEY] = spec_doc
    return record


def imported_manifest(
    spec: oci.OciSpec,
    descriptors: Sequence[str],
    tasks: Sequence[Mapping[str, Any]],
    record: Mapping[str, Any],
) -> Manifest:
    """The manifest: the root task's fds 0-2 from descriptors.json, its pids from pstree."""
    root = int(tasks[0]["pid"])
    fds = tuple(fd_record(i, t) for i, t in enumerate(descriptors))
    ext_ns = tuple(
        ExtNamespace(type=n["criu_type"], key=n["key"], ino=0)
        for n in record["external_namespaces"]
    )
    external = list(dict.fromkeys(f["key"] for f in fds if f["external"]))
    pid_ns = spec.namespace("pid")
    return Manifest(
        tasks=(Task(pid=root, ppid=0, tids=tuple(tasks[0]["threads"]) or (root,), fds=fds),),
        external=(*external, *(n.key for n in ext_ns)),
        pids=tuple(sorted({p for t in tasks for p in (t["pid"], *t["threads"])})),
        pidns_init=pid_ns is not None and pid_ns.path is None,
        ext_namespaces=ext_ns,
        oci=dict(record),
    )


def _name_hint(config: Mapping[str, Any]) -> str:
    name = config.get("name")
    return name if isinstance(name, str) and _NAME_RE.fullmatch(name) else ""


def from_podman(tmp_dirfd: int) -> PodmanImport:
    """Read the Podman export unpacked at tmp_dirfd (hostile input; 400 when malformed)."""
    spec_doc = _read_json(tmp_dirfd, SPEC_DUMP, JSON_CAP)
    config = _read_json(tmp_dirfd, CONFIG_DUMP, JSON_CAP)
    if not isinstance(config, dict):
        raise PodmanArchiveInvalid(f"{CONFIG_DUMP} must be a JSON object", member=CONFIG_DUMP)
    ckpt_fd = _open_subdir(tmp_dirfd, CHECKPOINT_DIR)
    try:
        descriptors = parse_descriptors(_read_json(ckpt_fd, DESCRIPTORS, DESCRIPTORS_CAP))
        tasks = _pstree(ckpt_fd)
    finally:
        os.close(ckpt_fd)
    try:
        spec = oci.parse_spec(spec_doc, IMPORT_BUNDLE)
    except oci.OciError as e:
        raise PodmanArchiveInvalid(f"{SPEC_DUMP}: {e.detail}", member=SPEC_DUMP) from None
    if spec.terminal:
        raise PodmanArchiveInvalid(
            "importing a terminal container (podman run -t) is not supported"
        )
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        hierarchies = host_cgroup_v1(f.read())
    record = imported_record(spec, spec_doc, config, hierarchies)
    manifest = imported_manifest(spec, descriptors, tasks, record)
    return PodmanImport(manifest=manifest, oci=record, name_hint=_name_hint(config))


def podman_doc(stage_fd: int, fmt: int) -> dict[str, Any]:
    """from_podman's reading, in the shape of a criud.json (the import job validates it)."""
    imp = from_podman(stage_fd)
    return {
        "format": fmt,
        "checkpoint": {"name": imp.name_hint or None},
        "manifest": imp.manifest.to_json(),
    }


def is_imported(saved: Mapping[str, Any]) -> bool:
    """Whether an OCI record came from a Podman export (restored into a new bundle only)."""
    return saved.get("origin") == ORIGIN_PODMAN


# -- before the restore: the new bundle's rootfs -------------------------------------


def prepare_bundle(bundle: str | None, images_dir: Path) -> None:
    """Fit a new bundle's rootfs to an imported checkpoint. Blocking (run it in a thread).

    Applies the archive's rootfs-diff.tar and deleted.files over the rootfs
    and gives its root the mode the images recorded.  The bundle is the
    root caller's; the archive's files are hostile.
    """
    if bundle is None:
        raise InvalidBundle(
            "an imported checkpoint has no bundle of its own: restore it into a new one "
            '(oci: {"bundle": ...})'
        )
    spec = oci.load_spec(bundle)
    images_fd = imgdir.open_dir(images_dir)
    try:
        root_fd = os.open(spec.rootfs, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            _apply_archive(images_fd, root_fd)
            mode = root_mode(images_fd)
            if mode is not None:
                os.fchmod(root_fd, mode)
        finally:
            os.close(root_fd)
    except OSError as e:
        # A full disk, a read-only rootfs, ...: the bundle cannot take it.
        raise InvalidBundle(
            f"cannot fit rootfs {spec.rootfs} to the checkpoint: {e.strerror}"
            + (f" ({e.filename})" if e.filename else ""),
            bundle=bundle,
        ) from None
    finally:
        os.close(images_fd)


def _apply_archive(images_fd: int, root_fd: int) -> None:
    try:
        arch_fd = os.open(
            ARCHIVE_DIR,
            os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
            dir_fd=images_fd,
        )
    except FileNotFoundError:
        return
    try:
        with _member(arch_fd, ROOTFS_DIFF) as f:
            if f is not None:
                apply_rootfs_diff(f, root_fd)
        remove_deleted(_deleted_files(arch_fd), root_fd)
    finally:
        os.close(arch_fd)


class _member:
    """A regular file of the archive dir as a binary file object, or None if absent."""

    def __init__(self, dirfd: int, name: str) -> None:
        self.dirfd, self.name = dirfd, name
        self.f: IO[bytes] | None = None

    def __enter__(self) -> IO[bytes] | None:
        try:
            fd = imgdir.open_beneath(self.dirfd, self.name)
        except FileNotFoundError:
            return None
        except imgdir.UnsafeEntry as e:
            raise RootfsDiffUnsafe(f"{self.name}: {e}") from None
        self.f = os.fdopen(fd, "rb")
        return self.f

    def __exit__(self, *exc: object) -> None:
        if self.f is not None:
            self.f.close()


def _deleted_files(arch_fd: int) -> list[str]:
    """Podman's deleted.files: the paths the container removed from its image."""
    try:
        doc = _read_json(arch_fd, DELETED_FILES, DELETED_CAP)
    except PodmanArchiveInvalid as e:
        if "has no" in e.detail:
            return []
        raise RootfsDiffUnsafe(e.detail) from None
    if not isinstance(doc, list) or not all(isinstance(p, str) for p in doc):
        raise RootfsDiffUnsafe(f"{DELETED_FILES} must be a list of paths")
    return doc


def root_mode(images_fd: int) -> int | None:
    """The permission bits criu recorded for the tree's root dir "/" (files.img).

    criu refuses a restore whose root differs ("bad mode"); Podman's
    overlay roots are 0555, a freshly made rootfs usually 0755.
    """
    try:
        data = imgdir.read_small(images_fd, "files.img", FILES_IMG_CAP)
        entries = images.parse_entries(data, "files.img", (images.IMG_COMMON_MAGIC, FILES_MAGIC))
        for entry in entries:
            top = images.decode_message(entry)
            if top.get(1, [0])[-1] != _FD_TYPE_REG or not isinstance(
                top.get(_FE_REG, [0])[-1], bytes
            ):
                continue
            reg = images.decode_message(top[_FE_REG][-1])
            mode = reg.get(_REG_MODE, [None])[-1]
            if reg.get(_REG_NAME, [b""])[-1] == b"/" and isinstance(mode, int):
                return stat.S_IMODE(mode)
    except (FileNotFoundError, imgdir.UnsafeEntry, images.ImageError, struct.error):
        return None
    return None


# -- rootfs-diff.tar, applied beneath the rootfs --------------------------------------


def _parts(name: str, what: str, in_root: bool = False) -> list[str]:
    """A name's components; RootfsDiffUnsafe if it could leave the rootfs.

    in_root: an absolute name is taken inside the rootfs (Podman's
    deleted.files lists paths as the container sees them).
    """
    if "\0" in name or (name.startswith("/") and not in_root):
        raise RootfsDiffUnsafe(f"{what} {name!r} is absolute", member=name)
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise RootfsDiffUnsafe(f"{what} {name!r} has a .. component", member=name)
    return parts


def _walk(root_fd: int, parts: Sequence[str], create: bool) -> int:
    """An fd of the dir at parts beneath root_fd; no symlink is ever followed."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.dup(root_fd)
    try:
        for part in parts:
            try:
                nxt = os.open(part, flags, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                os.mkdir(part, 0o755, dir_fd=fd)
                nxt = os.open(part, flags, dir_fd=fd)
            except OSError as e:
                # ELOOP or ENOTDIR: a symlink or a file where a dir should be.
                raise RootfsDiffUnsafe(
                    f"rootfs-diff.tar: {'/'.join(parts)} goes through {part!r}, not a directory "
                    f"({e.strerror})"
                ) from None
            os.close(fd)
            fd = nxt
        return fd
    except BaseException:
        os.close(fd)
        raise


def _clear(dirfd: int, name: str, for_dir: bool) -> bool:
    """Remove a non-dir entry that a member replaces; True if a dir is there already."""
    try:
        st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    if stat.S_ISDIR(st.st_mode):
        if for_dir:
            return True
        raise RootfsDiffUnsafe(f"rootfs-diff.tar replaces the directory {name!r} with a file")
    os.unlink(name, dir_fd=dirfd)
    return False


def _owner(fd: int, info: tarfile.TarInfo) -> None:
    os.fchown(fd, info.uid, info.gid)
    os.fchmod(fd, stat.S_IMODE(info.mode))


def _extract_one(tar: tarfile.TarFile, info: tarfile.TarInfo, root_fd: int) -> None:
    parts = _parts(info.name, "member")
    if not parts:
        return  # "./": the root's mode comes from the images (root_mode)
    if not (info.isreg() or info.isdir() or info.issym() or info.islnk()):
        raise RootfsDiffUnsafe(
            f"rootfs-diff.tar member {info.name!r} is a device node, fifo or other special file",
            member=info.name,
        )
    parent = _walk(root_fd, parts[:-1], create=True)
    name = parts[-1]
    try:
        if info.isdir():
            if not _clear(parent, name, for_dir=True):
                os.mkdir(name, 0o700, dir_fd=parent)
            fd = os.open(
                name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent
            )
            try:
                _owner(fd, info)
            finally:
                os.close(fd)
            return
        _clear(parent, name, for_dir=False)
        if info.issym():
            # The link's text is the container's business; the daemon never follows it.
            os.symlink(info.linkname, name, dir_fd=parent)
            os.chown(name, info.uid, info.gid, dir_fd=parent, follow_symlinks=False)
        elif info.islnk():
            _hardlink(root_fd, info.linkname, parent, name)
        else:
            _write_file(tar, info, parent, name)
    finally:
        os.close(parent)


def _hardlink(root_fd: int, linkname: str, parent: int, name: str) -> None:
    """A hard link to an earlier member, both ends beneath the rootfs."""
    target = _parts(linkname, "hard link target")
    if not target:
        raise RootfsDiffUnsafe("rootfs-diff.tar: a hard link to the root")
    src_dir = _walk(root_fd, target[:-1], create=False)
    try:
        st = os.stat(target[-1], dir_fd=src_dir, follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode):
            raise RootfsDiffUnsafe(f"rootfs-diff.tar: hard link to {linkname!r}, not a file")
        os.link(target[-1], name, src_dir_fd=src_dir, dst_dir_fd=parent, follow_symlinks=False)
    finally:
        os.close(src_dir)


def _write_file(tar: tarfile.TarFile, info: tarfile.TarInfo, parent: int, name: str) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(name, flags, 0o600, dir_fd=parent)
    try:
        src = tar.extractfile(info)
        if src is not None:
            while chunk := src.read(1 << 20):
                os.write(fd, chunk)
        _owner(fd, info)
        os.utime(fd, (info.mtime, info.mtime))
    finally:
        os.close(fd)


def _members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    for count, info in enumerate(tar, 1):
        if count > DIFF_MEMBERS_CAP:
            raise RootfsDiffUnsafe(f"rootfs-diff.tar has more than {DIFF_MEMBERS_CAP} members")
        yield info


def apply_rootfs_diff(f: IO[bytes], root_fd: int) -> None:
    """Extract the tar f over the rootfs at root_fd, safely (see the module doc)."""
    import tarfile

    try:
        with tarfile.open(fileobj=f, mode="r|") as tar:
            for info in _members(tar):
                _extract_one(tar, info, root_fd)
    except tarfile.TarError as e:
        raise RootfsDiffUnsafe(f"rootfs-diff.tar is not a valid tar: {e}") from None
    except FileNotFoundError as e:
        raise RootfsDiffUnsafe(f"rootfs-diff.tar: {e.strerror}: {e.filename}") from None


def remove_deleted(paths: Sequence[str], root_fd: int) -> None:
    """Remove each path the container deleted (a dir with its contents), beneath root_fd."""
    for path in paths:
        parts = _parts(path, "deleted path", in_root=True)
        if not parts:
            continue
        try:
            parent = _walk(root_fd, parts[:-1], create=False)
        except FileNotFoundError:
            continue
        try:
            st = os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                shutil.rmtree(parts[-1], dir_fd=parent)
            else:
                os.unlink(parts[-1], dir_fd=parent)
        except FileNotFoundError:
            pass
        finally:
            os.close(parent)
