"""Turns a scenario into concrete requests, reproducibly (one seeded generator per run).

Prompt length is approximated in words (about one token per short English word); a scenario
that needs exact outputs sets `extra_body: {ignore_eos: true}` so vLLM generates `max_tokens`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from loadtest.scenario import Length, Scenario, Tenant

ADAPTER_HEADER = "X-Loraplex-Adapter"
FILLER = ("please", "answer", "briefly", "and", "clearly", "with", "the", "key", "facts", "only")
PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}


@dataclass(frozen=True, slots=True)
class RequestSpec:
    """One request to send: who, to which adapter, and the exact bytes."""

    tenant: str
    adapter: str
    domain: str
    stream: bool
    max_tokens: int
    path: str
    headers: dict[str, str]
    body: bytes


def zipf_weights(n: int, s: float) -> np.ndarray[Any, np.dtype[np.float64]]:
    """Finite Zipf: P(rank k) proportional to 1 / k**s, k = 1..n (s = 0 is uniform)."""
    ranks = np.arange(1, n + 1, dtype=np.float64)
    w: np.ndarray[Any, np.dtype[np.float64]] = ranks**-s
    out: np.ndarray[Any, np.dtype[np.float64]] = w / w.sum()
    return out


def normalized(weights: list[float]) -> np.ndarray[Any, np.dtype[np.float64]]:
    w: np.ndarray[Any, np.dtype[np.float64]] = np.asarray(weights, dtype=np.float64)
    if w.sum() <= 0:
        raise ValueError("weights must not all be zero")
    out: np.ndarray[Any, np.dtype[np.float64]] = w / w.sum()
    return out


def sample_length(rng: np.random.Generator, spec: Length) -> int:
    if spec.dist == "fixed":
        value = spec.value
    elif spec.dist == "uniform":
        value = rng.uniform(spec.min, spec.max + 1)
    elif spec.dist == "normal":
        value = rng.normal(spec.value, spec.sigma)
    else:  # lognormal parameterised by the mean of the result
        mu = np.log(max(spec.value, 1e-9)) - spec.sigma**2 / 2
        value = rng.lognormal(mu, spec.sigma)
    return int(min(spec.max, max(spec.min, int(value))))


class Workload:
    """Draws RequestSpecs from a scenario; the same seed gives the same sequence."""

    def __init__(self, scenario: Scenario, seed: int | None = None) -> None:
        self.s = scenario
        self.rng = np.random.default_rng(scenario.seed if seed is None else seed)
        self._tenant_p = normalized([t.weight for t in scenario.tenants])
        self._domain_p = normalized([d.weight for d in scenario.domains])
        self._adapter_p: dict[str, tuple[tuple[str, ...], np.ndarray[Any, Any]]] = {}
        for t in scenario.tenants:
            names = t.adapters or scenario.adapters
            if scenario.popularity == "zipf":
                p = zipf_weights(len(names), scenario.zipf_s)
            else:
                p = np.full(len(names), 1.0 / len(names))
            self._adapter_p[t.name] = (names, p)

    def _adapter(self, tenant: Tenant, domain_adapter: str | None) -> str:
        if self.s.popularity == "domain" and domain_adapter is not None:
            return domain_adapter
        names, p = self._adapter_p[tenant.name]
        return names[int(self.rng.choice(len(names), p=p))]

    def next(self) -> RequestSpec:
        s, rng = self.s, self.rng
        tenant = s.tenants[int(rng.choice(len(s.tenants), p=self._tenant_p))]
        domain = s.domains[int(rng.choice(len(s.domains), p=self._domain_p))]
        adapter = self._adapter(tenant, domain.adapter)
        stream = bool(rng.random() < s.stream_share)
        prompt = _pad(domain.prompts[int(rng.integers(len(domain.prompts)))], rng, s)
        max_tokens = sample_length(rng, s.output_tokens)
        headers = {"Authorization": f"Bearer {tenant.key}", "Content-Type": "application/json"}
        body: dict[str, Any] = {"max_tokens": max_tokens, **s.extra_body}
        if s.selection == "header" and adapter != "auto":
            headers[ADAPTER_HEADER] = adapter
            body["model"] = "default"
        else:
            body["model"] = adapter
        if s.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return RequestSpec(
            tenant.name,
            adapter,
            domain.name,
            stream,
            max_tokens,
            PATHS[s.endpoint],
            headers,
            orjson.dumps(body),
        )

    def take(self, n: int) -> list[RequestSpec]:
        return [self.next() for _ in range(n)]


def _pad(prompt: str, rng: np.random.Generator, s: Scenario) -> str:
    """Lengthen (never shorten) the prompt to about the sampled number of words."""
    want = sample_length(rng, s.prompt_tokens)
    words = prompt.split()
    if len(words) >= want:
        return prompt
    extra = [FILLER[i % len(FILLER)] for i in range(want - len(words))]
    return prompt + " " + " ".join(extra)
