"""criud.daemon.childproc: children started off the loop, reaped exactly once."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess

from criud.daemon import childproc


def _run(coro: object) -> object:
    return asyncio.run(asyncio.wait_for(coro, 20))  # type: ignore[arg-type]


def test_exit_codes_and_signals_as_asyncio_gives_them() -> None:
    async def body() -> tuple[int, int, int | None]:
        ok = await childproc.start(["sh", "-c", "exit 3"])
        sleeper = await childproc.start(["sleep", "30"])
        assert sleeper.returncode is None
        sleeper.kill()
        return await ok.wait(), await sleeper.wait(), sleeper.returncode

    assert _run(body()) == (3, -signal.SIGKILL, -signal.SIGKILL)


def test_a_child_gone_before_it_is_watched_is_still_reaped() -> None:
    async def body() -> int:
        p = childproc.popen(["true"], ())
        # Let it exit and stay a zombie before the Child exists.
        await asyncio.sleep(0.2)
        return await childproc.Child(p, asyncio.get_running_loop()).wait()

    assert _run(body()) == 0


def test_subprocess_never_waits_for_it_again() -> None:
    async def body() -> subprocess.Popen[bytes]:
        child = await childproc.start(["true"])
        await child.wait()
        return child._popen

    p = _run(body())
    assert isinstance(p, subprocess.Popen) and p.returncode == 0
    # Popen's own poll must not touch the (reaped) pid again.
    assert p.poll() == 0
    assert p not in getattr(subprocess, "_active", [])


def test_the_child_holds_only_the_fds_it_is_given() -> None:
    r, w = os.pipe()  # CLOEXEC by default; the child must see neither

    async def body() -> set[int]:
        a, b = os.pipe()
        try:
            child = await childproc.start(["sleep", "30"], [b])
            await asyncio.sleep(0.2)
            fds = {int(n) for n in os.listdir(f"/proc/{child.pid}/fd")}
            child.kill()
            await child.wait()
            return fds - {b}
        finally:
            os.close(a)
            os.close(b)

    try:
        os.set_inheritable(r, True)  # even an inheritable one stays out
        assert _run(body()) == {0, 1, 2}
    finally:
        os.close(r)
        os.close(w)


def test_a_cancelled_start_leaves_no_child() -> None:
    async def body() -> None:
        task = asyncio.ensure_future(childproc.start(["sleep", "30"]))
        await asyncio.sleep(0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    before = set(_children())
    _run(body())
    assert set(_children()) - before == set()


def _children() -> list[int]:
    me = os.getpid()
    with open(f"/proc/{me}/task/{me}/children") as f:
        return [int(x) for x in f.read().split()]
