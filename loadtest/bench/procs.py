"""Process plumbing shared by the benchmarks: free ports, readiness, a fleet of servers, and
the one place that configures a loraplex gateway for a benchmark (tenant key + adapters)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import yaml

from server.auth import hash_key

PY = sys.executable
BENCH_KEY = "sk-bench-0123456789"  # LiteLLM master keys must start with "sk-"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_ready(
    url: str, timeout_s: float = 60, proc: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url, timeout=2).status_code < 500:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up in {timeout_s:.0f} s")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (all its threads) from /proc; None elsewhere.
    CPU per request is a steadier measure than latency on a shared, busy machine."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


ROUTES = """version: 1
fallback: base
threshold: 0.3
domains:
  {adapter}:
    target: {adapter}
    keywords: [hi, hello, greeting*]
    examples: ["hi", "hello there", "hi, how are you?", "greetings to you"]
  general:
    target: base
    keywords: [weather, recipe*, joke*]
    examples: ["what is the weather like", "give me a recipe", "tell me a joke"]
"""


def gateway_config(
    workdir: Path, adapters: dict[str, str], key: str = BENCH_KEY, base_dir: str | None = None
) -> tuple[list[str], dict[str, str]]:
    """Tenants/adapters files for one bench tenant entitled to `adapters` (+ base), the
    registry settings (private database and cache, the base model adapters are checked
    against) and `model="auto"` routing (TF-IDF classifier; "hi" routes to the first adapter);
    returns `loraplex serve` arguments and environment. The only adapter-setup code of the
    benchmarks: adapt it here when the adapter configuration changes."""
    workdir.mkdir(parents=True, exist_ok=True)
    names = [*adapters, "base"]
    tenant = {"key_sha256": hash_key(key), "adapters": names, "default": names[0]}
    (workdir / "tenants.yaml").write_text(yaml.safe_dump({"tenants": {"bench": tenant}}))
    (workdir / "adapters.yaml").write_text(yaml.safe_dump({"adapters": adapters}))
    args = ["--tenants-file", str(workdir / "tenants.yaml")]
    args += ["--adapters-file", str(workdir / "adapters.yaml")]
    env = {
        "LORAPLEX_REGISTRY__URL": f"sqlite+aiosqlite:///{workdir / 'registry.db'}",
        "LORAPLEX_REGISTRY__CACHE_DIR": str(workdir / "adapter-cache"),
        "LORAPLEX_REGISTRY__BASE_MODEL_DIR": base_dir or fake_base_dir(workdir),
        "LORAPLEX_REGISTRY__ALLOW_UNKNOWN_BASE": "true",
        "LORAPLEX_ROUTER__ROUTES_FILE": str(workdir / "routes.yaml"),
        "LORAPLEX_ROUTER__CLASSIFIER": "tfidf",
    }
    (workdir / "routes.yaml").write_text(ROUTES.format(adapter=next(iter(adapters))))
    return args, env


def fake_base_dir(workdir: Path) -> str:
    """config.json + a tiny weights file: the base model the fake engine pretends to serve."""
    d = workdir / "fake-base"
    d.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "intermediate_size": 128,
        "vocab_size": 128,
    }
    (d / "config.json").write_text(json.dumps(config))
    _write_safetensors(d / "model.safetensors", {"lm_head.weight": [128, 64]})
    return str(d)


def _write_safetensors(path: Path, tensors: dict[str, list[int]]) -> None:
    """Zero-filled F32 tensors in the safetensors layout (8-byte header size, JSON, data)."""
    header: dict[str, object] = {}
    offset = 0
    for tname, shape in tensors.items():
        size = 4 * shape[0] * shape[1]
        header[tname] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(offset))


def fake_adapter_dir(workdir: Path, name: str = "bench", rank: int = 8, dim: int = 64) -> str:
    """A small but well-formed peft LoRA directory (q_proj of layer 0, zero weights), so the
    gateway's adapter checks pass while the fake engine "loads" it."""
    d = workdir / name
    d.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ["q_proj"]}
    (d / "adapter_config.json").write_text(json.dumps(config))
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    _write_safetensors(
        d / "adapter_model.safetensors",
        {f"{prefix}.lora_A.weight": [rank, dim], f"{prefix}.lora_B.weight": [dim, rank]},
    )
    return str(d)


def gateway_cmd(port: int, config_args: list[str]) -> list[str]:
    return [PY, "-m", "server.main", "serve", "--port", str(port), *config_args]


class Fleet:
    """Servers started for one benchmark run; all stopped (TERM, then KILL) on exit."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(
        self, name: str, cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> None:
        """Start `cmd` (in `cwd`: `python -m` then imports that tree's code) logging to a file."""
        with (self.logdir / f"{name}.log").open("wb") as log:
            self.procs[name] = subprocess.Popen(
                cmd,
                env={**os.environ, **(env or {})},
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=cwd,
            )

    def adopt(self, name: str, proc: subprocess.Popen[bytes]) -> None:
        self.procs[name] = proc

    def ready(self, name: str, url: str, timeout_s: float = 60) -> None:
        try:
            wait_ready(url, timeout_s, self.procs[name])
        except RuntimeError as exc:
            tail = (self.logdir / f"{name}.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{name}: {exc}\n{tail}") from None

    def stop(self) -> None:
        for p in self.procs.values():
            p.terminate()
        for p in self.procs.values():
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@contextlib.contextmanager
def fleet(logdir: Path) -> Iterator[Fleet]:
    f = Fleet(logdir)
    try:
        yield f
    finally:
        f.stop()
