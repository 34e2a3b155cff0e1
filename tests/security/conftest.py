"""Fixtures for the security tests: real users, and a daemon serving their group."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from tests.integration.helpers import CRIU, Daemon, temp_root
from tests.security.users import Accounts, accounts


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if os.geteuid() != 0 or not shutil.which(CRIU) or not shutil.which("useradd"):
        skip = pytest.mark.skip(reason="security tests need root, criu and useradd")
        for item in items:
            if "security" in str(item.fspath):
                item.add_marker(skip)


@pytest.fixture(scope="session")
def users() -> Iterator[Accounts]:
    with accounts() as a:
        yield a


@pytest.fixture(scope="session")
def sdaemon(users: Accounts) -> Iterator[Daemon]:
    """A daemon whose sockets are 0660 root:<socket group>, shared by the security tests."""
    with temp_root() as root:
        d = Daemon(root, args=["--socket-group", users.sock_group]).start()
        try:
            yield d
        finally:
            rc = d.stop()
            assert rc == 0, f"daemon exited {rc} on SIGTERM: {d.log()}"
