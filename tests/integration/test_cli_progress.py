"""`criud checkpoint` and `criud restore` follow their operation: a live bar on a terminal
(a real pty), plain output when piped, --no-wait, and ^C (issue 16)."""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tests.integration.helpers import Daemon, Procs, kill_restore, pid_gone, wait_for
from tests.integration.test_progress import _spawn_big

RESULT_RE = re.compile(rb"checkpoint ([0-9a-f]{24}) \(unnamed\) of pid (\d+): done, (\d+) bytes")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRIUD_")}
    env.update(TERM="xterm-256color", COLUMNS="100", LINES="24")
    env.pop("NO_COLOR", None)
    return env


def _pty_run(
    argv: Sequence[str],
    timeout: float,
    on_output: Callable[[bytes, int], None] | None = None,
) -> tuple[int, bytes]:
    """Run argv on a new pty (its controlling terminal); (exit code, everything it wrote).

    on_output(all so far, master fd) is called after each read: a test types into the
    terminal from there.
    """
    env = _env()
    pid, fd = pty.fork()
    if pid == 0:  # the child: exec at once, whatever happens
        try:
            os.execve(argv[0], list(argv), env)
        finally:
            os._exit(127)
    out = b""
    deadline = time.monotonic() + timeout
    try:
        while True:
            if time.monotonic() > deadline:
                raise AssertionError(f"{argv[-3:]} still running after {timeout}s: {out[-800:]!r}")
            ready, _, _ = select.select([fd], [], [], 0.1)
            if not ready:
                continue
            try:
                data = os.read(fd, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            out += data
            if on_output is not None:
                on_output(out, fd)
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status), out
    except BaseException:
        with_kill(pid)
        raise
    finally:
        os.close(fd)


def with_kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def test_checkpoint_draws_a_bar_on_a_terminal(daemon: Daemon, procs: Procs, tmp_path: Path) -> None:
    p = _spawn_big(procs, tmp_path, 1024)
    code, out = _pty_run(daemon.cli("checkpoint", str(p.pid)), 120)
    assert code == 0, out[-2000:]
    # rich drew: escapes, the label, the phase, the bytes against the total.
    assert b"\x1b[" in out
    plain = re.sub(rb"\x1b\[[0-9;?]*[A-Za-z]", b"", out)
    assert f"checkpoint pid {p.pid}".encode() in plain
    assert b"dumping" in plain, plain[-2000:]
    assert re.search(rb"\d+(\.\d+)?/\d+(\.\d+)? [MG]B", plain), plain[-2000:]
    m = RESULT_RE.search(plain)
    assert m and int(m.group(2)) == p.pid, plain[-2000:]
    p.wait(timeout=10)
    daemon.client.delete(m.group(1).decode())


def test_piped_output_stays_as_it_was(daemon: Daemon, procs: Procs) -> None:
    """Piped: no escapes, only today's one-line result (and --json's document)."""
    p = procs.spawn(["sleep", "1000"])
    run = subprocess.run(
        daemon.cli("checkpoint", str(p.pid)), capture_output=True, timeout=60, env=_env()
    )
    assert run.returncode == 0, run.stderr
    assert b"\x1b" not in run.stdout and run.stderr == b""
    lines = run.stdout.splitlines()
    assert len(lines) == 1 and RESULT_RE.fullmatch(lines[0]), run.stdout
    ck = RESULT_RE.fullmatch(lines[0]).group(1).decode()  # type: ignore[union-attr]
    p.wait(timeout=10)
    run = subprocess.run(
        daemon.cli("--json", "restore", ck), capture_output=True, timeout=60, env=_env()
    )
    assert run.returncode == 0, run.stderr
    assert b"\x1b" not in run.stdout
    import json

    r: dict[str, Any] = json.loads(run.stdout)
    procs.adopt(r["pid"])
    assert r["state"] == "running" and r["checkpoint"] == ck
    kill_restore(daemon.client, r["id"])
    daemon.client.delete(ck)


def test_no_wait_prints_the_operation(daemon: Daemon, procs: Procs) -> None:
    p = procs.spawn(["sleep", "1000"])
    run = subprocess.run(
        daemon.cli("checkpoint", "--no-wait", str(p.pid)), capture_output=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    op_id = run.stdout.decode().strip()
    assert re.fullmatch(r"[0-9a-f]{24}", op_id), run.stdout
    run = subprocess.run(daemon.cli("--json", "wait", op_id), capture_output=True, timeout=60)
    assert run.returncode == 0, run.stderr
    import json

    op = json.loads(run.stdout)
    assert op["state"] == "done" and op["phase"] == "done"
    daemon.client.delete(op["result"]["id"])


def _mid_dump(pid: int) -> None:
    wait_for(lambda: _status(pid)["TracerPid"] != "0", 60, 0.01, what="criu to seize the target")


def _check_target(pid: int) -> None:
    """Alive, untraced, not stopped."""
    assert not pid_gone(pid)
    wait_for(lambda: _status(pid)["TracerPid"] == "0", 10, what="the target to be untraced")
    assert _status(pid)["State"][0] in "RS", _status(pid)["State"]


def _ops(daemon: Daemon, pid: int) -> list[dict[str, Any]]:
    ops = daemon.client.request("GET", "/v1/operations")[1]
    return [o for o in ops if o["kind"] == "checkpoint" and o["target"]["pid"] == pid]


def test_interrupt_with_cancel_on_interrupt_cancels_mid_dump(
    daemon: Daemon, procs: Procs, tmp_path: Path
) -> None:
    p = _spawn_big(procs, tmp_path, 1024)
    cli = subprocess.Popen(
        daemon.cli("checkpoint", "--cancel-on-interrupt", str(p.pid)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        _mid_dump(p.pid)
        cli.send_signal(signal.SIGINT)
        out, err = cli.communicate(timeout=60)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait(timeout=10)
    assert cli.returncode == 1, (out, err)
    assert b"operation_cancelled" in err or b"cancelled" in err, err
    assert out == b""
    ops = _ops(daemon, p.pid)
    assert len(ops) == 1 and ops[0]["state"] == "cancelled", ops
    _check_target(p.pid)


def test_interrupt_when_piped_leaves_it_running(
    daemon: Daemon, procs: Procs, tmp_path: Path
) -> None:
    p = _spawn_big(procs, tmp_path, 512)
    cli = subprocess.Popen(
        daemon.cli("checkpoint", str(p.pid)), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        _mid_dump(p.pid)
        cli.send_signal(signal.SIGINT)
        out, err = cli.communicate(timeout=60)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait(timeout=10)
    assert cli.returncode == 130, (out, err)
    (op,) = _ops(daemon, p.pid)
    assert f"operation {op['id']} left running".encode() in err, err
    done = daemon.client.wait_operation(op["id"], 60)
    assert done["state"] == "done", done
    p.wait(timeout=10)
    daemon.client.delete(done["result"]["id"])


def test_interrupt_on_a_terminal_asks_before_cancelling(
    daemon: Daemon, procs: Procs, tmp_path: Path
) -> None:
    p = _spawn_big(procs, tmp_path, 1024)
    typed: list[bytes] = []

    def answer(out: bytes, fd: int) -> None:
        # Once the bar is drawn and criu has seized the target.
        if not typed and b"checkpoint pid" in out and _status(p.pid)["TracerPid"] != "0":
            os.write(fd, b"\x03")  # ^C: the terminal sends SIGINT to the CLI
            typed.append(b"^C")
        elif len(typed) == 1 and b"cancel operation" in out and b"[y/N]" in out:
            os.write(fd, b"y\n")
            typed.append(b"y")

    code, out = _pty_run(daemon.cli("checkpoint", str(p.pid)), 120, answer)
    assert typed == [b"^C", b"y"], out[-2000:]
    assert code == 1, out[-2000:]
    assert b"operation_cancelled" in out or b"cancelled" in out, out[-2000:]
    ops = _ops(daemon, p.pid)
    assert len(ops) == 1 and ops[0]["state"] == "cancelled", ops
    _check_target(p.pid)
