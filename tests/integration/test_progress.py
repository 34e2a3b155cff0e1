"""Operations' phase and progress, the metrics of bytes and frozen time, and a cancelled
restore (issue 16)."""

from __future__ import annotations

import itertools
import time
from typing import Any

from criud.api.client import CriudClientError
from tests.integration.helpers import Daemon, Procs, kill_restore, pid_gone, wait_for
from tests.integration.sse import SseReader
from tests.integration.test_metrics import scrape, value

# Touches argv[1] MiB, then creates the file argv[2] to say so (its stdio is
# /dev/null: a restore of it needs no fd handed in).
BIG = r"""
import sys, time
buf = bytearray(int(sys.argv[1]) << 20)
for i in range(0, len(buf), 4096):
    buf[i] = 1
open(sys.argv[2], "w").close()
while True:
    time.sleep(0.05)
"""

MiB = 1 << 20


def _spawn_big(procs: Procs, tmp: Any, mib: int) -> Any:
    flag = tmp / f"ready-{time.monotonic_ns()}"
    p = procs.python(BIG, str(mib), str(flag))
    wait_for(flag.exists, 60, 0.02, what=f"{mib} MiB to be touched")
    return p


def _op(daemon: Daemon, op_id: str) -> dict[str, Any]:
    doc: dict[str, Any] = daemon.client.request("GET", f"/v1/operations/{op_id}")[1]
    return doc


def _ended(daemon: Daemon, op_id: str, timeout: float = 60) -> dict[str, Any]:
    def get() -> dict[str, Any] | None:
        op = _op(daemon, op_id)
        return op if op["state"] != "running" else None

    return wait_for(get, timeout, 0.05, what=f"operation {op_id} to end")


def test_progress_of_a_big_checkpoint(daemon: Daemon, procs: Procs, tmp_path: Any) -> None:
    """A 1 GiB dump: phase and bytes in GET while it runs, operation.progress events,
    a total estimated from the tree's memory, and figures that only grow."""
    c = daemon.client
    p = _spawn_big(procs, tmp_path, 1024)
    ev = SseReader(daemon.socket)
    before = scrape(daemon)
    status, op = c.request("POST", "/v1/checkpoints?wait=false", {"pid": p.pid})
    assert status == 202
    seen: list[dict[str, Any]] = []
    while True:
        now = _op(daemon, op["id"])
        if now["state"] != "running":
            break
        seen.append(now)
        time.sleep(0.05)
    assert now["state"] == "done", now["problem"]
    assert now["phase"] == "done"
    size = now["result"]["size_bytes"]
    prog = now["progress"]
    assert prog["bytes_done"] == size
    # The estimate: 1 GiB touched, plus the interpreter; within a few percent.
    assert 1024 * MiB <= prog["bytes_total"] < 1100 * MiB, prog
    assert 1024 * MiB // 4096 <= prog["pages_total"] < 1100 * MiB // 4096, prog
    # An estimate: criu writes a few pages more than are resident (vdso, guard pages).
    assert abs(prog["pages_done"] - prog["pages_total"]) < prog["pages_total"] // 100
    dumping = [s for s in seen if s["phase"] == "dumping"]
    assert dumping, [s["phase"] for s in seen]
    done_seen = [s["progress"]["bytes_done"] for s in dumping if s["progress"]["bytes_done"]]
    assert done_seen and max(done_seen) <= size
    assert done_seen == sorted(done_seen)
    # The events: at least one progress event of this operation, 250 ms apart at least.
    progress: list[dict[str, Any]] = []
    while True:
        e = ev.next(30)
        if e.get("operation") != op["id"]:
            continue
        if e["sse_event"] == "operation.progress":
            progress.append(e)
        if e["sse_event"] == "operation.done":
            break
    ev.close()
    assert progress, "no operation.progress event"
    assert all(e["kind"] == "checkpoint" and e["bytes_total"] for e in progress)
    gaps = [b["time"] - a["time"] for a, b in itertools.pairwise(progress)]
    assert all(g >= 0.24 for g in gaps), gaps
    assert any(e["phase"] == "dumping" and e["bytes_done"] for e in progress), progress
    # Metrics: the bytes written, and one frozen time of about the dump's length.
    after = scrape(daemon)
    written = value(after, "criud_checkpoint_bytes_written_total") - value(
        before, "criud_checkpoint_bytes_written_total"
    )
    assert written == size
    frozen = value(after, "criud_frozen_seconds_count") - value(
        before, "criud_frozen_seconds_count"
    )
    assert frozen == 1
    took = value(after, "criud_frozen_seconds_sum") - value(before, "criud_frozen_seconds_sum")
    assert 0.05 < took < 60
    ck = now["result"]["id"]
    p.wait(timeout=10)
    r = c.restore(ck)
    procs.adopt(r["pid"])
    read = value(scrape(daemon), "criud_restore_bytes_read_total") - value(
        after, "criud_restore_bytes_read_total"
    )
    assert read == size
    kill_restore(c, r["id"])
    c.delete(ck)


def test_a_restore_reports_its_phase_and_the_checkpoint_size(daemon: Daemon, procs: Procs) -> None:
    c = daemon.client
    p = procs.spawn(["sleep", "1000"])
    ck = c.checkpoint(p.pid)
    p.wait(timeout=10)
    status, op = c.request("POST", "/v1/restores?wait=false", {"checkpoint": ck["id"]})
    assert status == 202
    done = _ended(daemon, op["id"])
    assert done["state"] == "done", done["problem"]
    procs.adopt(done["result"]["pid"])
    assert done["phase"] == "done"
    # Nothing of a restore can be watched: no bytes done, no pages.
    assert done["progress"] == {
        "bytes_done": None,
        "bytes_total": ck["size_bytes"],
        "pages_done": None,
        "pages_total": None,
    }
    kill_restore(c, done["result"]["id"])
    c.delete(ck["id"])


def test_a_cancelled_restore_leaves_no_task_behind(
    daemon: Daemon, procs: Procs, tmp_path: Any
) -> None:
    """DELETE a restore of 768 MiB mid-way: the tree criu had begun is gone, the record
    says failed, and the checkpoint restores again."""
    c = daemon.client
    p = _spawn_big(procs, tmp_path, 768)
    ck = c.checkpoint(p.pid)
    p.wait(timeout=10)
    status, op = c.request("POST", "/v1/restores?wait=false", {"checkpoint": ck["id"]})
    assert status == 202
    # Mid-way: criu runs and has forked the root with its old pid.
    wait_for(
        lambda: not pid_gone(p.pid),
        30,
        0.005,
        what="criu to fork the restored root",
    )
    procs.adopt(p.pid)  # killed at teardown if the test fails
    status, cancelled = c.request("DELETE", f"/v1/operations/{op['id']}")
    assert status == 200 and cancelled["state"] == "cancelled", cancelled
    assert cancelled["problem"]["code"] == "operation_cancelled"
    # No task of the tree is left: not running, not a zombie.
    wait_for(lambda: pid_gone(p.pid), 10, 0.05, what=f"restored pid {p.pid} to be gone")
    recs = [r for r in c.restores() if r["checkpoint"] == ck["id"]]
    assert len(recs) == 1 and recs[0]["state"] == "failed", recs
    # The checkpoint is intact: it restores again, with the same pid.
    r = c.restore(ck["id"])
    procs.adopt(r["pid"])
    assert r["pid"] == p.pid and r["state"] == "running"
    kill_restore(c, r["id"])
    c.delete(ck["id"])


def test_observability_off_publishes_nothing(procs: Procs) -> None:
    """--observability off: an operation publishes no event, counts in no metric, and
    tracks no progress."""
    from tests.integration.helpers import temp_root

    with temp_root() as root:
        d = Daemon(root, args=["--observability", "off"]).start()
        try:
            ev = SseReader(d.socket)
            p = procs.spawn(["sleep", "1000"])
            op = d.client.checkpoint(p.pid, wait=False)
            done = d.client.wait_operation(op["id"], 60)
            assert done["state"] == "done", done
            # No progress tracked either: no phase, no figures.
            assert done["phase"] is None and set(done["progress"].values()) == {None}
            ck = done["result"]
            fams = scrape(d)
            assert value(fams, "criud_operations_total") == 0
            assert value(fams, "criud_checkpoint_bytes_written_total") == 0
            try:
                got = ev.next(1.0)
                raise AssertionError(f"an event with observability off: {got}")
            except TimeoutError:
                pass
            ev.close()
            d.client.delete(ck["id"])
        except CriudClientError as e:
            raise AssertionError(e.problem) from e
        finally:
            d.stop()
