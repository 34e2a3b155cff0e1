"""/v1/operations: checkpoints and restores started with ?wait=false, looked up and cancelled."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse

from criud.api.deps import caller, service
from criud.api.models import Operation, Problem
from criud.api.service import Service
from criud.daemon.caller import Caller
from criud.daemon.operations import Operation as Op
from criud.daemon.store import CheckpointRecord, RestoreRecord

router = APIRouter(prefix="/v1/operations", tags=["operations"])
ERRORS: dict[int | str, dict[str, object]] = {s: {"model": Problem} for s in (404, 409, 422)}
CoreDep = Annotated[Service, Depends(service)]
CallerDep = Annotated[Caller, Depends(caller)]
# POST /v1/checkpoints and /v1/restores: false answers 202 at once.
WaitQuery = Annotated[
    bool, Query(description="false: answer 202 at once, with the operation to follow")
]


def to_model(op: Op) -> Operation:
    """Shape an operation; its result as the POST that started it would have answered.

    A checkpoint's is the fds in short (fd_summary), as POST /v1/checkpoints
    answers: an operation is polled, and 10,000 fd entries each time would
    cost more than the dump.
    """
    # Deferred: those route modules answer ?wait=false with `accepted` from here.
    from criud.api import checkpoints, migrations, restores

    result: dict[str, Any] | None = None
    if isinstance(op.result, CheckpointRecord):
        result = checkpoints.to_model(op.result, fds=False).model_dump(mode="json")
    elif isinstance(op.result, RestoreRecord):
        result = restores.to_model(op.result).model_dump(mode="json")
    elif op.kind == "migration" and op.result is not None:
        result = migrations.to_model(op.result).model_dump(mode="json")
    problem = None
    if (e := op.error) is not None:
        problem = {"title": e.title, "status": e.status, "detail": e.detail, "code": e.code}
        problem.update(e.extra)
    return Operation.model_validate(
        {
            "id": op.id,
            "kind": op.kind,
            "state": op.state.value,
            "owner_uid": op.owner_uid,
            "target": op.target,
            "created_at": op.created_at,
            "finished_at": op.finished_at,
            "phase": op.progress.phase,
            "progress": op.progress.as_dict(),
            "result": result,
            "problem": problem,
        }
    )


def accepted(op: Op) -> JSONResponse:
    """202 for an operation started with ?wait=false: where to follow it, and what it is now."""
    return JSONResponse(
        to_model(op).model_dump(mode="json"),
        status_code=202,
        headers={"location": f"/v1/operations/{op.id}"},
    )


@router.get("", response_model=list[Operation], responses=ERRORS)
async def list_operations(
    c: CoreDep,
    who: CallerDep,
    state: Literal["running", "done", "failed", "cancelled"] | None = Query(None),
) -> list[Operation]:
    """The caller's operations (root: everyone's): all running ones, the latest ended ones."""
    return [to_model(op) for op in c.list_operations(who, state)]


@router.get("/{op_id}", response_model=Operation, responses=ERRORS)
async def get_operation(op_id: str, c: CoreDep, who: CallerDep) -> Operation:
    """One operation: its state, and its result or problem once it has ended."""
    return to_model(c.get_operation(op_id, who))


@router.delete("/{op_id}", response_model=Operation, responses=ERRORS)
async def cancel_operation(op_id: str, c: CoreDep, who: CallerDep) -> Operation:
    """Cancel a running operation; answers once it has unwound (state cancelled)."""
    return to_model(await c.cancel_operation(op_id, who))
