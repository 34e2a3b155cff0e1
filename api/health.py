"""/healthz and /v1/version."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends

from criud.api.deps import core
from criud.daemon.core import Core

router = APIRouter(tags=["health"])
CoreDep = Annotated[Core, Depends(core)]


@router.get("/healthz")
async def healthz(c: CoreDep) -> dict[str, Any]:
    """Liveness: answers while the daemon serves."""
    return {"status": "ok" if c.accepting else "stopping"}


@router.get("/v1/version")
async def version(c: CoreDep) -> dict[str, Any]:
    """criud and criu versions, the kernel, and criu's feature probes."""
    return c.version()
