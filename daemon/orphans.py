"""What a restore leaves behind when the daemon dies under it, and its removal.

criu runs under setpriv --pdeathsig KILL, so a SIGKILLed daemon takes criu
with it; but the tasks criu had already forked stay, frozen in criu's
restorer with their memory half filled, reparented to init, and their pids
block every later restore of the same images (pid_in_use).

So before criu runs, a restore records a plan: the pids the restore will
create (the image's pids, for trees whose pids are kept), when it began, in
the clock /proc/<pid>/stat's starttime uses (clock ticks since boot), and
the uids its tasks may hold; then criu's own pid and start once spawned.
At start-up the daemon kills, through pidfds, the tasks that match that
plan: one of the recorded pids, started after the restore began (after
criu started, when that is known), whose real, effective and saved uids are
all among the recorded ones.  A process that merely reused such a pid
started earlier, or as someone else, is left alone; so is one that could
become another uid again (a saved uid of 0): it is no task criu restored,
since each of those holds criu's uid or its recorded ones.

Not covered: a tree rooted in its own pid namespace (manifest pidns_init)
gets host pids criu reports only once it is done, so none are known before
criu runs.  Once criu is dead nothing ties the leftover tasks to this
restore (they were reparented; their sessions and pids are namespace-local),
and guessing by start time and uid could kill an unrelated process, so such
leftovers are not killed; the record says so.  criu itself, if still alive,
is killed when its pid and start time match.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

from criud.daemon import procutil


def boot_ticks() -> int:
    """Now, in the clock of /proc/<pid>/stat's starttime: clock ticks since boot."""
    hz = os.sysconf("SC_CLK_TCK")
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME) * hz // 1_000_000_000


def plan(pids: Sequence[int], uids: Iterable[int], pidns: bool) -> dict[str, Any]:
    """What to record before criu runs, to recognise the restore's tasks later."""
    return {
        "pids": sorted(pids),
        "uids": sorted(set(uids)),
        "since": boot_ticks(),
        "pidns": pidns,
    }


def _ids_and_parent(pid: int) -> tuple[set[int], int] | None:
    """pid's real, effective and saved uids and its parent; None if it is gone or unreadable."""
    # psutil: a cold path (a cancel, or start-up after a crash), and uids()
    # gives the saved uid with the others.  It reads /proc/<pid>/{stat,status}
    # only (psutil.PROCFS_PATH, which nothing here changes), no path a caller
    # names.  Its errors are what an OSError was before: not ours, not killed.
    # Imported here, not at the top: 10-20 ms and about 0.5 MiB the daemon's
    # start-up would pay for a path most runs never take (python -X importtime).
    import psutil

    try:
        p = psutil.Process(pid)
        with p.oneshot():
            return set(p.uids()), p.ppid()
    except (psutil.Error, OSError, ValueError):
        return None


def _is_ours(pid: int, since: int, uids: set[int], parents: Collection[int]) -> bool:
    """Whether pid is a task the restore made: see the module's docstring."""
    start = procutil.proc_start(pid)
    if start is None or start < since:
        return False
    task = _ids_and_parent(pid)
    if task is None:
        return False
    ids, ppid = task
    return ids <= uids and (not parents or ppid in parents)


def _kill_pinned(pid: int, check: Any) -> int | None:
    """SIGKILL pid through a pidfd if check(pid) holds once pinned; its start, or None."""
    try:
        fd = procutil.pidfd_open(pid)
    except (ProcessLookupError, OSError):
        # Gone, or a thread that is not a group leader (EINVAL): its leader
        # is in the list too, and takes its threads with it.
        return None
    try:
        # Checked after the pidfd pins the process: a pid reused between the
        # check and the kill cannot be hit.
        start = procutil.proc_start(pid)
        if start is None or not check(pid):
            return None
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(fd, signal.SIGKILL)
        return start
    finally:
        os.close(fd)


def kill_leftovers(
    info: Mapping[str, Any], timeout_s: float, parents: Collection[int] = ()
) -> tuple[list[int], list[int]]:
    """Kill what a killed restore left; return (killed pids, pids still there at timeout).

    parents, when given (a restore cancelled under a running daemon: the
    daemon's own pid, the subreaper criu's orphans went to), is a further
    check: a task is the restore's only if its parent is one of them or
    another of the recorded pids, so a process someone else forked onto a
    recorded pid while criu ran is never hit.  After a crash nothing
    reliable is left to compare with, and it is not given.
    """
    killed: dict[int, int] = {}
    criu_pid, criu_start = info.get("criu_pid"), info.get("criu_start")
    if criu_pid is not None and criu_start is not None:
        # criu normally died with the daemon (pdeathsig); without setpriv it
        # may not have.  Only the very process: same pid, same start.
        start = _kill_pinned(int(criu_pid), lambda p: procutil.proc_start(p) == criu_start)
        if start is not None:
            killed[int(criu_pid)] = start
    # The restored tasks are forked by criu: none started before it did.
    since = int(criu_start if criu_start is not None else info.get("since", 0))
    uids = {int(u) for u in info.get("uids", ())}
    family = {*parents, *(int(p) for p in info.get("pids", ()))}

    def ours(p: int) -> bool:
        return _is_ours(p, since, uids, family if parents else ())

    for pid in info.get("pids", ()):
        start = _kill_pinned(int(pid), ours)
        if start is not None:
            killed[int(pid)] = start
    # Killed tasks are zombies until init reaps them (about once a second
    # here); their pids are free only then.
    deadline = time.monotonic() + timeout_s
    left = list(killed)
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [p for p in left if procutil.proc_start(p) == killed[p]]
    return sorted(killed), left
