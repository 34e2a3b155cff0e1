"""Helpers shared by criud's unit tests (imported relatively)."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable

import pytest

CRIU = "/usr/local/sbin/criu"


def open_fds() -> set[int]:
    """The fd numbers open in this process right now (minus the listdir's own)."""
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


def proc_state(pid: int) -> str | None:
    """The one-letter state of pid, or None if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    return data[data.rindex(")") + 2 :].split()[0]


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
