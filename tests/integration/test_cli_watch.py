"""`criud events` and `criud wait`, run as the CLI against a real daemon (issue 16)."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Callable
from typing import Any

from tests.integration.helpers import Daemon, Procs, read_line


def _background_checkpoint(daemon: Daemon, procs: Procs) -> str:
    """Start a checkpoint of a fresh sleep with ?wait=false; its operation id."""
    p = procs.spawn(["sleep", "1000"])
    status, op = daemon.client.request("POST", "/v1/checkpoints?wait=false", {"pid": p.pid})
    assert status == 202, op
    return str(op["id"])


def _lines_until(
    p: subprocess.Popen[bytes], done: Callable[[str], bool], timeout: float = 60
) -> list[str]:
    """The lines p prints up to and including the first that is done."""
    assert p.stdout is not None
    lines: list[str] = []
    while not lines or not done(lines[-1]):
        lines.append(read_line(p.stdout.fileno(), timeout).decode())
    return lines


def _interrupt(p: subprocess.Popen[bytes]) -> int:
    """^C the follower and wait for it (bounded); its exit status."""
    p.send_signal(signal.SIGINT)
    try:
        return p.wait(timeout=10)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(timeout=10)
        raise


def test_events_follows_an_operation(daemon: Daemon, procs: Procs) -> None:
    # --since 0: whether it connects before or after the checkpoint, the
    # ring replays what it missed; the follower must then print it.
    cmd = daemon.cli("--json", "events", "--since", "0")
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as p:
        try:
            op_id = _background_checkpoint(daemon, procs)
            lines = _lines_until(
                p,
                lambda line: (
                    json.loads(line).get("operation") == op_id
                    and json.loads(line)["event"] == "operation.done"
                ),
            )
        finally:
            rc = _interrupt(p)
        assert rc == 0
    evs: list[dict[str, Any]] = [json.loads(line) for line in lines]
    mine = [e for e in evs if e.get("operation") == op_id]
    assert [e["event"] for e in mine] == ["operation.started", "operation.done"], mine
    assert mine[0]["id"] < mine[1]["id"] and mine[1]["kind"] == "checkpoint"
    # Ids only grow, and a later --since starts after the one given.
    ids = [e["id"] for e in evs]
    assert ids == sorted(ids)
    cmd = daemon.cli("events", "--since", str(mine[0]["id"]))
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as p:
        try:
            text = _lines_until(p, lambda line: f"operation={op_id}" in line, timeout=30)
        finally:
            _interrupt(p)
    assert text[0].split()[1] == "operation.done", text
    assert f"checkpoint={mine[1]['checkpoint']}" in text[0]


def test_wait_prints_the_result(daemon: Daemon, procs: Procs) -> None:
    op_id = _background_checkpoint(daemon, procs)
    out = subprocess.run(daemon.cli("wait", op_id), capture_output=True, timeout=120)
    assert out.returncode == 0, out
    op = daemon.client.request("GET", f"/v1/operations/{op_id}")[1]
    assert op["state"] == "done"
    assert out.stdout.decode().split() == [
        "checkpoint",
        op_id,
        "done:",
        "checkpoint",
        op["result"]["id"],
    ]
    out = subprocess.run(daemon.cli("--json", "wait", op_id), capture_output=True, timeout=60)
    assert out.returncode == 0 and json.loads(out.stdout)["result"] == op["result"]


def test_wait_on_a_failed_operation_exits_1(daemon: Daemon) -> None:
    status, op = daemon.client.request(
        "POST", "/v1/restores?wait=false", {"checkpoint": "no-such-checkpoint"}
    )
    assert status == 202, op
    out = subprocess.run(daemon.cli("wait", op["id"]), capture_output=True, timeout=60)
    assert out.returncode == 1, out
    assert "checkpoint_not_found" in out.stderr.decode() and op["id"] in out.stderr.decode()
    # An id the daemon does not know is the API's 404, said as such.
    out = subprocess.run(daemon.cli("wait", "0" * 24), capture_output=True, timeout=60)
    assert out.returncode == 1 and b"operation" in out.stderr, out
