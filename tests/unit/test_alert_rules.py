"""helm/loraplex/files/alerts.yml (the chart's rules) and deploy/prometheus: the rules load
(promtool), their unit tests pass, every alert is tested both ways and documented, and every
metric and label they read is one the gateway exposes.
A real Prometheus then evaluates them over series taken from the gateway's own registry."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml

from tests.prom import Backfill, prometheus_server, require_binary
from tests.unit.metric_catalog import (
    catalog,
    label_problems,
    metric_names,
    new_metrics,
    populate,
    recorded_names,
)

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "prometheus"
ALERTS = ROOT / "helm" / "loraplex" / "files" / "alerts.yml"  # the chart embeds this copy
ALERTS_TEST = DEPLOY / "alerts_test.yml"
CONFIG = DEPLOY / "prometheus.yml"
DOCS = ROOT / "docs" / "alerts.md"
SEVERITIES = {"critical", "warning", "info"}


def rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def alerts() -> list[dict[str, Any]]:
    return [rule for rule in rules() if "alert" in rule]


def recording() -> dict[str, str]:
    return {rule["record"]: rule["expr"] for rule in rules() if "record" in rule}


def promtool(*args: str) -> None:
    tool = require_binary("promtool")
    done = subprocess.run([tool, *args], capture_output=True, text=True, cwd=ROOT, check=False)
    assert done.returncode == 0, f"promtool {' '.join(args)}:\n{done.stdout}{done.stderr}"


def test_rules_pass_promtool_check() -> None:
    promtool("check", "rules", str(ALERTS))


def test_rule_unit_tests_pass() -> None:
    promtool("test", "rules", str(ALERTS_TEST))


def test_example_config_is_valid() -> None:
    promtool("check", "config", str(CONFIG))


def test_every_alert_is_tested_firing_and_quiet() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in yaml.safe_load(ALERTS_TEST.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in alerts()}
    assert names - firing == set(), "alerts never tested firing"
    assert names - quiet == set(), "alerts never tested staying quiet"
    assert (firing | quiet) - names == set(), "tests of alerts that do not exist"


def github_anchor(heading: str) -> str:
    return re.sub(r"[^a-z0-9 _-]", "", heading.strip().lower()).replace(" ", "-")


def test_alerts_are_labelled_and_documented() -> None:
    anchors = {
        github_anchor(line.lstrip("#"))
        for line in DOCS.read_text().splitlines()
        if line.startswith("#")
    }
    for rule in alerts():
        name = rule["alert"]
        assert rule["labels"]["severity"] in SEVERITIES, name
        annotations = rule["annotations"]
        assert {"summary", "description", "runbook_url"} <= annotations.keys(), name
        path, _, anchor = annotations["runbook_url"].partition("#")
        assert path == "docs/alerts.md", name
        assert anchor == name.lower(), name
        assert anchor in anchors, f"docs/alerts.md has no section for {name}"


def test_recording_rules_follow_the_naming_convention() -> None:
    # level:metric:operations (Prometheus' recording-rule naming practice)
    for name in recording():
        assert re.fullmatch(r"loraplex:[a-z0-9_]+:[a-z0-9_]+", name), name


def sources(expr: str, defined: dict[str, str]) -> list[str]:
    """The definitions of the recording rules `expr` reads, transitively."""
    found: list[str] = []
    for name in recorded_names(expr):
        if name in defined:
            found.append(defined[name])
            found.extend(sources(defined[name], defined))
    return found


def test_metrics_and_labels_exist_in_the_gateway_registry() -> None:
    fresh, _ = new_metrics()
    m, drift = new_metrics()
    populate(m, drift)
    known = catalog(m.registry)
    assert catalog(fresh.registry).keys() == known.keys()  # names do not depend on traffic
    defined = recording()
    problems: list[str] = []
    for rule in rules():
        expr = rule["expr"]
        label = rule.get("alert") or rule.get("record")
        for name in sorted(metric_names(expr)):
            if name not in known:
                problems.append(f"{label}: {name} is not exposed by the gateway")
            elif not known[name].sampled:
                problems.append(f"{label}: {name} has no samples: extend metric_catalog.populate")
        for name in sorted(recorded_names(expr) - defined.keys()):
            problems.append(f"{label}: recording rule {name} is not defined")
        problems.extend(
            f"{label}: {p}" for p in label_problems(expr, known, sources(expr, defined))
        )
    assert problems == []


def test_rules_evaluate_over_the_gateways_series() -> None:
    """Backfill two snapshots of the populated registry from the last minutes; a real server
    evaluates the rules at once: every recording rule yields series, and the alerts the snapshot
    calls for go off."""
    require_binary("prometheus")
    m, drift = new_metrics()
    backfill = Backfill()
    now = time.time()
    target = {"job": "loraplex", "instance": "gw-1:8080"}
    populate(m, drift)
    backfill.snapshot(m.registry.collect(), now - 90, target)
    populate(m, drift)
    backfill.snapshot(m.registry.collect(), now - 30, target)
    with prometheus_server(
        rule_files=[ALERTS], backfill=backfill, evaluation_interval="250ms"
    ) as prom:
        for name in recording():
            result = prom.wait_for(name, timeout=10)
            assert all(r["value"][1] not in ("NaN", "+Inf") for r in result), (name, result)
        expected = {
            ("LoraplexAdapterLoadFailures", "firing"),
            ("LoraplexAdapterCapacityErrors", "firing"),
            ("LoraplexExperimentRolledBack", "firing"),
            # half the snapshot's requests are 503s and its drift statistics moved; these
            # alerts have a `for:`, so they wait as pending
            ("LoraplexErrorBudgetBurnFast", "pending"),
            ("LoraplexDriftAlarm", "pending"),
        }
        prom.wait_for("ALERTS", lambda result: expected <= alert_states(result), timeout=10)


def alert_states(result: list[dict[str, Any]]) -> set[tuple[str, str]]:
    return {(r["metric"]["alertname"], r["metric"]["alertstate"]) for r in result}
