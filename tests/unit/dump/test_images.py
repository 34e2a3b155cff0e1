"""criud.dump.images: decoding real CRIU images, and refusing malformed ones."""

from __future__ import annotations

import os
import shutil
import signal
import struct
import subprocess
from pathlib import Path

import pytest

from criud.daemon.criu import read_log
from criud.dump.images import (
    IMG_COMMON_MAGIC,
    IMG_SERVICE_MAGIC,
    PSTREE_MAGIC,
    STATS_MAGIC,
    ImageError,
    decode_message,
    read_entries,
    read_pstree,
    read_stats,
)

from .._helpers import CRIU, need_root_and_criu, proc_state, wait_until


def _criu() -> str:
    return CRIU if os.path.exists(CRIU) else str(shutil.which("criu"))


@pytest.fixture(scope="module")
def dumped(tmp_path_factory: pytest.TempPathFactory):
    """A real `sleep` dumped by the real criu: (images dir, its pid)."""
    need_root_and_criu()
    d = tmp_path_factory.mktemp("images")
    proc = subprocess.Popen(
        ["sleep", "1000"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
    )
    try:
        argv = [_criu(), "dump", "--no-default-config", "-t", str(proc.pid), "-D", str(d)]
        argv += ["-o", "dump.log", "-v4"]
        res = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=60,
        )
        if res.returncode != 0:
            err, tail = read_log(d / "dump.log")
            pytest.fail(f"criu dump failed ({res.returncode}): {err}\n" + "\n".join(tail))
        # The dump kills the tree; reap it.
        assert proc.wait(timeout=10) == -signal.SIGKILL
        yield d, proc.pid
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def restored(dumped):
    """Restore the dumped `sleep` once, kill it again; yield (dir, pid, restored pid)."""
    d, pid = dumped
    pidfile = d / "p"
    argv = [_criu(), "restore", "--no-default-config", "-d", "-D", str(d)]
    argv += ["-o", "restore.log", "--pidfile", str(pidfile)]
    res = subprocess.run(
        argv,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=60,
    )
    restored_pid = int(pidfile.read_text().strip()) if pidfile.exists() else None
    try:
        if res.returncode != 0:
            err, tail = read_log(d / "restore.log")
            pytest.fail(f"criu restore failed ({res.returncode}): {err}\n" + "\n".join(tail))
        assert restored_pid is not None
        # Alive, and no longer our child: criu -d reparents it.
        assert proc_state(restored_pid) not in (None, "Z")
        yield d, pid, restored_pid
    finally:
        if restored_pid is not None and proc_state(restored_pid) not in (None, "Z"):
            os.kill(restored_pid, signal.SIGKILL)
        if restored_pid is not None:
            # It is init's child now: init reaps it (about once a second here).
            assert wait_until(lambda: proc_state(restored_pid) is None, timeout=15)


def test_dump_stats_real_image(dumped) -> None:
    d, _ = dumped
    stats = read_stats(d / "stats-dump")
    assert stats["pages_written"] > 0
    assert stats["frozen_time_us"] > 0
    assert stats["freezing_time_us"] >= 0
    assert stats["memdump_time_us"] > 0
    assert stats["pages_scanned"] >= stats["pages_written"]
    assert set(stats) <= {
        "freezing_time_us",
        "frozen_time_us",
        "memdump_time_us",
        "memwrite_time_us",
        "pages_scanned",
        "pages_skipped_parent",
        "pages_written",
        "irmap_resolve_us",
        "pages_lazy",
        "page_pipes",
        "page_pipe_bufs",
        "shpages_scanned",
        "shpages_skipped_parent",
        "shpages_written",
    }
    assert all(isinstance(v, int) and v >= 0 for v in stats.values())


def test_pstree_real_image(dumped) -> None:
    d, pid = dumped
    tree = read_pstree(d / "pstree.img")
    assert len(tree) == 1
    task = tree[0]
    assert task["pid"] == pid
    assert task["ppid"] == 0  # the root of a dumped tree has no parent in the image
    assert task["pgid"] == pid  # start_new_session: its own group and session
    assert task["sid"] == pid
    assert task["threads"] == [pid]


def test_real_dump_log_has_no_meaningful_error(dumped) -> None:
    d, _ = dumped
    err, tail = read_log(d / "dump.log")
    assert err is None
    assert tail, "dump.log is empty"


def test_wrong_kind_of_real_image(dumped) -> None:
    d, _ = dumped
    with pytest.raises(ImageError):
        read_stats(d / "pstree.img")
    with pytest.raises(ImageError):
        read_pstree(d / "stats-dump")


def test_restore_stats_real_image(restored) -> None:
    d, pid, restored_pid = restored
    assert restored_pid == pid  # criu restores the original pid
    stats = read_stats(d / "stats-restore")
    assert stats["restore_time_us"] > 0
    assert set(stats) <= {
        "pages_compared",
        "pages_skipped_cow",
        "forking_time_us",
        "restore_time_us",
        "pages_restored",
    }


# -- synthetic images -------------------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field_varint(num: int, value: int) -> bytes:
    return _varint(num << 3) + _varint(value)


def _field_bytes(num: int, value: bytes) -> bytes:
    return _varint(num << 3 | 2) + _varint(len(value)) + value


def _image(magics: tuple[int, ...], *entries: bytes) -> bytes:
    out = struct.pack("<" + "I" * len(magics), *magics)
    for e in entries:
        out += struct.pack("<I", len(e)) + e
    return out


STATS = (IMG_SERVICE_MAGIC, STATS_MAGIC)
PSTREE = (IMG_COMMON_MAGIC, PSTREE_MAGIC)


def test_synthetic_dump_stats(tmp_path: Path) -> None:
    inner = _field_varint(2, 1234) + _field_varint(7, 300) + _field_varint(99, 5)
    p = tmp_path / "stats-dump"
    p.write_bytes(_image(STATS, _field_bytes(1, inner)))
    # Unknown field 99 is ignored.
    assert read_stats(p) == {"frozen_time_us": 1234, "pages_written": 300}


def test_synthetic_restore_stats(tmp_path: Path) -> None:
    inner = _field_varint(4, 2**40) + _field_varint(5, 0)
    p = tmp_path / "stats-restore"
    p.write_bytes(_image(STATS, _field_bytes(2, inner)))
    assert read_stats(p) == {"restore_time_us": 2**40, "pages_restored": 0}


def test_synthetic_pstree_packed_and_unpacked(tmp_path: Path) -> None:
    packed = _field_bytes(5, _varint(10) + _varint(11) + _varint(300))
    e1 = _field_varint(1, 10) + _field_varint(2, 0) + _field_varint(3, 10) + _field_varint(4, 10)
    e2 = _field_varint(1, 20) + _field_varint(2, 10) + _field_varint(5, 20)
    p = tmp_path / "pstree.img"
    p.write_bytes(_image(PSTREE, e1 + packed, e2))
    assert read_pstree(p) == [
        {"pid": 10, "ppid": 0, "pgid": 10, "sid": 10, "threads": [10, 11, 300]},
        {"pid": 20, "ppid": 10, "pgid": 0, "sid": 0, "threads": [20]},
    ]


def test_decode_fixed_width_fields() -> None:
    buf = _varint(1 << 3 | 5) + struct.pack("<I", 7) + _varint(2 << 3 | 1) + struct.pack("<Q", 9)
    assert decode_message(buf) == {1: [7], 2: [9]}


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00\x00",
        struct.pack("<II", 0xDEADBEEF, STATS_MAGIC),
        struct.pack("<II", IMG_SERVICE_MAGIC, 0xDEADBEEF),
        struct.pack("<II", STATS_MAGIC, IMG_SERVICE_MAGIC),  # swapped
        struct.pack("<II", IMG_COMMON_MAGIC, PSTREE_MAGIC),  # a pstree, not stats
    ],
    ids=["empty", "short", "bad-first", "bad-second", "swapped", "pstree"],
)
def test_wrong_magic(tmp_path: Path, data: bytes) -> None:
    p = tmp_path / "stats-dump"
    p.write_bytes(data)
    with pytest.raises(ImageError):
        read_stats(p)


def test_stats_without_entry(tmp_path: Path) -> None:
    p = tmp_path / "stats-dump"
    p.write_bytes(_image(STATS))
    with pytest.raises(ImageError, match="no stats entry"):
        read_stats(p)


def test_stats_neither_dump_nor_restore(tmp_path: Path) -> None:
    p = tmp_path / "stats-dump"
    p.write_bytes(_image(STATS, _field_varint(3, 1)))
    with pytest.raises(ImageError, match="neither"):
        read_stats(p)


def test_truncated_entry_header(tmp_path: Path) -> None:
    p = tmp_path / "stats-dump"
    p.write_bytes(_image(STATS) + b"\x05\x00")
    with pytest.raises(ImageError, match="truncated entry header"):
        read_stats(p)


def test_truncated_entry(tmp_path: Path) -> None:
    inner = _field_bytes(1, _field_varint(2, 5))
    data = _image(STATS, inner)
    p = tmp_path / "stats-dump"
    p.write_bytes(data[:-1])
    with pytest.raises(ImageError, match="truncated entry"):
        read_stats(p)


def test_truncated_real_image(dumped, tmp_path: Path) -> None:
    d, _ = dumped
    data = (d / "stats-dump").read_bytes()
    for cut in (3, 9, len(data) - 1):
        p = tmp_path / f"cut-{cut}"
        p.write_bytes(data[:cut])
        with pytest.raises(ImageError):
            read_stats(p)
    data = (d / "pstree.img").read_bytes()
    p = tmp_path / "pstree-cut"
    p.write_bytes(data[:-2])
    with pytest.raises(ImageError):
        read_pstree(p)


@pytest.mark.parametrize(
    "buf",
    [
        b"\x08",  # tag, then no varint value
        b"\x08\x80",  # varint with continuation bit and nothing after
        b"\x12\x05ab",  # length-delimited field longer than the buffer
        b"\x0b",  # wire type 3 (start group): unsupported
        b"\x08" + b"\xff" * 10 + b"\x01",  # varint longer than 64 bits
    ],
    ids=["no-value", "open-varint", "short-bytes", "group", "long-varint"],
)
def test_malformed_messages(buf: bytes) -> None:
    with pytest.raises(ImageError):
        decode_message(buf)


# A fixed32/fixed64 field cut short once raised struct.error, which the core
# does not catch: it must be an ImageError like every other malformed image.
@pytest.mark.parametrize(
    "buf",
    [
        _varint(1 << 3 | 5) + b"\x01\x02",  # fixed32 with 2 of its 4 bytes
        _varint(1 << 3 | 1) + b"\x01\x02\x03",  # fixed64 with 3 of its 8 bytes
    ],
    ids=["fixed32", "fixed64"],
)
def test_truncated_fixed_width_field_raises_image_error(buf: bytes) -> None:
    with pytest.raises(ImageError):
        decode_message(buf)


def test_read_stats_with_truncated_fixed32_raises_image_error(tmp_path: Path) -> None:
    # Core._read_stats only catches OSError and ImageError: a struct.error
    # escaping here turns a corrupt stats-dump into an internal error.
    inner = _field_varint(2, 5) + _varint(3 << 3 | 5) + b"\x01"
    p = tmp_path / "stats-dump"
    p.write_bytes(_image(STATS, _field_bytes(1, inner)))
    with pytest.raises(ImageError):
        read_stats(p)


def test_read_entries_keeps_entries(tmp_path: Path) -> None:
    p = tmp_path / "img"
    p.write_bytes(_image(PSTREE, b"", b"abc", b"\x08\x01"))
    assert read_entries(p, PSTREE) == [b"", b"abc", b"\x08\x01"]
