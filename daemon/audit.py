"""The audit log: one JSON line per mutating call, written off the event loop.

Each line says who (uid, pid, transport), what (action and target) and how it
ended (ok, or the error code).  A background thread does the file I/O so
that a slow disk never stalls the API.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any

_STOP = object()


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
        try:
            while True:
                item = self._q.get()
                if item is _STOP:
                    return
                line = json.dumps(item, sort_keys=True, default=str) + "\n"
                os.write(fd, line.encode())
        finally:
            os.close(fd)
