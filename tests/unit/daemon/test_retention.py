"""criud.daemon.retention: older_than parsing, bulk filters, newest N per pid."""

from __future__ import annotations

import pytest

from criud.daemon.errors import InvalidRequest
from criud.daemon.retention import (
    BulkFilter,
    beyond_newest,
    parse_labels,
    parse_older_than,
    select,
)
from criud.daemon.store import CheckpointRecord

NOW = 1_800_000_000.0


def rec(
    i: int, owner: int = 1000, pid: int = 42, state: str = "done", **labels: str
) -> CheckpointRecord:
    return CheckpointRecord(
        id=f"c{i}",
        name=None,
        pid=pid,
        state=state,
        created_at=NOW - 1000 + i,
        options={},
        labels=dict(labels),
        owner_uid=owner,
    )


@pytest.mark.parametrize(
    ("text", "age"),
    [("0s", 0), ("90s", 90), ("15m", 900), ("12h", 43200), ("7d", 604800), ("2w", 1209600)],
)
def test_durations_count_back_from_now(text: str, age: int) -> None:
    assert parse_older_than(text, NOW) == NOW - age


def test_durations_combine() -> None:
    assert parse_older_than("1h30m", NOW) == NOW - 5400
    assert parse_older_than("1d2h3m4s", NOW) == NOW - (86400 + 7200 + 180 + 4)


def test_rfc3339_times_need_their_offset() -> None:
    utc = parse_older_than("2027-01-15T08:00:00Z", NOW)
    assert utc == parse_older_than("2027-01-15T09:00:00+01:00", NOW) == 1_800_000_000.0
    with pytest.raises(InvalidRequest, match="offset"):
        parse_older_than("2027-01-15T08:00:00", NOW)


@pytest.mark.parametrize(
    "bad", ["", "7", "7 days", "-1h", "1y", "soon", "h", "9999999999d", "5d" * 40, "1e3s"]
)
def test_anything_else_is_refused(bad: str) -> None:
    with pytest.raises(InvalidRequest):
        parse_older_than(bad, NOW)


def test_labels_are_key_value() -> None:
    assert parse_labels(["app=x", "tier=", "a=b=c"]) == {"app": "x", "tier": "", "a": "b=c"}
    for bad in ("app", "=x"):
        with pytest.raises(InvalidRequest):
            parse_labels([bad])


def test_a_filter_matches_only_its_owner_age_and_labels() -> None:
    recs = [rec(1, app="x"), rec(2, app="x", tier="db"), rec(3, owner=2000, app="x"), rec(4)]
    assert [r.id for r in select(recs, BulkFilter(None, {"app": "x"}, 1000))] == ["c1", "c2"]
    assert [r.id for r in select(recs, BulkFilter(None, {"app": "x"}, None))] == ["c1", "c2", "c3"]
    both = BulkFilter(None, {"app": "x", "tier": "db"}, 1000)
    assert [r.id for r in select(recs, both)] == ["c2"]
    # Strictly older than the cutoff.
    cut = BulkFilter(recs[1].created_at, {}, 1000)
    assert [r.id for r in select(recs, cut)] == ["c1"]


def test_beyond_newest_keeps_the_newest_done_of_one_owner_and_pid() -> None:
    recs = [
        rec(1),
        rec(2, state="failed"),
        rec(3),
        rec(4, owner=2000),
        rec(5, pid=43),
        rec(6),
        rec(7),
    ]
    assert [r.id for r in beyond_newest(recs, 1000, 42, 2)] == ["c1", "c3"]
    assert [r.id for r in beyond_newest(recs, 1000, 42, 10)] == []
    assert [r.id for r in beyond_newest(recs, 2000, 42, 0)] == ["c4"]
