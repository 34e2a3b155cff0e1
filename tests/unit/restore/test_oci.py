"""criud.restore.oci: fitting a checkpoint into a bundle, as runc restores."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest

from criud.dump import oci
from criud.dump.oci import ContainerProbe, OciError
from criud.restore import oci as roci

from ..dump.test_oci import (
    EXT_DEV,
    RUNC_SPEC,
    B,
    container,
    found_for,
    spec_doc,
    write_bundle,
)

# -- restore ----------------------------------------------------------------------------


def saved_record(doc: dict[str, Any] | None = None, **probe_kw: Any) -> dict[str, Any]:
    spec = container(doc)
    return oci.to_record(spec, found_for(spec, **probe_kw))


def copy_doc(rootfs: str = "rootfs-r2", data: str = "/srv/data-r2", **linux: Any) -> dict[str, Any]:
    doc = spec_doc(**linux)
    doc["root"]["path"] = rootfs
    doc["mounts"][-1]["source"] = data
    return doc


def test_restore_args_into_a_copy_under_a_new_name() -> None:
    new = container(copy_doc(), bundle="/srv/bundles/web-r2")
    cg = roci.restore_cgroup_root(new, "web-r2")
    assert cg == "/web-r2"
    args = roci.restore_args(saved_record(), new, cgroup_root=cg, network_lock="nftables")
    assert args == [
        "--root",
        "/srv/bundles/web-r2/rootfs-r2",
        "--manage-cgroups=soft",
        "--cgroup-root",
        "/web-r2",
        "--evasive-devices",
        "--empty-ns",
        "net",
        "--network-lock",
        "nftables",
        "--external",
        "mnt[/sys/fs/cgroup/cpu]:/sys/fs/cgroup/cpu/web-r2",
        "--external",
        "mnt[/sys/fs/cgroup/memory]:/sys/fs/cgroup/memory/web-r2",
        "--external",
        "mnt[/sys/fs/cgroup/freezer]:/sys/fs/cgroup/freezer/web-r2",
        "--external",
        "mnt[/sys/fs/cgroup/systemd]:/sys/fs/cgroup/systemd/web-r2",
        "--external",
        "mnt[/data]:/srv/data-r2",
        # The masked files' shared key, once; it is also the /dev/null device's.
        "--external",
        "mnt[/dev/null]:/dev/null",
        *EXT_DEV[2:],
    ]


def test_restore_args_without_cgroup_root_keeps_the_dumped_cgroups() -> None:
    args = roci.restore_args(saved_record(), container())
    assert "--cgroup-root" not in args
    assert "mnt[/sys/fs/cgroup/memory]:/sys/fs/cgroup/memory/sandbox/c1" in args
    assert "mnt[/data]:/srv/data" in args


def test_restore_external_namespaces_need_fds() -> None:
    ns = [{"type": "network", "path": "/run/netns/web"}, {"type": "pid"}, {"type": "mount"}]
    ns2 = [{"type": "network", "path": "/run/netns/web2"}, {"type": "pid"}, {"type": "mount"}]
    rec = saved_record(spec_doc(namespaces=ns), ns_inodes={"network": 4026532181})
    new = container(copy_doc(namespaces=ns2))
    assert roci.restore_ns_files(rec, new) == {"extRootNetNS": "/run/netns/web2"}
    args = roci.restore_args(rec, new, network_lock="nftables")
    # The namespace's fd is named by the restore's FdMap, not here (issue 12).
    assert "--inherit-fd" not in args
    assert "--empty-ns" not in args
    assert "--network-lock" in args


def test_restore_joins_namespaces_given_by_path() -> None:
    ns = [{"type": "ipc", "path": "/proc/1/ns/ipc"}, {"type": "uts", "path": "/proc/1/ns/uts"}]
    ns2 = [{"type": "ipc", "path": "/run/ipc2"}, {"type": "uts", "path": "/run/uts2"}]
    rec = saved_record(spec_doc(namespaces=ns))
    args = roci.restore_args(rec, container(copy_doc(namespaces=ns2)))
    assert args[-4:] == ["--join-ns", "ipc:/run/ipc2", "--join-ns", "uts:/run/uts2"]
    ns3 = [{"type": "ipc", "path": "/run/ipc,2"}, {"type": "uts", "path": "/run/uts2"}]
    with pytest.raises(OciError, match="contains a comma"):
        roci.restore_args(rec, container(copy_doc(namespaces=ns3)))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["mounts"].pop(), "bind mount /data of the checkpoint has no source"),
        (
            lambda d: d["mounts"].append({"destination": "/x", "type": "bind", "source": "/x"}),
            "bind mount /x is new",
        ),
        (lambda d: d["linux"]["namespaces"].pop(1), "namespaces differ"),
        (
            lambda d: d["linux"]["namespaces"][1].update(path="/run/netns/x"),
            "network namespace was private",
        ),
        (lambda d: d["process"].update(terminal=True), "process.terminal differs"),
    ],
)
def test_restore_refuses_a_bundle_that_does_not_fit(change: Any, message: str) -> None:
    doc = copy_doc()
    change(doc)
    with pytest.raises(OciError, match=message):
        roci.check_compatible(saved_record(), container(doc))


def test_prepare_checks_compatibility_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """check_compatible ran twice per restore (issue 12); prepare runs it once."""
    calls: list[str] = []
    real = roci.check_compatible

    def counted(saved: Any, new: oci.OciSpec) -> None:
        calls.append(new.rootfs)
        real(saved, new)

    monkeypatch.setattr(roci, "check_compatible", counted)
    bundle = write_bundle(tmp_path, spec_doc())
    saved = saved_record()
    prepared = roci.prepare(saved, str(bundle), "web-2", None, "nftables")
    assert calls == [str(bundle / "rootfs")]
    assert prepared.args[:2] == ("--root", str(bundle / "rootfs"))
    assert "--inherit-fd" not in prepared.args
    # A bundle that does not fit: refused, once, naming the bundle.
    calls.clear()
    doc = spec_doc()
    doc["mounts"].pop()
    other = write_bundle(tmp_path / "other", doc)
    with pytest.raises(OciError, match="bind mount /data") as ei:
        roci.prepare(saved, str(other), None, None, None)
    assert len(calls) == 1 and ei.value.extra["bundle"] == str(other)


def test_restore_refuses_external_ns_without_a_path() -> None:
    ns = [{"type": "network", "path": "/run/netns/web"}]
    rec = saved_record(spec_doc(namespaces=ns), ns_inodes={"network": 1})
    with pytest.raises(OciError, match=re.escape("must give linux.namespaces network a path")):
        roci.restore_ns_files(rec, container(copy_doc(namespaces=[{"type": "network"}])))


def test_restore_refuses_bad_records() -> None:
    rec = saved_record()
    with pytest.raises(OciError, match="unknown OCI record version"):
        roci.restore_args({**rec, "version": 99}, container())
    # A terminal container restores into a terminal bundle only.
    with pytest.raises(OciError, match=re.escape("process.terminal differs")):
        roci.check_compatible({**rec, "terminal": True}, container())


def test_terminal_console_gets_the_new_slave() -> None:
    # The record keeps /dev/console out of the image (the slave's master is
    # the engine's); the restore binds the new slave the engine handed in.
    spec = oci.parse_spec(RUNC_SPEC, B)
    rec = oci.to_record(spec, ContainerProbe(pid=1))
    with pytest.raises(OciError, match="new pty slave"):
        roci.restore_args(rec, spec)
    args = roci.restore_args(rec, spec, console="/dev/pts/7")
    assert args[args.index("mnt[/dev/console]:/dev/pts/7") - 1] == "--external"


def test_console_source_is_the_handed_in_slave(tmp_path: Path) -> None:
    master, slave = os.openpty()
    try:
        assert roci.console_source([(slave, "tty[1:2]")], ["tty[1:2]"]) == os.ttyname(slave)
        assert roci.console_source([(slave, "pipe:[3]")], ["tty[1:2]"]) is None
        with open(tmp_path / "f", "w") as f, pytest.raises(OciError, match="not a pty slave"):
            roci.console_source([(f.fileno(), "tty[1:2]")], ["tty[1:2]"])
    finally:
        os.close(master)
        os.close(slave)


def test_restore_cgroup_root() -> None:
    assert roci.restore_cgroup_root(container(spec_doc(cgroupsPath="/pods//web/"))) == "/pods/web"
    assert roci.restore_cgroup_root(container(), "web-2") == "/web-2"
    assert roci.restore_cgroup_root(container()) is None
    with pytest.raises(OciError, match="systemd-style"):
        roci.restore_cgroup_root(container(spec_doc(cgroupsPath="system.slice:runc:web")))
    with pytest.raises(OciError, match="must be an absolute path"):
        roci.restore_cgroup_root(container(spec_doc(cgroupsPath="pods/web")))


# -- mountpoints --------------------------------------------------------------------------


def test_mountpoints_to_make_skips_tmpfs_children_and_cgroup() -> None:
    assert roci.mountpoints_to_make(container()) == [
        ("/tmp", None),
        ("/proc", None),
        ("/dev", None),
        ("/sys", None),
        ("/data", "/srv/data"),
    ]


def test_ensure_mountpoints(tmp_path: Path) -> None:
    (tmp_path / "src-dir").mkdir()
    (tmp_path / "src-file").write_text("x")
    doc = spec_doc()
    doc["mounts"] += [
        {"destination": "/etc/hosts", "type": "bind", "source": str(tmp_path / "src-file")},
        {"destination": "/a/b/c", "type": "bind", "source": str(tmp_path / "src-dir")},
    ]
    bundle = write_bundle(tmp_path, doc)
    (bundle / "rootfs" / "proc").mkdir()
    spec = oci.load_spec(str(bundle))
    made = roci.ensure_mountpoints(spec)
    assert made == ["/tmp", "/dev", "/sys", "/data", "/etc/hosts", "/a/b/c"]
    root = bundle / "rootfs"
    assert (root / "etc" / "hosts").is_file()
    assert (root / "a" / "b" / "c").is_dir()
    assert roci.ensure_mountpoints(spec) == []


def test_ensure_mountpoints_does_not_follow_symlinks(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    doc = spec_doc()
    doc["mounts"] = [{"destination": "/evil/x", "type": "proc", "source": "proc"}]
    bundle = write_bundle(tmp_path, doc)
    (bundle / "rootfs" / "evil").symlink_to(outside)
    with pytest.raises(OciError, match="evil is a symlink"):
        roci.ensure_mountpoints(oci.load_spec(str(bundle)))
    assert list(outside.iterdir()) == []
