"""criud.restore.paths: opening inherit paths in a child with the caller's credentials."""

from __future__ import annotations

import asyncio
import fcntl
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from criud.daemon.errors import (
    FifoNoReader,
    InheritOpenerFailed,
    InheritPathError,
    InheritPathTimeout,
    InheritPathWrongType,
)
from criud.restore.paths import OPENER, Creds, PathOpener, PathRequest

from .._helpers import proc_state, wait_until

NOBODY = 65534
GROUP = 4321
ROOT = Creds(0, 0, ())
NOBODY_C = Creds(NOBODY, NOBODY, ())

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


@pytest.fixture
def world_dir() -> Iterator[Path]:
    """A 0755 directory nobody can traverse (pytest's tmp_path lives under a 0700 one)."""
    d = Path(tempfile.mkdtemp(prefix="criud-unit-paths-"))
    try:
        d.chmod(0o755)
        yield d
    finally:
        shutil.rmtree(d)


def open_paths(
    reqs: list[PathRequest], creds: Creds = ROOT, opener: PathOpener | None = None
) -> list[int]:
    async def go() -> list[int]:
        return await (opener or PathOpener(10.0, set())).open(reqs, creds)

    return asyncio.run(go())


def _check_fd(fd: int, path: Path) -> None:
    try:
        assert os.fstat(fd).st_ino == path.stat().st_ino
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK
    finally:
        os.close(fd)


@needs_root
def test_root_opens_cloexec_blocking(tmp_path: Path, fd_leak_check) -> None:
    f = tmp_path / "f"
    f.write_text("data")
    f.chmod(0o600)
    (fd,) = open_paths([PathRequest(str(f))])
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
    (fd,) = open_paths([PathRequest(str(f), mode)])
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    assert flags & os.O_ACCMODE == accmode
    assert bool(flags & os.O_APPEND) == (mode == "a")
    if mode == "w":
        assert f.read_text() == ""  # truncated
    _check_fd(fd, f)


@needs_root
def test_several_paths_in_order_and_creation(tmp_path: Path, fd_leak_check) -> None:
    a, b = tmp_path / "a", tmp_path / "new"
    a.write_text("a")
    fds = open_paths([PathRequest(str(a)), PathRequest(str(b), "w")])
    assert b.exists()
    _check_fd(fds[0], a)
    _check_fd(fds[1], b)


@pytest.mark.parametrize("path", ["relative/path", "", "./x"])
def test_relative_path_refused(path: str) -> None:
    with pytest.raises(InheritPathError, match="must be absolute") as ei:
        open_paths([PathRequest(path)])
    assert ei.value.code == "inherit_path_failed"


@needs_root
def test_missing_file_names_errno(tmp_path: Path, fd_leak_check) -> None:
    ok = tmp_path / "ok"
    ok.write_text("x")
    with pytest.raises(InheritPathError) as ei:
        open_paths([PathRequest(str(ok)), PathRequest(str(tmp_path / "nope"))])
    assert ei.value.extra == {"path": str(tmp_path / "nope"), "errno": "ENOENT"}
    assert ei.value.status == 422


@needs_root
def test_magic_links_refused(tmp_path: Path, fd_leak_check) -> None:
    # Even root's opener never follows /proc/*/fd/* (or /dev/fd, a symlink to it).
    f = tmp_path / "f"
    f.write_text("x")
    fd = os.open(f, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for path in (f"/proc/{os.getpid()}/fd/{fd}", "/proc/self/fd/0", "/dev/fd/0"):
            with pytest.raises(InheritPathError) as ei:
                open_paths([PathRequest(path)])
            assert ei.value.extra["errno"] == "ELOOP", path
    finally:
        os.close(fd)
    # Our own fd numbers are not the child's: a number we hold reads as one it lacks.
    with pytest.raises(InheritPathError) as ei:
        open_paths([PathRequest(f"/proc/self/fd/{fd + 50}")])
    assert ei.value.extra["errno"] == "ENOENT"


@needs_root
def test_nobody_cannot_open_root_only_file(world_dir: Path, fd_leak_check) -> None:
    f = world_dir / "secret"
    f.write_text("s")
    f.chmod(0o600)
    with pytest.raises(InheritPathError) as ei:
        open_paths([PathRequest(str(f))], NOBODY_C)
    assert "Permission denied" in ei.value.detail
    assert ei.value.extra == {"path": str(f), "errno": "EACCES"}


@needs_root
def test_nobody_opens_and_creates_as_itself(world_dir: Path, fd_leak_check) -> None:
    mine = world_dir / "mine"
    mine.mkdir()
    os.chown(mine, NOBODY, NOBODY)
    (fd,) = open_paths([PathRequest(str(mine / "new"), "a")], NOBODY_C)
    _check_fd(fd, mine / "new")
    st = (mine / "new").stat()
    assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY)
    with pytest.raises(InheritPathError):
        open_paths([PathRequest(str(world_dir / "created"), "w")], NOBODY_C)
    assert not (world_dir / "created").exists()


@needs_root
def test_supplementary_groups_apply(world_dir: Path, fd_leak_check) -> None:
    f = world_dir / "group-readable"
    f.write_text("g")
    f.chmod(0o640)
    os.chown(f, 0, GROUP)
    with pytest.raises(InheritPathError):
        open_paths([PathRequest(str(f))], NOBODY_C)
    _check_fd(open_paths([PathRequest(str(f))], Creds(NOBODY, NOBODY, (GROUP,)))[0], f)
    # The primary gid counts too.
    _check_fd(open_paths([PathRequest(str(f))], Creds(NOBODY, GROUP, ()))[0], f)


@needs_root
def test_types(tmp_path: Path, fd_leak_check) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    plain = tmp_path / "plain"
    plain.write_text("x")
    for req in (
        PathRequest(str(tmp_path)),
        PathRequest(str(fifo)),
        PathRequest(str(fifo), "w"),
        PathRequest(str(plain), type="fifo"),
    ):
        with pytest.raises(InheritPathWrongType) as ei:
            open_paths([req])
        assert ei.value.status == 422
    with pytest.raises(FifoNoReader) as fe:
        open_paths([PathRequest(str(fifo), "w", "fifo")])
    assert fe.value.code == "fifo_no_reader" and 400 <= fe.value.status < 500
    # "w" of a FIFO that is not there never creates a regular file.
    with pytest.raises(InheritPathError):
        open_paths([PathRequest(str(tmp_path / "nofifo"), "w", "fifo")])
    assert not (tmp_path / "nofifo").exists()
    # With a reader, a writer's fd comes back, blocking.
    r = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        (w,) = open_paths([PathRequest(str(fifo), "w", "fifo")])
        _check_fd(w, fifo)
        (rd,) = open_paths([PathRequest(str(fifo), "r", "fifo")])
        _check_fd(rd, fifo)
    finally:
        os.close(r)
    # A character device is fine.
    (null,) = open_paths([PathRequest("/dev/null", "w")])
    os.close(null)


@needs_root
def test_timeout_kills_and_reaps_the_child(tmp_path: Path, fd_leak_check) -> None:
    f = tmp_path / "f"
    f.write_text("x")
    running: set[int] = set()
    hang = "import os, time\nos.write(2, str(os.getpid()).encode())\ntime.sleep(60)\n"
    opener = PathOpener(0.5, running, program=hang)
    seen: list[int] = []

    async def go() -> None:
        task = asyncio.ensure_future(opener.open([PathRequest(str(f))], ROOT))
        # While it runs, the child is registered for the orphan sweep to skip.
        assert await asyncio.to_thread(wait_until, lambda: bool(running), 5)
        seen.extend(running)
        t = time.monotonic()
        with pytest.raises(InheritPathTimeout) as ei:
            await task
        assert time.monotonic() - t < 3
        assert ei.value.status == 504 and ei.value.code == "inherit_path_timeout"
        assert await asyncio.to_thread(wait_until, lambda: not running, 5)

    asyncio.run(go())
    (pid,) = seen
    assert proc_state(pid) is None


@needs_root
def test_cancellation_kills_the_child(tmp_path: Path, fd_leak_check) -> None:
    running: set[int] = set()
    opener = PathOpener(30.0, running, program="import time; time.sleep(60)")
    seen: list[int] = []

    async def go() -> None:
        task = asyncio.ensure_future(opener.open([PathRequest("/dev/null")], ROOT))
        assert await asyncio.to_thread(wait_until, lambda: bool(running), 5)
        seen.extend(running)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await asyncio.to_thread(wait_until, lambda: not running, 5)

    asyncio.run(go())
    assert proc_state(seen[0]) is None


@needs_root
def test_a_child_that_answers_nothing_is_a_clear_error(fd_leak_check) -> None:
    garbage = "import socket; socket.socket(fileno=1).send(b'not json')"
    too_few = "import socket; socket.socket(fileno=1).send(b'{\"ok\": 1}')"
    for program in ("import sys; sys.exit(7)", "raise SystemExit('boom')", garbage, too_few):
        with pytest.raises(InheritOpenerFailed) as ei:
            open_paths([PathRequest("/dev/null")], opener=PathOpener(5.0, set(), program=program))
        assert ei.value.status == 503


@needs_root
def test_concurrent_opens_overlap(tmp_path: Path, fd_leak_check) -> None:
    # Eight at once take about as long as a few, not eight in a row.
    f = tmp_path / "f"
    f.write_text("x")
    opener = PathOpener(10.0, set())

    async def go() -> list[list[int]]:
        return await asyncio.gather(
            *(opener.open([PathRequest(str(f))], Creds(0, 0, (i,))) for i in range(8))
        )

    for fds in asyncio.run(go()):
        _check_fd(fds[0], f)


def test_opener_program_is_stdlib_only() -> None:
    # It runs with -I -S: nothing of criud, nothing from site-packages.
    compile(OPENER, "<opener>", "exec")
    assert "criud" not in OPENER
