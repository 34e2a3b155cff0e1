"""How criud's dump overhead grows with fds and with tasks, against raw criu.

Trees made by bench/workloads.py's TREE (N processes, each holding M fds:
pipes, socketpairs and regular files).  Two axes, one tree per point:

- fds: one process holding 10, 1,000 and 10,000 fds;
- tasks: 1, 10 and 100 processes of 10 fds each (a Python parent, its
  children `sleep`s holding the fds they inherited).

Each round dumps the same tree (`leave_running`, so it is dumped again and
again) once with raw criu, `criu dump` with the argv criud builds
(criud.dump.argv), and once through criud (`POST /v1/checkpoints`, its
answer read and decoded as a client does), the order alternating per
round.  The figure is the median over rounds of each round's criud/raw
ratio (paired), and the medians of both sides.  Images go to tmpfs
(/dev/shm) on both sides; deleting a checkpoint is not timed.

`make bench`'s "scaling" section (`bench/bench.py --only scaling`), with a
chart next to docs/benchmarks.png (docs/benchmarks-scaling.png).
Standalone, also against another checkout's code in the same run:

    python bench/scaling_bench.py [--rounds 10] [--compare-python /work/main/.venv/bin/python]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import _repo  # noqa: F401  (puts the repo on sys.path)
import workloads

from criud.api.client import Client
from criud.daemon.criu import read_log
from criud.dump.argv import DUMP_LOG, dump_argv
from criud.dump.options import DumpOptions
from tests.integration.helpers import CRIU, Daemon

HERE = Path(__file__).resolve().parent
# (axis, processes, fds each): the fds axis holds one process, the tasks
# axis 10 fds per process.  (1, 10) is on both axes and measured once.
POINTS: tuple[tuple[int, int], ...] = ((1, 10), (1, 1000), (1, 10000), (10, 10), (100, 10))
FDS_AXIS = ((1, 10), (1, 1000), (1, 10000))
TASKS_AXIS = ((1, 10), (10, 10), (100, 10))
# The goals (criud/raw, median of pairs).
GOALS = {(1, 10000): 1.15, (100, 10): 1.05}


class _OtherDaemon(Daemon):
    """A daemon run by another interpreter (another checkout's venv): old code vs new."""

    def __init__(self, root: Path, python: str, args: Sequence[str] = ()) -> None:
        super().__init__(root, args=args)
        self.python = python

    def cli(self, *args: str) -> list[str]:
        base = [self.python, "-m", "criud.daemon.cli"]
        return [*base, "--socket", str(self.socket), "--fd-socket", str(self.fd_socket), *args]


@contextlib.contextmanager
def _daemon(root: Path, python: str | None = None) -> Iterator[Daemon]:
    root.mkdir(parents=True)
    args = ["--log-level", "warning"]
    d = Daemon(root, args=args) if python is None else _OtherDaemon(root, python, args)
    d.start(60)
    try:
        yield d
    finally:
        d.stop()


def _raw(criu: str, pid: int, images: Path) -> float:
    """`criu dump --leave-running` with criud's argv; seconds."""
    images.mkdir(mode=0o700)
    argv = dump_argv(pid, images, DumpOptions(leave_running=True))
    fd = os.open(images / DUMP_LOG, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        t0 = time.perf_counter()
        rc = subprocess.run(
            [criu, *argv], stdin=subprocess.DEVNULL, stdout=fd, stderr=fd, close_fds=True
        ).returncode
        t = time.perf_counter() - t0
    finally:
        os.close(fd)
    if rc != 0:
        raise RuntimeError(f"raw criu dump exited {rc}: {read_log(images / DUMP_LOG)}")
    shutil.rmtree(images)
    return t


def _criud(c: Client, pid: int) -> tuple[float, int]:
    """POST /v1/checkpoints (leave_running), answer decoded; (seconds, answer bytes)."""
    t0 = time.perf_counter()
    rec = c.checkpoint(pid, leave_running=True)
    t = time.perf_counter() - t0
    size = len(json.dumps(rec))
    c.delete(rec["id"])
    return t, size


def _tree(procs: int, fds: int, scratch: Path) -> subprocess.Popen[bytes]:
    # Children exec `sleep` with their fds: what grows is tasks, not memory.
    return workloads.start(workloads.TREE, str(procs), str(fds), str(scratch), "light")


def _stop(p: subprocess.Popen[bytes]) -> None:
    """The TREE kills and reaps its children on SIGTERM; then it is reaped here."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(p.pid, signal.SIGTERM)
    try:
        p.wait(30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)  # its own session and group
        p.wait(30)


def _point(
    sides: dict[str, Client], criu: str, procs: int, fds: int, rounds: int, base: Path
) -> dict[str, Any]:
    """One tree, `rounds` interleaved rounds of every side."""
    scratch = workloads.scratch_dir(base, f"files-{procs}x{fds}")
    p = _tree(procs, fds, scratch)
    times: dict[str, list[float]] = {"raw": [], **{s: [] for s in sides}}
    size: dict[str, int] = {}
    try:
        order = list(times)
        for s in sides:  # one untimed warm-up each (pool refill, page cache)
            _criud(sides[s], p.pid)
        _raw(criu, p.pid, base / "warm")
        for i in range(rounds):
            for side in order[i % len(order) :] + order[: i % len(order)]:
                if side == "raw":
                    times[side].append(_raw(criu, p.pid, base / f"raw-{i}"))
                else:
                    t, size[side] = _criud(sides[side], p.pid)
                    times[side].append(t)
    finally:
        _stop(p)
        shutil.rmtree(scratch, ignore_errors=True)
    out: dict[str, Any] = {"procs": procs, "fds_each": fds, "rounds": rounds}
    for side, ts in times.items():
        out[f"{side}_median_ms"] = round(statistics.median(ts) * 1000, 1)
        out[f"{side}_samples_ms"] = [round(t * 1000, 1) for t in ts]
        if side != "raw":
            ratios = [t / r for t, r in zip(ts, times["raw"], strict=True)]
            out[f"{side}_ratio"] = round(statistics.median(ratios), 3)
            added = [t - r for t, r in zip(ts, times["raw"], strict=True)]
            out[f"{side}_added_ms"] = round(statistics.median(added) * 1000, 1)
            out[f"{side}_answer_bytes"] = size[side]
    return out


def run(criu: str, rounds: int, base: Path, compare_python: str | None = None) -> dict[str, Any]:
    """Every point; the criud side, and with compare_python also "other" (its code)."""
    out: dict[str, Any] = {"loadavg_start": [round(x, 2) for x in os.getloadavg()]}
    with contextlib.ExitStack() as stack:
        sides = {"criud": stack.enter_context(_daemon(base / "d")).client}
        if compare_python is not None:
            other = stack.enter_context(_daemon(base / "d-other", compare_python))
            sides["other"] = other.client
            out["other_python"] = compare_python
        for c in sides.values():
            c.timeout = 600
        out["points"] = [_point(sides, criu, n, m, rounds, base) for n, m in POINTS]
    out["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    return out


def bench_section(cfg: dict[str, Any], env: dict[str, Any], base: Path) -> dict[str, Any]:
    """bench.py's "scaling" section."""
    root = Path(tempfile.mkdtemp(prefix="scaling-", dir=base))
    try:
        return run(env["criu"], cfg["scaling_rounds"], root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _find(r: dict[str, Any], procs: int, fds: int) -> dict[str, Any]:
    return next(p for p in r["points"] if (p["procs"], p["fds_each"]) == (procs, fds))


def _what(procs: int, fds: int) -> str:
    return f"{procs * fds:,} fds in one process" if procs == 1 else f"{procs} tasks x {fds} fds"


def targets(r: dict[str, Any]) -> list[tuple[str, float, str, bool, str]]:
    """(name, value, goal, met, unit) rows for bench.py's targets table."""
    out = []
    for (procs, fds), goal in GOALS.items():
        v = _find(r, procs, fds)["criud_ratio"]
        name = f"scaling: dump of {_what(procs, fds)}, criud / raw criu (median of pairs)"
        out.append((name, v, f"<= {goal}", v <= goal, "x"))
    return out


def markdown(r: dict[str, Any]) -> list[str]:
    """The section's lines in docs/benchmarks.md."""
    other = "other_ratio" in r["points"][0]
    out = [
        "**Scaling with fds and tasks**: the same tree dumped again and again "
        "(`leave_running`), raw `criu dump` with criud's argv vs `POST /v1/checkpoints` "
        "(answer decoded), interleaved; medians, ratio and added time are medians of the "
        f"pairs; load average {r['loadavg_start']} → {r['loadavg_end']}.",
        "",
        "| tree | rounds | raw criu | criud | criud / raw | criud adds | answer |"
        + (" other code | other / raw | other's answer |" if other else ""),
        "|---|---:|---:|---:|---:|---:|---:|" + ("---:|---:|---:|" if other else ""),
    ]
    for p in r["points"]:
        row = (
            f"| {_what(p['procs'], p['fds_each'])} | {p['rounds']} | {p['raw_median_ms']} ms | "
            f"{p['criud_median_ms']} ms | {p['criud_ratio']:.3f} | {p['criud_added_ms']} ms | "
            f"{p['criud_answer_bytes']:,} B |"
        )
        if other:
            row += (
                f" {p['other_median_ms']} ms | {p['other_ratio']:.3f} | "
                f"{p['other_answer_bytes']:,} B |"
            )
        out.append(row)
    out += ["", "![dump time by fds and by tasks](benchmarks-scaling.png)", ""]
    return out


def chart(r: dict[str, Any], path: Path) -> None:
    """Dump time by fds and by tasks: raw criu vs criud (and the other code if run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    sides = [("raw", "raw criu", "-", "o"), ("criud", "criud", "--", "s")]
    if "other_ratio" in r["points"][0]:
        sides.append(("other", r.get("other_label", "criud, other code"), ":", "^"))
    for ax, axis, xlabel in (
        (axes[0], FDS_AXIS, "fds in one process"),
        (axes[1], TASKS_AXIS, "processes (10 fds each)"),
    ):
        pts = [_find(r, n, m) for n, m in axis]
        xs = [n * m if axis is FDS_AXIS else n for n, m in axis]
        for side, label, style, marker in sides:
            ys = [p[f"{side}_median_ms"] for p in pts]
            lo = [y - min(p[f"{side}_samples_ms"]) for y, p in zip(ys, pts, strict=True)]
            hi = [max(p[f"{side}_samples_ms"]) - y for y, p in zip(ys, pts, strict=True)]
            ax.errorbar(xs, ys, yerr=[lo, hi], capsize=3, label=label, ls=style, marker=marker)
        for x, p in zip(xs, pts, strict=True):
            ax.annotate(
                f"x{p['criud_ratio']:.2f}",
                (x, p["criud_median_ms"]),
                textcoords="offset points",
                xytext=(4, 6),
                fontsize=8,
            )
        ax.set_xscale("log")
        ax.set_xticks(xs)
        ax.set_xticklabels([f"{x:,}" for x in xs])
        ax.set_ylim(bottom=0)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("dump, ms (lower is better)")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8, loc="best")
    fig.suptitle(
        "criu dump (leave-running) through criud vs raw criu: median of "
        f"{r['points'][0]['rounds']} interleaved rounds, bars min to max, labels criud/raw "
        f"(load {r['loadavg_start'][0]} → {r['loadavg_end'][0]})",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--criu", default=CRIU)
    p.add_argument("--compare-python", help="also run a daemon with this interpreter's criud")
    p.add_argument("--compare-label", default="criud, other code", help="its name in the chart")
    p.add_argument("--out-dir", type=Path, default=HERE / "results")
    p.add_argument("--chart", type=Path, help="write the chart here")
    a = p.parse_args()
    base = Path(tempfile.mkdtemp(prefix="criud-bench-", dir="/dev/shm"))
    try:
        r = run(a.criu, a.rounds, base, a.compare_python)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    r["date"] = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    if a.compare_python:
        r["other_label"] = a.compare_label
    a.out_dir.mkdir(parents=True, exist_ok=True)
    out = a.out_dir / f"{r['date'][:10]}-scaling.json"
    out.write_text(json.dumps(r, indent=1) + "\n")
    print("\n".join(markdown(r)))
    if a.chart is not None:
        chart(r, a.chart)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
