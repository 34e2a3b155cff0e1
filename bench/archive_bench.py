"""The archive section of `make bench`: export and import against tar and zstd.

A process of `archive_mib` MiB (random pages) is checkpointed once through a
daemon whose state dir is on tmpfs.  Then, `archive_reps` times, interleaved
(the order swapped each rep, so slow spells of the machine hit both):

- export: `GET /v1/checkpoints/{id}/archive` (zstd level 1), read to the
  end by the stdlib client into a sink, against `tar -C <images dir> -cf - .
  | zstd -1 -T0 > /dev/null` on the very same files; the daemon's RSS is
  sampled every 10 ms during the export (growth: peak minus before);
- import: `POST /v1/checkpoints/import` of that export (a tmpfs file, sent
  with Content-Length, no digest), against `zstd -d -c FILE | tar -x -C
  <tmpfs dir>`.

Throughput is the checkpoint's image bytes over the wall time; the ratios
are medians of each rep's criud/reference pair.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import workloads

from criud.api.client import Client
from tests.integration.helpers import Daemon


class _Sink(io.RawIOBase):
    """A file that drops what it is given (the export's reader keeps nothing)."""

    def write(self, b: Any) -> int:
        return len(b)


class _Rss:
    """The peak VmRSS (MiB) of a pid, sampled in a thread until stopped."""

    def __init__(self, pid: int, period: float = 0.01) -> None:
        self.pid, self.period = pid, period
        self.peak = self.now()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def now(self) -> float:
        with open(f"/proc/{self.pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.peak = max(self.peak, self.now())

    def __enter__(self) -> _Rss:
        self._t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._t.join()


def _timed(argv: str) -> float:
    t0 = time.perf_counter()
    subprocess.run(["bash", "-o", "pipefail", "-c", argv], check=True)
    return time.perf_counter() - t0


def _export(c: Client, ck: str, d: Daemon) -> tuple[float, float, float, int]:
    """(seconds, RSS before, RSS peak, bytes) of one zstd export read to its end."""
    with _Rss(d.pid) as rss:
        before = rss.peak
        t0 = time.perf_counter()
        n = c.export(ck, _Sink(), "zstd")
        took = time.perf_counter() - t0
    return took, before, rss.peak, n


def _import(c: Client, blob: Path) -> tuple[float, str]:
    with open(blob, "rb") as f:
        t0 = time.perf_counter()
        ck = c.import_archive(f, size=os.fstat(f.fileno()).st_size)
        took = time.perf_counter() - t0
    return took, str(ck["id"])


def _checkpoint(c: Client, mib: int) -> dict[str, Any]:
    p = workloads.start(workloads.FILL, str(mib))
    try:
        ck = c.checkpoint(p.pid)
    finally:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
    return ck


def _pairs(rows: dict[str, list[float]], a: str, b: str) -> float:
    return round(statistics.median(x / y for x, y in zip(rows[a], rows[b], strict=True)), 3)


def bench_archive(cfg: dict[str, Any], env: dict[str, Any], base: Path) -> dict[str, Any]:
    """Export and import of a checkpoint of archive_mib MiB, against tar and zstd."""
    mib, reps = cfg["archive_mib"], cfg["archive_reps"]
    root = Path(tempfile.mkdtemp(prefix="archive-", dir=base))
    d = Daemon(root / "d", env["criu"], args=["--log-level", "warning"])
    (root / "d").mkdir()
    d.start(60)
    try:
        c = Client(str(d.socket), str(d.fd_socket), timeout=600)
        ck = _checkpoint(c, mib)
        images = d.state_dir / "checkpoints" / ck["id"]
        size = int(ck["size_bytes"])
        blob = root / "export.tar.zst"
        with open(blob, "wb") as f:
            c.export(ck["id"], f, "zstd")
        rows: dict[str, list[float]] = {k: [] for k in ("export", "tar_zstd", "import", "unzstd")}
        rss_growth: list[float] = []
        out_dir = root / "untar"
        for rep in range(reps):
            for side in ("criud", "ref") if rep % 2 == 0 else ("ref", "criud"):
                if side == "criud":
                    took, before, peak, _ = _export(c, ck["id"], d)
                    rows["export"].append(took)
                    rss_growth.append(round(peak - before, 1))
                    took, imp = _import(c, blob)
                    rows["import"].append(took)
                    c.delete(imp)
                else:
                    rows["tar_zstd"].append(
                        _timed(f"tar -C {images} -cf - . | zstd -q -1 -T0 > /dev/null")
                    )
                    out_dir.mkdir()
                    rows["unzstd"].append(_timed(f"zstd -q -d -c {blob} | tar -x -C {out_dir}"))
                    shutil.rmtree(out_dir)
        med = {k: statistics.median(v) for k, v in rows.items()}
        gbps = {k: round(size / v / 1e9, 3) for k, v in med.items()}
        return {
            "mib": mib,
            "reps": reps,
            "image_bytes": size,
            "archive_bytes": blob.stat().st_size,
            "median_s": {k: round(v, 3) for k, v in med.items()},
            "gbps": gbps,
            # Throughput ratio criud/reference = time ratio reference/criud.
            "export_ratio": _pairs(rows, "tar_zstd", "export"),
            "import_ratio": _pairs(rows, "unzstd", "import"),
            "rss_growth_mib": rss_growth,
            "rss_growth_max_mib": max(rss_growth),
            "samples_s": {k: [round(x, 3) for x in v] for k, v in rows.items()},
        }
    finally:
        d.stop()
        shutil.rmtree(root, ignore_errors=True)


def targets(a: dict[str, Any]) -> list[tuple[str, float, str, bool, str]]:
    """(name, value, goal, met, unit) of the issue's archive goals."""
    size = f"{a['mib']} MiB" if a["mib"] < 1024 else f"{a['mib'] // 1024} GiB"
    return [
        (
            f"archive: export of {size} (zstd -1) / tar piped to zstd -1 -T0, throughput",
            a["export_ratio"],
            ">= 0.9",
            a["export_ratio"] >= 0.9,
            "x",
        ),
        (
            "archive: daemon RSS growth during the export (max)",
            a["rss_growth_max_mib"],
            "< 64",
            a["rss_growth_max_mib"] < 64,
            "MiB",
        ),
        (
            f"archive: import of {size} / zstd -d piped to tar -x, throughput",
            a["import_ratio"],
            ">= 0.9",
            a["import_ratio"] >= 0.9,
            "x",
        ),
    ]


def markdown(a: dict[str, Any]) -> list[str]:
    """The section's paragraph and table."""
    m, g = a["median_s"], a["gbps"]
    return [
        f"**7. Archives**: a checkpoint of {a['mib']} MiB ({a['image_bytes']} bytes of images, "
        f"{a['archive_bytes']} as zstd), state dir on tmpfs, {a['reps']} interleaved reps; "
        "medians, GB/s of image bytes.",
        "",
        "| side | median s | GB/s |",
        "|---|---:|---:|",
        f"| criud export (zstd -1, read by the client) | {m['export']} | {g['export']} |",
        f"| `tar -cf - . \\| zstd -1 -T0 > /dev/null` | {m['tar_zstd']} | {g['tar_zstd']} |",
        f"| criud import (body from a tmpfs file) | {m['import']} | {g['import']} |",
        f"| `zstd -d -c \\| tar -x` | {m['unzstd']} | {g['unzstd']} |",
        "",
        f"Export/reference throughput {a['export_ratio']}x, import/reference "
        f"{a['import_ratio']}x (medians of paired reps); the daemon's RSS grew by "
        f"{', '.join(map(str, a['rss_growth_mib']))} MiB during the exports.",
        "",
    ]
