"""?wait=false and /v1/operations: background checkpoints and restores, and cancel (issue 16)."""

from __future__ import annotations

import os
from typing import Any

from criud.api.client import CriudClientError
from tests.integration.helpers import (
    Daemon,
    Procs,
    kill_restore,
    pid_gone,
    read_line,
    wait_for,
)

# Touches 1 GiB, says so, then counts on stdout: a dump of it takes seconds.
BIG = r"""
import sys, time
buf = bytearray(1 << 30)
for i in range(0, len(buf), 4096):
    buf[i] = 1
print("ready", flush=True)
i = 0
while True:
    print(f"tick {i}", flush=True)
    i += 1
    time.sleep(0.05)
"""


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def _post(daemon: Daemon, path: str, body: dict[str, Any]) -> tuple[int, Any, str]:
    """POST ?wait=false; (status, body, Location)."""
    conn = daemon.client
    status, doc = conn.request("POST", f"{path}?wait=false", body)
    return status, doc, f"/v1/operations/{doc['id']}"


def _ended(daemon: Daemon, op_id: str, timeout: float = 60) -> dict[str, Any]:
    def get() -> dict[str, Any] | None:
        op: dict[str, Any] = daemon.client.request("GET", f"/v1/operations/{op_id}")[1]
        return op if op["state"] != "running" else None

    return wait_for(get, timeout, 0.05, what=f"operation {op_id} to end")


def test_background_checkpoint_and_restore(daemon: Daemon, procs: Procs) -> None:
    c = daemon.client
    p = procs.spawn(["sleep", "1000"])
    status, op, _ = _post(daemon, "/v1/checkpoints", {"pid": p.pid})
    assert status == 202 and op["state"] == "running" and op["kind"] == "checkpoint"
    assert op["target"]["pid"] == p.pid and op["owner_uid"] == 0
    running = c.request("GET", "/v1/operations?state=running")[1]
    assert op["id"] in [o["id"] for o in running] or _ended(daemon, op["id"])
    done = _ended(daemon, op["id"])
    assert done["state"] == "done" and done["problem"] is None, done
    ck = done["result"]
    assert ck["state"] == "done" and ck["pid"] == p.pid
    assert c.inspect(ck["id"])["id"] == ck["id"]
    p.wait(timeout=10)  # the dump ended it; reaped, its pid is free for the restore
    status, rop, _ = _post(daemon, "/v1/restores", {"checkpoint": ck["id"]})
    assert status == 202
    rdone = _ended(daemon, rop["id"])
    assert rdone["state"] == "done", rdone["problem"]
    procs.adopt(rdone["result"]["pid"])
    assert rdone["result"]["pid"] == p.pid and rdone["result"]["state"] == "running"
    assert rop["id"] in [o["id"] for o in c.request("GET", "/v1/operations?state=done")[1]]
    kill_restore(c, rdone["result"]["id"])
    c.delete(ck["id"])


def test_a_failed_background_operation_keeps_its_problem(daemon: Daemon) -> None:
    status, op, _ = _post(daemon, "/v1/restores", {"checkpoint": "no-such-checkpoint"})
    assert status == 202
    ended = _ended(daemon, op["id"])
    assert ended["state"] == "failed" and ended["result"] is None
    assert ended["problem"]["code"] == "checkpoint_not_found"
    assert ended["problem"]["status"] == 404
    # It has ended: nothing to cancel.
    try:
        daemon.client.request("DELETE", f"/v1/operations/{op['id']}")
        raise AssertionError("cancelled an ended operation")
    except CriudClientError as e:
        assert e.status == 409 and e.problem["code"] == "operation_ended"
    for bad in ("0" * 24, "nope"):
        try:
            daemon.client.request("GET", f"/v1/operations/{bad}")
            raise AssertionError("found an operation that does not exist")
        except CriudClientError as e:
            assert e.status == 404 and e.problem["code"] == "operation_not_found"


def test_cancel_mid_dump_leaves_the_target_running_untraced(daemon: Daemon, procs: Procs) -> None:
    r, w = os.pipe()
    try:
        p = procs.python(BIG, stdout=w)
    finally:
        os.close(w)
    assert read_line(r, 60) == b"ready\n"
    status, op, _ = _post(daemon, "/v1/checkpoints", {"pid": p.pid, "external": []})
    assert status == 202
    # Mid-dump: criu has seized the target (it is traced).
    wait_for(lambda: _status(p.pid)["TracerPid"] != "0", 30, 0.01, what="criu to seize the target")
    status, cancelled = daemon.client.request("DELETE", f"/v1/operations/{op['id']}")
    assert status == 200 and cancelled["state"] == "cancelled", cancelled
    assert cancelled["problem"]["code"] == "operation_cancelled"
    # The target: alive, untraced, not stopped, and still counting.
    assert not pid_gone(p.pid)
    wait_for(lambda: _status(p.pid)["TracerPid"] == "0", 10, what="the target to be untraced")
    assert _status(p.pid)["State"][0] in "RS", _status(p.pid)["State"]
    os.set_blocking(r, False)
    while True:
        try:
            if not os.read(r, 1 << 16):
                break
        except BlockingIOError:
            break
    os.set_blocking(r, True)
    assert read_line(r, 10).startswith(b"tick ")
    os.close(r)
    # No temp dir behind, and the record says how it ended.
    ckdir = daemon.state_dir / "checkpoints"
    assert not [e for e in os.listdir(ckdir) if e.startswith(".tmp-")]
    recs = [x for x in daemon.client.checkpoints() if x["pid"] == p.pid]
    assert recs and all(x["state"] == "failed" for x in recs)
    assert not os.path.exists(ckdir / recs[0]["id"])
