"""Helpers shared by criud's unit tests (imported relatively)."""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from criud.daemon.errors import Busy
from criud.daemon.procutil import proc_state as proc_state  # shared, as the daemon reads it

CRIU = "/usr/local/sbin/criu"


def open_fds() -> set[int]:
    """The fd numbers open in this process right now (minus the listdir's own).

    Collects garbage first: objects an earlier test dropped (a daemon's
    client, a Popen's pipes) close their fds when collected, and that must
    not happen between a test's two snapshots.
    """
    gc.collect()
    fd = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return {int(n) for n in os.listdir(fd)} - {fd}
    finally:
        os.close(fd)


def wait_until(pred: Callable[[], bool], timeout: float = 10.0, step: float = 0.02) -> bool:
    """Poll pred until it is true or timeout seconds pass; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(step)


def status_field(name: str, path: str = "/proc/self/status") -> list[str]:
    """The whitespace-split values of one line of a /proc status file."""
    with open(path, encoding="ascii") as f:
        for line in f:
            if line.startswith(name + ":"):
                return line.split()[1:]
    raise KeyError(name)


def need_root_and_criu() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    if not (os.path.exists(CRIU) or shutil.which("criu")):
        pytest.skip("criu is not installed")


class FakeCriuBase:
    """What the jobs read off criud.daemon.criu.Criu besides run(); tests add run()."""

    version = "4.2.1"
    features: dict[str, bool] = {}
    unprivileged_for_users = False
    timeout_s = 30.0
    gone_grace_s = 1.0
    # No warm pool: root's dumps walk their tree first (criud.dump.frozen).
    pool: object | None = None


@contextlib.contextmanager
def marked(busy: set[Any], key: Any, message: str) -> Iterator[None]:
    """A lock as the service keeps one: Busy if key is marked, else marked for the block."""
    if key in busy:
        raise Busy(message)
    busy.add(key)
    try:
        yield
    finally:
        busy.discard(key)
