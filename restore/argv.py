"""Pure builders of `criu restore` argument lists (testable without root)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from criud.dump.options import DumpOptions

# The restore's log in the images dir (the daemon creates it) and the
# pidfile criu writes into its work dir.
RESTORE_LOG = "restore.log"
PIDFILE = "restore.pid"


def restore_argv(
    images_dir: Path,
    opts: DumpOptions,
    inherit_args: Sequence[str] = (),
    *,
    network_lock: str | None = None,
    unprivileged: bool = False,
    cgroup_root: str | None = None,
    extra: tuple[str, ...] = (),
    work_dir: Path | None = None,
    lazy: bool = False,
) -> list[str]:
    """Return the argv (without the criu binary) that restores images_dir.

    inherit_args are the worker's --inherit-fd arguments, which only
    criud.restore.worker.FdMap writes (it also owns the fds they name).
    The tree is restored detached (-d) as a sibling of criu, so its root
    becomes a child of the daemon, which is a subreaper and reaps it.

    criu logs to its stdout (the log file the daemon created and hands it)
    and writes its pidfile and stats-restore into its work dir (-W; the
    images dir when None): criud passes a fresh run dir of its own, so the
    images dir stays read-only.  criu chdir()s to the work dir before it
    writes the pidfile, so the relative name lands there.
    """
    argv = [
        "restore",
        "--no-default-config",
        "-d",
        "--restore-sibling",
        "-D",
        str(images_dir),
    ]
    if work_dir is not None:
        argv += ["-W", str(work_dir)]
    argv += ["-o", "-", "-v4", "--pidfile", PIDFILE]
    if unprivileged:
        argv.append("--unprivileged")
    # Options that shaped the dump must be repeated at restore.
    argv += opts.criu_flags()
    if network_lock:
        argv += ["--network-lock", network_lock]
    if cgroup_root:
        # Re-roots the cgroups an image carries; a tree dumped from criu's
        # own cgroups carries none and inherits criu's (which the daemon
        # places in the target cgroup before exec).
        argv += ["--cgroup-root", cgroup_root]
    argv += extra
    if lazy:
        # Anonymous memory comes from the lazy-pages server listening in the
        # work dir (criud.restore.lazy), after the tree runs.
        argv.append("--lazy-pages")
    argv += inherit_args
    return argv
