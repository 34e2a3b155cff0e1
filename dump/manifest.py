"""The dump-time manifest: what each task held, and which of it is external.

Recorded before criu runs (the /proc walk needs the tree alive) and stored
with the checkpoint.  At restore it is the reference every inherit mapping is
checked against, because criu silently ignores a key that matches nothing and
never says which external resources a restore needs.

`Manifest` is typed and frozen: the checkpoint job builds it whole, the store
keeps its JSON (`to_json`), and everything that reads it back (the restore
job, the API) goes through `from_json`, which also reads the rows earlier
releases wrote (keys missing, run_as as [uid, gid]).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from criud.daemon.errors import InvalidRequest, ManifestInvalid
from criud.dump.fds import TaskInfo


def _int(v: Any) -> int:
    # bool is an int to Python, and never a pid, fd or id.
    if not isinstance(v, int) or isinstance(v, bool):
        raise TypeError(f"{v!r} is not an integer")
    return v


def _ints(v: Any) -> tuple[int, ...]:
    if not isinstance(v, (list, tuple)):
        raise TypeError(f"{v!r} is not a list")
    return tuple(_int(x) for x in v)


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise TypeError(f"{v!r} is not a string")
    return v


def _strs(v: Any) -> tuple[str, ...]:
    if not isinstance(v, (list, tuple)):
        raise TypeError(f"{v!r} is not a list")
    return tuple(_str(x) for x in v)


def _opt_str(v: Any) -> str | None:
    return None if v is None else _str(v)


def _opt_mapping(v: Any) -> Mapping[str, Any] | None:
    if v is not None and not isinstance(v, Mapping):
        raise TypeError("oci is not an object")
    return v


def _run_as(v: Any) -> tuple[Any, ...]:
    """[uid, gid] or [uid, gid, groups], each an integer (criud.daemon.creds.run_as_of)."""
    if not isinstance(v, (list, tuple)) or len(v) not in (2, 3):
        raise ValueError(f"run_as {v!r} is not [uid, gid, groups]")
    return (_int(v[0]), _int(v[1]), *([list(_ints(v[2]))] if len(v) == 3 else []))


# What an fd record must hold (criud.dump.fds), and what it may, each with its type.
_FD_NEEDS = {"fd": int, "type": str, "key": str}
_FD_MAY = {"mode": str, "target": str, "external": bool, "append": bool, "inode": int, "peer": int}


def _fd(f: Any) -> dict[str, Any]:
    """One fd record, its fields checked (the API and the restore index them)."""
    if not isinstance(f, dict):
        raise TypeError("an fd record is not an object")
    for field, kind in (*_FD_NEEDS.items(), *_FD_MAY.items()):
        v = f.get(field)
        if v is None and field in _FD_MAY:
            continue
        if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
            raise TypeError(f"fd record field {field!r} is {v!r}, not a {kind.__name__}")
    # Readers index "external" (records of every release carry it).
    return f if "external" in f else {**f, "external": False}


@dataclasses.dataclass(frozen=True)
class Task:
    """One task as the dump saw it; fds are criud.dump.fds records (key, type, ...)."""

    pid: int
    ppid: int
    tids: tuple[int, ...]
    fds: tuple[dict[str, Any], ...]


@dataclasses.dataclass(frozen=True)
class ExtNamespace:
    """A namespace the caller left out of the dump, to be handed in at restore."""

    type: str
    key: str
    ino: int


@dataclasses.dataclass(frozen=True)
class Manifest:
    """Everything a checkpoint records about its tree besides criu's images."""

    tasks: tuple[Task, ...] = ()
    # Keys a restore must replace: external fds, then external namespaces.
    external: tuple[str, ...] = ()
    pids: tuple[int, ...] = ()
    # Per tid (as a string, JSON's keys): the four uids and the four gids.
    uids: Mapping[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    gids: Mapping[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    groups: tuple[int, ...] | None = None
    # What criu ran as, as stored ([uid, gid, groups], or [uid, gid] from the
    # previous release); criud.daemon.creds.run_as_of reads every form.
    run_as: tuple[Any, ...] | None = None
    # Namespaces of the tree's root that differ from the daemon's: type -> inode.
    namespaces: Mapping[str, int] = dataclasses.field(default_factory=dict)
    pidns_init: bool = False
    network_lock: str | None = None
    ext_namespaces: tuple[ExtNamespace, ...] = ()
    # criud.dump.oci's record of the container's bundle, for OCI checkpoints.
    oci: Mapping[str, Any] | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> Manifest:
        """Read a stored manifest (any release's); None reads as an empty one.

        Also reads a hostile one (an imported archive's criud.json): any
        field of the wrong shape is a ManifestInvalid (422), never a crash.
        """
        try:
            return cls._from_json(data or {})
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ManifestInvalid(f"the manifest is malformed: {type(e).__name__}: {e}") from None

    @classmethod
    def _from_json(cls, d: Mapping[str, Any]) -> Manifest:
        if not isinstance(d, Mapping):
            raise TypeError("not an object")
        tasks = tuple(
            Task(
                pid=_int(t["pid"]),
                ppid=_int(t.get("ppid") or 0),
                tids=_ints(t.get("tids") or ()),
                fds=tuple(_fd(f) for f in t.get("fds") or ()),
            )
            for t in d.get("tasks") or ()
        )
        return cls(
            tasks=tasks,
            external=_strs(d.get("external") or ()),
            pids=_ints(d.get("pids") or ()),
            uids={str(k): _ints(v) for k, v in (d.get("uids") or {}).items()},
            gids={str(k): _ints(v) for k, v in (d.get("gids") or {}).items()},
            groups=_ints(d["groups"]) if d.get("groups") is not None else None,
            run_as=_run_as(d["run_as"]) if d.get("run_as") else None,
            namespaces={str(k): _int(v) for k, v in (d.get("namespaces") or {}).items()},
            pidns_init=bool(d.get("pidns_init")),
            network_lock=_opt_str(d.get("network_lock")),
            ext_namespaces=tuple(
                ExtNamespace(type=_str(n["type"]), key=_str(n["key"]), ino=_int(n["ino"]))
                for n in d.get("ext_namespaces") or ()
            ),
            oci=_opt_mapping(d.get("oci")),
        )

    def to_json(self) -> dict[str, Any]:
        """The stored form (the keys earlier releases wrote, so from_json reads both)."""
        return {
            "tasks": [
                {"pid": t.pid, "ppid": t.ppid, "tids": list(t.tids), "fds": list(t.fds)}
                for t in self.tasks
            ],
            "external": list(self.external),
            "pids": list(self.pids),
            "uids": {k: list(v) for k, v in self.uids.items()},
            "gids": {k: list(v) for k, v in self.gids.items()},
            "groups": list(self.groups) if self.groups is not None else None,
            "run_as": list(self.run_as) if self.run_as is not None else None,
            "namespaces": dict(self.namespaces),
            "pidns_init": self.pidns_init,
            "network_lock": self.network_lock,
            "ext_namespaces": [dataclasses.asdict(n) for n in self.ext_namespaces],
            **({"oci": dict(self.oci)} if self.oci is not None else {}),
        }

    def all_keys(self) -> set[str]:
        """Every key a restore may map: fds some task held, and external namespaces."""
        keys = {f["key"] for t in self.tasks for f in t.fds}
        keys.update(n.key for n in self.ext_namespaces)
        return keys

    def namespace_type(self, key: str) -> str | None:
        """The namespace type behind an external-namespace key, or None for fd keys."""
        for n in self.ext_namespaces:
            if n.key == key:
                return n.type
        return None

    def key_of(self, pid: int, fd: int) -> str | None:
        """The key that fd of pid held at dump time."""
        for t in self.tasks:
            if t.pid == pid:
                for f in t.fds:
                    if f["fd"] == fd:
                        return str(f["key"])
        return None

    def flat_fds(self) -> list[dict[str, Any]]:
        """All fds of all tasks, each with its pid, for the API."""
        return [{"pid": t.pid, **f} for t in self.tasks for f in t.fds]

    def fd_summary(self) -> dict[str, Any]:
        """The fds in short, for the API: counts by type, and the external ones in full."""
        return _summary(len(self.tasks), ((t.pid, t.fds) for t in self.tasks), _fd)

    def external_unix_inodes(self, declared: Iterable[str]) -> list[int]:
        """Inodes of unix sockets the caller declared external (for --external unix[ino])."""
        declared_set = set(declared)
        out: list[int] = []
        for t in self.tasks:
            for f in t.fds:
                if f["type"] == "unix" and f["key"] in declared_set and f["inode"] not in out:
                    out.append(f["inode"])
        return out

    def external_tty_keys(self) -> list[str]:
        """Keys of pty slaves whose master is outside the tree (for --external tty[...]).

        criud passes these by itself, as it marks them: criu then dumps the
        slave as an external terminal instead of refusing it ("slave peer
        without master"), and a restore must hand a new slave in for each key.
        """
        out: list[str] = []
        for t in self.tasks:
            for f in t.fds:
                if f["type"] == "tty" and f["external"] and f["key"] not in out:
                    out.append(str(f["key"]))
        return out


def summarize(data: Mapping[str, Any] | None) -> dict[str, Any]:
    """Manifest.fd_summary of a stored manifest, without reading all of it.

    A checkpoint's answer needs the counts and the external fds only: each
    fd's type and external flag are checked here, the external ones in full
    (as from_json would), so a malformed manifest is a ManifestInvalid all
    the same, and 10,000 fds cost a loop instead of 10,000 checked records.
    """
    try:
        tasks = (data or {}).get("tasks") or ()
        if not isinstance(tasks, (list, tuple)):
            raise TypeError("tasks is not a list")
        per_task = ((_int(t["pid"]), t.get("fds") or ()) for t in tasks)
        return _summary(len(tasks), per_task, _fd)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ManifestInvalid(f"the manifest is malformed: {type(e).__name__}: {e}") from None


def _summary(
    ntasks: int,
    per_task: Iterable[tuple[int, Iterable[Any]]],
    check: Callable[[Any], dict[str, Any]],
) -> dict[str, Any]:
    by_type: dict[str, int] = {}
    external: list[dict[str, Any]] = []
    for pid, fds in per_task:
        for f in fds:
            kind = f["type"]
            if not isinstance(kind, str):
                raise TypeError(f"fd record field 'type' is {kind!r}, not a str")
            by_type[kind] = by_type.get(kind, 0) + 1
            if f.get("external"):
                external.append({"pid": pid, **check(f)})
    return {
        "total": sum(by_type.values()),
        "tasks": ntasks,
        "by_type": by_type,
        "external_fds": external,
    }


def build(tasks: Sequence[TaskInfo], declared_external: Iterable[str]) -> Manifest:
    """The fd part of the manifest; InvalidRequest for a declared key the tree does not hold."""
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
    return Manifest(
        tasks=tuple(Task(t.pid, t.ppid, tuple(t.tids), tuple(t.fds)) for t in tasks),
        external=tuple(external),
    )
