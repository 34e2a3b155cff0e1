"""criud.restore.argv: the exact `criu restore` argument lists."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from criud.dump.options import DumpOptions
from criud.restore.argv import PIDFILE, RESTORE_LOG, restore_argv
from criud.restore.worker import FdMap

D = Path("/var/lib/criud/checkpoints/0123456789abcdef01234567")
BASE = [
    "restore",
    "--no-default-config",
    "-d",
    "--restore-sibling",
    "-D",
    str(D),
    "-o",
    "-",
    "-v4",
    "--pidfile",
    "restore.pid",
]


def test_defaults_exact() -> None:
    assert restore_argv(D, DumpOptions()) == BASE


def test_log_to_stdout_and_pidfile_in_work_dir() -> None:
    # criu logs to the fd the daemon gives it as stdout (never a path in a
    # dir its user could write) and writes the pidfile relative to -W.
    assert RESTORE_LOG == "restore.log"
    argv = restore_argv(D, DumpOptions(), work_dir=Path("/proc/self/fd/7"))
    assert argv[argv.index("-o") + 1] == "-"
    assert argv[argv.index("-W") + 1] == "/proc/self/fd/7"
    assert argv[argv.index("--pidfile") + 1] == PIDFILE == "restore.pid"
    assert "-W" not in restore_argv(D, DumpOptions())


@pytest.mark.parametrize(
    ("field", "flag"),
    [
        ("shell_job", "--shell-job"),
        ("tcp_established", "--tcp-established"),
        ("ext_unix_sk", "--ext-unix-sk"),
        ("file_locks", "--file-locks"),
    ],
)
def test_each_option_alone(field: str, flag: str) -> None:
    assert restore_argv(D, DumpOptions(**{field: True})) == [*BASE, flag]


def test_leave_running_is_dump_only() -> None:
    assert restore_argv(D, DumpOptions(leave_running=True)) == BASE


def test_inherit_fd_args_from_the_fd_map_in_order() -> None:
    r, w = os.pipe()
    with FdMap() as fds:
        a, b = fds.own(r), fds.own(w)
        fds.hand_over(b, "pipe:[123]")
        fds.hand_over(a, "tmp/f")
        argv = restore_argv(D, DumpOptions(), fds.inherit_args())
    assert argv == [*BASE, "--inherit-fd", f"fd[{b}]:pipe:[123]", "--inherit-fd", f"fd[{a}]:tmp/f"]


def test_network_lock_passed_whenever_given() -> None:
    assert restore_argv(D, DumpOptions(), network_lock=None) == BASE
    assert restore_argv(D, DumpOptions(), network_lock="nftables") == [
        *BASE,
        "--network-lock",
        "nftables",
    ]
    argv = restore_argv(D, DumpOptions(tcp_established=True), network_lock="nftables")
    assert argv == [*BASE, "--tcp-established", "--network-lock", "nftables"]
    argv = restore_argv(D, DumpOptions(tcp_established=True), network_lock=None)
    assert argv == [*BASE, "--tcp-established"]


def test_all_options_then_inherit() -> None:
    opts = DumpOptions(
        leave_running=True, shell_job=True, tcp_established=True, ext_unix_sk=True, file_locks=True
    )
    argv = restore_argv(D, opts, ["--inherit-fd", "fd[5]:socket:[9]"], network_lock="iptables")
    assert argv == [
        *BASE,
        "--shell-job",
        "--tcp-established",
        "--ext-unix-sk",
        "--file-locks",
        "--network-lock",
        "iptables",
        "--inherit-fd",
        "fd[5]:socket:[9]",
    ]
    assert argv.count("--no-default-config") == 1
    assert argv[:2] == ["restore", "--no-default-config"]
