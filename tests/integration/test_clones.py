"""Clones (issue 15): one checkpoint of a tree in its own pid namespace, restored N times at once.

Each copy gets fresh namespaces (its root is pid 1 in a new pid namespace)
and its own stdout pipe, handed in per copy; each keeps counting on its own.
Both ways: `"copies": N` with `per_copy` fds, and N concurrent plain requests.
"""

from __future__ import annotations

import concurrent.futures
import os
from typing import Any

import pytest

from criud.api.client import CriudClientError
from tests.integration.helpers import (
    Daemon,
    Procs,
    drain_after,
    hello_num,
    kill_restore,
    ns_init,
    read_line,
)

LOOP = "i=0; while :; do echo hello $i; i=$((i+1)); sleep 0.05; done"


def _checkpoint_ns_counter(daemon: Daemon, procs: Procs, name: str) -> tuple[str, str, int]:
    """Dump a counter that is pid 1 of its own pid namespace; (id, its pipe's key, last N)."""
    r, w = os.pipe()
    u = procs.spawn(
        ["unshare", "--pid", "--fork", "--kill-child", "setsid", "sh", "-c", LOOP], stdout=w
    )
    os.close(w)
    init = ns_init(u.pid)
    first = hello_num(read_line(r))
    ck = daemon.client.checkpoint(init, name=name)
    key = f"pipe:[{os.fstat(r).st_ino}]"
    assert ck["external"] == [key]
    return ck["id"], key, drain_after(u, r, first)


def _check_independent(
    daemon: Daemon, procs: Procs, recs: list[dict[str, Any]], reads: list[int], last: int
) -> None:
    """Each copy: pid 1 of its own pid namespace, counting on from last, on its own pipe."""
    pidns = set()
    for rec, rd in zip(recs, reads, strict=True):
        procs.adopt(rec["pid"])
        assert rec["state"] == "running" and rec["ns_pid"] == 1
        pidns.add(os.stat(f"/proc/{rec['pid']}/ns/pid").st_ino)
        assert hello_num(read_line(rd)) == last + 1
    assert len(pidns) == len(recs) and os.stat("/proc/self/ns/pid").st_ino not in pidns
    # Kill the first: the others keep counting.
    kill_restore(daemon.client, recs[0]["id"], "the first copy")
    for rd in reads[1:]:
        a = hello_num(read_line(rd))
        b = hello_num(read_line(rd))
        assert b == a + 1
    for rec in recs[1:]:
        kill_restore(daemon.client, rec["id"], "a copy")


def test_three_copies_at_once_each_with_its_own_pipe(daemon: Daemon, procs: Procs) -> None:
    ck_id, key, last = _checkpoint_ns_counter(daemon, procs, "clone-me")
    pipes = [os.pipe() for _ in range(3)]
    try:
        per_copy = []
        for _, w in pipes:
            h = daemon.client.send_fds([w])["handle"]
            per_copy.append({"inherit_fds": [{"key": key, "handle": h, "index": 0}]})
            os.close(w)
        out = daemon.client.request(
            "POST", "/v1/restores", {"checkpoint": ck_id, "copies": 3, "per_copy": per_copy}
        )[1]
        recs = out["copies"]
        assert len(recs) == 3 and len({r["id"] for r in recs}) == 3
        _check_independent(daemon, procs, recs, [r for r, _ in pipes], last)
    finally:
        for r, _ in pipes:
            os.close(r)


def test_concurrent_plain_requests_are_clones_too(daemon: Daemon, procs: Procs) -> None:
    ck_id, key, last = _checkpoint_ns_counter(daemon, procs, "clone-me-too")
    pipes = [os.pipe() for _ in range(3)]
    try:
        with concurrent.futures.ThreadPoolExecutor(3) as ex:
            futs = [ex.submit(daemon.client.restore, ck_id, fds={key: w}) for _, w in pipes]
            recs = [f.result(timeout=60) for f in futs]
        for _, w in pipes:
            os.close(w)
        _check_independent(daemon, procs, recs, [r for r, _ in pipes], last)
    finally:
        for r, _ in pipes:
            os.close(r)


def test_copies_need_a_tree_in_its_own_pid_namespace(daemon: Daemon, procs: Procs) -> None:
    p = procs.spawn(["sleep", "1000"])
    ck = daemon.client.checkpoint(p.pid, name=f"flat-{p.pid}")
    p.wait(timeout=10)
    before = {r["id"] for r in daemon.client.restores()}
    with pytest.raises(CriudClientError) as e:
        daemon.client.request("POST", "/v1/restores", {"checkpoint": ck["id"], "copies": 2})
    assert e.value.status == 422 and e.value.code == "invalid_request"
    assert "pid namespace" in e.value.detail
    # per_copy must give one entry per copy.
    with pytest.raises(CriudClientError) as e:
        daemon.client.request(
            "POST", "/v1/restores", {"checkpoint": ck["id"], "copies": 2, "per_copy": [{}]}
        )
    assert e.value.status == 422
    assert {r["id"] for r in daemon.client.restores()} == before
    daemon.client.delete(ck["id"])
