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

import dataclasses
import json
import os
import posixpath
import stat
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from criud.daemon.errors import InvalidBundle

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


class OciError(InvalidBundle):
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


def abs_path(value: object, what: str) -> str:
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


def _parse_mounts(top: dict[str, Any], bundle: str) -> tuple[Mount, ...]:
    """config.json's mounts; bind sources made absolute against bundle, as runc does."""
    mounts: list[Mount] = []
    for i, raw in enumerate(_list(top.get("mounts"), "mounts")):
        m = _obj(raw, f"mounts[{i}]")
        dest = abs_path(m.get("destination"), f"mounts[{i}].destination")
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
            mount = dataclasses.replace(mount, source=abs_path(src, f"mounts[{i}].source"))
        mounts.append(mount)
    return tuple(mounts)


def _parse_namespaces(linux: dict[str, Any]) -> tuple[Namespace, ...]:
    """linux.namespaces, each type once; a path joins one, no path makes a new one."""
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
        ns_path = abs_path(path, f"linux.namespaces[{i}].path") if path else None
        namespaces.append(Namespace(ns_type, ns_path))
    return tuple(namespaces)


def parse_spec(doc: object, bundle: str) -> OciSpec:
    """Validate a decoded config.json; relative paths are taken against bundle."""
    bundle = abs_path(bundle, "the bundle path")
    top = _obj(doc, f"the top level of {CONFIG_NAME}")

    root = _obj(top.get("root"), "root")
    root_path = root.get("path")
    if not isinstance(root_path, str) or not root_path:
        raise OciError("root.path must be a non-empty string")
    # runc takes a relative root.path against the bundle (its cwd).
    rootfs = abs_path(posixpath.join(bundle, root_path), "root.path")
    readonly = _bool(root.get("readonly"), "root.readonly")

    process = top.get("process")
    terminal = False
    if process is not None:
        terminal = _bool(_obj(process, "process").get("terminal"), "process.terminal")

    mounts = _parse_mounts(top, bundle)

    raw_linux = top.get("linux")
    linux = {} if raw_linux is None else _obj(raw_linux, "linux")
    namespaces = _parse_namespaces(linux)

    def paths(key: str) -> tuple[str, ...]:
        return tuple(
            abs_path(p, f"linux.{key}[{i}]")
            for i, p in enumerate(_list(linux.get(key), f"linux.{key}"))
        )

    cgroups_path = linux.get("cgroupsPath")
    if cgroups_path is not None and not isinstance(cgroups_path, str):
        raise OciError("linux.cgroupsPath must be a string")
    devices = tuple(
        abs_path(_obj(d, f"linux.devices[{i}]").get("path"), f"linux.devices[{i}].path")
        for i, d in enumerate(_list(linux.get("devices"), "linux.devices"))
    )
    return OciSpec(
        bundle=bundle,
        rootfs=rootfs,
        rootfs_readonly=readonly,
        terminal=terminal,
        mounts=mounts,
        masked_paths=paths("maskedPaths"),
        readonly_paths=paths("readonlyPaths"),
        namespaces=namespaces,
        cgroups_path=cgroups_path or None,
        devices=devices,
    )


def load_spec(bundle: str) -> OciSpec:
    """Read and parse <bundle>/config.json; check that the rootfs is a directory.

    The rootfs path is resolved (symlinks included), because that is the path
    the container's mount table shows and criu compares against.
    """
    return load_spec_doc(bundle)[0]


def load_spec_doc(bundle: str) -> tuple[OciSpec, dict[str, Any]]:
    """load_spec, and config.json as decoded (an archive's spec.dump is that document)."""
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
    doc = json.loads(data)  # parse_config has decoded it once already: it is valid
    try:
        st = os.stat(spec.rootfs)
    except FileNotFoundError:
        raise OciError(f"rootfs {spec.rootfs} (root.path) does not exist") from None
    except OSError as e:
        raise OciError(f"rootfs {spec.rootfs}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise OciError(f"rootfs {spec.rootfs} (root.path) is not a directory")
    return dataclasses.replace(spec, rootfs=os.path.realpath(spec.rootfs)), doc


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


def _joined_namespaces(spec: OciSpec, pid: int, base: str) -> dict[str, int]:
    """Check pid sits in each namespace config.json names by path; external ones' inodes."""
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
    return ns_inodes


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
    ns_inodes = _joined_namespaces(spec, pid, base)
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


def check_record(saved: Mapping[str, Any]) -> None:
    if saved.get("version") != RECORD_VERSION:
        raise OciError(f"unknown OCI record version {saved.get('version')!r}")


def has_private_netns(namespaces: Iterable[Mapping[str, Any]]) -> bool:
    return any(n["type"] == "network" and not n.get("path") for n in namespaces)


def dump_args_from_record(
    saved: Mapping[str, Any], *, network_lock: str | None = None
) -> list[str]:
    """The criu dump arguments a record stands for (see the table at the top)."""
    check_record(saved)
    args = ["--root", str(saved["rootfs"]), "--manage-cgroups=soft"]
    if saved.get("freeze_cgroup"):
        # As runc: freeze the whole cgroup, so no task forks past the dump.
        # Measured on cgroup v1: criu polls freezer.state every 100 ms, so
        # this usually costs 100 ms (a busybox dump: 0.19 s, 0.07 s without).
        args += ["--freeze-cgroup", str(saved["freeze_cgroup"])]
    namespaces = saved.get("namespaces") or []
    if has_private_netns(namespaces):
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
