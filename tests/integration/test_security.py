"""Hostile callers: peer-credential authorization, TCP tokens, input hardening, audit."""

from __future__ import annotations

import json
import os
import secrets
import socket
import stat
import urllib.parse
from typing import Any

import pytest

from criud.api.client import CriudClientError
from tests.integration.helpers import (
    CALLS,
    Daemon,
    Procs,
    proc_state,
    run_python_as,
    temp_root,
    uid_of,
    wait_for,
)

USER1, USER2 = 65534, 65533


def as_user(uid: int, daemon: Daemon, calls: list[tuple[str, str, Any]]) -> list[Any]:
    """Make API calls as uid (gid 0, so the 0660 root:root socket is reachable)."""
    out = run_python_as(
        uid, CALLS, str(daemon.socket), str(daemon.fd_socket), json.dumps(calls), timeout=120
    )
    assert out.returncode == 0, out.stderr
    return list(json.loads(out.stdout))


def user_sleep(procs: Procs, uid: int) -> int:
    # cwd /: the user's process must be able to reach its own cwd, or criu,
    # restoring as that user, cannot reopen it (pytest's cwd may be a 0700 dir).
    p = procs.spawn(
        ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "sleep", "1000"],
        cwd="/",
    )
    wait_for(lambda: uid_of(p.pid) == uid, 10, what="setpriv to drop to the user")
    return p.pid


def test_uid_matrix(daemon: Daemon, procs: Procs) -> None:
    root_pid = procs.spawn(["sleep", "1000"]).pid
    u1_pid = user_sleep(procs, USER1)

    # A user cannot dump root's process, nor another user's.
    ((st, body),) = as_user(USER1, daemon, [("POST", "/v1/checkpoints", {"pid": root_pid})])
    assert st == 403 and body["code"] == "permission_denied"
    ((st, body),) = as_user(USER2, daemon, [("POST", "/v1/checkpoints", {"pid": u1_pid})])
    assert st == 403 and body["code"] == "permission_denied"
    assert proc_state(root_pid) == "S" and proc_state(u1_pid) == "S"

    # A user can dump its own (criu runs as that user here, --unprivileged).
    ((st, ck),) = as_user(
        USER1,
        daemon,
        [("POST", "/v1/checkpoints", {"pid": u1_pid, "name": "u1-own", "leave_running": True})],
    )
    assert st == 201, ck
    assert ck["state"] == "done"
    # Sealed after the dump: the images are root's and read-only to the
    # user (dir 0755, files 0644), so he can no longer change them; the
    # checkpoints dir above stays 0700 root, so nobody reaches them by path
    # (criu restoring as the user reads them through the fd it is handed).
    ck_dir = daemon.state_dir / "checkpoints" / ck["id"]
    assert stat.S_IMODE(os.stat(ck_dir.parent).st_mode) == 0o700
    assert os.stat(ck_dir.parent).st_uid == 0
    assert stat.S_IMODE(os.stat(ck_dir).st_mode) == 0o755 and os.stat(ck_dir).st_uid == 0
    for f in ck_dir.iterdir():
        st = os.lstat(f)
        assert stat.S_ISREG(st.st_mode) and st.st_uid == 0, f
        assert stat.S_IMODE(st.st_mode) == 0o644, f

    # Only its owner (and root) sees, restores and deletes it.
    res = as_user(
        USER2,
        daemon,
        [
            ("GET", f"/v1/checkpoints/{ck['id']}", None),
            ("GET", "/v1/checkpoints", None),
            ("DELETE", f"/v1/checkpoints/{ck['id']}", None),
            ("POST", "/v1/restores", {"checkpoint": ck["id"]}),
            ("GET", f"/v1/checkpoints/{ck['id']}/log", None),
        ],
    )
    assert res[0][0] == 404 and res[1] == [200, []]
    assert res[2][0] == 404 and res[3][0] == 404 and res[4][0] == 404
    assert daemon.client.inspect(ck["id"])["id"] == ck["id"]  # root sees all

    # The owner restores it: the tree comes back as the user.
    os.kill(u1_pid, 9)
    wait_for(
        lambda: uid_of(u1_pid) is None or proc_state(u1_pid) == "Z", 10, what="u1 sleep to die"
    )
    procs.popens[-1].wait(timeout=10)
    ((st, r),) = as_user(USER1, daemon, [("POST", "/v1/restores", {"checkpoint": "u1-own"})])
    assert st == 201, r
    procs.adopt(r["pid"])
    assert uid_of(r["pid"]) == USER1
    with open(f"/proc/{r['pid']}/status") as f:
        caps = {ln.split(":")[0]: ln.split()[1] for ln in f if ln.startswith("Cap")}
    assert caps["CapEff"] == caps["CapPrm"] == caps["CapAmb"] == "0000000000000000"
    # Another user may not signal it.
    ((st, body),) = as_user(
        USER2, daemon, [("POST", f"/v1/restores/{r['id']}/signal", {"signal": 9})]
    )
    assert st == 404
    assert proc_state(r["pid"]) in ("S", "R")


def test_user_cannot_restore_roots_checkpoint_even_by_id(daemon: Daemon, procs: Procs) -> None:
    p = procs.spawn(["sleep", "1000"])
    ck = daemon.client.checkpoint(p.pid, leave_running=True)
    ((st, body),) = as_user(USER1, daemon, [("POST", "/v1/restores", {"checkpoint": ck["id"]})])
    assert st == 404 and body["code"] == "checkpoint_not_found"


BAD_REFS = ["a/b", "..", "../../etc", "a%2Fb", "%2e%2e", "a%00b", "x" * 200, ".hidden"]


@pytest.mark.parametrize("ref", BAD_REFS)
def test_bad_refs_refused_everywhere(daemon: Daemon, ref: str) -> None:
    for method, path, body in [
        ("GET", f"/v1/checkpoints/{ref}", None),
        ("DELETE", f"/v1/checkpoints/{ref}", None),
        ("GET", f"/v1/checkpoints/{ref}/log", None),
        ("POST", "/v1/restores", {"checkpoint": urllib.parse.unquote(ref)}),
        (
            "POST",
            "/v1/checkpoints",
            {"pid": os.getpid(), "name": urllib.parse.unquote(ref), "leave_running": True},
        ),
        ("GET", f"/v1/restores/{ref}", None),
    ]:
        with pytest.raises(CriudClientError) as e:
            daemon.client.request(method, path, body)
        assert 400 <= e.value.status < 500, (method, path, e.value)
        assert e.value.code, (method, path)
    assert daemon.client.request("GET", "/healthz")[0] == 200
    assert not any(p.name.startswith(".") and p.name != ".tmp" for p in daemon.state_dir.iterdir())


def _raw_post(
    daemon: Daemon, path: str, body: bytes, declared: int | None = None, chunked: bool = False
) -> tuple[int, dict[str, Any]]:
    if chunked:
        framing = "Transfer-Encoding: chunked"
        payload = (
            b"".join(
                b"%x\r\n%s\r\n" % (len(body[i : i + 65536]), body[i : i + 65536])
                for i in range(0, len(body), 65536)
            )
            + b"0\r\n\r\n"
        )
    else:
        framing = f"Content-Length: {declared if declared is not None else len(body)}"
        payload = body
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"{framing}\r\nConnection: close\r\n\r\n"
    ).encode()
    data = b""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(str(daemon.socket))
        try:
            s.sendall(head + payload)
            while chunk := s.recv(65536):
                data += chunk
        except (BrokenPipeError, ConnectionResetError):
            # The daemon answered and closed without reading all we sent;
            # what it answered may still be readable, or lost with the reset.
            pass
    if not data:
        return 0, {}
    status_line, _, rest = data.partition(b"\r\n\r\n")
    return int(status_line.split()[1]), json.loads(rest)


def test_caps_on_body_depth_and_fields(daemon: Daemon) -> None:
    # Declared too large: refused before a byte of the body is read.
    st, body = _raw_post(daemon, "/v1/checkpoints", b"", declared=2 << 20)
    assert st == 413 and body["code"] == "body_too_large"
    # Too large in fact (chunked, no length declared): refused while reading.
    st, body = _raw_post(daemon, "/v1/checkpoints", b"a" * ((1 << 20) + 10), chunked=True)
    assert st == 413 and body["code"] == "body_too_large"
    st, body = _raw_post(daemon, "/v1/checkpoints", b"[" * 100000 + b"]" * 100000)
    assert st == 422 and body["code"] == "invalid_request"
    st, body = _raw_post(daemon, "/v1/restores", b"{not json")
    assert st == 422 and body["code"] == "invalid_request"
    cases = [
        {"pid": 0},
        {"pid": -5},
        {"pid": 1 << 40},
        {"pid": 1, "bogus": 1},
        {"pid": 1, "labels": {f"k{i}": "v" for i in range(65)}},
        {"pid": 1, "labels": {"bad key": "v"}},
        {"pid": 1, "labels": {"k": "v" * 257}},
        {"pid": 1, "external": ["k"] * 65},
        {"pid": 1, "name": 5},
    ]
    for body_ in cases:
        with pytest.raises(CriudClientError) as e:
            daemon.client.request("POST", "/v1/checkpoints", body_)
        assert e.value.status == 422, body_
    too_many = [{"key": f"k{i}", "path": "/dev/null"} for i in range(65)]
    with pytest.raises(CriudClientError) as e:
        daemon.client.request("POST", "/v1/restores", {"checkpoint": "x", "inherit_fds": too_many})
    assert e.value.status == 422
    assert daemon.client.request("GET", "/healthz")[0] == 200


def test_audit_log_records_mutations(daemon: Daemon, procs: Procs) -> None:
    p = procs.spawn(["sleep", "1000"])
    ck = daemon.client.checkpoint(p.pid, leave_running=True, name="audited")
    daemon.client.delete("audited")
    with pytest.raises(CriudClientError):
        daemon.client.delete("audited")
    r, w = os.pipe()
    try:
        h = daemon.client.send_fds([w])
    finally:
        os.close(r)
        os.close(w)
    log = daemon.state_dir / "audit.log"
    assert stat.S_IMODE(log.stat().st_mode) == 0o600

    def entries() -> list[dict[str, Any]]:
        return [json.loads(ln) for ln in log.read_text().splitlines()]

    wait_for(lambda: any(e.get("id") == h["handle"] for e in entries()), 5, what="audit flush")
    es = entries()
    mine = [e for e in es if e["pid"] == os.getpid()]
    assert any(
        e["action"] == "checkpoint"
        and e["outcome"] == "ok"
        and e["id"] == ck["id"]
        and e["target"]["pid"] == p.pid
        and e["uid"] == 0
        for e in mine
    )
    dels = [e for e in mine if e["action"] == "delete_checkpoint"]
    assert [e["outcome"] for e in dels[-2:]] == ["ok", "checkpoint_not_found"]
    assert any(e["action"] == "send_fds" and e["outcome"] == "ok" for e in mine)
    assert all(e["transport"] == "unix" for e in mine)


def test_tcp_listener_needs_token(procs: Procs) -> None:
    import http.client

    with temp_root() as root:
        token = secrets.token_hex(16)
        tf = root / "token"
        tf.write_text(token + "\n")
        tf.chmod(0o600)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        d = Daemon(root, args=["--listen", f"tcp://127.0.0.1:{port}", "--token-file", str(tf)])
        d.start()
        try:

            def get(path: str, auth: str | None) -> tuple[int, Any]:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                c.request("GET", path, headers={"Authorization": auth} if auth else {})
                resp = c.getresponse()
                out = resp.status, json.loads(resp.read() or b"null")
                c.close()
                return out

            assert get("/v1/checkpoints", None)[0] == 401
            st, body = get("/v1/checkpoints", "Bearer " + "0" * 32)
            assert st == 401 and body["code"] == "unauthorized"
            assert get("/v1/checkpoints", f"Bearer {token}") == (200, [])
            st, body = get("/v1/fd-handles", f"Bearer {token}")
            assert st == 403 and "unix socket" in body["detail"]
            assert get("/healthz", None)[0] == 200
            # The unix socket keeps working with peer credentials.
            assert d.client.request("GET", "/v1/fd-handles")[0] == 200
        finally:
            assert d.stop() == 0
        tf.chmod(0o644)
        bad = Daemon(root, args=["--listen", f"tcp://127.0.0.1:{port}", "--token-file", str(tf)])
        with pytest.raises(AssertionError, match="readable by others"):
            bad.start(timeout=20)
        nofile = Daemon(root, args=["--listen", f"tcp://127.0.0.1:{port}"])
        with pytest.raises(AssertionError, match="needs --token-file"):
            nofile.start(timeout=20)
