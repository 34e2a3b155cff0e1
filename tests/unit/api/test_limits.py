"""criud.api.limits: which bodies are buffered and checked, which go to the route as a stream."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from criud.api.limits import MAX_BODY, LimitsMiddleware


def _run(method: str, path: str, chunks: list[bytes]) -> tuple[list[Any], list[str]]:
    """Drive the middleware; (what was sent back, the app's view of events in order)."""
    seen: list[str] = []
    sent: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append("app called")
        while True:
            m = await receive()
            seen.append(f"app got {len(m.get('body', b''))}")
            if not m.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 201, "headers": []})

    async def go() -> None:
        queue = list(chunks)

        async def receive() -> dict[str, Any]:
            await asyncio.sleep(0)
            body = queue.pop(0)
            seen.append(f"client sent {len(body)}")
            return {"type": "http.request", "body": body, "more_body": bool(queue)}

        async def send(m: Any) -> None:
            sent.append(m)

        scope = {"type": "http", "method": method, "path": path, "headers": []}
        await asyncio.wait_for(LimitsMiddleware(app)(scope, receive, send), 10)

    asyncio.run(go())
    return sent, seen


def test_a_migrations_other_images_go_to_the_route_as_they_come() -> None:
    """Buffered, the archive waited for its end, was scanned as JSON, and got 413 past 1 MiB."""
    big = [b"\0" * (MAX_BODY // 2)] * 3
    sent, seen = _run("PUT", "/v1/migrations/incoming/abc/images", big)
    assert sent[0]["status"] == 201
    # The route runs before the client sent its second chunk.
    assert seen.index("app called") < seen.index(f"client sent {MAX_BODY // 2}", 1)


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/v1/checkpoints"), ("PUT", "/v1/migrations/incoming/abc/other"),
     ("POST", "/v1/migrations/incoming/abc/images")],
)  # fmt: skip
def test_other_bodies_stay_bounded(method: str, path: str) -> None:
    sent, seen = _run(method, path, [b"{" + b" " * MAX_BODY, b"}"])
    assert sent[0]["status"] == 413 and "app called" not in seen
