"""Fixtures for every test that starts real processes."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.helpers import Procs


@pytest.fixture
def procs() -> Iterator[Procs]:
    """Processes the test starts; killed by pid (and only those) at teardown."""
    p = Procs()
    try:
        yield p
    finally:
        p.cleanup()
