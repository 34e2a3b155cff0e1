"""criud.dump.argv: the exact `criu dump` argument lists."""

from __future__ import annotations

from pathlib import Path

import pytest

from criud.dump.argv import DUMP_LOG, dump_argv
from criud.dump.options import DumpOptions

D = Path("/var/lib/criud/checkpoints/0123456789abcdef01234567")
BASE = ["dump", "--no-default-config", "-t", "42", "-D", str(D), "-o", "-", "-v4"]


def test_defaults_exact() -> None:
    assert dump_argv(42, D, DumpOptions()) == BASE


def test_log_goes_to_stdout() -> None:
    # The daemon creates DUMP_LOG itself and hands it to criu as stdout.
    assert DUMP_LOG == "dump.log"
    argv = dump_argv(1, D, DumpOptions())
    assert argv[argv.index("-o") + 1] == "-"


@pytest.mark.parametrize(
    ("field", "flag"),
    [
        ("leave_running", "--leave-running"),
        ("shell_job", "--shell-job"),
        ("tcp_established", "--tcp-established"),
        ("ext_unix_sk", "--ext-unix-sk"),
        ("file_locks", "--file-locks"),
    ],
)
def test_each_option_alone(field: str, flag: str) -> None:
    argv = dump_argv(42, D, DumpOptions(**{field: True}))
    assert argv == [*BASE, flag]


def test_all_options_in_order() -> None:
    opts = DumpOptions(
        leave_running=True,
        shell_job=True,
        tcp_established=True,
        ext_unix_sk=True,
        file_locks=True,
    )
    assert dump_argv(42, D, opts, network_lock="nftables") == [
        *BASE,
        "--leave-running",
        "--shell-job",
        "--tcp-established",
        "--ext-unix-sk",
        "--file-locks",
        "--network-lock",
        "nftables",
    ]


def test_network_lock_passed_whenever_given() -> None:
    # The core decides when a lock is needed (TCP, or a netns of the tree's
    # own) and which; the builder passes what it is given.
    assert dump_argv(42, D, DumpOptions(), network_lock=None) == BASE
    assert dump_argv(42, D, DumpOptions(), network_lock="nftables") == [
        *BASE,
        "--network-lock",
        "nftables",
    ]
    with_tcp = dump_argv(42, D, DumpOptions(tcp_established=True), network_lock="nftables")
    assert with_tcp[-3:] == ["--tcp-established", "--network-lock", "nftables"]


def test_tcp_established_without_network_lock() -> None:
    argv = dump_argv(42, D, DumpOptions(tcp_established=True), network_lock=None)
    assert argv == [*BASE, "--tcp-established"]


def test_external_unix_inodes() -> None:
    argv = dump_argv(42, D, DumpOptions(ext_unix_sk=True), external_unix=(1234, 99))
    assert argv == [
        *BASE,
        "--ext-unix-sk",
        "--external",
        "unix[1234]",
        "--external",
        "unix[99]",
    ]


def test_no_default_config_always_second() -> None:
    for opts in (DumpOptions(), DumpOptions(leave_running=True, file_locks=True)):
        argv = dump_argv(7, D, opts, external_unix=(5,), network_lock="iptables")
        assert argv[:2] == ["dump", "--no-default-config"]
        assert argv.count("--no-default-config") == 1


def test_declared_external_keys_do_not_leak_into_argv() -> None:
    # `external` (manifest keys) is handled through external_unix and the
    # restore's --inherit-fd; it never becomes a dump flag by itself.
    argv = dump_argv(42, D, DumpOptions(external=("pipe:[1]", "socket:[2]")))
    assert argv == BASE


def test_options_round_trip() -> None:
    opts = DumpOptions(shell_job=True, external=("pipe:[5]", "tmp/x"))
    d = opts.as_dict()
    assert d["external"] == ["pipe:[5]", "tmp/x"]
    assert d["shell_job"] is True
    assert DumpOptions.from_dict(d) == opts


def test_options_from_dict_ignores_unknown_and_defaults_external() -> None:
    opts = DumpOptions.from_dict({"leave_running": True, "future_option": 1, "external": None})
    assert opts == DumpOptions(leave_running=True)
    assert opts.external == ()


def test_external_ttys_are_passed_by_key() -> None:
    argv = dump_argv(42, Path("/img"), DumpOptions(), external_tty=("tty[8800:1a]",))
    i = argv.index("tty[8800:1a]")
    assert argv[i - 1] == "--external"


# Iterative pre-dumps: round k into pre-k, the final dump into the checkpoint's dir.


def test_pre_dump_rounds_and_final_dump_exact() -> None:
    from criud.dump.argv import chained_argv, pre_dump_argv, round_link

    final = dump_argv(42, D, DumpOptions(leave_running=True, tcp_established=True))
    r1 = pre_dump_argv(final, D / "pre-1", None)
    assert r1 == [
        "pre-dump", "--no-default-config", "-t", "42", "-D", str(D / "pre-1"),
        "-o", "-", "-v4", "--tcp-established", "--track-mem",
    ]  # fmt: skip
    r2 = pre_dump_argv(final, D / "pre-2", round_link(1))
    assert r2[-3:] == ["--track-mem", "--prev-images-dir", "../pre-1"]
    assert r2[r2.index("-D") + 1] == str(D / "pre-2")
    # A pre-dump always leaves the tree running: the final dump's flag stays there.
    assert "--leave-running" not in r1 + r2 and "--leave-running" in final
    last = chained_argv(final, round_link(2, final=True))
    assert last == [*final, "--track-mem", "--prev-images-dir", "pre-2"]


def test_pre_dump_argv_refuses_a_page_server_dump() -> None:
    from criud.dump.argv import pre_dump_argv

    push = dump_argv(42, D, DumpOptions(), extra=("--page-server", "--address", "10.0.0.1"))
    with pytest.raises(ValueError, match="plain dump"):
        pre_dump_argv(push, D / "pre-1", None)
