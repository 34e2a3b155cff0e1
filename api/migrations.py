"""/v1/migrations: move a tree to another daemon (source), and receive one (destination)."""

from __future__ import annotations

import dataclasses
import ipaddress
from typing import TYPE_CHECKING, Annotated

from fastapi import APIRouter, Depends, Request, Response

from criud.api.checkpoints import to_model as checkpoint_model
from criud.api.deps import caller, service
from criud.api.models import (
    Checkpoint,
    Incoming,
    IncomingRequest,
    Migration,
    MigrationRequest,
    Operation,
    Problem,
)
from criud.api.operations import WaitQuery, accepted
from criud.api.service import Service
from criud.daemon.caller import Caller
from criud.dump.options import DumpOptions

if TYPE_CHECKING:
    from criud.dump.migrate import MigrationResult

router = APIRouter(prefix="/v1/migrations", tags=["migrations"])
ERRORS: dict[int | str, dict[str, object]] = {
    s: {"model": Problem} for s in (403, 404, 409, 422, 502, 503)
}
CoreDep = Annotated[Service, Depends(service)]
CallerDep = Annotated[Caller, Depends(caller)]


def to_model(r: MigrationResult) -> Migration:
    """Shape a migration's result for the API."""
    d = dataclasses.asdict(r)
    d.pop("id")
    return Migration(**d)


@router.post(
    "",
    status_code=201,
    response_model=Migration,
    responses={**ERRORS, 202: {"model": Operation, "description": "Started (?wait=false)"}},
)
async def create_migration(
    body: MigrationRequest, c: CoreDep, who: CallerDep, wait: WaitQuery = True
) -> Migration | Response:
    """Move a running tree (pid) or a checkpoint to another daemon; root's only."""
    # Here, not at import: migrations load with the first (api/service.py).
    from criud.daemon.peer import Target
    from criud.dump.migrate import MigrationSpec

    spec = MigrationSpec(
        target=Target.parse(body.target.url, body.target.token),
        pid=body.pid,
        checkpoint=body.checkpoint,
        name=body.name,
        options=DumpOptions(
            leave_running=body.leave_running,
            shell_job=body.shell_job,
            tcp_established=body.tcp_established,
            ext_unix_sk=body.ext_unix_sk,
            file_locks=body.file_locks,
            external=tuple(body.external),
        ),
        labels=dict(body.labels),
        tls=body.tls,
        post_copy=body.post_copy,
    )
    if not wait:
        return accepted(c.start_migration(spec, who))
    return to_model(await c.migrate(spec, who))


def _addresses(request: Request) -> tuple[str | None, str | None]:
    """(the address the request came in on, the one it came from); None over the unix socket."""
    if not getattr(request.state, "tcp", False):
        return None, None
    server, client = request.scope.get("server"), request.scope.get("client")
    local = server[0] if server else None
    peer = client[0] if client else None
    # An IPv4-mapped peer on a dual-stack listener: criu's page server sees it so too.
    for a in (local, peer):
        if a is not None:
            ipaddress.ip_address(a)
    return local, peer


@router.post("/incoming", status_code=201, response_model=Incoming, responses=ERRORS)
async def open_incoming(
    body: IncomingRequest, request: Request, c: CoreDep, who: CallerDep
) -> Incoming:
    """Open a one-shot page server for a migration into this daemon (root's, or the token's)."""
    local, peer = _addresses(request)
    return Incoming.model_validate(await c.open_incoming(who, body.name, body.tls, local, peer))


@router.get("/incoming/{inc_id}", response_model=Incoming, responses=ERRORS)
async def get_incoming(inc_id: str, c: CoreDep, who: CallerDep) -> Incoming:
    """An incoming migration's state."""
    return Incoming.model_validate(await c.get_incoming(inc_id, who))


@router.put("/incoming/{inc_id}/images", status_code=201, response_model=Checkpoint)
async def commit_incoming(inc_id: str, request: Request, c: CoreDep, who: CallerDep) -> Checkpoint:
    """The remaining images (criud's archive as the body); commits the checkpoint."""
    rec = await c.commit_incoming(
        inc_id,
        request.stream(),
        request.headers.get("content-digest"),
        request.headers.get("digest"),
        who,
    )
    return checkpoint_model(rec)


@router.delete("/incoming/{inc_id}", status_code=204, responses=ERRORS)
async def abort_incoming(inc_id: str, c: CoreDep, who: CallerDep) -> Response:
    """Abort an incoming migration: nothing of it is left."""
    await c.abort_incoming(inc_id, who)
    return Response(status_code=204)
