"""The alert rules and the Grafana dashboard: valid for promtool, unit-tested, and naming only what the code exports."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase
from support.run import ROOT

from worker import db, dead_letters, health, metrics

PROMETHEUS = ROOT / "deploy" / "prometheus"
ALERTS = PROMETHEUS / "alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "worldspeak.json"
RUNBOOK = ROOT / "docs" / "operations.md"
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
TARGET_LABELS = {"job", "instance"}  # added by Prometheus to every scraped series
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right"}


def promtool() -> str:
    """promtool from this environment (bin/setup links it there) or PATH; missing is an error, not a skip."""
    found = shutil.which("promtool", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    if found is None:
        pytest.fail("promtool is missing: bin/setup installs it (from Debian's prometheus package); run bin/setup")
    return found


def run_promtool(*args: str) -> str:
    done = subprocess.run([promtool(), *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"promtool {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_the_alert_rules_pass_promtool_check_and_their_unit_tests() -> None:
    run_promtool("check", "rules", "alerts.yml")
    assert "SUCCESS" in run_promtool("test", "rules", "alerts_test.yml")
    run_promtool("check", "config", "prometheus.yml")  # the example configuration loads the rules


def alerts() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def test_every_alert_is_tested_firing_and_not_firing_and_has_a_runbook_entry() -> None:
    cases = [case for group in yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())["tests"]
             for case in group["alert_rule_test"]]  # fmt: skip
    runbook_headings = set(re.findall(r"^### (\w+)$", RUNBOOK.read_text(), flags=re.MULTILINE))
    for rule in alerts():
        name = rule["alert"]
        outcomes = {bool(case.get("exp_alerts")) for case in cases if case["alertname"] == name}
        assert outcomes == {True, False}, f"{name} is not tested both firing and not firing"
        assert name in runbook_headings, f"docs/operations.md has no '### {name}' runbook entry"
        assert rule["annotations"]["runbook"] == f"docs/operations.md#{name.lower()}"
        assert rule["labels"]["severity"] in ("warning", "critical")


def exported() -> dict[str, set[str]]:
    """Every series name the code exports, with its labels: the registry's counters and histograms, and the
    scrape-time gauges as the collector reads them from the real services (with a dead letter waiting, so
    that gauge has a sample too)."""
    with db.transaction() as conn:
        dead_letters.write(conn, [dead_letters.Letter("usage", {}, "a reason")], datetime.now(UTC))
    names: dict[str, set[str]] = {}
    for metric in vars(metrics).values():
        if isinstance(metric, MetricWrapperBase):
            for family in metric.describe():
                for suffix in SUFFIXES[family.type]:
                    names[family.name + suffix] = set(metric._labelnames) | ({"le"} if suffix == "_bucket" else set())
    families = list(health.LiveCollector().collect())
    up = {sample.labels["dependency"]: sample.value for family in families for sample in family.samples
          if sample.name == "worldspeak_dependency_up"}  # fmt: skip
    assert up and all(up.values()), f"a dependency is down, so some gauges are missing: {up}"
    for family in families:
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return names


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def check_expression(expr: str, names: dict[str, set[str]]) -> None:
    used = set(re.findall(r"\bworldspeak_\w+", expr))
    assert used or "up{" in expr, f"no metric of the worker in {expr!r}"
    unknown = used - names.keys()
    assert not unknown, f"{expr!r} names metrics the code does not export: {sorted(unknown)}"
    known_labels = TARGET_LABELS.union(*(names[name] for name in used))
    selectors = re.findall(r"\{([^}]*)\}", expr)
    matchers = {m.split("=")[0].rstrip("!~").strip() for selector in selectors for m in selector.split(",") if m}
    groupings = {
        label.strip()
        for clause in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr)
        for label in clause.split(",")
        if label.strip()
    }
    unknown_labels = (matchers | groupings) - known_labels - PROMQL_WORDS
    assert not unknown_labels, f"{expr!r} uses labels its metrics do not have: {sorted(unknown_labels)}"


@pytest.mark.usefixtures("committed")
def test_alerts_and_dashboard_name_only_metrics_and_labels_the_code_exports() -> None:
    names = exported()
    expressions = [rule["expr"] for rule in alerts()] + dashboard_expressions()
    for expr in expressions:
        check_expression(expr, names)


def family(series: str) -> str:
    return re.sub(r"_(total|bucket|sum|count)\Z", "", series)


@pytest.mark.usefixtures("committed")
def test_the_dashboard_shows_every_metric_the_code_exports() -> None:
    shown = {family(name) for name in re.findall(r"\bworldspeak_\w+", " ".join(dashboard_expressions()))}
    missing = {family(name) for name in exported() if name.startswith("worldspeak_")} - shown
    assert not missing, f"no panel shows {sorted(missing)}"


@pytest.mark.usefixtures("committed")
def test_the_check_catches_a_misspelt_metric_and_a_label_prometheus_renames() -> None:
    names = exported()
    with pytest.raises(AssertionError, match="does not export"):
        check_expression("max(worldspeak_queue_message)", names)
    with pytest.raises(AssertionError, match="labels its metrics do not have"):
        check_expression('worldspeak_beat_job_seconds_since_success{exported_job="sweep"}', names)


def test_the_dashboard_expressions_are_valid_promql(tmp_path: Path) -> None:
    # promtool parses PromQL only inside rules: each expression becomes a recording rule, with Grafana's
    # $__rate_interval replaced by a duration as Grafana would.
    rules = [{"record": f"dashboard:expression_{i}", "expr": expr.replace("$__rate_interval", "1m")}
             for i, expr in enumerate(dashboard_expressions())]  # fmt: skip
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    run_promtool("check", "rules", str(path))


def test_the_dashboard_is_importable_grafana_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 36 and dashboard["uid"] and dashboard["title"]
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert (variables["DS_PROMETHEUS"]["type"], variables["DS_PROMETHEUS"]["query"]) == ("datasource", "prometheus")
    panels = dashboard["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, panel["title"]
        assert panel["targets"], panel["title"]
        assert len({target["refId"] for target in panel["targets"]}) == len(panel["targets"])
        assert {"h", "w", "x", "y"} <= panel["gridPos"].keys() and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
