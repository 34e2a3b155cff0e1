"""What a thread hop costs against the work it carries (issue 13: "no thread hop where
the work is below a few hundred µs (measure)").

    python bench/hops.py [--n 2000]

In one asyncio loop, interleaved, medians in µs: a round trip through
asyncio.to_thread with no work; the store's small calls (one indexed row)
through the store's own thread and inline; and a restore's run dir made and
removed.  The store holds
1,000 checkpoint records, as in the API benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import _repo  # noqa: F401  (puts the repo on sys.path)

from criud.daemon import imgdir
from criud.daemon.store import CheckpointRecord, RestoreRecord, Store

Case = Callable[[], Awaitable[Any]]


def _manifest(pid: int) -> dict[str, Any]:
    fds = [{"fd": n, "type": "pipe", "key": f"pipe:[{1000 + n}]", "mode": "r"} for n in range(4)]
    return {
        "tasks": [{"pid": pid, "ppid": 1, "tids": [pid], "fds": fds}],
        "external": [],
        "pids": [pid],
        "uids": {str(pid): [0, 0, 0, 0]},
        "gids": {str(pid): [0, 0, 0, 0]},
        "groups": None,
        "run_as": None,
        "namespaces": {},
        "pidns_init": False,
        "network_lock": None,
    }


def _seed(store: Store, n: int) -> tuple[str, str]:
    ckpt = ""
    for i in range(n):
        ckpt = f"c{i:05d}"
        store.insert_checkpoint(
            CheckpointRecord(
                id=ckpt,
                name=None,
                pid=1000 + i,
                state="done",
                created_at=time.time(),
                options={"leave_running": True},
                labels={},
                owner_uid=0,
                size_bytes=1 << 20,
                manifest=_manifest(1000 + i),
            )
        )
    rst = RestoreRecord(
        id="r0", checkpoint_id=ckpt, state="restoring", started_at=time.time(), owner_uid=0
    )
    store.insert_restore(rst)
    return ckpt, rst.id


def _cases(store: Store, ckpt: str, rst: str, root: Path) -> dict[str, tuple[Case, Case]]:
    """name -> (through a thread, inline)."""
    loop_inline = store.run_inline  # the inline path, lock and all

    async def noop_thread() -> None:
        await asyncio.to_thread(lambda: None)

    async def noop_inline() -> None:
        return None

    def store_pair(fn: Callable[..., Any], *a: Any, **k: Any) -> tuple[Case, Case]:
        async def hop() -> Any:
            return await store.run_threaded(fn, *a, **k)

        async def inline() -> Any:
            return loop_inline(fn, *a, **k)

        return hop, inline

    run_dir = root / "run"
    run_dir.mkdir()

    def mk_rm() -> None:
        fd = imgdir.make_run_dir(run_dir, "x", None)
        os.close(fd)
        imgdir.remove_dir(run_dir, "x")

    async def mk_rm_thread() -> None:
        await asyncio.to_thread(mk_rm)

    async def mk_rm_inline() -> None:
        mk_rm()

    return {
        "to_thread, no work": (noop_thread, noop_inline),
        "store get_checkpoint": store_pair(store.get_checkpoint, ckpt),
        "store find_checkpoint (by name miss)": store_pair(store.find_checkpoint, "nope", 0, 0),
        "store get_restore": store_pair(store.get_restore, rst),
        "store update_restore": store_pair(store.update_restore, rst, stats={"a": 1}),
        "store checkpoint_usage (1,000 records)": store_pair(store.checkpoint_usage, 0),
        "run dir made + removed": (mk_rm_thread, mk_rm_inline),
    }


async def _measure(cases: dict[str, tuple[Case, Case]], n: int) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, list[float]]] = {k: {"thread": [], "inline": []} for k in cases}
    for i in range(n):
        for name, (hop, inline) in cases.items():
            order = (("thread", hop), ("inline", inline))
            for side, fn in order if i % 2 else order[::-1]:
                t = time.perf_counter()
                await fn()
                out[name][side].append(time.perf_counter() - t)
    return {
        k: {s: round(statistics.median(v) * 1e6, 1) for s, v in sides.items()}
        for k, sides in out.items()
    }


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--records", type=int, default=1000)
    a = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="criud-hops-", dir="/dev/shm"))
    store = Store(root / "criud.db")
    try:
        store.open()
        ckpt, rst = _seed(store, a.records)  # nothing else uses the store yet
        res = asyncio.run(_measure(_cases(store, ckpt, rst, root), a.n))
    finally:
        store.close()
        shutil.rmtree(root, ignore_errors=True)
    print(f"{'what':42s} {'thread µs':>10s} {'inline µs':>10s}")
    for k, v in res.items():
        print(f"{k:42s} {v['thread']:10.1f} {v['inline']:10.1f}")
    print(json.dumps({"load": os.getloadavg(), "n": a.n, "results": res}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
