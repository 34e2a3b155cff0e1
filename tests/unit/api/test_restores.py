"""criud.api: parse_signal, and the real app's edges with a stand-in core."""

from __future__ import annotations

import signal
from typing import Any

import pytest
from fastapi.testclient import TestClient

from criud.api.app import create_app
from criud.api.restores import parse_signal
from criud.daemon.caller import Caller
from criud.daemon.errors import InvalidRequest, RestoreNotFound

PROBLEM = "application/problem+json"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (15, 15),
        (9, 9),
        ("15", 15),
        (" 9 ", 9),
        ("TERM", signal.SIGTERM),
        ("term", signal.SIGTERM),
        ("SIGTERM", signal.SIGTERM),
        ("sigkill", signal.SIGKILL),
        (" Hup ", signal.SIGHUP),
        ("USR1", signal.SIGUSR1),
        ("SIGRTMIN", signal.SIGRTMIN),
    ],
)
def test_parse_signal(value: int | str, expected: int) -> None:
    got = parse_signal(value)
    assert got == int(expected)
    assert type(got) is int


@pytest.mark.parametrize("value", ["", "NOPE", "SIG", "SIGSIGTERM", "-9", "9.0", "KILL TERM"])
def test_parse_signal_unknown(value: str) -> None:
    with pytest.raises(InvalidRequest) as ei:
        parse_signal(value)
    assert repr(value) in ei.value.detail
    assert ei.value.status == 422


@pytest.mark.parametrize("value", ["²", "1²"])
def test_parse_signal_unicode_digits(value: str) -> None:
    with pytest.raises(InvalidRequest):
        parse_signal(value)


@pytest.mark.parametrize("value", ["9" * 5000, "0" * 17, "SIG" + "X" * 5000])
def test_parse_signal_too_long(value: str) -> None:
    # int() of 5,000 digits raises ValueError (Python's digit limit): a 500.
    with pytest.raises(InvalidRequest) as ei:
        parse_signal(value)
    assert ei.value.status == 422 and len(ei.value.detail) < 100


# -- the real app with a stand-in core ------------------------------------------


class FakeCore:
    """Just enough of Core for the app's edges."""

    accepting = True

    def __init__(self) -> None:
        self.signals: list[tuple[str, int]] = []

    def version(self) -> dict[str, Any]:
        return {"criud": "0.0.test"}

    async def signal_restore(self, restore_id: str, signo: int, who: Caller) -> Any:
        self.signals.append((restore_id, signo))
        raise RestoreNotFound(f"no restore {restore_id!r}")


def _app(peer: Caller | None):
    core = FakeCore()
    app = create_app(core)  # type: ignore[arg-type]

    @app.middleware("http")
    async def inject_peer(request, call_next):  # type: ignore[no-untyped-def]
        if peer is not None:
            request.state.peer = peer
        return await call_next(request)

    return app, core


def test_real_app_health_and_404() -> None:
    app, _ = _app(None)
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.get("/healthz")
        assert r.status_code == 200 and r.json() == {"status": "ok"}
        r = c.get("/v1/nope")
        assert r.status_code == 404
        assert r.headers["content-type"] == PROBLEM
        assert r.json()["code"] == "not_found"
    assert app.version == "0.0.test"


def test_real_app_without_peer_is_forbidden() -> None:
    app, _ = _app(None)
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.get("/v1/restores")
    assert r.status_code == 403
    assert r.headers["content-type"] == PROBLEM
    assert r.json()["code"] == "permission_denied"


def test_real_app_signal_by_name() -> None:
    app, core = _app(Caller(uid=1000, gid=1000, pid=1))
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.post("/v1/restores/abc/signal", json={"signal": "TERM"})
        assert r.status_code == 404
        assert r.json()["code"] == "restore_not_found"
        r = c.post("/v1/restores/abc/signal", json={"signal": "BOGUS"})
        assert r.status_code == 422
        assert r.headers["content-type"] == PROBLEM
        assert r.json()["code"] == "invalid_request"
        r = c.post("/v1/restores/abc/signal", json={"signal": 9, "extra": 1})
        assert r.status_code == 422
        assert r.json()["code"] == "invalid_request"
    assert core.signals == [("abc", int(signal.SIGTERM))]


def test_real_app_signal_unicode_digit_is_422() -> None:
    app, _ = _app(Caller(uid=1000, gid=1000, pid=1))
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.post("/v1/restores/abc/signal", json={"signal": "²"})
    assert r.status_code == 422
    assert r.json()["code"] == "invalid_request"


def test_fake_core_matches_core() -> None:
    # The stand-in must not drift from what the routes call on Core.
    import inspect

    from criud.daemon.core import Core

    for name in ("version", "signal_restore"):
        real, fake = getattr(Core, name), getattr(FakeCore, name)
        assert len(inspect.signature(real).parameters) == len(inspect.signature(fake).parameters)
        assert inspect.iscoroutinefunction(real) == inspect.iscoroutinefunction(fake)
