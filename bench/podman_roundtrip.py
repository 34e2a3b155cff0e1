"""criud's archive round trip against Podman's, for 256 MiB of random data (issue 14).

    python bench/podman_roundtrip.py [--mib 256] [--runs 5]

Side by side, interleaved, as root:

  criud   a plain process tree holding MIB of random data (busybox dd that
          has read it all and blocks writing into a pipe nobody reads):
          POST /v1/checkpoints, GET .../archive (zstd) to a file,
          POST /v1/checkpoints/import of that file, POST /v1/restores;
  podman  the same tree as a container (runc): podman container checkpoint
          --export, then podman container restore --import.

Prints each phase's median (wall clock, as a caller sees it) and writes
bench/results/<date>-podman-roundtrip.json.  Podman 4.3.1 and runc from
Debian (deploy/install-test-deps); the image is a local busybox import.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.integration import podman as pm
from tests.integration.helpers import Daemon, temp_root, wait_for

HOLD = "dd if=/dev/urandom bs={mib}M count=1 iflag=fullblock | sleep 1000000"


def _rss_kib(pid: int) -> int:
    """VmRSS of pid and its children (the dd holding the data is one)."""
    total = 0
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(x) for x in f.read().split()]
    except OSError:
        return 0
    for p in (pid, *kids):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def _wait_filled(pid: int, mib: int) -> None:
    wait_for(lambda: _rss_kib(pid) >= mib * 1024, 120, what=f"pid {pid} to hold {mib} MiB")


def criud_cycle(d: Daemon, root: Path, mib: int) -> dict[str, float]:
    """checkpoint, export, import, restore of a plain tree; seconds per phase."""
    p = subprocess.Popen(
        ["setsid", "busybox", "sh", "-c", HOLD.format(mib=mib)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _wait_filled(p.pid, mib)
    c, out = d.client, root / "criud.tar.zst"
    t0 = time.monotonic()
    ck = c.checkpoint(p.pid, name=f"rt-{uuid.uuid4().hex[:6]}")
    t1 = time.monotonic()
    p.wait(timeout=30)
    with open(out, "wb") as f:
        c.export(ck["id"], f)
    t2 = time.monotonic()
    with open(out, "rb") as f:
        imp = c.import_archive(f, name=f"rt-imp-{uuid.uuid4().hex[:6]}")
    t3 = time.monotonic()
    c.delete(ck["id"])  # its pids must be free for the restore
    res = c.restore(imp["id"])
    t4 = time.monotonic()
    # The whole restored group: the root's SIGKILL alone left its `sleep`
    # child running (found after the bench's runs, reparented to PID 1).
    os.killpg(int(res["pid"]), signal.SIGKILL)
    wait_for(lambda: c.get_restore(res["id"])["state"] == "exited", 30)
    c.delete(imp["id"])
    size = out.stat().st_size
    out.unlink()
    return {
        "checkpoint": t1 - t0,
        "export": t2 - t1,
        "import": t3 - t2,
        "restore": t4 - t3,
        "total": t4 - t0,
        "archive_mib": size / (1 << 20),
    }


def podman_cycle(podman: pm.Podman, image: str, root: Path, mib: int) -> dict[str, float]:
    """podman checkpoint --export, restore --import of the same tree in a container."""
    name = f"criud-bench-{uuid.uuid4().hex[:6]}"
    cid = podman(
        "run", "-d", *pm.RUN_FLAGS, "--name", name, image, "sh", "-c", HOLD.format(mib=mib)
    )
    podman.containers.append(cid)
    _wait_filled(int(podman.inspect(cid)["State"]["Pid"]), mib)
    out = root / "podman.tar.zst"
    t0 = time.monotonic()
    podman.export(cid, out)
    t1 = time.monotonic()
    new = podman.restore_import(out, name + "-r")
    t2 = time.monotonic()
    size = out.stat().st_size
    out.unlink()
    podman.cleanup_containers([cid, str(new["Id"])])
    return {
        "checkpoint_export": t1 - t0,
        "restore_import": t2 - t1,
        "total": t2 - t0,
        "archive_mib": size / (1 << 20),
    }


def _medians(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: round(statistics.median(r[k] for r in runs), 3) for k in runs[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    if pm.missing():
        sys.exit(f"cannot run: {pm.missing()}")
    podman = pm.Podman()
    got: dict[str, list[dict[str, float]]] = {"criud": [], "podman": []}
    with temp_root() as root:
        d = Daemon(root).start()
        try:
            image, _ = podman.build_image(root)
            for i in range(args.runs):
                # Interleaved, alternating which goes first: drift hits both.
                order = ("criud", "podman") if i % 2 == 0 else ("podman", "criud")
                for side in order:
                    if side == "criud":
                        got[side].append(criud_cycle(d, root, args.mib))
                    else:
                        got[side].append(podman_cycle(podman, image, root, args.mib))
                    print(side, json.dumps(got[side][-1]), flush=True)
        finally:
            podman.cleanup()
            d.stop()
    result: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "mib": args.mib,
        "runs": args.runs,
        "loadavg": os.getloadavg(),
        "median_s": {side: _medians(runs) for side, runs in got.items()},
        "raw": got,
    }
    print(json.dumps(result["median_s"], indent=1))
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    stamp = datetime.date.today().isoformat()
    (out / f"{stamp}-podman-roundtrip.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
