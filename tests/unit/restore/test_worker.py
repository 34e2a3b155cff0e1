"""criud.restore.worker: the FdMap owns the worker's fds and is the one writer of --inherit-fd."""

from __future__ import annotations

import ast
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from criud.daemon.fdpass import recv_message, send_fds
from criud.restore.worker import FdMap

from .._helpers import open_fds

ROOT = Path(__file__).resolve().parents[3]


def test_pass_fds_and_inherit_args_come_from_one_map() -> None:
    before = open_fds()
    r, w = os.pipe()
    with FdMap() as fds:
        a, b = fds.own(r), fds.own(w)
        fds.hand_over(a, "pipe:[1]")
        fds.hand_over(b)  # passed, named by nothing (an images or run dir)
        assert fds.inherited == [(a, "pipe:[1]")]
        assert fds.pass_fds == [a, b]
        assert fds.inherit_args() == ["--inherit-fd", f"fd[{a}]:pipe:[1]"]
    assert open_fds() == before


def test_an_fd_received_over_a_socketpair_reaches_the_worker_as_its_key() -> None:
    """A handle's fd arrives by SCM_RIGHTS, is duplicated into the map, and the child has it."""
    before = open_fds()
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    r, w = os.pipe()
    try:
        send_fds(left, b"{}", [w])
        _, owned = recv_message(right)
        with FdMap() as fds:
            dup = fds.dup(owned.fds[0])
            fds.hand_over(dup, "pipe:[9]")
            assert os.get_inheritable(dup) is False  # CLOEXEC in the daemon
            code = f"import os; os.write({dup}, b'through the map')"
            subprocess.run(
                [sys.executable, "-c", code], pass_fds=fds.pass_fds, check=True, timeout=30
            )
        # The map closed its duplicate; the handle's own fd is still the handle's.
        os.fstat(owned.fds[0])
        owned.close()
        os.close(w)
        assert os.read(r, 100) == b"through the map"
    finally:
        os.close(r)
        left.close()
        right.close()
    assert open_fds() == before


def test_every_fd_is_closed_on_an_error_path() -> None:
    before = open_fds()
    with pytest.raises(RuntimeError), FdMap() as fds:
        for _ in range(5):
            r, w = os.pipe()
            fds.hand_over(fds.own(r), f"pipe:[{r}]")
            fds.own(w)
        raise RuntimeError("criu failed")
    assert open_fds() == before


def test_close_is_once_and_a_closed_map_takes_nothing() -> None:
    fds = FdMap()
    r, w = os.pipe()
    fds.own(r)
    fds.close()
    fds.close()
    with pytest.raises(OSError):
        os.fstat(r)
    with pytest.raises(ValueError):
        fds.own(w)  # closed for it, not leaked
    with pytest.raises(OSError):
        os.fstat(w)


def test_only_owned_fds_are_handed_over_and_only_once() -> None:
    r, w = os.pipe()
    try:
        with FdMap() as fds:
            with pytest.raises(ValueError, match="not owned"):
                fds.hand_over(r, "k")
            fds.own(r)
            fds.hand_over(r, "k")
            with pytest.raises(ValueError, match="handed over already"):
                fds.hand_over(r)
    finally:
        os.close(w)


def _writes_fd_n(path: Path) -> bool:
    """Whether the module builds criu's fd[N]:key syntax anywhere."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.JoinedStr):
            parts = [v.value for v in node.values if isinstance(v, ast.Constant)]
            if any(isinstance(p, str) and p.startswith("fd[") for p in parts):
                return True
    return False


def test_the_map_is_the_only_writer_of_inherit_fd_arguments() -> None:
    """restore/argv.py and dump/oci.py each wrote --inherit-fd (issue 12); now only the map."""
    writers = [
        str(p.relative_to(ROOT))
        for pkg in ("daemon", "api", "dump", "restore")
        for p in sorted((ROOT / pkg).glob("*.py"))
        if _writes_fd_n(p)
    ]
    assert writers == ["restore/worker.py"]


def test_each_duplicate_remembers_the_fd_it_was_made_from() -> None:
    before = open_fds()
    r, w = os.pipe()
    try:
        with FdMap() as fds:
            a = fds.dup(w)
            b = fds.own(os.dup(r))
            fds.hand_over(a, "pipe:[1]")
            fds.hand_over(b, "pipe:[2]")
            # Only duplicates have an origin: an fd the map opened has none.
            assert fds.origins == {a: w}
        assert fds.origins == {}
    finally:
        os.close(r)
        os.close(w)
    assert open_fds() == before
