"""Checkpoint archives: a streamed tar writer and a safe streaming tar reader.

The writer turns a list of `Member`s into tar bytes, compressed as it
goes (zstd, gzip or none), pulling each member's content in chunks: an
archive is never staged whole in memory or on disk.  Its last member,
`criud.sha256`, lists the sha256 of every earlier member (sha256sum's
format), so a reader that has the archive alone can check it.

The reader (`extract`) takes an archive from a blocking byte source,
detects its compression by magic, decompresses incrementally under caps on
the total and on the ratio (a bomb stops early), and parses the tar itself:
only regular files and directories with relative names are accepted, each
created once, through dir fds (O_CREAT|O_EXCL|O_NOFOLLOW), in a dir the
caller made fresh.  Links of either kind are refused outright: a
checkpoint archive has no use for them, and refusing them all is simpler
to get right than judging where each one points.

Nothing here knows about checkpoints or HTTP; errors are CriudErrors with
stable codes (criud.daemon.errors).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import errno
import hashlib
import os
import queue
import threading
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from typing import IO, Any, BinaryIO, Protocol, TypeVar, cast

from criud.daemon.errors import (
    ArchiveChecksumMismatch,
    ArchiveCorrupt,
    ArchiveDuplicate,
    ArchiveInvalid,
    ArchiveLink,
    ArchiveRatio,
    ArchiveSpecialFile,
    ArchiveTooLarge,
    ArchiveTruncated,
    ArchiveUnsafeName,
    ClientGone,
    InvalidRequest,
    NoSpace,
)

# tarfile and zstandard are imported by what makes or reads an archive, not
# at start-up: a daemon that never exports or imports keeps their 0.5 MiB
# (bench/memory_map.py).  The parser below needs only tar's type flags,
# POSIX ustar's (and GNU's, pax's) one-byte codes, as tarfile spells them.
REGTYPE, AREGTYPE, LNKTYPE, SYMTYPE = b"0", b"\0", b"1", b"2"
CHRTYPE, BLKTYPE, DIRTYPE, FIFOTYPE, CONTTYPE = b"3", b"4", b"5", b"6", b"7"
GNUTYPE_LONGNAME, GNUTYPE_SPARSE, XHDTYPE, XGLTYPE = b"L", b"S", b"x", b"g"


@dataclasses.dataclass(frozen=True)
class Member:
    """One regular file of an archive; its parent dirs get entries of their own."""

    # A POSIX relative path in the archive: "spec.dump", "checkpoint/pages-1.img".
    name: str
    size: int
    # Called when the member is written; the writer closes what it returns.
    open: Callable[[], BinaryIO]
    mode: int = 0o644
    mtime: int = 0


T = TypeVar("T")

BLOCK = 512
# The last member: "<sha256 hex>  <name>\n" for each member before it.
SUMS_NAME = "criud.sha256"
COMPRESSIONS = ("zstd", "gzip", "none")
# How much of a member is read (and handed to the compressor) at a time.
CHUNK = 1 << 20
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
GZIP_MAGIC = b"\x1f\x8b"

# -- writing ----------------------------------------------------------------------


def _pad(size: int) -> int:
    return -size % BLOCK


def _header(name: str, size: int, mode: int, mtime: int, kind: bytes) -> bytes:
    """A ustar header; ValueError for a name ustar cannot hold (ours are short)."""
    import tarfile

    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime, info.type = size, mode, mtime, kind
    info.uname = info.gname = "root"
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")


def _dirs_of(members: Sequence[Member]) -> Iterator[tuple[Member, list[str]]]:
    """Each member with the parent dirs not yet seen before it ("a/", "a/b/")."""
    seen: set[str] = set()
    for m in members:
        new: list[str] = []
        parts = m.name.split("/")[:-1]
        for i in range(len(parts)):
            d = "/".join(parts[: i + 1]) + "/"
            if d not in seen:
                seen.add(d)
                new.append(d)
        yield m, new


def _sums_text(sums: Iterable[tuple[str, str]]) -> bytes:
    return "".join(f"{digest}  {name}\n" for name, digest in sums).encode()


def tar_size(members: Sequence[Member]) -> int:
    """The exact size of the uncompressed tar tar_stream(members) writes (Content-Length)."""
    total = 2 * BLOCK  # the end-of-archive marker
    sums = 0
    for m, dirs in _dirs_of(members):
        total += BLOCK * len(dirs) + BLOCK + m.size + _pad(m.size)
        sums += 64 + 2 + len(m.name.encode()) + 1
    return total + BLOCK + sums + _pad(sums)


def check_members(members: Sequence[Member]) -> None:
    """ValueError unless every name is relative, clean, unique and fits a ustar header."""
    seen: set[str] = set()
    for m in members:
        parts = m.name.split("/")
        if m.name.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"archive member name {m.name!r} is not a clean relative path")
        if m.name in seen or m.name == SUMS_NAME:
            raise ValueError(f"archive member {m.name!r} is listed twice")
        seen.add(m.name)
        _header(m.name, m.size, m.mode, m.mtime, REGTYPE)


def tar_stream(members: Sequence[Member]) -> Iterator[bytes]:
    """The uncompressed tar of members, then criud.sha256, in chunks of at most CHUNK.

    A member whose source yields other than its declared size raises
    ArchiveInvalid mid-stream: the archive could not be what it claims.
    """
    check_members(members)
    sums: list[tuple[str, str]] = []
    for m, dirs in _dirs_of(members):
        for d in dirs:
            yield _header(d, 0, 0o755, m.mtime, DIRTYPE)
        yield _header(m.name, m.size, m.mode, m.mtime, REGTYPE)
        digest = hashlib.sha256()
        with contextlib.closing(m.open()) as f:
            left = m.size
            while left > 0:
                chunk = f.read(min(CHUNK, left))
                if not chunk:
                    raise ArchiveInvalid(f"{m.name} shrank while being archived")
                digest.update(chunk)
                left -= len(chunk)
                yield chunk
        yield b"\0" * _pad(m.size)
        sums.append((m.name, digest.hexdigest()))
    text = _sums_text(sums)
    yield _header(SUMS_NAME, len(text), 0o644, 0, REGTYPE)
    yield text + b"\0" * _pad(len(text))
    yield b"\0" * (2 * BLOCK)


def compress(
    chunks: Iterable[bytes], compression: str, level: int = 1, threads: int = -1
) -> Iterator[bytes]:
    """chunks compressed as they come (zstd with threads, gzip, or none)."""
    if compression == "none":
        yield from chunks
        return
    if compression == "zstd":
        import zstandard

        zobj = zstandard.ZstdCompressor(level=level, threads=threads).compressobj()
        for c in chunks:
            out = zobj.compress(c)
            if out:
                yield out
        yield zobj.flush()
        return
    if compression == "gzip":
        gobj = zlib.compressobj(max(1, min(level, 9)), zlib.DEFLATED, 31)
        for c in chunks:
            out = gobj.compress(c)
            if out:
                yield out
        yield gobj.flush()
        return
    raise InvalidRequest(
        f"compression must be one of {', '.join(COMPRESSIONS)}, not {compression!r}"
    )


def check_compression(compression: str) -> None:
    """InvalidRequest unless compression is one the writer knows."""
    if compression not in COMPRESSIONS:
        raise InvalidRequest(
            f"compression must be one of {', '.join(COMPRESSIONS)}, not {compression!r}"
        )


# -- reading ----------------------------------------------------------------------


class Source(Protocol):
    """A blocking byte source: read(n) returns at most n bytes, b"" at the end."""

    def read(self, n: int, /) -> bytes: ...


@dataclasses.dataclass(frozen=True)
class Limits:
    """What an imported archive may unpack to."""

    max_bytes: int = 64 << 30
    # Decompressed bytes per compressed byte, checked once past ratio_floor.
    max_ratio: int = 200
    ratio_floor: int = 16 << 20
    max_members: int = 100_000
    max_name: int = 1024
    max_depth: int = 16


@dataclasses.dataclass(frozen=True)
class Extracted:
    """A regular file extract() wrote: its archive name, size and sha256."""

    name: str
    size: int
    sha256: str


class _Counting:
    """The raw source, counted (compressed bytes in, for the ratio cap)."""

    def __init__(self, src: Source, head: bytes) -> None:
        self.src, self.head, self.count = src, head, len(head)

    def read(self, n: int = -1) -> bytes:
        if self.head:
            out, self.head = self.head, b""
            return out
        data = self.src.read(n if n > 0 else CHUNK)
        self.count += len(data)
        return data


class _Gunzip:
    """gzip members one after another, decompressed with a bound on each read's output."""

    def __init__(self, raw: _Counting) -> None:
        self.raw = raw
        self.obj = zlib.decompressobj(31)
        self.pending = b""
        self.started = False

    def read(self, n: int) -> bytes:
        while True:
            if self.pending:
                data, self.pending = self.pending, b""
            elif self.obj.unconsumed_tail:
                data = self.obj.unconsumed_tail
            else:
                data = self.raw.read(CHUNK)
                if not data:
                    if self.started and not self.obj.eof:
                        raise ArchiveTruncated("the gzip stream ends mid-member")
                    return b""
            self.started = True
            try:
                out = self.obj.decompress(data, n)
            except zlib.error as e:
                raise ArchiveCorrupt(f"the gzip stream is corrupt: {e}") from None
            if self.obj.eof:
                # Concatenated members (pigz, gzip -c a b) decode as one stream.
                self.pending = self.obj.unused_data
                self.obj = zlib.decompressobj(31)
                self.started = bool(self.pending)
            if out:
                return out


class _Capped:
    """The decompressed stream, under the total and ratio caps."""

    def __init__(
        self,
        inner: Source,
        raw: _Counting,
        limits: Limits,
        corrupt: tuple[type[Exception], ...] = (),
    ) -> None:
        self.inner, self.raw, self.limits = inner, raw, limits
        # What the decompressor raises on a corrupt stream (zstd's error).
        self.corrupt = corrupt
        self.count = 0

    def read(self, n: int) -> bytes:
        try:
            data = self.inner.read(n)
        except self.corrupt as e:
            raise ArchiveCorrupt(f"the zstd stream is corrupt: {e}") from None
        self.count += len(data)
        lim = self.limits
        if self.count > lim.max_bytes:
            raise ArchiveTooLarge(
                f"the archive unpacks to more than {lim.max_bytes} bytes", limit=lim.max_bytes
            )
        if self.count > lim.ratio_floor and self.count > lim.max_ratio * max(self.raw.count, 1):
            raise ArchiveRatio(
                f"the archive decompresses more than {lim.max_ratio}:1 "
                f"({self.count} bytes from {self.raw.count})",
                limit=lim.max_ratio,
            )
        return data

    def exact(self, n: int) -> bytes:
        """Exactly n bytes, or ArchiveTruncated."""
        parts: list[bytes] = []
        while n > 0:
            b = self.read(min(n, CHUNK))
            if not b:
                raise ArchiveTruncated("the archive ends in the middle of a member")
            parts.append(b)
            n -= len(b)
        return b"".join(parts)


def _head(src: Source) -> bytes:
    """The first bytes of src (at least 4, unless it is shorter)."""
    head = b""
    while len(head) < 4:
        b = src.read(4 - len(head))
        if not b:
            break
        head += b
    return head


def open_decompressed(src: Source, limits: Limits) -> tuple[_Capped, str]:
    """src decompressed by its magic (zstd, gzip, else plain tar) under limits."""
    head = _head(src)
    raw = _Counting(src, head)
    inner: Source
    corrupt: tuple[type[Exception], ...] = ()
    if head.startswith(ZSTD_MAGIC):
        import zstandard

        kind, corrupt = "zstd", (zstandard.ZstdError,)
        # The window a frame may ask for is capped: a frame cannot make the
        # decoder allocate more than 128 MiB.
        dctx = zstandard.ZstdDecompressor(max_window_size=1 << 27)
        # stream_reader needs only read(n) of its source.
        inner = dctx.stream_reader(
            cast(IO[bytes], raw), read_size=CHUNK, read_across_frames=True, closefd=False
        )
    elif head.startswith(GZIP_MAGIC):
        kind, inner = "gzip", _Gunzip(raw)
    else:
        kind, inner = "none", raw
    return _Capped(inner, raw, limits, corrupt), kind


# -- the tar parser ----------------------------------------------------------------

_LINKS = (LNKTYPE, SYMTYPE, b"K")
_SPECIAL = {
    CHRTYPE: "a character device",
    BLKTYPE: "a block device",
    FIFOTYPE: "a fifo",
    CONTTYPE: "a contiguous file",
    GNUTYPE_SPARSE: "a sparse file",
}
# GNU and PAX extension headers: their content is read (capped), never written.
_EXT_CAP = 1 << 16


def _number(field: bytes, what: str) -> int:
    """A tar numeric field: octal (NUL/space padded) or GNU base-256."""
    if field[:1] and field[0] & 0x80:
        if field[0] != 0x80:
            raise ArchiveCorrupt(f"the {what} field is negative")
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise ArchiveCorrupt(f"the {what} field is not a number: {field!r}") from None


def _check_sum(block: bytes) -> None:
    want = _number(block[148:156], "checksum")
    got = sum(block[:148]) + 8 * 0x20 + sum(block[156:])
    if want != got:
        raise ArchiveCorrupt("a tar header's checksum is wrong (not a tar archive?)")


def _pax(data: bytes) -> dict[str, str]:
    """The records of a PAX extended header ("<len> <key>=<value>\\n")."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        sp = data.find(b" ", pos)
        try:
            length = int(data[pos:sp])
        except ValueError:
            raise ArchiveCorrupt("a PAX header record has no length") from None
        if sp < 0 or length <= 0 or pos + length > len(data):
            raise ArchiveCorrupt("a PAX header record overruns its header")
        rec = data[sp + 1 : pos + length - 1]
        key, eq, value = rec.partition(b"=")
        if not eq:
            raise ArchiveCorrupt("a PAX header record has no '='")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


@dataclasses.dataclass
class _Entry:
    name: str
    size: int
    kind: bytes


def clean_name(raw: str, limits: Limits) -> str:
    """A member's name made relative and checked; ArchiveUnsafeName if it points out.

    A leading "./" (tar -C dir .) is dropped and a dir's trailing "/" too;
    "" is the archive's root.  Absolute names, `..` anywhere, empty or "."
    components inside, NUL, and names past the caps are refused, never
    rewritten into something else.
    """
    if "\0" in raw or len(raw.encode("utf-8", "surrogateescape")) > limits.max_name:
        raise ArchiveUnsafeName(f"member name {raw[:200]!r} is too long or holds NUL")
    if raw.startswith("/"):
        raise ArchiveUnsafeName(f"member name {raw!r} is absolute", member=raw)
    name = raw
    while name.startswith("./"):
        name = name[2:]
    name = name.rstrip("/") if name not in ("", ".") else ""
    if not name:
        return ""
    parts = name.split("/")
    if ".." in parts:
        raise ArchiveUnsafeName(f"member name {raw!r} has a '..' component", member=raw)
    if any(p in ("", ".") for p in parts) or len(parts) > limits.max_depth:
        raise ArchiveUnsafeName(f"member name {raw!r} is not a clean relative path", member=raw)
    return name


class _TarReader:
    """The members of a tar stream, header by header (extension headers folded in)."""

    def __init__(self, stream: _Capped, limits: Limits) -> None:
        self.stream, self.limits = stream, limits

    def _block(self) -> bytes | None:
        first = self.stream.read(BLOCK)
        if not first:
            return None
        return first + self.stream.exact(BLOCK - len(first)) if len(first) < BLOCK else first

    def entries(self) -> Iterator[_Entry]:
        """Each member's header; the caller consumes its content before the next."""
        pax: dict[str, str] = {}
        longname: str | None = None
        while True:
            block = self._block()
            if block is None:
                raise ArchiveTruncated("the archive ends without its end-of-archive marker")
            if block == b"\0" * BLOCK:
                return
            _check_sum(block)
            kind = block[156:157]
            size = _number(block[124:136], "size")
            if kind in (XHDTYPE, XGLTYPE, GNUTYPE_LONGNAME):
                data = self._ext(size)
                if kind == XHDTYPE:
                    pax = _pax(data)
                elif kind == GNUTYPE_LONGNAME:
                    longname = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                continue
            name = pax.get("path") or longname or self._ustar_name(block)
            if "size" in pax:
                # PAX numbers are decimal (the header's are octal).
                if not pax["size"].isdigit():
                    raise ArchiveCorrupt(f"a PAX size is not a number: {pax['size'][:40]!r}")
                size = int(pax["size"])
            pax, longname = {}, None
            yield _Entry(name, size, kind)

    def _ext(self, size: int) -> bytes:
        if size > _EXT_CAP:
            raise ArchiveUnsafeName(f"an extension header of {size} bytes is past the cap")
        data = self.stream.exact(size)
        self.skip(_pad(size))
        return data

    @staticmethod
    def _ustar_name(block: bytes) -> str:
        name = block[0:100].split(b"\0", 1)[0]
        if block[257:262] == b"ustar":
            prefix = block[345:500].split(b"\0", 1)[0]
            if prefix:
                name = prefix + b"/" + name
        return name.decode("utf-8", "surrogateescape")

    def skip(self, n: int) -> None:
        """Read and drop n bytes (padding, a skipped member)."""
        while n > 0:
            got = len(self.stream.exact(min(n, CHUNK)))
            n -= got


# -- extraction ---------------------------------------------------------------------

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def no_space(e: OSError, what: str) -> NoSpace | None:
    """The NoSpace an ENOSPC/EDQUOT means while writing what; None for other errors."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpace(f"{what}: {e.strerror}; nothing was kept")
    return None


class _Extractor:
    """Members written under a fresh dir, each created once through its parent's fd."""

    def __init__(self, root_fd: int, limits: Limits) -> None:
        self.limits = limits
        self.dirs: dict[str, int] = {"": root_fd}
        self.kinds: dict[str, str] = {"": "dir"}
        self.files: list[Extracted] = []

    def close(self) -> None:
        for name, fd in self.dirs.items():
            if name:
                os.close(fd)

    def _claim(self, name: str, kind: str) -> None:
        have = self.kinds.get(name)
        if have is not None and not (have == kind == "dir"):
            raise ArchiveDuplicate(f"member {name!r} appears twice", member=name)
        self.kinds[name] = kind

    def dir(self, name: str) -> int:
        """The fd of dir `name` (made, with its parents, on first use)."""
        fd = self.dirs.get(name)
        if fd is not None:
            return fd
        parent, _, base = name.rpartition("/")
        pfd = self.dir(parent)
        if self.kinds.get(name, "dir") != "dir":
            raise ArchiveDuplicate(f"member {name!r} is a file and a dir", member=name)
        self.kinds[name] = "dir"
        os.mkdir(base, 0o700, dir_fd=pfd)
        fd = os.open(base, _DIR_FLAGS, dir_fd=pfd)
        self.dirs[name] = fd
        return fd

    def file(self, name: str, size: int, reader: _TarReader) -> None:
        """Write member `name` (size bytes from reader) as a new 0600 file."""
        self._claim(name, "file")
        parent, _, base = name.rpartition("/")
        fd = os.open(base, _NEW_FILE, 0o600, dir_fd=self.dir(parent))
        digest = hashlib.sha256()
        try:
            left = size
            while left > 0:
                chunk = reader.stream.exact(min(CHUNK, left))
                digest.update(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
                left -= len(chunk)
        finally:
            os.close(fd)
        reader.skip(_pad(size))
        self.files.append(Extracted(name, size, digest.hexdigest()))


def _refuse(entry: _Entry, name: str) -> None:
    if entry.kind in _LINKS:
        raise ArchiveLink(
            f"member {name!r} is a link; checkpoint archives hold regular files only",
            member=name,
        )
    what = _SPECIAL.get(entry.kind, f"of tar type {entry.kind!r}")
    raise ArchiveSpecialFile(f"member {name!r} is {what}", member=name)


def extract(src: Source, root_fd: int, limits: Limits) -> tuple[list[Extracted], str]:
    """Unpack the archive from src into the empty dir root_fd; (its files, compression).

    root_fd must be a dir the caller made fresh and nobody else can write:
    entries are still made only through dir fds, with O_EXCL and
    O_NOFOLLOW, so nothing is ever resolved outside it.  On any error what
    was written is left for the caller to remove with the dir.
    """
    stream, kind = open_decompressed(src, limits)
    reader = _TarReader(stream, limits)
    ex = _Extractor(root_fd, limits)
    try:
        for count, entry in enumerate(reader.entries()):
            if count >= limits.max_members:
                raise ArchiveTooLarge(f"the archive has more than {limits.max_members} members")
            name = clean_name(entry.name, limits)
            if entry.kind == DIRTYPE:
                if name:
                    ex._claim(name, "dir")
                    ex.dir(name)
                reader.skip(entry.size + _pad(entry.size))
            elif entry.kind in (REGTYPE, AREGTYPE):
                if not name:
                    raise ArchiveUnsafeName("a regular file names the archive's root")
                ex.file(name, entry.size, reader)
            else:
                _refuse(entry, name or entry.name)
        return ex.files, kind
    except OSError as e:
        full = no_space(e, "import")
        if full is not None:
            raise full from e
        if e.errno == errno.ENAMETOOLONG:
            raise ArchiveUnsafeName(f"a member's name is too long: {e.strerror}") from None
        raise
    finally:
        ex.close()


def check_sums(files: Sequence[Extracted], sums: bytes) -> None:
    """Check extracted files against a criud.sha256 (every file listed, every digest right)."""
    want: dict[str, str] = {}
    for line in sums.decode("utf-8", "replace").splitlines():
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64:
            raise ArchiveChecksumMismatch(f"{SUMS_NAME} has a malformed line: {line[:200]!r}")
        want[name] = digest
    have = {f.name: f.sha256 for f in files if f.name != SUMS_NAME}
    for name in sorted(set(want) | set(have)):
        if want.get(name) != have.get(name):
            raise ArchiveChecksumMismatch(
                f"member {name!r} does not match {SUMS_NAME}", member=name
            )


@dataclasses.dataclass(frozen=True)
class Export:
    """An export under way: what its response says of it, and its chunks as they come."""

    filename: str
    # Known up front for an uncompressed archive only.
    content_length: int | None
    compression: str
    chunks: AsyncIterator[bytes]
    operation: str


# -- between the event loop and the thread that does the tar work ----------------------


class Stopped(ClientGone):
    """The other side of an Outbox or Inbox went away (client gone, cancelled)."""


_END = object()
_ABORT = object()


class Outbox:
    """Chunks made in a worker thread, read on the event loop; at most depth in flight.

    The thread waits for room (so memory stays bounded whatever the
    client's pace) and gives up with Stopped once the reader has gone.
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, depth: int = 8, stall_s: float = 300.0
    ) -> None:
        self._loop = loop
        self._q: asyncio.Queue[object] = asyncio.Queue()
        self._room = threading.Semaphore(depth)
        self.stopped = threading.Event()
        self.stall_s = stall_s
        # Called on the loop once the worker has ended cleanly, before the
        # last chunk goes out: what it held for reading (the checkpoint's
        # busy lock) is free by the time the client has every byte.
        self.on_end: Callable[[], None] | None = None

    def put(self, chunk: bytes) -> None:
        """Hand a chunk to the reader (worker thread); Stopped if it has gone.

        A reader that takes nothing for stall_s is taken for gone: a client
        that holds an export open without reading must not pin it forever.
        """
        deadline = time.monotonic() + self.stall_s
        while not self._room.acquire(timeout=0.2):
            if self.stopped.is_set():
                raise Stopped("the reader went away")
            if time.monotonic() > deadline:
                raise Stopped(f"the reader took nothing for {self.stall_s:g} s")
        if self.stopped.is_set():
            raise Stopped("the reader went away")
        self._loop.call_soon_threadsafe(self._q.put_nowait, chunk)

    def finish(self, error: BaseException | None = None) -> None:
        """The end of the chunks: cleanly (None) or with an error for the reader."""
        self._loop.call_soon_threadsafe(self._q.put_nowait, _END if error is None else error)

    async def chunks(self) -> AsyncIterator[bytes]:
        """The chunks as they come; re-raises the worker's error; stops the worker on exit.

        Each chunk is held until the next item arrives, so the last one goes
        out after on_end: a client that deletes the checkpoint as soon as it
        has the whole archive (Content-Length known) never meets its lock.
        """
        pending: bytes | None = None
        try:
            while True:
                item = await self._q.get()
                if item is _END:
                    if self.on_end is not None:
                        self.on_end()
                    if pending is not None:
                        yield pending
                    return
                if isinstance(item, BaseException):
                    raise item
                assert isinstance(item, bytes)
                self._room.release()
                if pending is not None:
                    yield pending
                pending = item
        finally:
            self.stopped.set()


class Inbox:
    """Chunks received on the event loop, read by a worker thread as a Source.

    put() waits (asynchronously) for room, so a fast client cannot make
    the daemon buffer more than depth chunks of its body.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, depth: int = 8) -> None:
        self._loop = loop
        self._q: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._room = asyncio.Semaphore(depth)
        self._buf = b""
        self._pos = 0
        self._ended = False

    async def put(self, chunk: bytes) -> None:
        """Queue a chunk for the thread (event loop)."""
        await self._room.acquire()
        self._q.put(chunk)

    def close(self) -> None:
        """No more chunks: the thread reads the end."""
        self._q.put(_END)

    def abort(self) -> None:
        """The body will not come whole: the thread's next read raises Stopped."""
        self._q.put(_ABORT)

    def read(self, n: int, /) -> bytes:
        """At most n bytes (worker thread); b"" at the end."""
        if self._pos >= len(self._buf):
            if self._ended:
                return b""
            item = self._q.get()
            if item is _END:
                self._ended = True
                return b""
            if item is _ABORT:
                raise Stopped("the body did not arrive whole")
            assert isinstance(item, bytes)
            self._loop.call_soon_threadsafe(self._room.release)
            self._buf, self._pos = item, 0
        out = self._buf[self._pos : self._pos + n]
        self._pos += len(out)
        return out


def in_thread(fn: Callable[..., T], *args: Any, name: str) -> asyncio.Future[T]:
    """fn(*args) in a thread of its own; its outcome as a future of the running loop.

    Not asyncio.to_thread: an export or import holds its thread for as long
    as its client streams, and the default executor's few threads are the
    whole daemon's (a handful of slow clients would stall every other
    to_thread call).  The operations quota bounds how many of these run.
    """
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if fut.done():
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)

    def run() -> None:
        try:
            result = fn(*args)
        except BaseException as e:  # handed to the awaiting task
            loop.call_soon_threadsafe(settle, None, e)
        else:
            loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=run, name=name, daemon=True).start()
    return fut


def threaded(items: Iterable[bytes], depth: int = 4) -> Iterator[bytes]:
    """items, produced by a thread of their own, at most depth ahead of the consumer.

    A pipeline stage: the tar writer reads and hashes in one thread while
    the compressor works in the caller's (both release the GIL), so the two
    use two cores.  An error of the producer is raised here; a consumer that
    stops early stops the producer at its next item.
    """
    q: queue.Queue[object] = queue.Queue(depth)
    stop = threading.Event()

    def run() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.2)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(_END)
        except BaseException as e:  # handed to the consumer, which raises it
            q.put(e)

    t = threading.Thread(target=run, name="criud-archive-tar", daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, bytes)
            yield item
    finally:
        stop.set()
        # Unblock a producer waiting for room, then let it finish.
        with contextlib.suppress(queue.Empty):
            while True:
                q.get_nowait()
        t.join()


def coalesce(chunks: Iterable[bytes], size: int = 1 << 20) -> Iterator[bytes]:
    """chunks regrouped into pieces of about size bytes (fewer hops to the event loop).

    Small pieces (tar headers, zstd's 128 KiB blocks) are gathered in one
    buffer; a chunk that is big enough on its own passes as it is.
    """
    buf = bytearray()
    for c in chunks:
        if not buf and len(c) >= size:
            yield c
            continue
        buf += c
        if len(buf) >= size:
            yield bytes(buf)
            buf.clear()
    if buf:
        yield bytes(buf)


# -- digests (RFC 9530 Content-Digest, RFC 3230 Digest) -------------------------------

_DIGEST_ALGOS = {"sha-256": "sha256", "sha-512": "sha512"}


def parse_digest(content_digest: str | None, digest: str | None) -> tuple[str, bytes] | None:
    """The (hashlib name, digest) a client sent for its body, if one we can check.

    Content-Digest: sha-256=:<base64>: (RFC 9530) is preferred; the legacy
    Digest: SHA-256=<base64> is read too.  Algorithms we do not know are
    ignored (as RFC 9530 allows); a malformed value of one we know is an
    InvalidRequest.
    """
    for header, sep in ((content_digest, ":"), (digest, "")):
        if not header:
            continue
        for item in header.split(","):
            algo, eq, value = item.strip().partition("=")
            name = _DIGEST_ALGOS.get(algo.strip().lower())
            if not eq or name is None:
                continue
            value = value.strip()
            if sep and not (len(value) >= 2 and value[0] == value[-1] == sep):
                raise InvalidRequest(f"Content-Digest {algo}: the value is not :base64:")
            try:
                raw = base64.b64decode(value.strip(sep), validate=True)
            except ValueError:
                raise InvalidRequest(f"digest {algo}: the value is not base64") from None
            if len(raw) != hashlib.new(name).digest_size:
                raise InvalidRequest(f"digest {algo}: {len(raw)} bytes, not a {algo} digest")
            return name, raw
    return None
