"""A daemon started on the previous release's database migrates it and restores from it.

The checkpoint is real (images made by criu through the daemon); its row is
moved into a database built from tests/data/store-v0.sql, which the previous
release's store wrote (schema user_version 0, names unique across users).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from criud.daemon.store import SCHEMA_VERSION
from tests.integration.helpers import Daemon, Procs, pid_gone, temp_root, wait_for

V0_SQL = Path(__file__).parents[1] / "data" / "store-v0.sql"


def _row(db_path: Path, ckpt_id: str) -> dict[str, Any]:
    db = sqlite3.connect(db_path)
    db.row_factory = sqlite3.Row
    try:
        row = db.execute("SELECT * FROM checkpoints WHERE id=?", (ckpt_id,)).fetchone()
        return {k: row[k] for k in row.keys()}  # noqa: SIM118 - sqlite3.Row
    finally:
        db.close()


def _downgrade(db_path: Path, row: dict[str, Any]) -> None:
    """Replace the database with the previous release's, holding row (its columns only)."""
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db_path}{suffix}").unlink(missing_ok=True)
    db = sqlite3.connect(db_path)
    try:
        db.executescript(V0_SQL.read_text())
        cols = [r[1] for r in db.execute("PRAGMA table_info(checkpoints)")]
        marks = ", ".join("?" for _ in cols)
        with db:
            db.execute(
                f"INSERT INTO checkpoints ({', '.join(cols)}) VALUES ({marks})",
                [row[c] for c in cols],
            )
        assert db.execute("PRAGMA user_version").fetchone()[0] == 0
    finally:
        db.close()
    db_path.chmod(0o600)


def test_restore_from_previous_release_database(procs: Procs) -> None:
    with temp_root() as root:
        d = Daemon(root).start()
        try:
            p = procs.spawn(["sleep", "1000"])
            ck = d.client.checkpoint(p.pid, name="nap")
            p.wait(timeout=10)
            assert d.stop() == 0, d.log()
            db_path = d.state_dir / "criud.db"
            _downgrade(db_path, _row(db_path, ck["id"]))

            d.start()
            # The old release's records are all there, the real one restorable.
            names = {c["name"]: c for c in d.client.checkpoints()}
            assert names["nap"]["id"] == ck["id"] and names["nap"]["owner_uid"] == 0
            # v4: records from before imports read as dumps.
            assert {c["origin"] for c in names.values()} == {"dump"}
            assert names["web"]["owner_uid"] == 1000 and "db" in names
            r = d.client.restore("nap")
            procs.adopt(r["pid"])
            assert r["state"] == "running" and r["checkpoint"] == ck["id"]
            # v5: old restores read as eager ones.
            assert all(x["lazy"] is False and x["pages_lazy"] is None for x in d.client.restores())
            assert not pid_gone(r["pid"])
            d.client.signal(r["id"], "KILL")
            wait_for(lambda: d.client.get_restore(r["id"])["state"] == "exited", 10)
            # A name the old global index held for uid 1000 is free for root now.
            q = procs.spawn(["sleep", "1000"])
            assert d.client.checkpoint(q.pid, name="web", leave_running=True)["owner_uid"] == 0
        finally:
            rc = d.stop()
        assert rc == 0, d.log()
        db = sqlite3.connect(db_path)
        try:
            assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        finally:
            db.close()
