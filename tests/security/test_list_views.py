"""GET /v1/checkpoints is answered before FastAPI from cached bytes: each caller its own view.

The list's encoded bytes are cached per view (root's, or one uid's, and a
label filter) and served by criud.api.fastlist ahead of the framework.  A
cache keyed too loosely would hand one user's list to another; these tests
ask in an order that would expose it (root first, then each user, within
one write generation, on kept-alive connections), and compare the fast
path's raw answer with the FastAPI route's (reached by a query form the
fast path leaves to it) byte for byte.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

from tests.integration.helpers import Daemon, Procs
from tests.security.users import Accounts, User, call_as, run_as, spawn_as

# Raw HTTP over one kept-alive connection: the heads (less Date) and bodies.
RAW = r"""
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(30)
s.connect(sys.argv[1])
f = s.makefile("rb")
out = []
for path in json.loads(sys.argv[2]):
    s.sendall(f"GET {path} HTTP/1.1\r\nhost: localhost\r\n\r\n".encode())
    status = f.readline().decode().rstrip("\r\n")
    head = []
    while (line := f.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().rstrip("\r\n").partition(":")
        head.append([name.lower(), value.strip()])
    length = int(dict(head)["content-length"])
    body = f.read(length)
    out.append([status, [h for h in head if h[0] != "date"], body.decode()])
print(json.dumps(out))
"""


def _raw_as(user: User, daemon: Daemon, paths: list[str]) -> list[Any]:
    out = run_as(user, RAW, str(daemon.socket), json.dumps(paths), timeout=60)
    assert out.returncode == 0, out.stderr
    return list(json.loads(out.stdout))


def _raw_root(daemon: Daemon, paths: list[str]) -> list[Any]:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", RAW, str(daemon.socket), json.dumps(paths)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return list(json.loads(out.stdout))


def test_each_caller_gets_exactly_its_own_view_through_the_fast_path(
    users: Accounts, sdaemon: Daemon, procs: Procs
) -> None:
    tag = secrets.token_hex(4)
    made: dict[int, str] = {}
    for user in (users.alice, users.bob):
        pid = spawn_as(procs, user, ["sleep", "1000"])
        st, ck = call_as(
            user,
            sdaemon,
            "POST",
            "/v1/checkpoints",
            {"pid": pid, "leave_running": True, "labels": {"t": tag}},
        )
        assert st == 201, ck
        made[user.uid] = ck["id"]
    # No write from here on: every answer below comes from one generation's cache.
    plain = "/v1/checkpoints"
    labelled = f"/v1/checkpoints?label=t%3D{tag}"
    # A query key the fast path leaves to FastAPI (the route ignores it).
    routed = "/v1/checkpoints?via=fastapi"
    paths = [plain, labelled, routed, plain]
    root = _raw_root(sdaemon, paths)
    everyone = json.loads(root[0][2])
    assert {made[users.alice.uid], made[users.bob.uid]} <= {c["id"] for c in everyone}
    assert {c["id"] for c in json.loads(root[1][2])} == set(made.values())
    for user in (users.bob, users.alice, users.bob):
        got = _raw_as(user, sdaemon, paths)
        assert all(status == "HTTP/1.1 200 OK" for status, _, _ in got), got
        own = json.loads(got[0][2])
        # Exactly the user's own: what root sees of that owner, nothing else.
        assert [c["id"] for c in own] == [c["id"] for c in everyone if c["owner_uid"] == user.uid]
        assert made[user.uid] in {c["id"] for c in own}
        assert [c["id"] for c in json.loads(got[1][2])] == [made[user.uid]]
        # The fast path's answer is the route's, byte for byte, head and body.
        assert got[0] == got[2] == got[3]
    assert root[0] == root[2] == root[3]
    # A caller outside the socket group never reaches either path.
    st, doc = call_as(users.carol, sdaemon, "GET", plain)
    assert st == 0 and doc["errno"] == 13
