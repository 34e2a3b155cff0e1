"""criud's command line: serve's flags, where they may stand, and their environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from criud.daemon.cli import _TUNABLE_FIELDS, _TUNABLES, _settings, build_parser
from criud.daemon.config import DEFAULT_FD_SOCKET, Settings


def test_serve_takes_its_sockets_after_the_subcommand() -> None:
    a = build_parser().parse_args(
        ["serve", "--socket", "/x.sock", "--fd-socket", "/y.sock", "--state-dir", "/c"]
    )
    s = _settings(a)
    assert (s.socket, s.fd_socket, s.state_dir) == (Path("/x.sock"), Path("/y.sock"), Path("/c"))


def test_global_socket_flags_still_work_and_are_not_reset_by_serve() -> None:
    s = _settings(build_parser().parse_args(["--socket", "/g.sock", "serve"]))
    assert s.socket == Path("/g.sock") and s.fd_socket == DEFAULT_FD_SOCKET


def test_every_tunable_fills_its_settings_field_with_the_documented_default() -> None:
    assert {flag for flag, *_ in _TUNABLES} == set(_TUNABLE_FIELDS)
    s = _settings(build_parser().parse_args(["serve"]))
    for flag, kind, default, _, _ in _TUNABLES:
        field = _TUNABLE_FIELDS[flag]
        assert getattr(s, field) == kind(default), flag
        # The CLI's defaults are the daemon's own.
        assert getattr(Settings(), field) == kind(default), flag


def test_tunables_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRIUD_MAX_OPS_PER_UID", "9")
    monkeypatch.setenv("CRIUD_CRIU_TIMEOUT", "12.5")
    s = _settings(build_parser().parse_args(["serve"]))
    assert (s.max_ops_per_uid, s.criu_timeout_s) == (9, 12.5)
    s = _settings(build_parser().parse_args(["serve", "--max-ops-per-uid", "3"]))
    assert s.max_ops_per_uid == 3


def test_a_negative_count_is_a_usage_error() -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--max-ops-per-uid", "-1"])


def test_retention_flags_fill_their_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    s = _settings(build_parser().parse_args(["serve"]))
    assert (s.max_checkpoints_per_uid, s.max_checkpoint_bytes_per_uid, s.quota_root) == (
        0,
        0,
        False,
    )
    argv = ["serve", "--max-checkpoints-per-uid", "5", "--max-checkpoint-bytes-per-uid", "10G"]
    s = _settings(build_parser().parse_args([*argv, "--max-checkpoints-per-pid", "3"]))
    assert (s.max_checkpoints_per_uid, s.max_checkpoint_bytes_per_uid) == (5, 10 << 30)
    assert s.max_checkpoints_per_pid == 3
    monkeypatch.setenv("CRIUD_QUOTA_ROOT", "1")
    monkeypatch.setenv("CRIUD_MAX_CHECKPOINT_BYTES_PER_UID", "512M")
    s = _settings(build_parser().parse_args(["serve"]))
    assert s.quota_root and s.max_checkpoint_bytes_per_uid == 512 << 20


@pytest.mark.parametrize("bad", ["10X", "-1G", "G", "1.5G"])
def test_a_bad_size_is_a_usage_error(bad: str) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--max-checkpoint-bytes-per-uid", bad])
