"""Measure a classifier + routes policy on labelled data: accuracy, macro-F1, per-domain
precision/recall, out-of-scope recall, confusion matrix (text and PNG), classify latency.

Labels: each line's `label`, optionally sent through a label map (YAML `dataset label →
domain`, `*` wildcards allowed, `null` or absent = out of scope). A gold label that is no
routed domain, or a catch-all one (`general`), is `out_of_scope`: both mean "serve with the
fallback". A prediction is `out_of_scope` when the decision went to the fallback.
"""

from __future__ import annotations

import fnmatch
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from router.domain_router import DomainRouter
from router.policy import RoutesError, RoutesPolicy
from router.types import Example

OUT_OF_SCOPE = "out_of_scope"


@dataclass(frozen=True)
class ClassReport:
    precision: float
    recall: float
    f1: float
    support: int


@dataclass(frozen=True)
class EvalReport:
    classifier: str
    examples: int
    accuracy: float
    macro_f1: float
    out_of_scope_recall: float | None
    per_class: dict[str, ClassReport]
    labels: list[str]
    confusion: list[list[int]]  # rows: gold, columns: predicted, in `labels` order
    latency_p50_us: float
    latency_p99_us: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_label_map(path: Path) -> dict[str, str | None]:
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(raw, dict):
        raise RoutesError(f"{path}: expected a mapping 'dataset label: domain'")
    return {str(k): (None if v is None else str(v)) for k, v in raw.items()}


def gold_label(label: str, policy: RoutesPolicy, label_map: Mapping[str, str | None] | None) -> str:
    """The domain a dataset label stands for, or out_of_scope."""
    mapped: str | None = label
    if label_map is not None:
        mapped = label_map.get(label)
        if mapped is None and label not in label_map:
            globs = (p for p in label_map if "*" in p and fnmatch.fnmatchcase(label, p))
            pattern = next(globs, None)
            mapped = label_map[pattern] if pattern else None
    if mapped is None or mapped not in policy.domains or mapped in policy.catch_all:
        return OUT_OF_SCOPE
    return mapped


def evaluate(
    router: DomainRouter,
    data: Sequence[Example],
    label_map: Mapping[str, str | None] | None = None,
) -> EvalReport:
    policy = router.policy
    if not data:
        raise ValueError("no examples to evaluate")
    for ex in data[: min(20, len(data))]:  # warm caches before timing
        router.classifier.classify(ex.text)
    gold, pred, latencies = [], [], []
    for ex in data:
        started = time.perf_counter_ns()
        prediction = router.classifier.classify(ex.text)
        latencies.append((time.perf_counter_ns() - started) / 1000)
        decision = router.decide(prediction)
        pred.append(OUT_OF_SCOPE if decision.fallback else str(decision.domain))
        gold.append(gold_label(ex.label, policy, label_map))
    ordered = [d for d in policy.domains if d not in policy.catch_all] + [OUT_OF_SCOPE]
    labels = [lbl for lbl in ordered if lbl in set(gold) | set(pred)]
    per_class = {lbl: _class_report(lbl, gold, pred) for lbl in labels}
    index = {lbl: i for i, lbl in enumerate(labels)}
    confusion = [[0] * len(labels) for _ in labels]
    for g, p in zip(gold, pred, strict=True):
        confusion[index[g]][index[p]] += 1
    oos = per_class.get(OUT_OF_SCOPE)
    return EvalReport(
        classifier=router.classifier.name,
        examples=len(data),
        accuracy=sum(g == p for g, p in zip(gold, pred, strict=True)) / len(data),
        macro_f1=statistics.fmean(r.f1 for r in per_class.values()),
        out_of_scope_recall=oos.recall if oos is not None and oos.support else None,
        per_class=per_class,
        labels=labels,
        confusion=confusion,
        latency_p50_us=_percentile(latencies, 50),
        latency_p99_us=_percentile(latencies, 99),
    )


def _class_report(label: str, gold: Sequence[str], pred: Sequence[str]) -> ClassReport:
    tp = sum(g == label and p == label for g, p in zip(gold, pred, strict=True))
    predicted = sum(p == label for p in pred)
    support = sum(g == label for g in gold)
    precision = tp / predicted if predicted else 0.0
    recall = tp / support if support else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return ClassReport(precision, recall, f1, support)


def _percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(1, round(q / 100 * len(ordered) + 0.5 - 1e-9))
    return ordered[min(rank, len(ordered)) - 1]


def format_report(report: EvalReport) -> str:
    lines = [
        f"classifier: {report.classifier}   examples: {report.examples}",
        f"accuracy: {report.accuracy:.3f}   macro-F1: {report.macro_f1:.3f}   "
        + (
            f"out-of-scope recall: {report.out_of_scope_recall:.3f}"
            if report.out_of_scope_recall is not None
            else "out-of-scope recall: n/a (no out-of-scope examples)"
        ),
        f"classify latency: p50 {report.latency_p50_us:.0f} µs, p99 {report.latency_p99_us:.0f} µs",
        "",
        f"{'class':<14}{'precision':>10}{'recall':>8}{'f1':>8}{'support':>9}",
    ]
    for name, r in report.per_class.items():
        lines.append(f"{name:<14}{r.precision:>10.3f}{r.recall:>8.3f}{r.f1:>8.3f}{r.support:>9}")
    width = max(len(lbl) for lbl in report.labels) + 2
    lines += ["", "confusion (rows: gold, columns: predicted)"]
    lines.append(" " * width + "".join(f"{lbl[:10]:>11}" for lbl in report.labels))
    for lbl, row in zip(report.labels, report.confusion, strict=True):
        lines.append(f"{lbl:<{width}}" + "".join(f"{n:>11}" for n in row))
    return "\n".join(lines)


def save_confusion_png(report: EvalReport, path: Path) -> Path:
    """The confusion matrix as a heat map (matplotlib, imported here only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(report.labels)
    fig, ax = plt.subplots(figsize=(1.2 * n + 2.5, 1.0 * n + 2))
    ax.imshow(report.confusion, cmap="Blues")
    ax.set_xticks(range(n), report.labels, rotation=35, ha="right")
    ax.set_yticks(range(n), report.labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    top = max(max(row) for row in report.confusion) or 1
    for i, row in enumerate(report.confusion):
        for j, count in enumerate(row):
            color = "white" if count > top / 2 else "black"
            ax.text(j, i, str(count), ha="center", va="center", color=color)
    ax.set_title(f"{report.classifier}: macro-F1 {report.macro_f1:.3f}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
