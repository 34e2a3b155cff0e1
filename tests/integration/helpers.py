"""Shared helpers for integration tests: a real daemon, real processes, bounded waits."""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from criud.api.client import Client

# /proc reads as the daemon does them: one copy, shared by every test.
from criud.daemon.procutil import children, proc_start, proc_state

T = TypeVar("T")
CRIU = shutil.which("criu") or "/usr/local/sbin/criu"


def wait_for(
    fn: Callable[[], T], timeout: float = 10.0, interval: float = 0.05, what: str = "condition"
) -> T:
    """Poll fn until it returns something truthy; fail after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def pid_gone(pid: int) -> bool:
    return not os.path.exists(f"/proc/{pid}")


def is_pool_worker(pid: int) -> bool:
    """Whether pid is one of the daemon's warm `criu swrk` workers (--criu-pool)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    return len(argv) > 1 and argv[1] == b"swrk"


def pool_workers(pid: int) -> list[int]:
    """The daemon's children that are warm criu workers (idle or serving a request)."""
    return [c for c in children(pid) if is_pool_worker(c)]


def other_children(pid: int) -> list[int]:
    """The daemon's children that are not warm criu workers (CLI criu runs, helpers)."""
    return [c for c in children(pid) if not is_pool_worker(c)]


def ns_init(unshare_pid: int) -> int:
    """The host pid of the init that `unshare --fork` (pid unshare_pid) started."""

    def child() -> int | None:
        try:
            with open(f"/proc/{unshare_pid}/task/{unshare_pid}/children") as f:
                kids = f.read().split()
        except OSError:
            return None
        return int(kids[0]) if kids else None

    return wait_for(child, 10, what="the namespace's init")


def fd_table(pid: int) -> dict[int, str]:
    """fd number -> readlink target of a live process."""
    out = {}
    for n in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            out[int(n)] = os.readlink(f"/proc/{pid}/fd/{n}")
    return out


def read_line(fd: int, timeout: float = 10.0) -> bytes:
    """Read one line from a pipe fd, bounded by timeout."""
    buf = b""
    deadline = time.monotonic() + timeout
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no full line within {timeout}s (got {buf!r})")
        r, _, _ = select.select([fd], [], [], left)
        if r:
            chunk = os.read(fd, 1)
            if not chunk:
                raise AssertionError(f"EOF after {buf!r}")
            buf += chunk
    return buf


def hello_num(line: bytes) -> int:
    """N of a "hello N" line, the counting workloads' output."""
    word, n = line.decode().split()
    assert word == "hello", line
    return int(n)


def drain_hello(fd: int, last: int) -> int:
    """Read what a dead writer left in a pipe, to EOF; return the last N seen.

    Lines that are not "hello N" (a shell's or runc's chatter) are skipped.
    """
    data = b""
    deadline = time.monotonic() + 10
    while chunk := os.read(fd, 65536):
        data += chunk
        assert time.monotonic() < deadline, "pipe did not reach EOF"
    for line in data.splitlines():
        if line.startswith(b"hello "):
            last = hello_num(line)
    return last


def counter(word: str = "hello", period: float = 0.05) -> str:
    """A workload that writes "<word> N" to stdout every period seconds, N counting up."""
    return f"""
import sys, time
i = 0
while True:
    sys.stdout.write(f"{word} {{i}}\\n")
    sys.stdout.flush()
    i += 1
    time.sleep({period})
"""


# The counting workload of the hand-off tests: "hello N" every 50 ms.
HELLO = counter()


def start_hello(procs: Procs, code: str = HELLO, *args: str) -> tuple[subprocess.Popen[bytes], int]:
    """Start a counting workload writing into a new pipe; (the process, the pipe's read end)."""
    r, w = os.pipe()
    p = procs.python(code, *args, stdout=w)
    os.close(w)
    return p, r


def drain_after(p: subprocess.Popen[bytes], fd: int, last: int) -> int:
    """Once the dumped p is gone: read its pipe to EOF, close it; the last N it wrote."""
    p.wait(timeout=10)
    last = drain_hello(fd, last)
    os.close(fd)
    return last


def checkpoint_hello(client: Client, procs: Procs) -> tuple[dict[str, Any], str]:
    """Checkpoint a HELLO whose stdout pipe is external; (the checkpoint, its key)."""
    p, rd = start_hello(procs)
    read_line(rd)
    ck = client.checkpoint(p.pid)
    p.wait(timeout=10)
    os.close(rd)
    return ck, ck["external"][0]


def kill_restore(client: Client, restore_id: str, what: str = "the restored tree") -> None:
    """SIGKILL a restored tree's root and wait (bounded) until its record says exited."""
    client.signal(restore_id, "SIGKILL")
    wait_for(
        lambda: client.get_restore(restore_id)["state"] == "exited", 10, what=f"{what} to exit"
    )


def restore_into_pipe(
    client: Client, procs: Procs, ref: str, replaces: Any, **kw: Any
) -> tuple[dict[str, Any], int]:
    """Restore ref with a fresh pipe's write end for replaces (a key, or (pid, fd)).

    The restored tree is adopted for cleanup; returns (the restore, the pipe's read end).
    """
    new_r, new_w = os.pipe()
    try:
        r = client.restore(ref, fds={replaces: new_w}, **kw)
    except BaseException:
        os.close(new_r)
        raise
    finally:
        os.close(new_w)
    procs.adopt(r["pid"])
    return r, new_r


class Procs:
    """Processes a test started; killed by pid (and only those) at teardown."""

    def __init__(self) -> None:
        self.popens: list[subprocess.Popen[bytes]] = []
        self.extra: list[tuple[int, int | None]] = []  # (pid, start time) of restored trees

    def spawn(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[bytes]:
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("stdout", subprocess.DEVNULL)
        kw.setdefault("stderr", subprocess.DEVNULL)
        kw.setdefault("start_new_session", True)
        kw.setdefault("close_fds", True)
        p = subprocess.Popen(list(argv), **kw)
        self.popens.append(p)
        return p

    def python(self, code: str, *args: str, **kw: Any) -> subprocess.Popen[bytes]:
        return self.spawn([sys.executable, "-c", code, *args], **kw)

    def adopt(self, pid: int) -> None:
        """Remember a restored pid (not our child) to kill at teardown."""
        self.extra.append((pid, proc_start(pid)))

    def cleanup(self) -> None:
        for pid, start in self.extra:
            if start is not None and proc_start(pid) == start:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL) if os.getpgid(pid) == pid else None
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for p in self.popens:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=10)
        for pid, _ in self.extra:
            with contextlib.suppress(AssertionError):
                wait_for(
                    lambda pid=pid: pid_gone(pid) or proc_state(pid) == "Z",
                    10,  # type: ignore[misc]
                    what=f"pid {pid} to die",
                )


class Daemon:
    """A `criud serve` subprocess on temporary sockets and state dir."""

    def __init__(
        self,
        root: Path,
        criu: str = CRIU,
        extra_env: dict[str, str] | None = None,
        args: Sequence[str] = (),
        prefix: Sequence[str] = (),
    ) -> None:
        self.root = root
        self.socket = root / "api.sock"
        self.fd_socket = root / "fds.sock"
        self.state_dir = root / "state"
        self.log_path = root / "daemon.log"
        self.criu = criu
        self.extra_env = extra_env or {}
        self.args = list(args)
        # A command that execs the daemon in its own pid, e.g. prlimit ... --.
        self.prefix = list(prefix)
        self.proc: subprocess.Popen[bytes] | None = None
        self.client = Client(str(self.socket), str(self.fd_socket), timeout=120)

    def start(self, timeout: float = 30.0) -> Daemon:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CRIUD_")}
        env.update(self.extra_env)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    *self.prefix,
                    *self.cli(),
                    "serve",
                    "--state-dir",
                    str(self.state_dir),
                    "--criu",
                    self.criu,
                    "--log-level",
                    "info",
                    *self.args,
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
                close_fds=True,
            )

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}: {self.log()}")
            try:
                return self.client.request("GET", "/healthz")[0] == 200
            except OSError:
                return False

        wait_for(ready, timeout, what="daemon readiness")
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def cli(self, *args: str) -> list[str]:
        """argv of the `criud` CLI talking to this daemon, then args."""
        cli = [sys.executable, "-m", "criud.daemon.cli"]
        return [*cli, "--socket", str(self.socket), "--fd-socket", str(self.fd_socket), *args]

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def settled_fd_count(self, timeout: float = 20.0) -> int:
        """The daemon's fd count once its warm criu pool is full again.

        The pool replaces a worker after the request it served, in the
        background: a baseline taken before that refill would grow by the
        new worker's socket and pipes.  Also waits out other children (a
        CLI criu finishing).
        """
        want = self._pool_size()
        wait_for(
            lambda: len(pool_workers(self.pid)) >= want and not other_children(self.pid),
            timeout,
            what=f"the daemon's warm pool to hold {want} workers and nothing else to run",
        )
        return self.fd_count()

    def _pool_size(self) -> int:
        if "--criu-pool" in self.args:
            return int(self.args[self.args.index("--criu-pool") + 1])
        env = self.extra_env.get("CRIUD_CRIU_POOL")
        return int(env) if env else 2

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 40.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


@contextlib.contextmanager
def temp_root() -> Iterator[Path]:
    # Short paths: unix socket paths are limited to 107 bytes.
    d = Path(tempfile.mkdtemp(prefix="criud-", dir="/tmp"))
    # Traversable, so tests acting as another uid reach the sockets (which
    # keep their own 0660 mode); the state dir inside stays 0700.
    d.chmod(0o711)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def small_state_dir(root: Path, size: str) -> Iterator[Path]:
    """root/state on a tmpfs of `size` (e.g. "8m"): a disk that fills up; unmounted after."""
    state = root / "state"
    state.mkdir(mode=0o700)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "criud-small", str(state)],
        check=True,
        timeout=30,
    )
    try:
        yield state
    finally:
        # Lazy: a test that failed half-way may leave a file open in it.
        subprocess.run(["umount", "-l", str(state)], check=False, timeout=30)


def uid_of(pid: int) -> int | None:
    """The real uid of a live process, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith("Uid:"))
    except OSError:
        return None


_SHARED_SRC: list[Path] = []


def _shared_src() -> Path:
    """A world-readable copy of the criud packages, made once per test run.

    The checkout (and the venv inside it) may sit in a 0700 directory, as a
    CI clone into mktemp -d does, where another uid can read none of it.
    The client is stdlib-only, so a copy of the sources is all it needs.
    """
    if not _SHARED_SRC:
        import atexit

        import criud.api

        root = Path(tempfile.mkdtemp(prefix="criud-src-", dir="/tmp"))
        repo = Path(criud.api.__file__).resolve().parents[1]
        for pkg in ("api", "daemon", "dump", "restore"):
            shutil.copytree(
                repo / pkg, root / "criud" / pkg, ignore=shutil.ignore_patterns("__pycache__")
            )
        for d, _, files in os.walk(root):
            os.chmod(d, 0o755)
            for f in files:
                os.chmod(os.path.join(d, f), 0o644)
        atexit.register(shutil.rmtree, root, True)
        _SHARED_SRC.append(root)
    return _SHARED_SRC[0]


# Runs a list of API calls as whoever runs it; prints [[status, body], ...]
# (status 0 with the errno when the socket itself refuses the caller).
CALLS = r"""
import json, sys
from criud.api.client import Client, CriudClientError
c = Client(sys.argv[1], sys.argv[2], timeout=120)
out = []
for method, path, body in json.loads(sys.argv[3]):
    try:
        out.append(list(c.request(method, path, body)))
    except CriudClientError as e:
        out.append([e.status, e.problem])
    except OSError as e:
        out.append([0, {"errno": e.errno, "error": str(e)}])
print(json.dumps(out))
"""


def run_python_as(
    uid: int, code: str, *args: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run `python -c code args` as uid, in group 0 so the 0660 root:root sockets are reachable.

    It runs the venv's base interpreter (the venv's own link may be out of
    uid's reach) on a readable copy of criud's sources.
    """
    return subprocess.run(
        [
            "setpriv",
            f"--reuid={uid}",
            "--regid=0",
            "--clear-groups",
            os.path.realpath(sys.executable),
            "-c",
            code,
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd="/",
        env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(_shared_src())},
    )


@contextlib.contextmanager
def running_daemon() -> Iterator[Daemon]:
    """A daemon of its own on a temporary root; it must stop cleanly on SIGTERM."""
    with temp_root() as root:
        d = Daemon(root).start()
        try:
            yield d
        finally:
            rc = d.stop()
            assert rc == 0, f"daemon exited {rc} on SIGTERM: {d.log()}"


def send_raw(path: Path, payload: bytes, fds: Sequence[int]) -> dict[str, Any]:
    """Send one message to the fd socket and return the decoded reply."""
    import json

    from criud.daemon.fdpass import send_fds

    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.settimeout(10)
        s.connect(str(path))
        send_fds(s, payload, fds)
        return dict(json.loads(s.recv(65536)))


@contextlib.contextmanager
def new_pty() -> Iterator[tuple[int, int]]:
    """A pty pair (master, slave) the test holds, closed at the end of the block."""
    master, slave = os.openpty()
    try:
        yield master, slave
    finally:
        for fd in (master, slave):
            with contextlib.suppress(OSError):
                os.close(fd)


def tty_key_of(fd: int) -> str:
    """The CRIU key of a terminal: tty[rdev:dev], in hex."""
    st = os.fstat(fd)
    return f"tty[{st.st_rdev:x}:{st.st_dev:x}]"
