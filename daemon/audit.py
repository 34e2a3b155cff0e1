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
                item = self._q.get()
                if item is not _STOP:
                    pending.append((json.dumps(item, sort_keys=True, default=str) + "\n").encode())
                self._flush(fd, pending)
                if item is _STOP:
                    return
        finally:
            os.close(fd)

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
