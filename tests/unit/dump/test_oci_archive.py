"""criud.dump.oci_archive: the Podman-format members of an OCI checkpoint's archive."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from criud.daemon.store import CheckpointRecord
from criud.dump import oci_archive as oa
from criud.dump.manifest import Manifest, Task


def _record(**labels: str) -> CheckpointRecord:
    return CheckpointRecord(
        id="ck1",
        name="web",
        pid=42,
        state="done",
        created_at=1_800_000_000.5,
        options={},
        labels=dict(labels),
        owner_uid=0,
        finished_at=1_800_000_001.25,
    )


def _manifest(spec: dict[str, Any] | None = None, **oci: Any) -> Manifest:
    fds = (
        {"fd": 0, "type": "device", "key": "dev/null", "target": "/dev/null", "external": False},
        {"fd": 1, "type": "pipe", "key": "pipe:[7]", "target": "pipe:[7]", "external": True},
        {"fd": 2, "type": "pipe", "key": "pipe:[7]", "target": "pipe:[7]", "external": True},
    )
    saved: dict[str, Any] = {"version": 1, **oci}
    if spec is not None:
        saved[oa.SPEC_KEY] = spec
    return Manifest(tasks=(Task(pid=42, ppid=1, tids=(42,), fds=fds),), oci=saved)


def _docs(record: CheckpointRecord, manifest: Manifest, images: Path) -> dict[str, Any]:
    dirfd = os.open(images, os.O_RDONLY | os.O_DIRECTORY)
    try:
        members = oa.oci_members(record, manifest, dirfd)
    finally:
        os.close(dirfd)
    out: dict[str, Any] = {}
    for m in members:
        with m.open() as f:
            data = f.read()
        assert len(data) == m.size
        out[m.name] = json.loads(data)
    return out


def test_members_have_podmans_names_and_fields(tmp_path: Path) -> None:
    spec = {
        "ociVersion": "1.0.2",
        "annotations": {"io.kubernetes.cri-o.Created": "2026-12-01T22:51:41.137870403Z"},
    }
    docs = _docs(
        _record(**{"oci/image-name": "localhost/bb:1", "oci/image-id": "f" * 64}),
        _manifest(spec),
        tmp_path,
    )
    assert set(docs) == {"spec.dump", "config.dump", "checkpoint/descriptors.json"}
    assert docs["spec.dump"] == spec
    assert docs["checkpoint/descriptors.json"] == ["/dev/null", "pipe:[7]", "pipe:[7]"]
    cfg = docs["config.dump"]
    assert cfg["runtime"] == "runc" and cfg["name"] == "web"
    assert cfg["rootfsImageName"] == "localhost/bb:1" and cfg["rootfsImageID"] == "f" * 64
    assert cfg["createdTime"] == "2026-12-01T22:51:41.137870403Z"
    assert cfg["checkpointedTime"] == "2027-01-15T08:00:01.250000Z"
    assert len(cfg["id"]) == 64 and int(cfg["id"], 16) >= 0


def test_image_from_engine_annotations_then_an_imported_export(tmp_path: Path) -> None:
    spec = {
        "annotations": {
            "io.kubernetes.cri-o.ImageName": "quay.io/x:1",
            "io.kubernetes.cri-o.Created": "yesterday",  # not RFC 3339: not taken
        }
    }
    cfg = _docs(_record(), _manifest(spec), tmp_path)["config.dump"]
    assert cfg["rootfsImageName"] == "quay.io/x:1" and cfg["rootfsImageID"] == ""
    assert cfg["createdTime"] == "2027-01-15T08:00:00.500000Z"
    podman = {"id": "c" * 64, "name": "old", "rootfsImageName": "n", "rootfsImageID": "i"}
    cfg = _docs(_record(), _manifest({}, podman=podman), tmp_path)["config.dump"]
    assert (cfg["id"], cfg["name"], cfg["rootfsImageName"], cfg["rootfsImageID"]) == (
        "c" * 64,
        "old",
        "n",
        "i",
    )


def test_no_spec_no_spec_dump_and_closed_fds_read_as_dev_null(tmp_path: Path) -> None:
    m = Manifest(tasks=(Task(pid=1, ppid=0, tids=(1,), fds=()),), oci={"version": 1})
    docs = _docs(_record(), m, tmp_path)
    assert "spec.dump" not in docs
    assert docs["checkpoint/descriptors.json"] == ["/dev/null"] * 3


def test_descriptors_already_among_the_images_are_not_added_twice(tmp_path: Path) -> None:
    (tmp_path / "descriptors.json").write_text('["/dev/null"]')
    docs = _docs(_record(), _manifest({}), tmp_path)
    assert "checkpoint/descriptors.json" not in docs


def test_an_imports_rootfs_diff_is_exported_again(tmp_path: Path) -> None:
    kept = tmp_path / "archive"
    kept.mkdir(mode=0o755)
    (kept / "rootfs-diff.tar").write_bytes(b"\0" * 1024)
    (kept / "deleted.files").write_text('["/etc/motd"]')
    (kept / "ctr.log").write_text("not exported: Podman's own log")
    dirfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        members = {m.name: m for m in oa.oci_members(_record(), _manifest({}), dirfd)}
        assert "ctr.log" not in members
        with members["rootfs-diff.tar"].open() as f:
            assert f.read() == b"\0" * 1024 and members["rootfs-diff.tar"].size == 1024
        with members["deleted.files"].open() as f:
            assert f.read() == b'["/etc/motd"]'
    finally:
        os.close(dirfd)
