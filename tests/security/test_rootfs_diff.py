"""A hostile rootfs-diff.tar (from an imported Podman export) never writes outside the rootfs.

The daemon applies it as root over the new bundle's rootfs before an
imported OCI checkpoint is restored (criud.restore.oci_archive).  Each case
builds a real tar and a real rootfs beside an `outside` dir, and checks
that the refusal is a RootfsDiffUnsafe (422) and that `outside` and its
bait file are untouched.
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from criud.daemon.errors import RootfsDiffUnsafe
from criud.restore import oci_archive as oa

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="applies ownership: needs root")

Entry = Callable[[tarfile.TarFile], None]


def _file(name: str, data: bytes = b"pwned", mode: int = 0o644) -> Entry:
    def add(t: tarfile.TarFile) -> None:
        ti = tarfile.TarInfo(name)
        ti.size, ti.mode = len(data), mode
        t.addfile(ti, io.BytesIO(data))

    return add


def _special(name: str, kind: bytes, linkname: str = "") -> Entry:
    def add(t: tarfile.TarFile) -> None:
        ti = tarfile.TarInfo(name)
        ti.type, ti.linkname, ti.mode = kind, linkname, 0o755
        if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
            ti.devmajor, ti.devminor = 1, 3
        t.addfile(ti)

    return add


def _tar(*entries: Entry) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for add in entries:
            add(t)
    buf.seek(0)
    return buf


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[Path, Path, int]]:
    """(rootfs, outside, an fd of rootfs); outside/bait must survive every case."""
    rootfs, outside = tmp_path / "rootfs", tmp_path / "outside"
    rootfs.mkdir()
    outside.mkdir()
    (outside / "bait").write_text("original")
    (rootfs / "etc").mkdir()
    fd = os.open(rootfs, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    yield rootfs, outside, fd
    os.close(fd)
    assert (outside / "bait").read_text() == "original"
    assert sorted(os.listdir(outside)) == ["bait"]


def _refused(fd: int, tar: io.BytesIO, word: str) -> None:
    with pytest.raises(RootfsDiffUnsafe) as e:
        oa.apply_rootfs_diff(tar, fd)
    assert e.value.status == 422 and e.value.code == "rootfs_diff_unsafe"
    assert word in e.value.detail


def test_absolute_and_dotdot_members_refused(world: tuple[Path, Path, int]) -> None:
    _rootfs, outside, fd = world
    _refused(fd, _tar(_file(str(outside / "new"))), "absolute")
    _refused(fd, _tar(_file("etc/../../outside/new")), "..")
    _refused(fd, _tar(_file("../outside/bait")), "..")


def test_planted_symlink_in_rootfs_is_not_followed(world: tuple[Path, Path, int]) -> None:
    rootfs, outside, fd = world
    (rootfs / "evil").symlink_to(outside)
    _refused(fd, _tar(_file("evil/bait")), "not a directory")
    _refused(fd, _tar(_file("evil/new")), "not a directory")


def test_symlink_member_then_write_through_it(world: tuple[Path, Path, int]) -> None:
    rootfs, outside, fd = world
    tar = _tar(_special("link", tarfile.SYMTYPE, str(outside)), _file("link/bait"))
    _refused(fd, tar, "not a directory")
    # The link itself was made (its text is the container's business).
    assert os.readlink(rootfs / "link") == str(outside)


def test_file_member_replaces_a_symlink_instead_of_writing_through(
    world: tuple[Path, Path, int],
) -> None:
    rootfs, outside, fd = world
    (rootfs / "etc" / "hosts").symlink_to(outside / "bait")
    oa.apply_rootfs_diff(_tar(_file("etc/hosts", b"127.0.0.1 x\n")), fd)
    st = os.lstat(rootfs / "etc" / "hosts")
    assert stat.S_ISREG(st.st_mode) and (rootfs / "etc" / "hosts").read_bytes() == b"127.0.0.1 x\n"


def test_hardlinks_only_within_the_rootfs(world: tuple[Path, Path, int]) -> None:
    rootfs, outside, fd = world
    _refused(fd, _tar(_special("h", tarfile.LNKTYPE, str(outside / "bait"))), "absolute")
    _refused(fd, _tar(_special("h", tarfile.LNKTYPE, "../outside/bait")), "..")
    (rootfs / "evil").symlink_to(outside)
    _refused(fd, _tar(_special("h", tarfile.LNKTYPE, "evil/bait")), "not a directory")
    # A link to a symlink that points out is refused too (not a file).
    (rootfs / "sym").symlink_to(outside / "bait")
    _refused(fd, _tar(_special("h", tarfile.LNKTYPE, "sym")), "not a file")
    oa.apply_rootfs_diff(
        _tar(_file("etc/a", b"x"), _special("etc/b", tarfile.LNKTYPE, "etc/a")), fd
    )
    assert os.stat(rootfs / "etc" / "a").st_ino == os.stat(rootfs / "etc" / "b").st_ino


@pytest.mark.parametrize("kind", [tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE])
def test_devices_and_fifos_refused(world: tuple[Path, Path, int], kind: bytes) -> None:
    rootfs, _outside, fd = world
    _refused(fd, _tar(_special("dev-or-fifo", kind)), "special file")
    assert not os.path.lexists(rootfs / "dev-or-fifo")


def test_a_garbage_tar_is_refused(world: tuple[Path, Path, int]) -> None:
    _rootfs, _outside, fd = world
    _refused(fd, io.BytesIO(b"\x00garbage" * 200), "")


def test_deleted_files_stay_beneath(world: tuple[Path, Path, int]) -> None:
    rootfs, outside, fd = world
    (rootfs / "etc" / "gone").write_text("x")
    (rootfs / "evil").symlink_to(outside)
    with pytest.raises(RootfsDiffUnsafe):
        oa.remove_deleted(["../outside/bait"], fd)
    with pytest.raises(RootfsDiffUnsafe):
        oa.remove_deleted(["evil/bait"], fd)
    oa.remove_deleted(["/etc/gone", "etc/never-was", "evil"], fd)
    assert not (rootfs / "etc" / "gone").exists()
    assert not os.path.lexists(rootfs / "evil")  # the link, not its target


def test_a_good_diff_keeps_owner_mode_and_links(world: tuple[Path, Path, int]) -> None:
    rootfs, _outside, fd = world

    def owned(t: tarfile.TarFile) -> None:
        ti = tarfile.TarInfo("var/lib/app/data")
        ti.size, ti.mode, ti.uid, ti.gid = 3, 0o640, 1234, 4321
        t.addfile(ti, io.BytesIO(b"abc"))

    tar = _tar(owned, _special("etc/mtab", tarfile.SYMTYPE, "/proc/mounts"))
    oa.apply_rootfs_diff(tar, fd)
    st = os.stat(rootfs / "var/lib/app/data")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 4321, 0o640)
    assert os.readlink(rootfs / "etc/mtab") == "/proc/mounts"


# -- a Podman export imported by a non-root caller --------------------------------


def _fake_podman_export(path: Path) -> None:
    """The files Podman's import reads, hand-made (no Podman needed): spec, config, images."""
    import json
    import struct

    from criud.dump import images

    spec = {
        "root": {"path": "/var/lib/x/merged"},
        "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}]},
    }
    pstree = bytes([0x08, 0x01, 0x10, 0x00, 0x18, 0x01, 0x20, 0x01])
    files = {
        "spec.dump": json.dumps(spec).encode(),
        "config.dump": json.dumps(
            {"name": "web", "rootfsImageName": "x", "rootfsImageID": "y"}
        ).encode(),
        "checkpoint/descriptors.json": b'["/dev/null", "pipe:[1]", "pipe:[2]"]',
        "checkpoint/pstree.img": struct.pack(
            "<III", images.IMG_COMMON_MAGIC, images.PSTREE_MAGIC, len(pstree)
        )
        + pstree,
    }
    with tarfile.open(path, "w") as t:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            t.addfile(ti, io.BytesIO(data))


IMPORT_AS = """
import sys
from criud.api.client import Client, CriudClientError
c = Client(sys.argv[1], sys.argv[2])
try:
    with open(sys.argv[3], "rb") as f:
        print(c.import_archive(f, name="pod")["id"])
except CriudClientError as e:
    print(e.status, e.code)
"""


def test_a_podman_export_is_roots_to_import(sdaemon: Any, users: Any) -> None:
    """Its restore is an OCI restore (root's): a non-root caller gets a 403, nothing kept."""
    from tests.integration.helpers import temp_root
    from tests.security.users import run_as

    with temp_root() as root:  # traversable by bob
        archive = root / "podman.tar"
        _fake_podman_export(archive)
        archive.chmod(0o644)
        before = sorted(os.listdir(sdaemon.state_dir / "checkpoints"))
        out = run_as(
            users.bob, IMPORT_AS, str(sdaemon.socket), str(sdaemon.fd_socket), str(archive)
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["403", "permission_denied"], out.stdout
        assert sorted(os.listdir(sdaemon.state_dir / "checkpoints")) == before
