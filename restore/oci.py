"""The restore half of OCI support: fit a checkpoint into a bundle, as runc would.

The dump half (reading a bundle, probing the container, criu's dump
arguments) is criud.dump.oci; what it records at checkpoint time is the
`saved` record read here.  `prepare` is the one entry point: it loads the
bundle, checks once that the checkpoint fits it, creates the mountpoints
criu needs, and returns the extra arguments and the namespace files whose
fds the restore hands in (by key, through criud.restore.worker.FdMap).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import posixpath
import stat
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from criud.dump.oci import (
    EXTERNAL_NS_KEYS,
    JOINABLE_NS,
    NS_CRIU_NAMES,
    OciError,
    OciSpec,
    abs_path,
    check_record,
    has_private_netns,
    load_spec,
)


@dataclasses.dataclass(frozen=True)
class OciRestore:
    """What a restore into a bundle needs beyond the plain restore."""

    bundle: str
    # Extra criu arguments (root, mounts, cgroups, namespaces to join).
    args: tuple[str, ...]
    # Key -> path of a namespace to open and hand in as that key.
    ns_files: Mapping[str, str]


def prepare(
    saved: Mapping[str, Any],
    bundle: str,
    name: str | None,
    cgroup: str | None,
    network_lock: str | None,
    console: str | None = None,
) -> OciRestore:
    """Load the bundle to restore into, check it fits (once), make its mountpoints.

    Blocking (run it in a thread).  cgroup is criud's placement, if any; the
    bundle's own (as runc derives it) otherwise.  console is the new pty
    slave a terminal container's /dev/console becomes (console_source).
    OciError (a 422 invalid_bundle) names the bundle.
    """
    try:
        new_spec = load_spec(bundle)
        check_record(saved)
        check_compatible(saved, new_spec)
        ns_files = restore_ns_files(saved, new_spec)
        ensure_mountpoints(new_spec)
        root = cgroup or restore_cgroup_root(new_spec, name)
        args = restore_args(
            saved, new_spec, cgroup_root=root, network_lock=network_lock, console=console
        )
    except OciError as e:
        e.extra.setdefault("bundle", bundle)
        raise
    return OciRestore(bundle, tuple(args), ns_files)


def restore_cgroup_root(new_spec: OciSpec, name: str | None = None) -> str | None:
    """The cgroup to restore into, derived as runc would for the new container.

    An absolute linux.cgroupsPath is taken as is (runc's cgroupfs driver);
    without one, runc's default is /<container name>.  None means "where the
    image says" (the old container's cgroups).  systemd-style paths
    ("slice:prefix:name") and relative ones need a systemd or a parent that
    criud does not have: OciError.
    """
    path = new_spec.cgroups_path
    if path is None:
        return f"/{name}" if name else None
    if ":" in path and not path.startswith("/"):
        raise OciError(
            f"linux.cgroupsPath {path!r} is systemd-style (slice:prefix:name); criud "
            "restores into cgroupfs paths only: give an absolute path"
        )
    return abs_path(path, "linux.cgroupsPath")


def restore_ns_files(saved: Mapping[str, Any], new_spec: OciSpec) -> dict[str, str]:
    """Key -> namespace path (from the new bundle) that the caller opens and hands in.

    The restore opens each and hands it over under its key (FdMap.hand_over).
    """
    out: dict[str, str] = {}
    for n in saved.get("external_namespaces") or []:
        ns = new_spec.namespace(n["type"])
        if ns is None or ns.path is None:
            raise OciError(
                f"the checkpoint's {n['type']} namespace was external ({n['key']}); "
                f"the new bundle must give linux.namespaces {n['type']} a path to join"
            )
        out[n["key"]] = ns.path
    return out


def check_compatible(saved: Mapping[str, Any], new_spec: OciSpec) -> None:
    """Refuse a new bundle the image cannot be restored into; list every mismatch."""
    problems: list[str] = []
    old_ns = {n["type"]: n.get("path") for n in saved.get("namespaces") or []}
    new_ns = {n.type: n.path for n in new_spec.namespaces}
    if set(old_ns) != set(new_ns):
        problems.append(
            f"namespaces differ: checkpoint {sorted(old_ns)}, new bundle {sorted(new_ns)}"
        )
    for t in EXTERNAL_NS_KEYS:
        if t in old_ns and t in new_ns and bool(old_ns[t]) != bool(new_ns[t]):
            had = "joined by path" if old_ns[t] else "private"
            problems.append(f"the {t} namespace was {had} at checkpoint; the new bundle must match")
    if new_spec.namespace("cgroup") is not None and new_ns.get("cgroup"):
        problems.append("a cgroup namespace given by path cannot be joined by criu")
    old_binds = {m["destination"] for m in saved.get("mounts") or []}
    new_binds = {d for d, _, _ in new_spec.bind_mounts}
    for d in sorted(old_binds - new_binds):
        problems.append(f"bind mount {d} of the checkpoint has no source in the new bundle")
    for d in sorted(new_binds - old_binds):
        problems.append(f"bind mount {d} is new; a restore cannot add mounts")
    if new_spec.terminal != bool(saved.get("terminal")):
        problems.append("process.terminal differs from the checkpoint's")
    if problems:
        raise OciError("the new bundle does not fit the checkpoint: " + "; ".join(problems))


def restore_args(
    saved: Mapping[str, Any],
    new_spec: OciSpec,
    *,
    cgroup_root: str | None = None,
    network_lock: str | None = None,
    console: str | None = None,
) -> list[str]:
    """Extra `criu restore` arguments to restore `saved` into new_spec's bundle.

    The bundle may be the same one or a copy with a new rootfs and new bind
    sources ("restore under a new name").  cgroup_root is where the restored
    tasks go (restore_cgroup_root derives runc's choice; the daemon may
    impose its own); the cgroup v1 mounts follow it.  The caller has run
    check_compatible; the fds of restore_ns_files are handed in by the
    restore's FdMap, which writes their --inherit-fd arguments.  console is
    the host path of the new pty slave a terminal container's /dev/console
    becomes (console_source finds it).
    """
    check_record(saved)
    args = ["--root", new_spec.rootfs, "--manage-cgroups=soft"]
    if cgroup_root is not None:
        args += ["--cgroup-root", abs_path(cgroup_root, "the cgroup root")]
    # As runc: a device node that cannot be opened by its path is looked up
    # by its numbers instead.
    args.append("--evasive-devices")
    namespaces = saved.get("namespaces") or []
    if has_private_netns(namespaces):
        args += ["--empty-ns", "net"]
    if network_lock and any(n["type"] == "network" for n in namespaces):
        # With --empty-ns net criu re-applies the dump's lock in the new netns
        # and lifts it at the end: the method must be the dump's.
        args += ["--network-lock", network_lock]
    args += _external_mounts(saved, new_spec, cgroup_root, console)
    for ns in new_spec.namespaces:
        if ns.path is not None and ns.type in JOINABLE_NS:
            if "," in ns.path:
                # criu reads --join-ns as NS:PATH[,OPTIONS]: a comma cannot be escaped.
                raise OciError(
                    f"namespace path {ns.path!r} contains a comma, which criu cannot take"
                )
            args += ["--join-ns", f"{NS_CRIU_NAMES[ns.type]}:{ns.path}"]
    return args


def _external_mounts(
    saved: Mapping[str, Any], new_spec: OciSpec, cgroup_root: str | None, console: str | None
) -> list[str]:
    """--external mnt[KEY]:SOURCE for each mount the dump left out of the image."""
    args: list[str] = []
    sources = {d: s for d, s, _ in new_spec.bind_mounts}
    done: set[str] = set()
    for m in saved.get("external_mounts") or []:
        key = m["key"]
        if key in done:
            continue  # masked files share one key
        done.add(key)
        kind = m["kind"]
        if kind == "console":
            if console is None:
                raise OciError(
                    "a terminal container needs a new pty slave for its terminal's key, "
                    "to bind at /dev/console"
                )
            val = console
        elif kind == "bind":
            val = sources[m["mountpoint"]]
        elif kind == "cgroup":
            where = cgroup_root if cgroup_root is not None else m["path"]
            val = posixpath.join(m["host_mountpoint"], where.lstrip("/")).rstrip("/")
        else:  # masked, device: the host's own node
            val = key
        args += ["--external", f"mnt[{key}]:{val}"]
    return args


def _tmpfs_covered(path: str, spec: OciSpec) -> bool:
    return any(
        m.type == "tmpfs" and path.startswith(m.destination.rstrip("/") + "/") for m in spec.mounts
    )


def mountpoints_to_make(spec: OciSpec) -> list[tuple[str, str | None]]:
    """(path in the rootfs, bind source or None) that must exist before criu restores.

    runc (prepareCriuRestoreMounts) creates every mount's destination that is
    not inside a tmpfs (criu restores tmpfs contents itself) nor a cgroup
    mount.  And criu pivots into the new root through the root's "tmp"
    directory, or else a mkdtemp in the root, which fails on a read-only
    rootfs: "mnt: Can't create a temporary directory: Read-only file system".
    """
    out: list[tuple[str, str | None]] = [("/tmp", None)]
    for m in spec.mounts:
        if _tmpfs_covered(m.destination, spec) or m.type == "cgroup":
            continue
        out.append((m.destination, m.source if m.is_bind else None))
    return out


_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


def _make_beneath(root_fd: int, path: str, is_dir: bool) -> bool:
    """Create path (relative to root_fd) unless it exists; True if it was made.

    Each component is opened with O_NOFOLLOW relative to its parent, so a
    symlink planted in the rootfs cannot send the creation outside it.
    """
    parts = [p for p in path.split("/") if p]
    fd = os.dup(root_fd)
    made = False
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            try:
                nxt = os.open(part, _PATH_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if last and not is_dir:
                    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
                    os.close(os.open(part, flags, 0o644, dir_fd=fd))
                    return True
                os.mkdir(part, 0o755, dir_fd=fd)
                made = last
                nxt = os.open(part, _PATH_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nxt
            if stat.S_ISLNK(os.fstat(fd).st_mode):
                raise OciError(f"cannot create mountpoint {path}: {part} is a symlink")
        return made
    finally:
        os.close(fd)


def ensure_mountpoints(spec: OciSpec) -> list[str]:
    """Create the missing paths of mountpoints_to_make in spec.rootfs; return those made."""
    made: list[str] = []
    try:
        root_fd = os.open(spec.rootfs, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise OciError(f"rootfs {spec.rootfs}: {e.strerror}") from None
    try:
        for path, source in mountpoints_to_make(spec):
            # A bind of a file needs a file to mount on; anything else a directory.
            is_dir = True
            if source is not None:
                with contextlib.suppress(OSError):
                    is_dir = stat.S_ISDIR(os.stat(source).st_mode)
            try:
                if _make_beneath(root_fd, path, is_dir):
                    made.append(path)
            except OSError as e:
                raise OciError(
                    f"cannot create mountpoint {spec.rootfs}{path}: {e.strerror}"
                ) from None
    finally:
        os.close(root_fd)
    return made


def console_source(inherit: Iterable[tuple[int, str]], tty_keys: Sequence[str]) -> str | None:
    """The host path of the new pty slave handed in for a terminal container's tty.

    inherit pairs an fd (open in the daemon) with the key it replaces;
    tty_keys are the checkpoint's external terminals, the container's own
    first.  The fd's /proc link names the slave, and the name is believed
    only if it is that very device, as the daemon sees it: criu binds it by
    path onto /dev/console.  None when no terminal is being replaced.
    """
    fds = {key: fd for fd, key in inherit}
    fd = next((fds[k] for k in tty_keys if k in fds), None)
    if fd is None:
        return None
    try:
        path = os.readlink(f"/proc/self/fd/{fd}")
        mine, named = os.fstat(fd), os.stat(path)
    except OSError as e:
        raise OciError(f"cannot name the new pty slave: {e.strerror}") from e
    same = (mine.st_rdev, mine.st_dev) == (named.st_rdev, named.st_dev)
    if not (path.startswith("/dev/pts/") and stat.S_ISCHR(named.st_mode) and same):
        raise OciError(
            f"the new terminal handed in ({path}) is not a pty slave under the daemon's "
            "/dev/pts: criu binds it by that path onto the container's /dev/console"
        )
    return path
