"""The `stdio` shorthand: one fd handle stands for the root task's fds 0, 1 and 2.

Like runc's descriptors.json, but the other way round: the caller hands in
three fds, index 0, 1 and 2 of one handle, and each replaces what the root
task of the tree held at that fd number when it was dumped, whatever its
kind: a pipe, a pty slave, a FIFO or a file.  The expansion is into ordinary
{pid, fd, handle, index} mappings, so everything else (checks, leases, fd
passing to criu) is the same as for mappings the caller spells out.

Which of the root's fds 0-2 are mapped: those criu needs a replacement for
(external ones: a pipe, FIFO or socket end, or a pty slave, whose other end
is outside the tree) and those criu would reopen by path (a file or a device,
say a log file or /dev/null), which the engine may want to redirect.  An fd
whose other end is inside the tree is the tree's own business and is left
alone, as is a number the root had closed.  When 1 and 2 (or 0) share one
resource (one key), the lowest fd number maps it; the handle's other index
goes unused.  An explicit mapping of the same resource wins over the shorthand.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Sequence

from criud.daemon.errors import BadFdHandle, WrongFdType
from criud.dump.manifest import Manifest
from criud.restore.mappings import InheritSpec

STDIO_FDS = (0, 1, 2)
# Kinds criu reopens by path: redirecting them is the engine's choice.
_BY_PATH = ("file", "device")


def _explicit_keys(inherit: Sequence[InheritSpec], manifest: Manifest) -> set[str]:
    keys: set[str] = set()
    for s in inherit:
        if s.key is not None:
            keys.add(s.key)
        elif s.pid is not None and s.fd is not None:
            key = manifest.key_of(s.pid, s.fd)
            if key is not None:
                keys.add(key)
    return keys


def expand(
    inherit: Sequence[InheritSpec], handle: str, count: int, manifest: Manifest
) -> tuple[InheritSpec, ...]:
    """inherit plus the mappings handle (of count fds) stands for as stdio."""
    if count != len(STDIO_FDS):
        raise BadFdHandle(
            f"stdio needs a handle of exactly 3 fds (for 0, 1 and 2); {handle!r} has {count}",
            handle=handle,
            reason="bad_index",
        )
    if not manifest.tasks:
        return tuple(inherit)
    root = manifest.tasks[0]  # the walk lists the root first
    taken = _explicit_keys(inherit, manifest)
    out = list(inherit)
    for f in root.fds:
        key = str(f["key"])
        if f["fd"] not in STDIO_FDS or key in taken:
            continue
        if not (f["external"] or f["type"] in _BY_PATH):
            continue
        taken.add(key)
        out.append(InheritSpec(pid=root.pid, fd=f["fd"], handle=handle, index=f["fd"]))
    return tuple(out)


def check_terminals(inherit: Iterable[tuple[int, str]], manifest: Manifest) -> None:
    """A pty key needs a terminal fd: criu sets its termios and session on it.

    Anything else would fail deep in criu's restore (after the images are
    read), so it is refused first, naming the key.  Other kinds take any fd.
    """
    ttys = {str(f["key"]) for t in manifest.tasks for f in t.fds if f["type"] == "tty"}
    for fd, key in inherit:
        if key in ttys and not os.isatty(fd):
            mode = os.fstat(fd).st_mode
            got = "a pipe or FIFO" if stat.S_ISFIFO(mode) else "not a terminal"
            raise WrongFdType(
                f"{key!r} was a terminal at dump time and needs a pty slave (its termios, "
                f"session and foreground group are restored on it); the fd given is {got}",
                key=key,
                got=got,
            )
