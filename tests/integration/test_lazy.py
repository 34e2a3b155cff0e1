"""Lazy restore and kernel probes (issue 15): real criu, real userfaultfd, the real daemon.

A 1 GiB tree checksums its memory before the dump; restored lazily, it
answers on the fresh pipe handed in at once, and its checksum at the end
(every page touched, served by criu lazy-pages) is the one from before.
"""

from __future__ import annotations

import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

from criud.api.client import CriudClientError
from tests.integration.helpers import (
    CRIU,
    Daemon,
    Procs,
    pid_gone,
    proc_state,
    read_line,
    temp_root,
    wait_for,
)

# 1 GiB, every page different; answers "ping" and "sum" on its stdin/stdout.
BIG_TREE = r"""
import hashlib, os, sys
buf = bytearray(os.urandom(1 << 20)) * (int(sys.argv[1]) << 10)
for off in range(0, len(buf), 4096):
    buf[off:off + 8] = off.to_bytes(8, "little")
def total():
    return hashlib.sha256(buf).hexdigest()
print("sum " + total(), flush=True)
for line in sys.stdin:
    if line.strip() == "ping":
        print("pong", flush=True)
    elif line.strip() == "sum":
        print("sum " + total(), flush=True)
"""
GIB_PAGES = (1 << 30) // 4096


def _ask(w: int, r: int, what: str, timeout: float = 60.0) -> str:
    os.write(w, what.encode() + b"\n")
    return read_line(r, timeout).decode().strip()


def _big_checkpoint(daemon: Daemon, procs: Procs) -> tuple[dict[str, object], str]:
    """Dump the 1 GiB tree; its checkpoint and the checksum it printed."""
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    try:
        p = procs.python(BIG_TREE, "1", stdin=in_r, stdout=out_w)
        os.close(in_r)
        os.close(out_w)
        before = read_line(out_r, 120).decode().strip()
        assert before.startswith("sum ")
        ck = daemon.client.checkpoint(p.pid, name=f"big-{p.pid}")
        p.wait(timeout=30)
    finally:
        for fd in (in_w, out_r):
            os.close(fd)
    return ck, before


def test_lazy_restore_answers_at_once_and_all_pages_come_in(daemon: Daemon, procs: Procs) -> None:
    v = daemon.client.version()
    assert v["supports"]["lazy_restore"]["supported"] is True
    ck, before = _big_checkpoint(daemon, procs)
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    try:
        t0 = time.monotonic()
        res = daemon.client.restore(str(ck["id"]), stdio=[in_r, out_w, null], lazy=True)
        procs.adopt(res["pid"])
        for fd in (in_r, out_w, null):
            os.close(fd)
        # The images are pinned while the server reads them.
        deleted = True
        try:
            daemon.client.delete(str(ck["id"]))
        except CriudClientError as e:
            assert e.status == 409 and e.code == "busy", e
            deleted = False
        assert _ask(in_w, out_r, "ping") == "pong"
        answered = time.monotonic() - t0
        assert res["lazy"] is True and res["state"] == "running"
        # The whole of its memory, read back: every page came in right.
        assert _ask(in_w, out_r, "sum") == before
        done = wait_for(
            lambda: daemon.client.get_restore(res["id"])["lazy_done_at"], 60, what="lazy done"
        )
        rec = daemon.client.get_restore(res["id"])
        assert rec["pages_lazy"] >= GIB_PAGES, rec
        assert rec["state"] == "running" and rec["error"] is None, rec
        assert done >= res["started_at"]
        if deleted:
            # Only possible if the server had ended already (its pin is
            # released after lazy_done_at is recorded).
            pytest.fail(f"deleted while lazy: answered in {answered:.3f}s, done {done}")
        print(f"lazy restore of 1 GiB answered in {answered * 1000:.0f} ms")
        daemon.client.signal(res["id"], "KILL")
        wait_for(lambda: pid_gone(res["pid"]) or proc_state(res["pid"]) == "Z", 10)
        daemon.client.delete(str(ck["id"]))
    finally:
        for fd in (in_w, out_r):
            os.close(fd)


FAKE_NO_UFFD = """#!/bin/sh
# criu, but `criu check --feature uffd-noncoop` fails: a kernel without it.
for a in "$@"; do [ "$a" = uffd-noncoop ] && exit 1; done
exec {criu} "$@"
"""


def test_lazy_restore_where_the_kernel_lacks_uffd(procs: Procs) -> None:
    with temp_root() as root:
        fake = root / "criu-no-uffd"
        fake.write_text(FAKE_NO_UFFD.format(criu=CRIU))
        fake.chmod(stat.S_IRWXU)
        d = Daemon(root, criu=str(fake)).start()
        try:
            lazy = d.client.version()["supports"]["lazy_restore"]
            assert lazy["supported"] is False and lazy["missing"] == "uffd-noncoop", lazy
            p = procs.spawn(["sleep", "1000"])
            ck = d.client.checkpoint(p.pid, name="nap")
            p.wait(timeout=10)
            with pytest.raises(CriudClientError) as e:
                d.client.restore("nap", lazy=True)
            assert e.value.status == 422 and e.value.code == "unsupported_by_kernel"
            assert "uffd-noncoop" in e.value.detail
            assert e.value.problem.get("feature") == "uffd-noncoop"
            # Nothing half-made: no restore record; the checkpoint restores eagerly.
            assert d.client.restores() == []
            r = d.client.restore(ck["id"])
            procs.adopt(r["pid"])
            d.client.signal(r["id"], "KILL")
        finally:
            assert d.stop() == 0, d.log()


def test_pre_dump_unsupported_by_kernel_leaves_nothing(daemon: Daemon, procs: Procs) -> None:
    pre = daemon.client.version()["supports"]["pre_dump"]
    if pre["supported"]:
        pytest.skip("this kernel tracks dirty memory: the refusal does not apply")
    assert pre["missing"] == "mem_dirty_track"
    p = procs.spawn(["sleep", "1000"])
    before = {c["id"] for c in daemon.client.checkpoints()}
    with pytest.raises(CriudClientError) as e:
        daemon.client.checkpoint(p.pid, name=f"pre-{p.pid}", pre_dumps=2)
    assert e.value.status == 422 and e.value.code == "unsupported_by_kernel"
    assert "mem_dirty_track" in e.value.detail
    # No record, the name free, the target running (not frozen, not traced).
    assert {c["id"] for c in daemon.client.checkpoints()} == before
    assert p.poll() is None and proc_state(p.pid) in ("S", "R")
    assert "TracerPid:\t0" in Path(f"/proc/{p.pid}/status").read_text()


# Memory that changes between the rounds: each pre-dump copies only what moved.
CHURN = r"""
import os, sys, time
buf = bytearray(os.urandom(8 << 20))
i = 0
while True:
    buf[(i * 4096) % len(buf)] = i % 256
    print(i, flush=True)
    i += 1
    time.sleep(0.02)
"""


def test_pre_dumps_then_restore_where_the_kernel_tracks_memory(
    daemon: Daemon, procs: Procs
) -> None:
    """pre_dumps: 2 for real: two `criu pre-dump --track-mem` rounds, a chained final dump.

    Skipped where the start-up probe found no soft-dirty tracking (this VM:
    its stated reason is the skip's).
    """
    pre = daemon.client.version()["supports"]["pre_dump"]
    if not pre["supported"]:
        pytest.skip(f"pre-dump is not supported here: {pre['missing']}: {pre['reason']}")
    r, w = os.pipe()
    try:
        p = procs.python(CHURN, stdout=w)
        os.close(w)
        w = -1
        read_line(r, 30)
        key = f"pipe:[{os.fstat(r).st_ino}]"
        ck = daemon.client.checkpoint(p.pid, name=f"pre-{p.pid}", pre_dumps=2)
        p.wait(timeout=10)
    finally:
        if w >= 0:
            os.close(w)
        os.close(r)
    assert ck["state"] == "done"
    with pytest.raises(CriudClientError) as e, open(os.devnull, "wb") as out:
        daemon.client.export(ck["id"], out)
    assert e.value.code == "invalid_request" and "pre-dumps" in e.value.detail
    r2, w2 = os.pipe()
    try:
        rec = daemon.client.restore(ck["id"], fds={key: w2})
        procs.adopt(rec["pid"])
        os.close(w2)
        w2 = -1
        assert read_line(r2, 30).strip().isdigit()
    finally:
        if w2 >= 0:
            os.close(w2)
        os.close(r2)
    daemon.client.signal(rec["id"], "KILL")


def test_pre_dump_real_attempt_reports_why(daemon: Daemon) -> None:
    """The start-up probe's real attempt, run here: a pre-dump of a throwaway child."""
    import asyncio

    from criud.daemon import kprobe
    from criud.daemon.criu import Criu

    async def attempt() -> str | None:
        c = Criu(CRIU)
        await c.probe()
        with temp_root() as scratch:
            why = await kprobe.attempt(c, scratch, ["pre-dump", "--track-mem"])
        assert c.running == set()
        return why

    why = asyncio.run(asyncio.wait_for(attempt(), 60))
    if daemon.client.version()["features"]["mem_dirty_track"]:
        assert why is None
    else:
        # This kernel: "Dirty tracking is OFF" (criu then aborts).
        assert why is not None and "real attempt failed" in why, why


def test_cli_restore_lazy(daemon: Daemon, procs: Procs) -> None:
    p = procs.spawn(["sleep", "1000"])
    ck = daemon.client.checkpoint(p.pid, name=f"cli-lazy-{p.pid}")
    p.wait(timeout=10)
    out = subprocess.run(
        daemon.cli("restore", ck["id"], "--lazy"), capture_output=True, timeout=60, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "lazy" in out.stdout, out.stdout
    (rec,) = [r for r in daemon.client.restores() if r["checkpoint"] == ck["id"]]
    procs.adopt(rec["pid"])
    assert rec["lazy"] is True
    # A sleep's few pages come in at once: the server ends, the record says so.
    wait_for(lambda: daemon.client.get_restore(rec["id"])["lazy_done_at"], 30, what="lazy done")
    daemon.client.signal(rec["id"], "KILL")
    wait_for(lambda: daemon.client.get_restore(rec["id"])["state"] == "exited", 10)
    daemon.client.delete(ck["id"])
