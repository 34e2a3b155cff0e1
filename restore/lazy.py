"""Lazy restore: the tree runs before its memory is in.

`criu lazy-pages` is started first, in the restore's run dir (its -W),
where it listens on `lazy-pages.socket`; then `criu restore --lazy-pages`
(same -W) creates the tree with its anonymous memory registered with
userfaultfd and hands the uffds to the server, which fills each page on
its first touch and the rest in the background.  The server exits by itself
once every page is in (or the tree has exited): that is when the restore
record gets `lazy_done_at` and `pages_lazy`.

The images must stay while the server reads them: the restore's job pins
the checkpoint (a DELETE answers 409 busy) and the watcher here releases
the pin when the server ends.  The server runs as the uid criu restores as,
reads the images through the dir fd the daemon holds (never a caller's
path), and logs into a file the daemon created and reads back by fd.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

from criud.daemon import imgdir
from criud.daemon.criu import Criu, LogFile, RunAs, read_log_fd
from criud.daemon.store import Store

log = logging.getLogger("criud.restore.lazy")

LAZY_LOG = "lazy-pages.log"
# criu lazy-pages logs, per task, at -v4: "UFFD transferred pages: (copied/total)".
_TRANSFERRED = re.compile(r"UFFD transferred pages: \((\d+)/(\d+)\)")


def lazy_pages_argv(images_arg: Path, work_dir: Path, unprivileged: bool) -> list[str]:
    """`criu lazy-pages` for one restore (its --status-fd is added by Criu.start_server)."""
    argv = ["lazy-pages", "--no-default-config", "-D", str(images_arg), "-W", str(work_dir)]
    argv += ["-o", "-", "-v4"]
    if unprivileged:
        argv.append("--unprivileged")
    return argv


def pages_served(lines: list[str]) -> int | None:
    """The pages the server copied in, summed over the tree's tasks (None: none logged)."""
    counts = [int(m.group(1)) for ln in lines if (m := _TRANSFERRED.search(ln))]
    return sum(counts) if counts else None


class Server:
    """The lazy-pages server of one restore: started, then watched until it ends."""

    def __init__(self, criu: Criu, restore_id: str) -> None:
        self.criu, self.restore_id = criu, restore_id
        self.proc: asyncio.subprocess.Process | None = None
        self.log_fd = -1

    async def start(
        self, images_arg: Path, run_fd: int, images_fd: int, run_as: RunAs | None
    ) -> None:
        """Start `criu lazy-pages` in the run dir; return once it listens."""
        self.log_fd = imgdir.create_log(run_fd, LAZY_LOG)
        work = Path(f"/proc/self/fd/{run_fd}")
        # As the restore's criu: the images dir's fd only when it is named
        # through /proc/self/fd (a run as the tree's owner).
        pass_fds = [run_fd, images_fd] if run_as is not None else [run_fd]
        self.proc = await self.criu.start_server(
            lazy_pages_argv(images_arg, work, run_as is not None),
            LogFile(self.log_fd, work / LAZY_LOG),
            pass_fds,
            run_as,
        )

    async def stop(self) -> None:
        """The restore failed: kill the server, reap it, close its log."""
        try:
            if self.proc is not None:
                await self.criu.end(self.proc)
        finally:
            self._close()

    def _close(self) -> None:
        if self.log_fd >= 0:
            os.close(self.log_fd)
            self.log_fd = -1

    async def watch(self, store: Store, release: Callable[[], None]) -> None:
        """Wait for the server to end; record when and how many pages; unpin the images."""
        assert self.proc is not None
        try:
            try:
                rc = await self.proc.wait()
            finally:
                self.criu.running.discard(self.proc.pid)
            err, _, lines = await asyncio.to_thread(read_log_fd, self.log_fd)
            changes: dict[str, object] = {
                "lazy_done_at": time.time(),
                "pages_lazy": pages_served(lines),
            }
            if rc != 0:
                # The tree may have touched pages that never came: say so.
                log.warning("restore %s: lazy-pages exited %s: %s", self.restore_id, rc, err)
                changes["error"] = {
                    "code": "lazy_pages_failed",
                    "detail": f"criu lazy-pages exited {rc}: {err or 'no error logged'}",
                }
            with contextlib.suppress(Exception):
                await store.settle(store.update_restore, self.restore_id, **changes)
        finally:
            # Unpinned after the record: a delete that gets through finds
            # lazy_done_at set.
            release()
            self._close()
