"""criud.daemon.logfmt: JSON lines, and the operation's id on each line logged inside one."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator

import pytest

from criud.daemon import logfmt


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger writing through the filter and the JSON formatter into a buffer."""
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.addFilter(logfmt.OperationFilter())
    handler.setFormatter(logfmt.JsonFormatter())
    lg = logging.getLogger("criud.test_logfmt")
    lg.addHandler(handler)
    lg.setLevel(logging.DEBUG)
    lg.propagate = False
    yield lg, buf
    lg.removeHandler(handler)


def _lines(buf: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in buf.getvalue().splitlines()]


def test_one_object_a_line_with_the_fields(captured: tuple[logging.Logger, io.StringIO]) -> None:
    lg, buf = captured
    lg.warning("two\nlines and a %s", 'quote"\x00')
    (doc,) = _lines(buf)
    assert doc["level"] == "warning" and doc["logger"] == "criud.test_logfmt"
    assert doc["message"] == 'two\nlines and a quote"\x00'
    assert str(doc["time"]).endswith("Z") and "operation" not in doc


def test_exception_is_in_the_same_line(captured: tuple[logging.Logger, io.StringIO]) -> None:
    lg, buf = captured
    try:
        raise ValueError("boom")
    except ValueError:
        lg.exception("failed")
    (doc,) = _lines(buf)
    assert "ValueError: boom" in str(doc["exc"])


def test_operation_id_follows_the_task_and_its_threads(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    lg, buf = captured

    async def operation(op_id: str) -> None:
        logfmt.current_operation.set(op_id)
        lg.info("in %s", op_id)
        await asyncio.to_thread(lg.info, "thread of %s", op_id)

    async def main() -> None:
        # Two at once: each task's lines carry its own id, the caller's none.
        await asyncio.gather(operation("op-a"), operation("op-b"))
        lg.info("outside")

    asyncio.run(main())
    docs = _lines(buf)
    assert len(docs) == 5
    for doc in docs[:-1]:
        assert str(doc["operation"]) in str(doc["message"])
    assert "operation" not in docs[-1]


def test_text_format_names_the_operation() -> None:
    record = logging.LogRecord("criud.x", logging.INFO, __file__, 1, "hello", None, None)
    token = logfmt.current_operation.set("op-c")
    try:
        logfmt.OperationFilter().filter(record)
    finally:
        logfmt.current_operation.reset(token)
    line = logging.Formatter(logfmt.TEXT_FORMAT).format(record)
    assert line.endswith("criud.x: hello [op op-c]")
