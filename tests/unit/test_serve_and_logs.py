"""`loraplex serve` option handling (uvicorn not started) and the JSON log formatter."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

import server.app
import server.logs
from server.logs import JsonFormatter
from server.main import main
from server.settings import Settings


def test_serve_merges_env_and_cli(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: dict[str, Any] = {}
    real_create_app = server.app.create_app

    def fake_create_app(settings: Settings, engine_factory: Any = None) -> Any:
        seen["settings"] = settings
        return real_create_app(settings, engine_factory)

    def fake_run(app: Any, **kwargs: Any) -> None:
        seen["app"] = app
        seen["kwargs"] = kwargs

    import uvicorn

    monkeypatch.setattr(server.app, "create_app", fake_create_app)
    monkeypatch.setattr(uvicorn, "run", fake_run)
    monkeypatch.setattr(server.logs, "configure_logging", lambda level: seen.update(level=level))
    monkeypatch.setenv("LORAPLEX_ENGINE__URL", "http://10.0.0.1:8100")
    monkeypatch.setenv("LORAPLEX_ENGINE__MAX_LORAS", "5")
    monkeypatch.setenv("LORAPLEX_PORT", "7000")
    monkeypatch.setenv("LORAPLEX_LOG_LEVEL", "warning")
    tenants = tmp_path / "tenants.yaml"
    argv = ["serve", "--port", "9001", "--engine-mode", "local", "--tenants-file", str(tenants)]
    assert main(argv) == 0
    s: Settings = seen["settings"]
    assert s.port == 9001  # CLI beats env
    assert s.host == "127.0.0.1"
    assert s.tenants_file == tenants
    assert s.engine.url == "http://10.0.0.1:8100"  # env kept where the CLI is silent
    assert s.engine.max_loras == 5
    assert s.engine.mode == "local"
    assert seen["level"] == "warning"
    assert seen["kwargs"]["port"] == 9001
    assert seen["kwargs"]["host"] == "127.0.0.1"
    assert seen["app"].title == "loraplex"


def test_json_formatter_one_object_per_line() -> None:
    record = logging.LogRecord("loraplex.access", logging.INFO, __file__, 1, "request", (), None)
    record.__dict__.update(request_id="r1", status=200, path=Path("/x"))
    line = JsonFormatter().format(record)
    assert "\n" not in line
    out = orjson.loads(line)
    assert out["level"] == "info"
    assert out["logger"] == "loraplex.access"
    assert out["msg"] == "request"
    assert out["request_id"] == "r1"
    assert out["status"] == 200
    assert out["path"] == "/x"
    assert out["ts"].endswith("Z")


def test_json_formatter_includes_exceptions() -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        exc_info = sys.exc_info()
    record = logging.LogRecord("loraplex.app", logging.ERROR, __file__, 1, "x", (), exc_info)
    out = orjson.loads(JsonFormatter().format(record))
    assert "RuntimeError: boom" in out["exc"]


def test_configure_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    logger = logging.getLogger("loraplex")
    monkeypatch.setattr(logger, "handlers", [])
    monkeypatch.setattr(logger, "propagate", True)
    monkeypatch.setattr(logger, "level", logger.level)
    server.logs.configure_logging("warning")
    assert logger.level == logging.WARNING
    assert not logger.propagate
    [handler] = logger.handlers
    assert isinstance(handler.formatter, JsonFormatter)
