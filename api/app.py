"""The FastAPI application: routers and the problem handler, nothing else."""

from __future__ import annotations

from fastapi import FastAPI

from criud.api import (
    checkpoints,
    events,
    fd_handles,
    health,
    metrics,
    migrations,
    operations,
    problems,
    processes,
    restores,
)
from criud.api.deps import TcpTokenGate
from criud.api.limits import LimitsMiddleware
from criud.api.service import Service


def create_app(service: Service, token: str | None = None) -> FastAPI:
    """Build the HTTP app around a started (or starting) service.

    token, when set, is the bearer token TCP callers must present.
    """
    app = FastAPI(
        title="criud",
        summary="Checkpoint/restore daemon for container engines",
        version=service.version()["criud"],
    )
    app.state.service = service
    app.state.token = token
    app.state.list_cache = {}
    app.add_middleware(LimitsMiddleware)
    # Added last, so outermost: TCP requests show the token before anything.
    app.add_middleware(TcpTokenGate, token=token)
    problems.install(app)
    for module in (
        health,
        checkpoints,
        restores,
        fd_handles,
        processes,
        events,
        metrics,
        operations,
        migrations,
    ):
        app.include_router(module.router)
    return app
