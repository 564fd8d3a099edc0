"""Routes file parsing and the decision rules: thresholds, catch-all, tenant overrides,
entitlement fallback chain; the keyword baseline; what text of a request is classified."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from router.inputs import request_text, truncate
from router.keyword import KeywordClassifier
from router.policy import RoutesError, load_routes, parse_routes
from router.types import Prediction

ROUTES: dict[str, Any] = {
    "fallback": "base",
    "catch_all": ["general"],
    "threshold": 0.5,
    "domains": {
        "medical": {"target": "medical", "threshold": 0.7, "examples": ["my tooth hurts"]},
        "legal": {"target": "legal@stable", "keywords": ["lawyer", "court*", "power of attorney"]},
        "general": {"target": "base"},
    },
    "tenants": {
        "clinic": {"auto": True, "fallback": "medical", "domains": {"legal": "legal@2"}},
    },
}


def routes(**changes: Any) -> dict[str, Any]:
    return {**ROUTES, **changes}


def test_default_routes_file_parses_with_examples_for_every_domain() -> None:
    policy = load_routes()
    labels = {e.label for e in policy.examples}
    assert labels == set(policy.domains) == {"medical", "legal", "finance", "code", "general"}
    assert policy.catch_all == {"general"}
    assert len(policy.examples) > 250
    assert all(policy.domains[d].keywords for d in ("medical", "legal", "finance", "code"))


def test_examples_files_are_relative_to_the_routes_file(tmp_path: Path) -> None:
    (tmp_path / "ex.jsonl").write_text(
        '{"text": "sue my neighbour", "label": "legal"}\n\n{"text": "x", "label": "general"}\n'
    )
    path = tmp_path / "routes.yaml"
    path.write_text(yaml.safe_dump(routes(examples_files=["ex.jsonl"])))
    policy = load_routes(path)
    assert [(e.text, e.label) for e in policy.examples] == [
        ("my tooth hurts", "medical"),
        ("sue my neighbour", "legal"),
        ("x", "general"),
    ]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ([], "expected a mapping"),
        (routes(fallback=""), "'fallback' must name a model"),
        (routes(domains={"a": {"target": "x"}}), "at least two"),
        (routes(threshold=1.5), "threshold"),
        (routes(threshold=True), "threshold"),
        (routes(catch_all=["nope"]), "catch_all names unknown"),
        (routes(colour="red"), "unknown keys"),
        (routes(version=2), "unsupported version"),
        (routes(domains={**ROUTES["domains"], "x": {"keywords": ["a"]}}), "'target'"),
        (routes(domains={**ROUTES["domains"], "x": {"target": "x", "keywords": "a"}}), "list"),
        (routes(tenants={"t": {"domains": {"finance": "f"}}}), "unknown domains"),
        (routes(tenants={"t": {"fallback": 3}}), "'fallback' must name"),
        (routes(tenants={"t": {"sticky": True}}), "unknown keys"),
    ],
)
def test_bad_routes_are_refused(raw: Any, message: str) -> None:
    with pytest.raises(RoutesError, match=message):
        parse_routes(raw)


def test_examples_with_unknown_labels_are_refused(tmp_path: Path) -> None:
    (tmp_path / "ex.jsonl").write_text('{"text": "hi", "label": "astrology"}\n')
    (tmp_path / "bad.jsonl").write_text('{"text": "hi"}\n')
    with pytest.raises(RoutesError, match="unknown domains"):
        parse_routes(routes(examples_files=["ex.jsonl"]), tmp_path / "r.yaml")
    with pytest.raises(RoutesError, match=r"bad.jsonl:1"):
        parse_routes(routes(examples_files=["bad.jsonl"]), tmp_path / "r.yaml")


def test_decisions_apply_thresholds_catch_all_and_overrides() -> None:
    policy = parse_routes(ROUTES)
    d = policy.decide(Prediction("medical", 0.9), "tfidf")
    assert (d.domain, d.target, d.fallback, d.reason) == ("medical", "medical", False, None)
    # Per-domain threshold (0.7) beats the default (0.5).
    d = policy.decide(Prediction("medical", 0.6), "tfidf")
    assert (d.domain, d.target, d.fallback, d.reason) == (None, "base", True, "low_confidence")
    assert d.confidence == 0.6
    d = policy.decide(Prediction("legal", 0.55), "tfidf")
    assert (d.target, d.fallback) == ("legal@stable", False)
    d = policy.decide(Prediction(None, 0.0), "keyword")
    assert (d.domain, d.target, d.reason, d.classifier) == (
        None,
        "base",
        "low_confidence",
        "keyword",
    )
    d = policy.decide(Prediction("general", 0.99), "tfidf")
    assert (d.domain, d.target, d.fallback, d.reason) == ("general", "base", True, "catch_all")
    # Tenant overrides: its own target for a domain and its own fallback.
    d = policy.decide(Prediction("legal", 0.9), "tfidf", tenant="clinic")
    assert d.target == "legal@2"
    d = policy.decide(Prediction("general", 0.9), "tfidf", tenant="clinic")
    assert d.target == "medical"
    assert policy.tenant_auto("clinic")
    assert not policy.tenant_auto("someone-else")


def test_not_entitled_falls_back_through_the_chain() -> None:
    policy = parse_routes(ROUTES)
    only = {"base", "medical"}
    d = policy.decide(Prediction("legal", 0.9), "tfidf", "x", only.__contains__, None)
    assert (d.domain, d.target, d.fallback, d.reason) == ("legal", "base", True, "not_entitled")
    # Neither the tenant's nor the global fallback is allowed: the tenant's default model.
    d = policy.decide(Prediction("legal", 0.9), "tfidf", "x", {"finance"}.__contains__, "finance")
    assert (d.target, d.reason) == ("finance", "not_entitled")
    # Nothing allowed at all: the global fallback (the pipeline then answers 404).
    d = policy.decide(Prediction("legal", 0.9), "tfidf", "x", lambda _: False, None)
    assert d.target == "base"


def test_keyword_classifier() -> None:
    clf = KeywordClassifier(
        {"legal": ["lawyer", "court*", "power of attorney"], "medical": ["fever", "doctor*"]}
    )
    assert clf.domains == ("legal", "medical")
    assert clf.classify("What is the capital of France?") == Prediction(None, 0.0)
    assert clf.hits("The Courthouse and the courts; a lawyer!") == {"legal": 3}
    p = clf.classify("Do I need a lawyer?")
    assert (p.domain, p.confidence) == ("legal", 0.5)
    p = clf.classify("Grant my doctor power of attorney")  # phrase + prefix, 1-1 tie
    assert (p.domain, p.confidence) == ("legal", 0.25)
    p = clf.classify("Fever again, doctor: fever!")
    assert (p.domain, p.confidence) == ("medical", 0.875)


CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Who won the match?"},
    {"role": "assistant", "content": "Team A."},
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "My knee"},
            {"type": "image_url"},
            {"type": "text", "text": "hurts"},
        ],
    },
]


def test_what_is_classified() -> None:
    assert request_text("chat", {"messages": CHAT}, "last_user", 100) == "My knee\nhurts"
    assert (
        request_text("chat", {"messages": CHAT}, "system_last_user", 100)
        == "You are terse.\nMy knee\nhurts"
    )
    full = request_text("chat", {"messages": CHAT}, "conversation", 100)
    assert full == "You are terse.\nWho won the match?\nTeam A.\nMy knee\nhurts"
    assert (
        request_text("chat", {"messages": [{"role": "system", "content": "x"}]}, "last_user", 9)
        == ""
    )
    assert request_text("chat", {"messages": "nonsense"}, "last_user", 9) == ""
    assert request_text("completions", {"prompt": "  Q: fever?  "}, "last_user", 9) == "Q: fever?"
    assert request_text("completions", {"prompt": ["a", 3, "b"]}, "last_user", 9) == "a\nb"
    assert request_text("completions", {"prompt": [1, 2, 3]}, "last_user", 9) == ""


def test_truncation_keeps_head_and_tail() -> None:
    text = "QUESTION " + "x" * 5000 + " END"
    cut = truncate(text, 100)
    assert len(cut) == 100
    assert cut.startswith("QUESTION ")
    assert cut.endswith(" END")
    assert truncate("short", 100) == "short"


def test_demo_routes_route_acme_automatically(tmp_path: Path) -> None:
    from server.demo_config import write_demo_routes

    policy = load_routes(write_demo_routes(tmp_path / "demo"))
    assert policy.tenant_auto("acme")
    assert not policy.tenant_auto("medical-team")
    assert {d: policy.domains[d].target for d in ("medical", "legal", "finance", "code")} == {
        "medical": "medical",
        "legal": "legal",
        "finance": "finance",
        "code": "base",
    }
    assert len(policy.examples) == len(load_routes().examples)
