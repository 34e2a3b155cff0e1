"""criud.restore.stdio: what the stdio shorthand expands to (no root, no criu)."""

from __future__ import annotations

import os
from typing import Any

import pytest

from criud.daemon.errors import BadFdHandle, WrongFdType
from criud.dump.manifest import Manifest
from criud.restore.mappings import InheritSpec
from criud.restore.stdio import check_terminals, expand


def fd(n: int, type_: str, key: str, external: bool) -> dict[str, Any]:
    return {"fd": n, "type": type_, "key": key, "mode": "rw", "target": key, "external": external}


def manifest(*root_fds: dict[str, Any], other: list[dict[str, Any]] | None = None) -> Manifest:
    tasks = [{"pid": 10, "ppid": 1, "tids": [10], "fds": list(root_fds)}]
    if other is not None:
        tasks.append({"pid": 11, "ppid": 10, "tids": [11], "fds": other})
    return Manifest.from_json({"tasks": tasks, "external": []})


def pairs(specs: tuple[InheritSpec, ...]) -> list[tuple[int | None, int | None]]:
    return [(s.fd, s.index) for s in specs if s.handle == "H"]


def test_each_of_0_1_2_maps_to_its_index_whatever_its_kind() -> None:
    m = manifest(
        fd(0, "pipe", "pipe:[1]", True),
        fd(1, "tty", "tty[8800:1a]", True),
        fd(2, "file", "var/log/c.log", False),
        fd(3, "pipe", "pipe:[2]", True),  # not stdio: its own mapping
    )
    out = expand((), "H", 3, m)
    assert pairs(out) == [(0, 0), (1, 1), (2, 2)]
    assert all(s.pid == 10 for s in out)


def test_shared_resource_maps_once_from_the_lowest_fd() -> None:
    tty = fd(0, "tty", "tty[8800:1a]", True)
    m = manifest(tty, {**tty, "fd": 1}, {**tty, "fd": 2})
    assert pairs(expand((), "H", 3, m)) == [(0, 0)]


def test_internal_and_closed_fds_are_left_alone() -> None:
    # fd 0 is an internal pipe (its other end in the tree), fd 1 is closed,
    # fd 2 a pty whose master is in the tree.
    m = manifest(fd(0, "pipe", "pipe:[1]", False), fd(2, "tty", "tty[8801:1a]", False))
    assert pairs(expand((), "H", 3, m)) == []


def test_explicit_mappings_win() -> None:
    m = manifest(fd(0, "pipe", "pipe:[1]", True), fd(1, "pipe", "pipe:[2]", True))
    by_key = InheritSpec(key="pipe:[1]", handle="E", index=0)
    by_fd = InheritSpec(pid=10, fd=1, handle="E", index=1)
    out = expand((by_key, by_fd), "H", 3, m)
    assert out == (by_key, by_fd)


def test_the_handle_must_hold_three_fds() -> None:
    with pytest.raises(BadFdHandle, match="exactly 3"):
        expand((), "H", 2, manifest())


def test_a_terminal_key_needs_a_terminal() -> None:
    m = manifest(fd(0, "tty", "tty[8800:1a]", True))
    r, w = os.pipe()
    master, slave = os.openpty()
    try:
        check_terminals([(slave, "tty[8800:1a]"), (w, "pipe:[5]")], m)
        with pytest.raises(WrongFdType, match="pty slave"):
            check_terminals([(w, "tty[8800:1a]")], m)
    finally:
        for x in (r, w, master, slave):
            os.close(x)
