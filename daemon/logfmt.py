"""The daemon's log lines: text for a terminal, or one JSON object a line for a collector.

Every line logged while an operation runs carries its id: the service sets
`current_operation` in the operation's task (criud.daemon.service), and
asyncio copies the context into whatever that task starts (threads of
asyncio.to_thread, child tasks), so a filter on the handler can read it
whichever logger the line comes from.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from typing import Literal

LogFormat = Literal["text", "json"]

# The id of the operation the running code belongs to, None outside one.
current_operation: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "criud_operation", default=None
)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s%(op_suffix)s"


class OperationFilter(logging.Filter):
    """Puts the current operation's id on every record (it never drops one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        op = current_operation.get()
        record.operation = op
        # For the text format: nothing outside an operation.
        record.op_suffix = f" [op {op}]" if op else ""
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message (and operation, exc when set)."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        op = getattr(record, "operation", None)
        if op:
            doc["operation"] = op
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        # ensure_ascii: a message holding a caller's bytes stays one line of ASCII.
        return json.dumps(doc, default=str)


def setup(level: str, fmt: LogFormat = "text") -> None:
    """Send every logger's lines to stderr in fmt, the operation's id on each."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(OperationFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
