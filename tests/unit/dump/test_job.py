"""criud.dump.job against a fake runtime: a real target, a real store, a stand-in criu."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import struct
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from criud.daemon.caller import Caller
from criud.daemon.config import Settings
from criud.daemon.criu import CriuResult, LogFile
from criud.daemon.errors import Busy, CheckpointTampered, TreeChanged
from criud.daemon.store import CheckpointState, Store
from criud.dump import fds as fdinfo
from criud.dump import images, job
from criud.dump.argv import DUMP_LOG
from criud.dump.manifest import Manifest
from criud.dump.options import DumpOptions

from .._helpers import FakeCriuBase, marked, open_fds, wait_until

ME = Caller(uid=0, gid=0, pid=os.getpid())


class FakeCriu(FakeCriuBase):
    """Stands in for Criu: writes `files` into the images dir it was given."""

    def __init__(self, ok: bool = True, plant_link: bool = False) -> None:
        self.ok, self.plant_link = ok, plant_link
        self.argv: list[str] = []

    async def run(self, argv: Sequence[str], log: LogFile, **_: Any) -> CriuResult:
        self.argv = list(argv)
        images = Path(argv[argv.index("-D") + 1])
        os.write(log.fd, b"(00.1) dumping\n")
        if not self.ok:
            os.write(log.fd, b"(00.2) Error (criu/x.c:1): Can't dump: it broke\n")
            return CriuResult(1, log.path, "Can't dump: it broke", [], log_lines=[])
        (images / "pstree.img").write_bytes(b"img")
        if self.plant_link:
            (images / "core-1.img").symlink_to("/etc/shadow")
        return CriuResult(0, log.path, None, [])


@dataclasses.dataclass
class FakeRuntime:
    settings: Settings
    store: Store
    criu: Any
    busy: set[int] = dataclasses.field(default_factory=set)
    failed_updates: int = 0

    def busy_pid(self, pid: int) -> contextlib.AbstractContextManager[None]:
        return marked(self.busy, pid, f"pid {pid} is being checkpointed already")


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[FakeRuntime]:
    settings = Settings(state_dir=tmp_path)
    settings.checkpoints_dir.mkdir(mode=0o700)
    store = Store(settings.db_path)
    store.open()
    rt = FakeRuntime(settings, store, FakeCriu())
    real = store.update_checkpoint

    def counting(ckpt_id: str, **changes: Any) -> None:
        rt.failed_updates += changes.get("state") == CheckpointState.FAILED
        real(ckpt_id, **changes)

    store.update_checkpoint = counting  # type: ignore[method-assign]
    yield rt
    store.close()


@pytest.fixture
def target() -> Iterator[subprocess.Popen[bytes]]:
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield p
    p.kill()
    p.wait(timeout=10)


def _dump(
    rt: FakeRuntime, pid: int, name: str = "web", spec: job.CheckpointSpec | None = None
) -> Any:
    """job.run of spec (default: a plain dump of pid); its record, or what it raised."""
    spec = spec or job.CheckpointSpec(pid=pid, name=name, options=DumpOptions(), labels={"a": "b"})

    async def go() -> Any:
        try:
            return await job.run(rt, spec, ME)
        except Exception as e:
            return e

    return asyncio.run(go())


def test_a_dump_records_a_typed_manifest_and_a_sealed_dir(
    runtime: FakeRuntime, target: subprocess.Popen[bytes]
) -> None:
    before = open_fds()
    rec = _dump(runtime, target.pid)
    assert not isinstance(rec, Exception), rec
    assert rec.state == CheckpointState.DONE and rec.name == "web"
    m = Manifest.from_json(rec.manifest)
    assert m.tasks[0].pid == target.pid and target.pid in m.pids
    assert m.uids[str(target.pid)] == (0, 0, 0, 0) and m.run_as is None
    assert not m.pidns_init and m.oci is None
    final = runtime.settings.checkpoints_dir / rec.id
    assert sorted(os.listdir(final)) == [DUMP_LOG, "pstree.img"]
    assert [e for e in os.listdir(runtime.settings.checkpoints_dir) if e.startswith(".tmp-")] == []
    assert runtime.criu.argv[:2] == ["dump", "--no-default-config"]
    assert open_fds() == before and runtime.busy == set()


def test_a_failed_criu_keeps_its_log_and_fails_the_record_once(
    runtime: FakeRuntime, target: subprocess.Popen[bytes]
) -> None:
    runtime.criu = FakeCriu(ok=False)
    before = open_fds()
    err = _dump(runtime, target.pid)
    assert err.code == "criu_failed" and "it broke" in err.detail
    (rec,) = runtime.store.list_checkpoints()
    assert rec.state == CheckpointState.FAILED and rec.name is None
    assert rec.error["code"] == "criu_failed" and rec.manifest is not None
    assert os.listdir(runtime.settings.checkpoints_dir) == [rec.id]
    assert os.listdir(runtime.settings.checkpoints_dir / rec.id) == [DUMP_LOG]
    assert runtime.failed_updates == 1
    assert open_fds() == before
    # The name is free again.
    runtime.criu = FakeCriu()
    assert _dump(runtime, target.pid).state == CheckpointState.DONE


def test_tampered_images_fail_the_record_exactly_once(
    runtime: FakeRuntime, target: subprocess.Popen[bytes]
) -> None:
    """The block marking a dump failed ran twice for tampered images (issue 12)."""
    runtime.criu = FakeCriu(plant_link=True)
    err = _dump(runtime, target.pid)
    assert isinstance(err, CheckpointTampered), err
    (rec,) = runtime.store.list_checkpoints()
    assert rec.state == CheckpointState.FAILED
    assert rec.error["code"] == "checkpoint_tampered" and rec.manifest is not None
    assert runtime.failed_updates == 1
    assert os.listdir(runtime.settings.checkpoints_dir) == []


def test_a_busy_pid_and_a_gone_pid_leave_no_record(
    runtime: FakeRuntime, target: subprocess.Popen[bytes]
) -> None:
    runtime.busy.add(target.pid)
    assert isinstance(_dump(runtime, target.pid), Busy)
    runtime.busy.clear()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(timeout=10)
    assert _dump(runtime, gone.pid).code == "process_not_found"
    assert runtime.store.list_checkpoints() == []


class ChainCriu(FakeCriu):
    """A criu whose pre-dumps work: each run writes its pages and criu's own parent link."""

    def __init__(self, fail_round: int = 0) -> None:
        super().__init__()
        from criud.daemon.kprobe import Capability

        self.supports = {"pre_dump": Capability(True)}
        self.runs: list[list[str]] = []
        self.fail_round = fail_round

    async def run(self, argv: Sequence[str], log: LogFile, **kw: Any) -> CriuResult:
        self.runs.append(list(argv))
        images = Path(argv[argv.index("-D") + 1])
        if argv[0] == "pre-dump":
            if len(self.runs) == self.fail_round:
                os.write(log.fd, b"(00.2) Error (criu/mem.c:46): Dirty tracking is OFF\n")
                return CriuResult(1, log.path, "Dirty tracking is OFF", [], log_lines=[])
            (images / "pagemap-1.img").write_bytes(b"m")
        else:
            (images / "pstree.img").write_bytes(b"img")
        if "--prev-images-dir" in argv:
            # criu links its parent as it was told, from inside its images dir.
            (images / "parent").symlink_to(argv[argv.index("--prev-images-dir") + 1])
        return CriuResult(0, log.path, None, [])


def _pre_dump(rt: FakeRuntime, pid: int, n: int) -> Any:
    spec = job.CheckpointSpec(
        pid=pid, name="pre", options=DumpOptions(leave_running=True), labels={}, pre_dumps=n
    )
    return _dump(rt, pid, spec=spec)


def test_pre_dumps_run_rounds_then_a_chained_final_dump(
    runtime: FakeRuntime, target: subprocess.Popen[bytes]
) -> None:
    runtime.criu = ChainCriu()
    before = open_fds()
    rec = _pre_dump(runtime, target.pid, 2)
    assert not isinstance(rec, Exception), rec
    final = runtime.settings.checkpoints_dir / rec.id
    r1, r2, last = runtime.criu.runs
    assert r1[0] == "pre-dump" and r1[-1] == "--track-mem" and "--leave-running" not in r1
    assert r1[r1.index("-D") + 1] == str(final.with_name(f".tmp-{rec.id}") / "pre-1")
    assert r2[0] == "pre-dump" and r2[-2:] == ["--prev-images-dir", "../pre-1"]
    assert last[0] == "dump" and last[-3:] == ["--track-mem", "--prev-images-dir", "pre-2"]
    assert "--leave-running" in last
    # The chain as criu restores it: parent links the daemon made, to sealed rounds.
    assert sorted(os.listdir(final)) == [DUMP_LOG, "parent", "pre-1", "pre-2", "pstree.img"]
    assert os.readlink(final / "parent") == "pre-2"
    assert os.readlink(final / "pre-2" / "parent") == "../pre-1"
    assert (final / "parent" / "parent" / "pagemap-1.img").read_bytes() == b"m"
    assert rec.size_bytes > len(b"img")
    # An archive holds one flat dir: the export refuses clearly, and closes what it opened.
    from criud.daemon.errors import InvalidRequest
    from criud.dump import export

    with pytest.raises(InvalidRequest, match="pre-dumps"):
        export.prepare(final, rec, "none", {})
    assert open_fds() == before


def test_a_failed_pre_dump_round_leaves_only_its_log(
    runtime: FakeRuntime, target: subprocess.Popen[bytes]
) -> None:
    runtime.criu = ChainCriu(fail_round=2)
    err = _pre_dump(runtime, target.pid, 3)
    assert err.code == "criu_failed" and "pre-dump pre-2" in err.detail, err
    (rec,) = runtime.store.list_checkpoints()
    assert rec.state == CheckpointState.FAILED and rec.name is None
    assert os.listdir(runtime.settings.checkpoints_dir) == [rec.id]
    assert os.listdir(runtime.settings.checkpoints_dir / rec.id) == [DUMP_LOG]
    assert len(runtime.criu.runs) == 2 and target.poll() is None


def _pstree_img(*tasks: tuple[int, list[int]]) -> bytes:
    """A pstree.img of (pid, threads) entries (fields 1 and 5 of criu's PstreeEntry)."""

    def varint(n: int) -> bytes:
        out = b""
        while True:
            b, n = n & 0x7F, n >> 7
            out += bytes([b | (0x80 if n else 0)])
            if not n:
                return out

    img = struct.pack("<II", images.IMG_COMMON_MAGIC, images.PSTREE_MAGIC)
    for pid, threads in tasks:
        entry = b"\x08" + varint(pid) + b"".join(b"\x28" + varint(t) for t in threads)
        img += struct.pack("<I", len(entry)) + entry
    return img


@pytest.mark.parametrize(
    ("walked", "unchecked"),
    [
        (job.Walked(tids=frozenset({10, 11, 20}), count=3), None),
        # Forked after the walk listed the tree: dumped, never checked.
        (job.Walked(tids=frozenset({10, 11}), count=2), [20]),
        # A thread started after the walk read its task's threads.
        (job.Walked(tids=frozenset({10, 20}), count=2), [11]),
        # A tree in a pid namespace of its own: only the number is compared.
        (job.Walked(tids=None, count=3), None),
        (job.Walked(tids=None, count=2), [20]),
    ],
)
def test_check_dumped_refuses_threads_the_walk_never_checked(
    tmp_path: Path, walked: job.Walked, unchecked: list[int] | None
) -> None:
    (tmp_path / "pstree.img").write_bytes(_pstree_img((10, [10, 11]), (20, [20])))
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if unchecked is None:
            job._check_dumped("ck", fd, walked)
            return
        with pytest.raises(TreeChanged) as e:
            job._check_dumped("ck", fd, walked)
        assert e.value.extra["pids"] == unchecked and e.value.status == 409
        assert "started after their owner was checked" in e.value.detail
    finally:
        os.close(fd)


def test_check_dumped_refuses_an_unreadable_pstree(tmp_path: Path) -> None:
    (tmp_path / "pstree.img").write_bytes(b"img")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with pytest.raises(TreeChanged):
            job._check_dumped("ck", fd, job.Walked(tids=frozenset({1}), count=1))
    finally:
        os.close(fd)


def test_a_non_root_callers_dump_is_checked_against_its_walk(runtime: FakeRuntime) -> None:
    """What _Dump checks the dumped tree against: nothing for root, the walk's tids else."""
    spec = job.CheckpointSpec(pid=1, name=None, options=DumpOptions(), labels={})
    tree = job.Tree(tasks=[], ids={}, run_as=None, estimate={})
    m = Manifest(pids=(5, 6))
    root = job._Dump(runtime, spec, ME, 0, tree)
    assert root._walked(m) is None
    alice = job._Dump(runtime, spec, Caller(uid=1000, gid=1000, pid=1), 0, tree)
    assert alice._walked(m) == job.Walked(tids=frozenset({5, 6}), count=2)
    in_ns = dataclasses.replace(m, namespaces={"pid": 4026532000})
    assert alice._walked(in_ns) == job.Walked(tids=None, count=2)


@pytest.fixture
def big_target() -> Iterator[subprocess.Popen[bytes]]:
    """A process with more fds than a lone process walked first has (job.FROZEN_MIN_FDS)."""
    code = (
        "import os, sys, time\n"
        f"fds = [os.open('/dev/null', os.O_RDONLY) for _ in range({job.FROZEN_MIN_FDS})]\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert p.stdout is not None and p.stdout.readline() == b"ready\n"
    yield p
    p.kill()
    p.wait(timeout=10)
    p.stdout.close()


class FrozenCriu(FakeCriu):
    """A warm pool's criu: run_notified stops at criu's notifications, as criu 4.2.1 does."""

    pool = object()

    def __init__(self, worker: bool = True) -> None:
        super().__init__()
        self.worker = worker
        self.answers: list[tuple[str, bool]] = []
        self.ran: list[str] = []

    async def run_notified(
        self, argv: Sequence[str], log: LogFile, notify: Any, **_: Any
    ) -> CriuResult | None:
        if not self.worker:
            return None
        self.ran.append("notified")
        for action in ("pre-dump", "query-ext-files", "post-dump"):
            ok = await notify(action)
            self.answers.append((action, ok))
            if not ok:  # criu resumes the tree and fails the dump
                return CriuResult(1, log.path, "RPC client reported script error", [])
        return await super().run(argv, log)

    async def run(self, argv: Sequence[str], log: LogFile, **kw: Any) -> CriuResult:
        self.ran.append("walked")
        return await super().run(argv, log, **kw)


def test_a_root_dump_walks_its_tree_at_crius_stops(
    runtime: FakeRuntime, big_target: subprocess.Popen[bytes]
) -> None:
    runtime.criu = FrozenCriu()
    before = open_fds()
    rec = _dump(runtime, big_target.pid)
    assert rec.state == CheckpointState.DONE, rec
    assert runtime.criu.answers == [
        ("pre-dump", True),
        ("query-ext-files", True),
        ("post-dump", True),
    ]
    assert runtime.criu.ran == ["notified"]
    # The manifest is the walk's, taken while criu held the tree.
    m = Manifest.from_json(rec.manifest)
    assert m.tasks[0].pid == big_target.pid and m.uids[str(big_target.pid)] == (0, 0, 0, 0)
    assert [f["fd"] for f in m.tasks[0].fds][:3] == [0, 1, 2]
    assert open_fds() == before and runtime.busy == set()


def test_no_idle_warm_worker_walks_the_tree_first(
    runtime: FakeRuntime, big_target: subprocess.Popen[bytes]
) -> None:
    runtime.criu = FrozenCriu(worker=False)
    rec = _dump(runtime, big_target.pid)
    assert rec.state == CheckpointState.DONE, rec
    assert runtime.criu.ran == ["walked"]
    # One record, the walk-first dump's: nothing of the first try is left.
    assert [r.id for r in runtime.store.list_checkpoints()] == [rec.id]
    assert os.listdir(runtime.settings.checkpoints_dir) == [rec.id]


def test_a_walk_that_fails_at_post_dump_runs_the_dump_again(
    runtime: FakeRuntime, big_target: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The frozen walk breaks (here: its manifest cannot be built once); criu
    # is told to fail at post-dump, and the dump runs again walk first.
    runtime.criu = FrozenCriu()
    real = job._Dump._build_manifest
    calls = {"n": 0}

    async def flaky(self: Any, *a: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError("a /proc read failed")
        return await real(self, *a)

    monkeypatch.setattr(job._Dump, "_build_manifest", flaky)
    rec = _dump(runtime, big_target.pid)
    assert rec.state == CheckpointState.DONE, rec
    assert runtime.criu.answers[-1] == ("post-dump", False)
    assert runtime.criu.ran == ["notified", "walked"]
    assert [r.id for r in runtime.store.list_checkpoints()] == [rec.id]
    assert os.listdir(runtime.settings.checkpoints_dir) == [rec.id]
    assert runtime.failed_updates == 0


def test_fds_criu_held_in_a_task_during_the_walk_are_left_out() -> None:
    # While criu dumps a task, its parasite holds criu's fds there: a socket
    # to criu, criu's log, the pipes the pages go through.  A walk beside
    # criu may read them; by post-dump the task no longer holds them.
    r, w = os.pipe()
    p = subprocess.Popen(["sleep", "60"], stdin=subprocess.DEVNULL, stdout=w, pass_fds=(r,))
    try:
        tasks = fdinfo.read_tree(p.pid)
        held = [f["fd"] for f in tasks[0].fds]
        # What the walk would have seen mid-dump: one end of criu's page pipe
        # and the parasite's socket, both leading outside the tree.
        tasks[0].fds.append(
            {
                "fd": 700,
                "type": "pipe",
                "key": "pipe:[1]",
                "mode": "w",
                "target": "pipe:[1]",
                "inode": 1,
                "external": True,
            }
        )
        tasks[0].fds.append(
            {
                "fd": 701,
                "type": "unix",
                "key": "socket:[2]",
                "mode": "rw",
                "target": "socket:[2]",
                "inode": 2,
                "peer": 3,
                "external": True,
            }
        )
        assert tasks[0].listed is not None
        tasks[0].listed += 2  # the walk's listing held them too
        left = job._as_left(tasks)
        assert left is not tasks
        assert [f["fd"] for f in left[0].fds] == held
        # The tree's own pipe, both ends held: not external.
        assert [f["external"] for f in left[0].fds if f["type"] == "pipe"] == [False, False]
    finally:
        p.kill()
        p.wait(timeout=10)
        os.close(r)
        os.close(w)


@pytest.fixture
def piped_sleep() -> Iterator[int]:
    """A `sleep` holding both ends of a pipe; its pid."""
    r, w = os.pipe()
    p = subprocess.Popen(["sleep", "60"], stdin=subprocess.DEVNULL, stdout=w, pass_fds=(r,))
    try:
        # In its sleep: past the loader and the locale files it opens and closes.
        assert wait_until(lambda: _wchan(p.pid) == "hrtimer_nanosleep")
        yield p.pid
    finally:
        p.kill()
        p.wait(timeout=10)
        os.close(r)
        os.close(w)


def test_a_task_holding_what_the_walk_listed_is_not_listed_again(
    piped_sleep: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The post-dump check counts each task's fds (one stat of /proc/<pid>/fd)
    # and lists again only a task whose count is not the walk's listing's.
    tasks = fdinfo.read_tree(piped_sleep)
    if fdinfo.fd_count(piped_sleep) != tasks[0].listed:
        pytest.skip("this kernel gives no fd count (Linux 6.2+ does)")

    def no_listing(pid: int) -> list[int]:
        raise AssertionError(f"pid {pid} listed again")

    monkeypatch.setattr(fdinfo, "fd_numbers", no_listing)
    assert job._as_left(tasks) is tasks
    assert asyncio.run(job._left(tasks)) is tasks


def test_a_task_of_unknown_count_is_listed_again(piped_sleep: int) -> None:
    # A listing count the walk does not know (None) proves nothing: the
    # task is listed again, and the fds it no longer holds are dropped.
    tasks = fdinfo.read_tree(piped_sleep)
    held = [f["fd"] for f in tasks[0].fds]
    gone = {"fd": 700, "type": "pipe", "key": "pipe:[1]", "mode": "w", "target": "pipe:[1]"}
    tasks[0].fds.append({**gone, "inode": 1, "external": True})
    tasks[0].listed = None
    left = job._as_left(tasks)
    assert [f["fd"] for f in left[0].fds] == held


def test_a_small_lone_process_is_walked_before_criu(
    runtime: FakeRuntime, target: subprocess.Popen[bytes]
) -> None:
    # Below job.FROZEN_MIN_FDS fds and without children, the walk costs less
    # than criu's stops: no notifications, the walk first.
    runtime.criu = FrozenCriu()
    rec = _dump(runtime, target.pid)
    assert rec.state == CheckpointState.DONE, rec
    assert runtime.criu.ran == ["walked"] and runtime.criu.answers == []


def _wchan(pid: int) -> str:
    with open(f"/proc/{pid}/wchan") as f:
        return f.read()


@pytest.mark.parametrize("kernel_counts", [True, False])
def test_holds_many_fds_with_and_without_the_kernels_count(
    big_target: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch, kernel_counts: bool
) -> None:
    # Linux 6.2 and later give /proc/<pid>/fd's fd count as its size; an
    # older kernel gives 0, and the bounded listing answers instead.
    if not kernel_counts:
        monkeypatch.setattr(job.fdinfo, "fd_count", lambda pid: 0)
    small = subprocess.Popen(["sleep", "60"], stdin=subprocess.DEVNULL)
    try:
        assert job._holds_many_fds(big_target.pid)
        assert not job._holds_many_fds(small.pid)
    finally:
        small.kill()
        small.wait(timeout=10)
