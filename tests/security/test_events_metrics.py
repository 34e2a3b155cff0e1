"""Events and metrics as real users.

GET /v1/events: each user sees its own events only; root sees everyone's.
GET /metrics: root's only on the unix socket (the counts span every user).

An event names a pid, a checkpoint, a restore or a handle of its owner:
another user's stream, live or replayed from the ring (`?since=0`), must
not carry it.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import subprocess

from criud.api.client import CriudClientError
from tests.integration import sse
from tests.integration.helpers import Daemon
from tests.security.users import Accounts, call_as, calls_as, run_as

# As the user: follow the stream (replayed from 0), fail a checkpoint of a
# gone pid, print the events received until the stream is quiet for 1 s.
# (take(2) waits for at least the replay's first two, or bob's own two.)
FOLLOW = (
    inspect.getsource(sse)
    + r"""
import sys
from criud.api.client import Client, CriudClientError
sock, fdsock, pid = sys.argv[1:4]
r = SseReader(sock, "/v1/events?since=0")
try:
    Client(sock, fdsock, timeout=30).checkpoint(int(pid))
except CriudClientError:
    pass
got = r.take(2, timeout=10)
with contextlib.suppress(TimeoutError):
    while True:
        got.append(r.next(timeout=1))
print(json.dumps({"status": r.status, "events": got}))
"""
).replace("import json\n", "import contextlib, json\n", 1)


def _gone_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait(timeout=10)
    return p.pid


def test_a_user_sees_only_its_own_events(users: Accounts, sdaemon: Daemon) -> None:
    pid = _gone_pid()
    # Root's own operation first: it is in the ring the user's replay reads.
    with contextlib.suppress(CriudClientError):
        sdaemon.client.checkpoint(pid)
    root_view = sse.SseReader(sdaemon.socket, "/v1/events?since=0")
    try:
        out = run_as(users.bob, FOLLOW, str(sdaemon.socket), str(sdaemon.fd_socket), str(pid))
        assert out.returncode == 0, out.stderr
        doc = json.loads(out.stdout)
        assert doc["status"] == 200
        # The replay holds what bob did in earlier tests too: all of it his.
        bobs = doc["events"]
        assert all(e["owner_uid"] == users.bob.uid for e in bobs), bobs
        mine = [e for e in bobs if e.get("target", {}).get("pid") == pid]
        assert mine and mine[-1]["event"] == "operation.started"
        ended = [e for e in bobs if e.get("operation") == mine[-1]["operation"]][1:]
        assert [(e["event"], e["code"]) for e in ended] == [
            ("operation.failed", "process_not_found")
        ]
        # Root sees everything: its own operation and bob's.
        seen: list[dict[str, object]] = []
        with contextlib.suppress(TimeoutError):
            while not {0, users.bob.uid} <= {e.get("owner_uid") for e in seen}:
                seen.append(root_view.next(timeout=5))
        owners = {e["owner_uid"] for e in seen}
        assert {0, users.bob.uid} <= owners
    finally:
        root_view.close()


def test_metrics_are_roots_only(users: Accounts, sdaemon: Daemon) -> None:
    for user in (users.alice, users.bob):
        status, doc = call_as(user, sdaemon, "GET", "/metrics")
        assert status == 403 and doc["code"] == "permission_denied", doc
    status, text = sdaemon.client.request("GET", "/metrics")
    assert status == 200 and "criud_operations_in_flight" in str(text)


def test_a_user_sees_and_cancels_only_its_own_operations(users: Accounts, sdaemon: Daemon) -> None:
    _, root_op = sdaemon.client.request(
        "POST", "/v1/restores?wait=false", {"checkpoint": "no-such-checkpoint"}
    )
    path = f"/v1/operations/{root_op['id']}"
    (st_get, doc), (st_del, _), (_, listed), (st_own, own) = calls_as(
        users.bob,
        sdaemon,
        [
            ("GET", path, None),
            ("DELETE", path, None),
            ("GET", "/v1/operations", None),
            ("POST", "/v1/checkpoints?wait=false", {"pid": _gone_pid()}),
        ],
    )
    # As if it did not exist: the same 404 as for an unknown id.
    assert st_get == 404 and doc["code"] == "operation_not_found"
    assert st_del == 404
    assert root_op["id"] not in [o["id"] for o in listed]
    assert all(o["owner_uid"] == users.bob.uid for o in listed)
    assert st_own == 202 and own["owner_uid"] == users.bob.uid
    _, everyone = sdaemon.client.request("GET", "/v1/operations")
    assert {root_op["id"], own["id"]} <= {o["id"] for o in everyone}
