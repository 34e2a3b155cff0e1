"""Archives: export from one daemon, import into another, restore there (issue 14).

Daemons A and B have state dirs of their own; the tree's stdout is a pipe
(external), so B's restore needs a new one handed over the fd socket.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

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


def _tmp_left(d: Daemon) -> list[str]:
    return [n for n in os.listdir(d.state_dir / "checkpoints") if n.startswith(".tmp-")]


__all__ = ["Path"]
