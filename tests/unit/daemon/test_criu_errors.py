"""criud.daemon.criu_errors: criu's real failure logs mapped to codes and hints.

Every file in criu_logs/ is an excerpt of a log criu 4.2.1 wrote on this
machine when the failure was provoked for real; its name is the code it must
map to (a "-variant" suffix tells several provocations of one code apart).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from criud.daemon import criu_errors, errors
from criud.daemon.criu import first_error
from criud.daemon.criu_errors import CLASSES, FALLBACK, RULES, classify, classify_log

LOGS = Path(__file__).parent / "criu_logs"
FIXTURES = sorted(LOGS.glob("*.log"))
# The fixtures that come from `criu restore`; the rest are dumps.
RESTORE_LOGS = {"pid_in_use", "file_size_changed", "criu_failed"}

RLIMIT = (
    "(00.070383) Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self: "
    "Operation not permitted\n"
)


def _code_of(path: Path) -> str:
    return path.stem.split("-", 1)[0]


def _op_of(path: Path) -> str:
    return "restore" if _code_of(path) in RESTORE_LOGS else "dump"


def test_there_is_a_real_log_for_every_code() -> None:
    assert {_code_of(p) for p in FIXTURES} == set(CLASSES)


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.stem)
def test_real_logs(path: Path) -> None:
    lines = path.read_text().splitlines(keepends=True)
    code, hint = classify(first_error(lines), lines, _op_of(path))
    assert code == _code_of(path)
    assert hint and "\n" not in hint
    # The same answer straight from the file, as the daemon would ask.
    assert classify_log(path, _op_of(path)) == (code, hint)


@pytest.mark.parametrize(
    ("path", "needle"),
    [
        ("external_unix_socket", "external"),
        ("external_unix_socket-half_stream", "external"),
        ("tcp_established_needed", "tcp_established: true"),
        ("shell_job_needed", "shell_job: true"),
        ("external_tty-pty_master_outside", '"key": "tty['),
        ("file_locks_needed", "file_locks: true"),
        ("pid_in_use", "pids"),
        ("no_space", "free space"),
        ("file_size_changed", "inherit_fds"),
        ("permission_denied", "another uid"),
        ("permission_denied-read_only", "read-only"),
        ("permission_denied-ptrace_setgid", "setgid"),
        ("permission_denied-ptrace_saved_uid0", "saved"),
    ],
)
def test_hints_name_the_fix(path: str, needle: str) -> None:
    p = LOGS / f"{path}.log"
    _, hint = classify_log(p, _op_of(p))
    assert needle in hint


def test_first_error_alone_is_enough() -> None:
    msg = "unix: External socket is used. Consider using --ext-unix-sk option."
    assert classify(msg, [], "dump")[0] == "external_unix_socket"


def test_later_lines_decide_when_the_first_says_nothing() -> None:
    # A target killed mid-dump: the first error is a bare siginfo dump.
    lines = [
        "(00.327600) Error (criu/parasite-syscall.c:87): si_code=2 si_pid=11514 si_status=9\n",
        "(00.327637) Error (criu/parasite-syscall.c:92): 11514 was killed by 9 unexpectedly\n",
    ]
    assert classify(first_error(lines), lines, "dump")[0] == "process_gone"


def test_earliest_recognised_line_wins() -> None:
    lines = [
        "(00.1) Error (a.c:1): Unable to spice data: No space left on device\n",
        "(00.2) Error (b.c:2): Unable to detach from 7: No such process\n",
    ]
    assert classify(None, lines, "dump")[0] == "no_space"


def test_harmless_rlimit_line_is_not_a_permission_error() -> None:
    lines = [RLIMIT, "(00.2) Error (c.c:3): Unexpected EOF on (empty-image)\n"]
    code, hint = classify(first_error(lines), lines, "restore")
    assert code == FALLBACK
    assert "Unexpected EOF on (empty-image)" in hint


def test_only_criu_error_lines_count() -> None:
    # Info and Warn lines mention errnos too; they never decide.
    lines = [
        "(00.1) Warn  (compel/src/lib/infect.c:132): Unable to interrupt task: 5 "
        "(No such process)\n",
        "(00.2) Info: No space left on device, said someone\n",
    ]
    assert classify(None, lines, "dump") == (FALLBACK, criu_errors._fallback_hint(None))


def test_op_matters() -> None:
    fork = "Can't fork for 4242: File exists"
    assert classify(fork, [], "restore")[0] == "pid_in_use"
    assert classify(fork, [], "dump")[0] == FALLBACK
    gone = "Unable to detach from 7: No such process"
    assert classify(gone, [], "dump")[0] == "process_gone"
    assert classify(gone, [], "pre-dump")[0] == "process_gone"
    assert classify(gone, [], "restore")[0] == FALLBACK


def test_fallback_carries_the_raw_line() -> None:
    code, hint = classify("Something new went wrong", [], "dump")
    assert code == FALLBACK
    assert "Something new went wrong" in hint
    assert classify(None, [], "dump")[0] == FALLBACK


def test_classify_log_missing_file(tmp_path: Path) -> None:
    assert classify_log(tmp_path / "nope.log", "dump")[0] == FALLBACK


def test_every_rule_code_has_a_status_and_a_class() -> None:
    for rule in RULES:
        assert rule.code in CLASSES


@pytest.mark.parametrize("code", sorted(CLASSES))
def test_error_class_matches_code_and_status(code: str) -> None:
    cls = criu_errors.error_class(code)
    assert issubclass(cls, errors.CriudError)
    assert cls.code == code
    assert cls.status == criu_errors.status_of(code)
    err = cls("dump of pid 1 failed", hint="h", criu_error="e", log_url="/v1/x")
    assert err.extra == {"hint": "h", "criu_error": "e", "log_url": "/v1/x"}


def test_new_classes_are_criu_failures() -> None:
    for code in CLASSES:
        if code in ("pid_in_use", "permission_denied"):
            continue  # existing classes, whose codes must stay unique
        assert issubclass(criu_errors.error_class(code), errors.CriuFailed)


def test_unknown_code() -> None:
    assert criu_errors.error_class("no_such_code") is errors.CriuFailed
    assert criu_errors.status_of("no_such_code") == 422


@pytest.mark.parametrize(
    ("path", "inode"),
    [
        ("external_unix_socket", 141219),
        ("external_unix_socket-half_stream", 150568),
        ("external_unix_socket-nameless_dgram", 148908),
    ],
)
def test_external_socket_hint_names_the_key(path: str, inode: int) -> None:
    # criu logs the socket it gave up on ("Runaway socket: ino N ...") just
    # before the error: the hint names the key to declare.
    _, hint = classify_log(LOGS / f"{path}.log", "dump")
    assert f'external: ["socket:[{inode}]"]' in hint


def test_external_socket_hint_without_the_log() -> None:
    _, hint = classify("unix: External socket is used.", [], "dump")
    assert 'external: ["socket:[INODE]"]' in hint


def test_no_second_status_table() -> None:
    """Statuses live on the error classes only (issue 12): no table to drift from them."""
    assert not hasattr(criu_errors, "STATUS")
