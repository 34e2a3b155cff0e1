"""One caller must not exhaust the daemon: quotas, fd budget, header timeout, TCP token.

The attacker is bob, a real member of the socket group, with processes of
his own: he floods the fd socket with handles, holds connections open with
half-sent request heads, and runs checkpoints in parallel.  Through all of
it root's own requests must keep answering, and every refusal bob gets must
be a clear answer with a stable code.  Every flood is bounded in count and
time, and what it leaves in the daemon is deleted (and checked to be gone).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from criud.api.client import Client, UnixConnection
from criud.daemon.criu import CAP_SYS_RESOURCE, HANDLE_WORKERS_MAX, has_cap
from tests.integration.helpers import (
    Daemon,
    Procs,
    _shared_src,
    other_children,
    pool_workers,
    read_line,
    temp_root,
    wait_for,
)
from tests.security.users import Accounts, User, call_as, calls_as, run_as, spawn_as

# Bob's fd-socket flood: up to max_msgs messages of `per` copies of one pipe
# end (SCM_RIGHTS installs a new fd in the daemon for each copy), each
# handle kept for ten minutes; stops `extra` refusals after the first.
FLOOD = r"""
import json, os, socket, sys
from criud.daemon.fdpass import send_fds
path, max_msgs, per, extra = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
r, w = os.pipe()
handles, refusals = [], []
for i in range(max_msgs):
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.settimeout(10)
        s.connect(path)
        send_fds(s, json.dumps({"ttl_s": 600}).encode(), [r] * per)
        raw = s.recv(65536)
    reply = json.loads(raw) if raw else {"error": {"code": "closed"}}
    if "handle" in reply:
        handles.append(reply["handle"])
    else:
        refusals.append(reply["error"])
        if len(refusals) > extra:
            break
print(json.dumps({"handles": handles, "refusals": refusals}))
"""

# Bob's slowloris: opens `count` connections (unix path, or host:port over
# TCP from `nsrc` loopback addresses), each sending a request head that never
# ends.  It reports what the daemon answered within a few seconds, then on
# "watch N" reports which of the connections it still held got closed (and
# with what) within N seconds, then exits on "done".
HOLD = r"""
import json, selectors, socket, sys, time
kind, target, count, nsrc = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
keepalive = len(sys.argv) > 5
head = b"GET /v1/version HTTP/1.1\r\nHost: x\r\nX-Slow: "
socks = []
for i in range(count):
    if kind == "unix":
        # Blocking: a unix connect waits for room in the listen backlog
        # (with a timeout set, it would fail at once with EAGAIN).
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(target)
        s.settimeout(10)
    else:
        host, port = target.rsplit(":", 1)
        s = socket.socket()
        s.settimeout(10)
        s.bind((f"127.0.0.{2 + i % nsrc}", 0))
        s.connect((host, int(port)))
    try:
        if keepalive:
            # A whole request first: the partial head is the second one.
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            first = b""
            while not first.endswith(b'"status":"ok"}'):
                chunk = s.recv(65536)
                assert chunk, first
                first += chunk
            assert first.startswith(b"HTTP/1.1 200"), first
        s.sendall(head)
    except OSError:
        pass
    socks.append(s)

def gather(live, seconds):
    sel = selectors.DefaultSelector()
    data = {s: b"" for s in live}
    for s in live:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    ended = {}
    deadline = time.monotonic() + seconds
    while len(ended) < len(live) and time.monotonic() < deadline:
        for key, _ in sel.select(max(0.0, deadline - time.monotonic())):
            s = key.fileobj
            try:
                chunk = s.recv(65536)
            except OSError:
                chunk = b""
            if chunk:
                data[s] += chunk
            else:
                sel.unregister(s)
                ended[s] = time.monotonic()
    sel.close()
    return data, ended

def summary(data, ended, t0):
    out = []
    for s, got in data.items():
        if s not in ended:
            continue
        head, _, body = got.partition(b"\r\n\r\n")
        status = int(head.split()[1]) if head.startswith(b"HTTP/1.1 ") else 0
        try:
            code = json.loads(body).get("code")
        except ValueError:
            code = None
        out.append([status, code, round(ended[s] - t0, 2)])
    return out

t0 = time.monotonic()
data, ended = gather(socks, 3.0)
held = [s for s in socks if s not in ended]
print(json.dumps({"answered": summary(data, ended, t0), "held": len(held)}), flush=True)
for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == "watch":
        t0 = time.monotonic()
        data, ended = gather(held, float(cmd[1]))
        print(json.dumps({"closed": summary(data, ended, t0),
                          "held": len(held) - len(ended)}), flush=True)
    else:
        break
"""

PARTIAL = "too_many_connections"


@contextlib.contextmanager
def holding(user: User, *args: str) -> Iterator[tuple[subprocess.Popen[str], dict[str, Any]]]:
    """Run HOLD as user; yield it with its first report; stop it at the end."""
    p = subprocess.Popen(
        [*user.setpriv(), os.path.realpath(sys.executable), "-c", HOLD, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd="/",
        env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(_shared_src())},
    )
    try:
        assert p.stdout is not None
        line = _readline(p, 60)
        yield p, json.loads(line)
    finally:
        with contextlib.suppress(OSError):
            assert p.stdin is not None
            p.stdin.write("done\n")
            p.stdin.flush()
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=10)


def _readline(p: subprocess.Popen[str], timeout: float) -> str:
    import select

    assert p.stdout is not None
    r, _, _ = select.select([p.stdout], [], [], timeout)
    if not r:
        raise AssertionError(f"no report from pid {p.pid} within {timeout}s")
    line = p.stdout.readline()
    if not line:
        err = p.stderr.read() if p.stderr else ""
        raise AssertionError(f"pid {p.pid} ended without a report: {err}")
    return line


def watch(p: subprocess.Popen[str], seconds: float) -> dict[str, Any]:
    assert p.stdin is not None
    p.stdin.write(f"watch {seconds}\n")
    p.stdin.flush()
    return dict(json.loads(_readline(p, seconds + 30)))


def flood(user: User, d: Daemon, max_msgs: int = 2000, per: int = 64) -> dict[str, Any]:
    out = run_as(user, FLOOD, str(d.fd_socket), str(max_msgs), str(per), "5", timeout=300)
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout))


def delete_handles(user: User, d: Daemon, handles: list[str]) -> None:
    for i in range(0, len(handles), 200):
        chunk = handles[i : i + 200]
        got = calls_as(user, d, [("DELETE", f"/v1/fd-handles/{h}", None) for h in chunk])
        assert all(st == 204 for st, _ in got), got[:3]


def roots_view_is_intact(d: Daemon, procs: Procs) -> None:
    """root can hand over fds, checkpoint a real process and inspect a live one."""
    r, w = os.pipe()
    try:
        sent = d.client.send_fds([r] * 8, ttl_s=30)
        assert sent["count"] == 8, sent
        d.client.delete_fd_handle(sent["handle"])
    finally:
        os.close(r)
        os.close(w)
    target = procs.spawn(["sleep", "1000"])
    t0 = time.monotonic()
    st, tree = d.client.request("GET", f"/v1/processes/{target.pid}")
    assert st == 200 and tree["root"] == target.pid
    ck = d.client.checkpoint(target.pid, leave_running=True)
    assert ck["state"] == "done"
    d.client.delete(ck["id"])
    assert time.monotonic() - t0 < 30


def settle_fds(d: Daemon, baseline: int) -> None:
    wait_for(
        lambda: d.fd_count() <= baseline,
        30,
        what=f"the daemon's fd count to come back to {baseline} (now {d.fd_count()})",
    )


def quiet_fd_count(d: Daemon) -> int:
    """The daemon's fd count once it holds still (no request of ours in flight)."""
    time.sleep(0.5)
    return d.settled_fd_count()


def group_daemon(root: Path, users: Accounts, *args: str, prefix: tuple[str, ...] = ()) -> Daemon:
    return Daemon(root, args=["--socket-group", users.sock_group, *args], prefix=prefix).start()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- (a) fd handle flood ----------------------------------------------------------


def test_fd_flood_is_capped_per_uid_and_root_keeps_working(
    users: Accounts, sdaemon: Daemon, procs: Procs
) -> None:
    baseline = quiet_fd_count(sdaemon)
    got = flood(users.bob, sdaemon)
    try:
        assert got["refusals"], "bob's flood was never refused"
        codes = {e["code"] for e in got["refusals"]}
        assert codes <= {"too_many_handles", "too_many_held_fds"}, got["refusals"]
        assert all(e["message"] for e in got["refusals"])
        # The cap held: bob holds no more than his share of fds.
        held = sum(h["count"] for h in call_as(users.bob, sdaemon, "GET", "/v1/fd-handles")[1])
        assert held == 64 * len(got["handles"]) <= 1024
        roots_view_is_intact(sdaemon, procs)
    finally:
        delete_handles(users.bob, sdaemon, got["handles"])
    settle_fds(sdaemon, baseline)


def test_a_users_handles_start_no_criu_worker_of_roots(users: Accounts, sdaemon: Daemon) -> None:
    # A root criu worker is started for an fd handle only where root's criu
    # would restore the handle owner's trees.  Without CAP_SYS_RESOURCE
    # (this kind of VM) bob's trees are restored by criu run as bob: his
    # handles start no root process holding his fds.  Anywhere, handles
    # never make the daemon run more than HANDLE_WORKERS_MAX such workers.
    before = set(pool_workers(sdaemon.pid))
    got = flood(users.bob, sdaemon, max_msgs=20, per=1)
    try:
        assert len(got["handles"]) == 20, got
        time.sleep(1.0)  # a worker would be started at once, in the background
        new = set(pool_workers(sdaemon.pid)) - before
        assert len(new) <= HANDLE_WORKERS_MAX, new
        if not has_cap(CAP_SYS_RESOURCE):
            assert not new, new
    finally:
        delete_handles(users.bob, sdaemon, got["handles"])


def test_fd_flood_cannot_take_roots_share_of_the_fd_budget(users: Accounts, procs: Procs) -> None:
    # A daemon whose fd limit (512, and it cannot raise it) is below what
    # the per-uid caps would let two users hold: the budget is what binds.
    with temp_root() as root:
        d = group_daemon(root, users, prefix=("prlimit", "--nofile=512:512", "--"))
        try:
            baseline = quiet_fd_count(d)
            bob = flood(users.bob, d)
            alice = flood(users.alice, d)
            try:
                for got in (bob, alice):
                    assert got["refusals"], "a flood was never refused"
                    assert {e["code"] for e in got["refusals"]} <= {
                        "out_of_fds",
                        "too_many_held_fds",
                    }, got["refusals"]
                assert any(e["code"] == "out_of_fds" for e in alice["refusals"])
                # Never near the limit itself: root's share and the daemon's
                # own reserve are left.
                assert d.fd_count() < 512 - 100, d.fd_count()
                roots_view_is_intact(d, procs)
            finally:
                delete_handles(users.bob, d, bob["handles"])
                delete_handles(users.alice, d, alice["handles"])
            settle_fds(d, baseline)
            assert "Too many open files" not in d.log()
        finally:
            assert d.stop() == 0


# -- (b) slowloris on the API socket ----------------------------------------------


def test_slowloris_on_the_api_socket_leaves_root_served(users: Accounts, sdaemon: Daemon) -> None:
    baseline = quiet_fd_count(sdaemon)
    with holding(users.bob, "unix", str(sdaemon.socket), "1100", "1") as (_, report):
        # While bob holds his share, root's requests answer at once.
        for _ in range(20):
            t0 = time.monotonic()
            assert sdaemon.client.request("GET", "/v1/checkpoints")[0] == 200
            assert time.monotonic() - t0 < 2.0
        held, answered = report["held"], report["answered"]
        assert 0 < held <= 64, report
        refused = [a for a in answered if a[:2] == [503, PARTIAL]]
        assert len(refused) >= 1100 - 64, answered[:5]
        assert len(refused) == len(answered), [a for a in answered if a[:2] != [503, PARTIAL]][:5]
        # Another member of the group still gets in: bob's share is his own.
        assert call_as(users.alice, sdaemon, "GET", "/v1/checkpoints")[0] == 200
    settle_fds(sdaemon, baseline)


def test_header_timeout_closes_partial_heads(users: Accounts) -> None:
    with temp_root() as root:
        d = group_daemon(root, users, "--header-timeout", "1")
        try:
            with holding(users.bob, "unix", str(d.socket), "5", "1") as (p, report):
                closed = report["answered"] + (watch(p, 10)["closed"] if report["held"] else [])
                assert len(closed) == 5
                assert all(c[:2] == [408, "header_timeout"] for c in closed), closed
            # A kept-alive connection whose second head never ends: uvicorn's
            # keep-alive timer stops at its first byte, ours does not.
            with holding(users.bob, "unix", str(d.socket), "3", "1", "keepalive") as (p, report):
                closed = report["answered"] + (watch(p, 10)["closed"] if report["held"] else [])
                assert len(closed) == 3
                assert all(c[:2] == [408, "header_timeout"] for c in closed), closed
            assert d.client.request("GET", "/healthz")[0] == 200
        finally:
            assert d.stop() == 0


# A head that never ends but keeps growing: its bytes are cut at a cap long
# before the header timeout (a parser that kept them would hold megabytes).
ENDLESS_HEAD = r"""
import json, socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(20)
s.connect(sys.argv[1])
s.sendall(b"GET /v1/version HTTP/1.1\r\nHost: x\r\nX-Big: ")
sent, answer, t0 = 0, b"", time.monotonic()
try:
    while sent < (8 << 20):
        s.sendall(b"a" * 4096)
        sent += 4096
except OSError:
    pass  # closed on us: what we came for
s.settimeout(5)
try:
    while chunk := s.recv(65536):
        answer += chunk
except OSError:
    pass
print(json.dumps([sent, answer.split(b"\r\n", 1)[0].decode(), time.monotonic() - t0]))
"""


def test_an_endless_head_is_cut_at_its_cap(users: Accounts, sdaemon: Daemon) -> None:
    out = run_as(users.bob, ENDLESS_HEAD, str(sdaemon.socket), timeout=60)
    assert out.returncode == 0, out.stderr
    sent, status, took = json.loads(out.stdout)
    # Refused as a bad request well before the header timeout (10 s), having
    # taken at most a few socket buffers past the cap, not the 8 MiB offered.
    assert status == "HTTP/1.1 400 Bad Request", (status, sent)
    assert sent < (4 << 20) and took < 8, (sent, took)
    assert sdaemon.client.request("GET", "/healthz")[0] == 200


# -- (c, e) the TCP listener ----------------------------------------------------------


def tcp_get(port: int, path: str, token: str | None = None) -> tuple[int, Any]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        c.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
        resp = c.getresponse()
        raw = resp.read()
        ctype = resp.getheader("content-type", "")
        return resp.status, json.loads(raw) if "json" in ctype else raw.decode()
    finally:
        c.close()


@contextlib.contextmanager
def tcp_daemon(users: Accounts, *args: str) -> Iterator[tuple[Daemon, int, str]]:
    with temp_root() as root:
        token = secrets.token_hex(16)
        tf = root / "token"
        tf.write_text(token + "\n")
        tf.chmod(0o600)
        port = free_port()
        d = group_daemon(
            root, users, "--listen", f"tcp://127.0.0.1:{port}", "--token-file", str(tf), *args
        )
        try:
            yield d, port, token
        finally:
            assert d.stop() == 0


def test_tcp_without_token_answers_only_healthz(users: Accounts) -> None:
    with tcp_daemon(users) as (_, port, token):
        for path in ("/v1/version", "/openapi.json", "/docs", "/redoc", "/v1/nothing-here"):
            st, body = tcp_get(port, path)
            assert st == 401 and body["code"] == "unauthorized", (path, st, body)
        assert tcp_get(port, "/healthz")[0] == 200
        assert tcp_get(port, "/v1/version", token)[0] == 200
        st, doc = tcp_get(port, "/openapi.json", token)
        assert st == 200 and "/v1/checkpoints" in doc["paths"]


def test_tcp_slowloris_is_held_to_its_own_pool(users: Accounts) -> None:
    # 300 connections from 8 loopback addresses, no token, heads unfinished.
    with (
        tcp_daemon(users) as (d, port, token),
        holding(users.bob, "tcp", f"127.0.0.1:{port}", "300", "8") as (_, report),
    ):
        for _ in range(20):
            t0 = time.monotonic()
            assert d.client.request("GET", "/v1/checkpoints")[0] == 200
            assert time.monotonic() - t0 < 2.0
        assert call_as(users.alice, d, "GET", "/v1/checkpoints")[0] == 200
        held, answered = report["held"], report["answered"]
        assert 0 < held <= 64, report
        assert len(answered) == 300 - held
        assert all(a[:2] == [503, PARTIAL] for a in answered), answered[:5]
        # The TCP pool is full: a TCP caller gets a clear answer, not a hang.
        st, body = tcp_get(port, "/v1/version", token)
        assert (st, body["code"]) == (503, PARTIAL)


# -- (d) in-flight operations per uid ---------------------------------------------

SYS_PYTHON = "/usr/bin/python3"
BIG = "b = bytearray(b'x') * ({mb} << 20); import time; print('ok', flush=True); time.sleep(1000)"

PARALLEL = r"""
import json, sys, threading
from criud.api.client import Client, CriudClientError
c = Client(sys.argv[1], sys.argv[2], timeout=120)
pids = json.loads(sys.argv[3])
barrier = threading.Barrier(len(pids))
out = [None] * len(pids)
def one(i):
    barrier.wait()
    try:
        out[i] = [201, c.checkpoint(pids[i])["id"]]
    except CriudClientError as e:
        out[i] = [e.status, e.code, e.detail]
ts = [threading.Thread(target=one, args=(i,)) for i in range(len(pids))]
for t in ts: t.start()
for t in ts: t.join(120)
print(json.dumps(out))
"""


def test_inflight_operations_are_capped_per_uid(users: Accounts, procs: Procs) -> None:
    with temp_root() as root:
        d = group_daemon(root, users, "--max-ops-per-uid", "2")
        try:
            pids = []
            for _ in range(5):
                r, w = os.pipe()
                # The system's python, with nothing of root's environment (a
                # PYTHONPATH) mapped in: criu, run as bob, must stat every
                # file the process maps.
                argv = [SYS_PYTHON, "-I", "-c", BIG.format(mb=192)]
                env = {"PATH": "/usr/bin:/bin"}
                pid = spawn_as(procs, users.bob, argv, stdout=w, env=env)
                os.close(w)
                assert read_line(r, 30) == b"ok\n"
                os.close(r)
                pids.append(pid)
            mine = procs.spawn(["sleep", "1000"])
            p = subprocess.Popen(
                [
                    *users.bob.setpriv(),
                    os.path.realpath(sys.executable),
                    "-c",
                    PARALLEL,
                    *(str(d.socket), str(d.fd_socket), json.dumps(pids)),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd="/",
                env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(_shared_src())},
            )
            # While bob's checkpoints run (criu is a child of the daemon), root's runs too.
            # Not a warm worker: bob's criu runs as bob, the CLI way.
            wait_for(lambda: other_children(d.pid), 30, interval=0.01, what="bob's criu to start")
            ck = d.client.checkpoint(mine.pid, leave_running=True)
            assert ck["state"] == "done"
            out, err = p.communicate(timeout=180)
            assert p.returncode == 0, err
            results = json.loads(out)
            logs = subprocess.run(
                f"grep -h -B12 'stat path' {root}/state/checkpoints/*/dump.log",
                shell=True,
                capture_output=True,
                text=True,
            ).stdout
            print(logs)
            assert [r[0] for r in results].count(201) >= 1, results
            refused = [r for r in results if r[0] != 201]
            assert len(refused) >= 3, results
            assert all(r[:2] == [429, "too_many_operations"] for r in refused), results
        finally:
            assert d.stop() == 0


# -- (f) fd exhaustion answers 503 out_of_fds ---------------------------------------


def _limits(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return int(soft), int(hard)
    raise AssertionError("no Max open files line")


def _lowest_free_fd(pid: int) -> int:
    used = {int(n) for n in os.listdir(f"/proc/{pid}/fd")}
    return next(n for n in range(len(used) + 1) if n not in used)


def test_fd_exhaustion_is_503_out_of_fds(users: Accounts, procs: Procs) -> None:
    # The daemon starts with a soft limit of 256 and raises it to the hard
    # limit (4096) itself.  Then, on a running daemon, the soft limit is
    # lowered to its lowest free fd: every fd it would open from then on
    # fails with EMFILE, deterministically (a start-up limit cannot be
    # sized to that, since the daemon's own fd count is known only once it
    # runs).  The request travels on a connection opened before that.
    with temp_root() as root:
        d = group_daemon(root, users, prefix=("prlimit", "--nofile=256:4096", "--"))
        try:
            assert _limits(d.pid) == (4096, 4096)
            target = procs.spawn(["sleep", "1000"])
            conn = UnixConnection(str(d.socket), 30)

            def ask(method: str, path: str, body: Any = None) -> tuple[int, Any]:
                payload = json.dumps(body).encode() if body is not None else None
                conn.request(
                    method, path, body=payload, headers={"Content-Type": "application/json"}
                )
                resp = conn.getresponse()
                return resp.status, json.loads(resp.read())

            assert ask("GET", "/healthz")[0] == 200
            limit = _lowest_free_fd(d.pid)
            subprocess.run(
                ["prlimit", f"--pid={d.pid}", f"--nofile={limit}:4096"], check=True, timeout=10
            )
            try:
                st, body = ask("GET", f"/v1/processes/{target.pid}")
                assert (st, body["code"]) == (503, "out_of_fds"), body
                st, body = ask(
                    "POST", "/v1/checkpoints", {"pid": target.pid, "leave_running": True}
                )
                assert (st, body["code"]) == (503, "out_of_fds"), body
            finally:
                subprocess.run(
                    ["prlimit", f"--pid={d.pid}", "--nofile=4096:4096"], check=True, timeout=10
                )
                conn.close()
            st, tree = Client(str(d.socket), str(d.fd_socket), 30).request(
                "GET", f"/v1/processes/{target.pid}"
            )
            assert st == 200 and tree["root"] == target.pid
        finally:
            assert d.stop() == 0
