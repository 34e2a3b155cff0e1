"""The fds a restore's criu worker inherits: one map, one owner.

criu gets exactly the fds in the map (`pass_fds`, with close_fds=True in the
runner) and nothing else.  Some of them replace what the dump recorded as
external: each of those is named to criu with `--inherit-fd fd[N]:key`.  This
module is the only code that produces either list, so the two cannot
disagree: an fd is never passed without its argument, nor named without
being passed.

The map owns every fd it holds.  What the restore opens (paths, namespace
files, the images and run dirs) is given to it; an fd that belongs to
someone else (an fd handle's, which its handle store closes) is duplicated
into it.  `close()` closes them all exactly once, and the map is a context
manager, so every path out of a restore (success, a refusal, a failure of
criu, a cancellation) closes them.
"""

from __future__ import annotations

import contextlib
import fcntl
import os


class FdMap:
    """The fds handed to one criu worker, owned and closed together."""

    def __init__(self) -> None:
        self._owned: list[int] = []
        # In the order given: (fd, key) for --inherit-fd, and plain passes.
        self._inherit: list[tuple[int, str]] = []
        self._plain: list[int] = []
        # Each duplicate -> the fd it was made from (an fd handle's): the
        # number that handle's own warm worker holds it at.
        self._origin: dict[int, int] = {}
        self._closed = False

    # -- taking fds --------------------------------------------------------------

    def own(self, fd: int) -> int:
        """Take fd over (closed with the map); return it.  Not passed until handed over."""
        if self._closed:
            os.close(fd)
            raise ValueError("FdMap is closed")
        self._owned.append(fd)
        return fd

    def dup(self, fd: int) -> int:
        """Own a close-on-exec duplicate of someone else's fd; return the duplicate.

        The worker still gets it (pass_fds clears CLOEXEC in the child only).
        """
        dup = self.own(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 0))
        self._origin[dup] = fd
        return dup

    def hand_over(self, fd: int, key: str | None = None) -> None:
        """Pass an owned fd to the worker; with key, as --inherit-fd fd[N]:key."""
        if fd not in self._owned:
            raise ValueError(f"fd {fd} is not owned by this map")
        if fd in self._plain or any(f == fd for f, _ in self._inherit):
            raise ValueError(f"fd {fd} is handed over already")
        if key is None:
            self._plain.append(fd)
        else:
            self._inherit.append((fd, key))

    # -- what the worker gets ------------------------------------------------------

    @property
    def inherited(self) -> list[tuple[int, str]]:
        """(fd, key) for every fd that replaces an external resource."""
        return list(self._inherit)

    @property
    def pass_fds(self) -> list[int]:
        """Every fd the worker inherits: those named by key, then the plain ones."""
        return [fd for fd, _ in self._inherit] + self._plain

    @property
    def origins(self) -> dict[int, int]:
        """Each duplicated fd -> the fd it was duplicated from."""
        return dict(self._origin)

    def inherit_args(self) -> list[str]:
        """The --inherit-fd arguments, one per inherited fd (the fd is its number in the worker)."""
        out: list[str] = []
        for fd, key in self._inherit:
            out += ["--inherit-fd", f"fd[{fd}]:{key}"]
        return out

    # -- closing -----------------------------------------------------------------

    def close(self) -> None:
        """Close every owned fd, once; later calls do nothing."""
        if self._closed:
            return
        self._closed = True
        fds, self._owned = self._owned, []
        self._inherit.clear()
        self._plain.clear()
        self._origin.clear()
        for fd in fds:
            # Closed behind our back is a bug elsewhere; the rest must still be closed.
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> FdMap:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
