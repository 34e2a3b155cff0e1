"""criud.dump.inspect: introspecting real process trees (and preflight on them)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import pty
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from criud.daemon.criu import first_error
from criud.daemon.criu_errors import classify
from criud.dump import fds as fdmod
from criud.dump import manifest as mf
from criud.dump.argv import DUMP_LOG, dump_argv
from criud.dump.inspect import (
    NAMESPACES,
    SPLIT_MIN_TASKS,
    Tree,
    _tty,
    inspect_tree,
    own_namespaces,
    visible_to,
)
from criud.dump.options import DumpOptions
from criud.dump.preflight import preflight

from .._helpers import CRIU, need_root_and_criu, proc_state, wait_until

ME = os.getpid()
PLENTY = 1 << 40

SUBJECT = r"""
import fcntl, os, socket, sys, threading, time
port, ext_fd, lockfile, gone, ready = int(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:6]
tcp = socket.create_connection(("127.0.0.1", port))
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind(("127.0.0.1", 0))
lk = open(lockfile, "w")
fcntl.flock(lk, fcntl.LOCK_EX)
mfd = os.memfd_create("criud-inspect")
os.ftruncate(mfd, 4096)
with open(gone, "w") as f:
    f.write("0123456789")
dfd = os.open(gone, os.O_RDONLY)
os.unlink(gone)
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(r)
    time.sleep(600)
    os._exit(0)
os.close(w)
threading.Thread(target=time.sleep, args=(600,), daemon=True).start()
with open(ready, "w") as f:
    f.write(f"{pid} {udp.getsockname()[1]} {tcp.getsockname()[1]} {r} {mfd} {dfd} {lk.fileno()}")
time.sleep(600)
"""


@pytest.fixture
def subject(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A child + grandchild holding most kinds of fds inspect_tree reports."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    ours, theirs = socket.socketpair()
    ready = tmp_path / "ready"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            SUBJECT,
            str(srv.getsockname()[1]),
            str(theirs.fileno()),
            str(tmp_path / "locked"),
            str(tmp_path / "gone"),
            str(ready),
        ],
        pass_fds=(theirs.fileno(),),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    conn: socket.socket | None = None
    gc = 0
    try:
        conn, _ = srv.accept()
        assert wait_until(lambda: ready.exists() and ready.read_text().count(" ") == 6)
        gc, udp_port, tcp_port, rfd, mfd, dfd, lfd = (int(x) for x in ready.read_text().split())
        yield {
            "pid": proc.pid,
            "gc": gc,
            "srv_port": srv.getsockname()[1],
            "udp_port": udp_port,
            "tcp_port": tcp_port,
            "ext_fd": theirs.fileno(),
            "ext_ino": os.fstat(theirs.fileno()).st_ino,
            "ext_peer": os.fstat(ours.fileno()).st_ino,
            "pipe_fd": rfd,
            "memfd": mfd,
            "deleted_fd": dfd,
            "lock_fd": lfd,
            "lockfile": tmp_path / "locked",
        }
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        if gc:
            assert wait_until(lambda: proc_state(gc) in (None, "Z"), timeout=10)
        for s in (srv, ours, theirs, conn):
            if s is not None:
                s.close()


def _fd(tree: Tree, pid: int, n: int) -> dict[str, Any]:
    for t in tree["tasks"]:
        if t["pid"] == pid:
            for f in t["fds"]:
                if f["fd"] == n:
                    return f
    raise KeyError((pid, n))


def test_tasks(subject: dict[str, Any]) -> None:
    tree = inspect_tree(subject["pid"])
    assert tree["root"] == subject["pid"]
    assert [t["pid"] for t in tree["tasks"]] == [subject["pid"], subject["gc"]]
    root, gc = tree["tasks"]
    assert root["ppid"] == ME and gc["ppid"] == subject["pid"]
    assert root["cmdline"][0] == sys.executable and root["cmdline"][1] == "-c"
    assert root["comm"].startswith("python")
    assert root["state"] in ("S", "R")
    uid = os.getuid()
    assert root["uids"] == {"real": uid, "effective": uid, "saved": uid, "fs": uid}
    assert root["threads"]["count"] == 2 and root["threads"]["tids"][0] == subject["pid"]
    assert gc["threads"] == {"count": 1, "tids": [subject["gc"]]}
    # start_new_session: the child leads its session and group; the grandchild is in them.
    assert (root["sid"], root["pgid"]) == (subject["pid"], subject["pid"])
    assert (gc["sid"], gc["pgid"]) == (subject["pid"], subject["pid"])
    assert root["nspid"] == [subject["pid"]] and root["nssid"] == [subject["pid"]]
    assert root["tty"] is None
    own = own_namespaces()
    assert set(root["namespaces"]) == set(NAMESPACES)
    for name, ns in root["namespaces"].items():
        assert ns == {"id": own.get(name), "differs": False}
    assert root["cgroup"] and all(":" in line for line in root["cgroup"])
    with open(f"/proc/{subject['pid']}/cgroup", encoding="utf-8") as f:
        assert root["cgroup"] == f.read().splitlines()
    mem = root["memory"]
    assert mem["rss"] > 0 and mem["private"] > 0
    assert mem["rss"] == mem["private"] + mem["shared"]
    assert mem["shmem"] <= mem["shared"]
    assert root["redacted"] is False


def test_fds_sockets_and_external(subject: dict[str, Any]) -> None:
    tree = inspect_tree(subject["pid"])
    pid = subject["pid"]
    tcp = next(f for f in tree["tasks"][0]["fds"] if f["type"] == "tcp")
    assert tcp["state"] == "ESTABLISHED"
    assert tcp["local"] == f"127.0.0.1:{subject['tcp_port']}"
    assert tcp["remote"] == f"127.0.0.1:{subject['srv_port']}"
    udp = next(f for f in tree["tasks"][0]["fds"] if f["type"] == "udp")
    assert (udp["state"], udp["local"], udp["remote"]) == (
        "CLOSE",
        f"127.0.0.1:{subject['udp_port']}",
        "0.0.0.0:0",
    )
    ext = _fd(tree, pid, subject["ext_fd"])
    assert ext["type"] == "unix" and ext["sock_type"] == "stream"
    assert ext["peer"] == subject["ext_peer"] and ext["external"] is True
    # The pipe: read end in the child, write end in the grandchild: internal.
    r = _fd(tree, pid, subject["pipe_fd"])
    assert (r["type"], r["mode"], r["external"]) == ("pipe", "r", False)
    gc_w = [f for f in tree["tasks"][1]["fds"] if f["key"] == r["key"]]
    assert [(f["mode"], f["external"]) for f in gc_w] == [("w", False)]
    assert tree["external"] == [f"socket:[{subject['ext_ino']}]"]


def test_files_locks_and_shm(subject: dict[str, Any]) -> None:
    tree = inspect_tree(subject["pid"])
    pid = subject["pid"]
    memfd = _fd(tree, pid, subject["memfd"])
    assert (memfd["type"], memfd["size"]) == ("memfd", 4096)
    gone = _fd(tree, pid, subject["deleted_fd"])
    assert (gone["type"], gone["size"]) == ("deleted", 10)
    lfd = _fd(tree, pid, subject["lock_fd"])
    st = subject["lockfile"].stat()
    ident = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    assert lfd["locks"] == (f"FLOCK WRITE {ident}",)
    # The grandchild was forked after the flock and shares the open file:
    # /proc shows the lock on its fd as well, and criu would meet both.
    key = str(subject["lockfile"]).lstrip("/")
    assert tree["locks"] == [
        {
            "pid": p,
            "fd": subject["lock_fd"],
            "key": key,
            "type": "FLOCK",
            "mode": "WRITE",
            "id": ident,
        }
        for p in (pid, subject["gc"])
    ]
    assert {s["key"]: (s["bytes"], s["pids"][0]) for s in tree["shm"]}[memfd["key"]] == (4096, pid)


def test_preflight_on_a_real_tree(subject: dict[str, Any]) -> None:
    tree = inspect_tree(subject["pid"])
    report = preflight(tree, DumpOptions(), {"mem_dirty_track": False}, PLENTY)
    codes = {b["code"] for b in report["blockers"]}
    assert codes == {"tcp_established_needed", "external_unix_socket", "file_locks_needed"}
    assert {w["code"] for w in report["warnings"]} == {"deleted_file"}
    key = f"socket:[{subject['ext_ino']}]"
    assert report["restore_keys"] == [key]
    opts = DumpOptions(tcp_established=True, file_locks=True, external=(key,))
    report = preflight(tree, opts, {}, PLENTY)
    assert report["ok"] is True, report["blockers"]
    assert report["estimated_image_bytes"] > sum(t["memory"]["private"] for t in tree["tasks"])


def test_missing_pid() -> None:
    with pytest.raises(ProcessLookupError):
        inspect_tree(4_194_305)


def test_daemon_ns_argument_marks_differences(subject: dict[str, Any]) -> None:
    own = own_namespaces()
    fake = {**own, "net": own["net"] + 1}
    tree = inspect_tree(subject["pid"], daemon_ns=fake)
    ns = tree["tasks"][0]["namespaces"]
    assert ns["net"]["differs"] is True
    assert all(not v["differs"] for k, v in ns.items() if k != "net")


def test_pty_session_leader() -> None:
    pid, master = pty.fork()
    if pid == 0:  # pragma: no cover - the child
        # Only the pty: an fd the runner left open (of a mount criu cannot
        # see from a namespace of its own) is not what this test is about.
        os.closerange(3, 65536)
        os.execv("/bin/sleep", ["sleep", "600"])
    try:
        assert wait_until(lambda: _comm(pid) == "sleep")
        tree = inspect_tree(pid)
        t = tree["tasks"][0]
        assert t["sid"] == pid
        assert t["tty"] is not None and str(t["tty"]["name"]).startswith("pts/")
        slave = _fd(tree, pid, 0)
        assert slave["type"] == "tty" and slave["target"] == f"/dev/{t['tty']['name']}"
        # Its master is ours, outside the tree: the slave is external (criud
        # dumps it with --external tty[...]), and no --shell-job is needed.
        assert slave["external"] is True and slave["key"] in tree["external"]
        report = preflight(tree, DumpOptions(), {}, PLENTY)
        assert report["ok"] is True and slave["key"] in report["restore_keys"]
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(master)


NETNS_CHILD = r"""
import ctypes, os, socket, sys, time
libc = ctypes.CDLL(None, use_errno=True)
if libc.unshare(0x40000000) != 0:
    sys.exit(3)
a, b = socket.socketpair()
s = socket.socket(socket.AF_UNIX)
s.bind("\0criud-test-" + str(os.getpid()))
s.listen()
open(sys.argv[1], "w").write(f"{a.fileno()} {b.fileno()} {s.fileno()}")
time.sleep(600)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs CAP_SYS_ADMIN for a network namespace")
def test_other_network_namespace(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    proc = subprocess.Popen(
        [sys.executable, "-c", NETNS_CHILD, str(ready)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        assert wait_until(lambda: ready.exists() and ready.read_text().count(" ") == 2)
        a, b, s = (int(x) for x in ready.read_text().split())
        tree = inspect_tree(proc.pid)
        t = tree["tasks"][0]
        assert t["namespaces"]["net"]["differs"] is True
        fa, fb, fs = (_fd(tree, proc.pid, n) for n in (a, b, s))
        # Peers come from sock_diag run inside the child's namespace; the
        # /proc/net/unix fallback would know no peers at all.
        assert (fa["type"], fa["peer"], fa["external"]) == ("unix", fb["inode"], False)
        assert fb["peer"] == fa["inode"]
        assert (fs["state"], fs["local"]) == ("LISTEN", f"@criud-test-{proc.pid}")
        assert tree["external"] == []
        # The daemon's own thread never left its namespace.
        assert os.stat("/proc/thread-self/ns/net").st_ino == own_namespaces()["net"]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs CAP_SYS_ADMIN for a pid namespace")
def test_pid_namespace_child_is_not_rooted() -> None:
    proc = subprocess.Popen(
        ["unshare", "--pid", "--fork", "setsid", "sh", "-c", "sleep 600 & wait"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    init = 0
    try:

        def ready() -> bool:
            kids = fdmod.tree_pids(proc.pid)
            return len(kids) == 3 and _comm(kids[2]) == "sleep"

        assert wait_until(ready)
        _, init, sleeper = fdmod.tree_pids(proc.pid)
        tree = inspect_tree(sleeper)
        t = tree["tasks"][0]
        assert t["namespaces"]["pid"]["differs"] is True
        assert t["nspid"] == [sleeper, 2]
        report = preflight(tree, DumpOptions(shell_job=True), {}, PLENTY)
        unresolved = [b["code"] for b in report["blockers"] if not b["resolved"]]
        assert unresolved == ["pid_ns_not_rooted"]
        # Its init, a session leader (setsid), is dumpable.
        tree = inspect_tree(init)
        assert tree["tasks"][0]["nspid"] == [init, 1]
        assert preflight(tree, DumpOptions(), {}, PLENTY)["ok"] is True
    finally:
        # setsid put the namespace's init in a session of its own: kill it too.
        for p in (init, proc.pid):
            if p:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p, signal.SIGKILL)
        proc.wait(timeout=10)


# -- pure helpers -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("nr", "major", "minor", "name"),
    [
        (0x8803, 136, 3, "pts/3"),
        (0x8901, 137, 1, "pts/257"),
        (0x0401, 4, 1, "tty1"),
        (0x0441, 4, 65, "ttyS1"),
        (0x100403, 4, 0x103, "ttyS195"),
        (0x0501, 5, 1, None),
    ],
)
def test_tty_decoding(nr: int, major: int, minor: int, name: str | None) -> None:
    assert _tty(nr) == {"nr": nr, "major": major, "minor": minor, "name": name}
    assert _tty(0) is None


def test_own_namespaces() -> None:
    own = own_namespaces()
    assert set(own) <= set(NAMESPACES) and {"net", "pid", "mnt", "user"} <= set(own)
    assert own["net"] == os.stat("/proc/self/ns/net").st_ino


def _synthetic(uids: list[tuple[int, int, int]]) -> Tree:
    tasks: list[Any] = []
    for i, (real, eff, saved) in enumerate(uids):
        pid = 100 + i
        tasks.append(
            {
                "pid": pid,
                "ppid": 1 if i == 0 else 100,
                "uids": {"real": real, "effective": eff, "saved": saved, "fs": eff},
                "fds": [
                    {"fd": 1, "key": f"pipe:[{pid}]", "external": True},
                    {"fd": 2, "key": "pipe:[9]", "external": False},
                ],
                "cgroup": ["0::/x"],
                "namespaces": {"net": {"id": 5, "differs": False}},
                "redacted": False,
            }
        )
    return {
        "root": 100,
        "tasks": tasks,
        "external": [f"pipe:[{t['pid']}]" for t in tasks],
        "locks": [
            {"pid": t["pid"], "fd": 1, "key": "k", "type": "POSIX", "mode": "READ", "id": "0:0:1"}
            for t in tasks
        ],
        "shm": [{"key": "/memfd:m", "inode": 1, "bytes": 1, "pids": [t["pid"] for t in tasks]}],
    }


def test_visible_to_root_sees_everything() -> None:
    tree = _synthetic([(1000, 1000, 1000), (0, 0, 0)])
    assert visible_to(tree, 0) is tree


def test_visible_to_refuses_a_tree_rooted_in_another_uid() -> None:
    assert visible_to(_synthetic([(1000, 1000, 1000)]), 1001) is None
    # Real uid decides for the root, as for a process you started that dropped to you.
    assert visible_to(_synthetic([(1001, 1000, 1000)]), 1000) is None


def test_visible_to_redacts_tasks_not_wholly_the_callers() -> None:
    tree = _synthetic([(1000, 1000, 1000), (1000, 0, 0), (1000, 1000, 1000)])
    before = copy.deepcopy(tree)
    seen = visible_to(tree, 1000)
    assert tree == before  # the input is left alone
    assert seen is not None
    mine, setuid, other = seen["tasks"]
    assert mine["fds"] and not mine["redacted"] and other["fds"]
    assert setuid["redacted"] is True
    assert setuid["fds"] == [] and setuid["cgroup"] == []
    assert setuid["namespaces"] == {"net": {"id": None, "differs": False}}
    assert setuid["uids"]["effective"] == 0  # ids stay: /proc shows them to all
    assert seen["external"] == ["pipe:[100]", "pipe:[102]"]
    assert [lk["pid"] for lk in seen["locks"]] == [100, 102]
    assert seen["shm"][0]["pids"] == [100, 102]


def test_visible_to_all_mine_is_a_copy_unchanged() -> None:
    tree = _synthetic([(1000, 1000, 1000)])
    seen = visible_to(tree, 1000)
    assert seen == tree and seen is not tree


def _comm(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8") as f:
            return f.read().rstrip("\n")
    except OSError:
        return None


def test_a_thread_id_is_not_a_process(subject: dict[str, Any]) -> None:
    tids = os.listdir(f"/proc/{subject['pid']}/task")
    tid = next(int(t) for t in tids if int(t) != subject["pid"])
    with pytest.raises(ProcessLookupError):
        inspect_tree(tid)


# -- preflight's prediction against criu's verdict --------------------------------


def _criu_dump(tree: Tree, opts: DumpOptions, images: Path) -> tuple[int, str | None]:
    """Dump tree with real criu (leaving it running); (exit status, criud code)."""
    images.mkdir()
    m = mf.Manifest.from_json({"tasks": tree["tasks"]})
    ext = m.external_unix_inodes(opts.external)
    argv = dump_argv(
        tree["root"],
        images,
        dataclasses.replace(opts, leave_running=True),
        external_unix=tuple(ext),
        external_tty=tuple(m.external_tty_keys()),
        network_lock="nftables" if opts.tcp_established else None,
    )
    # criu logs to its stdout (-o -), as under the daemon.
    with open(images / DUMP_LOG, "wb") as log:
        rc = subprocess.call([CRIU, *argv], stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    if rc == 0:
        return rc, None
    lines = (images / DUMP_LOG).read_text(errors="replace").splitlines()
    return rc, classify(first_error(lines), lines, "dump")[0]


def test_preflight_agrees_with_criu(subject: dict[str, Any], tmp_path: Path) -> None:
    need_root_and_criu()
    tree = inspect_tree(subject["pid"])
    key = f"socket:[{subject['ext_ino']}]"
    cases = [
        DumpOptions(),
        DumpOptions(tcp_established=True, file_locks=True),
        # --ext-unix-sk does not cover the half of a stream socketpair.
        DumpOptions(tcp_established=True, file_locks=True, ext_unix_sk=True),
        DumpOptions(tcp_established=True, file_locks=True, external=(key,)),
    ]
    for i, opts in enumerate(cases):
        report = preflight(tree, opts, {}, PLENTY)
        rc, code = _criu_dump(tree, opts, tmp_path / str(i))
        unresolved = {b["code"] for b in report["blockers"] if not b["resolved"]}
        assert report["ok"] == (rc == 0), (opts, report["blockers"], code)
        if rc != 0:
            # criu stops at the first problem it meets: one of those predicted.
            assert code in unresolved, (opts, code, unresolved)
    assert report["ok"] is True


def test_preflight_agrees_with_criu_on_a_pty(tmp_path: Path) -> None:
    need_root_and_criu()
    pid, master = pty.fork()
    if pid == 0:  # pragma: no cover - the child
        # Only the pty: an fd the runner left open (of a mount criu cannot
        # see from a namespace of its own) is not what this test is about.
        os.closerange(3, 65536)
        os.execv("/bin/sleep", ["sleep", "600"])
    try:
        assert wait_until(lambda: _comm(pid) == "sleep")
        tree = inspect_tree(pid)
        for i, opts in enumerate([DumpOptions(), DumpOptions(shell_job=True)]):
            report = preflight(tree, opts, {}, PLENTY)
            rc, code = _criu_dump(tree, opts, tmp_path / str(i))
            assert report["ok"] == (rc == 0) and rc == 0, code
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(master)


BIG_TREE = r"""
import os, signal, sys, time
n = int(sys.argv[1])
r, w = os.pipe()
for _ in range(n - 1):
    if os.fork() == 0:
        a, b = os.pipe()  # both ends here: internal
        signal.pause()
        os._exit(0)
print("ready", flush=True)
time.sleep(600)
"""


def test_a_big_tree_read_in_two_halves_reads_as_in_one() -> None:
    # Above SPLIT_MIN_TASKS, part of the tree is read by a forked child
    # (criud.daemon.forkmap); the answer must not depend on it.
    n = SPLIT_MIN_TASKS + 8
    proc = subprocess.Popen(
        [sys.executable, "-c", BIG_TREE, str(n)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"
        assert wait_until(lambda: len(fdmod.tree_pids(proc.pid)) == n)
        ns = own_namespaces()
        split = inspect_tree(proc.pid, ns)
        whole = inspect_tree(proc.pid, ns, split=False)
        assert split == whole
        assert [t["pid"] for t in split["tasks"]] == fdmod.tree_pids(proc.pid)
        # Every task has its fds, from whichever half read it.  The pipe each
        # task made holds both ends: internal; only stdout, whose read end is
        # ours, is external.
        assert all(len(t["fds"]) >= 5 for t in split["tasks"])
        stdout = f"pipe:[{os.fstat(proc.stdout.fileno()).st_ino}]"
        assert split["external"] == [stdout]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.mark.parametrize("opener", ["task", "fds"])
def test_fd_exhaustion_is_not_a_missing_process(
    monkeypatch: pytest.MonkeyPatch, opener: str
) -> None:
    # With our fd table full, /proc/<pid> cannot be opened: that must rise as
    # EMFILE (503 out_of_fds at the API), not read as "no such process"
    # (404) nor as a task without fds.
    import errno

    from criud.dump import inspect as proc_inspect

    real_open = os.open
    target = f"/proc/{os.getpid()}" if opener == "task" else f"/proc/{os.getpid()}/fd"

    def full(path: Any, *a: Any, **kw: Any) -> int:
        if path == target:
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return real_open(path, *a, **kw)

    monkeypatch.setattr(os, "open", full)
    with pytest.raises(OSError) as info:
        proc_inspect.inspect_tree(os.getpid(), split=False)
    assert info.value.errno == errno.EMFILE
    assert not isinstance(info.value, ProcessLookupError)
