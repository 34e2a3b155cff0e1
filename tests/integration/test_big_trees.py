"""Big trees (issue 13): the checkpoint's answer is a summary of its fds, not one entry each.

POST /v1/checkpoints answers with `fd_summary` (how many fds of each type the
tree held, and the external ones a restore must replace) and an empty
`fds`; GET /v1/checkpoints/{ref} gives the whole manifest (`?fds=false`:
the summary alone).  The answer is built from what the dump wrote, never
read back from the store, so it must equal what a later GET gives.
"""

from __future__ import annotations

import json
import os

from tests.integration.helpers import Daemon, Procs, read_line

# Holds `n` pipes (both ends: internal) and a file, writes one line to
# stdout (a pipe whose read end the test keeps: external), then sleeps.
HOLDER = r"""
import os, sys, time
n = int(sys.argv[1])
keep = [os.pipe() for _ in range(n)]
f = open("/etc/hostname", "rb")
os.write(1, b"ready\n")
while True:
    time.sleep(3600)
"""


def _start(procs: Procs, pipes: int) -> tuple[int, int]:
    r, w = os.pipe()
    p = procs.python(HOLDER, str(pipes), stdout=w)
    os.close(w)
    assert read_line(r) == b"ready\n"
    return p.pid, r


def test_checkpoint_answer_summarises_fds(daemon: Daemon, procs: Procs) -> None:
    pid, r = _start(procs, 20)
    try:
        held = sorted(int(n) for n in os.listdir(f"/proc/{pid}/fd"))
        ck = daemon.client.checkpoint(pid, leave_running=True)
        key = f"pipe:[{os.fstat(r).st_ino}]"
        # No entry per fd in the answer: counts, and the external ones in full.
        assert ck["fds"] == []
        s = ck["fd_summary"]
        assert s["total"] == len(held) and s["tasks"] == 1
        assert s["by_type"]["pipe"] == 41  # 20 pipes' two ends, and stdout
        assert s["by_type"]["file"] == 1
        assert sum(s["by_type"].values()) == len(held)
        (ext,) = s["external_fds"]
        assert ext == {**ext, "pid": pid, "fd": 1, "key": key, "type": "pipe", "mode": "w"}
        assert ext["external"] is True and ck["external"] == [key]

        # The whole manifest on GET (the default, or ?fds=true), with the summary.
        full = daemon.client.inspect(ck["id"])
        assert [f["fd"] for f in full["fds"]] == held
        assert full["fd_summary"] == s
        assert daemon.client.request("GET", f"/v1/checkpoints/{ck['id']}?fds=true")[1] == full
        # ?fds=false is the summary: exactly the POST's answer (nothing lost
        # or changed by answering from memory instead of the store).
        short = daemon.client.request("GET", f"/v1/checkpoints/{ck['id']}?fds=false")[1]
        assert short == ck
        daemon.client.delete(ck["id"])
    finally:
        os.close(r)


def test_checkpoint_answer_does_not_grow_with_fds(daemon: Daemon, procs: Procs) -> None:
    """2,000 fds: the answer stays a few KB (it was one entry per fd, ~190 bytes each)."""
    pid, r = _start(procs, 1000)
    try:
        body = {"pid": pid, "leave_running": True}
        _, raw = daemon.client.request("POST", "/v1/checkpoints", body)
        assert len(json.dumps(raw)) < 4096, len(json.dumps(raw))
        assert raw["fd_summary"]["total"] == len(os.listdir(f"/proc/{pid}/fd"))
        assert len(daemon.client.inspect(raw["id"])["fds"]) == raw["fd_summary"]["total"]
        daemon.client.delete(raw["id"])
    finally:
        os.close(r)
