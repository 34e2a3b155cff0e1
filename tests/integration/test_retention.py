"""Retention: per-caller checkpoint quotas, bulk deletes, and keeping the newest N per pid.

Every test drives a real daemon (its own where it needs flags) that dumps
real processes with real criu.  Root is exempt from the quotas unless
`--quota-root` is given, so the quota tests here (run as root) give it.
"""

from __future__ import annotations

import contextlib
import datetime
import subprocess
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest

from criud.api.client import Client, CriudClientError
from tests.integration.helpers import Daemon, Procs, temp_root, wait_for
from tests.integration.sse import SseReader

SLEEP = ["sleep", "1000"]
# A process whose memory is really resident (bytes * n memsets every page,
# where bytearray(n) would calloc untouched ones): about `MiB` MiB to dump.
FAT = "import sys, time\nb = bytes([1]) * (int(sys.argv[1]) << 20)\ntime.sleep(1000)\n"


@contextlib.contextmanager
def own_daemon(*args: str) -> Iterator[Daemon]:
    with temp_root() as root:
        d = Daemon(root, args=list(args)).start()
        try:
            yield d
        finally:
            rc = d.stop()
            assert rc == 0, f"daemon exited {rc} on SIGTERM: {d.log()}"


def _call(cl: Client, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    try:
        return cl.request(method, path, body)
    except CriudClientError as e:
        return e.status, e.problem


def _ckpt(cl: Client, pid: int, **kw: Any) -> tuple[int, Any]:
    return _call(cl, "POST", "/v1/checkpoints", {"pid": pid, "leave_running": True, **kw})


def _fat(procs: Procs, mib: int) -> int:
    p = procs.python(FAT, str(mib))
    # Resident once its RSS has grown past the size asked for.
    wait_for(lambda: _rss_mib(p.pid) >= mib, 30, what=f"pid {p.pid} to fill {mib} MiB")
    return p.pid


def _rss_mib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        kb = next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:"))
    return kb >> 10


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def _bulk(cl: Client, **query: Any) -> tuple[int, Any]:
    q = urllib.parse.urlencode(query, doseq=True)
    return _call(cl, "DELETE", "/v1/checkpoints" + (f"?{q}" if q else ""))


def _ids(cl: Client) -> set[str]:
    return {c["id"] for c in cl.checkpoints()}


def _deleted_events(d: Daemon, since: int, n: int) -> list[dict[str, Any]]:
    """The first n checkpoint.deleted events after event id since."""
    r = SseReader(d.socket, f"/v1/events?since={since}")
    try:
        out: list[dict[str, Any]] = []
        while len(out) < n:
            ev = r.next(10)
            if ev.get("sse_event") == "checkpoint.deleted":
                out.append(ev)
        return out
    finally:
        r.close()


def _last_event_id(d: Daemon) -> int:
    """The id of the newest event now (0: none yet), read from a replaying stream."""
    r = SseReader(d.socket, "/v1/events?since=0")
    last = 0
    try:
        with contextlib.suppress(TimeoutError):
            while True:
                last = int(r.next(0.5)["sse_id"])
    finally:
        r.close()
    return last


def test_count_quota_refuses_with_409_and_frees_on_delete(procs: Procs) -> None:
    with own_daemon("--max-checkpoints-per-uid", "2", "--quota-root") as d:
        pid = procs.spawn(SLEEP).pid
        first = [_ckpt(d.client, pid) for _ in range(2)]
        assert [st for st, _ in first] == [201, 201], first
        st, doc = _ckpt(d.client, pid)
        assert (st, doc["code"]) == (409, "quota_exceeded"), doc
        assert doc["limit"] == 2 and doc["usage"] == 2, doc
        assert "2 checkpoints" in doc["detail"] and "limit" in doc["detail"], doc
        # Nothing was recorded for the refused one, and the target runs on.
        assert len(d.client.checkpoints()) == 2 and _state(pid) in "SR"
        d.client.delete(first[0][1]["id"])
        assert _ckpt(d.client, pid)[0] == 201


def test_bytes_quota_refuses_before_dumping_with_507(procs: Procs) -> None:
    with own_daemon("--max-checkpoint-bytes-per-uid", "48M", "--quota-root") as d:
        fat = _fat(procs, 64)
        # Not leave_running: a refusal after the dump would have lost it.
        st, doc = _call(d.client, "POST", "/v1/checkpoints", {"pid": fat})
        assert (st, doc["code"]) == (507, "quota_exceeded"), doc
        assert doc["limit"] == 48 << 20 and doc["usage"] == 0, doc
        assert doc["needed"] >= 64 << 20, doc
        assert "limit" in doc["detail"], doc
        # Refused before criu ran: the process was never frozen or dumped.
        assert _state(fat) in "SR" and d.client.checkpoints() == []
        small = procs.spawn(SLEEP).pid
        st, ck = _ckpt(d.client, small)
        assert st == 201 and 0 < ck["size_bytes"] < 48 << 20, ck


def test_bulk_delete_by_label_and_age(daemon: Daemon, procs: Procs) -> None:
    cl = daemon.client
    tag = f"ret{id(procs) & 0xFFFFFF:x}"
    pid = procs.spawn(SLEEP).pid
    a = _ckpt(cl, pid, labels={"app": tag, "tier": "web"})[1]
    b = _ckpt(cl, pid, labels={"app": tag, "tier": "db"})[1]
    c = _ckpt(cl, pid, labels={"app": tag + "y"})[1]
    since = _last_event_id(daemon)

    # No filter is never "everything".
    st, doc = _bulk(cl)
    assert (st, doc["code"]) == (400, "filter_required"), doc
    # Too young to go.
    st, doc = _bulk(cl, older_than="1h", label=f"app={tag}")
    assert st == 200 and doc["deleted"] == [] and doc["skipped"] == [], doc
    # Two labels AND.
    st, doc = _bulk(cl, label=[f"app={tag}", "tier=db"])
    assert st == 200 and [x["id"] for x in doc["deleted"]] == [b["id"]], doc
    st, doc = _bulk(cl, label=f"app={tag}", older_than="0s")
    assert st == 200 and [x["id"] for x in doc["deleted"]] == [a["id"]], doc
    left = _ids(cl)
    assert a["id"] not in left and b["id"] not in left and c["id"] in left
    # RFC 3339: everything created before a minute from now.
    soon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=1)
    st, doc = _bulk(cl, older_than=soon.isoformat(), label=f"app={tag}y")
    assert st == 200 and [x["id"] for x in doc["deleted"]] == [c["id"]], doc
    for bad in ("7 days", "-1h", "soon", "9" * 30 + "d"):
        st, doc = _bulk(cl, older_than=bad)
        assert (st, doc["code"]) == (422, "invalid_request"), (bad, doc)
    evs = _deleted_events(daemon, since, 3)
    assert {e["checkpoint"] for e in evs} == {a["id"], b["id"], c["id"]}


def test_bulk_delete_skips_a_checkpoint_in_use(daemon: Daemon, procs: Procs) -> None:
    cl = daemon.client
    tag = f"busy{id(procs) & 0xFFFFFF:x}"
    fat = _fat(procs, 512)
    # A dump of 512 MiB takes a while: delete while its record says dumping.
    st, op = _call(cl, "POST", "/v1/checkpoints?wait=false", {"pid": fat, "labels": {"app": tag}})
    assert st == 202, op
    wait_for(
        lambda: any(
            c["labels"].get("app") == tag and c["state"] == "dumping" for c in cl.checkpoints()
        ),
        30,
        0.01,
        what="the dump's record, dumping",
    )
    st, doc = _bulk(cl, label=f"app={tag}")
    done = cl.wait_operation(op["id"], 60)
    assert st == 200 and doc["deleted"] == [], doc
    (skip,) = doc["skipped"]
    assert skip["code"] == "busy" and "in use" in skip["detail"], skip
    assert done["state"] == "done", done
    # Once the dump is done, it goes.
    st, doc = _bulk(cl, label=f"app={tag}")
    assert [x["id"] for x in doc["deleted"]] == [done["result"]["id"]], doc


def test_max_checkpoints_per_pid_keeps_the_newest(procs: Procs) -> None:
    with own_daemon("--max-checkpoints-per-pid", "2") as d:
        pid = procs.spawn(SLEEP).pid
        other = procs.spawn(SLEEP).pid
        keep_other = _ckpt(d.client, other)[1]
        made = [_ckpt(d.client, pid)[1] for _ in range(4)]
        assert all("id" in m for m in made), made
        mine = [c["id"] for c in d.client.checkpoints() if c["pid"] == pid]
        assert mine == [made[2]["id"], made[3]["id"]]
        assert keep_other["id"] in _ids(d.client)
        evs = _deleted_events(d, 0, 2)
        assert [e["checkpoint"] for e in evs] == [made[0]["id"], made[1]["id"]]
        assert all(e.get("reason") == "retention" for e in evs), evs


def test_cli_rm_older_than_and_label(daemon: Daemon, procs: Procs) -> None:
    cl = daemon.client
    tag = f"cli{id(procs) & 0xFFFFFF:x}"
    pid = procs.spawn(SLEEP).pid
    ck = _ckpt(cl, pid, labels={"app": tag})[1]
    keep = _ckpt(cl, pid, labels={"app": tag + "k"})[1]

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            daemon.cli(*args), capture_output=True, text=True, timeout=60, check=False
        )

    out = cli("rm")
    assert out.returncode != 0 and "--older-than" in out.stderr, out
    out = cli("rm", "--older-than", "0s", "--label", f"app={tag}")
    assert out.returncode == 0, out.stderr
    assert f"deleted {ck['id']}" in out.stdout, out.stdout
    assert ck["id"] not in _ids(cl) and keep["id"] in _ids(cl)
    cl.delete(keep["id"])


def test_imports_count_against_both_quotas(procs: Procs) -> None:
    # An import makes a checkpoint as a dump does: the count is judged
    # before the body is read, the bytes once the images are unpacked; a
    # refusal leaves no record and no dir behind.
    import io

    with own_daemon("--max-checkpoints-per-uid", "2", "--quota-root") as d:
        pid = procs.spawn(SLEEP).pid
        ck = d.client.checkpoint(pid, leave_running=True)
        buf = io.BytesIO()
        d.client.export(ck["id"], buf, compression="none")
        assert d.client.import_archive(io.BytesIO(buf.getvalue()), name="one")["origin"]
        with pytest.raises(CriudClientError) as e:
            d.client.import_archive(io.BytesIO(buf.getvalue()), name="two")
        assert (e.value.status, e.value.code) == (409, "quota_exceeded")
        assert len(d.client.checkpoints()) == 2
        assert not [p for p in (d.state_dir / "checkpoints").iterdir() if ".tmp" in p.name]
    with own_daemon("--max-checkpoint-bytes-per-uid", "40M", "--quota-root") as d:
        fat = _fat(procs, 24)
        ck = d.client.checkpoint(fat, leave_running=True)
        buf = io.BytesIO()
        d.client.export(ck["id"], buf, compression="zstd")
        # 24 MiB held, 24 MiB more would pass 40M: refused after unpacking.
        with pytest.raises(CriudClientError) as e:
            d.client.import_archive(io.BytesIO(buf.getvalue()), name="big")
        assert (e.value.status, e.value.code) == (507, "quota_exceeded")
        assert [c["id"] for c in d.client.checkpoints()] == [ck["id"]]
        assert not [p for p in (d.state_dir / "checkpoints").iterdir() if ".tmp" in p.name]
