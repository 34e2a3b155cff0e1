"""/v1/restores: restore a checkpoint, follow and signal the restored tree."""

from __future__ import annotations

import signal
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Response

from criud.api.deps import caller, service
from criud.api.models import (
    CopyFds,
    Operation,
    Problem,
    Restore,
    RestoreCopies,
    RestoreRequest,
    SignalRequest,
)
from criud.api.operations import WaitQuery, accepted
from criud.api.service import Service
from criud.daemon.caller import Caller
from criud.daemon.errors import InvalidRequest
from criud.daemon.store import RestoreRecord
from criud.restore.job import RestoreSpec
from criud.restore.mappings import InheritSpec

router = APIRouter(prefix="/v1/restores", tags=["restores"])
ERRORS: dict[int | str, dict[str, object]] = {
    s: {"model": Problem} for s in (403, 404, 409, 422, 503)
}
CoreDep = Annotated[Service, Depends(service)]
CallerDep = Annotated[Caller, Depends(caller)]


def to_model(rec: RestoreRecord) -> Restore:
    """Shape a restore record for the API."""
    return Restore(
        id=rec.id,
        checkpoint=rec.checkpoint_id,
        pid=rec.pid,
        ns_pid=rec.ns_pid,
        state=rec.state,
        started_at=rec.started_at,
        finished_at=rec.finished_at,
        exit_code=rec.exit_code,
        exit_signal=rec.exit_signal,
        stats=rec.stats,
        error=rec.error,
        lazy=bool(rec.lazy),
        pages_lazy=rec.pages_lazy,
        lazy_done_at=rec.lazy_done_at,
    )


@router.post(
    "",
    status_code=201,
    response_model=Restore | RestoreCopies,
    responses={**ERRORS, 202: {"model": Operation, "description": "Started (?wait=false)"}},
)
async def create_restore(
    body: RestoreRequest, c: CoreDep, who: CallerDep, wait: WaitQuery = True
) -> Restore | RestoreCopies | Response:
    """Restore a checkpoint; inherit_fds name what each handed-in fd replaces.

    With copies > 1: that many copies at once, each with its per_copy fds
    (answered as {"copies": [...]}).  With ?wait=false: 202 at once, with
    the operation to follow (its Location).
    """
    if body.copies > 1 or body.per_copy:
        specs = _copy_specs(body)
        if not wait:
            raise InvalidRequest("copies are restored with wait=true only")
        return RestoreCopies(copies=[to_model(r) for r in await c.restore_copies(specs, who)])
    spec = _spec(body, body.inherit_fds, body.stdio.handle if body.stdio else None)
    if not wait:
        return accepted(c.start_restore(spec, who))
    return to_model(await c.restore(spec, who))


def _spec(body: RestoreRequest, fds: list[Any], stdio: str | None) -> RestoreSpec:
    return RestoreSpec(
        checkpoint=body.checkpoint,
        inherit=tuple(InheritSpec(**m.model_dump()) for m in fds),
        cgroup=body.cgroup,
        oci_bundle=body.oci.bundle if body.oci else None,
        oci_name=body.oci.name if body.oci else None,
        stdio=stdio,
        lazy=body.lazy,
    )


def _copy_specs(body: RestoreRequest) -> list[RestoreSpec]:
    """One spec per copy, each with its own fds (per_copy, or none)."""
    if body.inherit_fds or body.stdio:
        raise InvalidRequest("with copies, give each copy its fds in per_copy")
    per: list[CopyFds] = body.per_copy or [CopyFds() for _ in range(body.copies)]
    if len(per) != body.copies:
        raise InvalidRequest(f"per_copy has {len(per)} entries for {body.copies} copies")
    return [_spec(body, p.inherit_fds, p.stdio.handle if p.stdio else None) for p in per]


@router.get("", response_model=list[Restore], responses=ERRORS)
async def list_restores(c: CoreDep, who: CallerDep) -> list[Restore]:
    """List restores."""
    return [to_model(r) for r in await c.list_restores(who)]


@router.get("/{restore_id}", response_model=Restore, responses=ERRORS)
async def get_restore(restore_id: str, c: CoreDep, who: CallerDep) -> Restore:
    """One restore: running, or exited with its code or signal."""
    return to_model(await c.get_restore(restore_id, who))


def parse_signal(value: int | str) -> int:
    """Accept 15, "15", "TERM" or "SIGTERM"."""
    if isinstance(value, int):
        return value
    text = value.strip().upper()
    # No signal name or number is longer; int() of a long digit string
    # would raise ValueError past Python's int-digits limit (a 500).
    if len(text) > 16:
        raise InvalidRequest(f"unknown signal {value[:16]!r}... ({len(value)} characters)")
    if text.isascii() and text.isdigit():
        return int(text)
    name = text if text.startswith("SIG") else f"SIG{text}"
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise InvalidRequest(f"unknown signal {value!r}") from None


@router.post("/{restore_id}/signal", response_model=Restore, responses=ERRORS)
async def signal_restore(
    restore_id: str, body: SignalRequest, c: CoreDep, who: CallerDep
) -> Restore:
    """Send a signal to the restored tree's root."""
    return to_model(await c.signal_restore(restore_id, parse_signal(body.signal), who))
