"""criud.restore.incoming: the page server's argv (pure)."""

from __future__ import annotations

from pathlib import Path

from criud.daemon.config import Settings
from criud.restore.incoming import page_server_argv


def test_page_server_argv_on_an_accepted_socket() -> None:
    argv = page_server_argv(Path("/s/.tmp-x"), 7, None)
    assert argv[:2] == ["page-server", "--no-default-config"]
    assert argv[argv.index("--ps-socket") + 1] == "7"
    assert argv[argv.index("-D") + 1] == "/s/.tmp-x"
    # It never listens itself: the daemon accepted the one connection.
    assert "--address" not in argv and "--port" not in argv and "--tls" not in argv


def test_page_server_argv_with_tls_checks_the_ca_not_the_name() -> None:
    s = Settings(tls_cacert=Path("/ca"), tls_cert=Path("/c"), tls_key=Path("/k"))
    argv = page_server_argv(Path("/d"), 3, s)
    assert "--tls" in argv and "--tls-no-cn-verify" in argv
    assert argv[argv.index("--tls-cacert") + 1] == "/ca"
