"""Every error leaves as RFC 9457 application/problem+json, from one place.

CriudError subclasses carry status and code; one handler registered for the
base class covers them all (Starlette looks handlers up along the MRO).
Validation errors and unknown routes get the same shape, so a client needs a
single error path.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from criud.api.models import Problem
from criud.daemon.errors import CriudError, out_of_fds

log = logging.getLogger("criud.api")

PROBLEM = "application/problem+json"


def problem(status: int, code: str, title: str, detail: str, **extra: Any) -> JSONResponse:
    """Build a problem+json response."""
    body = {
        "type": "about:blank",
        "title": title,
        "status": status,
        "detail": detail,
        "code": code,
        **extra,
    }
    return JSONResponse(body, status_code=status, media_type=PROBLEM)


async def _criud_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, CriudError)
    return problem(
        exc.status, exc.code, exc.title, exc.detail, instance=request.url.path, **exc.extra
    )


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": e.get("type")}
        for e in exc.errors()
    ]
    first = errors[0] if errors else {"loc": [], "msg": "invalid"}
    where = ".".join(str(p) for p in first["loc"])
    return problem(
        422,
        "invalid_request",
        "Invalid request",
        f"{where}: {first['msg']}",
        instance=request.url.path,
        errors=errors,
    )


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    codes = {
        400: "invalid_request",
        404: "not_found",
        405: "method_not_allowed",
        413: "body_too_large",
    }
    return problem(
        exc.status_code,
        codes.get(exc.status_code, "http_error"),
        str(exc.detail),
        str(exc.detail),
        instance=request.url.path,
    )


async def _os_error(request: Request, exc: Exception) -> JSONResponse:
    # EMFILE/ENFILE wherever they rose: a clear 503 out_of_fds, never a 500
    # (nor, caught on the way as "no such file", a 404).
    mapped = out_of_fds(exc)
    if mapped is not None:
        log.warning("%s %s: %s", request.method, request.url.path, exc)
        return await _criud_error(request, mapped)
    return await _unexpected(request, exc)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return problem(
        500,
        "internal_error",
        "Internal error",
        f"{type(exc).__name__}: {exc}",
        instance=request.url.path,
    )


def install(app: FastAPI) -> None:
    """Register the problem handlers on app, and document errors as they are sent."""
    app.add_exception_handler(CriudError, _criud_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(OSError, _os_error)
    app.add_exception_handler(Exception, _unexpected)
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = problem_schema(generate())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def problem_schema(doc: dict[str, Any]) -> dict[str, Any]:
    """Rewrite an OpenAPI document so every 4xx/5xx is problem+json, as sent.

    FastAPI documents each error response as application/json, and its own
    422 with HTTPValidationError, a body our handler never sends: a client
    generated from the document would expect the wrong type and shape.
    """
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    schemas.setdefault("Problem", Problem.model_json_schema())
    ref = {"$ref": "#/components/schemas/Problem"}
    for ops in doc.get("paths", {}).values():
        for op in ops.values():
            for status, resp in op.get("responses", {}).items():
                if str(status)[:1] in ("4", "5"):
                    resp["content"] = {PROBLEM: {"schema": ref}}
    # FastAPI's validation-error models, now referred to by nothing.
    used = json.dumps(doc["paths"])
    if '"#/components/schemas/HTTPValidationError"' not in used:
        schemas.pop("HTTPValidationError", None)
        if '"#/components/schemas/ValidationError"' not in used:
            schemas.pop("ValidationError", None)
    return doc
