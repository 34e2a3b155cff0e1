"""Caller paths and caller identity: what a path-form inherit may open, and as whom.

The attacker is a member of the socket group with processes of its own.  A
path it names is opened in a child that has the caller's full credentials
(uid, gid and the groups captured when it connected), with magic links
refused, never in the daemon's own context; a path that could block (a
FIFO) never holds up the daemon.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.helpers import (
    Daemon,
    Procs,
    _shared_src,
    is_pool_worker,
    pool_workers,
    read_line,
    temp_root,
    wait_for,
)
from tests.security.users import Accounts, User, call_as, calls_as, run_as, uid_of

SECRET = b"TOPSECRET-criud-paths\n"


# -- helpers -----------------------------------------------------------------------


@contextlib.contextmanager
def a_dir(owner: User | None = None, mode: int = 0o755) -> Iterator[Path]:
    """A fresh dir under /tmp, owned by owner (root if None), removed afterwards."""
    d = Path(tempfile.mkdtemp(prefix="criud-sp-", dir="/tmp"))
    try:
        if owner is not None:
            os.chown(d, owner.uid, owner.gid)
        d.chmod(mode)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def no_fd_leak(sdaemon: Daemon) -> Iterator[None]:
    """The daemon holds no more fds after the test than before it."""
    before = sdaemon.settled_fd_count()
    yield
    # Connections the test made close asynchronously on the daemon's side.
    wait_for(
        lambda: sdaemon.fd_count() <= before,
        10,
        what=f"daemon fd count back to {before} (now {sdaemon.fd_count()})",
    )


def spawn_target(procs: Procs, user: User, argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
    """Start argv as user without supplementary groups (criu, as the user, cannot setgroups)."""
    kw.setdefault("cwd", "/")
    p = procs.spawn(
        ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--clear-groups", *argv], **kw
    )
    wait_for(lambda: uid_of(p.pid) == user.uid, 10, what=f"pid {p.pid} to run as {user.name}")
    return p


def checkpoint_as(user: User, daemon: Daemon, pid: int, count: int = 1, **opts: Any) -> list[str]:
    """count checkpoints of pid, made by user; their ids."""
    calls = [("POST", "/v1/checkpoints", {"pid": pid, **opts})] * count
    out = calls_as(user, daemon, calls)
    assert all(st == 201 for st, _ in out), out
    return [doc["id"] for _, doc in out]


def dead_checkpoint(user: User, daemon: Daemon, procs: Procs) -> str:
    """A checkpoint of user's own sleep (fd 0 /dev/null); the dump kills it and we reap it."""
    p = spawn_target(procs, user, ["sleep", "1000"])
    (ck,) = checkpoint_as(user, daemon, p.pid)
    p.wait(timeout=10)
    return ck


def path_restore(ck: str, path: str, mode: str = "r", key: str = "dev/null", **kw: Any) -> Any:
    return {"checkpoint": ck, "inherit_fds": [{"key": key, "path": path, "mode": mode, **kw}]}


def holders(path: Path, exclude: set[int]) -> list[int]:
    """Pids (other than exclude) with path open."""
    target = str(path)
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in exclude:
            continue
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{name}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{name}/fd/{fd}") == target:
                        out.append(int(name))
                        break
    return out


def fd_targets(pid: int) -> dict[int, str]:
    out = {}
    for n in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            out[int(n)] = os.readlink(f"/proc/{pid}/fd/{n}")
    return out


def adopt_if_restored(procs: Procs, status: int, doc: Any) -> None:
    if status == 201 and isinstance(doc, dict) and doc.get("pid"):
        procs.adopt(int(doc["pid"]))


def normalise(doc: dict[str, Any], n: int) -> dict[str, Any]:
    """A problem document with fd number n written as N and the request's instance dropped."""
    text = json.dumps({k: v for k, v in doc.items() if k != "instance"})
    return dict(json.loads(text.replace(f"/proc/self/fd/{n}", "/proc/self/fd/N")))


# -- item 1: the daemon's own fds ---------------------------------------------------


def test_proc_self_fd_never_reaches_the_daemons_fds(
    users: Accounts, sdaemon: Daemon, no_fd_leak: None, procs: Procs
) -> None:
    with a_dir(mode=0o711) as d:
        vault = d / "vault"
        vault.mkdir(mode=0o700)
        secret = vault / "secret"
        secret.write_bytes(SECRET)
        secret.chmod(0o644)  # readable, but only through the 0700 dir
        fd = os.open(secret, os.O_RDONLY | os.O_CLOEXEC)
        try:
            handle = sdaemon.client.send_fds([fd])["handle"]
        finally:
            os.close(fd)
        try:
            table = {
                int(n): os.readlink(f"/proc/{sdaemon.pid}/fd/{n}")
                for n in os.listdir(f"/proc/{sdaemon.pid}/fd")
            }
            (n,) = [k for k, v in table.items() if v == str(secret)]
            missing = max(table) + 100
            # root's handle gets a criu worker of its own (issue 13; none if
            # the session's other handles hold all of them): root's, the
            # daemon's child, holding its socket and that fd alone.
            me = {sdaemon.pid, os.getpid()}
            # Waited for until it runs criu: while setpriv still execs it,
            # it holds the fd already but is not yet a `criu swrk`.
            with contextlib.suppress(AssertionError):
                wait_for(
                    lambda: [p for p in holders(secret, exclude=me) if is_pool_worker(p)],
                    timeout=3,
                    what="a worker",
                )
            workers = _handle_worker(sdaemon, secret)
            ck = dead_checkpoint(users.bob, sdaemon, procs)
            out = calls_as(
                users.bob,
                sdaemon,
                [
                    ("POST", "/v1/restores", path_restore(ck, f"/proc/self/fd/{n}")),
                    ("POST", "/v1/restores", path_restore(ck, f"/proc/self/fd/{missing}")),
                ],
            )
            for st, doc in out:
                adopt_if_restored(procs, st, doc)
            (st1, doc1), (st2, doc2) = out
            assert not holders(secret, exclude=me | set(workers))
            assert 400 <= st1 < 500, (st1, doc1)
            assert doc1["code"] == "inherit_path_failed", doc1
            # What the daemon's fd table holds is not written in the answer.
            assert (st1, normalise(doc1, n)) == (st2, normalise(doc2, missing))
            assert "TOPSECRET" not in json.dumps(doc1)
        finally:
            sdaemon.client.delete_fd_handle(handle)
        # The handle's end ends its worker: nothing holds the file any more.
        wait_for(lambda: not holders(secret, exclude={os.getpid()}), what="no holder left")


def _settled_targets(pid: int, also: str) -> dict[int, str] | None:
    """A criu worker's fd targets once its loader is done opening libraries, else None."""
    t = fd_targets(pid)
    ok = ("socket:", "pipe:", "/dev/null", also)
    return t if all(v.startswith(ok) for v in t.values()) else None


def _handle_worker(d: Daemon, secret: Path) -> list[int]:
    """The daemon's root criu swrk children that hold secret: only its socket beside it."""
    out = []
    for pid in pool_workers(d.pid):
        try:
            if str(secret) not in fd_targets(pid).values():
                continue  # another worker (the pool's, another handle's): not this test's
            with open(f"/proc/{pid}/status") as f:
                uids = next(ln.split()[1:] for ln in f if ln.startswith("Uid:"))
        except OSError:
            continue  # gone meanwhile
        table = wait_for(
            lambda pid=pid: _settled_targets(pid, str(secret)), what=f"worker {pid} to settle"
        )
        rest = sorted(v for k, v in table.items() if k > 2)
        assert set(uids) == {"0"}, uids
        assert len(rest) == 2 and rest[0] == str(secret), table
        assert rest[1].startswith("socket:["), table
        out.append(pid)
    return out


def test_magic_links_refused_even_for_own_processes(
    users: Accounts, sdaemon: Daemon, no_fd_leak: None, procs: Procs
) -> None:
    # bob's own process holds a file bob can read: a /proc/<pid>/fd link
    # to it is still refused (magic links are never followed), so is /dev/fd.
    with a_dir(users.bob) as d:
        mine = d / "mine"
        mine.write_bytes(b"bob's\n")
        os.chown(mine, users.bob.uid, users.bob.gid)
        with open(mine, "rb") as f:
            holder = spawn_target(procs, users.bob, ["sleep", "1000"], stdin=f)
        ck = dead_checkpoint(users.bob, sdaemon, procs)
        out = calls_as(
            users.bob,
            sdaemon,
            [
                ("POST", "/v1/restores", path_restore(ck, f"/proc/{holder.pid}/fd/0")),
                ("POST", "/v1/restores", path_restore(ck, "/dev/fd/0")),
            ],
        )
        for st, doc in out:
            adopt_if_restored(procs, st, doc)
            assert st == 422 and doc["code"] == "inherit_path_failed", doc
            assert doc["errno"] == "ELOOP", doc


# -- item 3: FIFOs ------------------------------------------------------------------

CONCURRENT = r"""
import json, sys, threading, time
from criud.api.client import Client, CriudClientError
c = Client(sys.argv[1], sys.argv[2], timeout=float(sys.argv[4]))
bodies = json.loads(sys.argv[3])
out = [None] * len(bodies)
def go(i, body):
    t = time.monotonic()
    try:
        r = list(c.request("POST", "/v1/restores", body))
    except CriudClientError as e:
        r = [e.status, e.problem]
    except OSError as e:
        r = [0, {"error": repr(e)}]
    out[i] = r + [time.monotonic() - t]
ts = [threading.Thread(target=go, args=(i, b)) for i, b in enumerate(bodies)]
for t in ts: t.start()
for t in ts: t.join()
print(json.dumps(out))
"""


def concurrent_restores(
    user: User, daemon: Daemon, bodies: list[Any], timeout: float = 20
) -> list[Any]:
    """POST every body at once as user; [[status, doc, seconds], ...]."""
    out = run_as(
        user,
        CONCURRENT,
        str(daemon.socket),
        str(daemon.fd_socket),
        json.dumps(bodies),
        str(timeout),
        timeout=timeout + 30,
    )
    assert out.returncode == 0, out.stderr
    return list(json.loads(out.stdout))


def test_fifo_paths_never_hang_the_daemon(
    users: Accounts, sdaemon: Daemon, no_fd_leak: None, procs: Procs
) -> None:
    bob = users.bob
    with a_dir(bob) as d:
        fifo = d / "f"
        made = run_as(bob, "import os, sys; os.mkfifo(sys.argv[1])", str(fifo))
        assert made.returncode == 0, made.stderr
        target = spawn_target(procs, bob, ["sleep", "1000"])
        cks = checkpoint_as(bob, sdaemon, target.pid, count=8, leave_running=True)
        rounds = {
            # No "type": a FIFO is refused before it is opened.
            "inherit_path_wrong_type": [
                path_restore(ck, str(fifo), "r" if i % 2 else "w") for i, ck in enumerate(cks)
            ],
            # A FIFO for writing with nobody reading: refused, not waited on.
            "fifo_no_reader": [path_restore(ck, str(fifo), "w", type="fifo") for ck in cks],
        }
        for code, bodies in rounds.items():
            slow: list[float] = []
            stop = threading.Event()

            def probe(slow: list[float] = slow, stop: threading.Event = stop) -> None:
                while not stop.is_set():
                    t = time.monotonic()
                    sdaemon.client.request("GET", "/v1/checkpoints")
                    slow.append(time.monotonic() - t)
                    time.sleep(0.05)

            prober = threading.Thread(target=probe)
            prober.start()
            try:
                results = concurrent_restores(bob, sdaemon, bodies)
            finally:
                stop.set()
                prober.join(timeout=30)
            for st, doc, took in results:
                adopt_if_restored(procs, st, doc)
                # The per-uid cap on operations in flight may refuse some of
                # the eight first (429): a quick refusal too, never a wait.
                assert 400 <= st < 500 and doc["code"] in (code, "too_many_operations"), (st, doc)
                assert took < 10, f"{code}: took {took:.1f}s"
            assert any(doc["code"] == code for _, doc, _ in results), results
            if code == "inherit_path_wrong_type":
                assert all(st in (422, 429) for st, _, _ in results)
            assert slow and max(slow) < 5, f"root's GET took up to {max(slow or [0]):.1f}s"
        # No daemon fd or thread is left waiting on the FIFO.
        assert not holders(fifo, exclude={os.getpid()})


def test_fifo_requests_in_flight_do_not_stop_sigterm(users: Accounts, procs: Procs) -> None:
    bob = users.bob
    with temp_root() as root, a_dir(bob) as d:
        daemon = Daemon(root, args=["--socket-group", users.sock_group]).start()
        try:
            fifo = d / "f"
            made = run_as(bob, "import os, sys; os.mkfifo(sys.argv[1])", str(fifo))
            assert made.returncode == 0, made.stderr
            target = spawn_target(procs, bob, ["sleep", "1000"])
            cks = checkpoint_as(bob, daemon, target.pid, count=4, leave_running=True)
            bodies = [path_restore(ck, str(fifo), "r") for ck in cks]
            bodies += [path_restore(ck, str(fifo), "r", type="fifo") for ck in cks]
            got: list[Any] = []
            sender = threading.Thread(
                target=lambda: got.extend(concurrent_restores(bob, daemon, bodies, timeout=20))
            )
            sender.start()
            time.sleep(0.2)  # let them reach the daemon
            t = time.monotonic()
            rc = daemon.stop(timeout=25)
            took = time.monotonic() - t
            sender.join(timeout=60)
            assert rc == 0 and took < 20, f"daemon exited {rc} after {took:.1f}s: {daemon.log()}"
            assert not sender.is_alive()
            for st, doc, _ in got:
                adopt_if_restored(procs, st, doc)
        finally:
            daemon.kill()


WRITER = "i=0; while :; do echo line $i; i=$((i+1)); sleep 0.1; done"


def test_fifo_type_hands_the_fifo_to_the_restored_writer(
    users: Accounts, sdaemon: Daemon, no_fd_leak: None, procs: Procs
) -> None:
    bob = users.bob
    with a_dir(bob) as d:
        log = d / "out.log"
        log.touch()
        os.chown(log, bob.uid, bob.gid)
        with open(log, "ab") as f:
            p = spawn_target(procs, bob, ["sh", "-c", WRITER], stdout=f)
        wait_for(lambda: log.stat().st_size > 0, 10, what="the writer to write")
        (ck,) = checkpoint_as(bob, sdaemon, p.pid)
        p.wait(timeout=10)
        fifo = d / "f"
        made = run_as(bob, "import os, sys; os.mkfifo(sys.argv[1])", str(fifo))
        assert made.returncode == 0, made.stderr
        # The engine holds the read end before the restore.
        r = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            body = path_restore(ck, str(fifo), "w", key=str(log).lstrip("/"), type="fifo")
            st, doc = call_as(bob, sdaemon, "POST", "/v1/restores", body)
            adopt_if_restored(procs, st, doc)
            assert st == 201, doc
            line = read_line(r)
            assert line.startswith(b"line "), line
            # The restored writer got an ordinary, blocking fd.
            fdinfo = Path(f"/proc/{doc['pid']}/fdinfo/1").read_text()
            flags = int(fdinfo.split("flags:")[1].split()[0], 8)
            assert not flags & os.O_NONBLOCK
            assert os.stat(f"/proc/{doc['pid']}/fd/1").st_ino == os.fstat(r).st_ino
        finally:
            os.close(r)


def test_other_types_refused(
    users: Accounts, sdaemon: Daemon, no_fd_leak: None, procs: Procs
) -> None:
    bob = users.bob
    with a_dir(bob) as d:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(d / "s"))
        plain = d / "plain"
        plain.write_bytes(b"x")
        ck = dead_checkpoint(bob, sdaemon, procs)
        try:
            out = calls_as(
                bob,
                sdaemon,
                [
                    ("POST", "/v1/restores", path_restore(ck, str(d))),
                    ("POST", "/v1/restores", path_restore(ck, str(d / "s"))),
                    ("POST", "/v1/restores", path_restore(ck, "/dev/loop0")),
                    ("POST", "/v1/restores", path_restore(ck, str(plain), type="fifo")),
                ],
            )
        finally:
            sock.close()
        for (st, doc), what in zip(out, ["dir", "socket", "block", "file as fifo"], strict=True):
            adopt_if_restored(procs, st, doc)
            if what == "block" and doc.get("errno") == "ENOENT":
                continue  # no loop device on this machine
            assert st == 422 and doc["code"] == "inherit_path_wrong_type", (what, doc)


# -- item 8: groups are the connect-time ones ----------------------------------------

CONNECTOR = r"""
import http.client, json, os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(30)
s.connect(sys.argv[1])
# One full exchange first: the daemon has accepted and knows its caller.
s.sendall(b"GET /v1/checkpoints HTTP/1.1\r\nHost: x\r\n\r\n")
r = http.client.HTTPResponse(s)
r.begin()
r.read()
assert r.status == 200, r.status
if os.fork():
    os._exit(0)  # the connecting process goes; its child keeps the connection
sys.stdin.readline()
body = sys.argv[2].encode()
s.sendall(
    b"POST /v1/restores HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\n\r\n" % len(body) + body
)
r = http.client.HTTPResponse(s)
r.begin()
print(json.dumps([r.status, json.loads(r.read())]), flush=True)
"""


def steer_pid(procs: Procs, pid: int, argv: list[str]) -> subprocess.Popen[bytes] | None:
    """Start argv with exactly pid (free now), by setting ns_last_pid; None if others raced us."""
    for _ in range(40):
        Path("/proc/sys/kernel/ns_last_pid").write_text(str(pid - 1))
        p = procs.spawn(argv)
        if p.pid == pid:
            return p
        p.kill()
        p.wait(timeout=10)
    return None


def test_groups_are_captured_at_connect(
    users: Accounts, sdaemon: Daemon, no_fd_leak: None, procs: Procs
) -> None:
    bob = users.bob
    group = users.extra_gids[0]  # bob is not in it
    with a_dir() as d:
        f = d / "group-only"
        f.write_bytes(SECRET)
        os.chown(f, 0, group)
        f.chmod(0o640)
        ck = dead_checkpoint(bob, sdaemon, procs)
        body = json.dumps(path_restore(ck, str(f)))
        conn = procs.spawn(
            [
                *bob.setpriv(),
                os.path.realpath(sys.executable),
                "-c",
                CONNECTOR,
                str(sdaemon.socket),
                body,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            # Not a session or group leader: a pid in use as a pgid or sid is
            # never handed out again while that group lives.
            start_new_session=False,
            cwd="/",
            env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(_shared_src())},
        )
        connector = conn.pid
        # The connecting process exits once its exchange is done; its pid is
        # then free for a process of a group that may read the file.
        assert conn.wait(timeout=30) == 0
        other = steer_pid(
            procs,
            connector,
            ["setpriv", "--reuid=65534", "--regid=65534", f"--groups={group}", "sleep", "60"],
        )
        assert other is not None, f"could not get pid {connector} reused"
        wait_for(lambda: uid_of(connector) == 65534, 10, what="the pid to be reused")
        assert conn.stdin is not None and conn.stdout is not None
        conn.stdin.write(b"go\n")
        conn.stdin.close()
        st, doc = json.loads(read_line(conn.stdout.fileno(), timeout=60))
        conn.stdout.close()
        adopt_if_restored(procs, st, doc)
        assert not holders(f, exclude={sdaemon.pid, os.getpid()})
        assert st == 422 and doc["code"] == "inherit_path_failed", doc
        assert doc["errno"] == "EACCES", doc


# -- the path form opens with every group of the caller -----------------------------


def test_supplementary_groups_open_group_files(
    users: Accounts, sdaemon: Daemon, no_fd_leak: None, procs: Procs
) -> None:
    with a_dir() as d:
        f = d / "group-only"
        f.write_bytes(SECRET)
        os.chown(f, 0, users.extra_gids[1])
        f.chmod(0o640)
        alice_ck = dead_checkpoint(users.alice, sdaemon, procs)
        bob_ck = dead_checkpoint(users.bob, sdaemon, procs)
        st, doc = call_as(
            users.alice, sdaemon, "POST", "/v1/restores", path_restore(alice_ck, str(f))
        )
        adopt_if_restored(procs, st, doc)
        assert st == 201, doc
        assert os.readlink(f"/proc/{doc['pid']}/fd/0") == str(f)
        st, doc = call_as(users.bob, sdaemon, "POST", "/v1/restores", path_restore(bob_ck, str(f)))
        adopt_if_restored(procs, st, doc)
        assert st == 422 and doc["code"] == "inherit_path_failed", doc
        assert doc["errno"] == "EACCES", doc


def test_write_modes_create_files_as_the_caller(
    users: Accounts, sdaemon: Daemon, no_fd_leak: None, procs: Procs
) -> None:
    bob = users.bob
    with a_dir(bob) as mine, a_dir() as roots:
        ck = dead_checkpoint(bob, sdaemon, procs)
        # Not in a dir only root may write to ...
        st, doc = call_as(
            bob, sdaemon, "POST", "/v1/restores", path_restore(ck, str(roots / "x"), "w")
        )
        adopt_if_restored(procs, st, doc)
        assert st == 422 and doc["errno"] == "EACCES", doc
        assert not (roots / "x").exists()
        # ... and in bob's own, the file is bob's.
        st, doc = call_as(
            bob, sdaemon, "POST", "/v1/restores", path_restore(ck, str(mine / "y"), "a")
        )
        adopt_if_restored(procs, st, doc)
        assert st == 201, doc
        assert (mine / "y").stat().st_uid == bob.uid
        assert (mine / "y").stat().st_gid == bob.gid


# -- item 10: O_PATH fds are not readable ---------------------------------------------

OPATH_HOLDER = r"""
import os, sys, time
fd = os.open(sys.argv[1], os.O_PATH)
os.dup2(fd, 5)
print("ready", flush=True)
time.sleep(1000)
"""


def test_o_path_fds_are_mode_path(sdaemon: Daemon, no_fd_leak: None, procs: Procs) -> None:
    with a_dir() as d:
        f = d / "f"
        f.write_bytes(b"x")
        r, w = os.pipe()
        try:
            p = procs.python(OPATH_HOLDER, str(f), stdout=w)
            os.close(w)
            w = -1
            assert read_line(r) == b"ready\n"
        finally:
            if w >= 0:
                os.close(w)
            os.close(r)
        tree = sdaemon.client.inspect_pid(p.pid)
        (fd5,) = [x for t in tree["tasks"] for x in t["fds"] if x["fd"] == 5]
        assert fd5["mode"] == "path", fd5
        fd = os.open(f, os.O_PATH | os.O_CLOEXEC)
        try:
            handle = sdaemon.client.send_fds([fd])["handle"]
        finally:
            os.close(fd)
        try:
            (h,) = [h for h in sdaemon.client.fd_handles() if h["handle"] == handle]
            assert h["fds"][0]["mode"] == "path", h
        finally:
            sdaemon.client.delete_fd_handle(handle)
