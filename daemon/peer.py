"""One daemon calling another: a minimal HTTP/1.1 client on asyncio streams.

A migration's source calls the destination's TCP listener (plain HTTP with
the bearer token, as any TCP client does).  The requests are few and small
but one: the remaining images, streamed as a chunked body.  Every answer is
JSON (a record or a problem), read whole up to a cap; the connection is
closed after each request.  Errors are translated here, at the edge: the
destination unreachable or gone mid-request is MigrationFailed, an error
answer MigrationRefused carrying the destination's problem.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import urllib.parse
from collections.abc import AsyncIterator
from typing import Any

from criud.daemon.config import Settings
from criud.daemon.errors import InvalidRequest, MigrationFailed, MigrationRefused

# An answer is a record or a problem: a few KiB.  More is not a criud.
MAX_ANSWER = 1 << 20
# Connecting and each answer's wait (a commit reads and seals the images).
CONNECT_TIMEOUT_S = 10.0
ANSWER_TIMEOUT_S = 600.0


def criu_tls_args(s: Settings) -> list[str]:
    """criu's page-server TLS flags from the daemon's CA, certificate and key (both sides)."""
    if s.tls_cacert is None or s.tls_cert is None or s.tls_key is None:
        raise InvalidRequest("TLS was asked for, but this daemon has no --tls-cacert/cert/key")
    return [
        "--tls",
        "--tls-cacert",
        str(s.tls_cacert),
        "--tls-cert",
        str(s.tls_cert),
        "--tls-key",
        str(s.tls_key),
    ]


@dataclasses.dataclass(frozen=True)
class Target:
    """A destination daemon: its TCP listener and the token it wants."""

    host: str
    port: int
    token: str = dataclasses.field(repr=False)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @classmethod
    def parse(cls, url: str, token: str) -> Target:
        """http://ADDR:PORT with a literal IP address; InvalidRequest otherwise.

        Only addresses: a host name would make the root daemon resolve it
        (DNS) on a caller's behalf.
        """
        u = urllib.parse.urlsplit(url)
        if u.scheme != "http" or u.hostname is None or u.path not in ("", "/"):
            raise InvalidRequest(f"target url {url[:200]!r}: expected http://ADDR:PORT")
        try:
            ipaddress.ip_address(u.hostname)
            port = u.port
        except ValueError:
            raise InvalidRequest(
                f"target url {url[:200]!r}: the host must be an IP address, the port a number"
            ) from None
        if port is None:
            raise InvalidRequest(f"target url {url[:200]!r}: the port is required")
        if not token or any(c in token for c in "\r\n\0") or len(token) > 4096:
            raise InvalidRequest("target token: one line, 1 to 4096 characters")
        return cls(u.hostname, port, token)


def _head(target: Target, method: str, path: str, headers: dict[str, str]) -> bytes:
    lines = [
        f"{method} {path} HTTP/1.1",
        f"Host: {target.url[len('http://') :]}",
        f"Authorization: Bearer {target.token}",
        "Connection: close",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _send_chunked(w: asyncio.StreamWriter, body: AsyncIterator[bytes]) -> None:
    async for chunk in body:
        if chunk:
            w.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            await w.drain()
    w.write(b"0\r\n\r\n")
    await w.drain()


async def _read_answer(r: asyncio.StreamReader) -> tuple[int, dict[str, Any]]:
    """(status, decoded JSON body); MigrationFailed when it is not an HTTP answer of JSON."""
    head = await r.readuntil(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        raise MigrationFailed(f"the destination answered {status_line[:80]!r}")
    headers = {}
    for line in header_lines:
        k, sep, v = line.partition(":")
        if sep:
            headers[k.strip().lower()] = v.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        raw = await _read_chunked(r)
    elif "content-length" in headers and headers["content-length"].isdigit():
        n = int(headers["content-length"])
        if n > MAX_ANSWER:
            raise MigrationFailed(f"the destination's answer is {n} bytes")
        raw = await r.readexactly(n)
    else:
        raw = await r.read(MAX_ANSWER)
    try:
        doc = json.loads(raw) if raw else {}
    except ValueError:
        raise MigrationFailed("the destination's answer is not JSON") from None
    return int(parts[1]), doc if isinstance(doc, dict) else {"items": doc}


async def _read_chunked(r: asyncio.StreamReader) -> bytes:
    out = bytearray()
    while True:
        size = int((await r.readuntil(b"\r\n")).split(b";")[0].strip() or b"0", 16)
        if size == 0:
            return bytes(out)
        if len(out) + size > MAX_ANSWER:
            raise MigrationFailed("the destination's answer is too large")
        out += await r.readexactly(size)
        await r.readexactly(2)


async def _stream_and_answer(
    r: asyncio.StreamReader, w: asyncio.StreamWriter, stream: AsyncIterator[bytes]
) -> tuple[int, dict[str, Any]]:
    """Send the chunked body while listening for the answer; the answer.

    A destination may answer before the body is over (a migration's commit
    is opened while the dump still runs, and refused at once when the page
    server failed): that answer ends the request, and the rest of the body
    is not sent.
    """
    sender = asyncio.ensure_future(_send_chunked(w, stream))
    answer = asyncio.ensure_future(_read_answer(r))
    try:
        await asyncio.wait([sender, answer], return_when=asyncio.FIRST_COMPLETED)
        if not answer.done():
            sender.result()  # the body is out (or its error raises here)
        return await asyncio.wait_for(answer, ANSWER_TIMEOUT_S)
    finally:
        for task in (sender, answer):
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


async def call(
    target: Target,
    method: str,
    path: str,
    doc: dict[str, Any] | None = None,
    stream: AsyncIterator[bytes] | None = None,
) -> dict[str, Any]:
    """One request to the destination; its JSON answer, or MigrationRefused/MigrationFailed."""
    try:
        r, w = await asyncio.wait_for(
            asyncio.open_connection(target.host, target.port), CONNECT_TIMEOUT_S
        )
    except (OSError, TimeoutError) as e:
        raise MigrationFailed(
            f"cannot reach the destination {target.url}: {e}", destination=target.url
        ) from None
    try:
        if stream is not None:
            hdrs = {
                "Content-Type": "application/octet-stream",
                "Transfer-Encoding": "chunked",
            }
            w.write(_head(target, method, path, hdrs))
            status, answer = await _stream_and_answer(r, w, stream)
        else:
            payload = json.dumps(doc).encode() if doc is not None else b""
            hdrs = {"Content-Type": "application/json", "Content-Length": str(len(payload))}
            w.write(_head(target, method, path, hdrs) + payload)
            await w.drain()
            status, answer = await asyncio.wait_for(_read_answer(r), ANSWER_TIMEOUT_S)
    except (OSError, EOFError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
        raise MigrationFailed(
            f"the connection to the destination {target.url} broke: {type(e).__name__}",
            destination=target.url,
        ) from None
    except TimeoutError:
        raise MigrationFailed(
            f"the destination {target.url} did not answer", destination=target.url
        ) from None
    finally:
        w.close()
        with contextlib.suppress(Exception):
            await w.wait_closed()
    if status >= 400:
        problem = {k: answer.get(k) for k in ("status", "code", "detail")}
        raise MigrationRefused(
            f"the destination {target.url} answered {method} {path.split('?')[0]} with "
            f"{status} {answer.get('code', '?')}: {str(answer.get('detail', ''))[:300]}",
            destination=target.url,
            problem=problem,
        )
    return answer
