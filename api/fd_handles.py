"""/v1/fd-handles: fds received on the fd socket, waiting for a restore."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Depends, Response

from criud.api.deps import caller, service
from criud.api.models import FdHandleModel, HandleFdModel, Problem
from criud.api.service import Service
from criud.daemon.caller import Caller

router = APIRouter(prefix="/v1/fd-handles", tags=["fd-handles"])
ERRORS: dict[int | str, dict[str, object]] = {s: {"model": Problem} for s in (403, 404)}
CoreDep = Annotated[Service, Depends(service)]
CallerDep = Annotated[Caller, Depends(caller)]


@router.get("", response_model=list[FdHandleModel], responses=ERRORS)
async def list_handles(c: CoreDep, who: CallerDep) -> list[FdHandleModel]:
    """Live handles the caller may use (root sees all)."""
    now = time.time()
    return [
        FdHandleModel(
            handle=h.id,
            owner_uid=h.owner_uid,
            count=len(h.fds),
            fds=[
                HandleFdModel(
                    index=f.index, type=f.type, inode=f.inode, key=f.key, mode=f.mode, name=f.name
                )
                for f in h.fds
            ],
            created_at=h.created_at,
            expires_at=h.expires_at,
            expires_in_s=max(0.0, round(h.expires_at - now, 3)),
        )
        for h in c.list_handles(who)
    ]


@router.delete("/{handle}", status_code=204, responses=ERRORS)
async def delete_handle(handle: str, c: CoreDep, who: CallerDep) -> Response:
    """Close a handle's fds now."""
    c.delete_handle(handle, who)
    return Response(status_code=204)
