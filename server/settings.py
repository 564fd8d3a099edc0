"""Gateway configuration: one pydantic-settings tree, read from `LORAPLEX_*` env vars.

Nested fields use `__` (e.g. `LORAPLEX_ENGINE__URL`). Nothing here reads files or starts
anything; `create_app(settings)` does the work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from server.telemetry.drift import DriftSettings


class EngineSettings(BaseModel):
    """Where the vLLM engine is, and how to start it when the gateway supervises it."""

    url: str = "http://127.0.0.1:8100"
    mode: Literal["remote", "local"] = "remote"
    served_model_name: str = "base"
    # Local mode only: the interpreter of the engine venv and the model to serve.
    python: str = ".cache/venv-engine/bin/python"
    model: str | None = None
    max_lora_rank: int = 16
    max_loras: int = 2
    max_cpu_loras: int = 8
    max_model_len: int = 2048
    kv_cache_gib: int = 1
    extra_args: list[str] = Field(default_factory=list)
    log_file: Path = Path(".cache/logs/vllm.log")
    startup_timeout_s: float = 600.0
    restart_backoff_s: float = 2.0
    # Transport.
    connect_timeout_s: float = 2.0
    request_timeout_s: float = 600.0
    read_timeout_s: float = 120.0
    pool_size: int = 512
    # Idle pooled connections are closed after this long: below the engine's own keep-alive
    # (vLLM/uvicorn: 5 s), so the gateway never reuses a connection the engine is closing.
    keepalive_timeout_s: float = Field(4.0, gt=0)
    # Retries of a request the engine certainly did not start (refused or reset before the
    # response headers, or a 503 answer): how many more tries, and the full-jitter backoff
    # (base doubling per retry, capped). server/upstream.py has the rule.
    retries: int = Field(1, ge=0, le=5)
    retry_backoff_s: float = Field(0.05, ge=0)
    retry_backoff_max_s: float = Field(0.25, ge=0)
    retry_after_s: int = 1
    health_interval_s: float = 2.0
    # Several engines (docs/deploy.md, "Several engines"): a static list, or every address of
    # a DNS name (a Kubernetes headless Service) re-resolved each interval, reached with the
    # scheme and port of `url`. Neither: the one engine at `url`.
    urls: list[str] = Field(default_factory=list)
    discovery_dns: str | None = None
    discovery_interval_s: float = Field(10.0, gt=0)
    # Adapter affinity yields to load: an adapter is also registered on the least-loaded
    # engine when the least-loaded engine holding it carries this many more requests.
    spill_threshold: int = Field(16, ge=1)

    @field_validator("url")
    @classmethod
    def _strip_slash(cls, v: str) -> str:
        return _engine_url(v)

    @field_validator("urls")
    @classmethod
    def _check_urls(cls, v: list[str]) -> list[str]:
        urls = [_engine_url(u) for u in v]
        if len(set(urls)) != len(urls):
            raise ValueError("engine urls must be distinct")
        return urls

    @model_validator(mode="after")
    def _one_engine_source(self) -> EngineSettings:
        if self.urls and self.discovery_dns:
            raise ValueError("set engine.urls or engine.discovery_dns, not both")
        if self.mode == "local" and (self.urls or self.discovery_dns):
            raise ValueError("engine.mode 'local' supervises one engine: leave urls and dns unset")
        return self

    @property
    def engine_urls(self) -> list[str]:
        """The static engine set (DNS discovery replaces it at run time)."""
        return self.urls or [self.url]

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or (443 if parts.scheme == "https" else 80)

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "127.0.0.1"


def _engine_url(v: str) -> str:
    parts = urlsplit(v)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("engine url must be http(s)://host[:port]")
    return v.rstrip("/")


class RegistrySettings(BaseModel):
    """The adapter registry, its local file cache and the engine registration budget."""

    url: str = "sqlite+aiosqlite:///.cache/registry/registry.db"
    cache_dir: Path = Path(".cache/adapter-cache")
    # Adapter versions registered on the engine at once (vLLM's own slots: engine.max_loras).
    budget: int = Field(8, ge=1)
    drain_timeout_s: float = 30.0
    max_adapter_bytes: int = 2 << 30
    max_archive_bytes: int = 4 << 30  # downloaded archive size
    max_extracted_bytes: int = 4 << 30  # written while extracting or copying a source
    # The served base model (config.json + weights) adapters are checked against; defaults to
    # engine.model. Remote engines: mount the same directory or set base_digest + config.
    base_model_dir: Path | None = None
    allow_unknown_base: bool = False
    poll_interval_s: float = 2.0
    # PostgreSQL: connecting, waiting for a pooled connection, and each statement give up after
    # this long (503 `registry_unavailable`), so a server that hangs cannot hang admin calls.
    timeout_s: float = Field(5.0, gt=0)
    interrupted_after_s: float = 600.0
    s3_endpoint_url: str | None = None


class RouterSettings(BaseModel):
    """Domain routing for `model="auto"` (docs/router.md). Off until a routes file is set."""

    routes_file: Path | None = None
    classifier: Literal["keyword", "tfidf", "embedding"] = "tfidf"
    # Fitted classifier: loaded when it matches the routes' examples, else fitted (in a worker
    # thread at start-up) and saved here. None: fit at every start-up (a few seconds).
    artefact: Path | None = None
    classify_input: Literal["last_user", "conversation", "system_last_user"] = "last_user"
    max_chars: int = Field(500, ge=16)


class ExperimentSettings(BaseModel):
    """A/B experiments (docs/experiments.md): where the controller reads metrics, how often."""

    # Production mode: the controller reads every replica's metrics through PromQL. Unset: it
    # reads this process's own counters (right for a single replica).
    prometheus_url: str | None = None
    prometheus_timeout_s: float = 5.0
    interval_s: float = Field(15.0, gt=0)
    lease_ttl_s: float = Field(45.0, gt=0)
    shadow_max_concurrency: int = Field(8, ge=0)
    feedback_max_entries: int = Field(200_000, ge=1)
    feedback_ttl_s: float = Field(86_400.0, gt=0)


class Settings(BaseSettings):
    """Top-level gateway settings."""

    model_config = SettingsConfigDict(
        env_prefix="LORAPLEX_", env_nested_delimiter="__", extra="ignore"
    )

    host: str = "127.0.0.1"
    port: int = 8080
    tenants_file: Path | None = None
    adapters_file: Path | None = None
    # Admin key: prefer the sha256 hex digest; a plain key is accepted and hashed at start.
    admin_key_sha256: str | None = None
    admin_key: SecretStr | None = None
    max_body_bytes: int = 4 * 1024 * 1024
    # Generation requests (server/deadlines.py): until the response starts → 504
    # request_timeout; a stream still running this long after arrival ends with stream_timeout.
    request_timeout_s: float | None = Field(600.0, gt=0)
    max_stream_duration_s: float | None = Field(3600.0, gt=0)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    engine: EngineSettings = Field(default_factory=EngineSettings)
    registry: RegistrySettings = Field(default_factory=RegistrySettings)
    router: RouterSettings = Field(default_factory=RouterSettings)
    experiments: ExperimentSettings = Field(default_factory=ExperimentSettings)
    drift: DriftSettings = Field(default_factory=DriftSettings)

    @field_validator("admin_key_sha256")
    @classmethod
    def _digest(cls, v: str | None) -> str | None:
        # A typo here would silently lock the operator out; tenant digests are checked too.
        if not v:  # unset, or an empty env var / chart value
            return None
        if len(v) != 64 or any(c not in "0123456789abcdef" for c in v.lower()):
            raise ValueError("admin_key_sha256 must be a sha256 hex digest (64 hex characters)")
        return v.lower()
