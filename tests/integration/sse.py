"""A raw Server-Sent Events reader over the daemon's unix socket, every read bounded.

Stdlib only: tests/security runs this file's source as another user (run_as).
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Sequence
from typing import Any


class SseReader:
    """GET path over a unix socket (HTTP/1.0: the body ends when the daemon closes)."""

    def __init__(
        self,
        sock_path: object,
        path: str = "/v1/events",
        headers: Sequence[tuple[str, str]] = (),
        rcvbuf: int = 0,
    ) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(10)
        self.sock.connect(str(sock_path))
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers)
        self.sock.sendall(f"GET {path} HTTP/1.0\r\nHost: criud\r\n{extra}\r\n".encode())
        self.buf = b""
        self.eof = False
        head = self._until(b"\r\n\r\n", 10)
        self.status = int(head.split(b" ", 2)[1])
        self.head = head.decode("latin-1")

    def _fill(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no data from the event stream in time")
        self.sock.settimeout(left)
        data = self.sock.recv(65536)
        if not data:
            self.eof = True
        self.buf += data

    def _until(self, sep: bytes, timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        while sep not in self.buf:
            if self.eof:
                raise EOFError(f"stream ended: {self.buf[-200:]!r}")
            self._fill(deadline)
        out, self.buf = self.buf.split(sep, 1)
        return out

    def next(self, timeout: float = 10.0) -> dict[str, Any]:
        """The next event: its data, plus sse_id and sse_event; comments skipped."""
        while True:
            block = self._until(b"\n\n", timeout).decode()
            fields: dict[str, str] = {}
            for line in block.split("\n"):
                if not line.startswith(":"):
                    k, _, v = line.partition(": ")
                    fields[k] = v
            if "data" in fields:
                ev: dict[str, Any] = json.loads(fields["data"])
                ev["sse_id"] = fields.get("id")
                ev["sse_event"] = fields.get("event")
                return ev

    def take(self, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        return [self.next(timeout) for _ in range(n)]

    def rest(self, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Every event until the daemon ends the stream."""
        out = []
        while True:
            try:
                out.append(self.next(timeout))
            except EOFError:
                return out

    def close(self) -> None:
        self.sock.close()
