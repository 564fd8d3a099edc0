"""Garbage-collector settings of the serving process (`loraplex serve`).

A gateway request leaves no cyclic garbage (checked with `gc.DEBUG_SAVEALL` over 1000
requests, streamed or not: a handful of objects in all): reference counting frees what it
allocates. The cyclic collector runs anyway, on allocation counts: a generation-0 collection
every 700 net allocations, which is every few requests when dozens are in flight, moves their
live objects to older generations, and every few thousand requests that triggers a full
collection over every object of the process (~220k after start-up: FastAPI, pydantic,
SQLAlchemy, the router's model), about 100 ms of CPU at a time. Measured at c=32 on the benchmark
machine: 40-90 µs of CPU per request, more than the request's routing and metrics together
(docs/benchmarks.md, "What was optimised").

So, once the app is built and before the server starts: collect, `gc.freeze()` (start-up
objects leave the collector's view; reference counting still frees them; only a cycle among
them would never be collected) and a generation-0 threshold of GEN0_THRESHOLD, above what
hundreds of in-flight requests hold, so that the collector, still there for the rare cycle
(an error's traceback), runs about once per many thousand requests instead of every few.

`serving_event_loop` is what `loraplex serve` gives uvicorn as its loop factory (uvloop, as
before): the tuning then happens only in a process that really serves, never in one that merely
builds the app (tests, tools).
"""

from __future__ import annotations

import asyncio
import gc

import uvloop

GEN0_THRESHOLD = 20_000  # CPython's default is 700


def tune_gc() -> None:
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GEN0_THRESHOLD, gen1, gen2)


def serving_event_loop() -> asyncio.AbstractEventLoop:
    """uvicorn loop factory (`loop="server.gc_tuning:serving_event_loop"`)."""
    tune_gc()
    return uvloop.new_event_loop()
