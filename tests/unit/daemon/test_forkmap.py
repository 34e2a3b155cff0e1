"""criud.daemon.forkmap: work shared with a forked child, the same answer either way."""

from __future__ import annotations

import contextlib
import marshal
import os
import select
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from criud.daemon import forkmap

ME = os.getpid()


def _children() -> list[int]:
    out: list[int] = []
    for tid in os.listdir("/proc/self/task"):
        # A thread may end between the listing and the read (the sleeper
        # of test_works_from_a_worker_thread): it has no children then.
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            text = Path(f"/proc/self/task/{tid}/children").read_text()
            out += [int(c) for c in text.split()]
    return out


@pytest.fixture(autouse=True)
def no_child_left() -> Iterator[None]:
    before = set(_children())
    yield
    # Every child map_split forked was reaped before it returned.
    assert set(_children()) <= before


class Gate:
    """Makes sure both processes take an item: each side's first item tells
    the other on a pipe, then waits (at most 10 s) to hear from it.
    Without it, a child slow to start could find the queue empty (and a
    test pass untested), or a child quick to start could take every item
    before this process took one."""

    def __init__(self) -> None:
        self.to_us_r, self.to_us_w = os.pipe()
        self.to_child_r, self.to_child_w = os.pipe()
        self.waited = False

    def here(self) -> bool:
        """True in this process, False in the child; each side's first call meets the other."""
        ours = os.getpid() == ME
        if not self.waited:
            self.waited = True
            os.write(self.to_child_w if ours else self.to_us_w, b"x")
            heard = select.select([self.to_us_r if ours else self.to_child_r], [], [], 10)[0]
            assert heard, "the other process took no item"
        return ours

    def close(self) -> None:
        for fd in (self.to_us_r, self.to_us_w, self.to_child_r, self.to_child_w):
            os.close(fd)


@pytest.fixture
def gate() -> Iterator[Gate]:
    g = Gate()
    yield g
    g.close()


def test_both_processes_work_and_results_come_back_in_order(gate: Gate) -> None:
    def fn(x: int) -> tuple[int, int]:
        gate.here()
        return x * x, os.getpid()

    got = forkmap.map_split(fn, list(range(40)))
    assert [v for v, _ in got] == [x * x for x in range(40)]
    pids = {pid for _, pid in got}
    assert ME in pids and len(pids) == 2
    # marshal carries tuples as tuples: the child's answers look like ours.
    assert all(type(x) is tuple for x in got)


def test_each_item_is_computed_once() -> None:
    # The queue hands each index to one process only.
    got = forkmap.map_split(lambda x: (x, os.getpid()), list(range(500)))
    assert [x for x, _ in got] == list(range(500))


def test_a_queue_too_big_for_the_pipe_means_all_here(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(forkmap, "PIPE_SIZE", 4096)
    got = forkmap.map_split(lambda x: os.getpid(), list(range(5000)))
    assert set(got) == {ME}


def test_works_from_a_worker_thread(gate: Gate) -> None:
    # The daemon calls it from asyncio.to_thread, with other threads about.
    sleeper = threading.Thread(target=time.sleep, args=(0.5,), daemon=True)
    sleeper.start()
    out: list[list[tuple[int, bool]]] = []

    def run() -> None:
        out.append(forkmap.map_split(lambda x: (-x, gate.here()), [1, 2, 3, 4]))

    t = threading.Thread(target=run)
    t.start()
    t.join(timeout=30)
    assert [v for v, _ in out[0]] == [-1, -2, -3, -4]
    assert {here for _, here in out[0]} == {True, False}


def test_a_failing_child_is_redone_here(gate: Gate) -> None:
    def fn(x: int) -> int:
        if not gate.here():
            raise RuntimeError("only in the child")
        return x + 1

    assert forkmap.map_split(fn, [1, 2, 3, 4]) == [2, 3, 4, 5]


def test_results_marshal_cannot_carry_are_computed_here(gate: Gate) -> None:
    got = forkmap.map_split(lambda x: {x} if gate.here() else object(), [1, 2, 3])
    assert got == [{1}, {2}, {3}]


def test_a_child_past_the_deadline_is_killed_and_its_share_redone(gate: Gate) -> None:
    def fn(x: int) -> int:
        if not gate.here():
            time.sleep(60)
        return -x

    t0 = time.monotonic()
    assert forkmap.map_split(fn, [1, 2, 3], timeout=2) == [-1, -2, -3]
    assert time.monotonic() - t0 < 10


def test_an_exception_here_still_reaps_the_child() -> None:
    # Whichever item we take raises.  The child holds its item until we have
    # taken ours (at most 10 s), so it cannot take both and leave us none:
    # under load it used to, and then nothing raised.
    r, w = os.pipe()

    def fn(x: int) -> int:
        if os.getpid() == ME:
            os.write(w, b"t")
            raise ValueError("ours")
        select.select([r], [], [], 10)
        return x

    try:
        with pytest.raises(ValueError, match="ours"):
            forkmap.map_split(fn, [0, 1], timeout=5)
    finally:
        os.close(r)
        os.close(w)


def test_the_child_dies_of_sigterm_and_its_share_is_redone(gate: Gate) -> None:
    # Handlers of ours (as the daemon's asyncio ones) must not keep the child
    # alive: a SIGTERM ends it, and we compute what it took.
    old = signal.signal(signal.SIGTERM, lambda *_: None)
    try:

        def fn(x: int) -> int:
            if not gate.here():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(30)
            return x * 3

        t0 = time.monotonic()
        assert forkmap.map_split(fn, [1, 2, 3, 4], timeout=20) == [3, 6, 9, 12]
        assert time.monotonic() - t0 < 10
    finally:
        signal.signal(signal.SIGTERM, old)


def test_fewer_than_two_items_need_no_child(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_fork() -> int:
        raise AssertionError("forked for one item")

    monkeypatch.setattr(os, "fork", no_fork)
    assert forkmap.map_split(str, [7]) == ["7"]
    assert forkmap.map_split(str, []) == []


def test_fork_refused_means_all_here(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse() -> int:
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(os, "fork", refuse)
    assert forkmap.map_split(lambda x: x * 2, [1, 2, 3]) == [2, 4, 6]


def test_frames_cut_short_or_split_anywhere() -> None:
    # Frames arrive in pieces of any size; a child killed mid-write leaves
    # half a frame: what came whole is kept, the rest is redone by the caller.
    def frame(i: int, v: object) -> bytes:
        body = marshal.dumps((i, v))
        return len(body).to_bytes(4, "little") + body

    data = frame(0, "a") + frame(2, [1, 2]) + frame(1, "b")[:-2]
    for step in (1, 3, 7, len(data)):
        f = forkmap._Frames(3)
        for k in range(0, len(data), step):
            f.feed(data[k : k + step])
        assert f.results == {0: "a", 2: [1, 2]}
    # Indices out of range are not taken; junk ends the decoding.
    f = forkmap._Frames(3)
    f.feed(frame(7, "x") + b"\x02\x00\x00\x00\xff\xff" + frame(1, "late"))
    assert f.results == {}
