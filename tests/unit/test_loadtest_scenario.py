"""Scenario parsing: defaults, every section, and errors that name the bad field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from loadtest.scenario import Length, ScenarioError, load_scenario, parse_scenario

REPO = Path(__file__).resolve().parents[2]


def minimal(**over: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "tenants": [{"name": "t", "key": "k"}],
        "adapters": {"names": ["a", "b"]},
        "domains": [{"name": "d", "prompts": ["hi"]}],
    }
    raw.update(over)
    return raw


def test_minimal_scenario_gets_defaults() -> None:
    s = parse_scenario(minimal(), default_name="x")
    assert s.name == "x"
    assert s.endpoint == "chat"
    assert s.popularity == "uniform"
    assert s.load.mode == "closed"
    assert s.load.levels == (1.0,)
    assert s.stream_share == 1.0
    assert s.slo.ttft_ms is None
    assert s.adapters == ("a", "b")


def test_shipped_demo_scenario_parses() -> None:
    s = load_scenario(REPO / "loadtest/scenarios/demo.yaml")
    assert s.load.mode == "open"
    assert s.popularity == "zipf"
    assert [t.name for t in s.tenants] == ["acme", "clinic"]
    assert s.tenants[1].adapters == ("medical", "base")
    assert s.prompt_tokens.dist == "lognormal"
    assert s.slo.ttft_ms == 2000
    assert s.extra_body == {"temperature": 0}


def test_full_sections() -> None:
    s = parse_scenario(
        minimal(
            endpoint="completions",
            adapters={
                "names": ["a", "b"],
                "popularity": "zipf",
                "zipf_s": 1.5,
                "selection": "header",
            },
            stream_share=0.25,
            prompt_tokens=12,
            output_tokens={"dist": "uniform", "min": 2, "max": 9},
            load={"mode": "open", "levels": [0.5, 2], "requests": 7, "duration_s": 3},
            slo={"ttft_ms": 100, "e2e_ms": 900, "itl_ms": 20},
        )
    )
    assert s.endpoint == "completions"
    assert (s.popularity, s.zipf_s, s.selection) == ("zipf", 1.5, "header")
    assert s.prompt_tokens == Length("fixed", 12.0, min=12, max=12)
    assert s.output_tokens.dist == "uniform"
    assert (s.output_tokens.min, s.output_tokens.max) == (2, 9)
    assert s.load.levels == (0.5, 2.0)
    assert (s.load.requests, s.load.duration_s) == (7, 3.0)
    assert (s.slo.ttft_ms, s.slo.e2e_ms, s.slo.itl_ms) == (100, 900, 20)


def test_domain_popularity_takes_adapters_from_domains() -> None:
    s = parse_scenario(
        minimal(
            adapters={"popularity": "domain"},
            domains=[
                {"name": "m", "prompts": ["x"], "adapter": "medical"},
                {"name": "l", "prompts": ["y"], "adapter": "legal"},
            ],
        )
    )
    assert s.adapters == ("medical", "legal")


@pytest.mark.parametrize(
    ("over", "field"),
    [
        ({"tenants": []}, "tenants"),
        ({"tenants": [{"name": "t"}]}, "tenants.t.key"),
        ({"domains": [{"name": "d", "prompts": []}]}, "domains.d.prompts"),
        ({"adapters": {"names": ["a"], "popularity": "pareto"}}, "adapters.popularity"),
        ({"stream_share": 1.5}, "stream_share"),
        ({"load": {"mode": "burst"}}, "load.mode"),
        ({"load": {"levels": [0]}}, "load.levels"),
        ({"load": {"requests": "many"}}, "load.requests"),
        ({"output_tokens": {"min": 9, "max": 2}}, "output_tokens"),
        ({"tenants": [{"name": "t", "key": "k", "adapters": ["zzz"]}]}, "tenants.t.adapters"),
        ({"adapters": {"popularity": "domain"}}, "domains"),
        ({"extra_body": [1]}, "extra_body"),
    ],
)
def test_errors_name_the_field(over: dict[str, Any], field: str) -> None:
    with pytest.raises(ScenarioError, match=field.replace(".", r"\.")):
        parse_scenario(minimal(**over))


def test_not_a_mapping_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="mapping"):
        parse_scenario([1, 2])
    bad = tmp_path / "bad.yaml"
    bad.write_text("tenants: [\n")
    with pytest.raises(ScenarioError, match="not valid YAML"):
        load_scenario(bad)
    ok = tmp_path / "ok.yaml"
    ok.write_text(yaml.safe_dump(minimal()))
    assert load_scenario(ok).name == "ok"
