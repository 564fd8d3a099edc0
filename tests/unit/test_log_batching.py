"""The log handler queues the lines logged on the event loop and writes them together at the
end of the loop iteration, in order; lines with a traceback or from other threads, and a full
queue, are written at once."""

from __future__ import annotations

import asyncio
import io
import logging
import threading

import orjson
import pytest

import server.logs
from server.logs import JsonFormatter, LoopBatchingHandler


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, s: str) -> int:
        self.writes += 1
        return super().write(s)


@pytest.fixture
def logged() -> tuple[logging.Logger, CountingStream, LoopBatchingHandler]:
    stream = CountingStream()
    handler = LoopBatchingHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.Logger("loraplex.test-batching")  # not registered: no global state
    logger.addHandler(handler)
    return logger, stream, handler


def _msgs(stream: CountingStream) -> list[str]:
    return [orjson.loads(line)["msg"] for line in stream.getvalue().splitlines()]


async def _next_iteration() -> None:
    await asyncio.sleep(0)


async def test_lines_of_one_iteration_go_out_together_and_in_order(
    logged: tuple[logging.Logger, CountingStream, LoopBatchingHandler],
) -> None:
    logger, stream, _ = logged
    logger.info("a")
    logger.info("b %s", "args rendered")
    assert stream.getvalue() == ""  # queued, not written on the request's path
    await _next_iteration()
    assert _msgs(stream) == ["a", "b args rendered"]
    assert stream.writes == 1
    logger.info("c")
    await _next_iteration()
    assert _msgs(stream)[-1] == "c"
    assert stream.writes == 2


async def test_a_full_queue_is_written_at_once(
    logged: tuple[logging.Logger, CountingStream, LoopBatchingHandler],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    logger, stream, _ = logged
    monkeypatch.setattr(server.logs, "MAX_PENDING", 3)
    for i in range(4):
        logger.info(str(i))
    assert _msgs(stream) == ["0", "1", "2"]
    assert stream.writes == 1
    await _next_iteration()
    assert _msgs(stream) == ["0", "1", "2", "3"]


async def test_tracebacks_and_other_threads_write_at_once_after_queued_lines(
    logged: tuple[logging.Logger, CountingStream, LoopBatchingHandler],
) -> None:
    logger, stream, _ = logged
    logger.info("first")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logger.exception("second")
    assert _msgs(stream) == ["first", "second"]
    assert "RuntimeError: boom" in orjson.loads(stream.getvalue().splitlines()[1])["exc"]
    logger.info("third")
    worker = threading.Thread(target=logger.info, args=("from a thread",))
    worker.start()
    worker.join()
    assert _msgs(stream) == ["first", "second", "third", "from a thread"]


def test_without_a_loop_lines_are_written_at_once_and_flush_drains_the_queue(
    logged: tuple[logging.Logger, CountingStream, LoopBatchingHandler],
) -> None:
    logger, stream, handler = logged
    logger.info("no loop")
    assert _msgs(stream) == ["no loop"]

    async def log_then_stop() -> None:
        logger.info("queued when the loop ends")

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(log_then_stop())
    finally:
        loop.close()
    handler.flush()  # as logging.shutdown does at exit
    assert _msgs(stream) == ["no loop", "queued when the loop ends"]
    logger.info("next, after a closed loop")
    assert _msgs(stream)[-1] == "next, after a closed loop"
