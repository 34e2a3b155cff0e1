"""Podman for the archive round-trip tests: a local busybox image and counting containers.

Debian's podman 4.3.1 (deploy/install-test-deps) with runc: crun 1.8.1 has
no CRIU support here.  No registry is needed: the image is `podman import`
of a rootfs holding a static busybox.  Every container runs with
`--network none` (no CNI/netavark setup) and explicit ulimits, because root
here lacks CAP_SYS_RESOURCE and runc could not raise them.  Whatever a
`Podman` made (containers, images) is removed by id at `cleanup`.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tests.integration import oci_helpers as oh

PODMAN = shutil.which("podman") or "/usr/bin/podman"
RUN_FLAGS = (
    "--runtime",
    "runc",
    "--network",
    "none",
    "--ulimit",
    "nofile=20000:20000",
    "--ulimit",
    "nproc=4096:4096",
)
# One number a line, from 0, ten a second; first a change to the rootfs
# (Podman's export carries it in rootfs-diff.tar).
MARKER = "/etc/criud-marker"
COUNTER = f"echo changed > {MARKER}; i=0; while true; do echo $i; i=$((i+1)); sleep 0.1; done"
APPLETS = ("sh", "sleep", "echo", "cat", "ls", "true", "dd")


def missing() -> str | None:
    """Why the Podman tests cannot run here, or None."""
    why = oh.missing()
    if why is not None:
        return why
    if not os.access(PODMAN, os.X_OK):
        return "podman not found (deploy/install-test-deps installs it)"
    return None


class Podman:
    """podman, run as a subprocess with bounded waits; remembers what it made."""

    def __init__(self) -> None:
        self.containers: list[str] = []
        self.images: list[str] = []

    def __call__(self, *args: str, timeout: float = 120.0) -> str:
        p = subprocess.run(
            [PODMAN, *args], capture_output=True, text=True, timeout=timeout, check=False
        )
        if p.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)}: exit {p.returncode}: {p.stderr}")
        return p.stdout.strip()

    def build_image(self, root: Path) -> tuple[str, str]:
        """A busybox image imported from a rootfs tar: (its name, its id)."""
        rootfs = root / "bb-rootfs"
        (rootfs / "bin").mkdir(parents=True)
        shutil.copy2(oh.BUSYBOX, rootfs / "bin" / "busybox")
        for applet in APPLETS:
            (rootfs / "bin" / applet).symlink_to("busybox")
        tar = root / "bb.tar"
        with tarfile.open(tar, "w") as t:
            t.add(rootfs, arcname=".")
        name = f"localhost/criud-test-bb:{uuid.uuid4().hex[:8]}"
        image_id = self("import", str(tar), name).splitlines()[-1].removeprefix("sha256:")
        self.images.append(image_id)
        return name, image_id

    def run_counter(self, image: str) -> dict[str, Any]:
        """Start a detached counting container; its `podman inspect` document."""
        name = f"criud-test-{uuid.uuid4().hex[:8]}"
        cid = self("run", "-d", *RUN_FLAGS, "--name", name, image, "sh", "-c", COUNTER)
        self.containers.append(cid)
        return self.inspect(cid)

    def inspect(self, ref: str) -> dict[str, Any]:
        doc = json.loads(self("container", "inspect", ref))
        assert isinstance(doc, list) and doc
        return dict(doc[0])

    def numbers(self, ref: str) -> list[int]:
        """The numbers a counting container has printed so far (podman logs)."""
        out = self("logs", ref)
        return [int(x) for x in out.split() if x.isdigit()]

    def restore_import(self, archive: Path, name: str) -> dict[str, Any]:
        """`podman container restore --import` under a new name; the new container."""
        self("container", "restore", "--import", str(archive), "--name", name)
        doc = self.inspect(name)
        self.containers.append(str(doc["Id"]))
        return doc

    def export(self, ref: str, archive: Path) -> None:
        """`podman container checkpoint --export` (the container stops)."""
        self("container", "checkpoint", "--export", str(archive), ref)

    def cleanup_containers(self, ids: list[str]) -> None:
        """Remove these containers (by id) now."""
        for cid in ids:
            subprocess.run(
                [PODMAN, "rm", "-f", "-t", "0", cid], capture_output=True, timeout=60, check=False
            )
            if cid in self.containers:
                self.containers.remove(cid)

    def cleanup(self) -> None:
        """Remove every container and image this made, by id; report nothing."""
        for cid in reversed(self.containers):
            subprocess.run(
                [PODMAN, "rm", "-f", "-t", "0", cid], capture_output=True, timeout=60, check=False
            )
        for image in reversed(self.images):
            subprocess.run(
                [PODMAN, "rmi", "-f", image], capture_output=True, timeout=60, check=False
            )
        self.containers.clear()
        self.images.clear()


def bundle_of(doc: Mapping[str, Any]) -> str:
    """A Podman container's OCI bundle: the dir of its config.json (runc's --bundle)."""
    return os.path.dirname(str(doc["OCIConfigPath"]))


def new_bundle(spec_doc: Mapping[str, Any], image_tar: Path, dest: Path, cgroup: str) -> Path:
    """A new bundle for a Podman export's spec.dump: the image's rootfs, fresh bind sources.

    As an engine restoring under a new name would make it: root.path is the
    bundle's own rootfs (the image, without the container's changes: the
    restore applies rootfs-diff.tar), each bind mount gets a new source of
    the same kind, and the cgroup is a new one.
    """
    dest.mkdir()
    rootfs = dest / "rootfs"
    rootfs.mkdir()
    with tarfile.open(image_tar) as t:
        t.extractall(rootfs, filter="tar")
    spec = json.loads(json.dumps(spec_doc))
    spec["root"] = {"path": "rootfs", "readonly": False}
    binds = dest / "binds"
    binds.mkdir()
    for i, m in enumerate(spec.get("mounts") or []):
        if m.get("type") != "bind":
            continue
        src = binds / f"{i}{m['destination'].replace('/', '_')}"
        if os.path.isdir(m["source"]) or m["destination"] == "/dev/shm":
            src.mkdir()
        else:
            src.write_text("")
        m["source"] = str(src)
    spec["linux"]["cgroupsPath"] = cgroup
    (dest / "config.json").write_text(json.dumps(spec))
    return dest


def spec_dump(archive: Path) -> dict[str, Any]:
    """The spec.dump of a Podman export (a zstd tar)."""
    raw = subprocess.run(["zstd", "-dc", str(archive)], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(raw)) as t:
        f = t.extractfile("spec.dump")
        assert f is not None
        return dict(json.loads(f.read()))
