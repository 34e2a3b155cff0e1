"""Giving freed heap back to the system (glibc's malloc_trim).

Python frees its objects into glibc's heaps, and glibc returns to the system
only what sits at the top of each heap.  Start-up (the kernel probes, the
app's routes and models) and a rebuild of the checkpoint list (a model per
record, in a worker thread's own heap) leave megabytes free in the middle
of a heap, counted in the daemon's RSS for as long as it runs.
malloc_trim(0) hands those pages back (glibc >= 2.8 releases whole free
pages anywhere in every heap); it takes about a millisecond, so it runs
after those rare, large frees only, never per request.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable

_trim: Callable[[int], int] | None = None
try:
    _trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
except (OSError, AttributeError):
    _trim = None  # not glibc: nothing to give back this way


def release() -> None:
    """Return the heaps' free pages to the system (a no-op without glibc)."""
    if _trim is not None:
        _trim(0)
