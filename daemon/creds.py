"""Who a tree runs as, and the credentials criu must run with to dump it.

Every id of every task counts: real, effective, saved and filesystem uid and
gid, and the supplementary groups.  A saved uid of 0 lets a task become root
again; a setgid task holds a group its owner may not be in.  Dumping such a
tree "as its owner" and restoring it would hand those ids back to whoever
restores it, so a tree whose ids are mixed is refused before anything is
frozen or recorded.

Why criu runs as the owner at all: where root lacks CAP_SYS_RESOURCE, root's
criu cannot read another uid's rlimits (prlimit demands that the caller's
uid and gid match the target's real, effective and saved ones), so a user's
tree is dumped and restored by criu running as that uid and gid with
--unprivileged.  That criu has no CAP_SETGID either, so it must already hold
exactly the tree's groups: its restorer then skips setgroups.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

from criud.daemon.caller import Caller
from criud.daemon.criu import RunAs
from criud.daemon.errors import MixedCredentials, NeedsCapSysResource, PermissionDenied
from criud.dump.fds import tree_pids

# The order /proc/<pid>/status lists ids in.
ID_ORDER = "real/effective/saved/fs"


@dataclasses.dataclass(frozen=True)
class TaskCreds:
    """The ids of one task, as /proc/<pid>/task/<tid>/status shows them."""

    uids: tuple[int, ...]
    gids: tuple[int, ...]
    groups: tuple[int, ...]

    @property
    def one_id(self) -> bool:
        """One uid in all four slots, and one gid in all four."""
        return len(set(self.uids)) == 1 and len(set(self.gids)) == 1


def parse_status(text: str) -> TaskCreds:
    """The Uid:, Gid: and Groups: lines of a status file."""
    fields: dict[str, tuple[int, ...]] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("Uid", "Gid", "Groups"):
            fields[key] = tuple(int(x) for x in rest.split())
    if len(fields.get("Uid", ())) != 4 or len(fields.get("Gid", ())) != 4:
        raise ValueError("status without four uids and four gids")
    return TaskCreds(fields["Uid"], fields["Gid"], tuple(sorted(fields.get("Groups", ()))))


def read_tree(pid: int) -> dict[int, TaskCreds]:
    """The ids of every thread of every process in the tree of pid, by tid.

    Threads too: a raw setresuid(2) changes only the calling thread, and
    criu dumps and restores credentials per thread.  Tasks that exit while
    we read are skipped (criu will not see them either).
    """
    # Not psutil: its uids() and gids() stop at the saved ids and it reads no
    # Groups:, both part of the check; and x3.3-4.9 (bench/proc_readers.py, tree_creds).
    out: dict[int, TaskCreds] = {}
    for p in tree_pids(pid):
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{p}/task/{tid}/status", encoding="ascii") as f:
                    out[int(tid)] = parse_status(f.read())
            except (OSError, ValueError):
                continue
    return out


def _ids(c: TaskCreds) -> str:
    return f"uids {'/'.join(map(str, c.uids))} and gids {'/'.join(map(str, c.gids))}"


def _mixed_ids(creds: Mapping[int, TaskCreds]) -> tuple[str, dict[str, Any]] | None:
    """Why the tree does not hold one uid and one gid throughout (None: it does)."""
    for tid, c in creds.items():
        if not c.one_id:
            why = f"pid {tid} holds {_ids(c)} ({ID_ORDER}), not one uid and one gid"
            return why, {"pid": tid, "uids": list(c.uids), "gids": list(c.gids)}
    by_ids = {(c.uids[0], c.gids[0]): tid for tid, c in creds.items()}
    if len(by_ids) > 1:
        (a, ta), (b, tb) = list(by_ids.items())[:2]
        why = f"pid {ta} runs as uid {a[0]} gid {a[1]}, pid {tb} as uid {b[0]} gid {b[1]}"
        return why, {"pids": [ta, tb]}
    return None


def _mixed_groups(creds: Mapping[int, TaskCreds]) -> tuple[str, dict[str, Any]] | None:
    """Why the tree does not hold one list of supplementary groups (None: it does)."""
    by_groups = {c.groups: tid for tid, c in creds.items()}
    if len(by_groups) > 1:
        (ga, ta), (gb, tb) = list(by_groups.items())[:2]
        why = f"pid {ta} holds groups {list(ga)}, pid {tb} groups {list(gb)}"
        return why, {"pids": [ta, tb]}
    return None


def check_owner(uids: Mapping[int, Sequence[int]], caller: Caller, what: str) -> None:
    """A non-root caller may act only on trees that run as itself (every uid recorded)."""
    if caller.is_root:
        return
    for p, ids in uids.items():
        if any(u != caller.uid for u in ids):
            raise PermissionDenied(
                f"{what}: pid {p} runs as uid {'/'.join(map(str, ids))}, not {caller.uid}",
                pid=int(p),
            )


def choose_run_as(
    creds: Mapping[int, TaskCreds], caller: Caller, root_can_dump_any: bool, what: str
) -> RunAs | None:
    """Check a tree's ids against the caller; return what criu runs as (None: root).

    Refuses (before anything is frozen) a non-root caller's tree that is not
    wholly its own, or whose ids are mixed; and any tree that would need
    root's criu where root cannot dump it (no CAP_SYS_RESOURCE).
    """
    if not caller.is_root:
        # A task that holds none of the caller's uid is someone else's.
        for tid, c in creds.items():
            if caller.uid not in c.uids:
                ids = "/".join(map(str, c.uids))
                raise PermissionDenied(
                    f"{what}: pid {tid} runs as uid {ids}, not {caller.uid}", pid=tid
                )
        mixed = _mixed_ids(creds)
        if mixed is not None:
            raise MixedCredentials(f"{what}: {mixed[0]}", **mixed[1])
    if root_can_dump_any:
        return None
    if caller.is_root and roots_own(creds):
        return None
    mixed = _mixed_ids(creds) or _mixed_groups(creds)
    if mixed is None and creds:
        c = next(iter(creds.values()))
        if c.uids[0] != 0:
            return RunAs(uid=c.uids[0], gid=c.gids[0], groups=c.groups)
        mixed = (f"it runs as uid 0 with gid {c.gids[0]}, not the daemon's", {})
    why, extra = mixed or ("it has no tasks left", {})
    if not caller.is_root:
        # The caller's own ids, but its tasks' groups differ: criu as the
        # owner cannot give each task its own list back.
        raise MixedCredentials(f"{what}: {why}", **extra)
    raise NeedsCapSysResource(
        f"{what}: only root's criu could dump this tree, and root lacks CAP_SYS_RESOURCE "
        f"here; criu cannot run as the tree's owner instead because {why}",
        **extra,
    )


def roots_own(creds: Mapping[int, TaskCreds]) -> bool:
    """Every id of every task is the daemon's own: root's criu dumps it as before."""
    me = ({os.getuid()}, {os.getgid()})
    return all((set(c.uids), set(c.gids)) == me for c in creds.values())


def run_as_of(saved: Sequence[Any] | None) -> RunAs | None:
    """The credentials a checkpoint's criu ran with (its manifest's run_as), for its restore."""
    if not saved:
        return None
    # Checkpoints of the previous release recorded [uid, gid] only: their
    # criu ran with cleared groups, so restore them as before (a tree that
    # had groups fails there as it always did).
    groups = tuple(int(g) for g in saved[2]) if len(saved) > 2 else ()
    return RunAs(uid=int(saved[0]), gid=int(saved[1]), groups=groups)


def to_manifest(creds: Mapping[int, TaskCreds], run_as: RunAs | None) -> dict[str, Any]:
    """The manifest's fields (criud.dump.manifest.Manifest) for a tree's ids and criu's."""
    groups = {c.groups for c in creds.values()}
    return {
        "uids": {str(t): tuple(c.uids) for t, c in creds.items()},
        "gids": {str(t): tuple(c.gids) for t, c in creds.items()},
        "groups": tuple(groups.pop()) if len(groups) == 1 else None,
        "run_as": (run_as.uid, run_as.gid, list(run_as.groups)) if run_as else None,
    }
