"""Daemon settings: one frozen dataclass, filled from flags or environment."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from criud.daemon.logfmt import LogFormat

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
    # "text" or "json" (one object a line, criud.daemon.logfmt).
    log_format: LogFormat = "text"
    # False: operations publish no events and update no metrics (a
    # benchmark's baseline; the routes stay, with nothing new to tell).
    observability: bool = True
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
    # Pre-started `criu swrk` workers kept ready (0: every run execs the CLI).
    # A warm worker saves criu's exec, library loading and kdat per run.
    criu_pool: int = 2
    # The longest the opening of a restore's inherit paths may take (a
    # caller's path on a hung filesystem) before its opener child is killed.
    path_open_timeout_s: float = 5.0

    # -- what one caller may pin in the daemon (criud.daemon.quotas) ------------
    # Root is held to none of the per-uid caps; it has the room others leave.
    # A connection whose request head is not complete this long after it
    # opened (or after its previous response) is closed with 408.
    header_timeout_s: float = 10.0
    # Connections per uid on each unix socket (API, fd socket), and of all
    # non-root uids together on each: root always finds room.
    max_conns_per_uid: int = 32
    max_conns_nonroot: int = 256
    # The TCP listener's own pool: per remote address, and in total.
    max_tcp_conns_per_addr: int = 16
    max_tcp_conns: int = 64
    # fd handles per uid, and the fds they hold together.
    max_handles_per_uid: int = 64
    max_handle_fds_per_uid: int = 1024
    # Checkpoints and restores in flight per uid.
    max_ops_per_uid: int = 4
    # fds kept back from callers: root's handles and connections stop at
    # RLIMIT_NOFILE - fd_reserve, everyone else's at RLIMIT_NOFILE - 2 x
    # fd_reserve.  0: an eighth of the limit (at least 32, at most 1024).
    fd_reserve: int = 0

    # -- retention: what one caller may keep (criud.daemon.quotas.CheckpointQuota)
    # Checkpoint records per uid (every state: a failed one keeps its log)
    # and the bytes of their images; 0: no limit.  A dump is refused before
    # it starts when the tree's estimated size would pass the byte limit.
    max_checkpoints_per_uid: int = 0
    max_checkpoint_bytes_per_uid: int = 0
    # Root is exempt from both unless this is set (its checkpoints are the
    # engine's, which usually keeps its own retention).
    quota_root: bool = False
    # After a checkpoint of pid P by U, keep only U's newest N done
    # checkpoints of P (0: keep all).
    max_checkpoints_per_pid: int = 0

    # -- archives (criud.daemon.archive) -------------------------------------------
    # zstd level of exports: 1 keeps up with a disk (docs/benchmarks.md).
    export_zstd_level: int = 1
    # zstd's own worker threads (0: none, compress in the export's thread,
    # beside the thread that reads and hashes).  Measured on 2 cores, zstd's
    # multi-threaded mode was slower at level 1 (docs/benchmarks.md).
    export_zstd_threads: int = 0
    # What one imported archive may unpack to: bytes in total (and of the
    # body itself), the ratio of unpacked to received bytes (a bomb stops
    # within its first ratio_floor), and members.
    import_max_bytes: int = 64 << 30
    import_max_ratio: int = 200
    import_max_members: int = 100_000
    # An export whose client reads nothing, or an import whose body brings
    # nothing, for this long ends (client_gone): a silent client holds no
    # operation (and its thread) for ever.
    archive_stall_s: float = 300.0

    # -- migrations (criud.restore.incoming, criud.dump.migrate) ---------------
    # Where an incoming migration's page server listens when the request came
    # over the unix socket (over TCP: the address the request came in on).
    migration_address: str | None = None
    # An incoming migration not committed within this long is aborted: its
    # page server killed, its half-made checkpoint removed.
    migration_timeout_s: float = 120.0
    # TLS for the page server (both sides): CA, this daemon's certificate and
    # key, as paths root owns.  All three, or none.
    tls_cacert: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None

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
