"""Decoding the few CRIU image files criud reads: stats and pstree.

A CRIU image file starts with one or two 32-bit magics and then holds
entries, each a little-endian u32 length followed by a protobuf message.
The messages we need have only varint and nested-message fields, so a tiny
wire-format reader does the job without a protobuf dependency.

Field numbers come from CRIU's images/stats.proto and images/pstree.proto.
"""

from __future__ import annotations

import logging
import struct
from pathlib import Path
from typing import Any

from criud.daemon import imgdir
from criud.daemon.errors import CheckpointNotReady

log = logging.getLogger("criud.images")
# The most of a stats file the daemon reads.
STATS_CAP = 1 << 20
# The most of a pstree.img the daemon reads (one of some 100,000 tasks
# stays far below it).
PSTREE_CAP = 16 << 20

IMG_COMMON_MAGIC = 0x54564319
IMG_SERVICE_MAGIC = 0x55105940
STATS_MAGIC = 0x57093306
PSTREE_MAGIC = 0x50273030

DUMP_STATS_FIELDS = {
    1: "freezing_time_us",
    2: "frozen_time_us",
    3: "memdump_time_us",
    4: "memwrite_time_us",
    5: "pages_scanned",
    6: "pages_skipped_parent",
    7: "pages_written",
    8: "irmap_resolve_us",
    9: "pages_lazy",
    10: "page_pipes",
    11: "page_pipe_bufs",
    12: "shpages_scanned",
    13: "shpages_skipped_parent",
    14: "shpages_written",
}
RESTORE_STATS_FIELDS = {
    1: "pages_compared",
    2: "pages_skipped_cow",
    3: "forking_time_us",
    4: "restore_time_us",
    5: "pages_restored",
}


class ImageError(CheckpointNotReady):
    """The file is not the CRIU image we expected."""


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ImageError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ImageError("varint too long")


def decode_message(buf: bytes) -> dict[int, list[Any]]:
    """Decode one protobuf message into field number -> list of raw values.

    Varints become ints, length-delimited fields stay bytes (packed repeated
    fields and nested messages are decoded by the caller who knows the schema).
    """
    fields: dict[int, list[Any]] = {}
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        value: Any
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > len(buf):
                raise ImageError("truncated field")
            value, pos = buf[pos : pos + length], pos + length
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            if pos + width > len(buf):
                raise ImageError("truncated field")
            value = struct.unpack_from("<Q" if wire == 1 else "<I", buf, pos)[0]
            pos += width
        else:
            raise ImageError(f"unsupported wire type {wire}")
        fields.setdefault(number, []).append(value)
    return fields


def read_entries(path: Path, magics: tuple[int, ...]) -> list[bytes]:
    """Return the protobuf entries of an image file after checking its magics."""
    return parse_entries(path.read_bytes(), path.name, magics)


def parse_entries(data: bytes, name: str, magics: tuple[int, ...]) -> list[bytes]:
    """The protobuf entries of an image file's content, after checking its magics."""
    head = struct.calcsize("<" + "I" * len(magics))
    if len(data) < head or struct.unpack_from("<" + "I" * len(magics), data) != magics:
        raise ImageError(f"{name}: not a CRIU image of the expected kind")
    entries, pos = [], head
    while pos < len(data):
        if pos + 4 > len(data):
            raise ImageError(f"{name}: truncated entry header")
        (size,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if pos + size > len(data):
            raise ImageError(f"{name}: truncated entry")
        entries.append(data[pos : pos + size])
        pos += size
    return entries


def _named(fields: dict[int, list[Any]], names: dict[int, str]) -> dict[str, int]:
    return {
        names[n]: int(v[-1]) for n, v in fields.items() if n in names and isinstance(v[-1], int)
    }


def read_stats(path: Path) -> dict[str, int]:
    """Decode a stats-dump or stats-restore image into named counters."""
    return parse_stats(path.read_bytes(), path.name)


def stats_in(dirfd: int, name: str) -> dict[str, int]:
    """criu's stats file `name` of the dir at dirfd as counters; {} when missing or unreadable."""
    try:
        return parse_stats(imgdir.read_small(dirfd, name, STATS_CAP), name)
    except (OSError, imgdir.UnsafeEntry, ImageError) as e:
        # Stats are only informative: a checkpoint without them is still good.
        log.warning("cannot read %s: %s", name, e)
        return {}


def parse_stats(data: bytes, name: str) -> dict[str, int]:
    """Decode the content of a stats-dump or stats-restore image into named counters."""
    entries = parse_entries(data, name, (IMG_SERVICE_MAGIC, STATS_MAGIC))
    if not entries:
        raise ImageError(f"{name}: no stats entry")
    top = decode_message(entries[0])
    if 1 in top and isinstance(top[1][-1], bytes):
        return _named(decode_message(top[1][-1]), DUMP_STATS_FIELDS)
    if 2 in top and isinstance(top[2][-1], bytes):
        return _named(decode_message(top[2][-1]), RESTORE_STATS_FIELDS)
    raise ImageError(f"{name}: neither dump nor restore stats")


def _uint(fields: dict[int, list[Any]], number: int, name: str) -> int:
    value = fields.get(number, [0])[-1]
    if not isinstance(value, int):
        raise ImageError(f"{name}: field {number} is not a number")
    return value


def _repeated_u32(values: list[Any]) -> list[int]:
    out: list[int] = []
    for v in values:
        if isinstance(v, bytes):  # packed encoding
            pos = 0
            while pos < len(v):
                x, pos = _varint(v, pos)
                out.append(x)
        else:
            out.append(int(v))
    return out


def read_pstree(path: Path) -> list[dict[str, Any]]:
    """Decode pstree.img: one dict per task with pid, ppid, pgid, sid and threads."""
    return parse_pstree(path.read_bytes(), path.name)


def pstree_in(dirfd: int) -> list[dict[str, Any]]:
    """Decode the pstree.img of the dir at dirfd (at most PSTREE_CAP of it).

    Raises OSError, imgdir.UnsafeEntry or ImageError: each caller says what
    a missing or bad pstree means for it.
    """
    return parse_pstree(imgdir.read_small(dirfd, "pstree.img", PSTREE_CAP))


def parse_pstree(data: bytes, name: str = "pstree.img") -> list[dict[str, Any]]:
    """Decode the content of pstree.img (see read_pstree); the root task comes first."""
    tasks = []
    for entry in parse_entries(data, name, (IMG_COMMON_MAGIC, PSTREE_MAGIC)):
        f = decode_message(entry)
        tasks.append(
            {
                "pid": _uint(f, 1, name),
                "ppid": _uint(f, 2, name),
                "pgid": _uint(f, 3, name),
                "sid": _uint(f, 4, name),
                "threads": _repeated_u32(f.get(5, [])),
            }
        )
    return tasks
