"""criud.dump.manifest: building the dump-time manifest and querying it."""

from __future__ import annotations

import dataclasses
import json

import pytest

from criud.daemon.errors import InvalidRequest, ManifestInvalid
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
    assert m.external == ("pipe:[7]", "socket:[30]", "tmp/a")
    assert [t.pid for t in m.tasks] == [10, 12]
    assert m.tasks[0].tids == (10, 11)
    by_key = {(t.pid, f["fd"]): f for t in m.tasks for f in t.fds}
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
    assert m.all_keys() == {"dev/null", "pipe:[7]", "socket:[30]", "tmp/a"}
    assert m.key_of(12, 4) == "tmp/a"
    assert m.key_of(12, 99) is None
    assert m.key_of(99, 0) is None
    assert m.external_unix_inodes(["socket:[30]", "pipe:[7]"]) == [30]
    assert m.external_unix_inodes(["pipe:[7]"]) == []
    flat = m.flat_fds()
    assert len(flat) == 6
    assert flat[0]["pid"] == 10 and flat[-1]["pid"] == 12
    assert flat[-1]["fd"] == 5


def test_manifest_is_frozen_and_round_trips() -> None:
    m = dataclasses.replace(
        mf.build(_tasks(), ["socket:[30]"]),
        pids=(10, 11, 12),
        namespaces={"net": 4026},
        pidns_init=True,
        network_lock="nftables",
        ext_namespaces=(mf.ExtNamespace("net", "extRootNetNS", 4026),),
        run_as=(1000, 1000, [1000]),
        oci={"bundle": "/b"},
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.pidns_init = False  # type: ignore[misc]
    stored = json.loads(json.dumps(m.to_json()))
    back = mf.Manifest.from_json(stored)
    # fd records hold what JSON makes of them (lists for tuples); the rest is equal.
    assert back.to_json() == stored
    assert dataclasses.replace(back, tasks=m.tasks) == m
    assert m.namespace_type("extRootNetNS") == "net" and m.namespace_type("pipe:[7]") is None
    assert "extRootNetNS" in m.all_keys()


@pytest.mark.parametrize(
    "row",
    [
        # What releases before the typed manifest stored (tests/data/store-v0.sql).
        '{"external": ["pipe:[1]"], "tasks": []}',
        '{"external": [], "tasks": []}',
        # A row of the release that added creds but no run_as groups.
        '{"tasks": [{"pid": 5, "ppid": 1, "tids": [5], "fds": []}], "external": [],'
        ' "uids": {"5": [1000, 1000, 1000, 1000]}, "run_as": [1000, 1000]}',
    ],
)
def test_from_json_reads_earlier_rows(row: str) -> None:
    m = mf.Manifest.from_json(json.loads(row))
    assert m.oci is None and m.ext_namespaces == () and not m.pidns_init
    assert mf.Manifest.from_json(m.to_json()) == m
    assert mf.Manifest.from_json(None) == mf.Manifest()


@pytest.mark.parametrize(
    "garbage",
    [
        [1],
        "x",
        {"tasks": "x"},
        {"tasks": [{"ppid": 1}]},
        {"tasks": [{"pid": "1"}]},
        {"tasks": [{"pid": True}]},
        {"tasks": [{"pid": 1, "fds": [{"fd": 0}]}]},
        {"tasks": [{"pid": 1, "fds": [{"fd": 0, "type": "pipe", "key": 3}]}]},
        {"tasks": [{"pid": 1, "fds": [{"fd": 0, "type": "pipe", "key": "k", "inode": "x"}]}]},
        {"uids": {"1": [0, "a"]}},
        {"uids": [1]},
        {"run_as": [0]},
        {"run_as": ["0", 0]},
        {"run_as": [1000, 1000, "wheel"]},
        {"namespaces": {"net": "x"}},
        {"ext_namespaces": [{"type": "net"}]},
        {"external": [1]},
        {"oci": [1]},
        {"network_lock": 5},
    ],
)
def test_from_json_refuses_garbage_with_a_4xx(garbage: object) -> None:
    with pytest.raises(ManifestInvalid) as e:
        mf.Manifest.from_json(garbage)  # type: ignore[arg-type]
    assert 400 <= e.value.status < 500
