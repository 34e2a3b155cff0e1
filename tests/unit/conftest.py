"""Fixtures shared by criud's unit tests."""

from __future__ import annotations

import pytest

from ._helpers import open_fds


@pytest.fixture
def fd_leak_check():
    """Fail the test if it leaves more fds open than it found."""
    before = open_fds()
    yield before
    assert open_fds() - before == set()
