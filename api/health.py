"""/healthz and /v1/version."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends

from criud.api.deps import service
from criud.api.service import Service

router = APIRouter(tags=["health"])
CoreDep = Annotated[Service, Depends(service)]


@router.get("/healthz")
async def healthz(c: CoreDep) -> dict[str, Any]:
    """Liveness: answers while the daemon serves."""
    return {"status": "ok" if c.accepting else "stopping"}


@router.get("/v1/version")
async def version(c: CoreDep) -> dict[str, Any]:
    """criud and criu versions, the kernel, and criu's feature probes."""
    return c.version()
