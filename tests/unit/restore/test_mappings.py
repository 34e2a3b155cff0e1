"""criud.restore.mappings: checking inherit-fd mappings against a manifest."""

from __future__ import annotations

from typing import Any

import pytest

from criud.daemon.errors import (
    DuplicateInheritKey,
    InvalidRequest,
    MissingInheritFd,
    UnknownInheritKey,
)
from criud.dump.manifest import Manifest
from criud.restore.mappings import InheritSpec, ResolvedMapping, resolve

H = "a" * 32


def _fd(fd: int, key: str, type_: str = "pipe", external: bool = False) -> dict[str, Any]:
    return {"fd": fd, "key": key, "type": type_, "external": external, "inode": None}


STORED: dict[str, Any] = {
    "tasks": [
        {
            "pid": 100,
            "ppid": 1,
            "tids": [100],
            "fds": [
                _fd(0, "dev/null", "device"),
                _fd(1, "pipe:[11]", external=True),
                _fd(2, "pipe:[11]", external=True),
                _fd(3, "socket:[22]", "unix", external=True),
            ],
        },
        {
            "pid": 101,
            "ppid": 100,
            "tids": [101, 102],
            "fds": [_fd(0, "dev/null", "device"), _fd(5, "tmp/log.txt", "file")],
        },
    ],
    "external": ["pipe:[11]", "socket:[22]"],
}
# As the restore job reads it from the store.
MANIFEST = Manifest.from_json(STORED)


def key(k: str, index: int = 0) -> InheritSpec:
    return InheritSpec(key=k, handle=H, index=index)


def test_by_key() -> None:
    specs = [key("pipe:[11]"), key("socket:[22]", 1)]
    assert resolve(specs, MANIFEST) == [
        ResolvedMapping("pipe:[11]", specs[0]),
        ResolvedMapping("socket:[22]", specs[1]),
    ]


def test_by_pid_and_fd() -> None:
    specs = [InheritSpec(pid=100, fd=1, handle=H, index=0), key("socket:[22]", 1)]
    out = resolve(specs, MANIFEST)
    assert [r.key for r in out] == ["pipe:[11]", "socket:[22]"]
    assert out[0].spec is specs[0]
    assert specs[0].form == "fd"


def test_by_path() -> None:
    specs = [
        key("pipe:[11]"),
        key("socket:[22]"),
        InheritSpec(key="tmp/log.txt", path="/tmp/new.txt", mode="a"),
    ]
    out = resolve(specs, MANIFEST)
    assert [r.key for r in out] == ["pipe:[11]", "socket:[22]", "tmp/log.txt"]
    assert specs[2].form == "path"
    assert specs[0].form == "key"


@pytest.mark.parametrize("mode", [None, "r", "w", "a", "r+"])
def test_path_modes(mode: str | None) -> None:
    spec = InheritSpec(key="dev/null", path="/dev/null", mode=mode)
    resolved = resolve([key("pipe:[11]"), key("socket:[22]"), spec], MANIFEST)
    assert resolved[-1].key == "dev/null"


def test_no_external_no_mappings() -> None:
    m = Manifest.from_json({"tasks": STORED["tasks"], "external": []})
    assert resolve([], m) == []
    # And a manifest without an "external" list at all (an earlier release's row).
    old = Manifest.from_json({"tasks": STORED["tasks"]})
    assert resolve([key("dev/null")], old)[0].key == "dev/null"


def test_unknown_key_named() -> None:
    specs = [key("pipe:[11]"), key("socket:[22]"), key("pipe:[999]"), key("etc/shadow")]
    with pytest.raises(UnknownInheritKey) as ei:
        resolve(specs, MANIFEST)
    e = ei.value
    assert e.extra["keys"] == ["pipe:[999]", "etc/shadow"]
    assert "pipe:[999]" in e.detail and "etc/shadow" in e.detail
    assert e.code == "unknown_inherit_key"
    assert e.status == 422


def test_unknown_pid_fd_named() -> None:
    specs = [
        InheritSpec(pid=100, fd=9, handle=H, index=0),
        InheritSpec(pid=555, fd=1, handle=H, index=0),
    ]
    with pytest.raises(UnknownInheritKey) as ei:
        resolve(specs, MANIFEST)
    assert ei.value.extra["keys"] == ["fd 9 of pid 100", "fd 1 of pid 555"]


def test_unknown_reported_before_missing() -> None:
    with pytest.raises(UnknownInheritKey):
        resolve([key("nope")], MANIFEST)


def test_duplicate_key() -> None:
    specs = [
        key("pipe:[11]"),
        InheritSpec(pid=100, fd=2, handle=H, index=1),  # the same pipe, by (pid, fd)
        key("socket:[22]"),
        key("socket:[22]", 2),
        key("socket:[22]", 3),
    ]
    with pytest.raises(DuplicateInheritKey) as ei:
        resolve(specs, MANIFEST)
    assert ei.value.extra["keys"] == ["pipe:[11]", "socket:[22]"]  # each named once
    assert ei.value.code == "duplicate_inherit_key"


def test_missing_external_names_every_key() -> None:
    with pytest.raises(MissingInheritFd) as ei:
        resolve([], MANIFEST)
    assert ei.value.extra["keys"] == ["pipe:[11]", "socket:[22]"]
    assert "pipe:[11]" in ei.value.detail and "socket:[22]" in ei.value.detail
    assert ei.value.code == "missing_inherit_fd"
    with pytest.raises(MissingInheritFd) as ei:
        resolve([key("pipe:[11]"), key("dev/null")], MANIFEST)
    assert ei.value.extra["keys"] == ["socket:[22]"]


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        (InheritSpec(path="/x"), "needs the key"),
        (InheritSpec(key="dev/null", path="/x", handle=H), "key, path, mode and type only"),
        (InheritSpec(key="dev/null", path="/x", index=0), "key, path, mode and type only"),
        (InheritSpec(key="dev/null", path="/x", pid=100, fd=0), "key, path, mode and type only"),
        (InheritSpec(key="dev/null", path="/x", mode="rw"), "mode must be one of"),
        (InheritSpec(key="dev/null", path="/x", type="dir"), "type must be one of"),
        (InheritSpec(key="dev/null", handle=H, index=0, type="fifo"), "type goes with the path"),
        (InheritSpec(key="dev/null"), "give handle and index"),
        (InheritSpec(key="dev/null", handle=H), "give handle and index"),
        (InheritSpec(key="dev/null", index=0), "give handle and index"),
        (InheritSpec(key="dev/null", handle=H, index=0, mode="r"), "mode goes with the path"),
        (InheritSpec(pid=100, handle=H, index=0), "needs both pid and fd"),
        (InheritSpec(fd=1, handle=H, index=0), "needs both pid and fd"),
        (InheritSpec(key="dev/null", pid=100, fd=0, handle=H, index=0), "not both"),
        (InheritSpec(handle=H, index=0), "give a key, or the pid and fd"),
    ],
)
def test_shape_errors(spec: InheritSpec, words: str) -> None:
    with pytest.raises(InvalidRequest) as ei:
        resolve([key("pipe:[11]"), key("socket:[22]"), spec], MANIFEST)
    assert words in ei.value.detail
    assert ei.value.detail.startswith("inherit_fds[2]: ")
    assert ei.value.code == "invalid_request"


def test_shape_checked_before_keys() -> None:
    # A bad shape later in the list wins over an unknown key earlier in it.
    with pytest.raises(InvalidRequest):
        resolve([key("nope"), InheritSpec(handle=H, index=0)], MANIFEST)
