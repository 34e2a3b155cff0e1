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
import dataclasses
import enum
import time
from typing import Any

from criud.daemon.errors import CriudError


class OpState(enum.StrEnum):
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


KEEP_FINISHED = 256


@dataclasses.dataclass
class Progress:
    """How far an export or import has come, in bytes (total None: not known)."""

    done: int = 0
    total: int | None = None


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
    # Exports and imports: bytes so far (written by the worker thread; an
    # int's assignment is atomic, and readers only display it).
    progress: Progress | None = None

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
