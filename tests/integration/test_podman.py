"""Archives through real Podman, both ways (issue 14).

a. A container Podman started (runc) is checkpointed by criud by bundle,
   exported through GET /v1/checkpoints/{ref}/archive, and restored by
   `podman container restore --import`: it keeps counting (podman logs).
b. A `podman container checkpoint --export` archive is imported through
   POST /v1/checkpoints/import and restored by criud into a new bundle, its
   stdout a new pipe handed over the fd socket: it keeps counting there.

Each test removes the containers and images it made (by id) and the
cgroup its restore made.
"""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from criud.api.client import CriudClientError
from tests.integration import oci_helpers as oh
from tests.integration import podman as pm
from tests.integration.helpers import Daemon, Procs, kill_restore, read_line, temp_root, wait_for

pytestmark = pytest.mark.skipif(pm.missing() is not None, reason=str(pm.missing()))


@pytest.fixture
def podman() -> Iterator[pm.Podman]:
    p = pm.Podman()
    try:
        yield p
    finally:
        p.cleanup()


def _wait_count_past(podman: pm.Podman, ref: str, n: int) -> list[int]:
    wait_for(lambda: len(podman.numbers(ref)) > n, 20, what=f"{ref} to print more than {n}")
    return podman.numbers(ref)


def _members(archive: Path) -> dict[str, tarfile.TarInfo]:
    out = subprocess.run(["zstd", "-dc", str(archive)], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(out)) as t:
        return {m.name.rstrip("/"): m for m in t.getmembers()}


def test_criud_checkpoint_of_a_podman_container_restored_by_podman_import(
    daemon: Daemon, podman: pm.Podman
) -> None:
    with temp_root() as root:
        image, image_id = podman.build_image(root)
        ctr = podman.run_counter(image)
        _wait_count_past(podman, ctr["Id"], 3)
        labels = {"oci/image-name": image, "oci/image-id": image_id}
        ck = daemon.client.checkpoint(
            ctr["State"]["Pid"],
            name=f"pod-{uuid.uuid4().hex[:6]}",
            oci={"bundle": pm.bundle_of(ctr)},
            labels=labels,
        )
        assert ck["state"] == "done" and len(ck["external"]) == 2  # stdout, stderr: conmon's
        wait_for(lambda: podman.inspect(ctr["Id"])["State"]["Status"] == "exited", 20)
        last = podman.numbers(ctr["Id"])[-1]

        archive = root / "export.tar.zst"
        with open(archive, "wb") as f:
            daemon.client.export(ck["id"], f)
        got = _members(archive)
        # checkpointctl show/inspect need these; Podman's import the same plus descriptors.
        assert got["checkpoint"].isdir()
        assert {"spec.dump", "config.dump", "checkpoint/descriptors.json"} <= set(got)

        new_name = f"criud-test-imp-{uuid.uuid4().hex[:6]}"
        new = podman.restore_import(archive, new_name)
        assert new["State"]["Status"] == "running"
        nums = _wait_count_past(podman, new["Id"], 5)
        # It resumed where the checkpoint left it, not from 0.
        assert nums[0] == last + 1 and nums[-1] > last + 4, (last, nums[:5])
        daemon.client.delete(ck["id"])


def test_podman_export_imported_and_restored_into_a_new_bundle(
    daemon: Daemon, podman: pm.Podman, procs: Procs
) -> None:
    with temp_root() as root:
        image, _ = podman.build_image(root)
        ctr = podman.run_counter(image)
        _wait_count_past(podman, ctr["Id"], 3)
        archive = root / "podman-export.tar.gz"  # zstd, whatever the name
        podman.export(ctr["Id"], archive)
        last = podman.numbers(ctr["Id"])[-1]

        with open(archive, "rb") as f:
            ck = daemon.client.import_archive(f, name=f"podimp-{uuid.uuid4().hex[:6]}")
        assert ck["state"] == "done"
        keys = ck["external"]
        assert len(keys) == 2 and all(k.startswith("pipe:[") for k in keys)

        spec = pm.spec_dump(archive)
        cgroup = f"/criud-podimp-{uuid.uuid4().hex[:6]}"
        bundle = pm.new_bundle(spec, root / "bb.tar", root / "nb", cgroup)
        try:
            _restore_and_count(daemon, procs, ck["id"], bundle, last)
        finally:
            # criu makes the cgroup even for a restore that fails.
            oh.remove_cgroup(cgroup)
            daemon.client.delete(ck["id"])


def _restore_and_count(daemon: Daemon, procs: Procs, ref: str, bundle: Path, last: int) -> None:
    """Restore ref into bundle, stdout and stderr a new pipe; it prints last + 1, + 2."""
    r, w = os.pipe()
    null = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    try:
        res = daemon.client.restore(
            ref, stdio=[null, w, w], oci={"bundle": str(bundle), "name": "podimp"}
        )
    finally:
        os.close(w)
        os.close(null)
    procs.adopt(res["pid"])
    try:
        assert res["ns_pid"] == 1
        # The counter goes on in the new pipe, from where Podman stopped it.
        first = int(read_line(r, timeout=20))
        assert first == last + 1, (last, first)
        assert int(read_line(r, timeout=10)) == first + 1
        # rootfs-diff.tar went over the new rootfs: the container's own change.
        assert (bundle / "rootfs" / pm.MARKER.lstrip("/")).read_text() == "changed\n"
    finally:
        kill_restore(daemon.client, res["id"], "restored Podman container")
        os.close(r)


def test_an_imported_podman_checkpoint_needs_a_new_bundle(
    daemon: Daemon, podman: pm.Podman
) -> None:
    with temp_root() as root:
        image, _ = podman.build_image(root)
        ctr = podman.run_counter(image)
        _wait_count_past(podman, ctr["Id"], 1)
        archive = root / "export.tar.zst"
        podman.export(ctr["Id"], archive)
        with open(archive, "rb") as f:
            ck = daemon.client.import_archive(f, name=f"podimp-{uuid.uuid4().hex[:6]}")
        try:
            r, w = os.pipe()
            with pytest.raises(CriudClientError) as e:
                daemon.client.restore(ck["id"], stdio=[w, w, w])
            os.close(r)
            os.close(w)
            assert e.value.status == 422 and e.value.code == "invalid_bundle"
            assert "new one" in e.value.detail
        finally:
            daemon.client.delete(ck["id"])


def test_podman_export_through_criud_and_back_to_podman(daemon: Daemon, podman: pm.Podman) -> None:
    """Imported into criud, exported again, restored by Podman: the rootfs change survives."""
    with temp_root() as root:
        image, _ = podman.build_image(root)
        ctr = podman.run_counter(image)
        _wait_count_past(podman, ctr["Id"], 3)
        first_export = root / "first.tar.zst"
        podman.export(ctr["Id"], first_export)
        last = podman.numbers(ctr["Id"])[-1]
        with open(first_export, "rb") as f:
            ck = daemon.client.import_archive(f, name=f"podimp-{uuid.uuid4().hex[:6]}")
        try:
            again = root / "again.tar.zst"
            with open(again, "wb") as f:
                daemon.client.export(ck["id"], f)
            assert {"rootfs-diff.tar", "spec.dump", "config.dump"} <= set(_members(again))
            new = podman.restore_import(again, f"criud-test-back-{uuid.uuid4().hex[:6]}")
            nums = _wait_count_past(podman, new["Id"], 3)
            assert nums[0] == last + 1, (last, nums[:5])
            assert podman("exec", new["Id"], "cat", pm.MARKER) == "changed"
        finally:
            daemon.client.delete(ck["id"])
