"""Checking a restore's inherit-fd mappings against the checkpoint's manifest.

Three forms name what a fresh fd replaces: by key, by the (pid, fd) it had at
dump time, or by a path the daemon opens.  Everything is checked before a
single fd is touched or criu runs: unknown keys, duplicates, and external
resources left without a replacement are refused, naming each.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from criud.daemon.errors import (
    DuplicateInheritKey,
    InvalidRequest,
    MissingInheritFd,
    UnknownInheritKey,
)
from criud.dump.manifest import Manifest

MODES = ("r", "w", "a", "r+")
TYPES = ("fifo",)


@dataclasses.dataclass(frozen=True)
class InheritSpec:
    """One mapping as the caller gave it (already shape-checked by the API)."""

    key: str | None = None
    pid: int | None = None
    fd: int | None = None
    handle: str | None = None
    index: int | None = None
    path: str | None = None
    mode: str | None = None
    # Path form only: "fifo" lets the path be a FIFO (and only a FIFO).
    type: str | None = None

    @property
    def form(self) -> str:
        if self.path is not None:
            return "path"
        if self.pid is not None or self.fd is not None:
            return "fd"
        return "key"


@dataclasses.dataclass(frozen=True)
class ResolvedMapping:
    """A mapping whose key is known and checked."""

    key: str
    spec: InheritSpec


def _check_shape(i: int, s: InheritSpec) -> None:
    where = f"inherit_fds[{i}]"
    if s.path is not None:
        if s.key is None:
            raise InvalidRequest(f"{where}: the path form needs the key it replaces")
        if s.handle is not None or s.index is not None or s.pid is not None or s.fd is not None:
            raise InvalidRequest(f"{where}: the path form takes key, path, mode and type only")
        if s.mode is not None and s.mode not in MODES:
            raise InvalidRequest(f"{where}: mode must be one of {', '.join(MODES)}")
        if s.type is not None and s.type not in TYPES:
            raise InvalidRequest(f"{where}: type must be one of {', '.join(TYPES)}")
        return
    if s.type is not None:
        raise InvalidRequest(f"{where}: type goes with the path form only")
    if s.handle is None or s.index is None:
        raise InvalidRequest(f"{where}: give handle and index (or path and key)")
    if s.mode is not None:
        raise InvalidRequest(f"{where}: mode goes with the path form only")
    if (s.pid is None) != (s.fd is None):
        raise InvalidRequest(f"{where}: the fd form needs both pid and fd")
    if s.pid is not None and s.key is not None:
        raise InvalidRequest(f"{where}: give either key or pid and fd, not both")
    if s.pid is None and s.key is None:
        raise InvalidRequest(f"{where}: give a key, or the pid and fd it replaces")


def resolve(specs: Sequence[InheritSpec], manifest: Manifest) -> list[ResolvedMapping]:
    """Turn specs into checked (key, spec) pairs, or raise a 4xx naming every problem."""
    for i, s in enumerate(specs):
        _check_shape(i, s)
    known = manifest.all_keys()
    resolved: list[ResolvedMapping] = []
    unknown: list[str] = []
    for s in specs:
        if s.form == "fd":
            assert s.pid is not None and s.fd is not None
            key = manifest.key_of(s.pid, s.fd)
            if key is None:
                unknown.append(f"fd {s.fd} of pid {s.pid}")
                continue
        else:
            assert s.key is not None
            key = s.key
            if key not in known:
                unknown.append(key)
                continue
        resolved.append(ResolvedMapping(key=key, spec=s))
    if unknown:
        raise UnknownInheritKey(
            "not in the checkpoint's manifest (criu would silently ignore them): "
            + ", ".join(unknown),
            keys=unknown,
        )
    seen: dict[str, int] = {}
    dups: list[str] = []
    for r in resolved:
        seen[r.key] = seen.get(r.key, 0) + 1
        if seen[r.key] == 2:
            dups.append(r.key)
    if dups:
        raise DuplicateInheritKey("mapped more than once: " + ", ".join(dups), keys=dups)
    mapped = {r.key for r in resolved}
    missing = [k for k in manifest.external if k not in mapped]
    if missing:
        raise MissingInheritFd(
            "the checkpoint holds external resources that need a replacement fd: "
            + ", ".join(missing),
            keys=missing,
        )
    return resolved
