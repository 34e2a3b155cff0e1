"""/v1/processes: see a process tree before freezing it."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Response

from criud.api.deps import caller, core
from criud.api.models import PID_MAX, Problem
from criud.daemon.caller import Caller
from criud.daemon.core import Core

router = APIRouter(prefix="/v1/processes", tags=["processes"])
ERRORS: dict[int | str, dict[str, object]] = {s: {"model": Problem} for s in (403, 404, 422)}
CoreDep = Annotated[Core, Depends(core)]
CallerDep = Annotated[Caller, Depends(caller)]


@router.get(
    "/{pid}",
    responses={**ERRORS, 200: {"content": {"application/json": {"schema": {"type": "object"}}}}},
    response_class=Response,
)
async def inspect_process(
    pid: Annotated[int, Path(ge=1, le=PID_MAX)], c: CoreDep, who: CallerDep
) -> Response:
    """The tree rooted at pid: every task (ids, namespaces, cgroup, memory) and every fd.

    Each fd has its number, CRIU key, type, access mode, whether it is
    external (the tree holds only one end, or the peer is outside), and for
    TCP its state and addresses.  A caller who is not root sees only its own
    processes.
    """
    tree = await c.inspect_process(pid, who)
    # A big tree is megabytes of JSON: encode it in a thread, and without a
    # pydantic model per fd (that alone cost more than reading /proc).
    body = await asyncio.to_thread(json.dumps, tree, separators=(",", ":"))
    return Response(content=body, media_type="application/json")
