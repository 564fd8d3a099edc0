"""helm/loraplex/files/loraplex-dashboard.json (the chart's dashboard ConfigMap and compose's
Grafana load this copy): a well-formed dashboard whose every query reads metrics and labels the
gateway exposes, and returns data from a real Prometheus holding the gateway's series.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.prom import Backfill, prometheus_server, require_binary
from tests.unit.metric_catalog import catalog, label_problems, metric_names, new_metrics, populate

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "helm" / "loraplex" / "files" / "loraplex-dashboard.json"
DATASOURCE = "${datasource}"
ROWS = ["Traffic", "Adapters", "Router", "Experiments", "Drift"]
VARIABLES = {"tenant", "adapter", "experiment"}


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels() -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for panel in dashboard()["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))  # a collapsed row holds its panels
    return found


def queries() -> Iterator[tuple[str, str, str]]:
    """(where, expr, legend) of every PromQL the dashboard runs."""
    for panel in panels():
        for target in panel.get("targets", []):
            yield (
                f"panel {panel['title']!r} {target['refId']}",
                target["expr"],
                target.get("legendFormat", ""),
            )
    for annotation in dashboard()["annotations"]["list"]:
        if "expr" in annotation:
            yield f"annotation {annotation['name']!r}", annotation["expr"], ""
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((.+), *(\w+)\)", variable["definition"])
            assert match, variable["definition"]
            selector, label = match.groups()
            yield f"variable {variable['name']}", f"count by ({label}) ({selector})", ""


def test_dashboard_header() -> None:
    d = dashboard()
    assert d["schemaVersion"] == 39
    assert d["uid"] == "loraplex-gateway"
    assert d["title"]
    assert [p["title"] for p in d["panels"] if p["type"] == "row"] == ROWS


def test_variables_use_the_datasource_variable() -> None:
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    source = variables.pop("datasource")
    assert (source["type"], source["query"]) == ("datasource", "prometheus")
    assert variables.keys() == VARIABLES
    for variable in variables.values():
        assert variable["type"] == "query"
        assert variable["datasource"] == {"type": "prometheus", "uid": DATASOURCE}
        assert variable["query"]["query"] == variable["definition"]
        assert (variable["multi"], variable["includeAll"], variable["allValue"]) == (
            True,
            True,
            ".*",
        )


def test_every_panel_has_a_datasource_and_queries() -> None:
    ids = [p["id"] for p in panels()]
    assert len(ids) == len(set(ids)), "panel ids are not unique"
    for panel in panels():
        if panel["type"] == "row":
            continue
        where = panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": DATASOURCE}, where
        assert panel["targets"], where
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), where
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == DATASOURCE, where
            assert target["expr"].strip(), where
        assert panel["fieldConfig"]["defaults"]["unit"], where


def test_panels_tile_the_grid() -> None:
    taken: set[tuple[int, int]] = set()
    for panel in dashboard()["panels"]:
        g = panel["gridPos"]
        assert 0 <= g["x"] < g["x"] + g["w"] <= 24, panel["title"]
        xs, ys = range(g["x"], g["x"] + g["w"]), range(g["y"], g["y"] + g["h"])
        cells = {(x, y) for x in xs for y in ys}
        assert not cells & taken, f"{panel['title']} overlaps another panel"
        taken |= cells


def test_metrics_and_labels_exist_in_the_gateway_registry() -> None:
    m, drift = new_metrics()
    populate(m, drift)
    known = catalog(m.registry)
    problems: list[str] = []
    for where, expr, _ in queries():
        assert metric_names(expr), f"{where} reads no loraplex metric"
        problems.extend(
            f"{where}: {name} is not exposed by the gateway"
            for name in sorted(metric_names(expr) - known.keys())
        )
        problems.extend(f"{where}: {p}" for p in label_problems(expr, known))
    assert problems == []


def substitute(expr: str) -> str:
    """Grafana's variables as Prometheus would receive them with everything selected."""
    expr = expr.replace("$__rate_interval", "5m")
    return re.sub(r"\$\{?(\w+)\}?", lambda m: ".*" if m.group(1) in VARIABLES else m.group(0), expr)


def test_every_query_returns_data_from_the_gateways_series() -> None:
    require_binary("prometheus")
    m, drift = new_metrics()
    backfill = Backfill()
    t0 = float(int(time.time()) - 3600)
    target = {"job": "loraplex", "instance": "gw-1:8080"}
    populate(m, drift)
    backfill.snapshot(m.registry.collect(), t0, target)
    populate(m, drift)
    backfill.snapshot(m.registry.collect(), t0 + 60, target)
    empty: list[str] = []
    with prometheus_server(backfill=backfill) as prom:
        for where, expr, legend in queries():
            result = prom.query(substitute(expr), at=t0 + 60)
            if not result:
                empty.append(f"{where}: {expr}")
            for series in result:
                for label in re.findall(r"{{\s*(\w+)\s*}}", legend):
                    assert label in series["metric"], f"{where}: legend {{{{{label}}}}} unset"
    assert empty == []
