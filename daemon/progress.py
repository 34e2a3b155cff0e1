"""The CLI's progress: follow a long operation and draw it as a live bar (rich).

Two halves, so that other long commands (export, import) can reuse the
drawing with updates of their own:

- an update is `(phase, done, total)`: the phase's name (or None), the
  bytes done and the bytes expected (None when unknown); `render` draws any
  iterable of them until it ends;
- `OperationPoll` makes such updates of a daemon operation, by polling
  `GET /v1/operations/{id}`, and keeps the ended operation.

Polling rather than following /v1/events: the operation's record always
holds its latest progress, so a poll every 200 ms shows what an event
would, needs no subscription made before the POST (nor a replay to close
that race), and ends on the operation's own ended state, whatever events
a reader may have lagged past.  It costs the daemon one small GET each time.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, TypeAlias

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress as RichProgress

    from criud.api.client import Client

# (phase, bytes done, bytes expected); None where unknown.
Update: TypeAlias = tuple[str | None, int | None, int | None]

POLL_S = 0.2


class OperationPoll:
    """Iterate for an operation's updates until it ends (`final` is then the ended
    operation) or `stop` is set (`final` stays None)."""

    def __init__(
        self,
        client: Client,
        op_id: str,
        interval: float = POLL_S,
        stop: threading.Event | None = None,
    ) -> None:
        self.client, self.op_id, self.interval = client, op_id, interval
        self.stop = stop or threading.Event()
        self.final: dict[str, Any] | None = None

    def __iter__(self) -> Iterator[Update]:
        while not self.stop.is_set():
            op = self.client.operation(self.op_id)
            prog = op.get("progress") or {}
            yield op.get("phase"), prog.get("bytes_done"), prog.get("bytes_total")
            if op.get("state") != "running":
                self.final = op
                return
            # Returns early once stop is set (a signal handler may set it).
            self.stop.wait(self.interval)


@contextlib.contextmanager
def interrupt_sets(flag: threading.Event) -> Iterator[threading.Event]:
    """For the block, SIGINT (^C) only sets flag: the loop drawing the bar notices it and
    ends cleanly, never cut off in the middle of a redraw or a request."""
    old = signal.signal(signal.SIGINT, lambda signo, frame: flag.set())
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, old)


def byte_bar(console: Console, *between: Any, **kw: Any) -> RichProgress:
    """A rich bar of bytes: label, the columns `between`, bar, size, rate, time left.

    The one look of every long CLI command (checkpoint, restore, export,
    import); kw goes to rich's Progress (transient=, refresh_per_second=).
    """
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        *between,
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    return Progress(*columns, console=console, **kw)


def render(
    updates: Iterable[Update], label: str, console: Console | None = None, stderr: bool = False
) -> None:
    """Draw updates as a live bar (phase, bytes, rate, time left) until they end.

    On console if given, else on a new one of stdout (stderr=True: of stderr).
    """
    from rich.console import Console
    from rich.progress import TextColumn

    console = console or Console(stderr=stderr)
    phase_col = TextColumn("[bold]{task.fields[phase]:<10}")
    with byte_bar(console, phase_col, refresh_per_second=8) as bar:
        task = bar.add_task(label, total=None, phase="")
        for phase, done, total in updates:
            if done is None:
                # Nothing observable (a restore): a pulsing bar, its phase.
                bar.update(task, total=None, completed=0, phase=phase or "")
                continue
            # An estimate can be passed: never draw more than 100%, and
            # once done the bytes done are the whole.
            top = done if phase == "done" else max(total or 0, done) or None
            bar.update(task, total=top, completed=done, phase=phase or "")
