"""The API section's load generator: keep-alive clients that cost little.

    python bench/apiload.py compare [--rounds 3] [--generators threads,2] [--old PYTHONPATH]

`run_load` drives the clients from a few worker PROCESSES (2 by default),
each a single-threaded `selectors` loop over its share of the keep-alive
unix connections, on raw sockets: it sends the request's bytes, reads the
answer with `recv_into` into a buffer allocated once per connection, parses
only the status line and Content-Length, and times each request from its
send to its last byte.  The old generator (`threaded_load`: 50 threads of
`http.client` in the bench's own process) spent about 0.27 ms of client CPU
on each 0.8 MB answer (the GIL, header parsing through the email module,
copies of the body), as much as the server itself, on the same 2 cores, and
capped what any server could show here; it is kept for `compare`, which
measures the two generators against criud and the reference, interleaved.

Same semantics as before: N clients, each sends at most `per` requests and
starts no new one after the time cap; each answer must be status 200 with
the expected body length (else it counts as an error).  The server's CPU
per request (all its threads) and the clients' (all worker processes) are
recorded beside the rates.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

import _repo  # noqa: F401  (puts the repo on sys.path)

from criud.api.client import UnixConnection

REQUEST = b"GET /v1/checkpoints HTTP/1.1\r\nhost: localhost\r\n\r\n"
# A head past this is not one criud or the reference sends.
HEAD_MAX = 64 * 1024
# No event for this long on any connection of a worker: the server hangs.
STALL_S = 120.0


class Conn:
    """One keep-alive connection of a worker, and its request in flight."""

    def __init__(self, path: str, body_len: int) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.connect(path)
        self.sock.setblocking(False)
        self.buf = bytearray(body_len + HEAD_MAX)
        self.view = memoryview(self.buf)
        self.body_len = body_len
        self.filled = 0
        self.end = 0  # head + body length once the head is in, else 0
        self.status = 0
        self.sent_at = 0.0
        self.left = 0

    def send(self) -> None:
        self.filled = self.end = 0
        self.left -= 1
        self.sent_at = time.perf_counter()
        # 48 bytes into an empty socket buffer: never partial.
        self.sock.send(REQUEST)

    def readable(self) -> bool:
        """Read what has come; True once the whole answer is in."""
        n = self.sock.recv_into(self.view[self.filled :])
        if n == 0:
            raise ConnectionError("closed by the server mid-answer")
        self.filled += n
        if not self.end:
            self._head()
        if self.end and self.filled >= self.end:
            if self.filled > self.end:
                raise ConnectionError("bytes past the answer")
            return True
        if self.filled == len(self.buf):
            raise ConnectionError("answer larger than expected")
        return False

    def _head(self) -> None:
        i = self.buf.find(b"\r\n\r\n", 0, min(self.filled, HEAD_MAX))
        if i < 0:
            if self.filled >= HEAD_MAX:
                raise ConnectionError("no end of head")
            return
        head = bytes(self.view[:i]).lower()
        self.status = int(head[9:12])
        at = head.find(b"\r\ncontent-length:")
        if at < 0:
            raise ConnectionError("answer without content-length")
        stop = head.find(b"\r\n", at + 2)
        length = int(head[at + 17 : stop if stop > 0 else len(head)])
        self.end = i + 4 + length
        if self.end > len(self.buf):
            # An answer longer than the buffer (body_len 0: not known): room for it.
            self.view.release()
            self.buf.extend(bytes(self.end - len(self.buf)))
            self.view = memoryview(self.buf)

    def ok(self) -> str | None:
        """None for a 200 of the expected length, else what was wrong."""
        if self.status != 200:
            return f"status {self.status}"
        got = self.end - self.buf.find(b"\r\n\r\n") - 4
        if self.body_len and got != self.body_len:
            return f"body of {got} bytes, not {self.body_len}"
        return None


def _loop(conns: list[Conn], deadline: float) -> tuple[list[float], list[str], float]:
    """Drive the connections to the end; (latencies s, errors, time of the last answer)."""
    sel = selectors.DefaultSelector()
    lat: list[float] = []
    errors: list[str] = []
    for c in conns:
        c.send()
        sel.register(c.sock, selectors.EVENT_READ, c)
    live = len(conns)
    while live:
        events = sel.select(STALL_S)
        if not events:
            errors += ["stalled"] * live
            break
        for key, _ in events:
            c: Conn = key.data
            try:
                if not c.readable():
                    continue
            except BlockingIOError:
                continue
            except (OSError, ValueError) as e:
                errors.append(repr(e))
            else:
                now = time.perf_counter()
                lat.append(now - c.sent_at)
                bad = c.ok()
                if bad is not None:
                    errors.append(bad)
                    # As before: a wrong answer is counted and the client goes on.
                if c.left > 0 and now <= deadline:
                    c.send()
                    continue
            sel.unregister(c.sock)
            c.sock.close()
            live -= 1
    sel.close()
    return lat, errors, time.perf_counter()


def worker(path: str, nconn: int, per: int, body_len: int) -> int:
    """One worker process: connect, say ready, wait for the deadline, run, report."""
    conns = [Conn(path, body_len) for _ in range(nconn)]
    for c in conns:
        c.left = per
    print("ready", flush=True)
    deadline = float(sys.stdin.readline())
    t0 = os.times()
    lat, errors, ended = _loop(conns, deadline)
    t1 = os.times()
    cpu = t1.user + t1.system - t0.user - t0.system
    json.dump({"lat": lat, "errors": errors, "ended": ended, "cpu_s": cpu}, sys.stdout)
    sys.stdout.flush()
    return 0


def _proc_cpu_s(pid: int) -> float:
    """CPU time (user + system, all threads) process pid has used so far."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def _figures(
    lat: list[float], errors: int, wall: float, server_cpu: float, client_cpu: float
) -> dict[str, Any]:
    n = max(len(lat), 1)
    return {
        "requests": len(lat),
        "errors": errors,
        "wall_s": round(wall, 3),
        "rps": round(len(lat) / wall, 1) if wall > 0 else 0.0,
        "p50_ms": round(_pct(lat, 0.5) * 1000, 2),
        "p90_ms": round(_pct(lat, 0.9) * 1000, 2),
        "p99_ms": round(_pct(lat, 0.99) * 1000, 2),
        "max_ms": round(max(lat, default=0.0) * 1000, 2),
        # The server's own cost, steadier than the rates on a shared
        # machine, and the clients' beside it.
        "server_cpu_ms_per_request": round(server_cpu / n * 1000, 3),
        "client_cpu_ms_per_request": round(client_cpu / n * 1000, 3),
    }


def _start_workers(
    path: str, clients: int, per: int, body_len: int, procs: int
) -> list[subprocess.Popen[str]]:
    shares = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
    argv = [sys.executable, str(Path(__file__).resolve()), "worker", path, "", str(per)]
    workers = []
    for share in shares:
        if share:
            argv[4] = str(share)
            workers.append(
                subprocess.Popen(
                    [*argv, str(body_len)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
    for w in workers:
        line = _out(w).readline().strip()
        if line != "ready":
            raise RuntimeError(f"load worker {w.pid} did not start: {line!r}")
    return workers


def _result(w: subprocess.Popen[str]) -> dict[str, Any]:
    text = _out(w).read()
    if not text:
        raise RuntimeError(f"load worker {w.pid} failed (exit {w.wait(timeout=30)})")
    out: dict[str, Any] = json.loads(text)
    return out


def _out(w: subprocess.Popen[str]) -> IO[str]:
    assert w.stdout is not None
    return w.stdout


def run_load(
    path: str,
    server_pid: int,
    *,
    clients: int,
    per: int,
    seconds: float,
    body_len: int = 0,
    procs: int = 2,
) -> dict[str, Any]:
    """GET /v1/checkpoints from `clients` connections spread over `procs` worker processes."""
    workers = _start_workers(path, clients, per, body_len, procs)
    try:
        t0, cpu0 = time.perf_counter(), _proc_cpu_s(server_pid)
        # perf_counter is CLOCK_MONOTONIC: the same clock in every process.
        for w in workers:
            assert w.stdin is not None
            w.stdin.write(f"{t0 + seconds!r}\n")
            w.stdin.flush()
        results = [_result(w) for w in workers]
        cpu = _proc_cpu_s(server_pid) - cpu0
    finally:
        for w in workers:
            w.wait(timeout=STALL_S + 30)
    lat = [x for r in results for x in r["lat"]]
    wall = max(r["ended"] for r in results) - t0
    out = _figures(
        lat, sum(len(r["errors"]) for r in results), wall, cpu, sum(r["cpu_s"] for r in results)
    )
    out.update(per_client_cap=per, time_cap_s=seconds, generator=f"{len(workers)} processes")
    return out


# -- the old generator, kept to compare against ---------------------------------


def threaded_load(
    path: str, server_pid: int, *, clients: int, per: int, seconds: float
) -> dict[str, Any]:
    """The old generator: one thread of http.client per client, in this process."""
    lat: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []
    barrier = threading.Barrier(clients + 1)
    deadline: list[float] = [0.0]

    def client(i: int) -> None:
        cn = UnixConnection(path, STALL_S)
        cn.connect()
        barrier.wait()
        try:
            for _ in range(per):
                if time.perf_counter() > deadline[0]:
                    break
                t = time.perf_counter()
                cn.request("GET", "/v1/checkpoints")
                r = cn.getresponse()
                r.read()
                if r.status != 200:
                    errors.append(str(r.status))
                lat[i].append(time.perf_counter() - t)
        except OSError as e:
            errors.append(repr(e))
        finally:
            cn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    deadline[0] = time.perf_counter() + seconds
    barrier.wait()
    t0, cpu0, mine0 = time.perf_counter(), _proc_cpu_s(server_pid), os.times()
    for t in threads:
        t.join()
    wall, cpu, mine = time.perf_counter() - t0, _proc_cpu_s(server_pid) - cpu0, os.times()
    mine_s = mine.user + mine.system - mine0.user - mine0.system
    out = _figures([x for v in lat for x in v], len(errors), wall, cpu, mine_s)
    out.update(per_client_cap=per, time_cap_s=seconds, generator="threads")
    return out


# -- compare: old generator vs new, on criud and on the reference -------------------


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("rps", "p50_ms", "p99_ms", "server_cpu_ms_per_request", "client_cpu_ms_per_request")
    out: dict[str, Any] = {k: round(statistics.median(r[k] for r in runs), 3) for k in keys}
    out["errors"] = sum(r["errors"] for r in runs)
    return out


def _seeded_daemon(bench: Any, root: Path, env: dict[str, str]) -> Any:
    """A daemon with 1,000 records (as bench_api seeds them), started."""
    d = bench.Daemon(root, "/usr/local/sbin/criu")
    d.extra_env = env
    pid = bench.start_workload(bench.workloads.HOLD)
    ck = d.start().new_client().checkpoint(pid, leave_running=True)
    bench.kill(pid)
    d.stop()
    bench._seed_records(d.state_dir, ck["id"], 1000)
    return d.start()


def compare(
    rounds: int, seconds: float, per: int, generators: list[str], old: str | None = None
) -> dict[str, Any]:
    """Generators ("threads", or a number of worker processes) against criud and the
    reference (and an old criud: a PYTHONPATH with its criud package), each pair once
    per round, the order rotating each round."""
    import shutil
    import tempfile

    import bench  # the harness's daemon, seeding and reference server

    root = Path(tempfile.mkdtemp(prefix="apiload-", dir="/dev/shm"))
    bench.kdat.ensure_kdat_tmpfs(bench.kdat.KDAT_DIR)
    daemons: list[Any] = []
    runs: dict[str, list[dict[str, Any]]] = {}
    load = [os.getloadavg()[0]]
    try:
        daemons.append(_seeded_daemon(bench, root / "d", {}))
        if old:
            daemons.append(_seeded_daemon(bench, root / "old", {"PYTHONPATH": old}))
        d = daemons[0]
        _, body = bench._single_client(str(d.socket))
        with bench.static_server(root, body) as (ssock, spid):
            sides = {"criud": (str(d.socket), d.pid, body), "reference": (ssock, spid, body)}
            if old:
                # Its own records: ids and pids alike, lengths may differ.
                o = daemons[1]
                sides["old-criud"] = (str(o.socket), o.pid, bench._single_client(str(o.socket))[1])
            cases = [(g, s) for g in generators for s in sides]
            for i in range(rounds):
                k = i % len(cases)
                for gen, side in cases[k:] + cases[:k]:
                    path, spid_, answer = sides[side]
                    kw: dict[str, Any] = {"clients": 50, "per": per, "seconds": seconds}
                    if gen == "threads":
                        r = threaded_load(path, spid_, **kw)
                    else:
                        r = run_load(path, spid_, body_len=len(answer), procs=int(gen), **kw)
                    runs.setdefault(f"{gen} / {side}", []).append(r)
                    print(f"round {i} {gen:9} {side:9} {json.dumps(r)}", flush=True)
        for dd in daemons:
            rss = Path(f"/proc/{dd.pid}/status").read_text().split("VmRSS:")[1].split()[0]
            print(f"rss {dd.root.name} {int(rss) / 1024:.1f} MiB", flush=True)
    finally:
        for dd in daemons:
            dd.stop()
        bench.TRACK.kill_all()
        shutil.rmtree(root, ignore_errors=True)
    load.append(os.getloadavg()[0])
    return {"load": load, **{k: _median(v) for k, v in runs.items()}}


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        path, nconn, per, body_len = sys.argv[2:6]
        return worker(path, int(nconn), int(per), int(body_len))
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["compare"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--per", type=int, default=100)
    p.add_argument("--generators", default="threads,2", help="threads, or numbers of processes")
    p.add_argument("--old", help="PYTHONPATH of an old criud package to load too")
    a = p.parse_args()
    out = compare(a.rounds, a.seconds, a.per, a.generators.split(","), a.old)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
