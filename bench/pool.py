"""The warm criu pool (issue 13): a small dump + restore, raw criu vs criud with and without it.

Each round runs the three sides back to back in a rotating order (raw
`criu` with criud's own argv and a warm kdat cache, criud with its warm
pool, criud with --criu-pool 0) on a fresh `sleep` each; the figure is the
median over rounds of each round's difference to raw criu (paired), beside
the plain medians.  Run as root: `.venv/bin/python bench/pool.py [ROUNDS]`.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _repo  # noqa: F401  (puts the repo on sys.path)

from bench import (
    TRACK,
    Daemon,
    _small_cycle,
    loadavg,
    raw_small_cycle,
    spawn_sleep,
)


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 30
    criu = shutil.which("criu") or "/usr/local/sbin/criu"
    root = Path(tempfile.mkdtemp(prefix="pool-", dir="/dev/shm"))
    load_before = loadavg()
    pool = Daemon(root / "pool", criu)
    cold = Daemon(root / "nopool", criu)
    cold.args += ["--criu-pool", "0"]
    pool.start()
    cold.start()
    sides: dict[str, list[float]] = {"raw": [], "pool": [], "nopool": []}
    try:
        cp, cn = pool.new_client(), cold.new_client()
        time.sleep(0.5)  # the pool's first workers
        for i in range(rounds + 2):
            order = ["raw", "pool", "nopool"]
            order = order[i % 3 :] + order[: i % 3]
            got = {}
            for side in order:
                if side == "raw":
                    got[side] = raw_small_cycle(criu, root, i)
                else:
                    got[side] = _small_cycle(cp if side == "pool" else cn, spawn_sleep())
                # Let the pool refill off the measured path, as between requests.
                time.sleep(0.1)
            if i >= 2:  # two warm-up rounds
                for k, v in got.items():
                    sides[k].append(v * 1000)
    finally:
        pool.stop()
        cold.stop()
        TRACK.kill_all()
        shutil.rmtree(root, ignore_errors=True)
    med = {k: round(statistics.median(v), 2) for k, v in sides.items()}
    paired = {
        k: round(statistics.median(a - b for a, b in zip(sides[k], sides["raw"], strict=True)), 2)
        for k in ("pool", "nopool")
    }
    out = {
        "rounds": rounds,
        "median_ms": med,
        "paired_added_ms": paired,
        "load_before": load_before,
        "load_after": loadavg(),
        "cpus": os.cpu_count(),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
