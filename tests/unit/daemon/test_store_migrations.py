"""criud.daemon.store's schema versions: a previous release's database opens and migrates.

tests/data/store-v0.sql is a database as the release before schema versions
wrote it (user_version 0), dumped with sqlite3's iterdump.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from criud.daemon.errors import NameTaken
from criud.daemon.names import new_id
from criud.daemon.store import (
    MIGRATIONS,
    SCHEMA_VERSION,
    CheckpointRecord,
    Store,
    StoreError,
)

V0_SQL = Path(__file__).parents[2] / "data" / "store-v0.sql"
WEB_ID = "0123456789abcdef01234567"


def _v0_db(path: Path) -> Path:
    db = sqlite3.connect(path)
    db.executescript(V0_SQL.read_text())
    assert db.execute("PRAGMA user_version").fetchone()[0] == 0
    db.close()
    return path


def _named(name: str, owner_uid: int) -> CheckpointRecord:
    return CheckpointRecord(
        id=new_id(),
        name=name,
        pid=1,
        state="dumping",
        created_at=1.0,
        options={},
        labels={},
        owner_uid=owner_uid,
    )


def _indexes(path: Path) -> dict[str, str]:
    db = sqlite3.connect(path)
    try:
        rows = db.execute("SELECT name, sql FROM sqlite_master WHERE type='index' AND sql NOT NULL")
        return {name: sql for name, sql in rows}
    finally:
        db.close()


def _version(path: Path) -> int:
    db = sqlite3.connect(path)
    try:
        return int(db.execute("PRAGMA user_version").fetchone()[0])
    finally:
        db.close()


def test_every_version_has_one_step() -> None:
    assert len(MIGRATIONS) == SCHEMA_VERSION == 5


def test_previous_release_database_migrates_and_keeps_its_records(tmp_path: Path) -> None:
    path = _v0_db(tmp_path / "criud.db")
    assert "checkpoints_name" in _indexes(path)
    s = Store(path)
    s.open()
    try:
        web = s.get_checkpoint(WEB_ID)
        assert web is not None and (web.name, web.owner_uid, web.state) == ("web", 1000, "done")
        assert web.manifest == {"tasks": [], "external": ["pipe:[1]"]}
        assert web.external_keys == ["pipe:[1]"]
        # v4: a record from before imports is a dump (no origin).
        assert web.origin is None
        assert s.find_checkpoint("web", 1000) == web
        assert s.find_checkpoint("db", 0) is not None
        (r,) = s.list_restores()
        assert (r.checkpoint_id, r.ns_pid, r.exit_code) == (WEB_ID, 5000, 0)
        # v5: a restore from before lazy restores was not lazy.
        assert (r.lazy, r.pages_lazy, r.lazy_done_at) == (None, None, None)
        # v2: another owner may now use the name; its owner still may not.
        s.insert_checkpoint(_named("web", 2000))
        with pytest.raises(NameTaken):
            s.insert_checkpoint(_named("web", 1000))
    finally:
        s.close()
    assert _version(path) == SCHEMA_VERSION
    idx = _indexes(path)
    assert "checkpoints_name" not in idx and "(owner_uid, name)" in idx["checkpoints_owner_name"]


def test_new_file_gets_the_same_schema_as_a_migrated_one(tmp_path: Path) -> None:
    fresh, old = tmp_path / "fresh.db", _v0_db(tmp_path / "old.db")
    for path in (fresh, old):
        s = Store(path)
        s.open()
        s.close()

    def schema(path: Path) -> set[tuple[str, str]]:
        db = sqlite3.connect(path)
        try:
            tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
            cols = {(t, r[1]) for t in tables for r in db.execute(f"PRAGMA table_info({t})")}
            return cols | set(_indexes(path).items())
        finally:
            db.close()

    assert schema(fresh) == schema(old)
    assert _version(fresh) == _version(old) == SCHEMA_VERSION


def test_reopen_runs_no_step_twice(tmp_path: Path) -> None:
    path = tmp_path / "criud.db"
    for _ in range(2):
        s = Store(path)
        s.open()
        s.close()
    assert _version(path) == SCHEMA_VERSION


def test_failed_step_leaves_the_previous_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _v0_db(tmp_path / "criud.db")

    def broken(db: sqlite3.Connection) -> None:
        db.execute("DROP INDEX checkpoints_name")
        raise sqlite3.OperationalError("disk I/O error")

    import criud.daemon.store as store_mod

    monkeypatch.setattr(store_mod, "MIGRATIONS", (MIGRATIONS[0], broken))
    with pytest.raises(StoreError, match="disk I/O error"):
        Store(path).open()
    # Step 1 committed; step 2 rolled back whole (its DROP INDEX undone).
    assert _version(path) == 1
    assert "checkpoints_name" in _indexes(path)


def test_newer_database_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "criud.db"
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    before = path.read_bytes()
    with pytest.raises(StoreError, match=f"schema version {SCHEMA_VERSION + 1}, newer"):
        Store(path).open()
    assert path.read_bytes() == before


def test_garbage_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "criud.db"
    path.write_bytes(b"this is not an SQLite database, not even close" * 100)
    with pytest.raises(StoreError, match="is unusable: file is not a database"):
        Store(path).open()
