"""/v1/processes: see a process tree before freezing it."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path

from criud.api.deps import caller, core
from criud.api.models import PID_MAX, Problem
from criud.daemon.caller import Caller
from criud.daemon.core import Core

router = APIRouter(prefix="/v1/processes", tags=["processes"])
ERRORS: dict[int | str, dict[str, object]] = {s: {"model": Problem} for s in (403, 404, 422)}
CoreDep = Annotated[Core, Depends(core)]
CallerDep = Annotated[Caller, Depends(caller)]


@router.get("/{pid}", responses=ERRORS)
async def inspect_process(
    pid: Annotated[int, Path(ge=1, le=PID_MAX)], c: CoreDep, who: CallerDep
) -> dict[str, Any]:
    """The tree rooted at pid: every task (ids, namespaces, cgroup, memory) and every fd.

    Each fd has its number, CRIU key, type, access mode, whether it is
    external (the tree holds only one end, or the peer is outside), and for
    TCP its state and addresses.  A caller who is not root sees only its own
    processes.
    """
    return dict(await c.inspect_process(pid, who))
