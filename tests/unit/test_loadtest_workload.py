"""Workload sampling: Zipf weights, popularity, stream share, lengths, request bodies."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import orjson
import pytest

from loadtest.scenario import Length, parse_scenario
from loadtest.workload import Workload, sample_length, zipf_weights


def scenario(**over: Any) -> Any:
    raw: dict[str, Any] = {
        "tenants": [{"name": "t", "key": "sk-t"}],
        "adapters": {"names": ["a", "b", "c", "d"]},
        "domains": [{"name": "d", "prompts": ["hello there"]}],
        "seed": 3,
    }
    raw.update(over)
    return parse_scenario(raw)


def test_zipf_weights_follow_the_power_law() -> None:
    w = zipf_weights(4, 1.0)
    assert w.sum() == pytest.approx(1.0)
    assert w[0] / w[1] == pytest.approx(2.0)
    assert w[0] / w[3] == pytest.approx(4.0)
    assert np.allclose(zipf_weights(5, 0.0), 0.2)


def test_zipf_sampling_matches_weights() -> None:
    wl = Workload(
        scenario(adapters={"names": ["a", "b", "c", "d"], "popularity": "zipf", "zipf_s": 1.2})
    )
    counts = Counter(wl.next().adapter for _ in range(8000))
    expected = zipf_weights(4, 1.2)
    for name, p in zip("abcd", expected, strict=True):
        assert counts[name] / 8000 == pytest.approx(p, abs=0.02)
    assert counts["a"] > counts["b"] > counts["c"] > counts["d"]


def test_uniform_popularity_and_tenant_restriction() -> None:
    wl = Workload(
        scenario(
            tenants=[{"name": "t", "key": "k", "adapters": ["b", "c"]}],
        )
    )
    counts = Counter(wl.next().adapter for _ in range(2000))
    assert set(counts) == {"b", "c"}
    assert counts["b"] / 2000 == pytest.approx(0.5, abs=0.05)


def test_domain_popularity_uses_the_domain_adapter() -> None:
    wl = Workload(
        scenario(
            adapters={"popularity": "domain"},
            domains=[
                {"name": "med", "prompts": ["pain"], "adapter": "medical", "weight": 3},
                {"name": "law", "prompts": ["lease"], "adapter": "legal", "weight": 1},
            ],
        )
    )
    specs = wl.take(2000)
    assert all((s.domain, s.adapter) in {("med", "medical"), ("law", "legal")} for s in specs)
    share = sum(s.domain == "med" for s in specs) / 2000
    assert share == pytest.approx(0.75, abs=0.04)


def test_same_seed_same_sequence_and_stream_share() -> None:
    a = [s.body for s in Workload(scenario(stream_share=0.3)).take(50)]
    b = [s.body for s in Workload(scenario(stream_share=0.3)).take(50)]
    assert a == b
    streams = sum(s.stream for s in Workload(scenario(stream_share=0.3)).take(4000))
    assert streams / 4000 == pytest.approx(0.3, abs=0.03)


def test_request_bodies_and_headers() -> None:
    wl = Workload(
        scenario(
            stream_share=1.0,
            output_tokens=7,
            prompt_tokens=10,
            extra_body={"temperature": 0, "ignore_eos": True},
        )
    )
    s = wl.next()
    body = orjson.loads(s.body)
    assert s.path == "/v1/chat/completions"
    assert s.headers["Authorization"] == "Bearer sk-t"
    assert body["model"] == s.adapter
    assert body["max_tokens"] == 7 == s.max_tokens
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["temperature"] == 0
    assert body["ignore_eos"] is True
    assert len(body["messages"][0]["content"].split()) == 10


def test_header_selection_and_completions_endpoint() -> None:
    wl = Workload(
        scenario(
            endpoint="completions",
            stream_share=0.0,
            adapters={"names": ["a"], "selection": "header"},
        )
    )
    s = wl.next()
    body = orjson.loads(s.body)
    assert s.path == "/v1/completions"
    assert s.headers["X-Loraplex-Adapter"] == "a"
    assert body["model"] == "default"
    assert body["prompt"].startswith("hello there")
    assert "stream" not in body


@pytest.mark.parametrize("dist", ["fixed", "uniform", "normal", "lognormal"])
def test_lengths_stay_within_bounds(dist: str) -> None:
    rng = np.random.default_rng(0)
    spec = Length(dist, value=20, sigma=0.8 if dist == "lognormal" else 15, min=5, max=40)
    values = [sample_length(rng, spec) for _ in range(3000)]
    assert min(values) >= 5
    assert max(values) <= 40
    if dist == "fixed":
        assert set(values) == {20}
    if dist == "lognormal":
        assert np.mean(values) == pytest.approx(20, rel=0.15)
