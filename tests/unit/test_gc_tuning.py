"""`loraplex serve` hands uvicorn a loop factory that tunes the garbage collector for serving;
building the app (tests, tools) leaves the collector alone."""

from __future__ import annotations

import gc
from typing import Any

import pytest
import uvicorn
import uvloop

import server.gc_tuning
from server.gc_tuning import GEN0_THRESHOLD, serving_event_loop


def test_the_loop_factory_tunes_the_collector_and_returns_uvloop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[Any] = []

    def collect(*args: Any) -> int:
        calls.append("collect")
        return 0

    monkeypatch.setattr(gc, "collect", collect)
    monkeypatch.setattr(gc, "freeze", lambda: calls.append("freeze"))
    monkeypatch.setattr(gc, "get_threshold", lambda: (700, 10, 10))
    monkeypatch.setattr(gc, "set_threshold", lambda *t: calls.append(t))
    loop = serving_event_loop()
    try:
        assert isinstance(loop, uvloop.Loop)
    finally:
        loop.close()
    assert calls == ["collect", "freeze", (GEN0_THRESHOLD, 10, 10)]


def test_uvicorn_resolves_the_factory_serve_names(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(kw))
    monkeypatch.setattr("server.logs.configure_logging", lambda level: None)
    from server.main import main

    before = (gc.get_threshold(), gc.get_freeze_count())
    assert main(["serve", "--port", "9002"]) == 0
    assert (gc.get_threshold(), gc.get_freeze_count()) == before  # only a serving loop tunes
    config = uvicorn.Config(lambda *a: None, loop=seen["loop"])
    assert config.get_loop_factory() is server.gc_tuning.serving_event_loop
