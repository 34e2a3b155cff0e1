"""/v1/events: what the daemon does, as Server-Sent Events."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query
from fastapi.responses import StreamingResponse

from criud.api.deps import caller, service
from criud.api.models import Problem
from criud.api.service import Service
from criud.daemon.caller import Caller
from criud.daemon.errors import InvalidRequest

router = APIRouter(tags=["events"])
CoreDep = Annotated[Service, Depends(service)]
CallerDep = Annotated[Caller, Depends(caller)]


def _since(since: int | None, last_event_id: str | None) -> int | None:
    """Where the replay starts: ?since=, else the Last-Event-ID of a reconnecting client."""
    if since is not None or last_event_id is None:
        return since
    value = last_event_id.strip()
    if not value.isdigit() or len(value) > 19:
        raise InvalidRequest(f"Last-Event-ID {last_event_id[:40]!r} is not an event id")
    return int(value)


@router.get(
    "/v1/events",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"text/event-stream": {}}},
        400: {"model": Problem},
        422: {"model": Problem},
    },
)
async def events(
    c: CoreDep,
    who: CallerDep,
    since: Annotated[
        int | None, Query(ge=0, le=2**63 - 1, description="replay the events after this id")
    ] = None,
    last_event_id: Annotated[str | None, Header(max_length=40)] = None,
) -> StreamingResponse:
    """Follow the daemon's events (operations, restore exits, deletions, handle expiries).

    A non-root caller gets only its own.  A reader that falls behind gets a
    final `lagged` event and the stream ends; reconnect with `since=` (or
    Last-Event-ID) to be replayed what the ring still holds.
    """
    stream = c.event_stream(who, _since(since, last_event_id))
    return StreamingResponse(
        stream,
        media_type="text/event-stream",
        headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
    )
