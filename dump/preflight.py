"""Will this dump work?  A pure judgement of an inspected tree against options.

``preflight(tree, options, features, free_bytes)`` takes the data
criud.dump.inspect.inspect_tree returned, the options a checkpoint request
carries, criu's feature probe and the free space of the images' filesystem,
and answers with what would stop criu (blockers), what deserves a word
(warnings), and which keys a restore must supply.  It does no I/O, so every
rule is unit-testable without root or criu.

Each finding names the exact option or restore mapping that resolves it and
says whether the request already does (``resolved``); a resolved blocker does
not make ``ok`` false.  Codes are shared with criud.daemon.criu_errors, so an
engine matches the same code whether preflight predicted the failure or criu
reported it.

The rules follow what criu 4.2.1 did on this machine (see
tests/unit/criu_logs/ for the logs):
- a root task that is not a session leader needs --shell-job, and so does a
  controlling pty no fd of the tree holds;
- a pty slave whose master the tree does not hold is external, like half a
  pipe: criud dumps it with ``--external tty[rdev:dev]`` and a restore maps a
  new slave to its key (not --shell-job, which would tie the restore to
  criu's own terminal);
- a connected TCP socket needs --tcp-established;
- a unix socket whose peer is outside the tree needs ``--external
  unix[ino]`` (criud passes it for keys in ``external``); ``--ext-unix-sk``
  alone covers only a datagram socket whose peer has a name, and criu
  refuses the half of a stream or seqpacket pair with it;
- any file lock held by the tree needs --file-locks;
- a deleted file larger than criu's ghost limit (1 MiB) cannot be dumped;
- a pid namespace is dumped only from its init, which must lead its session.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypedDict

from criud.dump.inspect import Memory, Task, Tree
from criud.dump.options import DumpOptions

# Above this much memfd and /dev/shm content, warn: it is all copied.
LARGE_SHM_BYTES = 64 << 20
# criu's default --ghost-limit: a deleted file above it is refused
# ("Can't dump ghost file ... increase limit"); criud does not raise it.
GHOST_LIMIT_BYTES = 1 << 20
# Per task, for the images besides memory (core, mm, fds, pagemap): a
# generous allowance so a tree of small tasks is not judged to fit too early.
TASK_OVERHEAD_BYTES = 64 << 10
# TCP states criu calls "connected" and refuses without --tcp-established.
TCP_CONNECTED = frozenset(
    {"ESTABLISHED", "SYN_SENT", "FIN_WAIT1", "FIN_WAIT2", "CLOSE_WAIT", "LAST_ACK", "CLOSING"}
)
_PTMX = ("/dev/ptmx", "/dev/pts/ptmx")
_PATH_MODES = {"r": "r", "w": "w", "rw": "r+"}


class Finding(TypedDict):
    code: str
    task: int  # the pid concerned; the root's for tree-wide findings
    fd: int | None
    key: str | None
    message: str
    # The exact option or restore mapping that resolves it.
    resolution: str
    # True when the request's options already resolve it.
    resolved: bool


class Report(TypedDict):
    ok: bool
    blockers: list[Finding]
    warnings: list[Finding]
    estimated_image_bytes: int
    free_bytes: int
    # Keys a restore must map (inherit_fds), in the order the tree holds them.
    restore_keys: list[str]


def _finding(
    code: str,
    task: int,
    message: str,
    resolution: str,
    resolved: bool = False,
    fd: int | None = None,
    key: str | None = None,
) -> Finding:
    return {
        "code": code,
        "task": task,
        "fd": fd,
        "key": key,
        "message": message,
        "resolution": resolution,
        "resolved": resolved,
    }


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _fds(tasks: Iterable[Task]) -> Iterable[tuple[Task, dict[str, Any]]]:
    for t in tasks:
        for f in t["fds"]:
            yield t, f


def _pid_namespace(tasks: list[Task]) -> list[Finding]:
    root = tasks[0]
    pid = root["pid"]
    ns = root["namespaces"].get("pid")
    inner = root["nspid"][-1] if root["nspid"] else pid
    if ns is not None and ns["differs"] and inner != 1:
        return [
            _finding(
                "pid_ns_not_rooted",
                pid,
                f"pid {pid} is pid {inner} of a pid namespace other than the daemon's; "
                "criu dumps a pid namespace only from its init (pid 1 there)",
                "checkpoint the namespace's init (its pid 1) instead",
            )
        ]
    # A session id of 0 in the task's own pid namespace means its session
    # leader lives in an ancestor namespace. criu refuses any such task, and
    # no option changes that; it also happens without a namespace of the
    # tree's own, when the daemon itself runs in one entered without setsid.
    for t in tasks:
        if t["nssid"] and t["nssid"][-1] == 0:
            return [
                _finding(
                    "pid_ns_not_rooted",
                    t["pid"],
                    f"the session leader of pid {t['pid']} is outside its pid namespace, "
                    "so criu cannot record the session",
                    "start the tree's root as a session leader (setsid), inside the namespace",
                )
            ]
    return []


def _shell_job(tasks: list[Task], opts: DumpOptions) -> list[Finding]:
    out: list[Finding] = []
    root = tasks[0]
    if root["sid"] != root["pid"]:
        # Any other task's session is led by a task of the tree or is the
        # root's: children inherit their parent's session or start their own.
        out.append(
            _finding(
                "shell_job_needed",
                root["pid"],
                f"the root task {root['pid']} is not a session leader "
                f"(its session {root['sid']} is led from outside the tree)",
                "shell_job: true",
                opts.shell_job,
            )
        )
    return out + _ctty_without_fd(tasks, opts)


def _ctty_without_fd(tasks: list[Task], opts: DumpOptions) -> list[Finding]:
    """A controlling pty that no fd of the tree holds, with its master outside.

    A pty slave the tree holds an fd of is fine either way: paired with a
    master in the tree, or external (criud passes ``--external tty[...]``
    and the restore maps a new slave to its key; see _external).  Only a
    terminal kept as nothing but the session's controlling tty leaves criu
    no fd to restore it by.
    """
    held = {str(f["target"]) for _, f in _fds(tasks) if f["type"] == "tty"}
    if held & set(_PTMX):
        # One master in the tree is taken to serve the session's terminal.
        return []
    for t in tasks:
        tty = t["tty"]
        name = str(tty["name"] or "") if tty else ""
        if not name.startswith("pts/") or f"/dev/{name}" in held:
            continue
        return [
            _finding(
                "shell_job_needed",
                t["pid"],
                f"pid {t['pid']} has the pty {name} as its controlling tty, but no fd of "
                "the tree holds it and its master is outside the tree",
                "shell_job: true",
                opts.shell_job,
            )
        ]
    return []


def _sockets(tasks: list[Task], opts: DumpOptions) -> list[Finding]:
    out: list[Finding] = []
    declared = set(opts.external)
    for t, f in _fds(tasks):
        key = str(f["key"])
        if f["type"] == "tcp" and f.get("state") in TCP_CONNECTED:
            out.append(
                _finding(
                    "tcp_established_needed",
                    t["pid"],
                    f"fd {f['fd']} of pid {t['pid']} is a {f['state']} TCP connection "
                    f"{f.get('local')} -> {f.get('remote')}",
                    "tcp_established: true",
                    opts.tcp_established,
                    fd=f["fd"],
                    key=key,
                )
            )
        elif f["type"] == "unix" and f.get("external"):
            named_dgram = f.get("sock_type") == "dgram" and bool(f.get("remote"))
            ext = json.dumps([key])
            if named_dgram:
                resolution = f"ext_unix_sk: true or external: {ext}"
                resolved = key in declared or opts.ext_unix_sk
            else:
                resolution = f"external: {ext}"
                resolved = key in declared
            kind = f.get("sock_type") or "unix"
            peer = f" {f['remote']}" if f.get("remote") else ""
            out.append(
                _finding(
                    "external_unix_socket",
                    t["pid"],
                    f"fd {f['fd']} of pid {t['pid']} is a {kind} unix socket whose peer "
                    f"(socket:[{f.get('peer')}]{peer}) is outside the tree",
                    resolution,
                    resolved,
                    fd=f["fd"],
                    key=key,
                )
            )
    return out


def _locks(tree: Tree, opts: DumpOptions) -> list[Finding]:
    return [
        _finding(
            "file_locks_needed",
            lk["pid"],
            f"pid {lk['pid']} holds a {lk['type']} {lk['mode']} lock on "
            + (f"{lk['key']} (fd {lk['fd']})" if lk["fd"] is not None else f"file {lk['id']}"),
            "file_locks: true",
            opts.file_locks,
            fd=lk["fd"],
            key=lk["key"],
        )
        for lk in tree["locks"]
    ]


def _external_fd(t: Task, f: dict[str, Any], key: str, declared: set[str]) -> Finding:
    """The warning for one external fd: what replaces it at restore, in inherit_fds' form."""
    mapping: dict[str, object]
    if f["type"] in ("file", "dir", "device"):
        # The path form needs no fd passing; its modes are r, w, a, r+.
        mode = "a" if f.get("append") else _PATH_MODES.get(str(f.get("mode")), "r")
        mapping = {"key": key, "path": "/" + key, "mode": mode}
    elif f["type"] == "fifo":
        # A FIFO opens by path once the engine holds its other end.
        mode = "r" if f.get("mode") == "r" else "w"
        mapping = {"key": key, "path": "/" + key, "mode": mode, "type": "fifo"}
    else:
        mapping = {"key": key, "handle": "<handle>", "index": 0}
    if key in declared and not f.get("external"):
        why = "declared external"
    elif f["type"] == "tty":
        why = (
            "a pty slave whose master is outside the tree (criud dumps it with "
            "--external); a new pty slave handed over the fd socket replaces it, and "
            "the engine sets the window size on its new master"
        )
    else:
        why = "its other end is outside the tree"
    return _finding(
        "external_resource",
        t["pid"],
        f"fd {f['fd']} of pid {t['pid']} ({f['type']} {key}): {why}; "
        "a restore must supply a replacement",
        f"inherit_fds: {json.dumps(mapping)}",
        True,  # the dump needs nothing more; the restore does
        fd=f["fd"],
        key=key,
    )


def _external(tree: Tree, opts: DumpOptions) -> tuple[list[Finding], list[Finding], list[str]]:
    """(blockers, warnings, restore keys) for resources a restore must supply."""
    tasks = tree["tasks"]
    held = {str(f["key"]) for _, f in _fds(tasks)}
    blockers = [
        _finding(
            "unknown_external_key",
            tree["root"],
            f"external names {k!r}, which no fd of the tree holds",
            f"remove {json.dumps(k)} from external",
            key=k,
        )
        for k in dict.fromkeys(opts.external)
        if k not in held
    ]
    declared = set(opts.external)
    keys: list[str] = []
    warnings: list[Finding] = []
    for t, f in _fds(tasks):
        key = str(f["key"])
        if not (f.get("external") or key in declared) or key in keys:
            continue
        keys.append(key)
        if f["type"] == "unix":
            continue  # judged (and reported) with the sockets
        warnings.append(_external_fd(t, f, key, declared))
    # Namespaces left out of the image (external_namespaces): the restore
    # must hand in an fd of a namespace of that type for each key.
    for ns_type, key in opts.external_namespaces:
        if key in keys:
            continue
        keys.append(key)
        mapping = {"key": key, "handle": "<handle>", "index": 0}
        warnings.append(
            _finding(
                "external_resource",
                tree["root"],
                f"the {ns_type} namespace is declared external as {key!r}; a restore must "
                f"hand in an fd of a {ns_type} namespace for it",
                f"inherit_fds: {json.dumps(mapping)}",
                True,
                key=key,
            )
        )
    return blockers, warnings, keys


def _files(tasks: list[Task]) -> tuple[list[Finding], list[Finding], int]:
    """(blockers, warnings, ghost bytes) for deleted-but-open files."""
    blockers: list[Finding] = []
    warnings: list[Finding] = []
    seen: set[tuple[str, object]] = set()
    ghost = 0
    for t, f in _fds(tasks):
        if f["type"] != "deleted" or (f["key"], f.get("inode")) in seen:
            continue
        seen.add((f["key"], f.get("inode")))
        size = int(f.get("size") or 0)
        where = f"fd {f['fd']} of pid {t['pid']}"
        if size > GHOST_LIMIT_BYTES:
            blockers.append(
                _finding(
                    "ghost_file_too_big",
                    t["pid"],
                    f"{where} is a deleted file of {_mib(size)}; criu copies deleted files "
                    f"only up to {_mib(GHOST_LIMIT_BYTES)}",
                    "no criud option: close the file, or truncate it below 1 MiB",
                    fd=f["fd"],
                    key=str(f["key"]),
                )
            )
            continue
        ghost += size
        warnings.append(
            _finding(
                "deleted_file",
                t["pid"],
                f"{where} is a deleted file ({size} bytes): its contents go into the image "
                "and come back as a new, unlinked file",
                "none needed",
                True,
                fd=f["fd"],
                key=str(f["key"]),
            )
        )
    return blockers, warnings, ghost


def _shm(tree: Tree) -> list[Finding]:
    held = sum(s["bytes"] for s in tree["shm"])
    biggest = max(tree["tasks"], key=lambda t: t["memory"]["shmem"])
    resident = biggest["memory"]["shmem"]
    if max(held, resident) <= LARGE_SHM_BYTES:
        return []
    if held >= resident:
        what = f"the tree holds {_mib(held)} of memfd and /dev/shm files open"
        task = tree["shm"][0]["pids"][0] if tree["shm"] else tree["root"]
    else:
        what = f"pid {biggest['pid']} maps {_mib(resident)} of shared memory"
        task = biggest["pid"]
    return [
        _finding(
            "large_shm",
            task,
            f"{what}; all of it is copied into the image",
            "none needed: expect a larger, slower dump",
            True,
        )
    ]


def estimate_image_bytes(tree: Tree, ghost_bytes: int = 0) -> int:
    """Bytes a dump of tree is expected to write: private RSS + shmem per task, and more.

    Shared memory is counted in each task that maps it, so this leans high.
    """
    return estimate_from_memory([t["memory"] for t in tree["tasks"]], ghost_bytes)


def dumped_memory(memories: Sequence[Memory]) -> int:
    """Bytes of memory a dump copies into pages images: private RSS + shmem per task."""
    return sum(m["private"] + m["shmem"] for m in memories)


def estimate_from_memory(memories: Sequence[Memory], ghost_bytes: int = 0) -> int:
    """estimate_image_bytes from the tasks' memory figures alone (one Memory per task)."""
    return dumped_memory(memories) + ghost_bytes + TASK_OVERHEAD_BYTES * len(memories)


def preflight(
    tree: Tree,
    options: DumpOptions,
    features: Mapping[str, bool],
    free_bytes: int,
    pre_dump: bool = False,
) -> Report:
    """Judge whether criu can dump tree with options; no I/O."""
    tasks = tree["tasks"]
    if not tasks:
        raise ValueError("an inspected tree has at least its root task")
    root = tasks[0]
    blockers: list[Finding] = []
    warnings: list[Finding] = []

    blockers += _pid_namespace(tasks)
    blockers += _shell_job(tasks, options)
    blockers += _sockets(tasks, options)
    blockers += _locks(tree, options)
    ext_blockers, ext_warnings, restore_keys = _external(tree, options)
    blockers += ext_blockers
    warnings += ext_warnings
    file_blockers, file_warnings, ghost = _files(tasks)
    blockers += file_blockers
    warnings += file_warnings
    warnings += _shm(tree)

    if pre_dump and not features.get("mem_dirty_track", False):
        blockers.append(
            _finding(
                "mem_dirty_track_missing",
                root["pid"],
                "a pre-dump needs the kernel's soft-dirty page tracking, which "
                "`criu check --feature mem_dirty_track` says this kernel lacks",
                "none on this kernel: take a full dump (pre_dump: false)",
            )
        )

    estimate = estimate_image_bytes(tree, ghost)
    if estimate > free_bytes:
        blockers.append(
            _finding(
                "no_space",
                root["pid"],
                f"the images need about {_mib(estimate)}; the state dir's filesystem has "
                f"{_mib(free_bytes)} free",
                f"free at least {_mib(estimate - free_bytes)} in the state dir's filesystem",
            )
        )

    return {
        "ok": all(b["resolved"] for b in blockers),
        "blockers": blockers,
        "warnings": warnings,
        "estimated_image_bytes": estimate,
        "free_bytes": free_bytes,
        "restore_keys": restore_keys,
    }
