"""Daemon settings: one frozen dataclass, filled from flags or environment."""

from __future__ import annotations

import dataclasses
from pathlib import Path

DEFAULT_SOCKET = Path("/run/criud/criud.sock")
DEFAULT_FD_SOCKET = Path("/run/criud/fds.sock")
DEFAULT_STATE_DIR = Path("/var/lib/criud")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything `criud serve` is configured with."""

    socket: Path = DEFAULT_SOCKET
    fd_socket: Path = DEFAULT_FD_SOCKET
    state_dir: Path = DEFAULT_STATE_DIR
    criu: str = "criu"
    log_level: str = "info"
    socket_group: str | None = None
    # Optional TCP listener ("tcp://127.0.0.1:PORT"), token-authenticated.
    listen: str | None = None
    token_file: Path | None = None
    # Restores may be placed only in cgroups beneath this one (in every
    # hierarchy); it is created on demand.
    cgroup_parent: str = "criud"
    # How long a received fd handle lives when the client does not say.
    handle_ttl_s: float = 300.0
    handle_ttl_max_s: float = 3600.0
    # How long a restore waits for the image's old pids to be reaped (PID 1
    # here reaps orphaned zombies about once a second).
    pid_wait_s: float = 3.0
    # How long SIGTERM lets in-flight operations run before they are aborted.
    shutdown_grace_s: float = 30.0
    # The longest one criu run may take before it is killed (0: no bound).
    # A dump copies about 1 GB/s here: half an hour is far beyond any sane
    # dump, and still ends a criu that hangs.
    criu_timeout_s: float = 1800.0
    # How long a dump's criu may go on once the process it dumps has died
    # before it is killed (a target killed mid-dump can leave criu hanging).
    criu_gone_grace_s: float = 10.0

    @property
    def checkpoints_dir(self) -> Path:
        return self.state_dir / "checkpoints"

    @property
    def run_dir(self) -> Path:
        """Per-restore work dirs for criu (-W): its pidfile and stats, never in the images."""
        return self.state_dir / "run"

    @property
    def db_path(self) -> Path:
        return self.state_dir / "criud.db"
