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
import enum
import functools
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import orjson

from criud.daemon.errors import CriudError, NameTaken, NoSpace, StoreUnusable

T = TypeVar("T")
log = logging.getLogger("criud.store")


class CheckpointState(enum.StrEnum):
    """A checkpoint's state (stored as its value; a str, so records compare as before)."""

    DUMPING = "dumping"
    DONE = "done"
    FAILED = "failed"
    INTERRUPTED = "interrupted"


class RestoreState(enum.StrEnum):
    """A restore's state."""

    RESTORING = "restoring"
    RUNNING = "running"
    EXITED = "exited"
    FAILED = "failed"
    INTERRUPTED = "interrupted"


_C, _R = CheckpointState, RestoreState
# Checkpoint states: dumping -> done | failed | interrupted.
CHECKPOINT_TRANSITIONS: dict[str, set[str]] = {
    _C.DUMPING: {_C.DONE, _C.FAILED, _C.INTERRUPTED},
    _C.DONE: set(),
    _C.FAILED: set(),
    _C.INTERRUPTED: set(),
}
# Restore states: restoring -> running | failed | interrupted; running -> exited.
RESTORE_TRANSITIONS: dict[str, set[str]] = {
    _R.RESTORING: {_R.RUNNING, _R.FAILED, _R.INTERRUPTED},
    _R.RUNNING: {_R.EXITED},
    _R.EXITED: set(),
    _R.FAILED: set(),
    _R.INTERRUPTED: set(),
}

# -- schema, by version ---------------------------------------------------------
# The database carries its schema version in PRAGMA user_version.  MIGRATIONS[v]
# takes a database from version v to v + 1, in one transaction; SCHEMA_VERSION
# is where they end.  A schema change appends one step here (and a test that
# opens the previous release's database): never edit a step that shipped.

# The tables as releases before versioning (user_version 0) created them.
_V1_TABLES = (
    """CREATE TABLE IF NOT EXISTS checkpoints (
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
)""",
    "CREATE UNIQUE INDEX IF NOT EXISTS checkpoints_name ON checkpoints(name) "
    "WHERE name IS NOT NULL",
    """CREATE TABLE IF NOT EXISTS restores (
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
)""",
)
# Columns those releases added to older databases: (table, column, type).
_V1_COLUMNS = (("restores", "ns_pid", "INTEGER"), ("checkpoints", "external_keys", "TEXT"))


def _add_column(db: sqlite3.Connection, table: str, column: str, kind: str) -> None:
    """ALTER TABLE ADD COLUMN, unless the column is there already."""
    have = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
    if column not in have:
        db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")


def _v0_to_v1(db: sqlite3.Connection) -> None:
    """An empty file, or a database of a release before versioning: that release's schema."""
    for statement in _V1_TABLES:
        db.execute(statement)
    for table, column, kind in _V1_COLUMNS:
        _add_column(db, table, column, kind)


def _v1_to_v2(db: sqlite3.Connection) -> None:
    """Names are unique per owner, no longer across users (one user's name hid another's)."""
    db.execute("DROP INDEX IF EXISTS checkpoints_name")
    db.execute(
        "CREATE UNIQUE INDEX checkpoints_owner_name ON checkpoints(owner_uid, name) "
        "WHERE name IS NOT NULL"
    )


def _v2_to_v3(db: sqlite3.Connection) -> None:
    """Restores record, before criu runs, the tasks they will create (crash recovery)."""
    _add_column(db, "restores", "tree_pids", "TEXT")


def _v3_to_v4(db: sqlite3.Connection) -> None:
    """Checkpoints record where they came from: NULL a dump, "import:criud" an archive."""
    _add_column(db, "checkpoints", "origin", "TEXT")


def _v4_to_v5(db: sqlite3.Connection) -> None:
    """Lazy restores: whether one was, how many pages came in lazily, and when the last did."""
    _add_column(db, "restores", "lazy", "INTEGER")
    _add_column(db, "restores", "pages_lazy", "INTEGER")
    _add_column(db, "restores", "lazy_done_at", "REAL")


MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (
    _v0_to_v1,
    _v1_to_v2,
    _v2_to_v3,
    _v3_to_v4,
    _v4_to_v5,
)
SCHEMA_VERSION = len(MIGRATIONS)

# What a list of checkpoints reads: everything but the manifest, whose fd
# tables can be large (json.loads of 1,000 of them dominated a list).
_SUMMARY_COLUMNS = (
    "id, name, pid, state, created_at, finished_at, size_bytes, options, labels, "
    "criu_version, stats, error, owner_uid, external_keys, origin"
)


# The daemon's name for an unusable database (kept for the server's message).
StoreError = StoreUnusable


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
    # Where it came from: None a dump of this daemon's, "import:criud" (or
    # "import:podman") an imported archive.
    origin: str | None = None


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
    # A lazy restore (its memory served by `criu lazy-pages` after it runs):
    # the pages served that way and when the last came in (None until then).
    lazy: bool | None = None
    pages_lazy: int | None = None
    lazy_done_at: float | None = None


_JSON_FIELDS = {"options", "labels", "stats", "manifest", "error", "external_keys", "tree_pids"}


_ORJSON_OPTS = orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS


def _dump(field: str, value: Any) -> Any:
    if field in _JSON_FIELDS and value is not None:
        # orjson: a manifest of 10,000 fds in 3 ms, where json.dumps took 27
        # (bench/scaling_bench.py).  Stored as text, as json.dumps did; what
        # orjson refuses (an int past 64 bits) goes through json as before.
        try:
            return orjson.dumps(value, option=_ORJSON_OPTS).decode()
        except TypeError:
            return json.dumps(value, sort_keys=True)
    return value


def _load(row: sqlite3.Row) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in row.keys():  # noqa: SIM118 - sqlite3.Row has no __iter__ of keys
        value = row[key]
        out[key] = _loads(value) if key in _JSON_FIELDS and value is not None else value
    return out


def _loads(text: str) -> Any:
    """A stored JSON field (orjson: 4x faster than json on a big manifest)."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        # Rows json.dumps wrote may hold what orjson refuses (NaN, big ints).
        return json.loads(text)


# Store methods run() may call inline on the event loop: one row by its
# key.  (checkpoint_usage is not one: it scans the table, 0.2 ms at 1,000
# records and growing with them.)  A checkpoint's manifest
# is the one field that can be big: a call that would encode one
# (insert/update with a manifest of a big tree) or decode one longer than
# INLINE_JSON_MAX goes to the store's thread instead.
INLINE = frozenset(
    {
        "get_checkpoint",
        "find_checkpoint",
        "insert_checkpoint",
        "update_checkpoint",
        "delete_checkpoint",
        "insert_restore",
        "update_restore",
        "get_restore",
    }
)
INLINE_JSON_MAX = 16 << 10
# A manifest of at most this many fds (some 16 KiB of JSON) encodes or
# decodes in well under 100 µs.
INLINE_FDS_MAX = 256


class _Offload(CriudError):
    """Raised before any write: this call is too big for the event loop.

    Store.run catches it and runs the call on the store's thread; it never
    reaches a caller (a CriudError all the same, as every error here is).
    """


def _no_space(e: sqlite3.OperationalError, path: Path) -> NoSpace | None:
    """A full disk as the caller's NoSpace (507); None for any other error."""
    if e.sqlite_errorcode & 0xFF != sqlite3.SQLITE_FULL:
        return None
    return NoSpace(
        f"the daemon's database ({path}) cannot grow: its filesystem is full",
        hint="free space in the daemon's state dir and retry",
    )


def _manifest_fds(manifest: dict[str, Any] | None) -> int:
    """How many fds a stored manifest lists (what its JSON's size follows)."""
    if not manifest:
        return 0
    return sum(len(t.get("fds", ())) for t in manifest.get("tasks", ()))


# The connection's page cache, in KiB (see _open).
CACHE_KIB = 256


class Store:
    """SQLite-backed records of checkpoints and restores."""

    def __init__(self, path: Path) -> None:
        self._path = path
        # The store's thread runs what may take long (lists, start-up);
        # run() does a single-row call inline instead (see INLINE).  The
        # lock makes the two take turns on the one connection.
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="criud-db"
        )
        self._lock = threading.Lock()
        # True while a call runs inline on the event loop: a row too big to
        # decode there sends the call to the store's thread (_Offload).
        self._inline = False
        self._db: sqlite3.Connection | None = None
        # Record updates a full disk refused, retried until they land (settle).
        self._settling: set[asyncio.Task[None]] = set()
        # Bumped on every write to checkpoints: lets readers cache what they
        # derive from the list (writes hold the lock).
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
        try:
            # Read before anything writes: a database we cannot use is left
            # exactly as it was (switching to WAL writes its header).
            self._check_version(db)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            # SQLite's default page cache is 2 MiB per connection, filled by
            # the first list of 1,000 records and kept for the daemon's life.
            # The list is served from its own cache (one rebuild per write),
            # and a page the cache dropped is a read from the kernel's page
            # cache: a quarter MiB leaves point lookups' index pages cached
            # (idle RSS with 1,000 records, docs/benchmarks.md).
            db.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
            self._migrate(db)
        except sqlite3.DatabaseError as e:
            db.close()
            raise StoreError(f"the database {self._path} is unusable: {e}") from e
        except BaseException:
            db.close()
            raise
        db.row_factory = sqlite3.Row
        self._db = db

    def _check_version(self, db: sqlite3.Connection) -> int:
        version = int(db.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"the database {self._path} has schema version {version}, newer than this "
                f"criud's {SCHEMA_VERSION}: run the criud that wrote it, or a newer one"
            )
        return version

    def _migrate(self, db: sqlite3.Connection) -> None:
        """Bring the schema to SCHEMA_VERSION, one step per transaction."""
        while True:
            # IMMEDIATE: the version read and the step are one write
            # transaction, so two openers never run the same step twice.
            db.execute("BEGIN IMMEDIATE")
            try:
                version = self._check_version(db)
                if version == SCHEMA_VERSION:
                    db.execute("COMMIT")
                    return
                MIGRATIONS[version](db)
                # PRAGMA takes no parameters; version is our own int.
                db.execute(f"PRAGMA user_version = {version + 1}")
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

    def close(self) -> None:
        """Close the database and stop its thread."""

        def _close() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        self._pool.submit(_close).result()
        self._pool.shutdown(wait=True)

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a store method: inline if it is a small one and the connection is free.

        A method in INLINE touches one row by its key: 10-60 µs inline on
        this machine, against some 100-200 µs for the round trip to a thread
        (bench/hops.py), and a small dump + restore makes a dozen such calls.
        Anything else, a row too big to decode on the event loop, or a
        connection busy on the store's thread (a list being rebuilt) takes
        the thread, off the event loop.
        A full disk is the caller's 507, not a 500: SQLite rolls the failed
        statement back, so nothing half-written stays behind.
        """
        name: str = getattr(fn, "__name__", "")
        owner: object = getattr(fn, "__self__", None)
        if name in INLINE and owner is self and self._lock.acquire(blocking=False):
            try:
                return self._inline_call(fn, args, kwargs)
            except _Offload:
                pass
            finally:
                self._lock.release()
        return await self.run_threaded(fn, *args, **kwargs)

    def run_inline(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run fn now on this thread, waiting for the connection (bench/hops.py)."""
        with self._lock:
            return self._inline_call(fn, args, kwargs)

    def _inline_call(
        self, fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> T:
        self._inline = True
        try:
            return fn(*args, **kwargs)
        except sqlite3.OperationalError as e:
            full = _no_space(e, self._path)
            if full is None:
                raise
            raise full from e
        finally:
            self._inline = False

    async def run_threaded(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a store method on the store's thread, off the event loop."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(
                self._pool, functools.partial(self._locked, fn, *args, **kwargs)
            )
        except sqlite3.OperationalError as e:
            full = _no_space(e, self._path)
            if full is None:
                raise
            raise full from e

    def _locked(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        with self._lock:
            return fn(*args, **kwargs)

    def _inline_cap(self, *texts: str | None) -> None:
        """_Offload when a call runs inline and a JSON text to decode is big."""
        if self._inline and sum(len(t) for t in texts if t) > INLINE_JSON_MAX:
            raise _Offload("too big for the event loop")

    async def settle(self, update: Callable[..., None], row_id: str, **changes: Any) -> None:
        """Record how an operation ended, now, or as soon as the disk has room.

        A record left "dumping" would hold its name and refuse deletion
        until a restart: when a full disk refuses the update, it is retried
        in the background (backing off to 2 s) until it lands.
        """
        try:
            await self.run(update, row_id, **changes)
        except NoSpace:
            log.warning(
                "%s %s: disk full; retrying the update in the background", update.__name__, row_id
            )
            task = asyncio.get_running_loop().create_task(
                self._settle_later(update, row_id, changes)
            )
            self._settling.add(task)
            task.add_done_callback(self._settling.discard)

    async def _settle_later(
        self, update: Callable[..., None], row_id: str, changes: dict[str, Any]
    ) -> None:
        delay = 0.1
        while True:
            await asyncio.sleep(delay)
            try:
                await self.run(update, row_id, **changes)
            except NoSpace:
                delay = min(delay * 2, 2.0)
                continue
            log.info("%s %s: settled after the disk had room", update.__name__, row_id)
            return

    async def stop_settling(self) -> None:
        """Give up the updates still waiting for room: the next start marks them interrupted."""
        for t in self._settling:
            t.cancel()
        await asyncio.gather(*self._settling, return_exceptions=True)

    @property
    def db(self) -> sqlite3.Connection:
        assert self._db is not None, "store not open"
        return self._db

    # -- checkpoints ------------------------------------------------------------

    def insert_checkpoint(self, rec: CheckpointRecord) -> None:
        """Insert a new checkpoint record; NameTaken if its name is taken."""
        if self._inline and _manifest_fds(rec.manifest) > INLINE_FDS_MAX:
            raise _Offload("too big for the event loop")
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
            # The only unique index besides the id (ours, fresh) is (owner, name).
            raise NameTaken(f"a checkpoint named {rec.name!r} exists already", name=rec.name) from e

    def update_checkpoint(self, ckpt_id: str, **changes: Any) -> None:
        """Change fields of a checkpoint; a state change must be a legal one."""
        if self._inline and _manifest_fds(changes.get("manifest")) > INLINE_FDS_MAX:
            raise _Offload("too big for the event loop")
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

    def get_checkpoint(self, ckpt_id: str) -> CheckpointRecord | None:
        """Look a checkpoint up by id."""
        row = self.db.execute("SELECT * FROM checkpoints WHERE id=?", (ckpt_id,)).fetchone()
        if row is None:
            return None
        self._inline_cap(row["manifest"])
        return CheckpointRecord(**_load(row))

    def find_checkpoint(
        self, ref: str, name_owner: int, id_owner: int | None = None
    ) -> CheckpointRecord | None:
        """Look a checkpoint up by id (id_owner's, or anyone's if None), then by name.

        A name is looked up among name_owner's checkpoints only: names are
        unique per owner, and one user's name never stands for another's.
        """
        row = self.db.execute(
            "SELECT * FROM checkpoints WHERE id=?1 AND (?2 IS NULL OR owner_uid=?2) "
            "UNION ALL SELECT * FROM checkpoints WHERE owner_uid=?3 AND name=?1 LIMIT 1",
            (ref, id_owner, name_owner),
        ).fetchone()
        if row is None:
            return None
        self._inline_cap(row["manifest"])
        return CheckpointRecord(**_load(row))

    def list_checkpoints(self, summary: bool = False) -> list[CheckpointRecord]:
        """Every checkpoint record, oldest first; summary leaves the manifest out."""
        cols = _SUMMARY_COLUMNS if summary else "*"
        rows = self.db.execute(f"SELECT {cols} FROM checkpoints ORDER BY created_at").fetchall()
        return [CheckpointRecord(**_load(r)) for r in rows]

    def checkpoint_states(self) -> dict[str, str]:
        """Every checkpoint's state by id (start-up reconciles its dirs by them)."""
        rows = self.db.execute("SELECT id, state FROM checkpoints").fetchall()
        return {r["id"]: r["state"] for r in rows}

    def checkpoint_usage(self, owner_uid: int) -> tuple[int, int]:
        """(records, image bytes) of owner_uid's checkpoints, those being dumped left out.

        A dump in progress is counted by the quota's reservation instead
        (criud.daemon.quotas.CheckpointQuota).
        """
        row = self.db.execute(
            "SELECT COUNT(*), COALESCE(SUM(size_bytes), 0) FROM checkpoints "
            "WHERE owner_uid=? AND state != ?",
            (owner_uid, CheckpointState.DUMPING),
        ).fetchone()
        return int(row[0]), int(row[1])

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
        now = time.time()
        rows = self.db.execute(
            "SELECT id FROM checkpoints WHERE state=?", (CheckpointState.DUMPING,)
        ).fetchall()
        ck = [r["id"] for r in rows]
        # Each through the asserted transitions, like every other state change.
        for ckpt_id in ck:
            self.update_checkpoint(
                ckpt_id, state=CheckpointState.INTERRUPTED, name=None, finished_at=now
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
