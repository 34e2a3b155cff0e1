"""deploy/: the systemd units verify, and install-criu refuses non-root clearly."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_systemd_units_verify() -> None:
    out = subprocess.run(
        ["bash", str(DEPLOY / "test-units.sh")], capture_output=True, text=True, timeout=120
    )
    if "skipped: systemd-analyze not installed" in out.stdout:
        pytest.skip("systemd-analyze not installed")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ok:" in out.stdout


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root")
def test_install_criu_refuses_non_root() -> None:
    # The script goes in on stdin: the checkout may be unreadable for uid
    # 65534 (a CI clone into a 0700 directory).
    out = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "bash", "-s"],
        input=(DEPLOY / "install-criu").read_text(),
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )
    assert out.returncode == 1
    assert "must run as root" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_kdat_dir_matches_the_criu_build() -> None:
    # criu's RUNDIR is compiled in: install-criu must build with the very
    # directory the daemon mounts its tmpfs on, or the cache never warms.
    from criud.daemon import kdat

    assert f"readonly KDAT_RUNDIR={kdat.KDAT_DIR}\n" in (DEPLOY / "install-criu").read_text()


def _unit_setting(unit: str, key: str) -> list[str]:
    values = []
    for line in (DEPLOY / unit).read_text().splitlines():
        name, sep, value = line.partition("=")
        if sep and name.strip() == key:
            values.append(value.strip())
    return values


def test_service_sets_an_fd_limit_above_the_budgets() -> None:
    # The daemon raises its soft limit to the hard one, and keeps its quotas
    # below it: the unit must give it a hard limit worth raising to, larger
    # than the default reserve (1024) twice over plus every non-root uid's
    # share of handed-in fds (1024 each) for a few users.
    from criud.daemon.config import Settings
    from criud.daemon.quotas import auto_reserve

    (limit,) = _unit_setting("criud.service", "LimitNOFILE")
    soft, _, hard = limit.partition(":")
    n = int(hard or soft)
    assert int(soft) == n, "soft and hard the same: criud raises soft to hard anyway"
    s = Settings()
    assert n - 2 * auto_reserve(n) >= 16 * s.max_handle_fds_per_uid
