"""Operations: checkpoints and restores as things a caller can look up, wait for and cancel.

Every checkpoint and restore runs as an asyncio task (the service's
`_operation`); an `Operation` names that task, so `?wait=false` can answer
at once and `GET /v1/operations/{id}` tell how it went.  Finished
operations are kept for a while (the newest KEEP_FINISHED) so a caller that
polls late still reads the outcome; running ones are never evicted.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import dataclasses
import enum
import time
from collections.abc import Callable
from typing import Any

from criud.daemon.errors import CriudError


class OpState(enum.StrEnum):
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


KEEP_FINISHED = 256
# operation.progress events: at most one per operation this often.
PROGRESS_INTERVAL_S = 0.25


@dataclasses.dataclass
class Progress:
    """Where an operation is: its phase, and what was observed of its bytes and pages.

    A figure nobody could observe stays None: a restore's bytes_done, an
    estimate the job could not read.  Totals are estimates; done figures
    are what was seen (the images dir's size while criu writes it).
    """

    phase: str | None = None
    bytes_done: int | None = None
    bytes_total: int | None = None
    pages_done: int | None = None
    pages_total: int | None = None

    def add_bytes(self, n: int) -> None:
        """n more bytes done (an export's or import's worker thread counts them).

        Only that thread writes; readers only display the figure, and an
        int's assignment is atomic.
        """
        self.bytes_done = (self.bytes_done or 0) + n

    def as_dict(self) -> dict[str, int | None]:
        """The byte and page figures (the phase apart), as the API shows them."""
        return {
            "bytes_done": self.bytes_done,
            "bytes_total": self.bytes_total,
            "pages_done": self.pages_done,
            "pages_total": self.pages_total,
        }


@dataclasses.dataclass
class Operation:
    """One checkpoint or restore, running or ended."""

    id: str
    kind: str
    owner_uid: int
    target: dict[str, Any]
    created_at: float = dataclasses.field(default_factory=time.time)
    state: OpState = OpState.RUNNING
    finished_at: float | None = None
    # The record it made (a CheckpointRecord, a RestoreRecord) once done.
    result: Any = None
    error: CriudError | None = None
    task: asyncio.Task[Any] | None = None
    cancel_requested: bool = False
    progress: Progress = dataclasses.field(default_factory=Progress)

    def end(self, state: OpState, result: Any = None, error: CriudError | None = None) -> None:
        """Record how it ended (once)."""
        if self.state is not OpState.RUNNING:
            return
        self.state, self.result, self.error = state, result, error
        self.finished_at = time.time()


class OperationTable:
    """The operations the daemon knows of: all running ones, the latest finished ones."""

    def __init__(self, keep: int = KEEP_FINISHED) -> None:
        self._ops: collections.OrderedDict[str, Operation] = collections.OrderedDict()
        self._keep = keep

    def add(self, op: Operation) -> None:
        self._ops[op.id] = op
        finished = [o.id for o in self._ops.values() if o.state is not OpState.RUNNING]
        for old in finished[: max(0, len(finished) - self._keep)]:
            del self._ops[old]

    def get(self, op_id: str) -> Operation | None:
        return self._ops.get(op_id)

    def list(self, uid: int | None, state: OpState | None = None) -> list[Operation]:
        """uid's operations (None: everyone's), oldest first, optionally in one state."""
        return [
            o
            for o in self._ops.values()
            if (uid is None or o.owner_uid == uid) and (state is None or o.state is state)
        ]


class Reporter:
    """What a job tells of its operation's progress: kept on the operation, published sparingly.

    `publish` (None: events are off) is called with the operation's
    progress when it changed and PROGRESS_INTERVAL_S has passed since the
    last call (or the start): a short operation publishes none, a long one
    at most four a second, whatever its job reports.  GET
    /v1/operations/{id} always shows the latest.
    """

    def __init__(
        self,
        op: Operation,
        publish: Callable[[Operation], None] | None,
        interval: float = PROGRESS_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.op, self._publish, self._interval, self._clock = op, publish, interval, clock
        self._last = clock()
        self._dirty = False

    @property
    def progress(self) -> Progress:
        return self.op.progress

    def phase(self, name: str) -> None:
        """The operation entered phase name."""
        self.update(phase=name)

    def update(self, **fields: Any) -> None:
        """Set progress fields (Progress's names); publish if due."""
        p = self.op.progress
        for k, v in fields.items():
            if getattr(p, k) != v:
                setattr(p, k, v)
                self._dirty = True
        now = self._clock()
        if self._dirty and self._publish is not None and now - self._last >= self._interval:
            self._last, self._dirty = now, False
            self._publish(self.op)


# The reporter of the operation whose task this is (set by the service's
# _observed): jobs report through it without being handed it, and outside
# an operation (a unit test calling a job) reporting does nothing.
current: contextvars.ContextVar[Reporter | None] = contextvars.ContextVar(
    "criud_progress", default=None
)


def report(**fields: Any) -> None:
    """Report progress fields of the current operation, if any (phase=, bytes_total=, ...)."""
    r = current.get()
    if r is not None:
        r.update(**fields)
