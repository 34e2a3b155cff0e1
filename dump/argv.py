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


# A dump's flags that have no meaning for a pre-dump, which always leaves
# the tree running (and never talks to a page server: migrations take no
# pre-dumps).
_FINAL_ONLY = frozenset({"--leave-running", "--leave-stopped"})


def round_link(k: int, final: bool = False) -> str:
    """The --prev-images-dir of pre-dump round k+1 (or of the final dump after round k).

    Relative, as criu writes it into the `parent` link: round dirs are
    pre-1 .. pre-N inside the checkpoint's dir, the final dump's images the
    checkpoint's dir itself.
    """
    return f"pre-{k}" if final else f"../pre-{k}"


def chained_argv(argv: list[str], prev: str) -> list[str]:
    """A dump argv (from dump_argv) as the final dump of a pre-dump chain."""
    return [*argv, "--track-mem", "--prev-images-dir", prev]


def pre_dump_argv(argv: list[str], images_dir: Path, prev: str | None) -> list[str]:
    """Round of a pre-dump chain: the dump argv turned into `criu pre-dump` into images_dir.

    prev (None for the first round) is the round before, relative to images_dir.
    """
    if argv[:1] != ["dump"] or "--page-server" in argv:
        raise ValueError("a pre-dump chain starts from a plain dump argv")
    out = ["pre-dump"]
    args = iter(argv[1:])
    for a in args:
        if a == "-D":
            out += ["-D", str(images_dir)]
            next(args)
        elif a not in _FINAL_ONLY:
            out.append(a)
    out.append("--track-mem")
    if prev is not None:
        out += ["--prev-images-dir", prev]
    return out
