"""criud.restore.oci_archive: a Podman export read as hostile input, and its record."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from criud.daemon.errors import PodmanArchiveInvalid
from criud.dump import images
from criud.dump.oci_archive import SPEC_KEY
from criud.restore import oci_archive as oa

SPEC: dict[str, Any] = {
    "ociVersion": "1.0.2-dev",
    "process": {"terminal": False, "args": ["sh"]},
    "root": {"path": "/var/lib/containers/storage/overlay/abc/merged"},
    "mounts": [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev/shm", "type": "bind", "source": "/run/x/shm", "options": ["bind"]},
        {"destination": "/etc/hosts", "type": "bind", "source": "/run/x/hosts"},
        {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup"},
    ],
    "linux": {
        "cgroupsPath": "/libpod_parent/libpod-abc",
        "namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")],
        "maskedPaths": ["/proc/kcore", "/sys/firmware"],
    },
}
CONFIG = {
    "id": "a" * 64,
    "name": "web-1",
    "runtime": "runc",
    "rootfsImageName": "localhost/bb:1",
    "rootfsImageID": "b" * 64,
    "createdTime": "2026-12-01T22:51:41.137870403Z",
}
PSTREE_ENTRY = bytes([0x08, 0x01, 0x10, 0x00, 0x18, 0x01, 0x20, 0x01, 0x28, 0x01])


def _pstree(*entries: bytes) -> bytes:
    out = struct.pack("<II", images.IMG_COMMON_MAGIC, images.PSTREE_MAGIC)
    for e in entries:
        out += struct.pack("<I", len(e)) + e
    return out


def _export(
    root: Path,
    spec: object = SPEC,
    config: object = CONFIG,
    descriptors: object = ("/dev/null", "pipe:[11]", "pipe:[12]"),
) -> Path:
    (root / "checkpoint").mkdir(exist_ok=True)
    for name, doc in (("spec.dump", spec), ("config.dump", config)):
        if doc is not None:
            (root / name).write_text(json.dumps(doc))
    if descriptors is not None:
        (root / "checkpoint" / "descriptors.json").write_text(json.dumps(list(descriptors)))
    (root / "checkpoint" / "pstree.img").write_bytes(_pstree(PSTREE_ENTRY))
    return root


@pytest.fixture
def dirfd(tmp_path: Path) -> Iterator[int]:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    yield fd
    os.close(fd)


def test_podman_export_becomes_a_manifest_and_record(tmp_path: Path, dirfd: int) -> None:
    _export(tmp_path)
    imp = oa.from_podman(dirfd)
    assert imp.name_hint == "web-1"
    root = imp.manifest.tasks[0]
    assert root.pid == 1
    assert [(f["fd"], f["key"], f["external"]) for f in root.fds] == [
        (0, "dev/null", False),
        (1, "pipe:[11]", True),
        (2, "pipe:[12]", True),
    ]
    assert imp.manifest.external == ("pipe:[11]", "pipe:[12]")
    assert imp.manifest.pidns_init
    rec = imp.oci
    assert oa.is_imported(rec) and rec["bundle"] is None
    assert rec[SPEC_KEY] == SPEC
    assert rec["podman"]["rootfsImageID"] == "b" * 64
    kinds = {(m["kind"], m["key"]) for m in rec["external_mounts"]}
    assert {("bind", "/dev/shm"), ("bind", "/etc/hosts"), ("masked", "/dev/null")} <= kinds
    # The manifest survives the store's round trip.
    again = type(imp.manifest).from_json(json.loads(json.dumps(imp.manifest.to_json())))
    assert again == imp.manifest


@pytest.mark.parametrize(
    ("change", "word"),
    [
        ({"spec": None}, "no spec.dump"),
        ({"config": None}, "no config.dump"),
        ({"descriptors": None}, "no descriptors.json"),
        ({"config": ["not", "an", "object"]}, "JSON object"),
        ({"spec": {"root": {}}}, "root.path"),
        ({"spec": {**SPEC, "process": {"terminal": True}}}, "terminal"),
        ({"descriptors": ["/dev/pts/0", "pipe:[1]", "pipe:[2]"]}, "terminal"),
        ({"descriptors": "pipe:[1]"}, "list of 1 to 3"),
        ({"descriptors": ["a", "b", "c", "d"]}, "list of 1 to 3"),
        ({"descriptors": ["pipe:[1]", 7]}, "non-empty"),
        ({"descriptors": ["relative/path"]}, "not a pipe"),
    ],
)
def test_malformed_exports_are_400s(
    tmp_path: Path, dirfd: int, change: dict[str, Any], word: str
) -> None:
    _export(tmp_path, **change)
    with pytest.raises(PodmanArchiveInvalid) as e:
        oa.from_podman(dirfd)
    assert e.value.status == 400 and e.value.code == "podman_archive_invalid"
    assert word in e.value.detail


def test_garbage_json_and_deep_nesting_are_400s(tmp_path: Path, dirfd: int) -> None:
    _export(tmp_path)
    (tmp_path / "config.dump").write_bytes(b"\xff{not json")
    with pytest.raises(PodmanArchiveInvalid, match="not valid JSON"):
        oa.from_podman(dirfd)
    (tmp_path / "config.dump").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(PodmanArchiveInvalid, match="nests deeper"):
        oa.from_podman(dirfd)


def test_symlinked_members_are_refused_not_followed(tmp_path: Path, dirfd: int) -> None:
    _export(tmp_path)
    (tmp_path / "spec.dump").unlink()
    (tmp_path / "spec.dump").symlink_to("/etc/passwd")
    with pytest.raises(PodmanArchiveInvalid, match="symlink"):
        oa.from_podman(dirfd)


def test_bad_pstree_is_a_400(tmp_path: Path, dirfd: int) -> None:
    _export(tmp_path)
    (tmp_path / "checkpoint" / "pstree.img").write_bytes(b"garbage!")
    with pytest.raises(PodmanArchiveInvalid, match="pstree"):
        oa.from_podman(dirfd)


def test_host_cgroup_v1_hierarchies_become_external_mounts() -> None:
    mi = (
        "30 25 0:26 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n"
        "31 25 0:27 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,name=systemd\n"
        "32 25 0:28 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n"
        "33 25 0:26 /sub /mnt/cg rw - cgroup cgroup rw,cpu,cpuacct\n"
    )
    found = oa.host_cgroup_v1(mi)
    assert found == [
        ("cpu,cpuacct", "/sys/fs/cgroup/cpu,cpuacct"),
        ("systemd", "/sys/fs/cgroup/systemd"),
    ]


def _files_img(*regs: tuple[bytes, int]) -> bytes:
    def field(num: int, payload: bytes) -> bytes:
        return bytes([num << 3 | 2, len(payload)]) + payload

    def varint(num: int, value: int) -> bytes:
        out = bytearray([num << 3])
        while True:
            b = value & 0x7F
            value >>= 7
            out.append(b | (0x80 if value else 0))
            if not value:
                return bytes(out)

    data = struct.pack("<II", images.IMG_COMMON_MAGIC, oa.FILES_MAGIC)
    for i, (name, mode) in enumerate(regs, 1):
        reg = varint(1, i) + field(6, name) + varint(10, mode)
        entry = varint(1, 1) + varint(2, i) + field(3, reg)
        data += struct.pack("<I", len(entry)) + entry
    return data


def test_root_mode_comes_from_files_img(tmp_path: Path, dirfd: int) -> None:
    assert oa.root_mode(dirfd) is None  # no files.img: nothing to fit
    (tmp_path / "files.img").write_bytes(_files_img((b"/bin/sh", 0o100755), (b"/", 0o40555)))
    assert oa.root_mode(dirfd) == 0o555
    (tmp_path / "files.img").write_bytes(b"junk")
    assert oa.root_mode(dirfd) is None
