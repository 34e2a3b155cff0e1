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
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from types import ModuleType

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
    """Keep NEVER_USED out, DEFERRED unbuilt, LAZY_INIT's `__init__` unrun, until used.

    Call before fastapi and uvicorn load (`criud serve` does).
    """
    for name in NEVER_USED:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]
    if not any(isinstance(f, _DeferBuild) for f in sys.meta_path):
        sys.meta_path.insert(0, _DeferBuild())
    for name, names in LAZY_INIT.items():
        _lazy_init(name, names)


# Packages whose __init__ loads far more than the daemon uses of them, and
# where each name the daemon's code reaches through the package lives.
# uvicorn/__init__ imports uvicorn.main for `run` and `main`, its command
# line: click, multiprocessing's supervisors, email and configparser, 1.6
# MiB of the idle daemon's RSS (bench/memory_map.py variants).  The daemon
# runs uvicorn.config's Config and uvicorn.server's Server, and uvicorn's
# own uvicorn.lifespan.off takes Config through the package.
LAZY_INIT = {"uvicorn": {"Config": "uvicorn.config", "Server": "uvicorn.server"}}


def _lazy_init(name: str, names: dict[str, str]) -> None:
    """Put package name in sys.modules with its __init__ run only when first needed.

    Its submodules import as ever (the package has its __path__); a name of
    names is taken from its submodule; any other name the package is asked
    for (`uvicorn.run`, `uvicorn.__version__`) runs the real __init__ then,
    once, so nothing changes for code that needs it but the time it loads.
    """
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        return
    loader = spec.loader
    pkg = importlib.util.module_from_spec(spec)

    def lazy_getattr(attr: str) -> object:
        if attr in names:
            value = getattr(importlib.import_module(names[attr]), attr)
            setattr(pkg, attr, value)
            return value
        del pkg.__dict__["__getattr__"]  # from now on a plain package
        loader.exec_module(pkg)
        return getattr(pkg, attr)

    # PEP 562: asked for a name it lacks, a module calls its __getattr__.
    pkg.__dict__["__getattr__"] = lazy_getattr
    sys.modules[name] = pkg


# Modules whose pydantic models only rare requests use, built on first use
# instead of as they load.  fastapi.openapi.models (some forty models of
# the OpenAPI document itself) is imported by `import fastapi`, and
# pydantic-core compiles each model as its class is made: 1.3 MiB of the
# idle daemon's RSS (bench/memory_map.py pair, docs/benchmarks.md) and
# ~85 ms of start-up, for models that only serving /openapi.json or /docs
# instantiates.  The document is the same either way (pydantic builds a
# deferred model on its first validation); that request pays the build
# once.  tests/unit/daemon/test_memory.py checks the models are still
# unbuilt after start-up and every other model built.
DEFERRED = ("fastapi.openapi.models",)


class _DeferBuild(importlib.abc.MetaPathFinder):
    """Load DEFERRED modules with pydantic's `defer_build` on, for their classes only.

    pydantic has no global switch for it: a model takes its config from its
    bases, so the flag is set on BaseModel's own config for as long as the
    module's body runs (what that body imports is loaded already; the test
    fails if any other model is left unbuilt), at start-up, before any
    thread that could make a model meanwhile.
    Models made then keep `defer_build` in their config, which only says
    when pydantic builds them.
    """

    def find_spec(
        self, name: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if name not in DEFERRED:
            return None
        if all(n in sys.modules or n == name for n in DEFERRED):
            sys.meta_path.remove(self)  # the last one: nothing left to watch for
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is not None and isinstance(spec.loader, importlib.machinery.SourceFileLoader):
            spec.loader = _DeferBuildLoader(spec.loader.name, spec.loader.path)
        return spec


class _DeferBuildLoader(importlib.machinery.SourceFileLoader):
    """A source loader that runs the module's body with `defer_build` on BaseModel."""

    def exec_module(self, module: ModuleType) -> None:
        from pydantic import BaseModel

        config = BaseModel.model_config
        had = "defer_build" in config
        config["defer_build"] = True
        try:
            super().exec_module(module)
        finally:
            if not had:
                del config["defer_build"]
