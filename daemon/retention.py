"""Retention: which checkpoints a bulk delete or the per-pid limit removes.

Pure selection over records; the service does the deleting (criud.daemon.
service: its locks, the images, the store, the events).  A bulk delete
always has a filter (an empty one never means "everything"), and always a
lane: a caller's own checkpoints, or for root everyone's or one owner's.
"""

from __future__ import annotations

import dataclasses
import datetime
import re
from collections.abc import Iterable, Sequence

from criud.daemon.errors import InvalidRequest
from criud.daemon.store import CheckpointRecord, CheckpointState

# "7d", "12h", "1h30m", "90s", "2w": one or more number-unit pairs.
_DURATION_RE = re.compile(r"(?:\d{1,9}[smhdw])+")
_PART_RE = re.compile(r"(\d+)([smhdw])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
# Longer than anything a checkpoint can be old; bounds what a float must hold.
MAX_AGE_S = 100 * 365 * 86400
OLDER_THAN_MAX_LEN = 64


def parse_older_than(text: str, now: float) -> float:
    """The creation-time cutoff older_than names: a duration back from now, or an RFC 3339 time.

    A duration is number-unit pairs (s, m, h, d, w), e.g. "7d" or "1h30m";
    a time needs its offset ("2026-01-01T00:00:00Z"), or it would mean
    whatever the daemon's zone is.
    """
    if len(text) > OLDER_THAN_MAX_LEN:
        raise InvalidRequest(f"older_than is longer than {OLDER_THAN_MAX_LEN} characters")
    if _DURATION_RE.fullmatch(text):
        age = sum(int(n) * _UNIT_S[u] for n, u in _PART_RE.findall(text))
        if age > MAX_AGE_S:
            raise InvalidRequest(f"older_than {text!r} is more than 100 years")
        return now - age
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        when = None
    if when is None or when.tzinfo is None:
        raise InvalidRequest(
            f"older_than {text!r} is neither a duration (e.g. 7d, 12h, 1h30m, 90s) "
            "nor an RFC 3339 time with its offset (e.g. 2026-01-01T00:00:00Z)"
        )
    return when.timestamp()


def parse_labels(items: Iterable[str]) -> dict[str, str]:
    """key=value filters (all must match), as the list's ?label= takes them."""
    wanted: dict[str, str] = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise InvalidRequest(f"label filter {item!r} is not key=value")
        wanted[k] = v
    return wanted


@dataclasses.dataclass(frozen=True)
class BulkFilter:
    """What a bulk delete removes: all of these must match."""

    # Created before this time (None: any age).
    cutoff: float | None
    labels: dict[str, str]
    # Whose checkpoints (None: everyone's; root only).
    owner_uid: int | None

    def matches(self, rec: CheckpointRecord) -> bool:
        if self.owner_uid is not None and rec.owner_uid != self.owner_uid:
            return False
        if self.cutoff is not None and not rec.created_at < self.cutoff:
            return False
        return all(rec.labels.get(k) == v for k, v in self.labels.items())


def select(recs: Iterable[CheckpointRecord], f: BulkFilter) -> list[CheckpointRecord]:
    """The records f matches, in the order given (the store's: oldest first)."""
    return [r for r in recs if f.matches(r)]


def beyond_newest(
    recs: Sequence[CheckpointRecord], owner_uid: int, pid: int, keep: int
) -> list[CheckpointRecord]:
    """owner_uid's done checkpoints of pid other than the newest keep, oldest first.

    Failed and interrupted records are left alone: they hold no images,
    and the caller may want to read why they failed.
    """
    mine = sorted(
        (
            r
            for r in recs
            if r.owner_uid == owner_uid and r.pid == pid and r.state == CheckpointState.DONE
        ),
        key=lambda r: r.created_at,
    )
    return mine[: max(0, len(mine) - keep)]
