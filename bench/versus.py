"""A small dump + restore: raw criu, criud from another checkout, criud from this one; paired.

    python bench/versus.py OTHER_PYTHON [ROUNDS]

OTHER_PYTHON is the interpreter of another checkout's venv, with that
checkout installed in it (`pip install --no-deps -e .`), e.g. the commit a
change started from.  Each round runs the three sides back to back in a
rotating order on fresh `sleep`s; the answer is each side's median, its
median paired difference to raw criu, and the median of (this - other)
per round.  Run as root.
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import _repo  # noqa: F401  (puts the repo on sys.path)

from bench import (
    TRACK,
    Daemon,
    _small_cycle,
    loadavg,
    raw_small_cycle,
)


class OtherDaemon(Daemon):
    """The daemon of another checkout: its own interpreter runs `criud.daemon.cli`."""

    python = ""

    def cli(self, *args: str) -> list[str]:
        sockets = ["--socket", str(self.socket), "--fd-socket", str(self.fd_socket)]
        return [self.python, "-m", "criud.daemon.cli", *sockets, *args]


def main() -> int:
    OtherDaemon.python = sys.argv[1]
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 30
    criu = shutil.which("criu") or "/usr/local/sbin/criu"
    root = Path(tempfile.mkdtemp(prefix="versus-", dir="/dev/shm"))
    load = [loadavg()]
    other, this = OtherDaemon(root / "other", criu), Daemon(root / "this", criu)
    other.start()
    this.start()
    ms: dict[str, list[float]] = {"raw": [], "other": [], "this": []}
    try:
        co, ct = other.new_client(), this.new_client()
        time.sleep(0.5)  # the pools' first workers
        for _ in range(2):
            _small_cycle(co)
            _small_cycle(ct)
        for i in range(rounds):
            sides: list[tuple[str, Callable[[], float]]] = [
                ("raw", lambda i=i: raw_small_cycle(criu, root, i)),  # type: ignore[misc]
                ("other", lambda: _small_cycle(co)),
                ("this", lambda: _small_cycle(ct)),
            ]
            k = i % 3
            for name, run in sides[k:] + sides[:k]:
                ms[name].append(run() * 1e3)
                time.sleep(0.03)
    finally:
        other.stop()
        this.stop()
        TRACK.kill_all()
        shutil.rmtree(root, ignore_errors=True)
    load.append(loadavg())

    def paired(a: str, b: str) -> float:
        return round(statistics.median(x - y for x, y in zip(ms[a], ms[b], strict=True)), 2)

    out = {
        "rounds": rounds,
        "median_ms": {k: round(statistics.median(v), 2) for k, v in ms.items()},
        "added_over_raw_ms": {k: paired(k, "raw") for k in ("other", "this")},
        "this_minus_other_ms": paired("this", "other"),
        "load": load,
    }
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
