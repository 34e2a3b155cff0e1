"""criud's own /proc readers against psutil, call for call (issue 13).

Each reader the daemon keeps is paired with the psutil call that answers
the same question, and timed in interleaved rounds (the order alternates
each round) so that load from other work on the machine falls on both
sides alike.  The figure is the median over rounds of µs per call, and the
ratio of the medians.  Targets: this process (one thread), a child with
threads, and a parent with a few children, so the walk readers see a real
tree while the machine's other processes are there for psutil's scans.

Run as root, from the repository: `.venv/bin/python bench/proc_readers.py [CALLS] [ROUNDS]`
(CALLS per round and side, 10,000 by default; 9 rounds).  The comments at
the readers kept in daemon/procutil.py, daemon/creds.py and dump/inspect.py
name the row of this bench that keeps them.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import _repo  # noqa: F401  (puts the repo on sys.path)
import psutil

from criud.daemon import creds, procutil
from criud.dump import fds, inspect

# A process with 4 threads and 3 children, each child with 4 threads too.
_TREE = r"""
import os, sys, threading, time
def idle():
    time.sleep(3600)
for _ in range(3):
    threading.Thread(target=idle, daemon=True).start()
if sys.argv[1] == "root":
    for _ in range(3):
        if os.fork() == 0:
            for _ in range(3):
                threading.Thread(target=idle, daemon=True).start()
            time.sleep(3600)
print("ready", flush=True)
time.sleep(3600)
"""


def _psutil_tree_ids(pid: int) -> dict[int, tuple[tuple[int, ...], tuple[int, ...]]]:
    """What psutil can say of creds.read_tree's question: r/e/s uids and gids per thread."""
    out: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    root = psutil.Process(pid)
    for p in [root, *root.children(recursive=True)]:
        for t in p.threads():
            task = psutil.Process(t.id)
            out[t.id] = (tuple(task.uids()), tuple(task.gids()))
    return out


def _psutil_ppid_uids(pid: int) -> tuple[int, object]:
    """procutil.not_our_child's reads, as psutil would do them (one Process, one shot)."""
    p = psutil.Process(pid)
    with p.oneshot():
        return p.ppid(), p.uids()


def _psutil_task(pid: int) -> dict[str, object]:
    """What psutil can give of inspect's per-task read (no namespaces, cgroups, NSpid)."""
    p = psutil.Process(pid)
    with p.oneshot():
        return {
            "ppid": p.ppid(),
            "comm": p.name(),
            "cmdline": p.cmdline(),
            "state": p.status(),
            "uids": p.uids(),
            "gids": p.gids(),
            "threads": p.num_threads(),
            "tty": p.terminal(),
            "memory": p.memory_info(),
        }


def _pairs(me: int, tree: int) -> dict[str, tuple[Callable[[], object], Callable[[], object]]]:
    """Each row: (criud's reader, the psutil call that answers the same)."""
    ns = inspect.own_namespaces()
    return {
        "start_time": (lambda: procutil.proc_start(me), lambda: psutil.Process(me).create_time()),
        "state": (lambda: procutil.proc_state(me), lambda: psutil.Process(me).status()),
        "ppid": (lambda: fds._ppid(me), lambda: psutil.Process(me).ppid()),
        "uids": (
            lambda: procutil.status_ids(me, "Uid"),
            lambda: psutil.Process(me).uids(),
        ),
        "ppid_uids": (
            lambda: (procutil.stat_fields(me)[1], procutil.status_ids(me, "Uid")),
            lambda: _psutil_ppid_uids(me),
        ),
        "task": (lambda: inspect._read_task(me, ns), lambda: _psutil_task(me)),
        "tids": (lambda: fds._tids(tree), lambda: [t.id for t in psutil.Process(tree).threads()]),
        "children": (lambda: procutil.children(tree), lambda: psutil.Process(tree).children()),
        "memory": (lambda: inspect.memory_of(me), lambda: psutil.Process(me).memory_info()),
        "tree_creds": (lambda: creds.read_tree(tree), lambda: _psutil_tree_ids(tree)),
    }


# The walks cost far more per call than one file read: fewer calls per round.
_SCALE = {"tids": 10, "children": 10, "tree_creds": 50}


def _time(fn: Callable[[], object], n: int) -> float:
    """µs per call of fn over n calls."""
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e6


def _spawn_tree() -> subprocess.Popen[str]:
    p = subprocess.Popen(
        [sys.executable, "-c", _TREE, "root"],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    return p


def main() -> None:
    calls = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 9
    load_before = os.getloadavg()
    tree = _spawn_tree()
    try:
        rows = {}
        for name, (own, ps) in _pairs(os.getpid(), tree.pid).items():
            n = max(calls // _SCALE.get(name, 1), 10)
            own_us: list[float] = []
            ps_us: list[float] = []
            for r in range(rounds):
                if r % 2:
                    ps_us.append(_time(ps, n))
                    own_us.append(_time(own, n))
                else:
                    own_us.append(_time(own, n))
                    ps_us.append(_time(ps, n))
            o, p = statistics.median(own_us), statistics.median(ps_us)
            rows[name] = {"calls": n, "own_us": round(o, 2), "psutil_us": round(p, 2)}
            rows[name]["psutil_over_own"] = round(p / o, 2)
            print(f"{name:12} own {o:9.2f} µs  psutil {p:9.2f} µs  x{p / o:.2f}  ({n} calls)")
    finally:
        os.killpg(tree.pid, 9)
        tree.wait()
    out = {
        "processes_on_host": len(psutil.pids()),
        "psutil": psutil.__version__,
        "rounds": rounds,
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "rows": rows,
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
