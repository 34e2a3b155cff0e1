"""criud.daemon.store: SQLite records of checkpoints and restores."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from criud.daemon.errors import NameTaken, NoSpace
from criud.daemon.names import new_id
from criud.daemon.store import (
    CHECKPOINT_TRANSITIONS,
    RESTORE_TRANSITIONS,
    CheckpointRecord,
    CheckpointState,
    RestoreRecord,
    RestoreState,
    Store,
)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "criud.db")
    s.open()
    try:
        yield s
    finally:
        s.close()


def ckpt(name: str | None = None, state: str = "dumping", t: float = 1.0) -> CheckpointRecord:
    return CheckpointRecord(
        id=new_id(),
        name=name,
        pid=4242,
        state=state,
        created_at=t,
        options={"leave_running": True, "external": ["pipe:[1]"]},
        labels={"app": "web"},
        owner_uid=1000,
    )


def restore(ckpt_id: str, state: str = "restoring", t: float = 1.0) -> RestoreRecord:
    return RestoreRecord(
        id=new_id(), checkpoint_id=ckpt_id, state=state, started_at=t, owner_uid=1000
    )


def test_db_file_private(tmp_path: Path, store: Store) -> None:
    assert (tmp_path / "criud.db").stat().st_mode & 0o777 == 0o600


def test_insert_get_by_id_and_name(store: Store) -> None:
    rec = ckpt("web")
    store.insert_checkpoint(rec)
    assert store.get_checkpoint(rec.id) == rec
    assert store.find_checkpoint("web", 1000) == rec
    assert store.find_checkpoint("other", 1000) is None
    assert store.get_checkpoint(new_id()) is None


def test_json_fields_round_trip(store: Store) -> None:
    rec = ckpt()
    store.insert_checkpoint(rec)
    manifest = {"tasks": [{"pid": 1, "fds": []}], "external": ["pipe:[2]"]}
    store.update_checkpoint(
        rec.id,
        state="done",
        finished_at=2.0,
        size_bytes=1 << 33,
        stats={"pages_written": 7},
        manifest=manifest,
        criu_version="4.2.1",
    )
    got = store.get_checkpoint(rec.id)
    assert got is not None
    assert got.state == "done"
    assert got.options == rec.options
    assert got.labels == {"app": "web"}
    assert got.stats == {"pages_written": 7}
    assert got.manifest == manifest
    assert got.size_bytes == 1 << 33
    assert got.criu_version == "4.2.1"
    assert got.error is None


def test_name_conflict(store: Store) -> None:
    store.insert_checkpoint(ckpt("web"))
    with pytest.raises(NameTaken):
        store.insert_checkpoint(ckpt("web"))
    # Unnamed checkpoints never conflict.
    store.insert_checkpoint(ckpt(None))
    store.insert_checkpoint(ckpt(None))
    assert len(store.list_checkpoints()) == 3


def test_names_are_unique_per_owner(store: Store) -> None:
    mine, theirs = ckpt("web"), dataclasses.replace(ckpt("web"), owner_uid=2000)
    store.insert_checkpoint(mine)
    store.insert_checkpoint(theirs)
    assert store.find_checkpoint("web", 1000) == mine
    assert store.find_checkpoint("web", 2000) == theirs
    # root's bare name is root's own: none here.
    assert store.find_checkpoint("web", 0) is None
    # An id is found for any owner, or only for id_owner when given.
    assert store.find_checkpoint(theirs.id, 0) == theirs
    assert store.find_checkpoint(theirs.id, 1000, id_owner=1000) is None
    with pytest.raises(NameTaken):
        store.insert_checkpoint(dataclasses.replace(ckpt("web"), owner_uid=2000))


def test_name_freed_by_failure_update(store: Store) -> None:
    rec = ckpt("web")
    store.insert_checkpoint(rec)
    store.update_checkpoint(rec.id, state="failed", name=None, error={"code": "criu_failed"})
    store.insert_checkpoint(ckpt("web"))
    failed = store.get_checkpoint(rec.id)
    assert failed is not None and failed.name is None
    assert failed.error == {"code": "criu_failed"}


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("dumping", "dumping"),
        ("done", "failed"),
        ("done", "dumping"),
        ("failed", "done"),
        ("interrupted", "done"),
        ("dumping", "bogus"),
    ],
)
def test_illegal_checkpoint_transition(store: Store, old: str, new: str) -> None:
    rec = ckpt(state=old)
    store.insert_checkpoint(rec)
    with pytest.raises(AssertionError, match=f"{old} -> {new}"):
        store.update_checkpoint(rec.id, state=new)
    got = store.get_checkpoint(rec.id)
    assert got is not None and got.state == old


def test_legal_checkpoint_transitions(store: Store) -> None:
    for new in CHECKPOINT_TRANSITIONS["dumping"]:
        rec = ckpt()
        store.insert_checkpoint(rec)
        store.update_checkpoint(rec.id, state=new)
        got = store.get_checkpoint(rec.id)
        assert got is not None and got.state == new


def test_update_unknown_id_state(store: Store) -> None:
    with pytest.raises(AssertionError):
        store.update_checkpoint(new_id(), state="done")
    with pytest.raises(AssertionError):
        store.update_restore(new_id(), state="running")


def test_list_checkpoints_oldest_first_and_delete(store: Store) -> None:
    recs = [ckpt(f"c{i}", t=t) for i, t in enumerate([3.0, 1.0, 2.0])]
    for r in recs:
        store.insert_checkpoint(r)
    assert [r.name for r in store.list_checkpoints()] == ["c1", "c2", "c0"]
    store.delete_checkpoint(recs[1].id)
    assert store.find_checkpoint("c1", 1000) is None
    assert [r.name for r in store.list_checkpoints()] == ["c2", "c0"]


def test_checkpoint_states_read_no_record(store: Store) -> None:
    done, failed = ckpt("a", state="done"), ckpt("b", state="failed")
    for r in (done, failed):
        store.insert_checkpoint(r)
    # Start-up reconciles dirs by these: ids and states, nothing else read.
    assert store.checkpoint_states() == {done.id: "done", failed.id: "failed"}


def test_restores(store: Store) -> None:
    c = ckpt(state="done")
    store.insert_checkpoint(c)
    r1 = restore(c.id, t=2.0)
    r2 = restore(c.id, t=1.0)
    store.insert_restore(r1)
    store.insert_restore(r2)
    assert store.get_restore(r1.id) == r1
    assert store.get_restore(new_id()) is None
    assert [r.id for r in store.list_restores()] == [r2.id, r1.id]
    store.update_restore(r1.id, state="running", pid=77, proc_start=123, stats={"x": 1})
    store.update_restore(r1.id, state="exited", exit_code=0, finished_at=3.0)
    got = store.get_restore(r1.id)
    assert got is not None
    assert (got.state, got.pid, got.exit_code, got.stats) == ("exited", 77, 0, {"x": 1})
    assert [r.id for r in store.list_restores("restoring")] == [r2.id]
    assert [r.id for r in store.list_restores("exited")] == [r1.id]


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("restoring", "exited"),
        ("running", "failed"),
        ("running", "restoring"),
        ("exited", "running"),
        ("failed", "running"),
        ("interrupted", "running"),
    ],
)
def test_illegal_restore_transition(store: Store, old: str, new: str) -> None:
    assert new not in RESTORE_TRANSITIONS[old]
    r = restore(new_id(), state=old)
    store.insert_restore(r)
    with pytest.raises(AssertionError, match=f"{old} -> {new}"):
        store.update_restore(r.id, state=new)
    got = store.get_restore(r.id)
    assert got is not None and got.state == old


def test_interrupt_unfinished(store: Store) -> None:
    dumping = ckpt("busy")
    done = ckpt("kept", state="done")
    store.insert_checkpoint(dumping)
    store.insert_checkpoint(done)
    r_restoring = restore(done.id)
    r_running = restore(done.id, state="running")
    store.insert_restore(r_restoring)
    store.insert_restore(r_running)

    # Only dumps: a restore left restoring is failed by the daemon once it
    # has killed what the restore left (criud.daemon.orphans).
    assert store.interrupt_unfinished() == [dumping.id]

    got = store.get_checkpoint(dumping.id)
    assert got is not None
    assert got.state == "interrupted"
    assert got.name is None
    assert got.finished_at is not None
    kept = store.find_checkpoint("kept", 1000)
    assert kept is not None and kept.state == "done"
    r = store.get_restore(r_restoring.id)
    assert r is not None and r.state == "restoring"
    r = store.get_restore(r_running.id)
    assert r is not None and r.state == "running"
    # The interrupted dump's name is free again.
    again = ckpt("busy")
    store.insert_checkpoint(again)
    assert store.find_checkpoint("busy", 1000) == again
    # A second call finds only what is unfinished now.
    assert store.interrupt_unfinished() == [again.id]


def test_interrupt_unfinished_goes_through_the_asserted_transitions(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No raw SQL skips the transition table (issue 12): forbid the move, and it is refused."""
    dumping = ckpt("busy")
    store.insert_checkpoint(dumping)
    monkeypatch.setitem(CHECKPOINT_TRANSITIONS, "dumping", {"done", "failed"})
    with pytest.raises(AssertionError, match="dumping -> interrupted"):
        store.interrupt_unfinished()
    got = store.get_checkpoint(dumping.id)
    assert got is not None and got.state == "dumping"


def test_states_are_str_enums() -> None:
    assert CheckpointState.DUMPING == "dumping" and RestoreState.EXITED == "exited"
    assert set(CHECKPOINT_TRANSITIONS) == set(CheckpointState)
    assert set(RESTORE_TRANSITIONS) == set(RestoreState)


def test_persists_across_reopen(tmp_path: Path) -> None:
    s = Store(tmp_path / "db")
    s.open()
    rec = ckpt("p")
    s.insert_checkpoint(rec)
    s.close()
    s2 = Store(tmp_path / "db")
    s2.open()
    try:
        assert s2.find_checkpoint("p", 1000) == rec
        mode = s2.db.execute("PRAGMA journal_mode").fetchone()[0]
        assert mode == "wal"
    finally:
        s2.close()


def test_run_uses_store_thread(store: Store) -> None:
    rec = ckpt("async")

    async def body() -> CheckpointRecord | None:
        await store.run(store.insert_checkpoint, rec)
        return await store.run(store.find_checkpoint, "async", 1000)

    assert asyncio.run(asyncio.wait_for(body(), 10)) == rec
    # The connection lives on one thread: the work ran there, not on ours.
    names = asyncio.run(
        asyncio.wait_for(store.run(lambda: __import__("threading").current_thread().name), 10)
    )
    assert names.startswith("criud-db")


def test_closed_store_refuses(tmp_path: Path) -> None:
    s = Store(tmp_path / "db")
    s.open()
    s.close()
    with pytest.raises(AssertionError, match="not open"):
        s.get_checkpoint("x")


def test_full_database_is_no_space(store: Store) -> None:
    # max_page_count makes SQLite answer SQLITE_FULL as a full disk does.
    pages = store.db.execute("PRAGMA page_count").fetchone()[0]
    store.db.execute(f"PRAGMA max_page_count = {pages}")
    big = dataclasses.replace(ckpt("big"), labels={"x": "y" * 100_000})

    async def body() -> None:
        await store.run(store.insert_checkpoint, big)

    with pytest.raises(NoSpace) as e:
        asyncio.run(asyncio.wait_for(body(), 10))
    assert (e.value.status, e.value.code) == (507, "no_space")
    # Nothing half-written, and the store still works.
    assert store.get_checkpoint(big.id) is None
    store.db.execute("PRAGMA max_page_count = 1073741823")
    store.insert_checkpoint(big)
    assert store.get_checkpoint(big.id) == big


def _threads_of_statements(store: Store) -> list[tuple[str, str]]:
    """(thread name, statement) of every SQL statement run from now on."""
    import threading

    seen: list[tuple[str, str]] = []
    store.db.set_trace_callback(lambda sql: seen.append((threading.current_thread().name, sql)))
    return seen


def _manifest_of(n_fds: int) -> dict[str, object]:
    fds = [{"fd": i, "type": "pipe", "key": f"pipe:[{i}]"} for i in range(n_fds)]
    return {"tasks": [{"pid": 1, "ppid": 0, "tids": [1], "fds": fds}], "external": []}


def test_single_row_calls_run_inline_lists_on_the_store_thread(store: Store) -> None:
    # Issue 13: a hop costs more than a one-row call (bench/hops.py).
    rec = ckpt("small")
    seen = _threads_of_statements(store)

    async def body() -> None:
        await store.run(store.insert_checkpoint, rec)
        assert await store.run(store.get_checkpoint, rec.id) == rec
        await store.run(store.list_checkpoints)

    asyncio.run(asyncio.wait_for(body(), 10))
    where = [t for t, _ in seen]
    assert where[:2] == ["MainThread", "MainThread"]
    assert where[2].startswith("criud-db"), seen


def test_big_manifests_are_encoded_and_decoded_off_the_loop(store: Store) -> None:
    rec = dataclasses.replace(ckpt("big"), manifest=_manifest_of(1000))
    small = dataclasses.replace(ckpt("small"), manifest=_manifest_of(3))
    seen = _threads_of_statements(store)

    async def body() -> None:
        await store.run(store.insert_checkpoint, rec)
        await store.run(store.insert_checkpoint, small)
        got = await store.run(store.get_checkpoint, rec.id)
        assert got is not None and got.manifest == rec.manifest
        assert await store.run(store.find_checkpoint, "small", 1000) == small

    asyncio.run(asyncio.wait_for(body(), 10))
    inserts = [t for t, sql in seen if sql.startswith("INSERT")]
    assert inserts[0].startswith("criud-db") and inserts[1] == "MainThread", seen
    # The big row is read inline, found too big to decode there, and the
    # whole call runs again on the store's thread; the small one stays.
    selects = [t for t, sql in seen if sql.startswith("SELECT")]
    assert selects[0] == "MainThread" and selects[1].startswith("criud-db"), seen
    assert selects[2] == "MainThread", seen


def test_a_busy_connection_sends_a_small_call_to_the_store_thread(store: Store) -> None:
    rec = ckpt("busy")
    store.insert_checkpoint(rec)
    seen = _threads_of_statements(store)

    async def body() -> CheckpointRecord | None:
        # Another thread's call holds the connection: the loop must not wait on it.
        store._lock.acquire()
        asyncio.get_running_loop().call_later(0.05, store._lock.release)
        return await store.run(store.get_checkpoint, rec.id)

    assert asyncio.run(asyncio.wait_for(body(), 10)) == rec
    assert next(t for t, _ in seen).startswith("criud-db"), seen
