"""Request dependencies: the service and the caller's identity."""

from __future__ import annotations

import hmac

from fastapi import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from criud.api.problems import problem
from criud.api.service import Service
from criud.daemon.caller import Caller
from criud.daemon.errors import PermissionDenied, Unauthorized

# The only route a TCP client may reach without the token: a liveness probe
# (a load balancer's) carries none, and it tells nothing but "up".
OPEN_ON_TCP = frozenset({"/healthz"})


# Both dependencies are async on purpose: FastAPI runs a plain `def`
# dependency in the thread pool, two hops a request for a few attribute
# reads (issue 13 measured half the server's CPU under load on them).
# Neither may block.


async def service(request: Request) -> Service:
    """The daemon service the app was built with."""
    s: Service = request.app.state.service
    return s


def token_ok(authorization: str, token: str | None) -> bool:
    """Whether an Authorization header carries the bearer token."""
    scheme, _, value = authorization.partition(" ")
    # compare_digest: the time taken does not depend on where they differ.
    return (
        token is not None
        and scheme.lower() == "bearer"
        and hmac.compare_digest(value.encode(), token.encode())
    )


NO_TOKEN = "a valid bearer token is required on the TCP listener"


async def caller(request: Request) -> Caller:
    """Who is calling: SO_PEERCRED on the unix socket, a bearer token on TCP."""
    if getattr(request.state, "tcp", False):
        # TcpTokenGate has checked already; checked again here so that no
        # route depending on the caller can ever run for an unchecked one.
        if not token_ok(request.headers.get("authorization", ""), request.app.state.token):
            raise Unauthorized(NO_TOKEN)
        return Caller(uid=0, gid=0, pid=0, via_tcp=True)
    peer = getattr(request.state, "peer", None)
    if not isinstance(peer, Caller):
        raise PermissionDenied("no peer credentials on this connection")
    return peer


class TcpTokenGate:
    """Refuses every TCP request without the token, except OPEN_ON_TCP.

    Routes that take no caller (the version, the OpenAPI document and its
    viewers, unknown paths) would otherwise answer anyone who reaches the
    port.  Outermost, so that no body is read before the check.
    """

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope.get("state", {}).get("tcp")
            and scope["path"] not in OPEN_ON_TCP
        ):
            auth = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not token_ok(auth.decode("latin-1"), self.token):
                e = Unauthorized(NO_TOKEN)
                resp = problem(e.status, e.code, e.title, e.detail, instance=scope["path"])
                resp.headers["www-authenticate"] = "Bearer"
                await resp(scope, receive, send)
                return
        await self.app(scope, receive, send)
