"""Request dependencies: the core and the caller's identity."""

from __future__ import annotations

from fastapi import Request

from criud.daemon.core import Caller, Core
from criud.daemon.errors import PermissionDenied


def core(request: Request) -> Core:
    """The daemon core the app was built with."""
    c: Core = request.app.state.core
    return c


def caller(request: Request) -> Caller:
    """The peer credentials of the connection (see criud.daemon.server)."""
    peer = getattr(request.state, "peer", None)
    if not isinstance(peer, Caller):
        raise PermissionDenied("no peer credentials on this connection")
    return peer
