"""The audit log: one JSON line per mutating call, written off the event loop.

Each line says who (uid, pid, transport), what (action and target) and how it
ended (ok, or the error code).  A background thread does the file I/O so
that a slow disk never stalls the API.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any

_STOP = object()
# Entries kept while the disk is full; beyond that the oldest are dropped.
_MAX_PENDING = 10_000
# Once woken by an entry, the writer waits this long for the entries that
# follow it (a dump, its restore, a signal) and writes them together.  A
# writer woken for each entry took the GIL from the event loop in the
# middle of the requests: 1.2 ms of every small dump + restore (twice
# 40 pairs, bench/versus.py against a daemon with no audit log), against
# 0.0 ms with this wait.  An entry reaches the file this much later; a
# daemon killed meanwhile loses at most this window's entries.
_LINGER_S = 0.05
log = logging.getLogger("criud.audit")


class AuditLog:
    """Appends JSON lines to a 0600 file from a dedicated thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._q: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._writer, name="criud-audit", daemon=True)
        self._started = False

    def start(self) -> None:
        self._thread.start()
        self._started = True

    def record(self, **fields: Any) -> None:
        """Queue one entry; never blocks, never raises."""
        self._q.put({"ts": round(time.time(), 6), **fields})

    def stop(self) -> None:
        """Flush what is queued and stop the writer."""
        if self._started:
            self._q.put(_STOP)
            self._thread.join(timeout=10)
            self._started = False

    def _writer(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        # Lines a full disk refused, oldest first: written before the next
        # one, so a full disk delays entries (in order) instead of losing them.
        pending: collections.deque[bytes] = collections.deque(maxlen=_MAX_PENDING)
        try:
            while True:
                batch = self._next_batch()
                pending.extend(
                    (json.dumps(item, sort_keys=True, default=str) + "\n").encode()
                    for item in batch
                    if item is not _STOP
                )
                self._flush(fd, pending)
                if batch[-1] is _STOP:
                    return
        finally:
            os.close(fd)

    def _next_batch(self) -> list[object]:
        """The next entries: the first one waited for, then all that came within _LINGER_S.

        Ends with _STOP if stop() was called (nothing is queued after it).
        """
        batch = [self._q.get()]
        if batch[0] is not _STOP:
            time.sleep(_LINGER_S)
        while batch[-1] is not _STOP:
            try:
                batch.append(self._q.get_nowait())
            except queue.Empty:
                break
        return batch

    def _flush(self, fd: int, pending: collections.deque[bytes]) -> None:
        while pending:
            line = pending[0]
            try:
                # O_APPEND: a short write is ENOSPC half-way; write the rest.
                written = os.write(fd, line)
            except OSError as e:
                log.warning(
                    "audit log %s: %s; %d entries wait", self.path, e.strerror, len(pending)
                )
                return
            if written < len(line):
                pending[0] = line[written:]
            else:
                pending.popleft()
