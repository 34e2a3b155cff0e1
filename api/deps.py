"""Request dependencies: the core and the caller's identity."""

from __future__ import annotations

import hmac

from fastapi import Request

from criud.daemon.caller import Caller
from criud.daemon.core import Core
from criud.daemon.errors import PermissionDenied, Unauthorized


def core(request: Request) -> Core:
    """The daemon core the app was built with."""
    c: Core = request.app.state.core
    return c


def caller(request: Request) -> Caller:
    """Who is calling: SO_PEERCRED on the unix socket, a bearer token on TCP."""
    if getattr(request.state, "tcp", False):
        token: str | None = request.app.state.token
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        # compare_digest: the time taken does not depend on where they differ.
        if (
            token is None
            or scheme.lower() != "bearer"
            or not hmac.compare_digest(value.encode(), token.encode())
        ):
            raise Unauthorized("a valid bearer token is required on the TCP listener")
        return Caller(uid=0, gid=0, pid=0, via_tcp=True)
    peer = getattr(request.state, "peer", None)
    if not isinstance(peer, Caller):
        raise PermissionDenied("no peer credentials on this connection")
    return peer
