"""criud.daemon.audit: entries survive a full disk, in order."""

from __future__ import annotations

import errno
import json
import os
import threading
from pathlib import Path

import pytest

from criud.daemon import audit
from criud.daemon.audit import AuditLog


def test_full_disk_delays_entries_and_loses_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = os.write
    full = threading.Event()
    full.set()
    refused = threading.Semaphore(0)

    def write(fd: int, data: bytes) -> int:
        if full.is_set():
            refused.release()
            raise OSError(errno.ENOSPC, "No space left on device")
        # A short write, as ENOSPC half-way through a line gives.
        return real_write(fd, data[: max(1, len(data) // 2)])

    monkeypatch.setattr(audit.os, "write", write)
    log = AuditLog(tmp_path / "audit.log")
    log.start()
    try:
        for i in range(3):
            log.record(action="checkpoint", n=i)
            # The writer tried this entry (and any before it) and was refused.
            assert refused.acquire(timeout=10)
        assert (tmp_path / "audit.log").read_bytes() == b""
        full.clear()
        log.record(action="checkpoint", n=3)
    finally:
        log.stop()
    got = [json.loads(x)["n"] for x in (tmp_path / "audit.log").read_text().splitlines()]
    assert got == [0, 1, 2, 3]


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EDQUOT])
def test_daemon_own_enospc_is_no_space(tmp_path: Path, err: int) -> None:
    import asyncio

    from criud.daemon.caller import Caller
    from criud.daemon.config import Settings
    from criud.daemon.core import Core
    from criud.daemon.errors import NoSpace

    core = Core(Settings(state_dir=tmp_path))

    async def mkdir() -> None:
        raise OSError(err, os.strerror(err), str(tmp_path / "checkpoints" / ".tmp-x"))

    caller = Caller(uid=1000, gid=1000, pid=1)
    with pytest.raises(NoSpace) as e:
        asyncio.run(core._audited("checkpoint", caller, {"pid": 1}, mkdir()))
    assert (e.value.status, e.value.code) == (507, "no_space")
    assert ".tmp-x" in e.value.detail
    # Audited with its code, like any refused call.
    (entry,) = [core.audit._q.get_nowait()]
    assert entry["outcome"] == "no_space"  # type: ignore[index]
