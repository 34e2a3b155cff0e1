"""criud.daemon.imgdir: dir-fd file operations against real files, links and fifos."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from criud.daemon import imgdir, procutil


@pytest.fixture
def dfd(tmp_path: Path) -> Iterator[int]:
    fd = imgdir.open_dir(tmp_path)
    try:
        yield fd
    finally:
        os.close(fd)


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (chown)")


def test_open_dir_refuses_a_symlinked_dir(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(OSError):
        imgdir.open_dir(tmp_path / "link")


def test_read_small_reads_a_regular_file(tmp_path: Path, dfd: int) -> None:
    (tmp_path / "a").write_bytes(b"hello")
    assert imgdir.read_small(dfd, "a", 100) == b"hello"
    with pytest.raises(FileNotFoundError):
        imgdir.read_small(dfd, "missing", 100)


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../x"])
def test_names_are_single_components(dfd: int, name: str) -> None:
    with pytest.raises(ValueError):
        imgdir.read_small(dfd, name, 10)


def test_symlink_is_never_followed(tmp_path: Path, dfd: int) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s3cret")
    (tmp_path / "dump.log").symlink_to(secret)
    with pytest.raises(imgdir.UnsafeEntry, match="symlink"):
        imgdir.read_small(dfd, "dump.log", 100)


def test_fifo_is_refused_without_hanging(tmp_path: Path, dfd: int) -> None:
    os.mkfifo(tmp_path / "dump.log")
    t0 = time.monotonic()
    with pytest.raises(imgdir.UnsafeEntry, match="fifo"):
        imgdir.read_small(dfd, "dump.log", 100)
    assert time.monotonic() - t0 < 5


def test_dir_and_hardlink_are_refused(tmp_path: Path, dfd: int) -> None:
    (tmp_path / "sub").mkdir()
    with pytest.raises(imgdir.UnsafeEntry, match="directory"):
        imgdir.read_small(dfd, "sub", 100)
    (tmp_path / "f").write_text("x")
    os.link(tmp_path / "f", tmp_path / "g")
    with pytest.raises(imgdir.UnsafeEntry, match="2 links"):
        imgdir.read_small(dfd, "f", 100)


def test_size_cap(tmp_path: Path, dfd: int) -> None:
    (tmp_path / "big").write_bytes(b"a" * 50 + b"b" * 50)
    with pytest.raises(imgdir.UnsafeEntry, match="more than"):
        imgdir.read_small(dfd, "big", 10)
    out = imgdir.read_small(dfd, "big", 20, tail=True)
    assert out.startswith(b"a" * 10) and out.endswith(b"b" * 10)
    assert b"80 bytes left out" in out


def test_create_log_replaces_a_planted_symlink(tmp_path: Path, dfd: int) -> None:
    decoy = tmp_path / "decoy"
    decoy.write_text("keep")
    (tmp_path / "restore.log").symlink_to(decoy)
    fd = imgdir.create_log(dfd, "restore.log")
    try:
        os.write(fd, b"criu says")
    finally:
        os.close(fd)
    assert decoy.read_text() == "keep"
    log = tmp_path / "restore.log"
    assert not log.is_symlink() and log.read_text() == "criu says"
    assert stat.S_IMODE(log.stat().st_mode) == 0o600


def test_seal_makes_root_read_only_and_sums_sizes(tmp_path: Path) -> None:
    need_root()
    d = tmp_path / "ck"
    d.mkdir(mode=0o700)
    os.chown(d, 65534, 65534)
    for name, size in (("pages-1.img", 100), ("pstree.img", 7)):
        (d / name).write_bytes(b"x" * size)
        os.chown(d / name, 65534, 65534)
    fd = imgdir.open_dir(d)
    try:
        assert not imgdir.is_sealed(fd)
        assert imgdir.seal(fd, 65534) == 107
        assert imgdir.is_sealed(fd)
        assert imgdir.seal(fd, 65534) == 107  # idempotent
    finally:
        os.close(fd)
    st = os.stat(d)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o755)
    for f in d.iterdir():
        fst = f.stat()
        assert (fst.st_uid, fst.st_gid, stat.S_IMODE(fst.st_mode)) == (0, 0, 0o644)


def test_seal_passes_over_the_daemons_archive_subdir(tmp_path: Path) -> None:
    need_root()
    d = tmp_path / "ck"
    d.mkdir(mode=0o700)
    (d / "pstree.img").write_bytes(b"xy")
    (d / imgdir.ARCHIVE_SUBDIR).mkdir(mode=0o755)
    (d / imgdir.ARCHIVE_SUBDIR / "criud.json").write_text("{}")
    fd = imgdir.open_dir(d)
    try:
        assert imgdir.seal(fd, 0) == 2 and imgdir.is_sealed(fd)
    finally:
        os.close(fd)


def _roots_file(tmp_path: Path) -> Path:
    """A file of root's, 0600, outside the images dir: what a planted entry aims at."""
    outside = tmp_path / "root-file"
    outside.write_text("root's")
    outside.chmod(0o600)
    return outside


def _plant(planted: Path, outside: Path, kind: str) -> None:
    """Put what a tampering owner might at planted: a link out, a fifo, a dir, another's file."""
    if kind == "symlink":
        planted.symlink_to(outside)
    elif kind == "hardlink":
        os.link(outside, planted)
    elif kind == "fifo":
        os.mkfifo(planted)
    elif kind == "subdir":
        planted.mkdir()
    else:
        assert kind == "foreign", kind
        planted.write_text("another user's")
        os.chown(planted, 65533, 65533)


@pytest.mark.parametrize(
    "plant", ["symlink", "hardlink", "fifo", "subdir", "foreign", "owners-archive-dir"]
)
def test_seal_refuses_tampering_and_chowns_nothing_outside(tmp_path: Path, plant: str) -> None:
    need_root()
    d = tmp_path / "ck"
    d.mkdir(mode=0o700)
    os.chown(d, 65534, 65534)
    (d / "pstree.img").write_bytes(b"x")
    outside = _roots_file(tmp_path)
    if plant == "owners-archive-dir":
        # The owner's dir under the one name an images dir may hold a dir.
        planted = d / imgdir.ARCHIVE_SUBDIR
        planted.mkdir(mode=0o755)
        os.chown(planted, 65534, 65534)
    else:
        _plant(d / "x.img", outside, plant)
    fd = imgdir.open_dir(d)
    try:
        with pytest.raises(imgdir.UnsafeEntry):
            imgdir.seal(fd, 65534)
        # Not sealed: the next attempt walks again and refuses again.
        assert not imgdir.is_sealed(fd)
        with pytest.raises(imgdir.UnsafeEntry):
            imgdir.seal(fd, 65534)
    finally:
        os.close(fd)
    st = os.stat(outside)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600)
    # The owner is locked out all the same: the dir is root's 0700.
    assert os.stat(d).st_uid == 0 and stat.S_IMODE(os.stat(d).st_mode) == 0o700


def test_seal_refuses_a_file_someone_still_has_open_for_writing(tmp_path: Path) -> None:
    need_root()
    d = tmp_path / "ck"
    d.mkdir()
    (d / "pages-1.img").write_bytes(b"x")
    kept = os.open(d / "pages-1.img", os.O_WRONLY | os.O_CLOEXEC)
    fd = imgdir.open_dir(d)
    try:
        with pytest.raises(imgdir.UnsafeEntry, match="open for writing"):
            imgdir.seal(fd, 0)
        os.close(kept)
        kept = -1
        assert imgdir.seal(fd, 0) == 1
    finally:
        os.close(fd)
        if kept >= 0:
            os.close(kept)


def test_seal_checks_expected_identity(tmp_path: Path) -> None:
    need_root()
    d = tmp_path / "ck"
    d.mkdir()
    fd = imgdir.open_dir(d)
    try:
        log = imgdir.create_log(fd, "dump.log")
        st = os.fstat(log)
        # The daemon's own log stays open (for writing) while it seals.
        assert imgdir.seal(fd, 0, {"dump.log": (st.st_dev, st.st_ino)}) == 0
        # Still open: its inode number cannot be reused by the swapped file.
        os.unlink(d / "dump.log")
        (d / "dump.log").write_text("swapped")
        with pytest.raises(imgdir.UnsafeEntry, match="not the file"):
            imgdir.seal(fd, 0, {"dump.log": (st.st_dev, st.st_ino)})
        os.unlink(d / "dump.log")
        with pytest.raises(imgdir.UnsafeEntry, match="missing"):
            imgdir.seal(fd, 0, {"dump.log": (st.st_dev, st.st_ino)})
        os.close(log)
    finally:
        os.close(fd)


def test_keep_only_never_follows(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("p")
    d = tmp_path / "ck"
    d.mkdir()
    (d / "dump.log").write_text("log")
    (d / "pages.img").write_text("x")
    (d / "link").symlink_to(outside)
    (d / "sub").mkdir()
    (d / "sub" / "inner").symlink_to(outside / "precious")
    fd = imgdir.open_dir(d)
    try:
        imgdir.keep_only(fd, ("dump.log",))
    finally:
        os.close(fd)
    assert sorted(os.listdir(d)) == ["dump.log"]
    assert (outside / "precious").read_text() == "p"


def test_make_and_remove_run_dir(tmp_path: Path) -> None:
    need_root()
    fd = imgdir.make_run_dir(tmp_path, "r1", (65534, 65534))
    try:
        st = os.fstat(fd)
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (65534, 0o700)
        with pytest.raises(FileExistsError):
            imgdir.make_run_dir(tmp_path, "r1", None)
    finally:
        os.close(fd)
    (tmp_path / "r1" / "x").symlink_to(tmp_path / "keep")
    (tmp_path / "keep").write_text("k")
    imgdir.remove_dir(tmp_path, "r1")
    assert not (tmp_path / "r1").exists() and (tmp_path / "keep").read_text() == "k"
    imgdir.remove_dir(tmp_path, "r1")  # already gone: no error


def test_not_our_child() -> None:
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert procutil.not_our_child(p.pid, None) is None
        assert procutil.not_our_child(p.pid, os.geteuid()) is None
        why = procutil.not_our_child(p.pid, os.geteuid() + 1)
        assert why is not None and "runs as" in why
        why = procutil.not_our_child(1, None)
        assert why is not None and "not of the daemon" in why
    finally:
        p.kill()
        p.wait(timeout=10)
    with contextlib.suppress(Exception):
        assert procutil.not_our_child(p.pid, None) == "cannot be read in /proc"


# Pre-dump chains: one `parent` link per dir, made by the daemon, to a round dir it made.

OWNER = 65534


def _round(base: Path, name: str, link: str | None = None) -> Path:
    """A round dir as criu (as the owner) leaves it: its files, and its own parent link."""
    d = base / name
    d.mkdir(mode=0o700)
    (d / "pages-1.img").write_bytes(b"p" * 10)
    if link is not None:
        (d / imgdir.PARENT_LINK).symlink_to(link)
    for f in (d, *d.iterdir()):
        os.lchown(f, OWNER, OWNER)
    return d


def _ident(p: Path) -> tuple[int, int]:
    st = os.stat(p, follow_symlinks=False)
    return st.st_dev, st.st_ino


def _seal_chain(ck: Path, plant: str = "") -> int:
    """Seal pre-1, pre-2 and ck as the job does; return ck's total."""
    base = imgdir.open_dir(ck)
    try:
        rounds: dict[str, tuple[int, int]] = {}
        for k in (1, 2):
            name = f"pre-{k}"
            _round(ck, name, f"../pre-{k - 1}" if k > 1 else None)
            fd = imgdir.open_dir_at(base, name)
            try:
                parent = f"pre-{k - 1}" if k > 1 else None
                imgdir.seal(fd, OWNER, None, imgdir.Chain(base, dict(rounds), parent, "../pre-1"))
            finally:
                os.close(fd)
            rounds[name] = _ident(ck / name)
        if plant == "swap":
            # The owner (whose dir ck is while the final dump runs) swaps a round.
            os.rename(ck / "pre-1", ck / "old")
            _round(ck, "pre-1")
        elif plant == "gone":
            shutil.rmtree(ck / "pre-1")
        elif plant == "outside":
            (ck / imgdir.PARENT_LINK).symlink_to("/etc")
        elif plant == "dir":
            (ck / imgdir.PARENT_LINK).mkdir()
        return imgdir.seal(base, OWNER, None, imgdir.Chain(base, rounds, "pre-2", "pre-2"))
    finally:
        os.close(base)


def test_seal_of_a_pre_dump_chain_relinks_parent_itself(tmp_path: Path) -> None:
    need_root()
    ck = tmp_path / "ck"
    ck.mkdir(mode=0o700)
    (ck / "pstree.img").write_bytes(b"x")
    os.chown(ck, OWNER, OWNER)
    assert _seal_chain(ck, "outside") == 1 + 10 + 10
    # Every parent link is root's, relative, and reaches the round before.
    assert os.readlink(ck / "parent") == "pre-2" and os.lstat(ck / "parent").st_uid == 0
    assert os.readlink(ck / "pre-2" / "parent") == "../pre-1"
    assert os.lstat(ck / "pre-2" / "parent").st_uid == 0
    assert not (ck / "pre-1" / "parent").exists()
    assert (ck / "parent" / "parent" / "pages-1.img").read_bytes() == b"p" * 10
    for d in (ck, ck / "pre-1", ck / "pre-2"):
        st = os.stat(d)
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, imgdir.SEALED_DIR_MODE)
    fd = imgdir.open_dir(ck)
    try:
        assert imgdir.has_chain(fd)
    finally:
        os.close(fd)


@pytest.mark.parametrize("plant", ["swap", "gone", "dir"])
def test_seal_of_a_chain_refuses_a_round_that_is_not_the_daemons(
    tmp_path: Path, plant: str
) -> None:
    need_root()
    ck = tmp_path / "ck"
    ck.mkdir(mode=0o700)
    os.chown(ck, OWNER, OWNER)
    with pytest.raises(imgdir.UnsafeEntry):
        _seal_chain(ck, plant)
    assert stat.S_IMODE(os.stat(ck).st_mode) != imgdir.SEALED_DIR_MODE


def test_a_parent_link_outside_a_chain_is_tampering(tmp_path: Path) -> None:
    need_root()
    d = tmp_path / "ck"
    d.mkdir(mode=0o700)
    (d / "pstree.img").write_bytes(b"x")
    (d / imgdir.PARENT_LINK).symlink_to("/etc")
    fd = imgdir.open_dir(d)
    try:
        assert imgdir.has_chain(fd)
        with pytest.raises(imgdir.UnsafeEntry, match="symlink"):
            imgdir.seal(fd, 0)
        # A link text other than the round's own name is never written.
        with pytest.raises(ValueError):
            imgdir.seal(fd, 0, None, imgdir.Chain(fd, {}, "pre-1", "../../etc"))
    finally:
        os.close(fd)


def test_seal_of_a_dir_only_root_wrote_checks_by_stat(tmp_path: Path) -> None:
    """roots_only (a dump by root's criu): same outcome as a full seal, fewer syscalls."""
    need_root()
    d = tmp_path / "ck"
    d.mkdir(mode=0o700)
    for name, size in (("pages-1.img", 100), ("pstree.img", 7)):
        (d / name).write_bytes(b"x" * size)
        (d / name).chmod(0o600)
    fd = imgdir.open_dir(d)
    try:
        log = imgdir.create_log(fd, "dump.log")
        st = os.fstat(log)
        os.close(log)
        expect = {"dump.log": (st.st_dev, st.st_ino)}
        assert imgdir.seal(fd, 0, expect, roots_only=True) == 107
        assert imgdir.is_sealed(fd)
        assert imgdir.seal(fd, 0, expect, roots_only=True) == 107  # idempotent
    finally:
        os.close(fd)
    for f in d.iterdir():
        fst = f.stat()
        assert (fst.st_uid, stat.S_IMODE(fst.st_mode)) == (0, 0o644), f


@pytest.mark.parametrize("plant", ["symlink", "hardlink", "fifo", "subdir", "foreign", "swapped"])
def test_seal_of_a_dir_only_root_wrote_still_refuses_tampering(tmp_path: Path, plant: str) -> None:
    need_root()
    d = tmp_path / "ck"
    d.mkdir(mode=0o700)
    (d / "pstree.img").write_bytes(b"x")
    outside = _roots_file(tmp_path)
    if plant == "swapped":
        (d / "x.img").write_text("not the daemon's log")
    else:
        _plant(d / "x.img", outside, plant)
    expect = {"x.img": (0, 0)} if plant == "swapped" else None
    fd = imgdir.open_dir(d)
    try:
        with pytest.raises(imgdir.UnsafeEntry):
            imgdir.seal(fd, 0, expect, roots_only=True)
        assert not imgdir.is_sealed(fd)
    finally:
        os.close(fd)
    st = os.stat(outside)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600)
