"""/metrics: the daemon's Prometheus metrics (root on the unix socket, the token on TCP)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Response

from criud.api.deps import caller, service
from criud.api.models import Problem
from criud.api.service import Service
from criud.daemon.caller import Caller

router = APIRouter(tags=["metrics"])
CoreDep = Annotated[Service, Depends(service)]
CallerDep = Annotated[Caller, Depends(caller)]


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}}, 403: {"model": Problem}},
)
async def metrics(c: CoreDep, who: CallerDep) -> Response:
    """Operations by kind and outcome, their durations, what the daemon holds, its fds and RSS."""
    body, ctype = c.metrics_text(who)
    return Response(body, media_type=ctype)
