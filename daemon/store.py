"""Persistent metadata: SQLite (stdlib, WAL) in the state dir.

The store is synchronous and deliberately small.  The daemon calls it through
one dedicated thread (see ``Store.run``) so SQLite never blocks the event loop
and never sees two threads at once.

State transitions of checkpoints and restores live here, in one place, and
are checked: an illegal transition is a bug and raises AssertionError.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import json
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

# Checkpoint states: dumping -> done | failed | interrupted.
CHECKPOINT_TRANSITIONS: dict[str, set[str]] = {
    "dumping": {"done", "failed", "interrupted"},
    "done": set(),
    "failed": set(),
    "interrupted": set(),
}
# Restore states: restoring -> running | failed | interrupted; running -> exited.
RESTORE_TRANSITIONS: dict[str, set[str]] = {
    "restoring": {"running", "failed", "interrupted"},
    "running": {"exited"},
    "exited": set(),
    "failed": set(),
    "interrupted": set(),
}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS checkpoints (
    id TEXT PRIMARY KEY,
    name TEXT,
    pid INTEGER NOT NULL,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    finished_at REAL,
    size_bytes INTEGER,
    options TEXT NOT NULL,
    labels TEXT NOT NULL,
    criu_version TEXT,
    stats TEXT,
    manifest TEXT,
    error TEXT,
    owner_uid INTEGER NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS checkpoints_name ON checkpoints(name) WHERE name IS NOT NULL;
CREATE TABLE IF NOT EXISTS restores (
    id TEXT PRIMARY KEY,
    checkpoint_id TEXT NOT NULL,
    pid INTEGER,
    state TEXT NOT NULL,
    started_at REAL NOT NULL,
    finished_at REAL,
    exit_code INTEGER,
    exit_signal INTEGER,
    stats TEXT,
    error TEXT,
    owner_uid INTEGER NOT NULL,
    proc_start INTEGER,
    ns_pid INTEGER
);
"""
# Columns added after the first release: (table, column, type).
_MIGRATIONS = (
    ("restores", "ns_pid", "INTEGER"),
    ("checkpoints", "external_keys", "TEXT"),
    ("restores", "tree_pids", "TEXT"),
)
# What a list of checkpoints reads: everything but the manifest, whose fd
# tables can be large (json.loads of 1,000 of them dominated a list).
_SUMMARY_COLUMNS = (
    "id, name, pid, state, created_at, finished_at, size_bytes, options, labels, "
    "criu_version, stats, error, owner_uid, external_keys"
)


class NameConflict(Exception):
    """The unique name index refused an insert."""


@dataclasses.dataclass
class CheckpointRecord:
    id: str
    name: str | None
    pid: int
    state: str
    created_at: float
    options: dict[str, Any]
    labels: dict[str, str]
    owner_uid: int
    finished_at: float | None = None
    size_bytes: int | None = None
    criu_version: str | None = None
    stats: dict[str, Any] | None = None
    manifest: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    # The manifest's external keys, kept apart so a list need not parse it.
    external_keys: list[str] | None = None


@dataclasses.dataclass
class RestoreRecord:
    id: str
    checkpoint_id: str
    state: str
    started_at: float
    owner_uid: int
    pid: int | None = None
    finished_at: float | None = None
    exit_code: int | None = None
    exit_signal: int | None = None
    stats: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    proc_start: int | None = None
    # The root's pid inside its own pid namespace (== pid on the host when
    # the tree shares the daemon's).
    ns_pid: int | None = None
    # What a restore will create, recorded before criu runs (criud.daemon.
    # orphans.plan): how a restarted daemon finds what a killed one left.
    tree_pids: dict[str, Any] | None = None


_JSON_FIELDS = {"options", "labels", "stats", "manifest", "error", "external_keys", "tree_pids"}


def _dump(field: str, value: Any) -> Any:
    if field in _JSON_FIELDS and value is not None:
        return json.dumps(value, sort_keys=True)
    return value


def _load(row: sqlite3.Row) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in row.keys():  # noqa: SIM118 - sqlite3.Row has no __iter__ of keys
        value = row[key]
        out[key] = json.loads(value) if key in _JSON_FIELDS and value is not None else value
    return out


class Store:
    """SQLite-backed records of checkpoints and restores."""

    def __init__(self, path: Path) -> None:
        self._path = path
        # One thread owns the connection; every call goes through it.
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="criud-db"
        )
        self._db: sqlite3.Connection | None = None
        # Bumped on every write to checkpoints: lets readers cache what they
        # derive from the list (only the store's thread writes it).
        self.generation = 0

    # -- plumbing ---------------------------------------------------------------

    def open(self) -> None:
        """Open (creating if needed) the database; call before anything else."""
        self._pool.submit(self._open).result()

    def _open(self) -> None:
        # sqlite3 opens its files without O_CLOEXEC; Python never passes them
        # to children (subprocess uses close_fds=True), and restores get an
        # explicit fd map, so nothing of SQLite reaches criu.
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.close(fd)
        db = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA)
        for table, column, kind in _MIGRATIONS:
            have = {r["name"] for r in db.execute(f"PRAGMA table_info({table})")}
            if column not in have:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
        self._db = db

    def close(self) -> None:
        """Close the database and stop its thread."""

        def _close() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        self._pool.submit(_close).result()
        self._pool.shutdown(wait=True)

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a store method on the store's thread, off the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    @property
    def db(self) -> sqlite3.Connection:
        assert self._db is not None, "store not open"
        return self._db

    # -- checkpoints ------------------------------------------------------------

    def insert_checkpoint(self, rec: CheckpointRecord) -> None:
        """Insert a new checkpoint record; NameConflict if its name is taken."""
        self.generation += 1
        fields = dataclasses.asdict(rec)
        cols = ", ".join(fields)
        marks = ", ".join("?" for _ in fields)
        try:
            self.db.execute(
                f"INSERT INTO checkpoints ({cols}) VALUES ({marks})",
                [_dump(k, v) for k, v in fields.items()],
            )
        except sqlite3.IntegrityError as e:
            raise NameConflict(str(e)) from e

    def update_checkpoint(self, ckpt_id: str, **changes: Any) -> None:
        """Change fields of a checkpoint; a state change must be a legal one."""
        self.generation += 1
        if changes.get("manifest") is not None:
            changes["external_keys"] = list(changes["manifest"].get("external", []))
        self._update("checkpoints", CHECKPOINT_TRANSITIONS, ckpt_id, changes)

    def _update(
        self, table: str, transitions: dict[str, set[str]], row_id: str, changes: dict[str, Any]
    ) -> None:
        """UPDATE one row; a state change must be one of the table's legal transitions."""
        if "state" in changes:
            row = self.db.execute(f"SELECT state FROM {table} WHERE id=?", (row_id,)).fetchone()
            assert row is not None, row_id
            old, new = row["state"], changes["state"]
            assert new in transitions[old], f"{table} {row_id}: {old} -> {new}"
        sets = ", ".join(f"{k}=?" for k in changes)
        self.db.execute(
            f"UPDATE {table} SET {sets} WHERE id=?",
            [*(_dump(k, v) for k, v in changes.items()), row_id],
        )

    def get_checkpoint(self, ref: str) -> CheckpointRecord | None:
        """Look a checkpoint up by id, then by name."""
        row = self.db.execute(
            "SELECT * FROM checkpoints WHERE id=? UNION ALL "
            "SELECT * FROM checkpoints WHERE name=? LIMIT 1",
            (ref, ref),
        ).fetchone()
        return CheckpointRecord(**_load(row)) if row is not None else None

    def list_checkpoints(self, summary: bool = False) -> list[CheckpointRecord]:
        """Every checkpoint record, oldest first; summary leaves the manifest out."""
        cols = _SUMMARY_COLUMNS if summary else "*"
        rows = self.db.execute(f"SELECT {cols} FROM checkpoints ORDER BY created_at").fetchall()
        return [CheckpointRecord(**_load(r)) for r in rows]

    def delete_checkpoint(self, ckpt_id: str) -> None:
        """Forget a checkpoint record."""
        self.generation += 1
        self.db.execute("DELETE FROM checkpoints WHERE id=?", (ckpt_id,))

    def interrupt_unfinished(self) -> list[str]:
        """Mark dumps a previous daemon left half-done as interrupted; return their ids.

        Restores left `restoring` are not touched here: the daemon first
        kills what each left (criud.daemon.orphans), then fails it through
        update_restore.
        """
        self.generation += 1
        now = time.time()
        ck = [r["id"] for r in self.db.execute("SELECT id FROM checkpoints WHERE state='dumping'")]
        self.db.execute(
            "UPDATE checkpoints SET state='interrupted', name=NULL, finished_at=? "
            "WHERE state='dumping'",
            (now,),
        )
        return ck

    # -- restores ---------------------------------------------------------------

    def insert_restore(self, rec: RestoreRecord) -> None:
        """Insert a new restore record."""
        fields = dataclasses.asdict(rec)
        cols = ", ".join(fields)
        marks = ", ".join("?" for _ in fields)
        self.db.execute(
            f"INSERT INTO restores ({cols}) VALUES ({marks})",
            [_dump(k, v) for k, v in fields.items()],
        )

    def update_restore(self, restore_id: str, **changes: Any) -> None:
        """Change fields of a restore; a state change must be a legal one."""
        self._update("restores", RESTORE_TRANSITIONS, restore_id, changes)

    def get_restore(self, restore_id: str) -> RestoreRecord | None:
        """Look a restore up by id."""
        row = self.db.execute("SELECT * FROM restores WHERE id=?", (restore_id,)).fetchone()
        return RestoreRecord(**_load(row)) if row is not None else None

    def list_restores(self, state: str | None = None) -> list[RestoreRecord]:
        """Every restore record (optionally of one state), oldest first."""
        if state is None:
            rows = self.db.execute("SELECT * FROM restores ORDER BY started_at").fetchall()
        else:
            rows = self.db.execute(
                "SELECT * FROM restores WHERE state=? ORDER BY started_at", (state,)
            ).fetchall()
        return [RestoreRecord(**_load(r)) for r in rows]
