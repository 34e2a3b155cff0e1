"""Migration between two namespaced daemons, against raw criu and export + copy + import.

Two network namespaces joined by a veth pair (as tests/integration/
test_migration.py makes them), a daemon in each (state dirs on tmpfs,
/dev/shm).  A counter holding `mib` MiB of non-zero pages runs on the source
host, its stdout a pipe.  Each rep, interleaved (the order rotated, so slow
spells of the machine hit every side):

- criud: `POST /v1/migrations` on the source, then `POST /v1/restores` of
  the result on the destination with a new pipe (over its fd socket);
- raw: by hand, what the daemons do: `criu page-server --daemon` in the
  destination's namespace, `criu dump --page-server` (the tree killed at its
  end, as a plain dump does), `cp` of the other images, `criu restore -d
  --inherit-fd` of a new pipe;
- archive: `POST /v1/checkpoints` on the source, export (zstd), import on the
  destination, restore there.

Downtime is from the request (or the first command) to the restored
counter's first line on the new pipe: the tree is frozen within a few ms of
the start and answers only at the end.  criu's own frozen time is recorded
too.  Ratios are medians of each rep's pair.

`make bench`'s "migration" section (`bench/bench.py --only migration`;
sizes and reps from its profile: quick 256 MiB x 2, full 256 MiB and 1 GiB
x 5).  Standalone:

    python bench/migration_bench.py [--mib 256] [--reps 5]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import _repo  # noqa: F401  (puts the repo on sys.path)

from criud.api.client import Client
from tests.integration.helpers import CRIU, Daemon, read_line
from tests.integration.test_migration import Hosts

HERE = Path(__file__).resolve().parent
PORT = 8420
# Non-zero pages (criu dumps every one); a line every 50 ms once ready.
BIG = """
import os, sys, time
blob = bytearray(os.urandom(1 << 20)) * {mib}
i = 0
while True:
    sys.stdout.write(f"hello {{i}}\\n"); sys.stdout.flush()
    i += 1
    time.sleep(0.05)
"""


def _daemon(root: Path, hosts: Hosts, ns: str, addr: str) -> tuple[Daemon, str]:
    root.mkdir()
    root.chmod(0o711)
    token = secrets.token_hex(16)
    tf = root / "token"
    tf.write_text(token + "\n")
    tf.chmod(0o600)
    args = ["--listen", f"tcp://{addr}:{PORT}", "--token-file", str(tf), "--log-level", "warning"]
    return Daemon(root, CRIU, args=args, prefix=hosts.enter(ns)).start(60), token


class _Counter:
    """The workload on the source host: a session leader, reaped as soon as it dies."""

    def __init__(self, hosts: Hosts, mib: int) -> None:
        self.rd, w = os.pipe()
        code = BIG.format(mib=mib)
        self.p = subprocess.Popen(
            [*hosts.enter(hosts.src_ns), sys.executable, "-c", code],
            stdin=subprocess.DEVNULL,
            stdout=w,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
        )
        os.close(w)
        # Reaped at once: the restore waits for the dumped pids to be free.
        threading.Thread(target=self.p.wait, daemon=True).start()
        read_line(self.rd, 120)
        self.key = f"pipe:[{os.fstat(self.rd).st_ino}]"

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.p.kill()
        os.close(self.rd)


def _first_line(fd: int) -> None:
    read_line(fd, 60)


def _restore_on(c: Client, ref: str, key: str) -> int:
    """Restore ref with a new pipe for key; wait for its first line; return its pid."""
    r, w = os.pipe()
    try:
        rec = c.restore(ref, fds={key: w})
    finally:
        os.close(w)
    try:
        _first_line(r)
    finally:
        os.close(r)
    return int(rec["pid"])


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, 9)
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.02)


def run_criud(
    s: Client, d: Client, dst_url: str, token: str, hosts: Hosts, mib: int
) -> dict[str, float]:
    w = _Counter(hosts, mib)
    try:
        t0 = time.perf_counter()
        body = {"pid": w.p.pid, "target": {"url": dst_url, "token": token}}
        out = s.request("POST", "/v1/migrations", body)[1]
        t1 = time.perf_counter()
        pid = _restore_on(d, out["checkpoint"], w.key)
        took = time.perf_counter() - t0
    finally:
        w.close()
    _kill(pid)
    d.delete(out["checkpoint"])
    return {
        "downtime": took,
        "restore": took - (t1 - t0),
        **{k: out["timing"][k] for k in ("frozen", "pages", "other_images", "total")},
    }


def _criu(ns: str, *args: str, pass_fds: tuple[int, ...] = ()) -> None:
    subprocess.run(
        ["nsenter", f"--net=/run/netns/{ns}", CRIU, *args],
        check=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        pass_fds=pass_fds,
        timeout=300,
    )


def run_raw(hosts: Hosts, scratch: Path, mib: int) -> dict[str, float]:
    w = _Counter(hosts, mib)
    src, dst = scratch / "raw-src", scratch / "raw-dst"
    for p in (src, dst):
        shutil.rmtree(p, ignore_errors=True)
        p.mkdir()
    port = 8500 + secrets.randbelow(400)
    try:
        t0 = time.perf_counter()
        _criu(hosts.dst_ns, "page-server", "--daemon", "-D", str(dst), "--address", hosts.dst_addr,
              "--port", str(port), "-o", "ps.log")  # fmt: skip
        _criu(hosts.src_ns, "dump", "-t", str(w.p.pid), "-D", str(src), "--page-server",
              "--address", hosts.dst_addr, "--port", str(port), "-o", "dump.log")  # fmt: skip
        for f in src.iterdir():
            if f.name != "dump.log":
                shutil.copy(f, dst / f.name)
        r, wfd = os.pipe()
        try:
            inherit = f"fd[{wfd}]:{w.key}"
            _criu(hosts.dst_ns, "restore", "-d", "-D", str(dst), "--inherit-fd", inherit,
                  "-o", "restore.log", pass_fds=(wfd,))  # fmt: skip
        finally:
            os.close(wfd)
        try:
            _first_line(r)
        finally:
            os.close(r)
        took = time.perf_counter() - t0
    finally:
        w.close()
    _kill(w.p.pid)
    return {"downtime": took}


def run_archive(s: Client, d: Client, hosts: Hosts, scratch: Path, mib: int) -> dict[str, float]:
    w = _Counter(hosts, mib)
    blob = scratch / "mig.tar.zst"
    try:
        t0 = time.perf_counter()
        ck = s.checkpoint(w.p.pid)
        with open(blob, "wb") as f:
            s.export(ck["id"], f, "zstd")
        with open(blob, "rb") as f:
            imp = d.import_archive(f)
        pid = _restore_on(d, imp["id"], w.key)
        took = time.perf_counter() - t0
    finally:
        w.close()
    _kill(pid)
    s.delete(ck["id"])
    d.delete(imp["id"])
    blob.unlink(missing_ok=True)
    return {"downtime": took}


@contextlib.contextmanager
def _two_daemons(base: Path) -> Iterator[tuple[Hosts, Daemon, Daemon, str]]:
    hosts = Hosts()
    hosts.up()
    root = Path(tempfile.mkdtemp(prefix="mig-", dir=base))
    src = dst = None
    try:
        src, _ = _daemon(root / "src", hosts, hosts.src_ns, hosts.src_addr)
        dst, token = _daemon(root / "dst", hosts, hosts.dst_ns, hosts.dst_addr)
        yield hosts, src, dst, token
    finally:
        for d in (src, dst):
            if d is not None:
                d.stop()
        hosts.down()
        shutil.rmtree(root, ignore_errors=True)


def bench_migration(mib: int, reps: int, base: Path) -> dict[str, Any]:
    """reps interleaved rounds of the three ways; medians and paired ratios."""
    rows: dict[str, list[dict[str, float]]] = {"criud": [], "raw": [], "archive": []}
    with _two_daemons(base) as (hosts, src, dst, token):
        s = Client(str(src.socket), str(src.fd_socket), timeout=600)
        d = Client(str(dst.socket), str(dst.fd_socket), timeout=600)
        url = f"http://{hosts.dst_addr}:{PORT}"
        scratch = dst.root
        ways = {
            "criud": lambda: run_criud(s, d, url, token, hosts, mib),
            "raw": lambda: run_raw(hosts, scratch, mib),
            "archive": lambda: run_archive(s, d, hosts, scratch, mib),
        }
        order = list(ways)
        for rep in range(reps):
            for name in order[rep % 3 :] + order[: rep % 3]:
                rows[name].append(ways[name]())
                print(f"rep {rep} {name}: {rows[name][-1]}", file=sys.stderr)
    med = {k: statistics.median(r["downtime"] for r in v) for k, v in rows.items()}
    ratio_raw = statistics.median(
        c["downtime"] / r["downtime"] for c, r in zip(rows["criud"], rows["raw"], strict=True)
    )
    ratio_archive = statistics.median(
        c["downtime"] / a["downtime"] for c, a in zip(rows["criud"], rows["archive"], strict=True)
    )
    return {
        "mib": mib,
        "reps": reps,
        "rows": rows,
        "median_downtime_s": med,
        "median_frozen_s": statistics.median(r["frozen"] for r in rows["criud"]),
        "ratio_criud_over_raw": ratio_raw,
        "ratio_criud_over_archive": ratio_archive,
        "goal_met": ratio_raw <= 1.1,
    }


def bench_section(cfg: dict[str, Any], env: dict[str, Any], base: Path) -> dict[str, Any]:
    """bench.py's "migration" section: every size of the profile, load noted."""
    out: dict[str, Any] = {"loadavg_start": [round(x, 2) for x in os.getloadavg()], "sizes": []}
    for mib in cfg["mig_sizes"]:
        out["sizes"].append(bench_migration(mib, cfg["mig_reps"], base))
    out["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    return out


def _ms(s: float) -> float:
    return round(s * 1000, 1)


def targets(r: dict[str, Any]) -> list[tuple[str, float, str, bool, str]]:
    """(name, value, goal, met, unit) rows for bench.py's targets table."""
    return [
        (
            f"migration of {m['mib']} MiB: downtime criud / raw criu (median of pairs)",
            round(m["ratio_criud_over_raw"], 3),
            "<= 1.1",
            m["ratio_criud_over_raw"] <= 1.1,
            "x",
        )
        for m in r["sizes"]
    ]


def markdown(r: dict[str, Any]) -> list[str]:
    """The section's lines in docs/benchmarks.md."""
    out = [
        "**Migration between two namespaced daemons**: a counter holding N MiB of non-zero "
        "pages, moved three ways per rep in a rotating order; downtime from the request to "
        "the restored counter's first line on a new pipe; medians, load average "
        f"{r['loadavg_start']} → {r['loadavg_end']}.",
        "",
        "| size | reps | criud | raw criu (page server by hand) | export + import | "
        "criud / raw | criud / export | criud: frozen, pages, other images, restore |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for m in r["sizes"]:
        med = m["median_downtime_s"]
        rows = m["rows"]["criud"]
        parts = [
            _ms(statistics.median(x[k] for x in rows))
            for k in ("frozen", "pages", "other_images", "restore")
        ]
        out.append(
            f"| {m['mib']} MiB | {m['reps']} | {_ms(med['criud'])} ms | {_ms(med['raw'])} ms | "
            f"{_ms(med['archive'])} ms | {m['ratio_criud_over_raw']:.3f} | "
            f"{m['ratio_criud_over_archive']:.3f} | {' / '.join(f'{p} ms' for p in parts)} |"
        )
    return [*out, ""]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", type=int, action="append", help="sizes (default 256)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out-dir", type=Path, default=HERE / "results")
    a = p.parse_args()
    base = Path(tempfile.mkdtemp(prefix="criud-bench-", dir="/dev/shm"))
    out: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "loadavg_start": os.getloadavg(),
    }
    try:
        for mib in a.mib or [256]:
            out[f"{mib}MiB"] = bench_migration(mib, a.reps, base)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    out["loadavg_end"] = os.getloadavg()
    a.out_dir.mkdir(parents=True, exist_ok=True)
    path = a.out_dir / f"{out['date'][:10]}-migration.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: v for k, v in out.items()}, indent=1, default=str)[:4000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
