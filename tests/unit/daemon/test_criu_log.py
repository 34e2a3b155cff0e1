"""criud.daemon.criu: log parsing, version parsing, and running a (fake) criu."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import pytest

from criud.daemon.criu import (
    Criu,
    CriuResult,
    LogFile,
    first_error,
    parse_version,
    read_log,
    version_tuple,
)
from criud.daemon.errors import CriuUnavailable

from .._helpers import CRIU, need_root_and_criu

RLIMIT = (
    "(00.070383) Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self: "
    "Operation not permitted\n"
)


def test_first_error_skips_rlimit_line() -> None:
    lines = [
        "(00.000000) Version: 4.2.1 (gitid 0)\n",
        RLIMIT,
        "(00.070400) Warn  (criu/kerndat.c:1): something harmless\n",
        "(00.080123)  26493: Error (criu/files-reg.c:2001): Can't lookup mount=22 for fd=3\n",
        "(00.090000) Error (criu/cr-dump.c:2100): Dumping FAILED.\n",
    ]
    assert first_error(lines) == "Can't lookup mount=22 for fd=3"


def test_first_error_without_pid_prefix() -> None:
    lines = [RLIMIT, "(00.090000) Error (criu/cr-dump.c:2100): Dumping FAILED.\n"]
    assert first_error(lines) == "Dumping FAILED."


def test_first_error_none_when_only_harmless() -> None:
    assert first_error([RLIMIT, "(00.1) Info: nothing\n"]) is None


def test_first_error_none_for_empty_and_foreign_lines() -> None:
    assert first_error([]) is None
    # Not criu's "(time) Error (file:line): msg" format: ignored.
    assert first_error(["Error: usage\n", "criu: unrecognized option\n"]) is None


def test_first_error_padded_timestamp() -> None:
    assert first_error(["(   1.500000) Error (a.c:1):   spaced  \n"]) == "spaced"


def test_parse_version() -> None:
    assert parse_version("Version: 4.2.1\n") == "4.2.1"
    assert parse_version("Version: 3.19\nGitID: v3.19\n") == "3.19"
    assert parse_version("criu: command not found") is None


def test_version_tuple() -> None:
    assert version_tuple("4.2.1") == (4, 2, 1)
    assert version_tuple("3.19") == (3, 19)
    assert version_tuple("4.2.1") > version_tuple("4.2")


def test_read_log_missing(tmp_path: Path) -> None:
    assert read_log(tmp_path / "nope.log") == (None, [])


def test_read_log_tail_and_error(tmp_path: Path) -> None:
    log = tmp_path / "dump.log"
    body = [f"(00.{i:06d}) Info: line {i}\n" for i in range(30)]
    body.insert(5, RLIMIT)
    body.insert(10, "(00.5) Error (criu/x.c:9): the real one\n")
    log.write_text("".join(body))
    err, tail = read_log(log, tail=4)
    assert err == "the real one"
    assert tail == [ln.rstrip("\n") for ln in body[-4:]]
    assert len(read_log(log)[1]) == 20


def test_read_log_tolerates_binary(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    log.write_bytes(b"\xff\xfe garbage\n(00.1) Error (a.c:1): bad \xff byte\n")
    err, tail = read_log(log)
    assert err is not None and err.startswith("bad ")
    assert len(tail) == 2


def _fake_criu(tmp_path: Path, script: str) -> str:
    path = tmp_path / "fake-criu"
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)
    return str(path)


def _run(c: Criu, argv: list[str], log: Path, **kw: object) -> CriuResult:
    """c.run with a log the test creates itself, as the daemon does (criu gets it as stdout)."""
    fd = os.open(log, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        return asyncio.run(asyncio.wait_for(c.run(argv, LogFile(fd, log), **kw), 60))  # type: ignore[arg-type]
    finally:
        os.close(fd)


def test_run_fake_criu_failure(tmp_path: Path) -> None:
    fake = _fake_criu(
        tmp_path,
        'echo "(00.000001) Error (criu/util.c:1534): RLIMIT_NOFILE: EPERM"\n'
        'echo "(00.000002) Error (criu/cr-restore.c:7): boom: $*"\n'
        "exit 3\n",
    )
    log = tmp_path / "restore.log"
    res = _run(Criu(fake), ["restore", "-x"], log)
    assert res.returncode == 3
    assert not res.ok
    assert res.first_error == "boom: restore -x"
    assert res.log_path == log
    assert res.log_tail[-1].endswith("boom: restore -x")
    # Read back from the fd, not the path: the whole log is there to classify.
    assert any("boom" in ln for ln in res.log_lines)
    assert log.stat().st_mode & 0o777 == 0o600


def test_run_passes_exactly_pass_fds(tmp_path: Path) -> None:
    fake = _fake_criu(tmp_path, "ls /proc/$$/fd\n")
    r, w = os.pipe()
    extra_r, extra_w = os.pipe()
    os.set_inheritable(extra_r, True)  # even an inheritable fd must not leak
    try:
        log = tmp_path / "out.log"
        c = Criu(fake)
        res = _run(c, [], log, pass_fds=[w])
        assert res.ok
        assert c.running == set()
        fds = {int(x) for x in log.read_text().split()}
        # stdin, stdout, stderr, the passed fd, and the fd `ls` opens itself.
        assert w in fds
        assert extra_r not in fds
        assert r not in fds
        assert len(fds - {0, 1, 2, w}) <= 1
    finally:
        for fd in (r, w, extra_r, extra_w):
            os.close(fd)


def test_run_missing_binary(tmp_path: Path) -> None:
    c = Criu(str(tmp_path / "no-such-criu"))
    with pytest.raises(CriuUnavailable) as ei:
        _run(c, ["dump"], tmp_path / "x.log")
    assert ei.value.code == "criu_unavailable"
    assert ei.value.status == 503
    assert c.running == set()


def test_probe_reports_version_with_fake(tmp_path: Path) -> None:
    fake = _fake_criu(
        tmp_path,
        'case "$1" in --version) echo "Version: 9.8.7"; exit 0;; esac\n'
        'case "$*" in *mem_dirty_track*) exit 0;; *--feature*) exit 1;; esac\n'
        "exit 0\n",
    )
    c = Criu(fake)
    asyncio.run(asyncio.wait_for(c.probe(), 30))
    assert c.version == "9.8.7"
    assert c.features["mem_dirty_track"] is True
    assert c.features["timens"] is False


def test_probe_failing_check(tmp_path: Path) -> None:
    fake = _fake_criu(
        tmp_path,
        'case "$1" in --version) echo "Version: 1.0"; exit 0;; esac\necho nope; exit 1\n',
    )
    with pytest.raises(CriuUnavailable) as ei:
        asyncio.run(asyncio.wait_for(Criu(fake).probe(), 30))
    assert "nope" in ei.value.detail


# -- the real criu ----------------------------------------------------------------


def test_real_criu_version() -> None:
    need_root_and_criu()
    out = subprocess.run(
        [CRIU, "--version"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    v = parse_version(out)
    assert v is not None
    assert version_tuple(v) >= (3, 0)


def test_real_criu_failure_first_error(tmp_path: Path) -> None:
    need_root_and_criu()
    # pid_max is at most 2^22: this pid cannot exist, so the dump must fail.
    argv = ["dump", "--no-default-config", "-t", "4194305", "-D", str(tmp_path)]
    argv += ["-o", "-", "-v4"]
    res = _run(Criu(CRIU), argv, tmp_path / "dump.log")
    assert not res.ok
    assert res.first_error is not None
    assert "RLIMIT_NOFILE" not in res.first_error
    assert res.log_tail


def _log_in(dirpath: Path, size: int) -> tuple[int, LogFile]:
    """A log of size bytes in dirpath (the daemon's own file); (dir fd, LogFile)."""
    path = dirpath / "dump.log"
    path.write_bytes(b"x" * size)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
    return os.open(dirpath, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC), LogFile(fd, path)


def test_a_big_log_criu_wrote_itself_is_left_as_it_is_without_a_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A dump's criu writes the daemon's own log: nothing to copy, whatever
    # its size, and no thread woken to find that out.
    from criud.daemon import criu as criu_mod

    dir_fd, log = _log_in(tmp_path, criu_mod._INLINE_LOG_MAX + 1)

    async def no_thread(*_: object) -> None:
        raise AssertionError("a thread was woken")

    monkeypatch.setattr(criu_mod.asyncio, "to_thread", no_thread)
    try:
        asyncio.run(criu_mod._collect_log_soon(dir_fd, log))
        assert log.path.stat().st_size == criu_mod._INLINE_LOG_MAX + 1
    finally:
        os.close(log.fd)
        os.close(dir_fd)


def test_a_big_log_in_crius_work_dir_is_copied_in_a_thread(tmp_path: Path) -> None:
    # criu's own log in its work dir (a restore's): copied into the daemon's, then removed.
    from criud.daemon import criu as criu_mod

    work = tmp_path / "work"
    work.mkdir()
    dir_fd, log = _log_in(tmp_path, 3)
    (work / "dump.log").write_bytes(b"y" * (criu_mod._INLINE_LOG_MAX + 1))
    work_fd = os.open(work, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        asyncio.run(criu_mod._collect_log_soon(work_fd, log))
        assert log.path.stat().st_size == 3 + criu_mod._INLINE_LOG_MAX + 1
        assert not (work / "dump.log").exists()
    finally:
        os.close(log.fd)
        os.close(dir_fd)
        os.close(work_fd)
