"""Hostile archives sent to POST /v1/checkpoints/import (issue 14).

Each gets a 4xx with a stable code; nothing is written outside the state
dir, and nothing of the attempt is left in it (no .tmp- dir, no new
checkpoint dir, no record).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import tarfile
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zstandard

from criud.api.client import UnixConnection
from criud.daemon import archive
from tests.integration.helpers import Daemon, Procs, small_state_dir, temp_root

ESCAPE = f"criud-escape-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def hd() -> Iterator[Daemon]:
    with temp_root() as root:
        d = Daemon(root).start()
        try:
            yield d
        finally:
            assert d.stop() == 0, d.log()


@pytest.fixture(scope="module")
def good(hd: Daemon) -> bytes:
    """A real export (zstd) of a sleeping tree."""
    procs = Procs()
    try:
        p = procs.spawn(["sleep", "1000"])
        ck = hd.client.checkpoint(p.pid, name="good")
        p.wait(timeout=10)
    finally:
        procs.cleanup()
    out = io.BytesIO()
    hd.client.export(ck["id"], out)
    hd.client.delete(ck["id"])
    return out.getvalue()


def post(d: Daemon, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """POST body to the import route over the unix socket; (status, JSON answer)."""

    conn = UnixConnection(str(d.socket), 120)
    try:
        conn.request("POST", "/v1/checkpoints/import", body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"null")
    finally:
        conn.close()


def _state(d: Daemon) -> set[str]:
    return set(os.listdir(d.state_dir / "checkpoints"))


def _escapes(d: Daemon) -> list[str]:
    """Files named ESCAPE anywhere a hostile name could have put one."""
    places = [Path("/tmp"), Path("/"), d.root, d.state_dir, d.state_dir / "checkpoints"]
    return [str(p / ESCAPE) for p in places if os.path.lexists(p / ESCAPE)]


def refused(d: Daemon, body: bytes, status: int, code: str, **headers: str) -> dict[str, Any]:
    """Send body; check the answer and that nothing was left anywhere."""
    before, records = _state(d), len(d.client.checkpoints())
    st, doc = post(d, body, headers)
    assert (st, doc.get("code")) == (status, code), doc
    assert doc["detail"]
    assert _state(d) == before
    assert len(d.client.checkpoints()) == records
    assert _escapes(d) == []
    return dict(doc)


def _tar(*members: tuple[tarfile.TarInfo, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as t:
        for info, data in members:
            if info.isreg():
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
            else:
                t.addfile(info)
    return buf.getvalue()


def _info(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    i = tarfile.TarInfo(name)
    i.type, i.linkname = kind, link
    return i


def _criud_archive(files: dict[str, bytes]) -> bytes:
    """An archive as criud writes them (criud.sha256 right), of these files."""
    ms = [archive.Member(n, len(b), lambda b=b: io.BytesIO(b)) for n, b in files.items()]
    return b"".join(archive.compress(archive.tar_stream(ms), "zstd"))


def test_absolute_name(hd: Daemon) -> None:
    body = _tar((_info(f"/tmp/{ESCAPE}"), b"pwned"))
    refused(hd, body, 400, "archive_unsafe_name")


def test_dotdot_name(hd: Daemon) -> None:
    body = _tar((_info("checkpoint/x"), b"ok"), (_info(f"../../../../{ESCAPE}"), b"pwned"))
    refused(hd, body, 400, "archive_unsafe_name")


def test_symlink_out_then_write_through_it(hd: Daemon) -> None:
    body = _tar(
        (_info("checkpoint", tarfile.SYMTYPE, "/tmp"), b""),
        (_info(f"checkpoint/{ESCAPE}"), b"pwned"),
    )
    refused(hd, body, 400, "archive_link")


def test_hardlink_out(hd: Daemon) -> None:
    body = _tar((_info("checkpoint/passwd", tarfile.LNKTYPE, "/etc/passwd"), b""))
    refused(hd, body, 400, "archive_link")


@pytest.mark.parametrize("kind", [tarfile.CHRTYPE, tarfile.BLKTYPE])
def test_device(hd: Daemon, kind: bytes) -> None:
    info = _info("checkpoint/mem", kind)
    info.devmajor, info.devminor = 1, 1
    refused(hd, _tar((info, b"")), 400, "archive_special_file")


def test_fifo(hd: Daemon) -> None:
    refused(hd, _tar((_info("checkpoint/f", tarfile.FIFOTYPE), b"")), 400, "archive_special_file")


def test_duplicate_member(hd: Daemon) -> None:
    body = _tar((_info("checkpoint/core-1.img"), b"one"), (_info("checkpoint/core-1.img"), b"2"))
    refused(hd, body, 400, "archive_duplicate_member")


def test_bomb_ratio(hd: Daemon) -> None:
    """64 MiB of zeros in ~3 KiB of zstd: refused once past the ratio's floor (16 MiB)."""
    zeros = _tar((_info("checkpoint/pages-1.img"), b"\0" * (64 << 20)))
    body = zstandard.ZstdCompressor(level=19).compress(zeros)
    assert len(body) < 64 << 10
    refused(hd, body, 413, "archive_ratio_exceeded")
    gz = zlib.compressobj(9, zlib.DEFLATED, 31)
    refused(hd, gz.compress(zeros) + gz.flush(), 413, "archive_ratio_exceeded")


def test_bomb_total_cap(procs: Procs) -> None:
    """A daemon capped at 1 MiB refuses 2 MiB of incompressible images at the cap."""
    with temp_root() as root:
        d = Daemon(root, args=["--import-max-bytes", str(1 << 20)]).start()
        try:
            body = _tar((_info("checkpoint/pages-1.img"), os.urandom(2 << 20)))
            doc = refused(d, body, 413, "archive_too_large")
            assert doc["limit"] == 1 << 20
        finally:
            assert d.stop() == 0, d.log()


def test_truncated(hd: Daemon, good: bytes) -> None:
    refused(hd, good[: len(good) // 2], 400, "archive_truncated")
    plain = zstandard.ZstdDecompressor().decompress(good, max_output_size=1 << 30)
    refused(hd, plain[: len(plain) - 3 * archive.BLOCK], 400, "archive_truncated")


def test_not_an_archive(hd: Daemon) -> None:
    refused(hd, b"GET / HTTP/1.1\r\n" * 100, 400, "archive_corrupt")


def test_wrong_digest(hd: Daemon, good: bytes) -> None:
    wrong = base64.b64encode(hashlib.sha256(good + b"x").digest()).decode()
    refused(hd, good, 400, "digest_mismatch", **{"Content-Digest": f"sha-256=:{wrong}:"})
    refused(hd, good, 400, "digest_mismatch", Digest=f"SHA-256={wrong}")
    wrong512 = base64.b64encode(hashlib.sha512(b"x").digest()).decode()
    refused(hd, good, 400, "digest_mismatch", **{"Content-Digest": f"sha-512=:{wrong512}:"})
    # A malformed digest is refused before a byte is kept.
    refused(hd, good, 422, "invalid_request", **{"Content-Digest": "sha-256=:nope:"})
    # The right one is accepted (and the import kept).
    right = base64.b64encode(hashlib.sha256(good).digest()).decode()
    st, ck = post(hd, good, {"Content-Digest": f"sha-256=:{right}:", "Digest": "SHA-256=bad="})
    assert st == 201, ck
    hd.client.delete(ck["id"])


def test_members_not_matching_their_sums(hd: Daemon, good: bytes) -> None:
    plain = bytearray(zstandard.ZstdDecompressor().decompress(good, max_output_size=1 << 30))
    # The first image's first content byte (after the dir's and its own header).
    plain[2 * archive.BLOCK] ^= 0xFF
    refused(hd, bytes(plain), 400, "archive_checksum_mismatch")


@pytest.mark.parametrize(
    "doc",
    [
        b"not json {",
        b"[1, 2]",
        json.dumps({"format": 99, "checkpoint": {}, "manifest": {}}).encode(),
        json.dumps({"format": 1, "checkpoint": 5, "manifest": {}}).encode(),
        json.dumps({"format": 1, "checkpoint": {}, "manifest": {"tasks": [{"x": 1}]}}).encode(),
        json.dumps({"format": 1, "checkpoint": {}, "manifest": {"run_as": ["root"]}}).encode(),
        json.dumps(
            {"format": 1, "checkpoint": {"options": {"shell_job": "yes"}}, "manifest": {}}
        ).encode(),
        b"[" * 10000 + b"]" * 10000,
    ],
)
def test_garbage_criud_json(hd: Daemon, doc: bytes) -> None:
    body = _criud_archive({"checkpoint/pstree.img": b"x", "criud.json": doc})
    refused(hd, body, 400, "archive_manifest_invalid")


def test_unknown_layout(hd: Daemon) -> None:
    refused(hd, _tar((_info("hello.txt"), b"hi")), 400, "archive_layout_unknown")


def test_name_taken_before_the_body(hd: Daemon, good: bytes) -> None:
    st, ck = post(hd, good)
    assert st == 201, ck
    try:
        before = _state(hd)
        st, doc = post_named(hd, good, ck["name"])
        assert (st, doc["code"]) == (409, "name_taken")
        assert _state(hd) == before
    finally:
        hd.client.delete(ck["id"])


def post_named(d: Daemon, body: bytes, name: str) -> tuple[int, Any]:
    try:
        return 201, d.client.import_archive(io.BytesIO(body), name=name, size=len(body))
    except Exception as e:  # CriudClientError
        return int(e.status), e.problem  # type: ignore[attr-defined]


def test_no_space(procs: Procs) -> None:
    """On an 8 MiB state dir, 16 MiB of images: 507 no_space, nothing left, daemon fine."""
    with temp_root() as root, small_state_dir(root, "8m"):
        d = Daemon(root).start()
        try:
            body = _criud_archive(
                {"checkpoint/pages-1.img": os.urandom(16 << 20), "criud.json": b"{}"}
            )
            refused(d, body, 507, "no_space")
            # The disk is usable again: a small import goes through.
            st, _ = post(d, body[:0] + _criud_archive({"x": b"y"}))
            assert st == 400
        finally:
            assert d.stop() == 0, d.log()
