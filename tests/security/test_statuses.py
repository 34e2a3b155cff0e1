"""Statuses that were wrong: each hostile or unlucky case gets its own 4xx/5xx and code.

- an absurdly long signal number: 422, not Python's int-digits ValueError (500);
- criu refused ptrace on a task of the caller's own tree: 403, not 409 process_gone;
- a full state dir: 507 no_space, not a 500, and the daemon keeps serving and
  loses nothing;
- a corrupt database: one clear line and exit 1 at start-up, not a traceback.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.integration.helpers import (
    CRIU,
    Daemon,
    Procs,
    pid_gone,
    small_state_dir,
    temp_root,
    wait_for,
)
from tests.security.users import Accounts, User, call_as, run_as

# A raw request as whoever runs it (json.dumps cannot write a 5,000-digit int).
RAW = r"""
import json, sys
from criud.api.client import UnixConnection
conn = UnixConnection(sys.argv[1], 60)
conn.request("POST", sys.argv[2], body=sys.argv[3].encode(),
             headers={"Content-Type": "application/json"})
resp = conn.getresponse()
print(json.dumps([resp.status, json.loads(resp.read())]))
"""


def _raw_as(user: User, daemon: Daemon, path: str, body: str) -> tuple[int, Any]:
    out = run_as(user, RAW, str(daemon.socket), path, body)
    assert out.returncode == 0, out.stderr
    status, doc = json.loads(out.stdout)
    return int(status), doc


def test_huge_signal_number_is_422(users: Accounts, sdaemon: Daemon) -> None:
    path = "/v1/restores/0123456789abcdef01234567/signal"
    digits = "9" * 5000
    st, doc = _raw_as(users.bob, sdaemon, path, json.dumps({"signal": digits}))
    assert (st, doc["code"]) == (422, "invalid_request"), doc
    # As a JSON number it never reaches the route: the body cannot be
    # decoded (json.loads has the same digit limit), a 400 like any such body.
    st, doc = _raw_as(users.bob, sdaemon, path, '{"signal": ' + digits + "}")
    assert (st, doc["code"]) == (400, "invalid_request"), doc
    # A plain unknown number is still told apart from a known one.
    st, doc = call_as(users.bob, sdaemon, "POST", path, {"signal": "99999"})
    assert st in (404, 422) and doc["code"], doc
    assert sdaemon.client.request("GET", "/healthz")[0] == 200


# A process of user U that cannot be ptraced by U: it starts as root and
# drops to U keeping a saved uid of 0 (argv[3] == "uid"), or a saved and
# effective gid of 0 (argv[3] == "gid", as a setgid-root program runs).
# Either makes it non-dumpable, so criu running as U is refused PTRACE_SEIZE.
UNTRACEABLE = r"""
import os, sys, time
uid, gid, how = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
os.setgroups([gid])
if how == "gid":
    os.setresgid(gid, 0, 0)
    os.setresuid(uid, uid, uid)
else:
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, 0)
time.sleep(1000)
"""


@pytest.mark.parametrize("how", ["uid", "gid"])
def test_ptrace_refused_is_403(users: Accounts, sdaemon: Daemon, procs: Procs, how: str) -> None:
    bob = users.bob
    p = procs.spawn([sys.executable, "-c", UNTRACEABLE, str(bob.uid), str(bob.gid), how], cwd="/")

    def dropped() -> bool:
        try:
            with open(f"/proc/{p.pid}/status") as f:
                return f"Uid:\t{bob.uid}\t{bob.uid}" in f.read()
        except OSError:
            return False

    wait_for(dropped, 10, what=f"pid {p.pid} to run as bob")
    st, doc = call_as(bob, sdaemon, "POST", "/v1/checkpoints", {"pid": p.pid})
    # The owner check reads all four ids and refuses this tree before criu
    # (mixed_credentials, a permission_denied); criu's own EPERM on seize is
    # classified as permission_denied too (tests/unit/daemon/test_criu_errors.py,
    # with the logs of these two processes).  Either way: 403, never 409.
    assert st == 403 and doc["code"] in ("permission_denied", "mixed_credentials"), doc
    # Whatever refused it, the process is left running.
    assert p.poll() is None and not pid_gone(p.pid)


def _fill(path: Path) -> None:
    """Write zeros into path until the filesystem is full."""
    chunk = b"\0" * 65536
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(chunk)
        except OSError as e:
            assert e.errno == 28, e  # ENOSPC
    # Smaller writes take what the 64 KiB ones left.
    with open(path, "ab", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 512)
        except OSError:
            pass


def _ask(daemon: Daemon, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    from criud.api.client import CriudClientError

    try:
        return daemon.client.request(method, path, body)
    except CriudClientError as e:
        return e.status, e.problem


def test_full_state_dir_is_507_and_loses_nothing(procs: Procs) -> None:
    with temp_root() as root, small_state_dir(root, "16m") as state:
        d = Daemon(root)
        try:
            d.start()
            _full_state_dir(d, state, procs)
        finally:
            rc = d.stop()
        assert rc == 0, d.log()


def _full_state_dir(d: Daemon, state: Path, procs: Procs) -> None:
    first = procs.spawn(["sleep", "1000"])
    st, kept = _ask(d, "POST", "/v1/checkpoints", {"pid": first.pid, "name": "kept"})
    assert st == 201, kept
    first.wait(timeout=10)
    filler = state / "filler"
    _fill(filler)
    victim = procs.spawn(["sleep", "1000"])
    # Full: the checkpoint's record cannot be written (SQLITE_FULL).
    for _ in range(2):
        st, doc = _ask(d, "POST", "/v1/checkpoints", {"pid": victim.pid, "name": "new"})
        assert (st, doc["code"]) == (507, "no_space"), doc
        assert victim.poll() is None, "a failed checkpoint must leave its process running"
    # Room for the record but not for the images: criu's writes fail.
    room = kept["size_bytes"] // 4
    os.truncate(filler, filler.stat().st_size - room)
    st, doc = _ask(d, "POST", "/v1/checkpoints", {"pid": victim.pid, "name": "new"})
    assert (st, doc["code"]) == (507, "no_space"), doc
    assert victim.poll() is None, "a failed checkpoint must leave its process running"
    _fill(filler)
    # Still serving: reads work, and nothing already there is gone.
    assert d.client.request("GET", "/healthz")[0] == 200
    st, listed = _ask(d, "GET", "/v1/checkpoints")
    assert st == 200 and [c["id"] for c in listed if c["state"] == "done"] == [kept["id"]]
    filler.unlink()

    # The attempt whose last update the full disk refused is settled once
    # there is room: failed, its name free again.
    def settled() -> bool:
        recs = d.client.request("GET", "/v1/checkpoints")[1]
        return all(c["state"] == "failed" for c in recs if c["id"] != kept["id"])

    wait_for(settled, 15, what="the failed checkpoint's record to settle")
    # With space again: the kept checkpoint restores, and a new one (with the
    # name the failed attempts asked for) can be made.
    st, rs = _ask(d, "POST", "/v1/restores", {"checkpoint": "kept"})
    assert st == 201, rs
    procs.adopt(rs["pid"])
    st, ck = _ask(d, "POST", "/v1/checkpoints", {"pid": victim.pid, "name": "new"})
    assert st == 201, ck
    victim.wait(timeout=10)
    d.stop()
    # The audit log kept the calls made while the disk was full.
    lines = [json.loads(x) for x in (state / "audit.log").read_text().splitlines()]
    outcomes = [e["outcome"] for e in lines if e["action"] in ("checkpoint", "restore")]
    assert outcomes == ["ok", "no_space", "no_space", "no_space", "ok", "ok"], outcomes


def _serve_argv(d: Daemon) -> list[str]:
    return [
        sys.executable, "-m", "criud.daemon.cli",
        "--socket", str(d.socket), "--fd-socket", str(d.fd_socket),
        "serve", "--state-dir", str(d.state_dir), "--criu", CRIU,
    ]  # fmt: skip


@pytest.mark.parametrize("kind", ["garbage", "newer"])
def test_unusable_database_is_one_line_and_exit_1(kind: str) -> None:
    with temp_root() as root:
        d = Daemon(root)
        d.state_dir.mkdir(mode=0o700)
        db = d.state_dir / "criud.db"
        if kind == "garbage":
            db.write_bytes(os.urandom(8192))
            expect = "not a database"
        else:
            conn = sqlite3.connect(db)
            conn.execute("PRAGMA user_version = 999")
            conn.close()
            expect = "schema version 999"
        before = db.read_bytes()
        env = {k: v for k, v in os.environ.items() if not k.startswith("CRIUD_")}
        out = subprocess.run(_serve_argv(d), capture_output=True, text=True, timeout=120, env=env)
        assert out.returncode == 1, out.stderr
        assert "Traceback" not in out.stderr, out.stderr
        last = out.stderr.strip().splitlines()[-1]
        assert last.startswith("criud serve: ") and str(db) in last and expect in last, last
        # Nothing was written into a database the daemon could not read.
        assert db.read_bytes() == before
        assert not d.socket.exists()
