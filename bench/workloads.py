"""The processes the benchmarks checkpoint, as small Python programs.

Each one is started with its stdio on /dev/null (a pipe held outside the
tree would make every restore need --inherit-fd) and says it is ready by
writing one byte to the fd named by $BENCH_READY_FD, which it then closes,
so nothing of the harness is left in the tree when criu dumps it.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from pathlib import Path

# `mib` MiB of random bytes: a 32 MiB block of os.urandom, repeated.  criu
# neither compresses nor deduplicates pages, so a page costs it the same
# whatever it holds; generating 1 GiB with os.urandom alone takes ~5 s here.
FILL = r"""
import os, sys, time
mib = int(sys.argv[1])
block = os.urandom(min(mib, 32) << 20)
buf = bytearray(mib << 20)
mv = memoryview(buf)
for off in range(0, len(buf), len(block)):
    n = min(len(block), len(buf) - off)
    mv[off:off + n] = block[:n]
del mv
R = int(os.environ["BENCH_READY_FD"]); os.write(R, b"r"); os.close(R)
while True:
    time.sleep(3600)
"""

# A handful of fds of the usual kinds, for a realistic checkpoint record.
HOLD = r"""
import os, socket, sys, time
keep = [os.pipe(), socket.socketpair()]
keep += [open(p, "rb") for p in ("/etc/hostname", "/etc/os-release", "/etc/passwd")]
R = int(os.environ["BENCH_READY_FD"]); os.write(R, b"r"); os.close(R)
while True:
    time.sleep(3600)
"""

# Writes one byte to stdout (a pipe whose read end the harness holds) every
# 0.5 ms: the first byte after a restore marks the restored tree running.
WRITER = r"""
import os, time
R = int(os.environ["BENCH_READY_FD"]); os.write(R, b"r"); os.close(R)
while True:
    os.write(1, b"x")
    time.sleep(0.0005)
"""

# A tree of argv[1] processes (the parent and argv[1]-1 forked children),
# each holding argv[2] fds or a few more: pipes, socketpairs and regular
# files.  At most 300 pipes each: criu dumps at most 1,024 pipes per dump
# (NR_PIPES_WITH_DATA in its pipes.h; "OOM storing pipe" past it), so a
# process of 10,000 fds holds sockets and files past its 300th pipe.
# With argv[4] "light", each child execs `sleep` holding its fds, so that a
# tree of 100 costs criu little memory to dump (a forked Python's pages are
# dumped once per task).  SIGTERM to the parent kills and reaps the children.
TREE = r"""
import os, signal, socket, sys, time
n, nfds, scratch = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
light = sys.argv[4:] == ["light"]
def hold():
    keep = []
    have = 3
    i = pipes = 0
    while have < nfds:
        kind = i % 3
        if kind == 0 and pipes >= 300:
            kind = 1
        if kind == 0:
            keep.append(os.pipe()); have += 2; pipes += 1
        elif kind == 1:
            keep.append(socket.socketpair()); have += 2
        else:
            keep.append(open(os.path.join(scratch, f"f{i % 8}"), "ab")); have += 1
        i += 1
    return keep
for i in range(8):
    open(os.path.join(scratch, f"f{i}"), "ab").close()
ready_r, ready_w = os.pipe()
kids = []
for _ in range(n - 1):
    pid = os.fork()
    if pid == 0:
        os.close(int(os.environ["BENCH_READY_FD"])); os.close(ready_r)
        keep = hold()
        os.write(ready_w, b"k"); os.close(ready_w)
        if light:
            for fd in os.listdir("/proc/self/fd"):
                try: os.set_inheritable(int(fd), True)
                except OSError: pass
            os.execv("/bin/sleep", ["sleep", "1000000"])
        while True:
            signal.pause()
    kids.append(pid)
os.close(ready_w)
keep = hold()
got = 0
while got < n - 1:
    got += len(os.read(ready_r, 4096))
os.close(ready_r)
def stop(*_):
    for k in kids:
        try: os.kill(k, signal.SIGKILL)
        except ProcessLookupError: pass
    for k in kids:
        try: os.waitpid(k, 0)
        except ChildProcessError: pass
    os._exit(0)
signal.signal(signal.SIGTERM, stop)
R = int(os.environ["BENCH_READY_FD"]); os.write(R, b"r"); os.close(R)
while True:
    signal.pause()
"""


def start(
    script: str,
    *args: str,
    stdout: int | None = None,
    timeout: float = 120.0,
) -> subprocess.Popen[bytes]:
    """Start a workload in a new session; return once it says it is ready."""
    r, w = os.pipe()
    try:
        p = subprocess.Popen(
            [sys.executable, "-c", script, *args],
            stdin=subprocess.DEVNULL,
            stdout=stdout if stdout is not None else subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
            pass_fds=(w,),
            env={**os.environ, "BENCH_READY_FD": str(w)},
        )
    finally:
        os.close(w)
    try:
        deadline = time.monotonic() + timeout
        while True:
            ready, _, _ = select.select([r], [], [], 0.1)
            if ready and os.read(r, 1):
                return p
            if p.poll() is not None:
                raise RuntimeError(f"workload exited {p.returncode} before it was ready")
            if time.monotonic() > deadline:
                p.kill()
                p.wait()
                raise RuntimeError("workload not ready in time")
    finally:
        os.close(r)


def scratch_dir(base: Path, name: str) -> Path:
    d = base / name
    d.mkdir(parents=True, exist_ok=True)
    return d
