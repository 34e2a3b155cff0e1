"""Archives: export from one daemon, import into another, restore there (issue 14).

Daemons A and B have state dirs of their own; the tree's stdout is a pipe
(external), so B's restore needs a new one handed over the fd socket.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import io
import os
import socket
import subprocess
import tarfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from criud.api.client import CriudClientError
from tests.integration.helpers import (
    Daemon,
    Procs,
    hello_num,
    kill_restore,
    read_line,
    restore_into_pipe,
    start_hello,
    temp_root,
    wait_for,
)


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[Daemon, Daemon]]:
    with temp_root() as ra, temp_root() as rb:
        a, b = Daemon(ra).start(), Daemon(rb).start()
        try:
            yield a, b
        finally:
            ca, cb = a.stop(), b.stop()
            assert ca == 0, a.log()
            assert cb == 0, b.log()


def _checkpoint_counter(d: Daemon, procs: Procs, name: str) -> tuple[dict, str, int]:
    """A counter whose stdout is a pipe, checkpointed (not left running); (ck, key, last N)."""
    p, rd = start_hello(procs)
    n = hello_num(read_line(rd))
    ck = d.client.checkpoint(p.pid, name=name)
    p.wait(timeout=10)
    last = n
    with os.fdopen(rd, "rb") as f:
        for line in f.read().splitlines():
            last = hello_num(line + b"\n")
    return ck, ck["external"][0], last


def _members(blob: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:*") as t:
        return t.getnames()


@pytest.mark.parametrize("compression", ["zstd", "gzip", "none"])
def test_round_trip_between_daemons(
    pair: tuple[Daemon, Daemon], procs: Procs, compression: str
) -> None:
    a, b = pair
    ck, key, last = _checkpoint_counter(a, procs, f"count-{compression}")
    out = io.BytesIO()
    sizes: list[tuple[int, int | None]] = []
    n = a.client.export(ck["id"], out, compression, progress=lambda d, t: sizes.append((d, t)))
    blob = out.getvalue()
    assert n == len(blob) > 0
    if compression == "none":
        assert sizes[-1] == (n, n)  # Content-Length was sent
        names = _members(blob)
    else:
        magic = {"zstd": b"\x28\xb5\x2f\xfd", "gzip": b"\x1f\x8b"}[compression]
        assert blob.startswith(magic)
        names = _members(blob) if compression == "gzip" else None
    if names is not None:
        assert "checkpoint" in names and "checkpoint/pstree.img" in names
        assert {"criud.json", "dump.log", "stats-dump"} <= set(names)
        assert names[-1] == "criud.sha256"
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode()
    imp = b.client.import_archive(io.BytesIO(blob), size=len(blob), digest=digest)
    assert imp["origin"] == "import:criud" and imp["owner_uid"] == 0
    assert imp["name"] == ck["name"] and imp["external"] == [key]
    assert imp["state"] == "done" and imp["id"] != ck["id"]
    assert imp["size_bytes"] == ck["size_bytes"]
    listed = {c["id"]: c for c in b.client.checkpoints()}
    assert listed[imp["id"]]["origin"] == "import:criud"
    # An import exports again, with the same images (its archive/ subdir stays home).
    again = io.BytesIO()
    b.client.export(imp["id"], again, "none")
    if names is not None:
        assert _members(again.getvalue()) == names

    r, rd = restore_into_pipe(b.client, procs, imp["id"], key)
    try:
        first = hello_num(read_line(rd))
        assert first == last + 1
        assert hello_num(read_line(rd)) == first + 1
    finally:
        kill_restore(b.client, r["id"])
        os.close(rd)
    # Nothing of the import's staging is left in B's checkpoints dir.
    left = sorted(os.listdir(b.state_dir / "checkpoints"))
    assert all(not n.startswith(".tmp-") for n in left)
    a.client.delete(ck["id"])
    b.client.delete(imp["id"])


def test_export_refusals(pair: tuple[Daemon, Daemon], procs: Procs) -> None:
    a, _ = pair
    with pytest.raises(CriudClientError) as e:
        a.client.export("no-such", io.BytesIO())
    assert e.value.status == 404
    ck, _, _ = _checkpoint_counter(a, procs, "refusals")
    try:
        with pytest.raises(CriudClientError) as e:
            a.client.export(ck["id"], io.BytesIO(), "bzip2")
        assert e.value.status == 422
    finally:
        a.client.delete(ck["id"])


def _running(d: Daemon, kind: str) -> dict[str, Any] | None:
    ops = d.client.request("GET", "/v1/operations?state=running")[1]
    return next((o for o in ops if o["kind"] == kind), None)


def test_cancel_a_running_import_leaves_nothing(pair: tuple[Daemon, Daemon], procs: Procs) -> None:
    a, b = pair
    ck, _, _ = _checkpoint_counter(a, procs, "to-cancel")
    out = io.BytesIO()
    a.client.export(ck["id"], out, "none")
    blob = out.getvalue()
    before = set(os.listdir(b.state_dir / "checkpoints"))
    go_on = threading.Event()
    answer: list[Any] = []

    def body() -> Iterator[bytes]:
        yield blob[: len(blob) // 2]
        go_on.wait(30)
        yield blob[len(blob) // 2 :]

    def upload() -> None:
        try:
            answer.append(b.client.import_archive(_Chunks(body()), name="cancelled"))
        except Exception as e:
            answer.append(e)

    t = threading.Thread(target=upload)
    t.start()
    try:
        # Running, and its first half counted (the op shows before its body).
        wait_for(
            lambda: ((_running(b, "import") or {}).get("progress") or {}).get("bytes_done"),
            20,
            what="the import to run and count its first bytes",
        )
        op = _running(b, "import")
        assert op is not None and op["progress"]["bytes_done"] > 0
        _st, ended = b.client.request("DELETE", f"/v1/operations/{op['id']}")
        assert ended["state"] == "cancelled"
        assert ended["problem"]["code"] == "operation_cancelled"
    finally:
        go_on.set()
        t.join(60)
    assert isinstance(answer[0], (CriudClientError, OSError)), answer
    assert set(os.listdir(b.state_dir / "checkpoints")) == before
    assert all(c["name"] != "cancelled" for c in b.client.checkpoints())
    a.client.delete(ck["id"])


class _Chunks:
    """A file whose read() gives the next chunk of an iterator (b"" at its end)."""

    def __init__(self, it: Iterator[bytes]) -> None:
        self.it = it

    def read(self, n: int = -1) -> bytes:
        return next(self.it, b"")


def test_export_shows_as_an_operation_and_can_be_cancelled(
    pair: tuple[Daemon, Daemon], procs: Procs
) -> None:
    """An export whose reader stalls runs (bounded) until DELETE ends it; the stream is cut."""
    a, _ = pair
    p = procs.python(
        "x = bytearray(os.urandom(64 << 20)); import time; time.sleep(1000)".replace(
            "x =", "import os; x ="
        )
    )
    time.sleep(1.0)
    ck = a.client.checkpoint(p.pid, name="big")
    p.wait(timeout=20)
    conn = http.client.HTTPConnection("localhost")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(str(a.socket))
    conn.sock = s
    try:
        conn.request("GET", f"/v1/checkpoints/{ck['id']}/archive?compression=none")
        resp = conn.getresponse()
        assert resp.status == 200
        length = int(resp.getheader("Content-Length"))
        assert length > 64 << 20
        op_id = resp.getheader("X-Criud-Operation")
        op = a.client.operation(op_id)
        assert op["kind"] == "export" and op["state"] == "running"
        assert op["progress"]["bytes_total"] > 64 << 20
        # Busy while it streams: no delete under its feet.
        with pytest.raises(CriudClientError) as e:
            a.client.delete(ck["id"])
        assert e.value.code == "busy"
        _st, ended = a.client.request("DELETE", f"/v1/operations/{op_id}")
        assert ended["state"] == "cancelled"
        # The stream is cut: fewer bytes than its Content-Length, then the end.
        got = 0
        with contextlib.suppress(http.client.IncompleteRead):
            while chunk := resp.read(1 << 20):
                got += len(chunk)
        assert got < length
    finally:
        conn.close()
    wait_for(lambda: _running(a, "export") is None, 20, what="the export to end")
    a.client.delete(ck["id"])


def test_cli_export_import_and_ls(pair: tuple[Daemon, Daemon], procs: Procs, tmp_path) -> None:
    """criud export -o FILE / -o -, criud import FILE --name, criud ls's origin column."""
    a, b = pair
    ck, _, _ = _checkpoint_counter(a, procs, "cli")
    path = tmp_path / "cli.tar.gz"
    out = subprocess.run(
        a.cli("export", "cli", "-o", str(path), "--compression", "gzip"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert f"exported cli to {path}" in out.stdout
    assert path.read_bytes()[:2] == b"\x1f\x8b"
    # Never overwrites a file.
    again = subprocess.run(
        a.cli("export", "cli", "-o", str(path)), capture_output=True, text=True, timeout=120
    )
    assert again.returncode != 0
    # To stdout: the archive alone on stdout, the summary on stderr.
    piped = subprocess.run(a.cli("export", "cli", "-o", "-"), capture_output=True, timeout=120)
    assert piped.returncode == 0 and piped.stdout[:4] == b"\x28\xb5\x2f\xfd"
    assert b"exported cli" in piped.stderr

    imp = subprocess.run(
        b.cli("import", str(path), "--name", "from-a"), capture_output=True, text=True, timeout=120
    )
    assert imp.returncode == 0, imp.stderr
    assert "as checkpoint" in imp.stdout and "(from-a)" in imp.stdout
    from_stdin = subprocess.run(
        b.cli("import", "-", "--name", "from-stdin"),
        input=piped.stdout,
        capture_output=True,
        timeout=120,
    )
    assert from_stdin.returncode == 0, from_stdin.stderr
    ls = subprocess.run(b.cli("ls"), capture_output=True, text=True, timeout=60).stdout
    (line,) = [ln for ln in ls.splitlines() if " from-a " in ln]
    assert line.split()[-1] == "import:criud"
    assert ls.splitlines()[0].split()[-1] == "ORIGIN"
    for n in ("from-a", "from-stdin"):
        b.client.delete(n)
    a.client.delete(ck["id"])


def test_stalled_clients_end_their_operations(procs: Procs) -> None:
    """--archive-stall-timeout 1: an export nobody reads and an import whose body stops end."""
    with temp_root() as root:
        d = Daemon(root, args=["--archive-stall-timeout", "1"]).start()
        try:
            p = procs.python("import os, time; x = os.urandom(48 << 20); time.sleep(1000)")
            time.sleep(1.0)
            ck = d.client.checkpoint(p.pid, name="stall")
            p.wait(timeout=20)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect(str(d.socket))
            s.sendall(
                f"GET /v1/checkpoints/{ck['id']}/archive HTTP/1.1\r\nHost: x\r\n\r\n".encode()
            )
            # An import that sends a head and a little of its body, then nothing.
            t = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            t.connect(str(d.socket))
            head = (
                b"POST /v1/checkpoints/import HTTP/1.1\r\nHost: x\r\nContent-Length: 99999\r\n\r\n"
            )
            t.sendall(head + b"\0" * 512)
            try:

                def ended() -> list[dict[str, Any]]:
                    ops = d.client.request("GET", "/v1/operations?state=failed")[1]
                    return [o for o in ops if o["problem"]["code"] == "client_gone"]

                wait_for(lambda: len(ended()) == 2, 30, what="both stalled operations to end")
                assert {o["kind"] for o in ended()} == {"export", "import"}
                # The import answered its client, and left nothing.
                t.settimeout(10)
                assert b"client_gone" in t.recv(65536)
                assert os.listdir(d.state_dir / "checkpoints") == [ck["id"]]
                # The checkpoint is free again.
                d.client.delete(ck["id"])
            finally:
                s.close()
                t.close()
        finally:
            assert d.stop() == 0, d.log()
