"""Migrations (issue 15) as a way in: who may open a page server, who may make the daemon connect.

* POST /v1/migrations makes root's daemon connect to an address the caller
  names (SSRF): only root (or a TCP token holder, who acts as root) may; a
  socket-group user gets 403 and the daemon connects nowhere.
* POST /v1/migrations/incoming opens a port that writes images as root:
  only root (or the token's holder) may open one.
* The page server takes one connection, and only from the address the
  request came from (a neighbour racing the source to the port is turned
  away); an incoming migration not committed in time is removed.
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.helpers import Daemon, Procs, temp_root, wait_for
from tests.security.users import Accounts, call_as


def test_socket_group_user_cannot_migrate_nor_make_the_daemon_connect(
    users: Accounts, sdaemon: Daemon, procs: Procs
) -> None:
    # A listener the attacker would like root's daemon to reach.
    with socket.socket() as bait:
        bait.bind(("127.0.0.1", 0))
        bait.listen(4)
        bait.settimeout(0.5)
        port = bait.getsockname()[1]
        p = procs.python("import time; time.sleep(60)")
        status, doc = call_as(
            users.bob,
            sdaemon,
            "POST",
            "/v1/migrations",
            {"pid": p.pid, "target": {"url": f"http://127.0.0.1:{port}", "token": "x"}},
        )
        assert status == 403 and doc["code"] == "permission_denied", doc
        with pytest.raises(TimeoutError):
            bait.accept()
    # Shipping a checkpoint is the same way out.
    status, doc = call_as(
        users.alice,
        sdaemon,
        "POST",
        "/v1/migrations",
        {"checkpoint": "x", "target": {"url": f"http://127.0.0.1:{port}", "token": "x"}},
    )
    assert status == 403 and doc["code"] == "permission_denied", doc


def test_socket_group_user_cannot_open_a_page_server(users: Accounts, sdaemon: Daemon) -> None:
    status, doc = call_as(users.bob, sdaemon, "POST", "/v1/migrations/incoming", {})
    assert status == 403 and doc["code"] == "permission_denied", doc
    assert not [e for e in os.listdir(sdaemon.state_dir / "checkpoints") if e.startswith(".tmp-")]


def test_a_host_name_target_is_refused(sdaemon: Daemon) -> None:
    """Only literal addresses: the daemon never resolves a name on a caller's behalf."""
    body = {"pid": 1, "target": {"url": "http://localhost:80", "token": "t"}}
    status, doc = _raw(sdaemon, body)
    assert status == 422 and doc["code"] == "invalid_request", doc


def _raw(d: Daemon, body: dict[str, Any]) -> tuple[int, Any]:
    from criud.api.client import CriudClientError

    try:
        return d.client.request("POST", "/v1/migrations", body)
    except CriudClientError as e:
        return e.status, e.problem


class Tcp:
    """A daemon's TCP listener on 127.0.0.1 with its token."""

    def __init__(self, port: int, token: str) -> None:
        self.port, self.token = port, token

    def call(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            payload = json.dumps(body).encode() if body is not None else None
            hdrs = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}
            hdrs.update(headers or {})
            c.request(method, path, body=payload, headers=hdrs)
            resp = c.getresponse()
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else None
        finally:
            c.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def tcp_daemon() -> Iterator[tuple[Daemon, Tcp]]:
    with temp_root() as root:
        token = secrets.token_hex(16)
        tf = root / "token"
        tf.write_text(token + "\n")
        tf.chmod(0o600)
        port = _free_port()
        d = Daemon(
            root,
            args=[
                "--listen",
                f"tcp://127.0.0.1:{port}",
                "--token-file",
                str(tf),
                "--migration-timeout",
                "3",
            ],
        ).start()
        try:
            yield d, Tcp(port, token)
        finally:
            d.stop()


def _tmp_dirs(d: Daemon) -> list[str]:
    return [e for e in os.listdir(d.state_dir / "checkpoints") if e.startswith(".tmp-")]


def _neighbour_turned_away(port: int) -> bool:
    """Whether a connection from 127.0.0.2 to the page server's port is closed unanswered."""
    with socket.socket() as s:
        s.bind(("127.0.0.2", 0))
        s.settimeout(5)
        s.connect(("127.0.0.1", port))
        # Turned away: the daemon closes it without starting a page server.
        return s.recv(1) == b""


def test_page_server_takes_only_the_requesters_address(tcp_daemon: tuple[Daemon, Tcp]) -> None:
    d, tcp = tcp_daemon
    status, inc = tcp.call("POST", "/v1/migrations/incoming", {})
    assert status == 201, inc
    assert inc["address"] == "127.0.0.1" and inc["state"] == "waiting"
    # A neighbour (another address of this host) races the source to the port.
    assert _neighbour_turned_away(inc["port"])
    status, now = tcp.call("GET", f"/v1/migrations/incoming/{inc['id']}")
    assert status == 200 and now["state"] == "waiting" and now["page_server_pid"] is None
    # The images cannot be committed without the pages: refused, nothing left.
    status, doc = tcp.call("PUT", f"/v1/migrations/incoming/{inc['id']}/images", {})
    assert status == 502 and doc["code"] == "migration_failed", doc
    assert _tmp_dirs(d) == []
    status, _ = tcp.call("GET", f"/v1/migrations/incoming/{inc['id']}")
    assert status == 404


def test_forwarded_headers_do_not_name_the_peer(tcp_daemon: tuple[Daemon, Tcp]) -> None:
    # criud sits behind no proxy: the peer is the socket's, whatever the
    # request's X-Forwarded-For says.  (uvicorn trusted it from 127.0.0.1,
    # so a local peer could hand the page server to another address, and a
    # garbage one made a 500.)
    _, tcp = tcp_daemon
    status, doc = tcp.call(
        "POST", "/v1/migrations/incoming", {}, {"X-Forwarded-For": "not-an-address"}
    )
    assert status == 201, doc
    tcp.call("DELETE", f"/v1/migrations/incoming/{doc['id']}")
    status, inc = tcp.call("POST", "/v1/migrations/incoming", {}, {"X-Forwarded-For": "127.0.0.2"})
    assert status == 201, inc
    assert _neighbour_turned_away(inc["port"])
    status, now = tcp.call("GET", f"/v1/migrations/incoming/{inc['id']}")
    assert status == 200 and now["page_server_pid"] is None, now
    assert tcp.call("DELETE", f"/v1/migrations/incoming/{inc['id']}")[0] == 204


def test_incoming_not_committed_in_time_is_removed(tcp_daemon: tuple[Daemon, Tcp]) -> None:
    d, tcp = tcp_daemon
    status, inc = tcp.call("POST", "/v1/migrations/incoming", {})
    assert status == 201 and len(_tmp_dirs(d)) == 1
    t0 = time.monotonic()
    wait_for(lambda: not _tmp_dirs(d), 15, what="the expired incoming migration's dir removed")
    assert time.monotonic() - t0 < 10
    assert tcp.call("GET", f"/v1/migrations/incoming/{inc['id']}")[0] == 404
    # Its port is closed: nobody can write into it any more.
    with socket.socket() as s, pytest.raises(ConnectionRefusedError):
        s.connect(("127.0.0.1", inc["port"]))


def test_abort_removes_everything(tcp_daemon: tuple[Daemon, Tcp]) -> None:
    d, tcp = tcp_daemon
    _, inc = tcp.call("POST", "/v1/migrations/incoming", {"name": "moved"})
    assert tcp.call("DELETE", f"/v1/migrations/incoming/{inc['id']}")[0] == 204
    assert _tmp_dirs(d) == [] and d.client.checkpoints() == []
    assert tcp.call("DELETE", f"/v1/migrations/incoming/{inc['id']}")[0] == 404


def test_incoming_over_unix_needs_a_configured_address(tcp_daemon: tuple[Daemon, Tcp]) -> None:
    from criud.api.client import CriudClientError

    d, _ = tcp_daemon
    with pytest.raises(CriudClientError) as ei:
        d.client.request("POST", "/v1/migrations/incoming", {})
    assert ei.value.code == "invalid_request"
    assert _tmp_dirs(d) == []
