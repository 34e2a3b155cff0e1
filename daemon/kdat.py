"""A tmpfs for criu's kernel-probe cache (kdat), so criu stops re-probing.

Every criu run starts by probing the kernel ("kerndat").  On a 2-core VM that
is about 33 ms of the 42 ms a dump of a small process takes.  criu caches the
probe in ``<RUNDIR>/criu.kdat`` and reads it back on the next run, but it
writes the cache only when that directory is on a tmpfs (the cache must not
survive a reboot, i.e. a kernel change), and RUNDIR is fixed when criu is
built.  A default build uses /run, which is not a tmpfs on every host
(this machine's /run is ext4), so there every run pays the probe again.

deploy/install-criu therefore builds criu with ``RUNDIR=/run/criud/kdat``
(KDAT_DIR below; the two must stay equal) and the daemon calls
``ensure_kdat_tmpfs(KDAT_DIR)`` at start-up, before its first criu run: it
mounts a tiny tmpfs there unless the directory is on a tmpfs already (as on
a systemd host, whose /run is one).  The mount is left in place when the
daemon stops, so the cache stays warm across restarts; it goes away at
reboot, with the kernel it describes.  ``umount /run/criud/kdat`` drops it.

Why not simply a tmpfs over /run, for a default-built criu?  In the host's
mount namespace that would hide everything every other program keeps in
/run.  In a private mount namespace for criu alone it would make criu see
every target in a foreign mount namespace: criu then dumps that whole
namespace and cannot restore it without --root (see deploy/criud.service).

Correctness does not depend on the cache: when the directory is missing, or
not a tmpfs, criu simply probes every time, as a default build does.  criu
stamps the cache with its build time and ignores (and deletes) a cache of
another build.  Nothing here ever stops the daemon: failures are logged and
reported as False.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import platform
import stat
from pathlib import Path

log = logging.getLogger("criud.kdat")

# criu's build-time RUNDIR; deploy/install-criu builds with exactly this.
KDAT_DIR = Path("/run/criud/kdat")
# The file criu keeps in it (criu/kerndat.c: KERNDAT_CACHE_NAME).
KDAT_FILE = "criu.kdat"
# The tmpfs mounted there: the cache is a few KiB.
MOUNT_OPTIONS = "size=1m,nr_inodes=64,mode=0700"
MOUNT_SOURCE = "criud-kdat"

TMPFS_MAGIC = 0x01021994
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 2, 4, 8

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


class _StatFs(ctypes.Structure):
    # Only f_type matters; it is the first member of struct statfs, a long
    # everywhere but s390x.  The padding covers the rest of the struct.
    _fields_ = [
        ("f_type", ctypes.c_uint if platform.machine() == "s390x" else ctypes.c_long),
        ("_rest", ctypes.c_byte * 256),
    ]


def fs_type(path: Path) -> int:
    """statfs(2) f_type of the filesystem holding path (OSError on failure)."""
    buf = _StatFs()
    if _libc.statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(path))
    return int(buf.f_type) & 0xFFFFFFFF


def is_tmpfs(path: Path) -> bool:
    """Whether path lies on a tmpfs (False if it cannot be statfs'ed)."""
    try:
        return fs_type(path) == TMPFS_MAGIC
    except OSError:
        return False


def _mount_tmpfs(path: Path) -> None:
    rc = _libc.mount(
        MOUNT_SOURCE.encode(),
        os.fsencode(path),
        b"tmpfs",
        ctypes.c_ulong(_MS_NOSUID | _MS_NODEV | _MS_NOEXEC),
        MOUNT_OPTIONS.encode(),
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(path))


def _make_dirs(path: Path) -> None:
    """Create path 0700 and any missing parent 0755 (not under the daemon's umask).

    Parents are world-searchable on purpose: /run/criud also holds the API
    sockets, and the server only widens that directory when it creates it.
    """
    missing: list[Path] = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(d, 0o700)
            os.chmod(d, 0o700 if d == path else 0o755)


def _safe_dir(path: Path) -> str | None:
    """Why path is no place for a cache root trusts, or None if it is fine."""
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        return "not a directory (or a symlink)"
    if st.st_uid != 0:
        return f"owned by uid {st.st_uid}, not root"
    if st.st_mode & 0o022:
        return f"writable by others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def ensure_kdat_tmpfs(path: Path = KDAT_DIR, *, reset: bool = True) -> bool:
    """Make path a usable kdat cache dir: a root-only directory on a tmpfs.

    Mounts a small tmpfs (MOUNT_OPTIONS) at path unless path already lies
    on a tmpfs.  Returns whether criu can keep its cache there.  Never
    raises: a failure is logged and returns False, and criu then probes
    the kernel on every run, which is slower but just as correct.

    With reset (the default) a cache left by an earlier run is removed, so
    the daemon's first criu run (`criu check` at start-up) probes afresh:
    a restart of the daemon picks up whatever changed since (a sysctl such
    as fs.nr_open, a module loaded), at the cost of one probe (~35 ms).
    """
    try:
        _make_dirs(path)
        why = _safe_dir(path)
        if why is not None:
            log.warning("kdat cache disabled: %s is %s", path, why)
            return False
        if not is_tmpfs(path):
            _mount_tmpfs(path)
            log.info("mounted a tmpfs (%s) at %s for criu's kdat cache", MOUNT_OPTIONS, path)
        # The tmpfs's root takes mode= from the options; a directory on an
        # existing tmpfs (systemd's /run) is narrowed here.
        os.chmod(path, 0o700)
        if not is_tmpfs(path):
            log.warning("kdat cache disabled: %s is still not on a tmpfs", path)
            return False
        if reset:
            for name in (KDAT_FILE, KDAT_FILE + ".tmp"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path / name)
        return True
    except OSError as e:
        log.warning("kdat cache disabled: cannot set up a tmpfs at %s: %s", path, e)
        return False


def built_with_kdat_dir(criu_path: str, path: Path = KDAT_DIR) -> bool:
    """Whether the criu binary at criu_path keeps its kdat cache in path.

    The path is compiled into criu as one string, "<RUNDIR>/criu.kdat";
    deploy/install-criu checks the same way.  False if unreadable.
    """
    needle = os.fsencode(path / KDAT_FILE) + b"\0"
    try:
        with open(criu_path, "rb") as f:
            data = f.read()
    except OSError:
        return False
    return needle in data
