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

import dataclasses
from collections.abc import Callable
from typing import BinaryIO


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
