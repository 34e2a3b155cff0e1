"""The daemon's memory: freed heap given back (glibc's malloc_trim), one heap, modules kept out.

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
import os
import sys
from collections.abc import Callable

_trim: Callable[[int], int] | None = None
_mallopt: Callable[[int, int], int] | None = None
try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    _trim, _mallopt = _libc.malloc_trim, _libc.mallopt
except (OSError, AttributeError):
    _trim = _mallopt = None  # not glibc: nothing to give back this way

# mallopt's parameter for the number of heaps (malloc.h).
M_ARENA_MAX = -8


def one_heap() -> None:
    """All threads allocate from glibc's main heap; call before any thread starts.

    glibc gives each thread that allocates while another holds the heap's
    lock a heap of its own (up to 8 per core).  The daemon's threads (the
    store's, asyncio's workers) kept 2 MiB there after a list rebuild,
    which malloc_trim could not return because a few live chunks pinned
    their pages: one heap measured 1.7 MiB less RSS after a list,
    the same idle (bench/memory_map.py pair, docs/benchmarks.md), and no
    more CPU per list under load.  The threads allocate little and mostly
    under the GIL, so they rarely wait for the one heap's lock.  An
    operator's MALLOC_ARENA_MAX wins.
    """
    if _mallopt is not None and "MALLOC_ARENA_MAX" not in os.environ:
        _mallopt(M_ARENA_MAX, 1)


def release() -> None:
    """Return the heaps' free pages to the system (a no-op without glibc)."""
    if _trim is not None:
        _trim(0)


# Modules the daemon never uses that its framework would import anyway.
# FastAPI imports pydantic.v1 (1.5 MiB of the idle daemon's RSS, paired in
# bench/memory_map.py) only to check that a route's model is not a
# pydantic 1 model, inside `try: from pydantic import v1 except ImportError`;
# criud has no such model.  A None entry in sys.modules makes that import
# raise ImportError, the answer FastAPI takes for "no pydantic 1 here".
NEVER_USED = ("pydantic.v1",)


def keep_out_unused() -> None:
    """Keep NEVER_USED out of this process (call before the app is built)."""
    for name in NEVER_USED:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]
