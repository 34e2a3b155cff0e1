"""Request limits applied before any route sees the body.

A body larger than MAX_BODY gets 413, a JSON document nested deeper than
MAX_DEPTH gets 422: Python's json module would otherwise recurse until it
raised RecursionError, which is a 500.  Both answer problem+json.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from criud.daemon.jsonlimits import MAX_DEPTH, json_depth

MAX_BODY = 1 << 20
# Routes whose body is a stream, not JSON: the route reads it itself, bounded
# (an archive import: criud.restore.importer).
STREAMED = frozenset({"/v1/checkpoints/import"})


def _streamed(scope: Scope) -> bool:
    """Whether the route reads its body itself: an import, or a migration's other images.

    The latter (PUT /v1/migrations/incoming/{id}/images) is an archive too:
    buffered here it would be refused past MAX_BODY, scanned as JSON, and
    handed to the route only once all of it arrived (a migration opens it
    while its dump still runs, criud.dump.migrate).
    """
    path = str(scope.get("path") or "")
    if path in STREAMED:
        return True
    parts = path.split("/")
    return (
        scope.get("method") == "PUT"
        and len(parts) == 6
        and parts[:4] == ["", "v1", "migrations", "incoming"]
        and parts[5] == "images"
    )


async def _problem(send: Send, status: int, code: str, title: str, detail: str) -> None:
    body = json.dumps(
        {"type": "about:blank", "title": title, "status": status, "detail": detail, "code": code}
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/problem+json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class LimitsMiddleware:
    """Reads the whole body (bounded), checks it, then replays it to the app."""

    def __init__(self, app: ASGIApp, max_body: int = MAX_BODY, max_depth: int = MAX_DEPTH) -> None:
        self.app = app
        self.max_body = max_body
        self.max_depth = max_depth

    async def _too_large(self, send: Send) -> None:
        await _problem(
            send,
            413,
            "body_too_large",
            "Request body too large",
            f"request bodies are limited to {self.max_body} bytes",
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE")
            or _streamed(scope)
        ):
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            # Refuse on the declared length, before reading a byte of it.
            await self._too_large(send)
            return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                await self._too_large(send)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        if json_depth(body) > self.max_depth:
            await _problem(
                send,
                422,
                "invalid_request",
                "Invalid request",
                f"JSON nested deeper than {self.max_depth} levels",
            )
            return
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            message: Any = await receive()
            return dict(message)

        await self.app(scope, replay, send)
