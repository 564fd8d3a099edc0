"""Local engine supervision: start vLLM as a child process, wait for it, restart it, stop it.

Production runs the engine separately (mode "remote"); the demo and tests let the gateway own
it (mode "local") so one command brings up the whole stack.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from pathlib import Path

from server.settings import EngineSettings

log = logging.getLogger("loraplex.engine")


def engine_command(s: EngineSettings) -> list[str]:
    """The vLLM OpenAI server command line for the configured engine."""
    if not s.model:
        raise ValueError("engine.model is required when engine.mode is 'local'")
    return [
        s.python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--host",
        s.host,
        "--port",
        str(s.port),
        "--model",
        s.model,
        "--served-model-name",
        s.served_model_name,
        "--enable-lora",
        "--max-lora-rank",
        str(s.max_lora_rank),
        "--max-loras",
        str(s.max_loras),
        "--max-cpu-loras",
        str(s.max_cpu_loras),
        "--max-model-len",
        str(s.max_model_len),
        "--enforce-eager",
        "--disable-uvicorn-access-log",
        *s.extra_args,
    ]


def engine_env(s: EngineSettings) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(s.kv_cache_gib))
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("DO_NOT_TRACK", "1")
    return env


class LocalEngine:
    """One supervised vLLM child process; restarted with backoff if it exits on its own."""

    def __init__(self, settings: EngineSettings) -> None:
        self.settings = settings
        self._proc: asyncio.subprocess.Process | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._stopping = False
        self.starts = 0

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc and self._proc.returncode is None else None

    async def start(self) -> None:
        """Spawn the engine and keep it running until `stop()`."""
        await self._spawn()
        self._supervisor = asyncio.create_task(self._supervise(), name="engine-supervisor")

    async def _spawn(self) -> None:
        log_path = Path(self.settings.log_file)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = engine_command(self.settings)
        with log_path.open("ab") as log_file:  # noqa: ASYNC230 (open is instant; once per start)
            self._proc = await asyncio.create_subprocess_exec(
                *cmd,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=asyncio.subprocess.STDOUT,
                env=engine_env(self.settings),
                start_new_session=True,  # own process group: stop() reaches vLLM's workers too
            )
        self.starts += 1
        log.info("engine started", extra={"pid": self._proc.pid, "log": str(log_path)})

    async def _supervise(self) -> None:
        while not self._stopping:
            proc = self._proc
            if proc is None:
                return
            code = await proc.wait()
            if self._stopping:
                return
            log.warning("engine exited; restarting", extra={"returncode": code})
            await asyncio.sleep(self.settings.restart_backoff_s)
            if not self._stopping:
                await self._spawn()

    async def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM the engine's process group, then SIGKILL after `grace_s`."""
        self._stopping = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), grace_s)
        except TimeoutError:
            _signal_group(proc.pid, signal.SIGKILL)
            await proc.wait()
        _signal_group(proc.pid, signal.SIGKILL)  # stray workers left in the group
        log.info("engine stopped", extra={"returncode": proc.returncode})


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
