"""Pure builders of `criu dump` argument lists (testable without root)."""

from __future__ import annotations

from pathlib import Path

from criud.dump.options import DumpOptions

# The name of the dump's log in the images dir (the daemon creates it).
DUMP_LOG = "dump.log"


def dump_argv(
    pid: int,
    images_dir: Path,
    opts: DumpOptions,
    *,
    external_unix: tuple[int, ...] = (),
    external_tty: tuple[str, ...] = (),
    network_lock: str | None = None,
    unprivileged: bool = False,
    external_ns: tuple[tuple[str, int, str], ...] = (),
    extra: tuple[str, ...] = (),
) -> list[str]:
    """Return the argv (without the criu binary) that dumps the tree of pid.

    external_unix holds inodes of unix sockets whose peer lives outside the
    tree and which the caller declared external: criu dumps them as such and
    the restore must hand in a replacement.  network_lock is given when the
    dump locks a network (TCP connections, or a network namespace of its
    own) and criu's default (iptables) is not available.  external_tty
    holds the tty[rdev:dev] keys of pty slaves whose master is outside the
    tree (an engine's terminal): criu leaves them out of the image and the
    restore inherits a new slave for each.
    """
    argv = [
        "dump",
        "--no-default-config",
        "-t",
        str(pid),
        "-D",
        str(images_dir),
        # criu logs to its stdout, which is the log file the daemon created
        # itself: criu never opens a log by path in a dir its user can write.
        "-o",
        "-",
        "-v4",
    ]
    if unprivileged:
        argv.append("--unprivileged")
    if opts.leave_running:
        argv.append("--leave-running")
    argv += opts.criu_flags()
    if network_lock:
        argv += ["--network-lock", network_lock]
    for ino in external_unix:
        argv += ["--external", f"unix[{ino}]"]
    # The key is criu's own name for the terminal, tty[rdev:dev], as is.
    for key in external_tty:
        argv += ["--external", key]
    # (type, inode, key): the namespace stays out of the image; a restore
    # joins whatever namespace is handed in for the key.
    for ns_type, ino, key in external_ns:
        argv += ["--external", f"{ns_type}[{ino}]:{key}"]
    # Derived elsewhere (an OCI bundle's root, mounts, cgroups), already checked.
    argv += extra
    return argv
