"""criud.api.problems: every error leaves as application/problem+json."""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import BaseModel, Field

from criud.api import problems
from criud.daemon import errors
from criud.daemon.errors import CriudError
from criud.daemon.fdpass import FdPassError
from criud.daemon.imgdir import UnsafeEntry
from criud.daemon.store import StoreError
from criud.dump.images import ImageError
from criud.dump.oci import OciError

PROBLEM = "application/problem+json"

ALL_ERRORS = sorted(
    (
        c
        for _, c in inspect.getmembers(errors, inspect.isclass)
        if issubclass(c, CriudError) and c.__module__ == errors.__name__
    ),
    key=lambda c: c.__name__,
)


class Body(BaseModel):
    pid: int = Field(ge=1)
    name: str | None = None


def make_app() -> FastAPI:
    app = FastAPI()
    problems.install(app)

    @app.get("/raise/{cls_name}")
    async def raise_named(cls_name: str) -> None:
        cls = getattr(errors, cls_name)
        raise cls(f"detail of {cls_name}")

    @app.get("/extras")
    async def extras() -> None:
        raise errors.MissingInheritFd("need fds", keys=["pipe:[1]", "socket:[2]"], count=2)

    @app.get("/sync-raise")
    def sync_raise() -> None:
        raise errors.ProcessNotFound("no process with pid 7", pid=7)

    @app.post("/body")
    async def body(b: Body) -> dict[str, int]:
        return {"pid": b.pid}

    @app.get("/query")
    async def query(n: int) -> dict[str, int]:
        return {"n": n}

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("kaboom")

    @app.get("/oserror/{name}")
    def oserror(name: str) -> None:
        import errno
        import os

        n = getattr(errno, name)
        raise OSError(n, os.strerror(n))

    @app.get("/ok")
    async def ok() -> dict[str, str]:
        return {"ok": "yes"}

    return app


@pytest.fixture(scope="module")
def client():
    with TestClient(make_app(), raise_server_exceptions=False) as c:
        yield c


def _problem(resp, status: int) -> dict:
    assert resp.status_code == status
    assert resp.headers["content-type"] == PROBLEM
    body = resp.json()
    assert body["status"] == status
    assert body["type"] == "about:blank"
    return body


def test_every_error_class_is_covered() -> None:
    # Guard against a new error class slipping past the parametrized test.
    assert len(ALL_ERRORS) >= 20
    assert CriudError in ALL_ERRORS


@pytest.mark.parametrize("cls", ALL_ERRORS, ids=lambda c: c.__name__)
def test_criud_errors(client: TestClient, cls: type[CriudError]) -> None:
    resp = client.get(f"/raise/{cls.__name__}")
    body = _problem(resp, cls.status)
    assert body == {
        "type": "about:blank",
        "title": cls.title,
        "status": cls.status,
        "detail": f"detail of {cls.__name__}",
        "code": cls.code,
        "instance": f"/raise/{cls.__name__}",
    }


def test_codes_are_unique() -> None:
    # A subclass that does not set its own code shares its parent's on
    # purpose (QuotaBytesExceeded: quota_exceeded, as 507 instead of 409).
    codes = [c.code for c in ALL_ERRORS if "code" in vars(c)]
    assert len(codes) == len(set(codes))
    assert errors.QuotaBytesExceeded.code == errors.QuotaExceeded.code == "quota_exceeded"


@pytest.mark.parametrize(
    ("cls", "status", "code"),
    [
        (errors.InvalidName, 422, "invalid_name"),
        (errors.PermissionDenied, 403, "permission_denied"),
        (errors.CheckpointNotFound, 404, "checkpoint_not_found"),
        (errors.NameTaken, 409, "name_taken"),
        (errors.QuotaExceeded, 409, "quota_exceeded"),
        (errors.QuotaBytesExceeded, 507, "quota_exceeded"),
        (errors.FilterRequired, 400, "filter_required"),
        (errors.PidInUse, 409, "pid_in_use"),
        (errors.CriuUnavailable, 503, "criu_unavailable"),
        (errors.CriuFailed, 422, "criu_failed"),
        (errors.ShuttingDown, 503, "shutting_down"),
        (errors.CriudError, 500, "internal_error"),
    ],
)
def test_selected_statuses(
    client: TestClient, cls: type[CriudError], status: int, code: str
) -> None:
    body = _problem(client.get(f"/raise/{cls.__name__}"), status)
    assert body["code"] == code


def test_extension_members(client: TestClient) -> None:
    body = _problem(client.get("/extras"), 422)
    assert body["code"] == "missing_inherit_fd"
    assert body["title"] == "External resource without a replacement"
    assert body["detail"] == "need fds"
    assert body["keys"] == ["pipe:[1]", "socket:[2]"]
    assert body["count"] == 2
    assert body["instance"] == "/extras"


def test_sync_route(client: TestClient) -> None:
    body = _problem(client.get("/sync-raise"), 404)
    assert body["code"] == "process_not_found"
    assert body["pid"] == 7


def test_body_validation_error(client: TestClient) -> None:
    body = _problem(client.post("/body", json={"pid": 0}), 422)
    assert body["code"] == "invalid_request"
    assert body["title"] == "Invalid request"
    assert body["detail"].startswith("body.pid: ")
    assert body["errors"][0]["loc"] == ["body", "pid"]
    assert body["errors"][0]["type"] == "greater_than_equal"
    assert body["instance"] == "/body"


def test_missing_and_malformed_body(client: TestClient) -> None:
    body = _problem(client.post("/body"), 422)
    assert body["code"] == "invalid_request"
    assert body["errors"][0]["type"] == "missing"
    body = _problem(
        client.post("/body", content=b"{not json", headers={"content-type": "application/json"}),
        422,
    )
    assert body["code"] == "invalid_request"
    assert body["errors"][0]["type"] == "json_invalid"


def test_several_validation_errors_listed(client: TestClient) -> None:
    body = _problem(client.post("/body", json={"pid": "x", "name": 5}), 422)
    locs = [e["loc"] for e in body["errors"]]
    assert ["body", "pid"] in locs and ["body", "name"] in locs


def test_query_validation_error(client: TestClient) -> None:
    body = _problem(client.get("/query", params={"n": "abc"}), 422)
    assert body["detail"].startswith("query.n: ")


def test_unknown_route(client: TestClient) -> None:
    body = _problem(client.get("/no/such/route"), 404)
    assert body["code"] == "not_found"
    assert body["title"] == "Not Found"
    assert body["detail"] == "Not Found"
    assert body["instance"] == "/no/such/route"


def test_wrong_method(client: TestClient) -> None:
    body = _problem(client.delete("/ok"), 405)
    assert body["code"] == "method_not_allowed"


def test_unexpected_exception(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="criud.api"):
        resp = client.get("/boom")
    body = _problem(resp, 500)
    assert body["code"] == "internal_error"
    assert body["title"] == "Internal error"
    assert body["detail"] == "RuntimeError: kaboom"
    assert body["instance"] == "/boom"
    assert any("unhandled error on GET /boom" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("name", ["EMFILE", "ENFILE"])
def test_fd_exhaustion_is_503_out_of_fds(client: TestClient, name: str) -> None:
    # Wherever it rises, a full fd table is a clear "retry later", not a bug.
    body = _problem(client.get(f"/oserror/{name}"), 503)
    assert body["code"] == "out_of_fds"
    assert body["errno"] == name
    assert "retry" in body["detail"]


def test_other_oserror_stays_internal(client: TestClient) -> None:
    body = _problem(client.get("/oserror/EIO"), 500)
    assert body["code"] == "internal_error"


def test_success_untouched(client: TestClient) -> None:
    resp = client.get("/ok")
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "application/json"
    assert resp.json() == {"ok": "yes"}


def test_problem_helper() -> None:
    resp = problems.problem(409, "busy", "Busy", "try later", retry=True)
    assert resp.status_code == 409
    assert resp.media_type == PROBLEM
    assert resp.body == (
        b'{"type":"about:blank","title":"Busy","status":409,"detail":"try later",'
        b'"code":"busy","retry":true}'
    )


def test_error_keeps_detail_and_extra() -> None:
    e = errors.BadFdHandle("bad", handle="h", reason="expired")
    assert str(e) == "bad"
    assert e.detail == "bad"
    assert e.extra == {"handle": "h", "reason": "expired"}
    assert isinstance(e, Exception)


def test_openapi_documents_errors_as_problem_json() -> None:
    # Clients generated from /openapi.json must expect what is sent.
    from criud.api.app import create_app

    from .test_restores import FakeCore

    doc = create_app(FakeCore()).openapi()  # type: ignore[arg-type]
    errors = [
        (path, method, status, resp)
        for path, ops in doc["paths"].items()
        for method, op in ops.items()
        for status, resp in op["responses"].items()
        if status[0] in "45"
    ]
    assert len(errors) > 20
    for path, method, status, resp in errors:
        assert resp["content"] == {PROBLEM: {"schema": {"$ref": "#/components/schemas/Problem"}}}, (
            path,
            method,
            status,
        )
    schemas = doc["components"]["schemas"]
    assert set(schemas["Problem"]["required"]) >= {"title", "status", "detail", "code"}
    assert "HTTPValidationError" not in schemas and "ValidationError" not in schemas
    # Success responses keep their own type.
    ok = doc["paths"]["/v1/checkpoints"]["get"]["responses"]["200"]["content"]
    assert "application/json" in ok


def test_openapi_of_an_app_without_a_problem_model() -> None:
    doc = make_app().openapi()
    assert "Problem" in doc["components"]["schemas"]
    resp = doc["paths"]["/body"]["post"]["responses"]["422"]
    assert list(resp["content"]) == [PROBLEM]


def _exception_classes() -> list[type[BaseException]]:
    """Every exception class defined in the daemon's packages (the client's excepted)."""
    out: list[type[BaseException]] = []
    root = Path(__file__).resolve().parents[3]
    for pkg in ("daemon", "api", "dump", "restore"):
        for path in sorted((root / pkg).glob("*.py")):
            name = f"criud.{pkg}.{path.stem}"
            if name == "criud.api.client":
                continue  # the client's own error wraps problems it received
            out.extend(_classes_of(importlib.import_module(name)))
    assert len(out) > 50  # the walk found the modules
    return out


def _classes_of(mod: ModuleType) -> list[type[BaseException]]:
    return [
        c
        for _, c in inspect.getmembers(mod, inspect.isclass)
        if issubclass(c, BaseException) and c.__module__ == mod.__name__
    ]


def test_every_error_class_is_under_one_root() -> None:
    """FdPassError, NameTaken, OciError, UnsafeEntry, ... all are CriudErrors (issue 12)."""
    stray = [c.__qualname__ for c in _exception_classes() if not issubclass(c, CriudError)]
    assert stray == []


FORMER_STRAYS: list[tuple[Callable[[], CriudError], int, str]] = [
    (lambda: FdPassError("no_fds", "x"), 400, "no_fds"),
    (lambda: OciError("bad bundle"), 422, "invalid_bundle"),
    (lambda: UnsafeEntry("a link"), 409, "checkpoint_tampered"),
    (lambda: ImageError("truncated"), 409, "checkpoint_not_ready"),
    (lambda: StoreError("not a database"), 503, "store_unusable"),
]


@pytest.mark.parametrize(("make", "status", "code"), FORMER_STRAYS)
def test_former_strays_render_as_problems(
    make: Callable[[], CriudError], status: int, code: str
) -> None:
    """Raised from a route, each is a problem with its own status, never a 500."""
    app = FastAPI()
    problems.install(app)

    @app.get("/x")
    async def x() -> None:
        raise make()

    r = TestClient(app).get("/x")
    assert (r.status_code, r.json()["code"]) == (status, code)
    assert r.headers["content-type"] == PROBLEM
