"""Structured logging: one JSON object per line, extra fields included, never request bodies.

Every request logs one access line, so the handler keeps that cheap: lines logged on the event
loop's thread are queued and formatted and written together, FLUSH_INTERVAL_S after the first of
them (or at once when MAX_PENDING are queued): off the request's path (a response is on the
socket long before its line is written) and one write for many lines instead of a write and
flush each. Lines from other threads, lines with a traceback, and lines logged with no running
loop are written at once, after anything still queued (the order of lines is kept). `flush()`
(also called by `logging.shutdown` at exit) writes whatever is queued; a process killed
outright loses at most the last FLUSH_INTERVAL_S of lines.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import Any, TextIO

import orjson

_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}
FLUSH_INTERVAL_S = 0.05
MAX_PENDING = 1024


class JsonFormatter(logging.Formatter):
    _second = -1
    _stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:  # strftime once a second, not once a line
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        out: dict[str, Any] = {
            "ts": f"{self._stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


class LoopBatchingHandler(logging.StreamHandler[TextIO]):
    """A StreamHandler that batches the lines logged on the event loop (module docstring)."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._pending: list[logging.LogRecord] = []
        self._scheduled_on: asyncio.AbstractEventLoop | None = None

    def emit(self, record: logging.LogRecord) -> None:
        # Called with the handler's lock held (Handler.handle).
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None or record.exc_info or record.stack_info:
            self.flush()
            super().emit(record)
            return
        if record.args:  # render now: the arguments may change before the line is written
            record.msg, record.args = record.getMessage(), None
        pending = self._pending
        pending.append(record)
        if len(pending) >= MAX_PENDING:
            self.flush()
        elif self._scheduled_on is not loop:
            self._scheduled_on = loop
            loop.call_later(FLUSH_INTERVAL_S, self.flush)

    def flush(self) -> None:
        self.acquire()
        try:
            self._scheduled_on = None
            pending, self._pending = self._pending, []
            if pending:
                lines = []
                for record in pending:
                    try:
                        lines.append(self.format(record) + self.terminator)
                    except Exception:
                        self.handleError(record)
                try:
                    self.stream.write("".join(lines))
                except Exception:
                    self.handleError(pending[-1])
            super().flush()
        finally:
            self.release()


def configure_logging(level: str) -> None:
    handler = LoopBatchingHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("loraplex")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    # The logging HOWTO's "Optimization": the JSON lines carry no caller, thread or process,
    # so do not compute them for every record (one access line per request).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
