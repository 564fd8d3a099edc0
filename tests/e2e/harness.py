"""What e2e tests share: the gateway handle, tenant keys and helpers (no fixtures here)."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai

from tests.adapter_factory import BAD_ADAPTERS, Caps

REPO = Path(__file__).resolve().parents[2]
ADMIN_KEY = "sk-e2e-admin"
KEYS = {"clinic": "sk-e2e-clinic", "lawfirm": "sk-e2e-lawfirm", "acme": "sk-e2e-acme"}
EXTRA_ADAPTER = "extra"  # loaded at runtime through the admin API by a test
# Registry tests register these names at runtime (acme is entitled to all of them).
MULTI = tuple(f"multi{i}" for i in range(6))
REGISTRY_TEST_NAMES = (
    "swap",
    "abtest",
    "fromhttp",
    "froms3",
    *MULTI,
    *(f"bad-{c.name}" for c in BAD_ADAPTERS),
)
REGISTRATION_BUDGET = 3  # with the engine's --max-loras 2
# Registry size caps of the e2e gateway, shared with the bad-adapter table's builders.
E2E_CAPS = Caps(
    max_rank=16,
    max_adapter_bytes=8 << 20,
    max_archive_bytes=64 << 20,
    max_extracted_bytes=16 << 20,
)
READY_TIMEOUT_S = float(os.environ.get("LORAPLEX_E2E_READY_TIMEOUT", "900"))


@dataclass(frozen=True)
class Gateway:
    url: str
    engine_url: str
    manifest: dict[str, Any]
    log_path: Path
    engine_log_path: Path

    clients: dict[str, openai.OpenAI] = field(default_factory=dict)

    def client(self, tenant: str) -> openai.OpenAI:
        """One SDK client per tenant for the session (closed by the fixture)."""
        if tenant not in self.clients:
            self.clients[tenant] = openai.OpenAI(
                base_url=f"{self.url}/v1", api_key=KEYS[tenant], max_retries=0, timeout=180
            )
        return self.clients[tenant]

    def close(self) -> None:
        for c in self.clients.values():
            c.close()

    def admin(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60
        )

    def adapter(self, name: str) -> dict[str, Any]:
        return next(a for a in self.manifest["adapters"] if a["name"] == name)

    @property
    def adapter_names(self) -> list[str]:
        return [a["name"] for a in self.manifest["adapters"]]

    def completion_prompt(self, question: str) -> str:
        template: str = self.manifest["completion_prompt_template"]
        return template.replace("{question}", question)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def report(what: str, **figures: Any) -> None:
    """Print a measured figure and append it to .cache/logs/e2e-figures.jsonl (for notes/docs)."""
    line = {"what": what, "at": time.strftime("%Y-%m-%dT%H:%M:%S"), **figures}
    sys.stderr.write(f"\n[e2e] {json.dumps(line)}\n")
    out = REPO / ".cache" / "logs" / "e2e-figures.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")
