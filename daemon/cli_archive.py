"""`criud export` and `criud import`: archives to and from files, with a progress bar.

A progress bar (bytes, rate, ETA; rich.progress) is drawn on stderr when it
is a terminal, so `criud export NAME -o - | ssh ...` keeps stdout for the
archive; otherwise the command prints one line when done.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import stat
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, BinaryIO

if TYPE_CHECKING:
    from criud.api.client import Client

ProgressFn = Callable[[int, int | None], None]
_SUFFIX = {"zstd": ".tar.zst", "gzip": ".tar.gz", "none": ".tar"}


def add_parsers(sub: Any, ref_help: str) -> None:
    """The export and import subcommands."""
    e = sub.add_parser("export", help="write a checkpoint as an archive (docs/archives.md)")
    e.add_argument("ref", help=ref_help)
    e.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        help="where to write it ('-': stdout; default NAME.tar.zst)",
    )
    e.add_argument("--compression", choices=list(_SUFFIX), default="zstd")
    i = sub.add_parser("import", help="make a checkpoint of an archive (criud's own)")
    i.add_argument("file", help="the archive ('-': stdin); zstd, gzip or plain tar")
    i.add_argument("--name", help="the new checkpoint's name (default: the archive's)")


@contextmanager
def _progress(what: str, enabled: bool) -> Iterator[ProgressFn | None]:
    """A rich progress bar on stderr, or None where stderr is not a terminal."""
    if not enabled:
        yield None
        return
    from rich.console import Console

    from criud.daemon.progress import byte_bar

    with byte_bar(Console(stderr=True), transient=True) as bar:
        task = bar.add_task(what, total=None)

        def update(done: int, total: int | None) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def _open_out(path: str) -> BinaryIO:
    if path == "-":
        return sys.stdout.buffer
    # O_EXCL: an export never overwrites a file (a typo'd -o).
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    return os.fdopen(fd, "wb")


def run_export(a: argparse.Namespace, cl: Client) -> tuple[Any, str]:
    """criud export: (the JSON answer, the text line)."""
    path = a.output or f"{a.ref.replace('/', '_')}{_SUFFIX[a.compression]}"
    out = _open_out(path)
    try:
        with _progress(f"export {a.ref}", sys.stderr.isatty()) as bar:
            n = cl.export(a.ref, out, a.compression, progress=bar)
        out.flush()
    except BaseException:
        if path != "-":
            out.close()
            os.unlink(path)
        raise
    if path != "-":
        out.close()
    return {"checkpoint": a.ref, "file": path, "bytes": n}, f"exported {a.ref} to {path}: {n} bytes"


def _digest(f: BinaryIO) -> str:
    """The base64 sha-256 of a seekable file (then rewound), sent as Content-Digest."""
    h = hashlib.sha256()
    while chunk := f.read(1 << 20):
        h.update(chunk)
    f.seek(0)
    return base64.b64encode(h.digest()).decode()


def run_import(a: argparse.Namespace, cl: Client) -> tuple[Any, str]:
    """criud import: (the new checkpoint, the text line)."""
    src = sys.stdin.buffer if a.file == "-" else open(a.file, "rb")  # noqa: SIM115
    try:
        st = os.fstat(src.fileno())
        regular = stat.S_ISREG(st.st_mode)
        size = st.st_size if regular else None
        digest = _digest(src) if regular else None
        with _progress(f"import {a.file}", sys.stderr.isatty()) as bar:
            ck = cl.import_archive(src, name=a.name, size=size, digest=digest, progress=bar)
    finally:
        if src is not sys.stdin.buffer:
            src.close()
    name = ck["name"] or "unnamed"
    return ck, f"imported {a.file} as checkpoint {ck['id']} ({name}): {ck['size_bytes']} bytes"
