"""The archive writer and the safe reader, on real bytes (no daemon)."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import subprocess
import tarfile
import zlib
from pathlib import Path

import pytest
import zstandard

from criud.daemon import archive
from criud.daemon.errors import (
    ArchiveChecksumMismatch,
    ArchiveCorrupt,
    ArchiveDuplicate,
    ArchiveLink,
    ArchiveRatio,
    ArchiveSpecialFile,
    ArchiveTooLarge,
    ArchiveTruncated,
    ArchiveUnsafeName,
    InvalidRequest,
)


def _members(files: dict[str, bytes]) -> list[archive.Member]:
    return [
        archive.Member(name, len(data), lambda d=data: io.BytesIO(d))  # type: ignore[misc]
        for name, data in files.items()
    ]


FILES = {
    "checkpoint/pages-1.img": os.urandom(3 * archive.CHUNK + 17),
    "checkpoint/core-1.img": b"core" * 100,
    "stats-dump": b"",
    "dump.log": b"criu said things\n",
    "criud.json": b'{"a": 1}',
}


def _archive(files: dict[str, bytes], compression: str) -> bytes:
    return b"".join(archive.compress(archive.tar_stream(_members(files)), compression))


def _extract(data: bytes, root: Path, limits: archive.Limits | None = None):
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return archive.extract(io.BytesIO(data), fd, limits or archive.Limits())
    finally:
        os.close(fd)


@pytest.mark.parametrize("compression", archive.COMPRESSIONS)
def test_round_trip(tmp_path: Path, compression: str, fd_leak_check: object) -> None:
    data = _archive(FILES, compression)
    if compression == "none":
        assert len(data) == archive.tar_size(_members(FILES))
    files, kind = _extract(data, tmp_path)
    assert kind == compression
    for name, content in FILES.items():
        assert (tmp_path / name).read_bytes() == content
    sums = (tmp_path / archive.SUMS_NAME).read_bytes()
    archive.check_sums(files, sums)
    assert {f.name for f in files} == {*FILES, archive.SUMS_NAME}


def test_gnu_tar_reads_ours_and_we_read_gnu_tar(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "archive.tar.zst").write_bytes(_archive(FILES, "zstd"))
    subprocess.run(["tar", "--zstd", "-xf", "archive.tar.zst"], cwd=tmp_path / "a", check=True)
    assert (tmp_path / "a" / "checkpoint" / "core-1.img").read_bytes() == FILES[
        "checkpoint/core-1.img"
    ]
    tar_zst = subprocess.run(
        "tar -C a -cf - checkpoint dump.log | zstd -1 -T0",
        shell=True,
        cwd=tmp_path,
        check=True,
        capture_output=True,
    ).stdout
    _extract(tar_zst, tmp_path / "b")
    assert (tmp_path / "b" / "checkpoint" / "pages-1.img").read_bytes() == FILES[
        "checkpoint/pages-1.img"
    ]
    # tar -C dir . style names ("./x") land as x.
    dot = subprocess.run(
        ["tar", "-C", str(tmp_path / "b"), "-czf", "-", "."], check=True, capture_output=True
    ).stdout
    (tmp_path / "c").mkdir()
    _extract(dot, tmp_path / "c")
    assert (tmp_path / "c" / "dump.log").read_bytes() == FILES["dump.log"]


def _tar(*infos: tuple[tarfile.TarInfo, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as t:
        for info, data in infos:
            info.size = len(data) if info.isreg() else 0
            t.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def _info(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    i = tarfile.TarInfo(name)
    i.type, i.linkname = kind, link
    return i


@pytest.mark.parametrize(
    ("infos", "error"),
    [
        ([(_info("/etc/evil"), b"x")], ArchiveUnsafeName),
        ([(_info("../evil"), b"x")], ArchiveUnsafeName),
        ([(_info("checkpoint/../../evil"), b"x")], ArchiveUnsafeName),
        ([(_info("a//b"), b"x")], ArchiveUnsafeName),
        ([(_info("x", tarfile.SYMTYPE, "/etc/passwd"), b"")], ArchiveLink),
        ([(_info("x", tarfile.LNKTYPE, "/etc/passwd"), b"")], ArchiveLink),
        ([(_info("x", tarfile.CHRTYPE), b"")], ArchiveSpecialFile),
        ([(_info("x", tarfile.BLKTYPE), b"")], ArchiveSpecialFile),
        ([(_info("x", tarfile.FIFOTYPE), b"")], ArchiveSpecialFile),
        ([(_info("x"), b"1"), (_info("x"), b"2")], ArchiveDuplicate),
        ([(_info("x"), b"1"), (_info("x", tarfile.DIRTYPE), b"")], ArchiveDuplicate),
        ([(_info("x"), b"1"), (_info("x/y"), b"2")], ArchiveDuplicate),
        ([(_info("a" * 2000), b"1")], ArchiveUnsafeName),
    ],
)
def test_hostile_members(tmp_path: Path, infos, error) -> None:
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(error):
        _extract(_tar(*infos), root)
    assert not (tmp_path / "evil").exists()


def test_truncated(tmp_path: Path) -> None:
    data = _archive(FILES, "none")
    for cut in (100, 600, len(data) // 2, len(data) - 2 * archive.BLOCK):
        root = tmp_path / str(cut)
        root.mkdir()
        with pytest.raises(ArchiveTruncated):
            _extract(data[:cut], root)
    gz = _archive(FILES, "gzip")
    (tmp_path / "gz").mkdir()
    with pytest.raises(ArchiveTruncated):
        _extract(gz[: len(gz) // 2], tmp_path / "gz")


def test_not_a_tar(tmp_path: Path) -> None:
    with pytest.raises(ArchiveCorrupt):
        _extract(b"hello world" * 100, tmp_path)
    # A zstd frame that stops short reads as a truncated archive.
    with pytest.raises((ArchiveCorrupt, ArchiveTruncated)):
        _extract(archive.ZSTD_MAGIC + b"\0" * 100, tmp_path)


def test_bombs(tmp_path: Path) -> None:
    zeros = _tar((_info("z"), b"\0" * (64 << 20)))
    (tmp_path / "a").mkdir()
    with pytest.raises(ArchiveRatio):
        _extract(zstandard.ZstdCompressor().compress(zeros), tmp_path / "a")
    (tmp_path / "b").mkdir()
    with pytest.raises(ArchiveRatio):
        _extract(_gzip(zeros), tmp_path / "b")
    (tmp_path / "c").mkdir()
    with pytest.raises(ArchiveTooLarge):
        _extract(zeros, tmp_path / "c", archive.Limits(max_bytes=1 << 20))


def _gzip(data: bytes) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    return c.compress(data) + c.flush()


def test_sums_mismatch(tmp_path: Path) -> None:
    data = bytearray(_archive(FILES, "none"))
    # Flip a byte of the first member's content (after its dir and file headers).
    data[3 * archive.BLOCK] ^= 1
    files, _ = _extract(bytes(data), tmp_path)
    with pytest.raises(ArchiveChecksumMismatch):
        archive.check_sums(files, (tmp_path / archive.SUMS_NAME).read_bytes())
    digest = hashlib.sha256(b"x").hexdigest()
    with pytest.raises(ArchiveChecksumMismatch):
        archive.check_sums(files, f"{digest}  nothing\n".encode())


def test_threaded_passes_items_errors_and_stops_early() -> None:
    assert list(archive.threaded(iter([b"a", b"b"]))) == [b"a", b"b"]

    def boom():
        yield b"x"
        raise ArchiveCorrupt("bad")

    with pytest.raises(ArchiveCorrupt):
        list(archive.threaded(boom()))
    made: list[int] = []

    def endless():
        i = 0
        while True:
            made.append(i)
            yield b"."
            i += 1

    it = archive.threaded(endless(), depth=2)
    assert next(it) == b"."
    it.close()  # the producer stops (joined), a few items ahead at most
    assert len(made) < 10


def test_coalesce_gathers_small_pieces_and_passes_big_ones() -> None:
    big = b"b" * 100
    out = list(archive.coalesce([b"a" * 10, b"a" * 10, big, b"c"], size=15))
    assert out == [b"a" * 20, big, b"c"]


@pytest.mark.parametrize(
    ("cd", "d", "want"),
    [
        (f"sha-256=:{base64.b64encode(b'1' * 32).decode()}:", None, ("sha256", b"1" * 32)),
        (None, f"SHA-256={base64.b64encode(b'2' * 32).decode()}", ("sha256", b"2" * 32)),
        (
            f"md5=:x:, sha-512=:{base64.b64encode(b'3' * 64).decode()}:",
            None,
            ("sha512", b"3" * 64),
        ),
        ("unixsum=:1:", None, None),
        (None, None, None),
    ],
)
def test_parse_digest(cd: str | None, d: str | None, want: object) -> None:
    assert archive.parse_digest(cd, d) == want


@pytest.mark.parametrize("bad", ["sha-256=abc", "sha-256=:!!:", "sha-256=:YWJj:"])
def test_parse_digest_refuses_malformed(bad: str) -> None:
    with pytest.raises(InvalidRequest):
        archive.parse_digest(bad, None)


def test_pax_names_and_sizes_are_read(tmp_path: Path) -> None:
    """A PAX header's path (decimal size too) is honoured, and checked like any name."""
    long = "checkpoint/" + "p" * 150 + ".img"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        info = tarfile.TarInfo(long)
        info.size = 5
        t.addfile(info, io.BytesIO(b"hello"))
    files, _ = _extract(buf.getvalue(), tmp_path)
    assert [f.name for f in files] == [long]
    assert (tmp_path / long).read_bytes() == b"hello"
    evil = io.BytesIO()
    with tarfile.open(fileobj=evil, mode="w", format=tarfile.PAX_FORMAT) as t:
        info = tarfile.TarInfo("ok")
        info.pax_headers = {"path": "../../" + "x" * 120}
        info.size = 1
        t.addfile(info, io.BytesIO(b"x"))
    (tmp_path / "e").mkdir()
    with pytest.raises(ArchiveUnsafeName):
        _extract(evil.getvalue(), tmp_path / "e")


def test_sparse_and_overlong_components_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ArchiveSpecialFile):
        _extract(_tar((_info("s", tarfile.GNUTYPE_SPARSE), b"")), tmp_path)
    (tmp_path / "n").mkdir()
    with pytest.raises(ArchiveUnsafeName):
        _extract(_tar((_info("checkpoint/" + "n" * 300), b"x")), tmp_path / "n")


def test_the_outbox_lets_go_before_the_last_chunk_goes_out() -> None:
    # A client that knows the length has the archive once the last chunk is
    # out, and may delete the checkpoint at once: what the export held
    # (on_end) must be let go before that chunk is handed on.
    import asyncio

    async def main() -> list[str]:
        seen: list[str] = []
        box = archive.Outbox(asyncio.get_running_loop(), depth=2)
        box.on_end = lambda: seen.append("end")

        def worker() -> None:
            for c in (b"a", b"b", b"c"):
                box.put(c)
            box.finish()

        work = archive.in_thread(worker, name="test-outbox")
        async for chunk in box.chunks():
            seen.append(chunk.decode())
        await work
        return seen

    assert asyncio.run(main()) == ["a", "b", "end", "c"]
