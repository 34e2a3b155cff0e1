"""criud.daemon.forkmap: half the work in a forked child, the same answer either way."""

from __future__ import annotations

import os
import select
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
        out += [int(c) for c in Path(f"/proc/self/task/{tid}/children").read_text().split()]
    return out


@pytest.fixture(autouse=True)
def no_child_left() -> Iterator[None]:
    before = set(_children())
    yield
    # Every child map_halves forked was reaped before it returned.
    assert set(_children()) <= before


def test_both_processes_work_and_results_come_back_in_order() -> None:
    # Our first item waits (bounded) until the child has taken one, so both
    # processes surely work, however slowly the child starts.
    took_r, took_w = os.pipe()
    try:

        def fn(x: int) -> tuple[int, int]:
            if os.getpid() != ME:
                os.write(took_w, b"c")
            elif x == 0:
                select.select([took_r], [], [], 10)
            return x * x, os.getpid()

        got = forkmap.map_split(fn, list(range(40)))
    finally:
        os.close(took_r)
        os.close(took_w)
    assert [v for v, _ in got] == [x * x for x in range(40)]
    pids = {pid for _, pid in got}
    assert ME in pids and len(pids) == 2
    # marshal carries tuples as tuples: the child's answers look like ours.
    assert all(type(x) is tuple for x in got)


def test_each_item_is_computed_once() -> None:
    # The queue hands each index to one process only.
    counts = forkmap.map_split(lambda x: (x, os.getpid()), list(range(500)))
    assert sorted(x for x, _ in counts) == list(range(500))


def test_a_queue_too_big_for_the_pipe_means_all_here(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(forkmap, "PIPE_SIZE", 4096)
    got = forkmap.map_split(lambda x: os.getpid(), list(range(5000)))
    assert set(got) == {ME}


def test_works_from_a_worker_thread() -> None:
    # The daemon calls it from asyncio.to_thread, with other threads about.
    sleeper = threading.Thread(target=time.sleep, args=(0.5,), daemon=True)
    sleeper.start()
    out: list[list[int]] = []
    t = threading.Thread(target=lambda: out.append(forkmap.map_split(abs, [-1, -2, -3])))
    t.start()
    t.join(timeout=30)
    assert out == [[1, 2, 3]]


def test_a_failing_child_is_redone_here() -> None:
    def fn(x: int) -> int:
        if os.getpid() != ME:
            raise RuntimeError("only in the child")
        return x + 1

    assert forkmap.map_split(fn, [1, 2, 3, 4]) == [2, 3, 4, 5]


def test_results_marshal_cannot_carry_are_computed_here() -> None:
    got = forkmap.map_split(lambda x: {x} if os.getpid() == ME else object(), [1, 2, 3])
    assert got == [{1}, {2}, {3}]


def test_a_child_past_the_deadline_is_killed_and_its_half_redone() -> None:
    def fn(x: int) -> int:
        if os.getpid() != ME:
            time.sleep(60)
        return -x

    t0 = time.monotonic()
    assert forkmap.map_split(fn, [1, 2, 3], timeout=0.5) == [-1, -2, -3]
    assert time.monotonic() - t0 < 10


def test_an_exception_here_still_reaps_the_child() -> None:
    def fn(x: int) -> int:
        if os.getpid() == ME and x == 0:
            raise ValueError("ours")
        return x

    with pytest.raises(ValueError, match="ours"):
        forkmap.map_split(fn, [0, 1], timeout=5)


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
    import marshal

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


def test_the_child_dies_of_sigterm_and_its_share_is_redone() -> None:
    import signal

    # Handlers of ours (as the daemon's asyncio ones) must not keep the child
    # alive: a SIGTERM ends it, and we compute what it took.
    old = signal.signal(signal.SIGTERM, lambda *_: None)
    try:

        def fn(x: int) -> int:
            if os.getpid() != ME:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(30)
            return x * 3

        t0 = time.monotonic()
        assert forkmap.map_split(fn, [1, 2, 3, 4], timeout=20) == [3, 6, 9, 12]
        assert time.monotonic() - t0 < 10
    finally:
        signal.signal(signal.SIGTERM, old)
