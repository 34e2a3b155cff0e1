"""Files in a checkpoint's images dir (or a restore's run dir), opened as root safely.

criu runs as a tree's owner here, so an images dir is the owner's while
criu dumps into it, and a user holding an fd of it could plant symlinks,
fifos or hardlinks, or swap files.  The daemon therefore never resolves a
path inside such a dir: everything goes through a dir fd, one name at a
time, with O_NOFOLLOW; only regular files with a single link are read, and
reads are bounded.  ``seal`` turns a dumped dir into root's, read-only to
everyone else, after which nobody but root can change it.

Nothing here follows a symlink, blocks on a fifo, or chowns a file it did
not check first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import os
import shutil
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path

from criud.daemon.errors import CheckpointTampered

# A sealed dir: root's, traversable and readable by criu running as the
# tree's owner (through the fd the daemon hands it; the checkpoints dir
# above stays 0700 root, so nobody reaches it by path).
SEALED_DIR_MODE = 0o755
SEALED_FILE_MODE = 0o644

# The one subdir an images dir may hold: an imported archive's other members
# (criud.json, spec.dump, ...), made by the daemon, root's 0755.
ARCHIVE_SUBDIR = "archive"

# criu's link from a pre-dump chain's dir to the dir of the round before
# (`--prev-images-dir`); the one symlink a sealed images dir may hold, and
# only one the daemon made itself (see Chain).
PARENT_LINK = "parent"
# The daemon's names for a checkpoint's pre-dump round dirs: pre-1, pre-2, ...
ROUND_PREFIX = "pre-"

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a fifo planted under a checked name must not hang the open.
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class UnsafeEntry(CheckpointTampered):
    """An entry is not what the daemon put there: a link, a fifo, a dir, a foreign file.

    A CheckpointTampered (409) wherever it escapes; the jobs name the
    checkpoint in it (criud.daemon.imgdir.tampered).
    """


def _check_name(name: str) -> None:
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise ValueError(f"not a single path component: {name!r}")


def _kind(mode: int) -> str:
    for test, what in (
        (stat.S_ISLNK, "a symlink"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a fifo"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return what
    return "not a regular file"


def open_dir(path: Path) -> int:
    """Open a dir the daemon made (its last component must not be a symlink)."""
    return os.open(path, _DIR_FLAGS)


def open_dir_at(dirfd: int, name: str) -> int:
    """Open the subdir `name` of dirfd (never through a symlink)."""
    _check_name(name)
    return os.open(name, _DIR_FLAGS, dir_fd=dirfd)


def open_beneath(dirfd: int, name: str) -> int:
    """Open the regular file `name` of dirfd read-only; UnsafeEntry if it is anything else.

    FileNotFoundError passes through.  The entry is checked with lstat
    before the open (so a device node is never opened) and the open fd
    again after it (same inode, still one link).
    """
    _check_name(name)
    st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeEntry(f"{name} is {_kind(st.st_mode)}")
    try:
        fd = os.open(name, _READ_FLAGS, dir_fd=dirfd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UnsafeEntry(f"{name} is a symlink") from None
        raise
    try:
        got = os.fstat(fd)
        if not stat.S_ISREG(got.st_mode) or (got.st_dev, got.st_ino) != (st.st_dev, st.st_ino):
            raise UnsafeEntry(f"{name} was replaced while being opened")
        if got.st_nlink != 1:
            raise UnsafeEntry(f"{name} has {got.st_nlink} links")
        return fd
    except BaseException:
        os.close(fd)
        raise


def read_fd(fd: int, cap: int, tail: bool = False) -> bytes:
    """At most cap bytes of an open regular file, from offset 0 (pread).

    Longer files: with tail, the first and last cap/2 bytes around a marker
    (a criu log says why it failed at the start or at the end); without,
    UnsafeEntry.
    """
    size = os.fstat(fd).st_size
    if size <= cap:
        return _pread_all(fd, 0, cap)
    if not tail:
        raise UnsafeEntry(f"{size} bytes, more than the {cap} allowed")
    half = cap // 2
    head = _pread_all(fd, 0, half)
    end = _pread_all(fd, max(0, size - half), half)
    return head + f"\n[... {size - len(head) - len(end)} bytes left out ...]\n".encode() + end


def _pread_all(fd: int, offset: int, n: int) -> bytes:
    chunks: list[bytes] = []
    while n > 0:
        b = os.pread(fd, min(n, 1 << 20), offset)
        if not b:
            break
        chunks.append(b)
        offset += len(b)
        n -= len(b)
    return b"".join(chunks)


def read_small(dirfd: int, name: str, cap: int, tail: bool = False) -> bytes:
    """The content of the regular file `name` of dirfd, bounded (see read_fd)."""
    fd = open_beneath(dirfd, name)
    try:
        return read_fd(fd, cap, tail)
    finally:
        os.close(fd)


def create_log(dirfd: int, name: str) -> int:
    """A fresh, empty file `name` of dirfd (an old one is removed): O_RDWR|O_APPEND, 0600.

    O_EXCL|O_NOFOLLOW: whatever sits under the name after the unlink (a
    symlink raced in) makes the create fail instead of being followed.
    """
    _check_name(name)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=dirfd)
    flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    return os.open(name, flags, 0o600, dir_fd=dirfd)


def _open_writers(fd: int) -> bool:
    """Whether any process has the file of fd (open read-only by us) open for writing.

    A read lease is refused with EAGAIN exactly then: it catches a writable
    fd (or shared mapping) the owner kept from before the seal, which the
    chown would not revoke.  Filesystems without leases say nothing.
    """
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError as e:
        return e.errno == errno.EAGAIN
    fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
    return False


def _seal_file(dirfd: int, name: str, owner_uid: int, expect: tuple[int, int] | None) -> int:
    st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeEntry(f"{name} is {_kind(st.st_mode)}")
    if st.st_uid not in (0, owner_uid):
        raise UnsafeEntry(f"{name} belongs to uid {st.st_uid}")
    if expect is not None and (st.st_dev, st.st_ino) != expect:
        raise UnsafeEntry(f"{name} is not the file the daemon created")
    fd = open_beneath(dirfd, name)
    try:
        # Root's first (a lease needs the owner or CAP_LEASE), then make
        # sure no fd opened for writing before the chown survives it.
        os.fchown(fd, 0, 0)
        os.fchmod(fd, SEALED_FILE_MODE)
        # An expected file is the daemon's own (root's 0600 from its
        # creation, so nobody else could open it for writing): the daemon
        # may hold it open itself.
        if expect is None and _open_writers(fd):
            raise UnsafeEntry(f"{name} is open for writing by some process")
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


def _seal_roots_file(dirfd: int, name: str, expect: tuple[int, int] | None) -> int:
    """_seal_file for a dir only root ever wrote (see seal's roots_only)."""
    st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeEntry(f"{name} is {_kind(st.st_mode)}")
    if st.st_uid != 0 or st.st_nlink != 1:
        raise UnsafeEntry(f"{name} is not root's own file (uid {st.st_uid}, {st.st_nlink} links)")
    if expect is not None and (st.st_dev, st.st_ino) != expect:
        raise UnsafeEntry(f"{name} is not the file the daemon created")
    if stat.S_IMODE(st.st_mode) != SEALED_FILE_MODE:
        # By name, which follows a link: none can be there (checked a
        # regular file just now, in a dir nobody but root can change).
        os.chmod(name, SEALED_FILE_MODE, dir_fd=dirfd)
    return st.st_size


@dataclasses.dataclass(frozen=True)
class Chain:
    """A dir's place in a checkpoint's pre-dump chain, as the daemon made it.

    base_fd is the checkpoint's dir, which holds the round dirs (pre-1 ..
    pre-N, each made by the daemon: rounds maps their names to the
    (st_dev, st_ino) it made them with).  parent names the round dir this
    dir's `parent` link must reach (None: the first round, no link); link
    is the text the link holds, relative (`pre-N` from the checkpoint's dir,
    `../pre-K` from a round dir).
    """

    base_fd: int
    rounds: Mapping[str, tuple[int, int]]
    parent: str | None = None
    link: str = ""


def seal(
    dirfd: int,
    owner_uid: int,
    expect: Mapping[str, tuple[int, int]] | None = None,
    chain: Chain | None = None,
    roots_only: bool = False,
) -> int:
    """Make a dumped images dir root's and read-only to others; return its files' bytes.

    The dir itself first: once it is root's 0700 its entries can no longer
    be added, removed or renamed by the owner, so the walk that follows
    sees a fixed set.  A criu images dir holds only regular files with one
    link, owned by root or the tree's owner; anything else is tampering
    (UnsafeEntry), and the dir stays root's 0700, unsealed.  Only a clean
    walk ends in the sealed mode (0755), which is_sealed trusts from then
    on.  expect maps names to the (st_dev, st_ino) the daemon created them
    with.  Idempotent.

    roots_only: the dir was root's 0700 from its mkdir on and only root's
    criu wrote in it (a dump not run as the owner), so no other process can
    have opened, linked or swapped anything in it: each file is checked by
    its lstat (regular, root's, one link) and made 0644 by name, without the
    open, chown and lease a file the owner could touch needs (24 ms for the
    708 images of a 100-task dump; bench/scaling_bench.py).

    A dir of a pre-dump chain (chain given) may hold exactly one symlink,
    `parent`: whatever criu (run as the owner) left under that name is
    removed and the daemon makes the link itself, to the round dir it made
    (checked through base_fd); the checkpoint's own dir may hold the
    sealed round dirs, whose bytes count in its total.
    """
    os.fchown(dirfd, 0, 0)
    os.fchmod(dirfd, 0o700)
    total = 0
    names = sorted(os.listdir(dirfd))
    rounds = chain.rounds if chain is not None and chain.base_fd == dirfd else {}
    for name in names:
        if name == ARCHIVE_SUBDIR and _is_daemons_dir(dirfd, name):
            continue
        if name in rounds:
            total += _check_round(dirfd, name, rounds[name])
            continue
        if name == PARENT_LINK and chain is not None and chain.parent is not None:
            continue  # made again below
        if roots_only and owner_uid == 0:
            total += _seal_roots_file(dirfd, name, (expect or {}).get(name))
        else:
            total += _seal_file(dirfd, name, owner_uid, (expect or {}).get(name))
    missing = (set(expect or {}) | set(rounds)) - set(names)
    if missing:
        raise UnsafeEntry(f"{', '.join(sorted(missing))} went missing")
    if chain is not None and chain.parent is not None:
        _link_parent(dirfd, chain)
    os.fchmod(dirfd, SEALED_DIR_MODE)
    return total


def _link_parent(dirfd: int, chain: Chain) -> None:
    """Replace whatever `parent` is in dirfd with the daemon's own link to chain.parent."""
    assert chain.parent is not None
    _check_name(chain.parent)
    if not chain.parent.startswith(ROUND_PREFIX) or chain.link not in (
        chain.parent,
        f"../{chain.parent}",
    ):
        raise ValueError(f"not a round dir link: {chain.link!r} to {chain.parent!r}")
    _check_round(chain.base_fd, chain.parent, chain.rounds[chain.parent])
    try:
        # unlink never follows; a dir planted under the name fails (EISDIR).
        os.unlink(PARENT_LINK, dir_fd=dirfd)
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        raise UnsafeEntry(f"{PARENT_LINK} is a directory") from None
    os.symlink(chain.link, PARENT_LINK, dir_fd=dirfd)


def _check_round(base_fd: int, name: str, ident: tuple[int, int]) -> int:
    """That base_fd's name is the sealed round dir the daemon made; its files' bytes."""
    st = os.stat(name, dir_fd=base_fd, follow_symlinks=False)
    if (st.st_dev, st.st_ino) != ident or not stat.S_ISDIR(st.st_mode):
        raise UnsafeEntry(f"{name} is not the pre-dump dir the daemon made")
    if st.st_uid != 0 or stat.S_IMODE(st.st_mode) != SEALED_DIR_MODE:
        raise UnsafeEntry(f"{name} is not sealed")
    fd = os.open(name, _DIR_FLAGS, dir_fd=base_fd)
    try:
        total = 0
        for entry in os.scandir(fd):
            est = entry.stat(follow_symlinks=False)
            if stat.S_ISREG(est.st_mode):
                total += est.st_size
        return total
    finally:
        os.close(fd)


def has_chain(dirfd: int) -> bool:
    """Whether the images dir at dirfd holds a `parent` link (pages in pre-dump rounds)."""
    try:
        st = os.stat(PARENT_LINK, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return stat.S_ISLNK(st.st_mode)


def _is_daemons_dir(dirfd: int, name: str) -> bool:
    """Whether name is a dir only the daemon could have made (root's, not a link)."""
    st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    return stat.S_ISDIR(st.st_mode) and st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o755


# The most entries `usage` looks at: a dir the owner can write may hold
# anything it planted, and a progress sample must stay cheap.
USAGE_MAX_ENTRIES = 4096


def usage(dirfd: int, max_entries: int = USAGE_MAX_ENTRIES) -> tuple[int, int]:
    """(bytes of image files, bytes of pages-*.img files) in the dir at dirfd, as of now.

    For progress while criu writes a dir the tree's owner may write too:
    nothing is opened or followed, each entry is only lstat'ed relative to
    the dir's fd (fstatat, AT_SYMLINK_NOFOLLOW), and only regular files
    count.  What the owner plants can only skew its own progress figures.
    """
    total = pages = 0
    # A fresh open file description of the dir: scandir moves its offset,
    # and the caller's fd is shared with what else reads the dir.
    fd = os.open(".", _DIR_FLAGS, dir_fd=dirfd)
    try:
        with os.scandir(fd) as it:
            for n, entry in enumerate(it):
                if n >= max_entries:
                    break
                if not entry.name.endswith(".img"):
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    total += st.st_size
                    if entry.name.startswith("pages-"):
                        pages += st.st_size
    finally:
        os.close(fd)
    return total, pages


def is_sealed(dirfd: int) -> bool:
    """Whether seal() finished on this dir (root's, in the sealed mode).

    Only root can change a sealed dir, so it stays trustworthy; anything
    else (a previous release's dir, a seal that found tampering) is walked
    again.
    """
    st = os.fstat(dirfd)
    return st.st_uid == 0 and stat.S_IMODE(st.st_mode) == SEALED_DIR_MODE


def keep_only(dirfd: int, keep: Iterable[str]) -> None:
    """Remove every entry of dirfd except those named in keep; never follows a link."""
    kept = set(keep)
    for entry in os.scandir(dirfd):
        if entry.name in kept:
            continue
        with contextlib.suppress(FileNotFoundError):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.name, dir_fd=dirfd)
            else:
                os.unlink(entry.name, dir_fd=dirfd)


def make_run_dir(parent: Path, name: str, owner: tuple[int, int] | None) -> int:
    """A fresh dir `name` under the root-only `parent`, for criu's -W; return its fd.

    The daemon makes it, so handing it to the tree's owner (criu writes its
    pidfile and stats there as that user) is safe: nobody else can reach it.
    """
    _check_name(name)
    os.mkdir(parent / name, 0o700)
    fd = open_dir(parent / name)
    try:
        if owner is not None:
            os.fchown(fd, owner[0], owner[1])
        return fd
    except BaseException:
        os.close(fd)
        raise


def remove_dir(parent: Path, name: str) -> None:
    """Remove parent/name and all it holds without following links; no error if gone."""
    _check_name(name)
    fd = open_dir(parent)
    try:
        shutil.rmtree(name, dir_fd=fd, ignore_errors=True)
    finally:
        os.close(fd)


def clear_dir(path: Path) -> None:
    """Remove everything inside path (it stays); at start-up, for leftover run dirs."""
    fd = open_dir(path)
    try:
        keep_only(fd, ())
    finally:
        os.close(fd)


def tampered(ckpt_id: str, e: UnsafeEntry) -> CheckpointTampered:
    """e, said of checkpoint ckpt_id: the one place an unsafe entry gets its context."""
    return CheckpointTampered(
        f"checkpoint {ckpt_id}: {e}; a criu images dir holds only regular files "
        "the daemon or criu made, so it was tampered with and is not used",
        checkpoint=ckpt_id,
    )


def criu_dir(path: Path, fd: int, run_as_ids: tuple[int, int] | None, writable: bool) -> Path:
    """The images dir (open at fd) as criu should name it.

    As root, criu takes the path.  As a tree's owner it could not traverse
    the 0700 state dir, so the dir is handed over as its open fd (the caller
    passes fd to criu) and named /proc/self/fd/N: a magic link, which needs
    no search permission on the path it came from.  writable (a dump): the
    dir, which the daemon made for this dump, is chowned to the owner; a
    restore reads the sealed dir.
    """
    if run_as_ids is None:
        return path
    if writable:
        os.fchown(fd, *run_as_ids)
    return Path(f"/proc/self/fd/{fd}")
