"""criud.dump.oci: config.json parsing and the criu arguments runc would derive."""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from criud.daemon.errors import InvalidBundle
from criud.dump import oci
from criud.dump.oci import ContainerProbe, OciError

# `runc spec` of Debian 12's runc 1.1.5, verbatim.
RUNC_SPEC = json.loads(
    """
{"ociVersion": "1.0.2-dev",
 "process": {"terminal": true, "user": {"uid": 0, "gid": 0}, "args": ["sh"],
  "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"],
  "cwd": "/",
  "capabilities": {
   "bounding": ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"],
   "effective": ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"],
   "permitted": ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"],
   "ambient": ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]},
  "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
  "noNewPrivileges": true},
 "root": {"path": "rootfs", "readonly": true},
 "hostname": "runc",
 "mounts": [
  {"destination": "/proc", "type": "proc", "source": "proc"},
  {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
   "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
  {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
   "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
  {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
   "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
  {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
   "options": ["nosuid", "noexec", "nodev"]},
  {"destination": "/sys", "type": "sysfs", "source": "sysfs",
   "options": ["nosuid", "noexec", "nodev", "ro"]},
  {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
   "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]}],
 "linux": {
  "resources": {"devices": [{"allow": false, "access": "rwm"}]},
  "namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "ipc"}, {"type": "uts"},
                 {"type": "mount"}],
  "maskedPaths": ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys",
                  "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats",
                  "/proc/sched_debug", "/sys/firmware", "/proc/scsi"],
  "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]}}
"""
)

B = "/srv/bundles/web"

# Measured: a busybox container of that spec (terminal off, a /data bind),
# run by runc 1.1.5 on a cgroup v1 (hybrid) host.
CONTAINER_MOUNTINFO = """\
67 44 254:0 /srv/bundles/web/rootfs / ro,relatime - ext4 /dev/vda rw
68 67 0:41 / /proc rw,relatime - proc proc rw
69 67 0:42 / /dev rw,nosuid - tmpfs tmpfs rw,size=65536k,mode=755
73 67 0:45 / /sys ro,nosuid,nodev,noexec,relatime - sysfs sysfs ro
74 73 0:46 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime - tmpfs tmpfs rw,mode=755
75 74 0:29 /c1 /sys/fs/cgroup/cpu ro,nosuid,nodev,noexec,relatime - cgroup cgroup rw,cpu
78 74 0:32 /sandbox/c1 /sys/fs/cgroup/memory ro,nosuid - cgroup cgroup rw,memory
80 74 0:34 /c1 /sys/fs/cgroup/freezer ro,nosuid,nodev,noexec,relatime - cgroup cgroup rw,freezer
83 74 0:37 /c1 /sys/fs/cgroup/systemd ro,nosuid - cgroup cgroup rw,xattr,name=systemd
84 67 254:0 /srv/data /data rw,relatime - ext4 /dev/vda rw
50 68 0:42 /null /proc/keys rw,nosuid - tmpfs tmpfs rw,size=65536k,mode=755
"""
HOST_MOUNTINFO = """\
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
PROC_CGROUP = """\
9:name=systemd:/c1
6:freezer:/c1
4:memory:/sandbox/c1
1:cpu:/c1
0::/c1
"""


def spec_doc(**linux: Any) -> dict[str, Any]:
    """runc's spec, terminal off, a /data bind, and linux overrides."""
    doc = copy.deepcopy(RUNC_SPEC)
    doc["process"]["terminal"] = False
    doc["mounts"].append(
        {"destination": "/data", "type": "bind", "source": "/srv/data", "options": ["rbind"]}
    )
    doc["linux"].update(linux)
    return doc


def container(doc: dict[str, Any] | None = None, bundle: str = B) -> oci.OciSpec:
    return oci.parse_spec(spec_doc() if doc is None else doc, bundle)


def found_for(spec: oci.OciSpec, **kw: Any) -> ContainerProbe:
    cgroups = oci.parse_proc_cgroup(PROC_CGROUP)
    host = oci.parse_mountinfo(HOST_MOUNTINFO)
    base: dict[str, Any] = {
        "pid": 4242,
        "masked_files": ("/proc/keys", "/proc/timer_list"),
        "cgroups": cgroups,
        "cgroup_mounts": oci.cgroup_v1_binds(
            spec, oci.parse_mountinfo(CONTAINER_MOUNTINFO), host, cgroups
        ),
        "freeze_cgroup": oci.freezer_dir(cgroups, host),
    }
    base.update(kw)
    return ContainerProbe(**base)


# -- parsing --------------------------------------------------------------------------


def test_runc_spec_parses() -> None:
    s = oci.parse_spec(RUNC_SPEC, B)
    assert s.bundle == B
    assert s.rootfs == f"{B}/rootfs"
    assert s.rootfs_readonly is True
    assert s.terminal is True
    assert [m.destination for m in s.mounts][:2] == ["/proc", "/dev"]
    assert s.bind_mounts == ()
    assert len(s.masked_paths) == 10 and s.masked_paths[3] == "/proc/keys"
    assert s.readonly_paths[-1] == "/proc/sysrq-trigger"
    assert [(n.type, n.path) for n in s.namespaces] == [
        ("pid", None),
        ("network", None),
        ("ipc", None),
        ("uts", None),
        ("mount", None),
    ]
    assert s.cgroups_path is None
    assert s.devices == ()


def test_parse_config_bytes() -> None:
    s = oci.parse_config(json.dumps(RUNC_SPEC).encode(), B)
    assert s == oci.parse_spec(RUNC_SPEC, B)


def test_bind_detection_and_relative_sources() -> None:
    doc = spec_doc()
    doc["mounts"] += [
        {"destination": "/a", "type": "none", "source": "rel/dir", "options": ["bind", "ro"]},
        {"destination": "/b", "type": "bind", "source": "/abs/../b"},
        {"destination": "/c//d/", "type": "tmpfs", "source": "tmpfs"},
    ]
    s = container(doc)
    assert s.bind_mounts == (
        ("/data", "/srv/data", ("rbind",)),
        ("/a", f"{B}/rel/dir", ("bind", "ro")),
        ("/b", "/b", ()),
    )
    assert s.mounts[-1].destination == "/c/d"


def test_absolute_root_path_and_other_fields() -> None:
    doc = spec_doc(
        cgroupsPath="/pods/web",
        devices=[{"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229}],
        namespaces=[{"type": "network", "path": "/run/netns/web"}, {"type": "pid", "path": ""}],
    )
    doc["root"] = {"path": "/images/web/rootfs"}
    s = container(doc)
    assert s.rootfs == "/images/web/rootfs"
    assert s.rootfs_readonly is False
    assert s.cgroups_path == "/pods/web"
    assert s.devices == ("/dev/fuse",)
    assert s.namespace("network") == oci.Namespace("network", "/run/netns/web")
    assert s.namespace("pid") == oci.Namespace("pid", None)
    assert s.namespace("uts") is None


def _broken(path: list[Any], value: Any) -> dict[str, Any]:
    doc = spec_doc()
    node: Any = doc
    for p in path[:-1]:
        node = node[p]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return doc


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (["root"], KeyError, "root must be an object"),
        (["root", "path"], "", "root.path must be a non-empty string"),
        (["root", "readonly"], "yes", "root.readonly must be true or false"),
        (["process", "terminal"], 1, "process.terminal must be true or false"),
        (["mounts"], {}, "mounts must be a list"),
        (["mounts", 0, "destination"], "proc", "must be an absolute path"),
        (["mounts", 0, "destination"], None, "mounts[0].destination must be a non-empty"),
        (["mounts", 0, "options"], [1], "options must be a list of strings"),
        (["mounts", 7, "source"], "", "bind mount without a source"),
        (["linux", "namespaces", 0, "type"], "pidns", "is not one of"),
        (["linux", "namespaces", 1, "type"], "pid", "lists pid twice"),
        (["linux", "namespaces", 0, "path"], "run/netns/x", "must be an absolute path"),
        (["linux", "maskedPaths", 0], "proc/acpi", "linux.maskedPaths[0] must be an absolute"),
        (["linux", "readonlyPaths"], "/proc", "linux.readonlyPaths must be a list"),
        (["linux", "cgroupsPath"], 7, "linux.cgroupsPath must be a string"),
        (["linux", "devices"], [{"type": "c"}], "linux.devices[0].path must be"),
        (["linux"], [], "linux must be an object"),
    ],
)
def test_invalid_documents(path: list[Any], value: Any, message: str) -> None:
    with pytest.raises(OciError, match=re.escape(message)):
        container(_broken(path, value))


def test_invalid_json_and_top_level() -> None:
    with pytest.raises(OciError, match=r"not valid JSON: .*line 1, column 2"):
        oci.parse_config(b"{x", B)
    with pytest.raises(OciError, match="not UTF-8"):
        oci.parse_config(b'{"a": "\xff"}', B)
    with pytest.raises(OciError, match=re.escape("top level of config.json must be an object")):
        oci.parse_config(b"[]", B)
    with pytest.raises(OciError, match="larger than"):
        oci.parse_config(b" " * (oci.MAX_CONFIG_BYTES + 1), B)
    with pytest.raises(OciError, match="bundle path must be an absolute path"):
        oci.parse_spec(RUNC_SPEC, "bundles/web")
    # A 422 invalid_bundle wherever it escapes (issue 12: one error root).
    assert issubclass(OciError, InvalidBundle)


# -- load_spec (reads the bundle) ----------------------------------------------------------


def write_bundle(tmp_path: Path, doc: dict[str, Any] | None = None) -> Path:
    bundle = tmp_path / "bundle"
    (bundle / "rootfs").mkdir(parents=True)
    (bundle / "config.json").write_text(json.dumps(doc or spec_doc()))
    return bundle


def test_load_spec(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path)
    s = oci.load_spec(str(bundle))
    assert s.rootfs == str(bundle / "rootfs")
    assert s.bundle == str(bundle)


def test_load_spec_resolves_a_symlinked_rootfs(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path)
    (bundle / "rootfs").rename(tmp_path / "real")
    (bundle / "rootfs").symlink_to(tmp_path / "real")
    assert oci.load_spec(str(bundle)).rootfs == str(tmp_path / "real")


def test_load_spec_errors(tmp_path: Path) -> None:
    with pytest.raises(OciError, match="must be absolute"):
        oci.load_spec("relative/bundle")
    with pytest.raises(OciError, match="no such directory"):
        oci.load_spec(str(tmp_path / "nope"))
    (tmp_path / "file").write_text("")
    with pytest.raises(OciError, match="is not a directory"):
        oci.load_spec(str(tmp_path / "file"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(OciError, match=re.escape("has no config.json")):
        oci.load_spec(str(empty))
    bundle = write_bundle(tmp_path)
    (bundle / "rootfs").rmdir()
    with pytest.raises(OciError, match=r"rootfs .*/rootfs \(root.path\) does not exist"):
        oci.load_spec(str(bundle))
    (bundle / "rootfs").write_text("")
    with pytest.raises(OciError, match="is not a directory"):
        oci.load_spec(str(bundle))
    (bundle / "config.json").write_text("{")
    with pytest.raises(OciError, match="not valid JSON"):
        oci.load_spec(str(bundle))


# -- /proc parsing ---------------------------------------------------------------------


def test_parse_mountinfo_fields_and_escapes() -> None:
    text = (
        "84 67 254:0 /srv/my\\040data /da\\134ta rw,relatime shared:5 master:2 - ext4 /dev/vda rw\n"
        "garbage line\n"
    )
    (mi,) = oci.parse_mountinfo(text)
    assert mi == oci.MountInfo(84, 67, "/srv/my data", "/da\\ta", "ext4", "/dev/vda", ("rw",))


def test_parse_proc_cgroup() -> None:
    got = oci.parse_proc_cgroup("2:cpu,cpuacct:/a\n1:name=systemd:/b:c\n0::/\n")
    assert got == {"cpu,cpuacct": "/a", "name=systemd": "/b:c", "": "/"}


def test_cgroup_v1_binds_match_host_hierarchies() -> None:
    spec = container()
    binds = found_for(spec).cgroup_mounts
    assert binds == (
        oci.CgroupMount("/sys/fs/cgroup/cpu", "cpu", "/sys/fs/cgroup/cpu", "/c1"),
        oci.CgroupMount("/sys/fs/cgroup/memory", "memory", "/sys/fs/cgroup/memory", "/sandbox/c1"),
        oci.CgroupMount("/sys/fs/cgroup/freezer", "freezer", "/sys/fs/cgroup/freezer", "/c1"),
        oci.CgroupMount("/sys/fs/cgroup/systemd", "name=systemd", "/sys/fs/cgroup/systemd", "/c1"),
    )


def test_cgroup_v1_binds_none_with_cgroupns_or_without_cgroup_mount() -> None:
    cgroups = oci.parse_proc_cgroup(PROC_CGROUP)
    cmi, hmi = oci.parse_mountinfo(CONTAINER_MOUNTINFO), oci.parse_mountinfo(HOST_MOUNTINFO)
    ns = RUNC_SPEC["linux"]["namespaces"] + [{"type": "cgroup"}]
    assert oci.cgroup_v1_binds(container(spec_doc(namespaces=ns)), cmi, hmi, cgroups) == ()
    doc = spec_doc()
    doc["mounts"] = [m for m in doc["mounts"] if m["type"] != "cgroup"]
    assert oci.cgroup_v1_binds(container(doc), cmi, hmi, cgroups) == ()


def test_cgroup_v1_binds_missing_host_hierarchy() -> None:
    hmi = [m for m in oci.parse_mountinfo(HOST_MOUNTINFO) if "memory" not in m.super_options]
    cmi = oci.parse_mountinfo(CONTAINER_MOUNTINFO)
    with pytest.raises(OciError, match=r"cgroup hierarchy memory \(at .*\) is not mounted"):
        oci.cgroup_v1_binds(container(), cmi, hmi, oci.parse_proc_cgroup(PROC_CGROUP))


def test_freezer_dir_v1_then_v2() -> None:
    host = oci.parse_mountinfo(HOST_MOUNTINFO)
    assert oci.freezer_dir(oci.parse_proc_cgroup(PROC_CGROUP), host) == "/sys/fs/cgroup/freezer/c1"
    v2 = oci.parse_mountinfo("41 31 0:38 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n")
    assert oci.freezer_dir({"": "/pods/web"}, v2) == "/sys/fs/cgroup/pods/web"
    assert oci.freezer_dir({"cpu": "/x"}, host) is None


# -- record and dump arguments -------------------------------------------------------------


EXT_CG = [
    "--external",
    "mnt[/sys/fs/cgroup/cpu]:/sys/fs/cgroup/cpu",
    "--external",
    "mnt[/sys/fs/cgroup/memory]:/sys/fs/cgroup/memory",
    "--external",
    "mnt[/sys/fs/cgroup/freezer]:/sys/fs/cgroup/freezer",
    "--external",
    "mnt[/sys/fs/cgroup/systemd]:/sys/fs/cgroup/systemd",
]
EXT_DEV = [a for d in oci.DEFAULT_DEVICES for a in ("--external", f"mnt[{d}]:{d}")]


def test_dump_args_exact() -> None:
    spec = container()
    assert oci.dump_args(spec, found_for(spec), network_lock="nftables") == [
        "--root",
        f"{B}/rootfs",
        "--manage-cgroups=soft",
        "--freeze-cgroup",
        "/sys/fs/cgroup/freezer/c1",
        "--empty-ns",
        "net",
        "--network-lock",
        "nftables",
        *EXT_CG,
        "--external",
        "mnt[/data]:/data",
        "--external",
        "mnt[/proc/keys]:/dev/null",
        "--external",
        "mnt[/proc/timer_list]:/dev/null",
        *EXT_DEV,
    ]


def test_dump_args_without_netns_cgroups_or_masks() -> None:
    doc = spec_doc(namespaces=[{"type": "pid"}, {"type": "mount"}])
    doc["mounts"] = [m for m in doc["mounts"] if m["type"] not in ("cgroup", "bind")]
    spec = container(doc)
    found = ContainerProbe(pid=1, masked_files=())
    assert oci.dump_args(spec, found, network_lock="nftables") == [
        "--root",
        f"{B}/rootfs",
        "--manage-cgroups=soft",
        *EXT_DEV,
    ]


def test_dump_args_external_namespaces() -> None:
    ns = [
        {"type": "pid", "path": "/proc/77/ns/pid"},
        {"type": "network", "path": "/run/netns/web"},
        {"type": "ipc", "path": "/proc/77/ns/ipc"},
        {"type": "mount"},
    ]
    spec = container(spec_doc(namespaces=ns))
    found = found_for(spec, ns_inodes={"pid": 4026532180, "network": 4026532181})
    args = oci.dump_args(spec, found)
    assert args[-4:] == [
        "--external",
        "pid[4026532180]:extRootPidNS",
        "--external",
        "net[4026532181]:extRootNetNS",
    ]
    # An external netns is not in the image at all: no --empty-ns for it.
    assert "--empty-ns" not in args


def test_devices_and_duplicate_mountpoints() -> None:
    doc = spec_doc(devices=[{"path": "/dev/fuse"}, {"path": "/dev/null"}])
    doc["mounts"].append({"destination": "/dev/tty", "type": "bind", "source": "/dev/tty"})
    spec = container(doc)
    rec = oci.to_record(spec, found_for(spec))
    points = [m["mountpoint"] for m in rec["external_mounts"]]
    assert len(points) == len(set(points))
    kinds = {m["mountpoint"]: m["kind"] for m in rec["external_mounts"]}
    assert kinds["/dev/tty"] == "bind"
    assert kinds["/dev/fuse"] == "device"


def test_record_is_json_and_complete() -> None:
    spec = container(spec_doc(cgroupsPath="/pods/web"))
    rec = oci.to_record(spec, found_for(spec))
    assert json.loads(json.dumps(rec)) == rec
    assert rec["version"] == oci.RECORD_VERSION
    assert rec["rootfs"] == f"{B}/rootfs"
    assert rec["mounts"] == [{"destination": "/data", "source": "/srv/data", "options": ["rbind"]}]
    assert rec["cgroups_path"] == "/pods/web"
    assert rec["cgroups"]["memory"] == "/sandbox/c1"
    assert rec["freeze_cgroup"] == "/sys/fs/cgroup/freezer/c1"
    assert rec["namespaces"][1] == {"type": "network", "path": None}
    assert len(rec["masked_paths"]) == 10 and len(rec["readonly_paths"]) == 5
    assert oci.dump_args_from_record(rec) == oci.dump_args(spec, found_for(spec))


def test_terminal_console_stays_out_of_the_image() -> None:
    # The pty slave runc binds on /dev/console: criu cannot restore that bind
    # without the master (held by the engine), so it is an external mount
    # (the restore binds the new slave: tests/unit/restore/test_oci.py).
    spec = oci.parse_spec(RUNC_SPEC, B)
    assert spec.terminal is True
    args = oci.dump_args(spec, ContainerProbe(pid=1))
    assert "mnt[/dev/console]:/dev/console" in args
    rec = oci.to_record(spec, ContainerProbe(pid=1))
    assert {"kind": "console", "mountpoint": "/dev/console", "key": "/dev/console"} in rec[
        "external_mounts"
    ]


# -- probe (reads /proc; this test process stands in for a container) --------------------


def self_spec(tmp_path: Path, **linux: Any) -> oci.OciSpec:
    doc = spec_doc(**linux)
    doc["root"]["path"] = "/"
    doc["mounts"] = []
    return oci.parse_spec(doc, str(tmp_path))


def test_probe_masked_files_and_cgroups(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    (tmp_path / "dir").mkdir()
    masked = [str(tmp_path / n) for n in ("file", "dir", "missing")]
    spec = self_spec(tmp_path, maskedPaths=masked, namespaces=[])
    found = oci.probe(spec, os.getpid())
    assert found.pid == os.getpid()
    assert found.masked_files == (str(tmp_path / "file"),)
    with open("/proc/self/cgroup") as f:
        assert found.cgroups == oci.parse_proc_cgroup(f.read())
    assert found.cgroup_mounts == ()


def test_probe_refuses_another_rootfs_or_a_non_init(tmp_path: Path) -> None:
    spec = self_spec(tmp_path, namespaces=[])
    (tmp_path / "rootfs").mkdir()
    with pytest.raises(OciError, match="does not run in rootfs"):
        oci.probe(oci.parse_spec({**spec_doc(), "mounts": []}, str(tmp_path)), os.getpid())
    # This process is no pid namespace's init (unless the suite runs as one).
    if os.getpid() != 1:
        with pytest.raises(OciError, match="is not the container's init"):
            oci.probe(self_spec(tmp_path, namespaces=[{"type": "pid"}]), os.getpid())
    with pytest.raises(OciError, match="no process with pid"):
        oci.probe(spec, 0x3FFFFFFF)


def test_probe_checks_namespace_paths(tmp_path: Path) -> None:
    mine = [{"type": "network", "path": f"/proc/{os.getpid()}/ns/net"}]
    found = oci.probe(self_spec(tmp_path, namespaces=mine), os.getpid())
    assert found.ns_inodes == {"network": os.stat("/proc/self/ns/net").st_ino}
    other = [{"type": "uts", "path": str(tmp_path)}]
    with pytest.raises(OciError, match="is not in the uts namespace"):
        oci.probe(self_spec(tmp_path, namespaces=other), os.getpid())
