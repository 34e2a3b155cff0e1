"""OCI bundles: the criu options runc derives from config.json, as criu CLI arguments.

runc checkpoints and restores a container through criu's RPC (`criu swrk`).
criud runs the criu CLI, so every RPC field runc sets maps to a flag here.
What runc 1.1.5 (Debian 12) sends, read from `runc --debug checkpoint` and
`runc --debug restore` and from libcontainer's criu code:

==========================================  ====================================================
runc RPC field                              criu CLI (this module)
==========================================  ====================================================
Root = the rootfs                           ``--root ROOTFS``
ManageCgroups = true, mode unset            ``--manage-cgroups=soft`` (criu's own default too)
FreezeCgroup = the freezer cgroup dir       ``--freeze-cgroup DIR`` (dump)
EmptyNs = CLONE_NEWNET (always)             ``--empty-ns net``: runc does not manage the netns's
                                            devices; criu neither dumps nor restores them
ExtMnt {DEST: DEST}, each bind mount        ``--external mnt[DEST]:DEST`` (dump),
                                            ``--external mnt[DEST]:SOURCE`` (restore)
ExtMnt, each cgroup v1 hierarchy            the same, the source being the hierarchy's host
                                            mountpoint joined with the container's cgroup
ExtMnt {PATH: /dev/null}, masked files      ``--external mnt[PATH]:/dev/null`` (dump),
                                            ``--external mnt[/dev/null]:/dev/null`` (restore)
ExtMnt {DEV: DEV}, each device              ``--external mnt[DEV]:DEV``; unused keys are
                                            harmless, devices are usually mknod-ed, not mounted
External net[INO]:extRootNetNS (net with    ``--external net[INO]:extRootNetNS`` (dump),
a path; likewise pid: extRootPidNS)         ``--inherit-fd fd[N]:extRootNetNS`` (restore)
JoinNs (ipc, uts, ... with a path)          ``--join-ns TYPE:PATH`` (restore)
CgRoot, each controller                     ``--cgroup-root PATH`` (restore)
EvasiveDevices                              ``--evasive-devices`` (restore)
RstSibling                                  ``--restore-sibling``: criud passes it always
OrphanPtsMaster (terminal: true; criu       none, RPC only: the slave is ``--external
makes a new master and sends it over RPC)   tty[RDEV:DEV]`` (dump), a new slave handed in is
                                            ``--inherit-fd`` (restore); /dev/console, the
                                            slave's bind, is ``--external mnt[/dev/console]``
                                            (dump) and binds the new slave (restore)
NotifyScripts, ConfigFile                   none: criud passes ``--no-default-config``
descriptors.json + InheritFd for pipes      criud's fd manifest and ``--inherit-fd``
==========================================  ====================================================

User-facing runc flags (``--tcp-established``, ``--ext-unix-sk``,
``--file-locks``, ``--shell-job``, ``--leave-running``) are criud's
DumpOptions already and are not derived from the bundle; runc's
``--tcp-skip-in-flight`` (criu ``--skip-in-flight``) and ``--link-remap``
have no DumpOptions field yet.

Layout: `parse_config` and `parse_spec` are pure; `load_spec` reads the
bundle; `probe` reads what only the running container can say (/proc);
`to_record`, `dump_args` and `restore_args` are pure again and work on what
those returned.  `ensure_mountpoints` is the one function that writes (into a
rootfs, before a restore, as runc does).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import posixpath
import stat
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

CONFIG_NAME = "config.json"
# A runc config.json is a few KiB; refuse anything absurd before parsing it.
MAX_CONFIG_BYTES = 4 << 20
RECORD_VERSION = 1

# OCI namespace type -> criu's name for it (--external, --join-ns).
NS_CRIU_NAMES: dict[str, str] = {
    "pid": "pid",
    "network": "net",
    "mount": "mnt",
    "ipc": "ipc",
    "uts": "uts",
    "user": "user",
    "cgroup": "cgroup",
    "time": "time",
}
# Namespaces runc leaves out of the image when config.json gives a path, and
# the fixed keys it names them by (libcontainer criuNsToKey).  A restore hands
# in an fd of the namespace to join under the same key.
EXTERNAL_NS_KEYS: dict[str, str] = {"network": "extRootNetNS", "pid": "extRootPidNS"}
# Namespaces with a path that a restore joins (--join-ns) rather than
# receives by key.  cgroup is missing on purpose: criu cannot join one.
JOINABLE_NS = ("ipc", "uts", "user", "time", "mount")
# The devices runc creates in every container (libcontainer/specconv
# AllowedDevices with a path); runc declares each one an external mount.
DEFAULT_DEVICES = ("/dev/null", "/dev/random", "/dev/full", "/dev/tty", "/dev/zero", "/dev/urandom")
# runc masks a file by bind-mounting /dev/null over it; all such mounts share
# this external key, which a restore maps to the host's /dev/null.
MASK_KEY = "/dev/null"
# A terminal container's /dev/console: runc binds the pty slave there.
CONSOLE = "/dev/console"
# Super options of a cgroup v1 mount that are not controllers.
_CG_GENERIC_OPTS = frozenset(
    {"rw", "ro", "xattr", "noprefix", "clone_children", "cpuset_v2_mode", "favordynmods", "all"}
)


class OciError(ValueError):
    """A bundle, its config.json or the container does not fit; the message says why."""


# -- the parsed config.json ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Mount:
    """One entry of config.json's `mounts`, with a bind's source made absolute."""

    destination: str
    type: str
    source: str
    options: tuple[str, ...] = ()

    @property
    def is_bind(self) -> bool:
        # runc makes a bind of any mount with a bind/rbind option, whatever
        # its type, and also honours type "bind".
        return self.type == "bind" or any(o in ("bind", "rbind") for o in self.options)


@dataclasses.dataclass(frozen=True)
class Namespace:
    """One entry of linux.namespaces: a type, and a path to join or None for a new one."""

    type: str
    path: str | None = None


@dataclasses.dataclass(frozen=True)
class OciSpec:
    """What criud needs of a config.json, validated; paths are absolute."""

    bundle: str
    rootfs: str
    rootfs_readonly: bool
    terminal: bool
    mounts: tuple[Mount, ...]
    masked_paths: tuple[str, ...]
    readonly_paths: tuple[str, ...]
    namespaces: tuple[Namespace, ...]
    cgroups_path: str | None
    devices: tuple[str, ...]

    @property
    def bind_mounts(self) -> tuple[tuple[str, str, tuple[str, ...]], ...]:
        """(destination, source, options) of every bind mount, in config order."""
        return tuple((m.destination, m.source, m.options) for m in self.mounts if m.is_bind)

    def namespace(self, ns_type: str) -> Namespace | None:
        """The entry for ns_type, or None if the container shares the host's."""
        for ns in self.namespaces:
            if ns.type == ns_type:
                return ns
        return None


def _abs_path(value: object, what: str) -> str:
    """An absolute, normalised path, or OciError naming the field."""
    if not isinstance(value, str) or not value:
        raise OciError(f"{what} must be a non-empty string")
    if "\0" in value:
        raise OciError(f"{what} contains a NUL byte")
    if not value.startswith("/"):
        raise OciError(f"{what} must be an absolute path, not {value!r}")
    # normpath keeps a leading "//"; criu and the kernel treat it as "/".
    return "/" + posixpath.normpath(value).lstrip("/")


def _obj(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise OciError(f"{what} must be an object")
    return value


def _list(value: object, what: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise OciError(f"{what} must be a list")
    return value


def _bool(value: object, what: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise OciError(f"{what} must be true or false")
    return value


def parse_config(data: bytes, bundle: str) -> OciSpec:
    """Parse config.json's bytes (read by the caller) for the bundle at `bundle`."""
    if len(data) > MAX_CONFIG_BYTES:
        raise OciError(f"{CONFIG_NAME} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        doc = json.loads(data)
    except UnicodeDecodeError as e:
        raise OciError(f"{CONFIG_NAME} is not UTF-8: {e.reason}") from None
    except json.JSONDecodeError as e:
        raise OciError(
            f"{CONFIG_NAME} is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})"
        ) from None
    return parse_spec(doc, bundle)


def parse_spec(doc: object, bundle: str) -> OciSpec:
    """Validate a decoded config.json; relative paths are taken against bundle."""
    bundle = _abs_path(bundle, "the bundle path")
    top = _obj(doc, f"the top level of {CONFIG_NAME}")

    root = _obj(top.get("root"), "root")
    root_path = root.get("path")
    if not isinstance(root_path, str) or not root_path:
        raise OciError("root.path must be a non-empty string")
    # runc takes a relative root.path against the bundle (its cwd).
    rootfs = _abs_path(posixpath.join(bundle, root_path), "root.path")
    readonly = _bool(root.get("readonly"), "root.readonly")

    process = top.get("process")
    terminal = False
    if process is not None:
        terminal = _bool(_obj(process, "process").get("terminal"), "process.terminal")

    mounts: list[Mount] = []
    for i, raw in enumerate(_list(top.get("mounts"), "mounts")):
        m = _obj(raw, f"mounts[{i}]")
        dest = _abs_path(m.get("destination"), f"mounts[{i}].destination")
        mtype = m.get("type", "")
        source = m.get("source", "")
        if not isinstance(mtype, str):
            raise OciError(f"mounts[{i}].type must be a string")
        if not isinstance(source, str):
            raise OciError(f"mounts[{i}].source must be a string")
        opts = _list(m.get("options"), f"mounts[{i}].options")
        if not all(isinstance(o, str) for o in opts):
            raise OciError(f"mounts[{i}].options must be a list of strings")
        mount = Mount(dest, mtype, source, tuple(opts))
        if mount.is_bind:
            if not source:
                raise OciError(f"mounts[{i}] ({dest}) is a bind mount without a source")
            # As runc does: a relative bind source is taken against the bundle.
            src = source if source.startswith("/") else posixpath.join(bundle, source)
            mount = dataclasses.replace(mount, source=_abs_path(src, f"mounts[{i}].source"))
        mounts.append(mount)

    raw_linux = top.get("linux")
    linux = {} if raw_linux is None else _obj(raw_linux, "linux")
    namespaces: list[Namespace] = []
    for i, raw in enumerate(_list(linux.get("namespaces"), "linux.namespaces")):
        n = _obj(raw, f"linux.namespaces[{i}]")
        ns_type = n.get("type")
        if ns_type not in NS_CRIU_NAMES:
            known = ", ".join(NS_CRIU_NAMES)
            raise OciError(f"linux.namespaces[{i}].type {ns_type!r} is not one of {known}")
        assert isinstance(ns_type, str)
        if any(ns.type == ns_type for ns in namespaces):
            raise OciError(f"linux.namespaces lists {ns_type} twice")
        path = n.get("path")
        # An empty path means a new namespace, as in runc.
        ns_path = _abs_path(path, f"linux.namespaces[{i}].path") if path else None
        namespaces.append(Namespace(ns_type, ns_path))

    def paths(key: str) -> tuple[str, ...]:
        return tuple(
            _abs_path(p, f"linux.{key}[{i}]")
            for i, p in enumerate(_list(linux.get(key), f"linux.{key}"))
        )

    cgroups_path = linux.get("cgroupsPath")
    if cgroups_path is not None and not isinstance(cgroups_path, str):
        raise OciError("linux.cgroupsPath must be a string")
    devices = tuple(
        _abs_path(_obj(d, f"linux.devices[{i}]").get("path"), f"linux.devices[{i}].path")
        for i, d in enumerate(_list(linux.get("devices"), "linux.devices"))
    )
    return OciSpec(
        bundle=bundle,
        rootfs=rootfs,
        rootfs_readonly=readonly,
        terminal=terminal,
        mounts=tuple(mounts),
        masked_paths=paths("maskedPaths"),
        readonly_paths=paths("readonlyPaths"),
        namespaces=tuple(namespaces),
        cgroups_path=cgroups_path or None,
        devices=devices,
    )


def load_spec(bundle: str) -> OciSpec:
    """Read and parse <bundle>/config.json; check that the rootfs is a directory.

    The rootfs path is resolved (symlinks included), because that is the path
    the container's mount table shows and criu compares against.
    """
    if not isinstance(bundle, str) or not bundle.startswith("/"):
        raise OciError(f"the bundle path must be absolute, not {bundle!r}")
    try:
        st = os.stat(bundle)
    except FileNotFoundError:
        raise OciError(f"bundle {bundle}: no such directory") from None
    except OSError as e:
        raise OciError(f"bundle {bundle}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise OciError(f"bundle {bundle} is not a directory")
    config = os.path.join(bundle, CONFIG_NAME)
    try:
        with open(config, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise OciError(f"bundle {bundle} has no {CONFIG_NAME}") from None
    except OSError as e:
        raise OciError(f"{config}: {e.strerror}") from None
    spec = parse_config(data, bundle)
    try:
        st = os.stat(spec.rootfs)
    except FileNotFoundError:
        raise OciError(f"rootfs {spec.rootfs} (root.path) does not exist") from None
    except OSError as e:
        raise OciError(f"rootfs {spec.rootfs}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise OciError(f"rootfs {spec.rootfs} (root.path) is not a directory")
    return dataclasses.replace(spec, rootfs=os.path.realpath(spec.rootfs))


# -- what the running container says ------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MountInfo:
    """One line of /proc/<pid>/mountinfo."""

    mount_id: int
    parent_id: int
    root: str
    mountpoint: str
    fstype: str
    source: str
    super_options: tuple[str, ...]


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        code = field[i + 1 : i + 4]
        if field[i] == "\\" and len(code) == 3 and code.isdigit():
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[MountInfo]:
    """Parse mountinfo text; lines that do not parse are skipped."""
    out: list[MountInfo] = []
    for line in text.splitlines():
        fields = line.split(" ")
        try:
            sep = fields.index("-", 6)
            out.append(
                MountInfo(
                    mount_id=int(fields[0]),
                    parent_id=int(fields[1]),
                    root=_unescape(fields[3]),
                    mountpoint=_unescape(fields[4]),
                    fstype=fields[sep + 1],
                    source=_unescape(fields[sep + 2]),
                    super_options=tuple(fields[sep + 3].split(",")),
                )
            )
        except (ValueError, IndexError):
            continue
    return out


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """/proc/<pid>/cgroup as {controllers: path}; "" is the v2 (unified) entry.

    Controllers mounted together keep their joined name ("cpu,cpuacct").
    """
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            out[parts[1]] = parts[2]
    return out


def _controllers(super_options: Iterable[str]) -> frozenset[str]:
    return frozenset(
        o for o in super_options if o not in _CG_GENERIC_OPTS and not o.startswith("release_agent=")
    )


@dataclasses.dataclass(frozen=True)
class CgroupMount:
    """A cgroup v1 hierarchy bind-mounted into the container (runc's getCgroupMounts)."""

    mountpoint: str  # in the container; also the external key
    controllers: str  # as in /proc/<pid>/cgroup: "cpu", "cpu,cpuacct", "name=systemd"
    host_mountpoint: str
    path: str  # the container's cgroup in that hierarchy, at dump time


def cgroup_v1_binds(
    spec: OciSpec,
    container_mounts: Sequence[MountInfo],
    host_mounts: Sequence[MountInfo],
    cgroups: Mapping[str, str],
) -> tuple[CgroupMount, ...]:
    """The container's cgroup v1 mounts, which criu must treat as external.

    runc bind-mounts each v1 hierarchy under a "cgroup" mount's destination
    (unless the container has a cgroup namespace: then they are real mounts,
    and on v2 there is one real mount).  criu cannot dump such a bind of a
    cgroup subdirectory ("doesn't have a proper root mount"), so runc declares
    each one external, and so do we.
    """
    if spec.namespace("cgroup") is not None:
        return ()
    dests = [m.destination for m in spec.mounts if m.type == "cgroup"]
    if not dests:
        return ()
    out: list[CgroupMount] = []
    for mi in container_mounts:
        if mi.fstype != "cgroup":
            continue
        if not any(mi.mountpoint.startswith(d.rstrip("/") + "/") for d in dests):
            continue
        ctrls = _controllers(mi.super_options)
        host = next(
            (
                h.mountpoint
                for h in host_mounts
                if h.fstype == "cgroup" and h.root == "/" and _controllers(h.super_options) == ctrls
            ),
            None,
        )
        if host is None:
            raise OciError(
                f"cgroup hierarchy {','.join(sorted(ctrls))} (at {mi.mountpoint} in the "
                "container) is not mounted in the daemon's mount namespace"
            )
        name = next((k for k in cgroups if k and frozenset(k.split(",")) == ctrls), None)
        if name is None:
            raise OciError(f"/proc/<pid>/cgroup has no line for {','.join(sorted(ctrls))}")
        out.append(CgroupMount(mi.mountpoint, name, host, cgroups[name]))
    return tuple(out)


def freezer_dir(cgroups: Mapping[str, str], host_mounts: Sequence[MountInfo]) -> str | None:
    """The container's freezer cgroup directory, as runc's cgroupManager.Path("freezer").

    A v1 freezer hierarchy wins (as on hybrid hosts); otherwise the v2 cgroup
    (criu >= 3.14 freezes through cgroup.freeze).  None when neither exists:
    criu then stops the tasks with ptrace alone.
    """
    for name, path in cgroups.items():
        if name and "freezer" in name.split(","):
            for h in host_mounts:
                if h.fstype == "cgroup" and h.root == "/" and "freezer" in h.super_options:
                    return posixpath.join(h.mountpoint, path.lstrip("/")).rstrip("/")
    if "" in cgroups:
        for h in host_mounts:
            if h.fstype == "cgroup2" and h.root == "/":
                return posixpath.join(h.mountpoint, cgroups[""].lstrip("/")).rstrip("/")
    return None


@dataclasses.dataclass(frozen=True)
class ContainerProbe:
    """What only the running container can say, read from /proc by `probe`."""

    pid: int
    # Masked paths that exist as something else than a directory in the
    # container: runc bind-mounts /dev/null over those (directories get a tmpfs).
    masked_files: tuple[str, ...] = ()
    # OCI namespace type -> inode, for network/pid namespaces given by path.
    ns_inodes: Mapping[str, int] = dataclasses.field(default_factory=dict)
    # /proc/<pid>/cgroup as parse_proc_cgroup returns it.
    cgroups: Mapping[str, str] = dataclasses.field(default_factory=dict)
    cgroup_mounts: tuple[CgroupMount, ...] = ()
    freeze_cgroup: str | None = None


def _read(path: str) -> str:
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        return f.read()


def probe(spec: OciSpec, pid: int, proc: str = "/proc") -> ContainerProbe:
    """Read /proc for what dump_args needs, and check that pid runs this bundle.

    Raises OciError when pid is gone, does not run in spec.rootfs, is not the
    init of the container's new pid namespace, or sits in other namespaces
    than the ones config.json names by path.
    """
    base = f"{proc}/{pid}"
    try:
        root_st = os.stat(f"{base}/root")
        status = _read(f"{base}/status")
        cgroups = parse_proc_cgroup(_read(f"{base}/cgroup"))
        container_mounts = parse_mountinfo(_read(f"{base}/mountinfo"))
        host_mounts = parse_mountinfo(_read(f"{proc}/self/mountinfo"))
    except FileNotFoundError:
        raise OciError(f"no process with pid {pid}") from None
    try:
        rootfs_st = os.stat(spec.rootfs)
    except OSError as e:
        raise OciError(f"rootfs {spec.rootfs}: {e.strerror}") from None
    if (root_st.st_dev, root_st.st_ino) != (rootfs_st.st_dev, rootfs_st.st_ino):
        raise OciError(
            f"pid {pid} does not run in rootfs {spec.rootfs} of bundle {spec.bundle}: "
            "wrong pid or wrong bundle"
        )
    pid_ns = spec.namespace("pid")
    if pid_ns is not None and pid_ns.path is None:
        nspid = next((ln.split()[1:] for ln in status.splitlines() if ln.startswith("NSpid:")), [])
        if nspid and nspid[-1] != "1":
            raise OciError(
                f"pid {pid} is not the container's init: it is pid {nspid[-1]} in its "
                "pid namespace; checkpoint the init (runc state's pid)"
            )
    ns_inodes: dict[str, int] = {}
    for ns in spec.namespaces:
        if ns.path is None:
            continue
        try:
            want = os.stat(ns.path).st_ino
            got = os.stat(f"{base}/ns/{NS_CRIU_NAMES[ns.type]}").st_ino
        except OSError as e:
            raise OciError(f"namespace {ns.type} at {ns.path}: {e.strerror}") from None
        if want != got:
            raise OciError(f"pid {pid} is not in the {ns.type} namespace at {ns.path}")
        if ns.type in EXTERNAL_NS_KEYS:
            ns_inodes[ns.type] = want
    masked: list[str] = []
    for path in spec.masked_paths:
        # As runc: stat through /proc/<pid>/root; absent paths and directories
        # are skipped (a directory is masked by a tmpfs, which criu dumps).
        try:
            st = os.stat(f"{base}/root{path}")
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode):
            masked.append(path)
    return ContainerProbe(
        pid=pid,
        masked_files=tuple(masked),
        ns_inodes=ns_inodes,
        cgroups=cgroups,
        cgroup_mounts=cgroup_v1_binds(spec, container_mounts, host_mounts, cgroups),
        freeze_cgroup=freezer_dir(cgroups, host_mounts),
    )


# -- the record, and the dump arguments ------------------------------------------------


def _ext_mounts(spec: OciSpec, found: ContainerProbe) -> list[dict[str, Any]]:
    """The external mounts runc declares, in its order, one per mountpoint."""
    out: list[dict[str, Any]] = []
    seen: set[str] = set()

    def add(entry: dict[str, Any]) -> None:
        # Two keys for one mountpoint would contradict each other in criu.
        if entry["mountpoint"] not in seen:
            seen.add(entry["mountpoint"])
            out.append(entry)

    cg_done = False
    for m in spec.mounts:
        if m.is_bind:
            add({"kind": "bind", "mountpoint": m.destination, "key": m.destination})
        elif m.type == "cgroup" and not cg_done:
            cg_done = True
            for cg in found.cgroup_mounts:
                add(
                    {
                        "kind": "cgroup",
                        "mountpoint": cg.mountpoint,
                        "key": cg.mountpoint,
                        "controllers": cg.controllers,
                        "host_mountpoint": cg.host_mountpoint,
                        "path": cg.path,
                    }
                )
    if spec.terminal:
        # runc binds the container's pty slave (/0 of its devpts) onto
        # /dev/console.  criu would restore that bind only with the slave's
        # master in the tree ("Unable to find a master for /0"), or over RPC
        # (orphan-pts-master, runc's way), which the CLI lacks.  So it stays
        # out of the image, and the restore binds the new slave there.
        add({"kind": "console", "mountpoint": CONSOLE, "key": CONSOLE})
    for path in found.masked_files:
        add({"kind": "masked", "mountpoint": path, "key": MASK_KEY})
    for dev in (*DEFAULT_DEVICES, *spec.devices):
        add({"kind": "device", "mountpoint": dev, "key": dev})
    return out


def to_record(spec: OciSpec, found: ContainerProbe) -> dict[str, Any]:
    """What a checkpoint records of its bundle: enough to restore it elsewhere.

    JSON-serialisable.  The dump arguments are a function of it, and a
    restore needs nothing else from the original bundle.
    """
    return {
        "version": RECORD_VERSION,
        "bundle": spec.bundle,
        "rootfs": spec.rootfs,
        "rootfs_readonly": spec.rootfs_readonly,
        "terminal": spec.terminal,
        "pid": found.pid,
        "mounts": [
            {"destination": d, "source": s, "options": list(o)} for d, s, o in spec.bind_mounts
        ],
        "masked_paths": list(spec.masked_paths),
        "readonly_paths": list(spec.readonly_paths),
        "namespaces": [{"type": n.type, "path": n.path} for n in spec.namespaces],
        "cgroups_path": spec.cgroups_path,
        "cgroups": dict(found.cgroups),
        "freeze_cgroup": found.freeze_cgroup,
        "external_mounts": _ext_mounts(spec, found),
        "external_namespaces": [
            {
                "type": t,
                "criu_type": NS_CRIU_NAMES[t],
                "key": EXTERNAL_NS_KEYS[t],
                "ino": ino,
                "path": ns.path,
            }
            for t, ino in found.ns_inodes.items()
            if (ns := spec.namespace(t)) is not None
        ],
    }


def _check_record(saved: Mapping[str, Any]) -> None:
    if saved.get("version") != RECORD_VERSION:
        raise OciError(f"unknown OCI record version {saved.get('version')!r}")


def _has_private_netns(namespaces: Iterable[Mapping[str, Any]]) -> bool:
    return any(n["type"] == "network" and not n.get("path") for n in namespaces)


def dump_args_from_record(
    saved: Mapping[str, Any], *, network_lock: str | None = None
) -> list[str]:
    """The criu dump arguments a record stands for (see the table at the top)."""
    _check_record(saved)
    args = ["--root", str(saved["rootfs"]), "--manage-cgroups=soft"]
    if saved.get("freeze_cgroup"):
        # As runc: freeze the whole cgroup, so no task forks past the dump.
        # Measured on cgroup v1: criu polls freezer.state every 100 ms, so
        # this usually costs 100 ms (a busybox dump: 0.19 s, 0.07 s without).
        args += ["--freeze-cgroup", str(saved["freeze_cgroup"])]
    namespaces = saved.get("namespaces") or []
    if _has_private_netns(namespaces):
        # runc always asks for an empty netns: it does not manage the
        # container's interfaces, so criu need not dump them (nor run
        # iptables-save inside).  criu still locks the network while dumping.
        args += ["--empty-ns", "net"]
    if network_lock and any(n["type"] == "network" for n in namespaces):
        args += ["--network-lock", network_lock]
    for m in saved.get("external_mounts") or []:
        args += ["--external", f"mnt[{m['mountpoint']}]:{m['key']}"]
    for n in saved.get("external_namespaces") or []:
        args += ["--external", f"{n['criu_type']}[{n['ino']}]:{n['key']}"]
    return args


def dump_args(
    spec: OciSpec, found: ContainerProbe, *, network_lock: str | None = None
) -> list[str]:
    """Extra `criu dump` arguments for a runc container (add to -t PID -D DIR ...).

    network_lock is the method criud probed ("nftables" or "iptables"); the
    container has its own netns, so criu locks it whatever the options.
    """
    return dump_args_from_record(to_record(spec, found), network_lock=network_lock)


# -- restore -------------------------------------------------------------------------


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
    return _abs_path(path, "linux.cgroupsPath")


def restore_ns_files(saved: Mapping[str, Any], new_spec: OciSpec) -> dict[str, str]:
    """Key -> namespace path (from the new bundle) that the caller opens and hands in.

    Pass the opened fds to restore_args as ns_fds, and to criu (pass_fds).
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
    ns_fds: Mapping[str, int] | None = None,
    network_lock: str | None = None,
    console: str | None = None,
) -> list[str]:
    """Extra `criu restore` arguments to restore `saved` into new_spec's bundle.

    The bundle may be the same one or a copy with a new rootfs and new bind
    sources ("restore under a new name").  cgroup_root is where the restored
    tasks go (restore_cgroup_root derives runc's choice; the daemon may
    impose its own); the cgroup v1 mounts follow it.  ns_fds maps each key of
    restore_ns_files to an fd open in criu's fd table.  console is the host
    path of the new pty slave a terminal container's /dev/console becomes
    (console_source finds it).
    """
    _check_record(saved)
    check_compatible(saved, new_spec)
    ns_fds = ns_fds or {}
    args = ["--root", new_spec.rootfs, "--manage-cgroups=soft"]
    if cgroup_root is not None:
        args += ["--cgroup-root", _abs_path(cgroup_root, "the cgroup root")]
    # As runc: a device node that cannot be opened by its path is looked up
    # by its numbers instead.
    args.append("--evasive-devices")
    namespaces = saved.get("namespaces") or []
    if _has_private_netns(namespaces):
        args += ["--empty-ns", "net"]
    if network_lock and any(n["type"] == "network" for n in namespaces):
        # With --empty-ns net criu re-applies the dump's lock in the new netns
        # and lifts it at the end: the method must be the dump's.
        args += ["--network-lock", network_lock]
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
    for key in restore_ns_files(saved, new_spec):
        if key not in ns_fds:
            raise OciError(f"no fd for external namespace {key}: open restore_ns_files' paths")
        args += ["--inherit-fd", f"fd[{ns_fds[key]}]:{key}"]
    for ns in new_spec.namespaces:
        if ns.path is not None and ns.type in JOINABLE_NS:
            if "," in ns.path:
                # criu reads --join-ns as NS:PATH[,OPTIONS]: a comma cannot be escaped.
                raise OciError(
                    f"namespace path {ns.path!r} contains a comma, which criu cannot take"
                )
            args += ["--join-ns", f"{NS_CRIU_NAMES[ns.type]}:{ns.path}"]
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
