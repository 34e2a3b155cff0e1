"""What this host's kernel lets criu do, learned once at start-up.

`criu check --feature X` (Criu.probe) answers for most modes.  Where it
cannot tell, a real attempt does: a tiny pre-dump of a throwaway child of
the daemon (soft-dirty tracking can be reported and still not work).
Post-copy (a remote `dump --lazy-pages`) is not offered: on kernel 6.18 it
fails in the page pipe ("tee: Operation not permitted") although
uffd-noncoop is on, and a lone attempt cannot tell (the dump waits for its
client before it moves a page).

Each mode becomes a Capability: supported or not, and why not, naming the
criu feature that is missing.  `/v1/version` lists them; a request for a
mode that is not supported answers UnsupportedByKernel before anything is
made (`require`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from criud.daemon.errors import UnsupportedByKernel

if TYPE_CHECKING:
    from criud.daemon.criu import Criu

log = logging.getLogger("criud.kprobe")

# How long a real attempt may take before it counts as "works" (a post-copy
# dump that got past its page pipe waits for a lazy-pages client) or fails.
ATTEMPT_S = 5.0
# The criu features each mode needs, as `criu check --feature` names them.
NEEDS: dict[str, tuple[str, ...]] = {
    "lazy_restore": ("uffd", "uffd-noncoop"),
    "pre_dump": ("mem_dirty_track",),
    "post_copy_migration": ("uffd", "uffd-noncoop"),
}


_NO_POST_COPY = (
    "criud does not run remote lazy (post-copy) dumps: measured on kernel 6.18, criu's "
    "page pipe fails there ('tee: Operation not permitted'); migrations push pages first"
)


@dataclasses.dataclass(frozen=True)
class Capability:
    """One mode of criu on this host: whether it works and, if not, why."""

    supported: bool
    # The criu feature that is missing (or whose real attempt failed).
    missing: str | None = None
    reason: str | None = None

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def require(criu: Criu, mode: str, asked: str) -> None:
    """UnsupportedByKernel unless mode works here (an unprobed mode counts as missing)."""
    cap = criu.supports.get(mode)
    if cap is not None and cap.supported:
        return
    missing = cap.missing if cap is not None else NEEDS.get(mode, (mode,))[0]
    why = cap.reason if cap is not None and cap.reason else "not probed"
    raise UnsupportedByKernel(
        f"{asked} needs {mode.replace('_', ' ')}, which this host does not support: "
        f"criu feature {missing!r} is missing ({why})",
        capability=mode,
        feature=missing,
    )


UFFD_SYSCTL = Path("/proc/sys/vm/unprivileged_userfaultfd")


def require_user_uffd(asked: str) -> None:
    """UnsupportedByKernel unless a user's criu may create userfaultfds.

    A tree restored as its owner (root lacks CAP_SYS_RESOURCE here) has its
    criu, and its lazy-pages server, run as that user: with
    vm.unprivileged_userfaultfd = 0 their kernel probe finds no uffd and
    `criu lazy-pages` exits 1 logging nothing.  Granting them CAP_SYS_PTRACE
    instead would hand the user a ptrace-everything process: refused.
    """
    try:
        allowed = UFFD_SYSCTL.read_text().strip() == "1"
    except OSError:
        allowed = False
    if not allowed:
        raise UnsupportedByKernel(
            f"{asked}: the tree is restored as its owner, whose criu may not use "
            "userfaultfd here (vm.unprivileged_userfaultfd is 0)",
            capability="lazy_restore",
            feature="unprivileged_userfaultfd",
        )


async def probe(criu: Criu, scratch: Path) -> dict[str, Capability]:
    """Every mode's Capability (feature checks from Criu.probe, then real attempts)."""
    out: dict[str, Capability] = {}
    attempts: dict[str, asyncio.Task[str | None]] = {}
    for mode, needs in NEEDS.items():
        off = [f for f in needs if not criu.features.get(f, False)]
        if off:
            out[mode] = Capability(False, off[0], f"`criu check --feature {off[0]}` fails")
        elif mode == "pre_dump":
            attempts[mode] = asyncio.ensure_future(attempt(criu, scratch, ["pre-dump"]))
        elif mode == "post_copy_migration":
            # A remote lazy dump waits for its client before it moves a page,
            # so a lone attempt cannot tell; criud does not offer it either.
            out[mode] = Capability(False, "post-copy", _NO_POST_COPY)
        else:
            out[mode] = Capability(True)
    for mode, task in attempts.items():
        err = await task
        feature = "mem_dirty_track" if mode == "pre_dump" else "uffd-noncoop"
        out[mode] = Capability(True) if err is None else Capability(False, feature, err)
    out["clones"] = _clones()
    log.info("kernel capabilities: %s", {m: c.supported for m, c in out.items()})
    return out


def _clones() -> Capability:
    """Clones need pid namespaces (each copy gets a fresh one, its root pid 1)."""
    if os.path.exists("/proc/self/ns/pid"):
        return Capability(True)
    return Capability(False, "pidns", "the kernel has no pid namespaces")


async def attempt(criu: Criu, scratch: Path, args: Sequence[str]) -> str | None:
    """Run `criu ARGS -t CHILD` on a throwaway sleeping child; None if it works, else why.

    A run still going after ATTEMPT_S got past where the kernel refuses (a
    post-copy dump then waits for its client): it counts as working.  The
    child and criu are killed and reaped, the scratch images removed.
    """
    work = Path(tempfile.mkdtemp(prefix="probe-", dir=scratch))
    # A session leader: criu refuses a task whose session is outside its
    # pid namespace (CI enters one without setsid).
    child = await criu.spawn_plain(["sleep", "60"], start_new_session=True)
    try:
        target = ["-t", str(child.pid), "-D", str(work), "-o", "-", "-v1"]
        cmd = [criu.path, *args, "--no-default-config", *target]
        proc = await criu.spawn_plain(cmd, capture=True)
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), ATTEMPT_S)
        except TimeoutError:
            return None
        finally:
            await criu.end(proc)
        if proc.returncode == 0:
            return None
        return _why(out.decode("utf-8", "replace"), proc.returncode)
    finally:
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signal.SIGKILL)
        await criu.end(child)
        await asyncio.to_thread(shutil.rmtree, work, True)


def _why(log_text: str, rc: int | None) -> str:
    """The first error lines of a failed attempt, for the capability's reason."""
    errors = [ln.strip() for ln in log_text.splitlines() if "Error" in ln or "FAIL" in ln]
    errors = [e for e in errors if "RLIMIT_NOFILE" not in e]
    shown = "; ".join(e.split("): ", 1)[-1] for e in errors[:2])
    return f"a real attempt failed (criu exited {rc}): {shown or 'no error logged'}"
