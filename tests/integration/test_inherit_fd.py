"""Handing fds to restores over SCM_RIGHTS (issue: inherit-fd)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from criud.api.client import CriudClientError
from tests.integration.helpers import (
    CRIU,
    HELLO,
    Daemon,
    Procs,
    checkpoint_hello,
    drain_after,
    drain_hello,
    fd_table,
    hello_num,
    pid_gone,
    read_line,
    restore_into_pipe,
    run_python_as,
    send_raw,
    start_hello,
    temp_root,
    wait_for,
)

# Like HELLO, but first opens a file of its own at fd 3 (argv[1]).
HELLO_FD3 = (
    r"""
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
"""
    + HELLO
)


def test_pipe_handoff_continues_counting(daemon: Daemon, procs: Procs) -> None:
    p, old_r = start_hello(procs)
    first = hello_num(read_line(old_r))
    assert first == 0
    ck = daemon.client.checkpoint(p.pid, name="hello-pipe")
    key = f"pipe:[{os.fstat(old_r).st_ino}]"
    assert ck["external"] == [key]
    stdout = [f for f in daemon.client.inspect(ck["id"])["fds"] if f["fd"] == 1]
    assert stdout and stdout[0]["key"] == key and stdout[0]["external"] is True
    assert stdout[0]["type"] == "pipe" and stdout[0]["mode"] == "w"
    last = drain_after(p, old_r, first)

    t0 = time.monotonic()
    _, new_r = restore_into_pipe(daemon.client, procs, "hello-pipe", key)
    nxt = hello_num(read_line(new_r))
    elapsed = time.monotonic() - t0
    assert nxt == last + 1, (last, nxt)
    assert hello_num(read_line(new_r)) == nxt + 1
    os.close(new_r)
    print(f"hand-off to first line: {elapsed * 1000:.1f} ms")


def test_restore_by_original_fd(daemon: Daemon, procs: Procs) -> None:
    p, old_r = start_hello(procs)
    first = hello_num(read_line(old_r))
    ck = daemon.client.checkpoint(p.pid)
    last = drain_after(p, old_r, first)
    _, new_r = restore_into_pipe(daemon.client, procs, ck["id"], (p.pid, 1))
    assert hello_num(read_line(new_r)) == last + 1
    os.close(new_r)


LOGGER = "i=0; while :; do echo line $i; i=$((i+1)); sleep 0.05; done"


@pytest.mark.parametrize("form", ["path", "fd"])
def test_log_file_redirected(daemon: Daemon, procs: Procs, tmp_path: Path, form: str) -> None:
    old, new = tmp_path / "old.log", tmp_path / "new.log"
    with open(old, "ab") as f:
        p = procs.spawn(["sh", "-c", LOGGER], stdout=f)
    wait_for(lambda: old.stat().st_size > 0, 10, what="old.log to grow")
    ck = daemon.client.checkpoint(p.pid)
    key = str(old).lstrip("/")
    assert any(
        f["key"] == key and f["fd"] == 1 and f["type"] == "file"
        for f in daemon.client.inspect(ck["id"])["fds"]
    )
    p.wait(timeout=10)
    size_at_dump = old.stat().st_size
    if form == "path":
        r = daemon.client.restore(ck["id"], paths={key: (str(new), "a")})
    else:
        fd = os.open(new, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            r = daemon.client.restore(ck["id"], fds={(p.pid, 1): fd})
        finally:
            os.close(fd)
    procs.adopt(r["pid"])
    wait_for(
        lambda: new.exists() and new.read_text().count("\n") >= 3,
        10,
        what="new.log to receive lines",
    )
    assert old.stat().st_size == size_at_dump
    lines = new.read_text().splitlines()
    assert all(ln.startswith("line ") for ln in lines)
    assert int(lines[0].split()[1]) > 0  # the loop's counter carried on


def test_client_fd_number_clashes_with_restored_fd(
    daemon: Daemon, procs: Procs, tmp_path: Path
) -> None:
    mine = tmp_path / "mine.txt"
    mine.write_text("the restored process's own fd 3\n")
    p, old_r = start_hello(procs, HELLO_FD3, str(mine))
    first = hello_num(read_line(old_r))
    before = fd_table(p.pid)
    assert before[3] == str(mine)
    ck = daemon.client.checkpoint(p.pid)
    key = next(f["key"] for f in daemon.client.inspect(ck["id"])["fds"] if f["fd"] == 1)
    last = drain_after(p, old_r, first)

    new_r, new_w = os.pipe()
    # The CLI sends its own fd 3 (the new pipe's write end) for the key, while
    # the restored process wants fd 3 for its file.
    cli = daemon.cli("--json", "restore", ck["id"], "--inherit-fd", f"fd[3]:{key}")
    script = f'exec 3>&{new_w}; exec {new_w}>&-; exec "$@"'
    out = subprocess.run(
        ["bash", "-c", script, "bash", *cli],
        pass_fds=[new_w],
        capture_output=True,
        text=True,
        timeout=60,
    )
    os.close(new_w)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    procs.adopt(r["pid"])
    assert hello_num(read_line(new_r)) == last + 1
    after = fd_table(r["pid"])
    assert after[3] == str(mine)
    assert after[1] == f"pipe:[{os.fstat(new_r).st_ino}]"
    os.close(new_r)


def test_missing_unknown_duplicate_keys_refused(daemon: Daemon, procs: Procs) -> None:
    ck, key = checkpoint_hello(daemon.client, procs)

    def refused(code: str, **kw: object) -> CriudClientError:
        with pytest.raises(CriudClientError) as e:
            daemon.client.restore(ck["id"], **kw)  # type: ignore[arg-type]
        assert e.value.status == 422, e.value
        assert e.value.code == code, e.value
        assert pid_gone(ck["pid"]) or _is_zombie(ck["pid"])
        return e.value

    err = refused("missing_inherit_fd")
    assert err.problem["keys"] == [key] and key in err.detail

    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    try:
        err = refused("unknown_inherit_key", fds={key: w1, "pipe:[1]": w2})
        assert err.problem["keys"] == ["pipe:[1]"]
        err = refused("unknown_inherit_key", fds={(ck["pid"], 77): w1})
        assert "fd 77" in err.detail
        err = refused("duplicate_inherit_key", fds={key: w1, (ck["pid"], 1): w2})
        assert err.problem["keys"] == [key]
    finally:
        for fd in (r1, w1, r2, w2):
            os.close(fd)
    # After all those refusals the checkpoint still restores.
    r, w = os.pipe()
    res = daemon.client.restore(ck["id"], fds={key: w})
    os.close(w)
    procs.adopt(res["pid"])
    read_line(r)
    os.close(r)


def _is_zombie(pid: int) -> bool:
    from tests.integration.helpers import proc_state

    return proc_state(pid) == "Z"


def test_two_consecutive_cycles(daemon: Daemon, procs: Procs) -> None:
    p, rd = start_hello(procs)
    first = hello_num(read_line(rd))
    ck = daemon.client.checkpoint(p.pid)
    last = drain_after(p, rd, first)
    for cycle in range(2):
        r, new_r = restore_into_pipe(daemon.client, procs, ck["id"], ck["external"][0])
        n = hello_num(read_line(new_r))
        assert n == last + 1, (cycle, last, n)
        # Checkpoint the restored tree: the manifest names the new pipe.
        ck = daemon.client.checkpoint(r["pid"])
        assert ck["external"] == [f"pipe:[{os.fstat(new_r).st_ino}]"]
        wait_for(
            lambda pid=r["pid"]: pid_gone(pid), 10, what="restored tree to be dumped and reaped"
        )
        last = drain_hello(new_r, n)
        os.close(new_r)


# Stands in for criu: on restore, records its own fd table, then execs the
# real criu with the same argv (and so the same fds).  A warm worker (swrk)
# records its table too, in a file of its own pid.
WRAPPER = """#!{python} -I
import json, os, sys
if sys.argv[1] in ("restore", "swrk"):
    table = {{}}
    for n in os.listdir("/proc/self/fd"):
        try:
            table[n] = os.readlink("/proc/self/fd/" + n)
        except OSError:
            pass
    out = "{out}" if sys.argv[1] == "restore" else "{out}-swrk-%d" % os.getpid()
    with open(out, "w") as f:
        json.dump(table, f)
os.execv("{criu}", ["{criu}", *sys.argv[1:]])
"""


@pytest.mark.parametrize("path", ["cli", "warm"])
def test_exact_inheritance(procs: Procs, path: str) -> None:
    """The restored tree holds exactly its dumped fds, and criu exactly what it was handed.

    cli: no warm pool, criu restore by argv.  warm: the fd handle's own
    pre-started worker serves the restore (issue 13), holding exactly its
    socket and the handle's fds.
    """
    with temp_root() as root:
        record = root / "worker-fds"
        wrapper = root / "criu-wrapper"
        wrapper.write_text(WRAPPER.format(python=sys.executable, out=record, criu=CRIU))
        wrapper.chmod(0o755)
        pool = ["--criu-pool", "0"] if path == "cli" else ["--log-level", "debug"]
        d = Daemon(root, criu=str(wrapper), args=pool).start()
        try:
            p, old_r = start_hello(procs)
            read_line(old_r)
            before = {n: _kind(t) for n, t in fd_table(p.pid).items()}
            ck = d.client.checkpoint(p.pid)
            p.wait(timeout=10)
            os.close(old_r)
            new_r, new_w = os.pipe()
            # A second handle, never mapped: its fd must not reach the worker.
            other_r, other_w = os.pipe()
            stray = d.client.send_fds([other_r])
            sent = d.client.send_fds([new_w])
            r = d.client.restore(
                ck["id"],
                inherit_fds=[{"key": ck["external"][0], "handle": sent["handle"], "index": 0}],
            )
            procs.adopt(r["pid"])
            read_line(new_r)
            after = {n: _kind(t) for n, t in fd_table(r["pid"]).items()}
            assert after == before
            if path == "warm":
                _check_warm_worker(d, root, r, new_r, other_r)
                for fd in (new_r, new_w, other_r, other_w):
                    os.close(fd)
                return

            raw = json.loads(record.read_text())
            # listdir's own directory fd shows up as /proc/<pid>/fd: not inherited.
            table = {int(n): t for n, t in raw.items() if not t.startswith("/proc/")}
            assert table[0] == "/dev/null"
            log = str(d.state_dir / "checkpoints" / ck["id"] / "restore.log")
            assert table[1] == log and table[2] == log
            mapped = {n: t for n, t in table.items() if n > 2}
            # The handed-in pipe, and criu's work dir (-W, for its pidfile
            # and stats), a fresh dir of the daemon's.
            run_dir = str(d.state_dir / "run" / r["id"])
            pipe = f"pipe:[{os.fstat(new_r).st_ino}]"
            assert sorted(mapped.values()) == sorted([pipe, run_dir]), table
            assert stray["handle"] in {h["handle"] for h in d.client.fd_handles()}
            for fd in (new_r, new_w, other_r, other_w):
                os.close(fd)
        finally:
            assert d.stop() == 0


def _check_warm_worker(d: Daemon, root: Path, r: dict[str, Any], new_r: int, other_r: int) -> None:
    """The restore ran on the handle's warm worker, which held its socket and the pipe only."""
    assert not (root / "worker-fds").exists(), "the restore should not take the CLI path"
    pipe = f"pipe:[{os.fstat(new_r).st_ino}]"
    stray = f"pipe:[{os.fstat(other_r).st_ino}]"
    tables = {}
    for f in root.glob("worker-fds-swrk-*"):
        raw = json.loads(f.read_text())
        tables[f.name] = {int(n): t for n, t in raw.items() if not t.startswith("/proc/")}
    holders = [t for t in tables.values() if pipe in t.values()]
    assert len(holders) == 1, tables
    table = holders[0]
    assert {table[0], table[1], table[2]} == {"/dev/null"}, table
    rest = sorted(t for n, t in table.items() if n > 2)
    assert len(rest) == 2 and rest[0] == pipe and rest[1].startswith("socket:["), table
    # The other handle's fd was held by its own worker alone (never used).
    for t in tables.values():
        if stray in t.values():
            rest = sorted(t for n, t in t.items() if n > 2)
            assert len(rest) == 2 and rest[0] == stray and rest[1].startswith("socket:["), t
    assert "restore: fd handle's own warm worker" in d.log_path.read_text(errors="replace")


def _kind(target: str) -> str:
    return target.split(":")[0] if ":[" in target else target


def test_handles_expired_consumed_other_uid(daemon: Daemon, procs: Procs) -> None:
    ck, key = checkpoint_hello(daemon.client, procs)
    r, w = os.pipe()
    try:
        # Expired.
        h = daemon.client.send_fds([w], ttl_s=0.2)
        assert h["count"] == 1 and h["expires_in_s"] == 0.2
        time.sleep(0.5)
        with pytest.raises(CriudClientError) as e:
            daemon.client.restore(
                ck["id"], inherit_fds=[{"key": key, "handle": h["handle"], "index": 0}]
            )
        assert e.value.code == "bad_fd_handle" and e.value.problem["reason"] == "expired"
        # Bad index.
        h = daemon.client.send_fds([w])
        with pytest.raises(CriudClientError) as e:
            daemon.client.restore(
                ck["id"], inherit_fds=[{"key": key, "handle": h["handle"], "index": 5}]
            )
        assert e.value.code == "bad_fd_handle" and e.value.problem["reason"] == "bad_index"
        # Consumed by a successful restore.
        res = daemon.client.restore(
            ck["id"], inherit_fds=[{"key": key, "handle": h["handle"], "index": 0}]
        )
        procs.adopt(res["pid"])
        read_line(r)
        assert h["handle"] not in {x["handle"] for x in daemon.client.fd_handles()}
        with pytest.raises(CriudClientError) as e:
            daemon.client.restore(
                ck["id"], inherit_fds=[{"key": key, "handle": h["handle"], "index": 0}]
            )
        assert e.value.code == "bad_fd_handle" and e.value.problem["reason"] == "consumed"
    finally:
        os.close(r)
        os.close(w)


OTHER_UID_CLIENT = r"""
import json, os, sys
from criud.api.client import Client, CriudClientError
c = Client(sys.argv[1], sys.argv[2])
mode = sys.argv[3]
if mode == "send":
    r, w = os.pipe()
    print(json.dumps(c.send_fds([w])))
else:
    try:
        c.restore("whatever", inherit_fds=[{"key": "k", "handle": sys.argv[4], "index": 0}])
    except CriudClientError as e:
        print(json.dumps(e.problem))
"""


def _as_uid(uid: int, daemon: Daemon, *args: str) -> dict[str, object]:
    out = run_python_as(uid, OTHER_UID_CLIENT, str(daemon.socket), str(daemon.fd_socket), *args)
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout))


def test_handle_of_another_uid_is_refused(daemon: Daemon) -> None:
    sent = _as_uid(65534, daemon, "send")
    handles = {h["handle"]: h for h in daemon.client.fd_handles()}
    assert handles[str(sent["handle"])]["owner_uid"] == 65534
    problem = _as_uid(65533, daemon, "use", str(sent["handle"]))
    assert problem["code"] == "bad_fd_handle" and problem["reason"] == "other_uid"
    daemon.client.delete_fd_handle(str(sent["handle"]))
    assert str(sent["handle"]) not in {h["handle"] for h in daemon.client.fd_handles()}


def test_fd_handles_listing_describes_fds(daemon: Daemon) -> None:
    r, w = os.pipe()
    try:
        h = daemon.client.send_fds([r, w], names=["stdout-r", "stdout-w"])
        listed = {x["handle"]: x for x in daemon.client.fd_handles()}[h["handle"]]
        assert listed["count"] == 2 and listed["owner_uid"] == 0
        ino = os.fstat(r).st_ino
        assert [(f["type"], f["inode"], f["mode"], f["name"]) for f in listed["fds"]] == [
            ("pipe", ino, "r", "stdout-r"),
            ("pipe", ino, "w", "stdout-w"),
        ]
        assert 0 < listed["expires_in_s"] <= 300
        daemon.client.delete_fd_handle(h["handle"])
    finally:
        os.close(r)
        os.close(w)


def test_fd_socket_refusals_close_fds(daemon: Daemon) -> None:
    base = daemon.settled_fd_count()
    r, w = os.pipe()
    try:
        assert send_raw(daemon.fd_socket, b"{}", [])["error"]["code"] == "no_fds"
        assert send_raw(daemon.fd_socket, b"not json", [r])["error"]["code"] == "bad_payload"
        assert (
            send_raw(daemon.fd_socket, json.dumps({"ttl_s": -1}).encode(), [r])["error"]["code"]
            == "bad_payload"
        )
        assert send_raw(daemon.fd_socket, b"{}", [r] * 65)["error"]["code"] == "too_many_fds"
        assert (
            send_raw(daemon.fd_socket, json.dumps({"names": ["a"]}).encode(), [r, w])["error"][
                "code"
            ]
            == "bad_payload"
        )
    finally:
        os.close(r)
        os.close(w)
    # At most base, not exactly: the session's daemon may close an fd of an
    # earlier test meanwhile (a pidfd of a restored tree that exits now).
    wait_for(lambda: daemon.fd_count() <= base, 5, what="daemon fd count back to baseline")


def test_thousand_expired_handles_leave_no_fds(daemon: Daemon) -> None:
    base = daemon.settled_fd_count()
    r, w = os.pipe()
    pipe = f"pipe:[{os.fstat(w).st_ino}]"

    def held() -> int:
        # The daemon's fds of this very pipe: what the handles hold, whatever
        # else the daemon opens or closes meanwhile.
        return sum(1 for t in fd_table(daemon.pid).values() if t == pipe)

    try:
        # ttl 3 s: all 1,000 must still be held when counted, even on a
        # loaded machine where sending them takes over a second.
        for _ in range(1000):
            assert "handle" in send_raw(daemon.fd_socket, b'{"ttl_s": 3}', [w])
        assert held() == 1000
    finally:
        os.close(r)
        os.close(w)
    wait_for(lambda: held() == 0, 15, what="fds of expired handles to close")
    # At most base, not exactly: the session's daemon may close an fd of an
    # earlier test meanwhile (a pidfd of a restored tree that exits now).
    wait_for(lambda: daemon.fd_count() <= base, 15, what="the daemon's fd count back to base")


def test_received_fds_are_cloexec(daemon: Daemon) -> None:
    r, w = os.pipe()
    try:
        h = daemon.client.send_fds([w])
        ino = os.fstat(w).st_ino
        checked = 0
        for n in os.listdir(f"/proc/{daemon.pid}/fd"):
            try:
                if os.readlink(f"/proc/{daemon.pid}/fd/{n}") != f"pipe:[{ino}]":
                    continue
            except OSError:
                continue
            with open(f"/proc/{daemon.pid}/fdinfo/{n}") as f:
                flags = int(next(x for x in f if x.startswith("flags:")).split()[1], 8)
            assert flags & 0o2000000, "O_CLOEXEC missing on a received fd"
            checked += 1
        assert checked == 1, "the daemon should hold exactly the one fd we sent"
        daemon.client.delete_fd_handle(h["handle"])
    finally:
        os.close(r)
        os.close(w)


# Echoes every line it reads on fd 0 (a unix socket) back, prefixed.
ECHO_SOCK = r"""
import os, socket
s = socket.socket(fileno=0)
while True:
    data = s.recv(4096)
    if not data:
        break
    s.sendall(b"echo " + data)
"""


def test_declared_external_unix_socket_gets_a_new_peer(daemon: Daemon, procs: Procs) -> None:
    import socket

    ours, theirs = socket.socketpair()
    p = procs.python(ECHO_SOCK, stdin=theirs)
    theirs.close()
    ours.sendall(b"one\n")
    assert ours.recv(100) == b"echo one\n"
    ino = next(int(t.split("[")[1].rstrip("]")) for n, t in fd_table(p.pid).items() if n == 0)
    key = f"socket:[{ino}]"
    # Declared external: criud passes --external unix[ino] and the restore
    # must hand in a replacement.
    ck = daemon.client.checkpoint(p.pid, external=[key])
    assert ck["external"] == [key]
    assert ck["options"]["external"] == [key]
    assert any(
        f["key"] == key and f["type"] == "unix" and f["external"]
        for f in daemon.client.inspect(ck["id"])["fds"]
    )
    p.wait(timeout=10)
    ours.close()
    with pytest.raises(CriudClientError) as e:
        daemon.client.restore(ck["id"])
    assert e.value.code == "missing_inherit_fd" and e.value.problem["keys"] == [key]

    new_ours, new_theirs = socket.socketpair()
    r = daemon.client.restore(ck["id"], fds={key: new_theirs})
    new_theirs.close()
    procs.adopt(r["pid"])
    new_ours.settimeout(10)
    new_ours.sendall(b"two\n")
    assert new_ours.recv(100) == b"echo two\n"
    new_ours.close()


def test_unknown_external_key_refused_at_checkpoint(daemon: Daemon, procs: Procs) -> None:
    p = procs.spawn(["sleep", "1000"])
    with pytest.raises(CriudClientError) as e:
        daemon.client.checkpoint(p.pid, external=["pipe:[1]"])
    assert e.value.status == 422 and e.value.problem["keys"] == ["pipe:[1]"]
    assert p.poll() is None


def test_cli_external_and_inherit_path(daemon: Daemon, procs: Procs, tmp_path: Path) -> None:
    old, new = tmp_path / "old.log", tmp_path / "new.log"
    with open(old, "ab") as f:
        p = procs.spawn(["sh", "-c", LOGGER], stdout=f)
    wait_for(lambda: old.stat().st_size > 0, 10, what="old.log to grow")
    key = str(old).lstrip("/")
    base = daemon.cli("--json")
    out = subprocess.run(
        [*base, "checkpoint", str(p.pid), "--external", key],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    ck = json.loads(out.stdout)
    assert ck["external"] == [key]
    p.wait(timeout=10)
    out = subprocess.run([*base, "restore", ck["id"]], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and key in out.stderr  # the declared file must be supplied
    out = subprocess.run(
        [*base, "restore", ck["id"], "--inherit-path", f"{key}={new}:a"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    procs.adopt(json.loads(out.stdout)["pid"])
    wait_for(
        lambda: new.exists() and new.read_text().count("\n") >= 2,
        10,
        what="new.log to receive lines",
    )
