"""The FastAPI application: routers and the problem handler, nothing else."""

from __future__ import annotations

from fastapi import FastAPI

from criud.api import checkpoints, fd_handles, health, problems, restores
from criud.daemon.core import Core


def create_app(core: Core) -> FastAPI:
    """Build the HTTP app around a started (or starting) core."""
    app = FastAPI(
        title="criud",
        summary="Checkpoint/restore daemon for container engines",
        version=core.version()["criud"],
    )
    app.state.core = core
    problems.install(app)
    for module in (health, checkpoints, restores, fd_handles):
        app.include_router(module.router)
    return app
