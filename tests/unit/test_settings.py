"""Settings from LORAPLEX_* environment variables."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from server.settings import EngineSettings, Settings


def test_defaults() -> None:
    s = Settings()
    assert s.engine.url == "http://127.0.0.1:8100"
    assert s.engine.mode == "remote"
    assert s.engine.port == 8100
    assert s.engine.host == "127.0.0.1"
    assert s.admin_key is None
    assert s.max_body_bytes == 4 * 1024 * 1024


def test_nested_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAPLEX_ENGINE__URL", "http://10.1.2.3:9000/")
    monkeypatch.setenv("LORAPLEX_ENGINE__MODE", "local")
    monkeypatch.setenv("LORAPLEX_ENGINE__MAX_LORAS", "4")
    monkeypatch.setenv("LORAPLEX_ENGINE__EXTRA_ARGS", '["--dtype", "bfloat16"]')
    monkeypatch.setenv("LORAPLEX_PORT", "9999")
    monkeypatch.setenv("LORAPLEX_MAX_BODY_BYTES", "1024")
    monkeypatch.setenv("LORAPLEX_TENANTS_FILE", "/etc/loraplex/tenants.yaml")
    monkeypatch.setenv("LORAPLEX_ADMIN_KEY", "sk-very-secret")
    monkeypatch.setenv("LORAPLEX_LOG_LEVEL", "debug")
    monkeypatch.setenv("UNRELATED_ENGINE__URL", "http://nope:1")
    s = Settings()
    assert s.engine.url == "http://10.1.2.3:9000"
    assert s.engine.host == "10.1.2.3"
    assert s.engine.port == 9000
    assert s.engine.mode == "local"
    assert s.engine.max_loras == 4
    assert s.engine.extra_args == ["--dtype", "bfloat16"]
    assert s.port == 9999
    assert s.max_body_bytes == 1024
    assert s.tenants_file == Path("/etc/loraplex/tenants.yaml")
    assert s.admin_key is not None
    assert s.admin_key.get_secret_value() == "sk-very-secret"
    assert "sk-very-secret" not in repr(s)
    assert s.log_level == "debug"


def test_https_default_port(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAPLEX_ENGINE__URL", "https://engine.internal")
    s = Settings()
    assert s.engine.port == 443
    assert s.engine.host == "engine.internal"
    assert EngineSettings(url="http://engine.internal").port == 80


@pytest.mark.parametrize("url", ["ftp://x", "engine:8000", "http://", "not a url"])
def test_bad_engine_url(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    monkeypatch.setenv("LORAPLEX_ENGINE__URL", url)
    with pytest.raises(ValidationError, match="engine url"):
        Settings()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("LORAPLEX_ENGINE__MODE", "cloud"),
        ("LORAPLEX_LOG_LEVEL", "verbose"),
        ("LORAPLEX_PORT", "eighty"),
    ],
)
def test_bad_values_rejected(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        Settings()


def test_admin_key_digest_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    digest = "AB" * 32
    monkeypatch.setenv("LORAPLEX_ADMIN_KEY_SHA256", digest)
    assert Settings().admin_key_sha256 == digest.lower()
    monkeypatch.setenv("LORAPLEX_ADMIN_KEY_SHA256", "")
    assert Settings().admin_key_sha256 is None
    for bad in ("abc", "g" * 64, "a" * 65):
        monkeypatch.setenv("LORAPLEX_ADMIN_KEY_SHA256", bad)
        with pytest.raises(ValidationError, match="sha256"):
            Settings()
