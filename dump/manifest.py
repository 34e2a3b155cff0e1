"""The dump-time manifest: what each task held, and which of it is external.

Recorded before criu runs (the /proc walk needs the tree alive) and stored
with the checkpoint.  At restore it is the reference every inherit mapping is
checked against, because criu silently ignores a key that matches nothing and
never says which external resources a restore needs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from criud.daemon.errors import InvalidRequest
from criud.dump.fds import TaskInfo


def build(tasks: Sequence[TaskInfo], declared_external: Iterable[str]) -> dict[str, Any]:
    """Build the manifest; raise InvalidRequest for a declared key the tree does not hold."""
    declared = list(dict.fromkeys(declared_external))
    held = {f["key"] for t in tasks for f in t.fds}
    unknown = [k for k in declared if k not in held]
    if unknown:
        raise InvalidRequest(
            f"external keys not held by the tree: {', '.join(unknown)}",
            keys=unknown,
        )
    declared_set = set(declared)
    external: list[str] = []
    for t in tasks:
        for f in t.fds:
            if f["key"] in declared_set:
                f["external"] = True
            if f["external"] and f["key"] not in external:
                external.append(f["key"])
    return {
        "tasks": [{"pid": t.pid, "ppid": t.ppid, "tids": t.tids, "fds": t.fds} for t in tasks],
        "external": external,
    }


def external_unix_inodes(manifest: dict[str, Any], declared: Iterable[str]) -> list[int]:
    """Inodes of unix sockets the caller declared external (for --external unix[ino])."""
    declared_set = set(declared)
    out: list[int] = []
    for t in manifest["tasks"]:
        for f in t["fds"]:
            if f["type"] == "unix" and f["key"] in declared_set and f["inode"] not in out:
                out.append(f["inode"])
    return out


def external_tty_keys(manifest: dict[str, Any]) -> list[str]:
    """Keys of pty slaves whose master is outside the tree (for --external tty[...]).

    criud passes these by itself, as it marks them: criu then dumps the
    slave as an external terminal instead of refusing it ("slave peer
    without master"), and a restore must hand a new slave in for each key.
    """
    out: list[str] = []
    for t in manifest["tasks"]:
        for f in t["fds"]:
            if f["type"] == "tty" and f["external"] and f["key"] not in out:
                out.append(str(f["key"]))
    return out


def all_keys(manifest: dict[str, Any]) -> set[str]:
    """Every key a restore may map: fds some task held, and external namespaces."""
    keys = {f["key"] for t in manifest["tasks"] for f in t["fds"]}
    keys.update(n["key"] for n in manifest.get("ext_namespaces") or ())
    return keys


def namespace_type(manifest: dict[str, Any], key: str) -> str | None:
    """The namespace type behind an external-namespace key, or None for fd keys."""
    for n in manifest.get("ext_namespaces") or ():
        if n["key"] == key:
            return str(n["type"])
    return None


def key_of(manifest: dict[str, Any], pid: int, fd: int) -> str | None:
    """The key that fd of pid held at dump time."""
    for t in manifest["tasks"]:
        if t["pid"] == pid:
            for f in t["fds"]:
                if f["fd"] == fd:
                    return str(f["key"])
    return None


def flat_fds(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """All fds of all tasks, each with its pid, for the API."""
    return [{"pid": t["pid"], **f} for t in manifest["tasks"] for f in t["fds"]]
