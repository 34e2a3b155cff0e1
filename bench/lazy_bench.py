"""Lazy restore and clones (issue 15): `make bench`'s "lazy" section.

* Lazy restore of a 1 GiB tree: the time from the request until the restored
  tree answers "pong" on the pipe handed in, for criud eager, criud lazy and
  raw `criu lazy-pages` + `criu restore --lazy-pages` (criud's argv), in
  interleaved rounds (rotating order); medians.
* Clones: a tree rooted in its own pid namespace (`unshare --pid --fork
  setsid sh`), restored once against 10 copies at once (`"copies": 10`),
  interleaved pairs; medians.

Standalone: `.venv/bin/python bench/lazy_bench.py [ROUNDS]` (root) prints the
markdown of one run.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _repo  # noqa: F401 - the repo root on sys.path, for the tests' helpers

from criud.api.client import Client
from criud.dump.options import DumpOptions
from criud.restore.argv import restore_argv
from criud.restore.lazy import lazy_pages_argv
from tests.integration.helpers import Daemon

# 1 GiB, every page different; answers "ping" on its stdin/stdout.
BIG = r"""
import os, sys
buf = bytearray(os.urandom(1 << 20)) * (int(sys.argv[1]))
for off in range(0, len(buf), 4096):
    buf[off:off + 8] = off.to_bytes(8, "little")
print("ready", flush=True)
for line in sys.stdin:
    print("pong", flush=True)
"""
NS_TREE = ["unshare", "--pid", "--fork", "--kill-child", "setsid", "sh", "-c", "sleep 100000"]


def _line(fd: int, timeout: float = 120.0) -> bytes:
    buf = b""
    deadline = time.monotonic() + timeout
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise TimeoutError("no line")
        chunk = os.read(fd, 1)
        if not chunk:
            raise EOFError("pipe closed")
        buf += chunk
    return buf


def _gone(pid: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return
        except OSError:
            return
        time.sleep(0.005)
    raise TimeoutError(f"pid {pid} still there")


def _big_checkpoint(c: Client, mib: int) -> tuple[dict[str, Any], list[str]]:
    """Dump the big tree; its checkpoint and its stdin, stdout pipe keys."""
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    p = subprocess.Popen(
        [sys.executable, "-c", BIG, str(mib)],
        stdin=in_r,
        stdout=out_w,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    os.close(in_r)
    os.close(out_w)
    _line(out_r)
    keys = [f"pipe:[{os.fstat(fd).st_ino}]" for fd in (in_w, out_r)]
    ck = c.checkpoint(p.pid)
    p.wait(timeout=60)
    os.close(in_w)
    os.close(out_r)
    return ck, keys


def _answer(in_w: int, out_r: int) -> None:
    os.write(in_w, b"ping\n")
    assert _line(out_r).strip() == b"pong"


def _criud_side(c: Client, ck_id: str, lazy: bool) -> float:
    """Request to answer, criud eager or lazy; the tree killed, the pages all in."""
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    try:
        t0 = time.perf_counter()
        r = c.restore(ck_id, stdio=[in_r, out_w, null], lazy=lazy)
        for fd in (in_r, out_w, null):
            os.close(fd)
        _answer(in_w, out_r)
        took = time.perf_counter() - t0
        if lazy:
            deadline = time.monotonic() + 120
            while not c.get_restore(r["id"])["lazy_done_at"] and time.monotonic() < deadline:
                time.sleep(0.02)
        c.signal(r["id"], "KILL")
        _gone(int(r["pid"]))
        return took
    finally:
        os.close(in_w)
        os.close(out_r)


def _raw_side(criu: str, images: Path, work_root: Path, keys: list[str], i: int) -> float:
    """Request to answer, raw criu lazy-pages + restore --lazy-pages by hand."""
    work = work_root / f"raw-{i}"
    work.mkdir()
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    st_r, st_w = os.pipe()
    log = os.open(work / "lazy.log", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    server = None
    try:
        t0 = time.perf_counter()
        argv = [*lazy_pages_argv(images, work, False), "--status-fd", str(st_w)]
        server = subprocess.Popen([criu, *argv], stdout=log, stderr=log, pass_fds=(st_w,))
        os.close(st_w)
        st_w = -1
        if os.read(st_r, 1) == b"":
            raise RuntimeError("lazy-pages did not start")
        inherit = [
            "--inherit-fd",
            f"fd[{in_r}]:{keys[0]}",
            "--inherit-fd",
            f"fd[{out_w}]:{keys[1]}",
        ]
        rargv = restore_argv(images, DumpOptions(), inherit, work_dir=work, lazy=True)
        subprocess.run(
            [criu, *rargv], stdout=log, stderr=log, pass_fds=(in_r, out_w), check=True, timeout=120
        )
        os.close(in_r)
        os.close(out_w)
        in_r = out_w = -1
        _answer(in_w, out_r)
        took = time.perf_counter() - t0
        server.wait(timeout=120)
        pid = int((work / "restore.pid").read_text())
        os.kill(pid, 9)
        os.waitpid(pid, 0) if _is_child(pid) else _gone(pid)
        return took
    finally:
        if server is not None and server.poll() is None:
            server.kill()
            server.wait()
        for fd in (in_r, in_w, out_r, out_w, st_r, st_w, log):
            if fd >= 0:
                os.close(fd)


def _is_child(pid: int) -> bool:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1]) == os.getpid()
    return False


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def _stats(xs: list[float]) -> dict[str, float]:
    return {"median_ms": round(statistics.median(xs) * 1000, 1), "n": len(xs)}


def _lazy_rounds(c: Client, d: Any, criu: str, base: Path, rounds: int, mib: int) -> dict[str, Any]:
    ck, keys = _big_checkpoint(c, mib)
    images = d.state_dir / "checkpoints" / ck["id"]
    sides: dict[str, list[float]] = {"eager": [], "lazy": [], "raw_lazy": []}
    order = list(sides)
    for i in range(rounds):
        for side in order[i % 3 :] + order[: i % 3]:
            if side == "raw_lazy":
                sides[side].append(_raw_side(criu, images, base, keys, i))
            else:
                sides[side].append(_criud_side(c, ck["id"], side == "lazy"))
    c.delete(ck["id"])
    return {"mib": mib, "rounds": rounds, "sides": {k: _stats(v) for k, v in sides.items()}}


def _clone_rounds(c: Client, rounds: int, n: int) -> dict[str, Any]:
    dn = subprocess.DEVNULL
    u = subprocess.Popen(NS_TREE, stdin=dn, stdout=dn, stderr=dn, start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        kids: list[str] = []
        while not kids and time.monotonic() < deadline:
            with open(f"/proc/{u.pid}/task/{u.pid}/children") as f:
                kids = f.read().split()
            time.sleep(0.01)
        ck = c.checkpoint(int(kids[0]))
        u.wait(timeout=20)
    finally:
        if u.poll() is None:
            u.kill()
            u.wait()
    sides: dict[str, list[float]] = {"one": [], "copies": []}
    for i in range(rounds):
        for side in ("one", "copies") if i % 2 == 0 else ("copies", "one"):
            body = {"checkpoint": ck["id"], **({"copies": n} if side == "copies" else {})}
            t0 = time.perf_counter()
            out = c.request("POST", "/v1/restores", body)[1]
            sides[side].append(time.perf_counter() - t0)
            for r in out["copies"] if side == "copies" else [out]:
                c.signal(r["id"], "KILL")
                _gone(int(r["pid"]))
    c.delete(ck["id"])
    return {"copies": n, "rounds": rounds, "sides": {k: _stats(v) for k, v in sides.items()}}


def bench_lazy(cfg: dict[str, Any], env: dict[str, Any], base: Path) -> dict[str, Any]:
    """Lazy restore of lazy_mib against eager and raw; clones against one restore."""
    root = Path(tempfile.mkdtemp(prefix="lazy-", dir=base))
    (root / "d").mkdir()
    d = Daemon(root / "d", env["criu"], args=["--log-level", "warning"])
    d.start(60)
    try:
        c = Client(str(d.socket), str(d.fd_socket), timeout=600)
        load = loadavg()
        out = {
            "lazy": _lazy_rounds(c, d, env["criu"], root, cfg["lazy_rounds"], cfg["lazy_mib"]),
            "clones": _clone_rounds(c, cfg["clone_rounds"], cfg["clone_copies"]),
            "loadavg_start": load,
            "loadavg_end": loadavg(),
        }
    finally:
        d.stop()
    return out


def markdown(r: dict[str, Any]) -> list[str]:
    """The section's lines in docs/benchmarks.md."""
    lz, cl = r["lazy"], r["clones"]
    s = lz["sides"]
    return [
        f"**Lazy restore and clones**: a {lz['mib']} MiB tree, {lz['rounds']} interleaved "
        "rounds (rotating order), from the restore request until the tree answers on the "
        f"pipe handed in; medians, load average {r['loadavg_start']} → {r['loadavg_end']}.",
        "",
        "| side | median ms |",
        "|---|---:|",
        f"| criud, eager | {s['eager']['median_ms']} |",
        f"| criud, `lazy: true` | {s['lazy']['median_ms']} |",
        f"| raw `criu lazy-pages` + `criu restore --lazy-pages` | {s['raw_lazy']['median_ms']} |",
        "",
        f"Clones of a tree in its own pid namespace (`unshare --pid --fork setsid sh`), "
        f"{cl['rounds']} interleaved pairs: one restore {cl['sides']['one']['median_ms']} ms, "
        f'{cl["copies"]} copies at once (`"copies": {cl["copies"]}`) '
        f"{cl['sides']['copies']['median_ms']} ms (medians).",
        "",
    ]


def targets(r: dict[str, Any]) -> list[tuple[str, float, str, bool, str]]:
    """(name, value, goal, met, unit) rows for the targets table."""
    v = r["lazy"]["sides"]["lazy"]["median_ms"]
    return [(f"lazy restore of {r['lazy']['mib']} MiB: time to answer", v, "< 100", v < 100, "ms")]


if __name__ == "__main__":
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    cfg = {"lazy_rounds": rounds, "lazy_mib": 1024, "clone_rounds": rounds, "clone_copies": 10}
    crit = "/usr/local/sbin/criu"
    with tempfile.TemporaryDirectory(prefix="lazy-bench-", dir="/dev/shm") as tmp:
        res = bench_lazy(cfg, {"criu": crit}, Path(tmp))
    print(json.dumps(res, indent=1))
    print("\n".join(markdown(res)))
