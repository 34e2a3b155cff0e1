"""Fixtures: a real criud daemon and a registry of processes to clean up."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from tests.integration.helpers import CRIU, Daemon, running_daemon


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if os.geteuid() != 0 or not shutil.which(CRIU):
        skip = pytest.mark.skip(reason="integration tests need root and criu (run `make test`)")
        for item in items:
            if "integration" in str(item.fspath):
                item.add_marker(skip)


@pytest.fixture(scope="session")
def daemon() -> Iterator[Daemon]:
    with running_daemon() as d:
        yield d
