"""criud.dump.manifest: building the dump-time manifest and querying it."""

from __future__ import annotations

import pytest

from criud.daemon.errors import InvalidRequest
from criud.dump import manifest as mf
from criud.dump.fds import FdInfo, TaskInfo


def _tasks() -> list[TaskInfo]:
    return [
        TaskInfo(
            pid=10,
            ppid=1,
            tids=[10, 11],
            fds=[
                FdInfo(0, "device", "dev/null", "r", "/dev/null", inode=5).as_dict(),
                FdInfo(1, "pipe", "pipe:[7]", "w", "pipe:[7]", inode=7, external=True).as_dict(),
                FdInfo(3, "unix", "socket:[30]", "rw", "socket:[30]", inode=30, peer=31).as_dict(),
            ],
        ),
        TaskInfo(
            pid=12,
            ppid=10,
            tids=[12],
            fds=[
                FdInfo(1, "pipe", "pipe:[7]", "w", "pipe:[7]", inode=7, external=True).as_dict(),
                FdInfo(4, "file", "tmp/a", "w", "/tmp/a", inode=40).as_dict(),
                FdInfo(5, "unix", "socket:[30]", "rw", "socket:[30]", inode=30, peer=31).as_dict(),
            ],
        ),
    ]


def test_build_marks_declared_external_and_dedups() -> None:
    tasks = _tasks()
    m = mf.build(tasks, ["tmp/a", "socket:[30]", "tmp/a"])
    # Order: first appearance walking the tasks; each key once.
    assert m["external"] == ["pipe:[7]", "socket:[30]", "tmp/a"]
    assert [t["pid"] for t in m["tasks"]] == [10, 12]
    assert m["tasks"][0]["tids"] == [10, 11]
    by_key = {(t["pid"], f["fd"]): f for t in m["tasks"] for f in t["fds"]}
    assert by_key[(12, 4)]["external"] is True
    assert by_key[(10, 3)]["external"] is True
    assert by_key[(10, 0)]["external"] is False
    assert by_key[(10, 3)]["peer"] == 31


def test_build_unknown_declared_key() -> None:
    with pytest.raises(InvalidRequest) as ei:
        mf.build(_tasks(), ["pipe:[7]", "nope", "tmp/zzz", "nope"])
    assert ei.value.extra["keys"] == ["nope", "tmp/zzz"]
    assert "nope" in ei.value.detail


def test_queries() -> None:
    m = mf.build(_tasks(), ["socket:[30]"])
    assert mf.all_keys(m) == {"dev/null", "pipe:[7]", "socket:[30]", "tmp/a"}
    assert mf.key_of(m, 12, 4) == "tmp/a"
    assert mf.key_of(m, 12, 99) is None
    assert mf.key_of(m, 99, 0) is None
    assert mf.external_unix_inodes(m, ["socket:[30]", "pipe:[7]"]) == [30]
    assert mf.external_unix_inodes(m, ["pipe:[7]"]) == []
    flat = mf.flat_fds(m)
    assert len(flat) == 6
    assert flat[0]["pid"] == 10 and flat[-1]["pid"] == 12
    assert flat[-1]["fd"] == 5
