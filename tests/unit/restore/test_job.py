"""criud.restore.job against a fake runtime: real fds, a real store, a stand-in criu.

The stand-in criu runs the restored "tree" as a real child of this process
with exactly the fds the job passes, and writes criu's pidfile into the run
dir the job gave it, so everything around criu (fd map, handles, records,
adoption of the root) runs for real.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from criud.daemon.caller import Caller
from criud.daemon.config import Settings
from criud.daemon.criu import CriuResult, LogFile
from criud.daemon.errors import CheckpointNotFound, RootExited
from criud.daemon.fdpass import recv_message, send_fds
from criud.daemon.handles import HandleStore
from criud.daemon.store import CheckpointRecord, RestoreState, Store
from criud.dump.manifest import Manifest, Task
from criud.restore import job
from criud.restore.argv import PIDFILE
from criud.restore.mappings import InheritSpec
from criud.restore.paths import PathOpener

from .._helpers import FakeCriuBase, marked, open_fds

ME = Caller(uid=0, gid=0, pid=os.getpid())
PIPE_KEY = "pipe:[4242]"


class FakeCriu(FakeCriuBase):
    """Stands in for criud.daemon.criu.Criu: runs `script` as the restored root."""

    def __init__(self, script: str, ok: bool = True, exit_first: bool = False) -> None:
        # exit_first: the root has exited (a zombie, not reaped) when criu returns.
        self.script, self.ok, self.exit_first = script, ok, exit_first
        self.argv: list[str] = []
        self.pass_fds: list[int] = []
        self.roots: list[subprocess.Popen[bytes]] = []

    async def run(
        self,
        argv: Sequence[str],
        log: LogFile,
        pass_fds: Sequence[int] = (),
        on_spawn: Callable[[int], Any] | None = None,
        **_: Any,
    ) -> CriuResult:
        self.argv, self.pass_fds = list(argv), list(pass_fds)
        if on_spawn is not None:
            await on_spawn(os.getpid())
        if not self.ok:
            os.write(log.fd, b"(00.1) Error (criu/files.c:1): Can't restore: it broke\n")
            return CriuResult(1, log.path, "Can't restore: it broke", [], log_lines=[])
        # The fd criu would install as the pipe: the one --inherit-fd names.
        fd = next(int(a[3 : a.index("]")]) for a in argv if a.endswith(f":{PIPE_KEY}"))
        root = subprocess.Popen(
            [sys.executable, "-c", self.script.format(fd=fd)], pass_fds=self.pass_fds
        )
        self.roots.append(root)
        if self.exit_first:
            os.waitid(os.P_PID, root.pid, os.WEXITED | os.WNOWAIT)
        work = argv[argv.index("-W") + 1]
        run_fd = int(work.rsplit("/", 1)[1])
        fd = os.open(
            PIDFILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=run_fd
        )
        os.write(fd, str(root.pid).encode())
        os.close(fd)
        return CriuResult(0, log.path, None, [])


class FakeChildren:
    def __init__(self) -> None:
        self.watched: dict[str, tuple[int, int]] = {}
        self.holds = 0

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        self.holds += 1
        yield

    def sweep(self) -> int:
        return 0

    def watch_restore(self, restore_id: str, pid: int, pidfd: int) -> None:
        self.watched[restore_id] = (pid, pidfd)

    def watch_lazy(self, restore_id: str, watcher: Coroutine[Any, Any, None]) -> None:
        watcher.close()
        raise AssertionError("no lazy restore in these tests")


@dataclasses.dataclass
class FakeRuntime:
    """The job's RestoreRuntime, over a real store and handle store."""

    settings: Settings
    store: Store
    criu: Any
    handles: HandleStore
    paths: PathOpener
    children: FakeChildren
    busy_ids: set[str] = dataclasses.field(default_factory=set)

    async def checkpoint_for(self, ref: str, caller: Caller) -> CheckpointRecord:
        rec = await self.store.run(self.store.get_checkpoint, ref)
        if rec is None:
            raise CheckpointNotFound(f"no checkpoint {ref!r}")
        return rec

    def busy(
        self, ckpt_id: str, message: str, shared: bool = False
    ) -> contextlib.AbstractContextManager[None]:
        # Shared or not, one holder at a time is all these tests need.
        return marked(self.busy_ids, ckpt_id, message)

    def pin(self, ckpt_id: str, message: str) -> Callable[[], None]:
        raise AssertionError("no lazy restore in these tests")


def _manifest(**kw: Any) -> dict[str, Any]:
    fd = {"fd": 1, "type": "pipe", "key": PIPE_KEY, "mode": "w", "external": True, "inode": 4242}
    # pidns_init: the job waits for no pid to be free and expects no fixed root pid.
    m = Manifest(tasks=(Task(1, 0, (1,), (fd,)),), external=(PIPE_KEY,), pidns_init=True, **kw)
    return m.to_json()


@pytest.fixture
def runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeRuntime]:
    settings = Settings(state_dir=tmp_path)
    for d in (settings.checkpoints_dir, settings.run_dir):
        d.mkdir(parents=True, mode=0o700)
    store = Store(settings.db_path)
    store.open()
    # The images are criu's business; the tree they hold is given here.
    monkeypatch.setattr(job, "_read_pstree", lambda *_: [{"pid": 1, "threads": [1]}])
    rt = FakeRuntime(settings, store, None, HandleStore(), PathOpener(5.0, set()), FakeChildren())
    yield rt
    store.close()


def _checkpoint(rt: FakeRuntime, **manifest: Any) -> CheckpointRecord:
    rec = CheckpointRecord(
        id="0" * 24,
        name="c",
        pid=1,
        state="done",
        created_at=time.time(),
        options={},
        labels={},
        owner_uid=0,
        manifest=_manifest(**manifest),
    )
    rt.store.insert_checkpoint(rec)
    (rt.settings.checkpoints_dir / rec.id).mkdir(mode=0o700)
    return rec


async def _handle(rt: FakeRuntime, *fds: int) -> str:
    """Hand fds in as a handle, by SCM_RIGHTS over a socketpair, as the fd socket does."""
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with left, right:
        send_fds(left, b"{}", list(fds))
        _, owned = recv_message(right)
    return rt.handles.add(0, os.getpid(), owned, None, 60.0).id


def _restore(rt: FakeRuntime, criu: FakeCriu, **manifest: Any) -> tuple[Any, int]:
    """Run one restore of a pipe's write end through a handle; (outcome, read end)."""
    rt.criu = criu
    ckpt = _checkpoint(rt, **manifest)
    r, w = os.pipe()

    async def go() -> Any:
        hid = await _handle(rt, w)
        os.close(w)
        spec = job.RestoreSpec(ckpt.id, (InheritSpec(key=PIPE_KEY, handle=hid, index=0),))
        try:
            return await job.run(rt, spec, ME)
        except Exception as e:
            return e

    return asyncio.run(go()), r


def test_a_restore_hands_the_handles_fd_to_the_worker_and_adopts_the_root(
    runtime: FakeRuntime,
) -> None:
    before = open_fds()
    out, r = _restore(
        runtime, FakeCriu("import os, time; os.write({fd}, b'restored'); time.sleep(30)")
    )
    try:
        assert not isinstance(out, Exception), out
        assert out.state == RestoreState.RUNNING
        criu = runtime.criu
        # One --inherit-fd, naming an fd the worker was passed: both from the map.
        i = criu.argv.index("--inherit-fd")
        fd = int(criu.argv[i + 1].removeprefix("fd[").split("]")[0])
        assert criu.argv[i + 1] == f"fd[{fd}]:{PIPE_KEY}" and fd in criu.pass_fds
        assert criu.argv.count("--inherit-fd") == 1
        assert os.read(r, 100) == b"restored"
        pid, pidfd = runtime.children.watched[out.id]
        assert pid == out.pid == criu.roots[0].pid
        # The handle was consumed by the restore that worked.
        assert runtime.handles.list(0) == []
    finally:
        for p in runtime.criu.roots:
            p.kill()
            p.wait(timeout=10)
        os.close(r)
        for _, pidfd in runtime.children.watched.values():
            os.close(pidfd)
    assert open_fds() == before


def test_a_failed_criu_fails_the_record_once_and_closes_every_fd(runtime: FakeRuntime) -> None:
    before = open_fds()
    out, r = _restore(runtime, FakeCriu("", ok=False))
    os.close(r)
    assert out.code == "criu_failed" and "it broke" in out.detail
    (rec,) = runtime.store.list_restores()
    assert rec.state == RestoreState.FAILED and rec.error["code"] == "criu_failed"
    # The handle stays usable after a failed restore, and nothing else is open.
    (h,) = runtime.handles.list(0)
    runtime.handles.delete(h.id, 0)
    assert open_fds() == before
    assert runtime.busy_ids == set()


def test_a_root_that_exits_before_it_is_watched_is_recorded_exited(runtime: FakeRuntime) -> None:
    """It answered 500 internal_error (issue 12): now RootExited, and the record says exited."""
    before = open_fds()
    out, r = _restore(runtime, FakeCriu("import sys; sys.exit(7)", exit_first=True))
    os.close(r)
    runtime.criu.roots[0].wait(timeout=10)  # it may be reaped already: either way
    assert isinstance(out, RootExited), out
    assert out.status == 409 and out.code == "restored_root_exited"
    (rec,) = runtime.store.list_restores()
    assert (rec.state, rec.exit_code, rec.pid) == (RestoreState.EXITED, 7, out_pid(runtime))
    assert rec.error["code"] == "restored_root_exited"
    assert runtime.children.watched == {}
    (h,) = runtime.handles.list(0)
    runtime.handles.delete(h.id, 0)
    assert open_fds() == before


def out_pid(rt: FakeRuntime) -> int:
    return rt.criu.roots[0].pid


def test_adopt_closes_the_pidfd_when_the_store_update_raises(
    runtime: FakeRuntime, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The pidfd leaked when recording the root failed (issue 12)."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    run_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fd = os.open(PIDFILE, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600, dir_fd=run_fd)
        os.write(fd, str(child.pid).encode())
        os.close(fd)
        before = open_fds()

        async def broken(*_: Any, **__: Any) -> None:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(runtime.store, "run", broken)
        with pytest.raises(OSError):
            asyncio.run(job.adopt(runtime, "r" * 24, run_fd, None, None))
        assert open_fds() == before
        assert runtime.children.watched == {}
    finally:
        os.close(run_fd)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)


def test_the_argv_is_built_once_with_the_dumps_network_lock(
    runtime: FakeRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two builds disagreed on --network-lock (issue 12): one build, the dump's lock."""
    builds: list[list[str]] = []
    real = job.restore_argv

    def counted(*a: Any, **kw: Any) -> list[str]:
        builds.append(real(*a, **kw))
        return builds[-1]

    monkeypatch.setattr(job, "restore_argv", counted)
    out, r = _restore(runtime, FakeCriu("", ok=False), network_lock="nftables")
    os.close(r)
    assert out.code == "criu_failed"
    assert builds == [runtime.criu.argv]
    i = runtime.criu.argv.index("--network-lock")
    assert runtime.criu.argv[i + 1] == "nftables" and runtime.criu.argv.count("--network-lock") == 1
    (h,) = runtime.handles.list(0)
    runtime.handles.delete(h.id, 0)


def test_a_stdio_handle_stands_for_the_roots_fds_0_1_2(runtime: FakeRuntime) -> None:
    """Issue 17's shorthand in the job: expanded before resolve, leased like any handle."""
    before = open_fds()
    runtime.criu = FakeCriu("", ok=False)
    ckpt = _checkpoint(runtime)
    r, w = os.pipe()
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)

    async def go(*fds: int) -> Any:
        hid = await _handle(runtime, *fds)
        try:
            return await job.run(runtime, job.RestoreSpec(ckpt.id, stdio=hid), ME)
        except Exception as e:
            return e

    try:
        # Two fds: refused before anything is leased.
        assert asyncio.run(go(null, w)).code == "bad_fd_handle"
        # Three: the root's fd 1 (the external pipe) takes index 1, the write end.
        assert asyncio.run(go(null, w, null)).code == "criu_failed"
        argv = runtime.criu.argv
        assert argv.count("--inherit-fd") == 1
        arg = argv[argv.index("--inherit-fd") + 1]
        assert arg.endswith(f":{PIPE_KEY}")
        fd = int(arg.removeprefix("fd[").split("]")[0])
        assert fd in runtime.criu.pass_fds
    finally:
        for h in runtime.handles.list(0):
            runtime.handles.delete(h.id, 0)
        for x in (r, w, null):
            os.close(x)
    assert open_fds() == before
