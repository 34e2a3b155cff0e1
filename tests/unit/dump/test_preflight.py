"""criud.dump.preflight: judging an inspected tree against dump options (pure)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from criud.dump.inspect import Lock, Shm, Task, Tree
from criud.dump.options import DumpOptions
from criud.dump.preflight import (
    GHOST_LIMIT_BYTES,
    LARGE_SHM_BYTES,
    TASK_OVERHEAD_BYTES,
    Finding,
    Report,
    estimate_image_bytes,
    preflight,
)

MiB = 1 << 20
PLENTY = 1 << 40
FEATURES = {"mem_dirty_track": False, "network_lock_nftables": True}


def fd(n: int, type_: str, key: str, **kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "fd": n,
        "type": type_,
        "key": key,
        "mode": "rw",
        "target": key if ":" in key and not key.startswith("tty[") else "/" + key,
        "inode": None,
        "append": False,
        "external": False,
        "peer": None,
        "size": None,
        "sock_type": None,
        "state": None,
        "local": None,
        "remote": None,
        "locks": (),
    }
    base.update(kw)
    return base


def task(
    pid: int = 100,
    *,
    ppid: int = 1,
    sid: int | None = None,
    fds: list[dict[str, Any]] | None = None,
    nspid: list[int] | None = None,
    nssid: list[int] | None = None,
    pidns_differs: bool = False,
    tty: str | None = None,
    private: int = MiB,
    shmem: int = 0,
) -> Task:
    sid = pid if sid is None else sid
    return {
        "pid": pid,
        "ppid": ppid,
        "comm": "t",
        "cmdline": ["t"],
        "state": "S",
        "uids": {"real": 0, "effective": 0, "saved": 0, "fs": 0},
        "gids": {"real": 0, "effective": 0, "saved": 0, "fs": 0},
        "threads": {"count": 1, "tids": [pid]},
        "sid": sid,
        "pgid": sid,
        "nspid": nspid or [pid],
        "nssid": nssid or [sid],
        "tty": {"nr": 34816, "major": 136, "minor": 0, "name": tty} if tty else None,
        "namespaces": {
            "pid": {"id": 2 if pidns_differs else 1, "differs": pidns_differs},
            "net": {"id": 3, "differs": False},
        },
        "cgroup": ["0::/"],
        "memory": {
            "rss": private + shmem + MiB,
            "shared": shmem + MiB,
            "private": private,
            "shmem": shmem,
        },
        "fds": fds or [],
        "redacted": False,
    }


def tree(*tasks: Task, locks: list[Lock] | None = None, shm: list[Shm] | None = None) -> Tree:
    external: list[str] = []
    for t in tasks:
        for f in t["fds"]:
            if f["external"] and f["key"] not in external:
                external.append(f["key"])
    return {
        "root": tasks[0]["pid"],
        "tasks": list(tasks),
        "external": external,
        "locks": locks or [],
        "shm": shm or [],
    }


def run(t: Tree, free: int = PLENTY, pre_dump: bool = False, **opts: Any) -> Report:
    return preflight(t, DumpOptions(**opts), FEATURES, free, pre_dump=pre_dump)


def codes(items: list[Finding]) -> list[str]:
    return [i["code"] for i in items]


def only(items: list[Finding], code: str) -> Finding:
    found = [i for i in items if i["code"] == code]
    assert len(found) == 1, items
    return found[0]


# -- a clean tree -----------------------------------------------------------------


def test_clean_tree_is_ok() -> None:
    r = run(tree(task(fds=[fd(0, "device", "dev/null")])))
    assert r["ok"] is True
    assert r["blockers"] == [] and r["warnings"] == [] and r["restore_keys"] == []
    assert r["free_bytes"] == PLENTY
    assert r["estimated_image_bytes"] == MiB + TASK_OVERHEAD_BYTES


def test_report_is_json_and_findings_have_every_field() -> None:
    r = run(tree(task(sid=1)))
    assert json.loads(json.dumps(r)) == r
    (b,) = r["blockers"]
    assert set(b) == {"code", "task", "fd", "key", "message", "resolution", "resolved"}


def test_empty_tree_is_refused() -> None:
    with pytest.raises(ValueError):
        preflight(
            {"root": 1, "tasks": [], "external": [], "locks": [], "shm": []},
            DumpOptions(),
            FEATURES,
            PLENTY,
        )


# -- TCP --------------------------------------------------------------------------


@pytest.mark.parametrize("state", ["ESTABLISHED", "CLOSE_WAIT", "SYN_SENT", "FIN_WAIT1"])
def test_connected_tcp_needs_tcp_established(state: str) -> None:
    t = tree(
        task(
            fds=[fd(3, "tcp", "socket:[7]", state=state, local="127.0.0.1:1", remote="127.0.0.1:2")]
        )
    )
    r = run(t)
    b = only(r["blockers"], "tcp_established_needed")
    assert (b["task"], b["fd"], b["key"], b["resolved"]) == (100, 3, "socket:[7]", False)
    assert b["resolution"] == "tcp_established: true"
    assert "127.0.0.1:1 -> 127.0.0.1:2" in b["message"]
    assert r["ok"] is False
    r = run(t, tcp_established=True)
    assert only(r["blockers"], "tcp_established_needed")["resolved"] is True
    assert r["ok"] is True


@pytest.mark.parametrize(
    ("type_", "state"), [("tcp", "LISTEN"), ("tcp", "CLOSE"), ("udp", "ESTABLISHED")]
)
def test_listening_closed_and_udp_sockets_are_fine(type_: str, state: str) -> None:
    assert run(tree(task(fds=[fd(3, type_, "socket:[7]", state=state)])))["ok"] is True


# -- unix sockets -----------------------------------------------------------------


def test_external_stream_socket_needs_external_not_ext_unix_sk() -> None:
    sock = fd(4, "unix", "socket:[20]", external=True, peer=21, sock_type="stream")
    t = tree(task(fds=[sock]))
    b = only(run(t)["blockers"], "external_unix_socket")
    assert b["resolution"] == 'external: ["socket:[20]"]'
    assert (b["fd"], b["key"], b["resolved"]) == (4, "socket:[20]", False)
    # criu refuses a stream half even with --ext-unix-sk (measured).
    assert run(t, ext_unix_sk=True)["ok"] is False
    r = run(t, external=("socket:[20]",))
    assert r["ok"] is True
    assert only(r["blockers"], "external_unix_socket")["resolved"] is True
    assert r["restore_keys"] == ["socket:[20]"]


def test_external_named_dgram_socket_takes_either_option() -> None:
    sock = fd(
        4, "unix", "socket:[20]", external=True, peer=21, sock_type="dgram", remote="/dev/log"
    )
    t = tree(task(fds=[sock]))
    b = only(run(t)["blockers"], "external_unix_socket")
    assert b["resolution"] == 'ext_unix_sk: true or external: ["socket:[20]"]'
    assert "/dev/log" in b["message"]
    assert run(t, ext_unix_sk=True)["ok"] is True
    assert run(t, external=("socket:[20]",))["ok"] is True


def test_nameless_dgram_socket_needs_external() -> None:
    sock = fd(4, "unix", "socket:[20]", external=True, peer=21, sock_type="dgram")
    t = tree(task(fds=[sock]))
    assert run(t, ext_unix_sk=True)["ok"] is False


def test_internal_and_unconnected_unix_sockets_are_fine() -> None:
    t = tree(
        task(
            fds=[
                fd(3, "unix", "socket:[1]", peer=2, sock_type="stream"),
                fd(4, "unix", "socket:[2]", peer=1, sock_type="stream"),
                fd(5, "unix", "socket:[3]", sock_type="stream", state="LISTEN", local="/run/x"),
            ]
        )
    )
    assert run(t)["ok"] is True


# -- sessions and terminals -------------------------------------------------------


def test_root_not_session_leader_needs_shell_job() -> None:
    t = tree(task(100, sid=50))
    b = only(run(t)["blockers"], "shell_job_needed")
    assert (b["task"], b["resolution"], b["resolved"]) == (100, "shell_job: true", False)
    assert "session 50" in b["message"]
    assert run(t, shell_job=True)["ok"] is True


def test_children_in_the_roots_session_are_fine() -> None:
    assert run(tree(task(100), task(101, ppid=100, sid=100)))["ok"] is True


def test_pty_slave_with_its_master_outside_is_external_not_shell_job() -> None:
    # An engine's terminal: criud dumps the slave with --external tty[...] and
    # a restore maps a new slave to its key.  shell_job is not the fix.
    slave = fd(0, "tty", "tty[8800:19]", target="/dev/pts/0", external=True, pty=0)
    t = tree(task(100, tty="pts/0", fds=[slave]), task(101, ppid=100, sid=100, fds=[dict(slave)]))
    report = run(t)
    assert report["ok"] is True and report["blockers"] == []
    assert report["restore_keys"] == ["tty[8800:19]"]
    (w,) = [w for w in report["warnings"] if w["code"] == "external_resource"]
    assert (w["task"], w["fd"], w["key"]) == (100, 0, "tty[8800:19]")
    assert "shell_job" not in w["resolution"]
    assert '"key": "tty[8800:19]", "handle": "<handle>"' in w["resolution"]
    assert "window size" in w["message"]


def test_external_fifo_suggests_the_path_form() -> None:
    out = fd(1, "fifo", "run/engine/c1-stdout", mode="w", external=True)
    (w,) = run(tree(task(100, fds=[out])))["warnings"]
    assert '"path": "/run/engine/c1-stdout", "mode": "w", "type": "fifo"' in w["resolution"]


def test_controlling_pty_without_master_needs_shell_job() -> None:
    t = tree(task(100, tty="pts/3"))
    b = only(run(t)["blockers"], "shell_job_needed")
    assert b["fd"] is None and "pts/3" in b["message"]


def test_pty_pair_inside_the_tree_is_fine() -> None:
    master = fd(5, "tty", "tty[500002:6]", target="/dev/ptmx")
    slave = fd(0, "tty", "tty[8800:19]", target="/dev/pts/0")
    t = tree(task(100, fds=[master]), task(101, ppid=100, sid=101, tty="pts/0", fds=[slave]))
    assert run(t)["ok"] is True


def test_one_shell_job_finding_per_tree_for_bare_controlling_ptys() -> None:
    t = tree(task(100, tty="pts/3"), task(101, ppid=100, sid=100, tty="pts/3"))
    assert codes(run(t)["blockers"]) == ["shell_job_needed"]


# -- pid namespaces ---------------------------------------------------------------


def test_task_inside_a_pid_namespace_but_not_its_init() -> None:
    t = tree(task(4242, nspid=[4242, 2], nssid=[4241, 1], pidns_differs=True, sid=4242))
    b = only(run(t)["blockers"], "pid_ns_not_rooted")
    assert "pid 2" in b["message"]
    assert run(t, shell_job=True)["ok"] is False  # no option fixes it


def test_pid_namespace_init_is_fine() -> None:
    t = tree(task(4242, nspid=[4242, 1], nssid=[4242, 1], pidns_differs=True))
    assert run(t)["ok"] is True


def test_pid_namespace_init_whose_session_is_outside() -> None:
    t = tree(task(4242, nspid=[4242, 1], nssid=[4000, 0], pidns_differs=True))
    b = only(run(t)["blockers"], "pid_ns_not_rooted")
    assert "setsid" in b["resolution"]


def test_same_pid_namespace_is_never_judged() -> None:
    # NSpid's last value is not 1, but this is the daemon's own namespace.
    assert run(tree(task(4242, nspid=[4242])))["ok"] is True


# -- locks ------------------------------------------------------------------------


def test_file_locks_need_file_locks() -> None:
    lock: Lock = {
        "pid": 100,
        "fd": 6,
        "key": "tmp/l",
        "type": "FLOCK",
        "mode": "WRITE",
        "id": "fe:00:12",
    }
    fdless: Lock = {**lock, "fd": None, "key": None, "type": "POSIX", "id": "fe:00:13"}
    t = tree(
        task(fds=[fd(6, "file", "tmp/l", locks=("FLOCK WRITE fe:00:12",))]), locks=[lock, fdless]
    )
    r = run(t)
    found = [b for b in r["blockers"] if b["code"] == "file_locks_needed"]
    assert [(b["fd"], b["key"]) for b in found] == [(6, "tmp/l"), (None, None)]
    assert "FLOCK WRITE lock on tmp/l (fd 6)" in found[0]["message"]
    assert "fe:00:13" in found[1]["message"]
    assert all(b["resolution"] == "file_locks: true" for b in found)
    assert run(t, file_locks=True)["ok"] is True


# -- what a restore must supply ---------------------------------------------------


def test_external_pipe_is_a_restore_key_not_a_blocker() -> None:
    t = tree(task(fds=[fd(1, "pipe", "pipe:[5]", mode="w", external=True)]))
    r = run(t)
    assert r["ok"] is True
    assert r["restore_keys"] == ["pipe:[5]"]
    w = only(r["warnings"], "external_resource")
    assert (w["fd"], w["key"], w["resolved"]) == (1, "pipe:[5]", True)
    assert w["resolution"].startswith("inherit_fds: ")
    mapping = json.loads(w["resolution"].removeprefix("inherit_fds: "))
    assert mapping["key"] == "pipe:[5]" and "handle" in mapping


def test_declared_external_file_gets_a_path_mapping() -> None:
    log = fd(2, "file", "var/log/app.log", mode="w", append=True)
    t = tree(task(fds=[log, fd(3, "file", "etc/conf", mode="r")]))
    r = run(t, external=("var/log/app.log",))
    assert r["ok"] is True
    assert r["restore_keys"] == ["var/log/app.log"]
    w = only(r["warnings"], "external_resource")
    assert "declared external" in w["message"]
    mapping = json.loads(w["resolution"].removeprefix("inherit_fds: "))
    assert mapping == {"key": "var/log/app.log", "path": "/var/log/app.log", "mode": "a"}


def test_restore_keys_are_unique_and_in_tree_order() -> None:
    a = fd(1, "pipe", "pipe:[5]", mode="w", external=True)
    b = fd(0, "fifo", "tmp/f", mode="r", external=True)
    t = tree(task(100, fds=[a, b]), task(101, ppid=100, sid=100, fds=[dict(a)]))
    r = run(t)
    assert r["restore_keys"] == ["pipe:[5]", "tmp/f"]
    assert codes(r["warnings"]) == ["external_resource", "external_resource"]


def test_unknown_declared_key_is_a_blocker() -> None:
    r = run(tree(task(fds=[fd(1, "pipe", "pipe:[5]")])), external=("pipe:[6]",))
    b = only(r["blockers"], "unknown_external_key")
    assert b["key"] == "pipe:[6]" and b["resolution"] == 'remove "pipe:[6]" from external'
    assert r["ok"] is False


# -- files and memory -------------------------------------------------------------


def test_deleted_file_is_a_warning_once() -> None:
    gone = fd(3, "deleted", "tmp/x (deleted)", inode=9, size=1000)
    t = tree(task(100, fds=[gone]), task(101, ppid=100, sid=100, fds=[dict(gone)]))
    r = run(t)
    assert r["ok"] is True
    w = only(r["warnings"], "deleted_file")
    assert (w["task"], w["fd"]) == (100, 3)
    assert r["estimated_image_bytes"] == 2 * MiB + 1000 + 2 * TASK_OVERHEAD_BYTES


def test_deleted_file_over_the_ghost_limit_is_a_blocker() -> None:
    big = fd(3, "deleted", "tmp/x (deleted)", inode=9, size=GHOST_LIMIT_BYTES + 1)
    r = run(tree(task(fds=[big])))
    assert codes(r["blockers"]) == ["ghost_file_too_big"]
    assert codes(r["warnings"]) == []
    assert run(tree(task(fds=[dict(big, size=GHOST_LIMIT_BYTES)])))["ok"] is True


def test_large_memfd_contents_warn() -> None:
    shm: Shm = {
        "key": "/memfd:x (deleted)",
        "inode": 4,
        "bytes": LARGE_SHM_BYTES + 1,
        "pids": [101],
    }
    r = run(tree(task(100), task(101, ppid=100, sid=100)), **{})
    assert r["warnings"] == []
    r = run(tree(task(100), task(101, ppid=100, sid=100), shm=[shm]))
    w = only(r["warnings"], "large_shm")
    assert w["task"] == 101 and w["resolved"] is True


def test_large_resident_shmem_warns() -> None:
    r = run(tree(task(100, shmem=LARGE_SHM_BYTES + MiB)))
    assert only(r["warnings"], "large_shm")["task"] == 100
    assert run(tree(task(100, shmem=LARGE_SHM_BYTES)))["warnings"] == []


# -- space and pre-dumps ----------------------------------------------------------


def test_estimate_sums_private_and_shmem() -> None:
    t = tree(task(100, private=3 * MiB, shmem=MiB), task(101, ppid=100, sid=100, private=MiB))
    assert estimate_image_bytes(t) == 5 * MiB + 2 * TASK_OVERHEAD_BYTES
    assert estimate_image_bytes(t, ghost_bytes=7) == 5 * MiB + 2 * TASK_OVERHEAD_BYTES + 7


def test_no_space() -> None:
    t = tree(task(private=10 * MiB))
    need = estimate_image_bytes(t)
    assert run(t, free=need)["ok"] is True
    r = run(t, free=need - 1)
    b = only(r["blockers"], "no_space")
    assert r["ok"] is False and b["resolved"] is False
    assert r["free_bytes"] == need - 1 and r["estimated_image_bytes"] == need


def test_pre_dump_needs_dirty_tracking() -> None:
    t = tree(task())
    assert run(t)["ok"] is True
    b = only(run(t, pre_dump=True)["blockers"], "mem_dirty_track_missing")
    assert b["task"] == 100
    ok = preflight(t, DumpOptions(), {"mem_dirty_track": True}, PLENTY, pre_dump=True)
    assert ok["ok"] is True


def test_resolved_blockers_do_not_fail_but_unresolved_do() -> None:
    t = tree(
        task(
            100,
            sid=1,
            fds=[fd(3, "tcp", "socket:[7]", state="ESTABLISHED")],
        )
    )
    r = run(t, tcp_established=True)
    assert codes(r["blockers"]) == ["shell_job_needed", "tcp_established_needed"]
    assert [b["resolved"] for b in r["blockers"]] == [False, True]
    assert r["ok"] is False
    assert run(t, tcp_established=True, shell_job=True)["ok"] is True


def test_external_namespaces_are_restore_keys() -> None:
    t = tree(task(fds=[fd(1, "pipe", "pipe:[5]", mode="w", external=True)]))
    r = run(t, external_namespaces=(("net", "extnet"),))
    assert r["ok"] is True
    assert r["restore_keys"] == ["pipe:[5]", "extnet"]
    w = [x for x in r["warnings"] if x["key"] == "extnet"]
    assert len(w) == 1 and w[0]["fd"] is None and "net namespace" in w[0]["message"]


def test_session_leader_outside_the_daemons_own_pid_namespace() -> None:
    # The daemon runs in a pid namespace entered without setsid (as under some
    # CI runners): a child of its session reads sid 0, and criu refuses it
    # whatever the options.
    t = tree(task(4242, nssid=[0], sid=0), task(4243, ppid=4242, nssid=[0], sid=0))
    b = only(run(t, shell_job=True)["blockers"], "pid_ns_not_rooted")
    assert b["task"] == 4242 and "setsid" in b["resolution"]
