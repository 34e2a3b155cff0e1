"""GET /v1/checkpoints answered from its cached bytes, ahead of FastAPI.

The list is the one route clients poll, and its answer is cached already
(criud.api.checkpoints.cached_list); what remained per request was the
framework: the middleware stack, routing and dependency solving took about
60% of the event loop's time for a cached answer (bench/profile.py api).
This layer sits in front of the whole app and answers the exact forms it can
prove equal to the route's -- a unix caller with peer credentials, no query
or only valid `label=key=value` items -- with the same cache, the same view
per caller and the same headers.  Everything else (TCP callers, whose token
the app's TcpTokenGate checks; other query keys; bad filters; errors) goes
to FastAPI unchanged, so the route stays the one place that renders them.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl

from starlette.types import ASGIApp, Receive, Scope, Send

from criud.api.checkpoints import cached_list, cached_list_now
from criud.daemon.caller import Caller
from criud.daemon.errors import CriudError
from criud.daemon.retention import parse_labels

PATH = "/v1/checkpoints"
# The route's JSONResponse sends exactly these (uvicorn adds date and server
# to both alike); tests/security/test_list_views.py compares them.
_TYPE = (b"content-type", b"application/json")


def headers(body: bytes) -> list[tuple[bytes, bytes]]:
    """The headers of the list's answer (besides uvicorn's date and server), as the route's."""
    return [(b"content-length", b"%d" % len(body)), _TYPE]


def _labels(query: bytes) -> dict[str, str] | None:
    """The label filter of a query the fast path takes, or None to leave it to the route."""
    if not query:
        return {}
    # As Starlette parses it for the route.
    items = parse_qsl(query.decode("latin-1"), keep_blank_values=True)
    if any(k != "label" for k, _ in items):
        return None
    try:
        return parse_labels(v for _, v in items)
    except CriudError:
        return None  # the route answers the 422


def cached_now(state: Any, conn_state: dict[str, Any]) -> bytes | None:
    """The body for an exact GET /v1/checkpoints (no query) on a connection, if cached now.

    conn_state is what the connection puts in every request's state (peer,
    tcp): the same test as FastList's, for criud.daemon.server's protocol,
    which answers a hit before any ASGI cycle and leaves a miss to FastList.
    """
    peer = conn_state.get("peer")
    if conn_state.get("tcp") or not isinstance(peer, Caller):
        return None
    return cached_list_now(state, state.service, peer)


class FastList:
    """ASGI layer: the cached list for GET /v1/checkpoints, the app for everything else."""

    def __init__(self, app: ASGIApp, state: Any) -> None:
        self.app = app
        # The app's state: its service, list cache and single flights.
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == PATH and scope["method"] == "GET":
            body = await self._body(scope)
            if body is not None:
                room = scope["state"].get("send_room")
                if room is not None:
                    # The whole answer in one send(), not copied and trickled
                    # out by the transport (criud.daemon.server.SendRoom).
                    room.fit(len(body) + 4096)
                await send({"type": "http.response.start", "status": 200, "headers": headers(body)})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)

    async def _body(self, scope: Scope) -> bytes | None:
        state = scope.get("state") or {}
        peer = state.get("peer")
        # TCP callers go through the app's token gate; a unix peer without
        # credentials gets the route's 403.
        if state.get("tcp") or not isinstance(peer, Caller):
            return None
        wanted = _labels(scope.get("query_string", b""))
        if wanted is None:
            return None
        try:
            return await cached_list(self.state, self.state.service, peer, wanted)
        except CriudError:
            return None  # nothing sent yet: the route renders the problem
