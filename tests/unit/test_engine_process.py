"""The vLLM command line and environment for local mode (no process is started)."""

from __future__ import annotations

import pytest

from server.engine_process import LocalEngine, engine_command, engine_env
from server.settings import EngineSettings


def _flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def test_engine_command_flags() -> None:
    s = EngineSettings(
        url="http://127.0.0.1:8765",
        mode="local",
        python="/opt/engine/bin/python",
        model="/models/demo",
        served_model_name="base",
        max_lora_rank=32,
        max_loras=3,
        max_cpu_loras=9,
        max_model_len=4096,
        extra_args=["--dtype", "bfloat16"],
    )
    cmd = engine_command(s)
    assert cmd[:3] == ["/opt/engine/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    assert _flag(cmd, "--host") == "127.0.0.1"
    assert _flag(cmd, "--port") == "8765"
    assert _flag(cmd, "--model") == "/models/demo"
    assert _flag(cmd, "--served-model-name") == "base"
    assert _flag(cmd, "--max-lora-rank") == "32"
    assert _flag(cmd, "--max-loras") == "3"
    assert _flag(cmd, "--max-cpu-loras") == "9"
    assert _flag(cmd, "--max-model-len") == "4096"
    assert "--enable-lora" in cmd
    assert cmd[-2:] == ["--dtype", "bfloat16"]
    assert all(isinstance(part, str) for part in cmd)


def test_engine_command_needs_a_model() -> None:
    with pytest.raises(ValueError, match=r"engine\.model"):
        engine_command(EngineSettings(mode="local"))


def test_engine_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", raising=False)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "8")  # the operator's choice wins
    env = engine_env(EngineSettings(kv_cache_gib=2))
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"  # runtime adapter loading
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "8"
    assert env["HF_HUB_OFFLINE"] == "1"
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE")
    assert engine_env(EngineSettings(kv_cache_gib=2))["VLLM_CPU_KVCACHE_SPACE"] == "2"


def test_local_engine_not_started_has_no_pid() -> None:
    engine = LocalEngine(EngineSettings(mode="local", model="/m"))
    assert engine.pid is None
    assert engine.starts == 0


async def test_stop_before_start_is_harmless() -> None:
    engine = LocalEngine(EngineSettings(mode="local", model="/m"))
    await engine.stop()
    assert engine.pid is None
