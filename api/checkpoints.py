"""/v1/checkpoints: create, list, inspect, delete, read logs."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import TypeAdapter
from starlette.types import Send

from criud.api.deps import caller, service
from criud.api.models import (
    BulkDeleteResult,
    Checkpoint,
    CheckpointRequest,
    FdEntry,
    FdSummary,
    Operation,
    PreflightReport,
    PreflightRequest,
    Problem,
)
from criud.api.operations import WaitQuery, accepted
from criud.api.service import Service
from criud.daemon import memory
from criud.daemon.caller import Caller
from criud.daemon.errors import CriudError

# The list's ?label=key=value filter, read as bulk deletion reads it.
from criud.daemon.retention import parse_labels
from criud.daemon.store import CheckpointRecord
from criud.dump.job import CheckpointSpec
from criud.dump.manifest import Manifest, summarize
from criud.dump.options import DumpOptions

router = APIRouter(prefix="/v1/checkpoints", tags=["checkpoints"])
ERRORS: dict[int | str, dict[str, object]] = {
    s: {"model": Problem} for s in (403, 404, 409, 422, 503, 507)
}

CoreDep = Annotated[Service, Depends(service)]
CallerDep = Annotated[Caller, Depends(caller)]
# A path cannot carry "owner/name" ({ref} holds no slash), so the owner of
# someone else's checkpoint comes as a query parameter.
OwnerQuery = Annotated[
    str | None,
    Query(
        max_length=40,
        description="The owner (uid or user name) whose checkpoint {ref} names; "
        "without it a name is the caller's own",
    ),
]


def to_model(rec: CheckpointRecord, fds: bool = True) -> Checkpoint:
    """Shape a checkpoint record for the API (a list's records carry no manifest).

    fds=False: the fds in short (fd_summary) and no entry per fd, read from
    the stored manifest without checking all of it (criud.dump.manifest.summarize).
    """
    summary: dict[str, Any] | None = None
    entries: list[FdEntry] = []
    if rec.manifest is None:
        manifest = Manifest(external=tuple(rec.external_keys or ()))
    elif fds:
        manifest = Manifest.from_json(rec.manifest)
        summary = manifest.fd_summary()
        entries = [FdEntry(**f) for f in manifest.flat_fds()]
    else:
        summary = summarize(rec.manifest)
        # Of the rest, only the two fields the answer shows are read (and checked).
        manifest = Manifest.from_json({k: rec.manifest.get(k) for k in ("external", "namespaces")})
    return Checkpoint(
        id=rec.id,
        name=rec.name,
        owner_uid=rec.owner_uid,
        pid=rec.pid,
        state=rec.state,
        created_at=rec.created_at,
        finished_at=rec.finished_at,
        size_bytes=rec.size_bytes,
        options=rec.options,
        labels=rec.labels,
        criu_version=rec.criu_version,
        stats=rec.stats,
        fds=entries,
        fd_summary=FdSummary.model_validate(summary) if summary is not None else None,
        external=list(manifest.external),
        namespaces=dict(manifest.namespaces),
        error=rec.error,
        origin=rec.origin or "dump",
    )


def _spec(body: CheckpointRequest) -> CheckpointSpec:
    opts = DumpOptions(
        leave_running=body.leave_running,
        shell_job=body.shell_job,
        tcp_established=body.tcp_established,
        ext_unix_sk=body.ext_unix_sk,
        file_locks=body.file_locks,
        external=tuple(body.external),
        external_namespaces=tuple((n.type, n.key) for n in body.external_namespaces),
    )
    return CheckpointSpec(
        pid=body.pid,
        name=body.name,
        options=opts,
        labels=body.labels,
        oci_bundle=body.oci.bundle if body.oci else None,
        pre_dumps=body.pre_dumps,
    )


@router.post(
    "",
    status_code=201,
    response_model=Checkpoint,
    responses={**ERRORS, 202: {"model": Operation, "description": "Started (?wait=false)"}},
)
async def create_checkpoint(
    body: CheckpointRequest, c: CoreDep, who: CallerDep, wait: WaitQuery = True
) -> Checkpoint | Response:
    """Checkpoint the process tree rooted at pid; answers when the images are complete.

    The answer gives the fds in short (`fd_summary`: counts, and the external
    fds a restore must replace); GET /v1/checkpoints/{ref} gives every fd.

    With ?wait=false: 202 at once, with the operation to follow (its Location).
    """
    if not wait:
        return accepted(c.start_checkpoint(_spec(body), who))
    # The fds in short: the whole manifest (1.8 MB of JSON at 10,000 fds)
    # is GET /v1/checkpoints/{ref}'s.
    return to_model(await c.checkpoint(_spec(body), who), fds=False)


@router.post("/preflight", response_model=PreflightReport, responses=ERRORS)
async def preflight(body: PreflightRequest, c: CoreDep, who: CallerDep) -> PreflightReport:
    """What would block this checkpoint, and the option or mapping that resolves each.

    Takes a checkpoint's body; freezes nothing and writes nothing.
    """
    report = await c.preflight(_spec(body), who, pre_dump=body.pre_dump)
    return PreflightReport.model_validate(report)


_ONE = TypeAdapter(Checkpoint)
# A list's records have no fd_summary (no manifest is read): the field is
# left out, as before it existed.
_NO_SUMMARY: Any = {"fd_summary"}
_LIST_CACHE_SIZE = 64


class _EncodedJSON(JSONResponse):
    """JSON this route encoded itself (and cached), sent as is.

    A JSONResponse, so that the OpenAPI document gives the list's schema.
    """

    def render(self, content: Any) -> bytes:
        assert isinstance(content, bytes)
        return content


@router.get(
    "",
    response_model=list[Checkpoint],
    responses=ERRORS,
    response_class=_EncodedJSON,
)
async def list_checkpoints(
    request: Request,
    c: CoreDep,
    who: CallerDep,
    label: Annotated[list[str] | None, Query(description="key=value; repeat to AND")] = None,
) -> Response:
    """List checkpoints, optionally those carrying every given label.

    A summary: `fds` and `namespaces` are left empty (GET one checkpoint for
    its manifest); `external` is filled.
    """
    body = await cached_list(request.app.state, c, who, parse_labels(label or []))
    return _EncodedJSON(content=body)


@router.delete("", response_model=BulkDeleteResult, responses={**ERRORS, 400: {"model": Problem}})
async def delete_checkpoints(
    c: CoreDep,
    who: CallerDep,
    older_than: Annotated[
        str | None,
        Query(
            max_length=64,
            description="created before: a duration back from now (7d, 12h, 1h30m, 90s) "
            "or an RFC 3339 time with its offset",
        ),
    ] = None,
    label: Annotated[list[str] | None, Query(description="key=value; repeat to AND")] = None,
    owner: Annotated[
        str | None,
        Query(max_length=40, description="root only: one owner's (uid or user name)"),
    ] = None,
) -> BulkDeleteResult:
    """Delete the caller's checkpoints matching every filter (root: anyone's, or owner's).

    At least one of older_than and label is required (400 otherwise).  A
    checkpoint in use (being dumped or restored) is skipped, with why.
    """
    out = await c.delete_checkpoints(who, older_than, label or [], owner)
    return BulkDeleteResult.model_validate(out)


def _list_key(c: Service, who: Caller, wanted: dict[str, str]) -> tuple[Any, ...]:
    """The cache key of a list: write generation, view (root's or one uid's), filter."""
    return (c.list_generation, None if who.is_root else who.uid, tuple(sorted(wanted.items())))


def cached_list_now(state: Any, c: Service, who: Caller) -> bytes | None:
    """The unfiltered list the caller sees if it is cached now, else None (nothing built).

    For criud.daemon.server's answer straight from the protocol, which cannot
    wait; a miss goes on to the route's way (cached_list, single-flight).
    """
    cache: dict[Any, bytes] = state.list_cache
    return cache.get(_list_key(c, who, {}))


async def cached_list(state: Any, c: Service, who: Caller, wanted: dict[str, str]) -> bytes:
    """The encoded list the caller sees, from the cache of its view or built once.

    The list changes only when a checkpoint does: its encoded form is cached
    per (write generation, view, filter), the view being root's or one
    uid's, so many clients polling a long list cost one encoding, not one
    each.  Both the route and criud.api.fastlist (which answers ahead of
    FastAPI) come here, so both give the same bytes.
    """
    key = _list_key(c, who, wanted)
    cache: dict[Any, bytes] = state.list_cache
    body = cache.get(key)
    if body is None:
        body = await _single_flight(state, key, lambda: _build_list(c, who, wanted))
        # Bounded: a new generation drops every older entry, and no more
        # than _LIST_CACHE_SIZE views (each up to the whole list) are held.
        if len(cache) >= _LIST_CACHE_SIZE or any(k[0] != key[0] for k in cache):
            cache.clear()
        cache[key] = body
    return body


async def _build_list(c: Service, who: Caller, wanted: dict[str, str]) -> bytes:
    """The encoded list: the models and the JSON both built off the loop."""
    recs = await c.list_checkpoints(who, wanted)

    def encode() -> bytes:
        # One model at a time, each encoded and dropped: with every model
        # alive at once (megabytes of small objects for a long list) the
        # daemon kept their pages as RSS for good.  The same bytes as the
        # list's adapter gives (tests/unit/api/test_fastlist.py).
        body = (
            b"[" + b",".join(_ONE.dump_json(to_model(r), exclude=_NO_SUMMARY) for r in recs) + b"]"
        )
        # What the records and models freed in this thread's heap goes
        # back to the system (criud.daemon.memory).
        memory.release()
        return body

    return await asyncio.to_thread(encode)


async def _single_flight(
    state: Any, key: Any, build: Callable[[], Coroutine[Any, Any, bytes]]
) -> bytes:
    """Build the body for key once, however many requests miss the cache together.

    The first miss starts the build as its own task; the others await that
    task (shielded, so one client going away cancels no one else's answer).
    """
    flights: dict[Any, asyncio.Task[bytes]] | None = getattr(state, "list_flights", None)
    if flights is None:
        flights = state.list_flights = {}
    task = flights.get(key)
    if task is None:
        task = asyncio.ensure_future(build())
        flights[key] = task
        task.add_done_callback(lambda _t: flights.pop(key, None))
    return await asyncio.shield(task)


@router.get("/{ref}", response_model=Checkpoint, responses=ERRORS)
async def get_checkpoint(
    ref: str,
    c: CoreDep,
    who: CallerDep,
    owner: OwnerQuery = None,
    fds: Annotated[
        bool, Query(description="every fd of every task (false: fd_summary alone)")
    ] = True,
) -> Checkpoint:
    """One checkpoint by id or name, with its fd manifest (?fds=false: in short)."""
    return to_model(await c.get_checkpoint(ref, who, owner), fds=fds)


@router.delete("/{ref}", status_code=204, responses=ERRORS)
async def delete_checkpoint(
    ref: str, c: CoreDep, who: CallerDep, owner: OwnerQuery = None
) -> Response:
    """Delete a checkpoint and its images."""
    await c.delete_checkpoint(ref, who, owner)
    return Response(status_code=204)


@router.get("/{ref}/log", response_class=PlainTextResponse, responses=ERRORS)
async def checkpoint_log(
    ref: str,
    c: CoreDep,
    who: CallerDep,
    op: Literal["dump", "restore"] = "dump",
    owner: OwnerQuery = None,
) -> PlainTextResponse:
    """criu's dump.log or (latest) restore.log of a checkpoint."""
    return PlainTextResponse(await c.checkpoint_log(ref, op, who, owner))


_MEDIA = {"zstd": "application/zstd", "gzip": "application/gzip", "none": "application/x-tar"}
log = logging.getLogger("criud.api")


class _ArchiveResponse(StreamingResponse):
    """A streamed archive whose failure after the headers cuts the connection.

    Once the 200 is out, a problem can no longer be answered: the response
    ends without its last chunk (chunked) or short of its Content-Length,
    so no client takes the part it got for a whole archive.  The failure is
    the export operation's, in /v1/operations and the events.
    """

    async def stream_response(self, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        try:
            async for chunk in self.body_iterator:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except CriudError as e:
            log.warning("export cut short: %s: %s", e.code, e.detail)
            return
        await send({"type": "http.response.body", "body": b"", "more_body": False})


@router.get(
    "/{ref}/archive",
    response_class=_ArchiveResponse,
    responses={
        **ERRORS,
        200: {
            "description": "The archive (a tar, compressed as asked); criud.sha256 is its "
            "last member. Content-Length only for compression=none.",
            "content": {m: {} for m in _MEDIA.values()},
        },
    },
)
async def export_archive(
    ref: str,
    c: CoreDep,
    who: CallerDep,
    compression: Literal["zstd", "gzip", "none"] = "zstd",
    owner: OwnerQuery = None,
) -> _ArchiveResponse:
    """Stream the checkpoint as an archive (docs/archives.md), as an "export" operation.

    Streamed as it is written; an error once streaming has begun cuts the
    connection (the archive then lacks its end and its criud.sha256).
    """
    exp = await c.export_checkpoint(ref, compression, who, owner)
    headers = {
        "content-disposition": f'attachment; filename="{exp.filename}"',
        "x-criud-operation": exp.operation,
    }
    if exp.content_length is not None:
        headers["content-length"] = str(exp.content_length)
    return _ArchiveResponse(exp.chunks, media_type=_MEDIA[exp.compression], headers=headers)


@router.post(
    "/import",
    status_code=201,
    response_model=Checkpoint,
    responses={
        **ERRORS,
        **{s: {"model": Problem} for s in (400, 413, 507)},
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "description": "The archive: a tar, zstd- or gzip-compressed or not (by magic)",
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
            },
        }
    },
)
async def import_archive(
    request: Request,
    c: CoreDep,
    who: CallerDep,
    name: Annotated[str | None, Query(max_length=128)] = None,
) -> Checkpoint:
    """Import an archive (the body: zstd, gzip or plain tar, by magic) as a new checkpoint.

    The caller owns it, whatever the archive says. Content-Digest
    (sha-256 or sha-512) or Digest is checked against the body.
    """
    rec = await c.import_archive(
        request.stream(),
        name,
        request.headers.get("content-digest"),
        request.headers.get("digest"),
        who,
    )
    return to_model(rec)
