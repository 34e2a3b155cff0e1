"""Operations' progress: the Reporter's rate limit, and imgdir.usage's view of a dir."""

from __future__ import annotations

import os
from pathlib import Path

from criud.daemon import imgdir, operations
from criud.daemon.operations import Operation, Reporter


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_progress_is_published_only_when_changed_and_due() -> None:
    op = Operation("a" * 24, "checkpoint", 0, {})
    sent: list[dict[str, object]] = []
    clock = Clock()
    r = Reporter(
        op, lambda o: sent.append({"phase": o.progress.phase, **o.progress.as_dict()}), 0.25, clock
    )
    r.phase("inspecting")
    r.update(bytes_total=10)
    assert sent == [] and op.progress.phase == "inspecting" and op.progress.bytes_total == 10
    clock.t += 0.3
    r.update(bytes_done=1)
    assert sent == [
        {
            "phase": "inspecting",
            "bytes_done": 1,
            "bytes_total": 10,
            "pages_done": None,
            "pages_total": None,
        }
    ]
    clock.t += 0.1
    r.update(bytes_done=2)  # changed, not due: kept for the next due update
    assert len(sent) == 1 and op.progress.bytes_done == 2
    clock.t += 0.2
    r.update()
    assert len(sent) == 2 and sent[-1]["bytes_done"] == 2
    clock.t += 0.3
    r.update(bytes_done=2)  # no change: nothing
    assert len(sent) == 2


def test_report_outside_an_operation_does_nothing() -> None:
    assert operations.current.get() is None
    operations.report(phase="dumping", bytes_done=5)  # no error, nowhere to go


def test_usage_counts_regular_images_and_follows_nothing(tmp_path: Path) -> None:
    (tmp_path / "pages-1.img").write_bytes(b"x" * 8192)
    (tmp_path / "core-1.img").write_bytes(b"y" * 100)
    (tmp_path / "dump.log").write_bytes(b"z" * 1000)
    big = tmp_path.parent / f"{tmp_path.name}-outside"
    big.write_bytes(b"w" * 50000)
    # What an owner could plant: a link to a big file, a fifo, a dir.
    os.symlink(big, tmp_path / "pages-2.img")
    os.mkfifo(tmp_path / "pages-3.img")
    (tmp_path / "pages-4.img").mkdir()
    fd = imgdir.open_dir(tmp_path)
    try:
        assert imgdir.usage(fd) == (8192 + 100, 8192)
        # Bounded: past max_entries nothing more is looked at.
        assert imgdir.usage(fd, max_entries=0) == (0, 0)
        # The caller's fd keeps its offset (usage reads through its own).
        assert os.lseek(fd, 0, os.SEEK_CUR) == 0
    finally:
        os.close(fd)
        big.unlink()
