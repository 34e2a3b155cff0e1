"""criud.restore.paths.open_as: opening inherit paths with the caller's credentials."""

from __future__ import annotations

import fcntl
import os
import platform
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from criud.daemon.errors import InheritPathError
from criud.restore.paths import open_as

from ._helpers import status_field

NOBODY = 65534
GROUP = 4321

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
needs_arch = pytest.mark.skipif(
    platform.machine() not in ("x86_64", "aarch64"), reason="fsuid syscalls not mapped here"
)


@pytest.fixture
def world_dir() -> Iterator[Path]:
    """A 0755 directory nobody can traverse (pytest's tmp_path lives under a 0700 one)."""
    d = Path(tempfile.mkdtemp(prefix="criud-unit-paths-"))
    try:
        d.chmod(0o755)
        yield d
    finally:
        shutil.rmtree(d)


def _creds() -> tuple[list[str], list[str], list[str], list[int]]:
    return (
        status_field("Uid"),
        status_field("Gid"),
        status_field("Groups"),
        sorted(os.getgroups()),
    )


def _check_fd(fd: int, path: Path) -> None:
    try:
        assert os.fstat(fd).st_ino == path.stat().st_ino
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert not os.get_inheritable(fd)
    finally:
        os.close(fd)


@needs_root
def test_root_opens_cloexec(tmp_path: Path, fd_leak_check) -> None:
    f = tmp_path / "f"
    f.write_text("data")
    f.chmod(0o600)
    fd = open_as(str(f), "r", 0, 0, [])
    assert os.read(fd, 4) == b"data"
    _check_fd(fd, f)


@needs_root
@pytest.mark.parametrize(
    ("mode", "accmode"),
    [("r", os.O_RDONLY), ("w", os.O_WRONLY), ("a", os.O_WRONLY), ("r+", os.O_RDWR)],
)
def test_modes(tmp_path: Path, mode: str, accmode: int, fd_leak_check) -> None:
    f = tmp_path / "f"
    f.write_text("old")
    fd = open_as(str(f), mode, 0, 0, [])
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    assert flags & os.O_ACCMODE == accmode
    assert bool(flags & os.O_APPEND) == (mode == "a")
    if mode == "w":
        assert f.read_text() == ""  # truncated
    _check_fd(fd, f)


@needs_root
def test_write_mode_creates(tmp_path: Path, fd_leak_check) -> None:
    f = tmp_path / "new"
    fd = open_as(str(f), "w", 0, 0, [])
    _check_fd(fd, f)
    assert f.exists()


@pytest.mark.parametrize("path", ["relative/path", "", "./x"])
def test_relative_path_refused(path: str) -> None:
    with pytest.raises(InheritPathError, match="must be absolute") as ei:
        open_as(path, "r", 0, 0, [])
    assert ei.value.code == "inherit_path_failed"


@needs_root
def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InheritPathError) as ei:
        open_as(str(tmp_path / "nope"), "r", 0, 0, [])
    assert ei.value.extra == {"path": str(tmp_path / "nope")}
    assert ei.value.status == 422


@needs_root
@needs_arch
def test_nobody_cannot_open_root_only_file(world_dir: Path, fd_leak_check) -> None:
    f = world_dir / "secret"
    f.write_text("s")
    f.chmod(0o600)
    before = _creds()
    with pytest.raises(InheritPathError) as ei:
        open_as(str(f), "r", NOBODY, NOBODY, [])
    assert "Permission denied" in ei.value.detail
    assert ei.value.extra["path"] == str(f)
    # Our own credentials are untouched (fsuid is the 4th Uid: column).
    assert _creds() == before
    assert status_field("Uid")[3] == "0"
    # And root itself can still open it afterwards.
    _check_fd(open_as(str(f), "r", 0, 0, []), f)


@needs_root
@needs_arch
def test_nobody_opens_own_file(world_dir: Path, fd_leak_check) -> None:
    f = world_dir / "mine"
    f.write_text("m")
    f.chmod(0o600)
    os.chown(f, NOBODY, NOBODY)
    before = _creds()
    fd = open_as(str(f), "r", NOBODY, NOBODY, [])
    assert os.read(fd, 1) == b"m"
    _check_fd(fd, f)
    assert _creds() == before
    assert status_field("Uid")[3] == "0"
    assert status_field("Gid")[3] == "0"


@needs_root
@needs_arch
def test_nobody_cannot_write_where_root_can(world_dir: Path) -> None:
    with pytest.raises(InheritPathError):
        open_as(str(world_dir / "created"), "w", NOBODY, NOBODY, [])
    assert not (world_dir / "created").exists()


@needs_root
@needs_arch
def test_supplementary_groups_apply(world_dir: Path, fd_leak_check) -> None:
    f = world_dir / "group-readable"
    f.write_text("g")
    f.chmod(0o640)
    os.chown(f, 0, GROUP)
    before = _creds()
    with pytest.raises(InheritPathError):
        open_as(str(f), "r", NOBODY, NOBODY, [])
    _check_fd(open_as(str(f), "r", NOBODY, NOBODY, [GROUP]), f)
    # The primary (fs)gid counts too.
    _check_fd(open_as(str(f), "r", NOBODY, GROUP, []), f)
    assert _creds() == before


@needs_root
@needs_arch
def test_other_threads_keep_root(world_dir: Path, fd_leak_check) -> None:
    # While one open_as runs as nobody, a thread of ours still opens as root.
    f = world_dir / "secret"
    f.write_text("s")
    f.chmod(0o600)
    results: list[bool] = []

    def worker() -> None:
        for _ in range(50):
            fd = os.open(f, os.O_RDONLY | os.O_CLOEXEC)
            os.close(fd)
            results.append(True)

    t = threading.Thread(target=worker)
    t.start()
    for _ in range(50):
        with pytest.raises(InheritPathError):
            open_as(str(f), "r", NOBODY, NOBODY, [])
    t.join(timeout=10)
    assert not t.is_alive()
    assert len(results) == 50
