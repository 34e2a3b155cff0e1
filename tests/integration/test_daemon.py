"""The daemon itself: start-up checks, sockets, persistence, socket activation."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from criud.api.client import Client, CriudClientError
from tests.integration.helpers import Daemon, Procs, pid_gone, temp_root, wait_for


def _serve(root: Path, *extra: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "criud.daemon.cli",
            "--socket",
            str(root / "a.sock"),
            "--fd-socket",
            str(root / "f.sock"),
            "serve",
            "--state-dir",
            str(root / "state"),
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def test_refuses_to_start_without_criu() -> None:
    with temp_root() as root:
        out = _serve(root, "--criu", str(root / "no-such-criu"))
        assert out.returncode == 1
        assert "cannot run criu" in out.stderr and "install-criu" in out.stderr
        assert not (root / "a.sock").exists()


def test_refuses_to_start_when_criu_check_fails() -> None:
    with temp_root() as root:
        fake = root / "criu"
        # A fake criu is fine to test a failure path: version ok, check fails.
        fake.write_text(
            "#!/bin/sh\n[ \"$1\" = --version ] && { echo 'Version: 4.2.1'; exit 0; }\n"
            "echo 'Error (criu/cr-check.c:1): vdso is broken'; exit 1\n"
        )
        fake.chmod(0o755)
        out = _serve(root, "--criu", str(fake))
        assert out.returncode == 1
        assert "check` failed" in out.stderr and "vdso is broken" in out.stderr


def test_socket_and_state_modes(daemon: Daemon) -> None:
    for path in (daemon.socket, daemon.fd_socket):
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o660, oct(st.st_mode)
    assert stat.S_IMODE(os.stat(daemon.state_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(daemon.state_dir / "checkpoints").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(daemon.state_dir / "criud.db").st_mode) == 0o600
    kinds = {}
    for path in (daemon.socket, daemon.fd_socket):
        for kind in (socket.SOCK_STREAM, socket.SOCK_SEQPACKET):
            with socket.socket(socket.AF_UNIX, kind) as s:
                try:
                    s.connect(str(path))
                    kinds[path.name] = kind
                except OSError:
                    pass
    assert kinds == {"api.sock": socket.SOCK_STREAM, "fds.sock": socket.SOCK_SEQPACKET}


def test_second_daemon_on_same_socket_refused(daemon: Daemon) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "criud.daemon.cli",
            "--socket",
            str(daemon.socket),
            "--fd-socket",
            str(daemon.fd_socket.parent / "other-fds.sock"),
            "serve",
            "--state-dir",
            str(daemon.root / "other-state"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 1 and "another daemon is serving" in out.stderr
    assert daemon.client.request("GET", "/healthz")[0] == 200


def test_openapi_and_problem_shape(daemon: Daemon) -> None:
    status, doc = daemon.client.request("GET", "/openapi.json")
    assert status == 200 and "/v1/checkpoints" in doc["paths"] and "/v1/restores" in doc["paths"]
    with pytest.raises(CriudClientError) as e:
        daemon.client.request("GET", "/v1/nope")
    assert e.value.status == 404 and e.value.code == "not_found"
    with pytest.raises(CriudClientError) as e:
        daemon.client.request("POST", "/v1/checkpoints", {"pid": "x"})
    assert e.value.status == 422 and e.value.code == "invalid_request"
    assert e.value.problem["errors"][0]["loc"] == ["body", "pid"]


def test_label_filter(daemon: Daemon, procs: Procs) -> None:
    p = procs.spawn(["sleep", "1000"])
    a = daemon.client.checkpoint(p.pid, leave_running=True, labels={"app": "web", "tier": "1"})
    b = daemon.client.checkpoint(p.pid, leave_running=True, labels={"app": "db"})
    web = {c["id"] for c in daemon.client.checkpoints({"app": "web"})}
    assert a["id"] in web and b["id"] not in web
    both = {c["id"] for c in daemon.client.checkpoints({"app": "web", "tier": "1"})}
    assert a["id"] in both and b["id"] not in both
    with pytest.raises(CriudClientError) as e:
        daemon.client.request("GET", "/v1/checkpoints?label=novalue")
    assert e.value.code == "invalid_request"


def test_restart_keeps_checkpoints_and_adopts_running_restores(procs: Procs) -> None:
    with temp_root() as root:
        d = Daemon(root).start()
        p = procs.spawn(["sleep", "1000"])
        ck = d.client.checkpoint(p.pid, name="survivor")
        p.wait(timeout=10)
        r = d.client.restore("survivor")
        procs.adopt(r["pid"])
        assert d.stop() == 0
        # The restored tree outlives the daemon (it is not killed on SIGTERM).
        assert not pid_gone(r["pid"])
        d2 = Daemon(root).start()
        try:
            assert d2.client.inspect("survivor")["id"] == ck["id"]
            assert d2.client.get_restore(r["id"])["state"] == "running"
            os.kill(r["pid"], signal.SIGKILL)
            wait_for(
                lambda: d2.client.get_restore(r["id"])["state"] == "exited",
                10,
                what="adopted restore to be seen as exited",
            )
        finally:
            assert d2.stop() == 0


ACTIVATE = r"""
import os, socket, sys
api = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
api.bind(sys.argv[1]); api.listen(16)
fds = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
fds.bind(sys.argv[2]); fds.listen(16)
# Move them out of the way first: dup2 onto the same number keeps CLOEXEC.
a, f = os.dup(api.fileno()) + 100, os.dup(fds.fileno()) + 100
os.dup2(api.fileno(), a); os.dup2(fds.fileno(), f)
api.close(); fds.close()
os.dup2(a, 3); os.dup2(f, 4); os.close(a); os.close(f)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="2", LISTEN_FDNAMES="api:fds")
os.execv(sys.executable, [sys.executable, "-m", "criud.daemon.cli", "--socket", sys.argv[3],
         "--fd-socket", sys.argv[4], "serve", "--state-dir", sys.argv[5]])
"""


def test_systemd_socket_activation(procs: Procs) -> None:
    with temp_root() as root:
        api, fds = root / "sd-api.sock", root / "sd-fds.sock"
        with open(root / "log", "wb") as log:
            # Stand-in for systemd: bind, put the sockets at fds 3 and 4, set
            # LISTEN_* for our own pid, exec the daemon.
            p = procs.python(
                ACTIVATE,
                str(api),
                str(fds),
                str(root / "unused-api.sock"),
                str(root / "unused-fds.sock"),
                str(root / "state"),
                stderr=log,
            )
        c = Client(str(api), str(fds), timeout=30)

        def up() -> bool:
            try:
                return c.request("GET", "/healthz")[0] == 200
            except OSError:
                return False

        wait_for(up, 30, what="socket-activated daemon")
        assert not (root / "unused-api.sock").exists()
        r, w = os.pipe()
        try:
            assert c.send_fds([w])["count"] == 1
        finally:
            os.close(r)
            os.close(w)
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=40) == 0


def test_shell_job_roundtrip(daemon: Daemon, procs: Procs) -> None:
    # A root that is not a session leader needs shell_job; a session leader on
    # a pty whose master is ours does not: its slave is external (issue 17).
    import pty

    # The sleep is a child of a session leader we start, not of our own
    # session: the suite may run in a pid namespace entered without setsid,
    # where our session's leader is outside and criu refuses any member.
    leader = procs.spawn(["sh", "-c", "sleep 1000 & echo $!; wait"], stdout=subprocess.PIPE)
    assert leader.stdout is not None
    sleeper = int(leader.stdout.readline())
    assert os.getsid(sleeper) == leader.pid != sleeper
    r = daemon.client.preflight(sleeper)
    assert any(f["code"] == "shell_job_needed" and not f["resolved"] for f in r["blockers"])
    assert daemon.client.preflight(sleeper, shell_job=True)["ok"] is True
    with pytest.raises(CriudClientError) as e:
        daemon.client.checkpoint(sleeper, leave_running=True)
    assert e.value.code == "shell_job_needed" and "shell_job" in e.value.problem["hint"]
    ck = daemon.client.checkpoint(sleeper, leave_running=True, shell_job=True)
    assert ck["options"]["shell_job"] is True

    pid, master = pty.fork()
    if pid == 0:  # child: a session leader on the pty, holding nothing else
        os.closerange(3, 65536)
        os.execvp("sleep", ["sleep", "1000"])
    try:
        assert daemon.client.preflight(pid)["ok"] is True
        ck = daemon.client.checkpoint(pid, leave_running=True)
        tty = [f for f in daemon.client.inspect(ck["id"])["fds"] if f["type"] == "tty"]
        assert tty and all(f["key"].startswith("tty[") and f["external"] for f in tty)
        assert tty[0]["key"] in ck["external"]
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(master)
