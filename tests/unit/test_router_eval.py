"""The eval's arithmetic on a scripted classifier, label maps, the CLI (text, JSON, PNG,
train), and the acceptance claim: on the held-out split the default classifier beats keyword."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from router.domain_router import DomainRouter
from router.eval import OUT_OF_SCOPE, evaluate, format_report, gold_label, load_label_map
from router.keyword import KeywordClassifier
from router.policy import RoutesPolicy, parse_routes
from router.types import Example, Prediction
from server.main import main as loraplex
from tests.unit.router_helpers import default_policy, default_tfidf

DATA = Path(__file__).resolve().parents[2] / "router" / "data"
POLICY = parse_routes(
    {
        "fallback": "base",
        "catch_all": ["general"],
        "threshold": 0.5,
        "domains": {"a": {"target": "A"}, "b": {"target": "B"}, "general": {"target": "base"}},
    }
)


class Scripted:
    """Answers from a table: text → (domain, confidence)."""

    name = "scripted"
    blocking = False
    domains = ("a", "b", "general")

    def __init__(self, table: dict[str, tuple[str | None, float]]) -> None:
        self.table = table

    def classify(self, text: str) -> Prediction:
        return Prediction(*self.table[text])


def test_metrics_on_a_known_confusion() -> None:
    table: dict[str, tuple[str | None, float]] = {
        "a1": ("a", 0.9),  # a → a
        "a2": ("a", 0.8),  # a → a
        "a3": ("b", 0.9),  # a → b
        "b1": ("b", 0.9),  # b → b
        "b2": ("b", 0.3),  # b → out of scope (below threshold)
        "o1": ("general", 0.9),  # oos → oos (catch-all)
        "o2": ("a", 0.9),  # oos → a
        "g1": ("b", 0.2),  # general → oos (low confidence)
    }
    data = [Example(t, {"a": "a", "b": "b", "o": "nonsense", "g": "general"}[t[0]]) for t in table]
    report = evaluate(DomainRouter(POLICY, Scripted(table)), data)
    assert report.labels == ["a", "b", OUT_OF_SCOPE]
    assert report.confusion == [[2, 1, 0], [0, 1, 1], [1, 0, 2]]
    assert report.accuracy == pytest.approx(5 / 8)
    a, b, oos = (report.per_class[k] for k in report.labels)
    flat = [x for r in (a, b, oos) for x in (r.precision, r.recall, r.f1, r.support)]
    third, half = 2 / 3, 1 / 2
    expected = [third, third, third, 3, half, half, half, 2, third, third, third, 3]
    assert flat == pytest.approx(expected)
    assert report.out_of_scope_recall == pytest.approx(2 / 3)
    assert report.macro_f1 == pytest.approx((2 / 3 + 1 / 2 + 2 / 3) / 3)
    assert 0 < report.latency_p50_us <= report.latency_p99_us
    text = format_report(report)
    assert "macro-F1: 0.611" in text
    assert "out-of-scope recall: 0.667" in text


def test_no_out_of_scope_examples_reports_none() -> None:
    report = evaluate(DomainRouter(POLICY, Scripted({"x": ("a", 0.9)})), [Example("x", "a")])
    assert report.out_of_scope_recall is None
    assert "n/a" in format_report(report)


def test_label_map_with_wildcards_and_nulls(tmp_path: Path) -> None:
    path = tmp_path / "map.yaml"
    path.write_text("banking:*: a\ntransfer: b\noos: null\nsmall_talk: general\n")
    label_map = load_label_map(path)
    assert gold_label("banking:balance", POLICY, label_map) == "a"
    assert gold_label("transfer", POLICY, label_map) == "b"
    assert gold_label("oos", POLICY, label_map) == OUT_OF_SCOPE
    assert gold_label("small_talk", POLICY, label_map) == OUT_OF_SCOPE  # catch-all
    assert gold_label("travel:book_flight", POLICY, label_map) == OUT_OF_SCOPE  # unmapped
    assert gold_label("a", POLICY, None) == "a"
    assert gold_label("zzz", POLICY, None) == OUT_OF_SCOPE


def test_default_classifier_beats_keyword_on_the_held_out_split() -> None:
    policy: RoutesPolicy = default_policy()
    test = [Example(**json.loads(line)) for line in (DATA / "test.jsonl").read_text().splitlines()]
    assert not {e.text for e in test} & {e.text for e in policy.examples}  # held out
    tfidf = evaluate(DomainRouter(policy, default_tfidf()), test)
    keyword = evaluate(DomainRouter(policy, KeywordClassifier(policy.keywords)), test)
    assert tfidf.macro_f1 > keyword.macro_f1
    assert tfidf.out_of_scope_recall is not None
    assert tfidf.out_of_scope_recall > 0.7


def test_cli_eval_json_and_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"text": "my lawyer says the court date moved", "label": "law"},
                {"text": "fever and a sore throat since monday", "label": "health"},
                {"text": "what rhymes with orange", "label": "chitchat"},
            ]
        )
    )
    label_map = tmp_path / "m.yaml"
    label_map.write_text("law: legal\nhealth: medical\n")
    png = tmp_path / "out" / "cm.png"
    argv = ["route", "eval", "--data", str(data), "--label-map", str(label_map)]
    assert loraplex([*argv, "--classifier", "keyword", "--json", "--png", str(png)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["classifier"] == "keyword"
    assert report["examples"] == 3
    assert report["labels"] == ["medical", "legal", "out_of_scope"]
    assert report["accuracy"] == 1.0
    assert report["confusion_png"] == str(png)
    assert png.read_bytes().startswith(b"\x89PNG")
    assert loraplex([*argv, "--classifier", "keyword"]) == 0
    out = capsys.readouterr().out
    assert "accuracy: 1.000" in out
    assert (tmp_path / "d.keyword.confusion.png").exists()


def test_cli_train_writes_an_artefact_eval_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    routes = tmp_path / "routes.yaml"
    (tmp_path / "ex.jsonl").write_text(
        "\n".join(
            json.dumps({"text": t, "label": lbl})
            for lbl, texts in {
                "a": ["apples and pears", "apple pie", "green apples"],
                "b": ["bananas are yellow", "banana bread", "ripe bananas"],
            }.items()
            for t in texts
        )
    )
    routes.write_text(
        "fallback: base\nexamples_files: [ex.jsonl]\ndomains: {a: {target: A}, b: {target: B}}\n"
    )
    out = tmp_path / "model.npz"
    assert loraplex(["route", "train", "--routes", str(routes), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    stamp = out.stat().st_mtime_ns
    data = tmp_path / "t.jsonl"
    data.write_text('{"text": "an apple a day", "label": "a"}\n')
    argv = ["route", "eval", "--routes", str(routes), "--data", str(data), "--artefact", str(out)]
    assert loraplex([*argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == 1.0
    assert out.stat().st_mtime_ns == stamp  # loaded, not refitted


def test_cli_errors_are_reported_not_raised(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert loraplex(["route", "eval", "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err


def test_cli_eval_reports_even_when_the_png_cannot_be_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "my lawyer filed the appeal", "label": "legal"}\n')
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    argv = ["route", "eval", "--data", str(data), "--classifier", "keyword", "--json"]
    assert loraplex([*argv, "--png", str(blocker / "cm.png")]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["accuracy"] == 1.0
    assert report["confusion_png"] is None
    assert "not saved" in captured.err
