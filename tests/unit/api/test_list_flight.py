"""GET /v1/checkpoints: concurrent cache misses share one rebuild."""

from __future__ import annotations

import asyncio
import types

import pytest

from criud.api.checkpoints import _single_flight


def test_concurrent_misses_build_once() -> None:
    builds = 0

    async def build() -> bytes:
        nonlocal builds
        builds += 1
        await asyncio.sleep(0.05)
        return b"[]"

    async def main() -> list[bytes]:
        state = types.SimpleNamespace()
        out = await asyncio.gather(*(_single_flight(state, "k", build) for _ in range(50)))
        # Done flights are forgotten: the next miss (a new generation) builds again.
        assert state.list_flights == {}
        await _single_flight(state, "k", build)
        return out

    out = asyncio.run(main())
    assert out == [b"[]"] * 50
    assert builds == 2


def test_a_cancelled_waiter_cancels_no_one_else() -> None:
    async def build() -> bytes:
        await asyncio.sleep(0.05)
        return b"x"

    async def main() -> bytes:
        state = types.SimpleNamespace()
        first = asyncio.ensure_future(_single_flight(state, "k", build))
        second = asyncio.ensure_future(_single_flight(state, "k", build))
        await asyncio.sleep(0.01)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        return await second

    assert asyncio.run(main()) == b"x"
