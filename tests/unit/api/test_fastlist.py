"""criud.api.fastlist: the cached list ahead of FastAPI, the route's answer byte for byte."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from starlette.types import ASGIApp, Receive, Scope, Send

from criud.api.app import create_app
from criud.api.fastlist import FastList
from criud.daemon.caller import Caller
from criud.daemon.store import CheckpointRecord

ALICE = Caller(uid=1001, gid=1001, pid=1)
ROOT = Caller(uid=0, gid=0, pid=1)


def _rec(i: int, owner: int, labels: dict[str, str]) -> CheckpointRecord:
    return CheckpointRecord(
        id=f"ck{i:04d}",
        name=f"n{i}",
        pid=100 + i,
        state="complete",
        created_at=1.5 + i,
        options={"leave_running": True},
        labels=labels,
        owner_uid=owner,
        external_keys=["pipe:[1]"],
    )


class FakeCore:
    """The list side of the service: records of two owners, and the calls counted."""

    def __init__(self) -> None:
        self.list_generation = 1
        self.calls = 0
        self.recs = [_rec(i, 0 if i % 2 else 1001, {"k": str(i % 3)}) for i in range(10)]

    def version(self) -> dict[str, Any]:
        return {"criud": "0.0.test"}

    async def list_checkpoints(
        self, caller: Caller, labels: dict[str, str] | None = None
    ) -> list[CheckpointRecord]:
        self.calls += 1
        out = [r for r in self.recs if caller.is_root or r.owner_uid == caller.uid]
        return [r for r in out if all(r.labels.get(k) == v for k, v in (labels or {}).items())]


def _as(app: ASGIApp, peer: Caller | None, tcp: bool = False) -> ASGIApp:
    """What the daemon's protocol does: the peer in every request's state."""

    async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
        scope = {**scope, "state": {**scope.get("state", {}), "peer": peer, "tcp": tcp}}
        await app(scope, receive, send)

    return asgi


def _apps() -> tuple[FastAPI, FakeCore, list[str]]:
    core = FakeCore()
    app = create_app(core)  # type: ignore[arg-type]
    reached: list[str] = []

    @app.middleware("http")
    async def seen(request, call_next):  # type: ignore[no-untyped-def]
        reached.append(request.url.path)
        return await call_next(request)

    return app, core, reached


@pytest.mark.parametrize("peer", [ALICE, ROOT])
@pytest.mark.parametrize("query", ["", "?label=k%3D1", "?label=k=1&label=k=2", "?label=k=0"])
def test_fast_answer_is_the_routes_and_never_reaches_fastapi(peer: Caller, query: str) -> None:
    app, core, reached = _apps()
    with (
        TestClient(_as(FastList(app, app.state), peer)) as fast,
        TestClient(_as(app, peer)) as routed,
    ):
        want = routed.get("/v1/checkpoints" + query)
        assert reached == ["/v1/checkpoints"] and want.status_code == 200
        got = fast.get("/v1/checkpoints" + query)
        # Served from the cache the route filled, without the framework.
        assert reached == ["/v1/checkpoints"] and core.calls == 1
        assert got.content == want.content
        assert got.headers.items() == want.headers.items()
        ids = [c["owner_uid"] for c in got.json()]
        assert ids and (peer.is_root or set(ids) == {peer.uid})
        # A new generation is a new build; the views stay apart.
        core.list_generation += 1
        other = ALICE if peer.is_root else ROOT
        with TestClient(_as(FastList(app, app.state), other)) as them:
            theirs = them.get("/v1/checkpoints" + query).json()
        assert theirs != got.json() and core.calls == 2
        assert fast.get("/v1/checkpoints" + query).content == want.content


@pytest.mark.parametrize(
    ("peer", "tcp", "path"),
    [
        (ALICE, False, "/v1/checkpoints?owner=1"),  # a key the fast path leaves alone
        (ALICE, False, "/v1/checkpoints?label=nokey"),  # the route's 422
        (ALICE, False, "/v1/checkpoints/"),
        (ALICE, True, "/v1/checkpoints"),  # TCP: the app's token gate first (401)
        (None, False, "/v1/checkpoints"),  # no credentials: the route's 403
    ],
)
def test_everything_else_goes_to_fastapi(peer: Caller | None, tcp: bool, path: str) -> None:
    app, _, reached = _apps()
    with (
        TestClient(_as(FastList(app, app.state), peer, tcp)) as fast,
        TestClient(_as(app, peer, tcp)) as routed,
    ):
        want = routed.get(path, follow_redirects=False)
        got = fast.get(path, follow_redirects=False)
    assert len(reached) == 2 and reached[0] == reached[1]
    assert (got.status_code, got.content) == (want.status_code, want.content)
    assert got.status_code in (200, 307, 401, 403, 422)


def test_a_failing_build_is_left_to_the_route() -> None:
    app, core, reached = _apps()

    async def broken(caller: Caller, labels: dict[str, str] | None = None) -> Any:
        from criud.daemon.errors import StoreUnusable

        raise StoreUnusable("the store is gone")

    core.list_checkpoints = broken  # type: ignore[method-assign]
    with TestClient(_as(FastList(app, app.state), ALICE), raise_server_exceptions=False) as fast:
        r = fast.get("/v1/checkpoints")
    assert r.status_code == 503 and r.json()["code"] and reached == ["/v1/checkpoints"]


@pytest.mark.parametrize("n", [0, 1, 7])
def test_the_list_is_encoded_as_the_list_adapter_encodes_it(n: int) -> None:
    import asyncio

    from pydantic import TypeAdapter

    from criud.api.checkpoints import _build_list, to_model
    from criud.api.models import Checkpoint

    core = FakeCore()
    core.recs = core.recs[:n]
    # Encoded one model at a time, joined: the bytes of the whole list at once
    # (a list leaves each record's fd_summary out: it reads no manifest).
    got = asyncio.run(_build_list(core, ROOT, {}))  # type: ignore[arg-type]
    want = TypeAdapter(list[Checkpoint]).dump_json(
        [to_model(r) for r in core.recs], exclude={"__all__": {"fd_summary"}}
    )
    assert got == want
