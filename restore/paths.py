"""Opening a path-form inherit fd with the caller's filesystem credentials.

The daemon is root; a caller must not be able to make it open a file the
caller could not open itself.  Linux credentials are per thread, and the
fsuid/fsgid/groups syscalls act on the calling thread only (glibc's
setgroups would broadcast to all threads, so we call the raw syscall).  We
switch credentials in a fresh thread that does nothing else, open, and
switch back before the thread ends.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import threading

from criud.daemon.errors import InheritPathError

_SYSCALLS = {
    "x86_64": {"setgroups": 116, "setfsuid": 122, "setfsgid": 123},
    "aarch64": {"setgroups": 159, "setfsuid": 151, "setfsgid": 152},
}
_FLAGS = {
    "r": os.O_RDONLY,
    "w": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
    "a": os.O_WRONLY | os.O_CREAT | os.O_APPEND,
    "r+": os.O_RDWR,
}
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _syscall(name: str, *args: object) -> int:
    nr = _SYSCALLS[platform.machine()][name]
    return int(_libc.syscall(nr, *args))


def _open(path: str, mode: str) -> int:
    if not os.path.isabs(path):
        raise InheritPathError(f"inherit path {path!r} must be absolute")
    try:
        # O_NOCTTY: a tty path must not become the daemon's controlling tty.
        return os.open(path, _FLAGS[mode] | os.O_CLOEXEC | os.O_NOCTTY, 0o644)
    except OSError as e:
        raise InheritPathError(f"cannot open {path!r} ({mode}): {e.strerror}", path=path) from e


def open_as(path: str, mode: str, uid: int, gid: int, groups: list[int]) -> int:
    """Open path as the caller would; return an O_CLOEXEC fd owned by the caller of this."""
    if uid == 0:
        return _open(path, mode)
    if platform.machine() not in _SYSCALLS:
        raise InheritPathError(
            f"path inherit for non-root callers is unsupported on {platform.machine()}"
        )
    result: list[int] = []
    error: list[BaseException] = []

    def run() -> None:
        arr = (ctypes.c_uint32 * max(len(groups), 1))(*groups)
        saved = os.getgroups()
        try:
            _syscall("setgroups", ctypes.c_size_t(len(groups)), arr)
            _syscall("setfsgid", ctypes.c_uint32(gid))
            _syscall("setfsuid", ctypes.c_uint32(uid))
            result.append(_open(path, mode))
        except BaseException as e:  # re-raised in the caller's thread
            error.append(e)
        finally:
            _syscall("setfsuid", ctypes.c_uint32(0))
            _syscall("setfsgid", ctypes.c_uint32(0))
            back = (ctypes.c_uint32 * max(len(saved), 1))(*saved)
            _syscall("setgroups", ctypes.c_size_t(len(saved)), back)

    t = threading.Thread(target=run, name="criud-open-as")
    t.start()
    t.join()
    if error:
        raise error[0]
    return result[0]
