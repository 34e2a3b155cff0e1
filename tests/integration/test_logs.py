"""`criud serve --log-format json`: every line on stderr is JSON; an operation's carry its id."""

from __future__ import annotations

import json
from typing import Any

from tests.integration.helpers import Daemon, Procs, temp_root, wait_for


def test_json_logs_carry_the_operation_id(procs: Procs) -> None:
    with temp_root() as root:
        d = Daemon(root, args=["--log-format", "json"]).start()
        try:
            p = procs.spawn(["sleep", "1000"])
            status, op = d.client.request("POST", "/v1/checkpoints?wait=false", {"pid": p.pid})
            assert status == 202, op

            def ended() -> dict[str, Any] | None:
                got: dict[str, Any] = d.client.request("GET", f"/v1/operations/{op['id']}")[1]
                return got if got["state"] != "running" else None

            done = wait_for(ended, 60, 0.05, what="the checkpoint to end")
            assert done["state"] == "done", done
            ckpt_id = done["result"]["id"]
        finally:
            assert d.stop() == 0
        text = d.log_path.read_text()
    lines = [json.loads(line) for line in text.splitlines()]
    assert lines and all({"time", "level", "logger", "message"} <= doc.keys() for doc in lines)
    # uvicorn's own lines are JSON too, not its default text.
    assert any(doc["logger"].startswith("uvicorn") for doc in lines), text
    mine = [doc for doc in lines if ckpt_id in doc["message"]]
    assert mine and all(doc.get("operation") == op["id"] for doc in mine), mine
    # Lines outside the operation (startup, shutdown) carry none.
    assert "operation" not in lines[0]
