"""deploy/: the alert rules load in promtool; every dashboard query parses (promtool, as
recording rules) and names only metrics the verifier and device registries export."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import yaml

from middleware.metrics import Registry
from middleware.nodes.metrics import DeviceMetrics
from middleware.verifier.service import VerifierMetrics
from tests.unit.test_metrics_prometheus import _promtool

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
RULES = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "mw-dashboard.json"
SUFFIXES = ("_bucket", "_sum", "_count", "_total", "_created", "")


def _exported() -> set[str]:
    text = VerifierMetrics(Registry()).registry.render()
    text += DeviceMetrics().registry.render()
    return {line.split("{")[0].split()[0] for line in text.splitlines() if line[:1] not in "#"}


def _names(expr: str) -> set[str]:
    return set(re.findall(r"\b(mw_[a-z0-9_]+)", expr))


def _dashboard_exprs() -> list[str]:
    d = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in d["panels"] for t in p.get("targets", [])]


def test_alert_rules_pass_promtool() -> None:
    r = subprocess.run(
        [_promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stdout + r.stderr
    names = {
        rule["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for rule in g["rules"]
    }
    assert {"MwVerifierDown", "MwAcceptanceCollapse", "MwForwardLatencyP95High"} <= names
    assert "MwRejectedMessages" in names


def test_alert_and_dashboard_metric_names_exist() -> None:
    exported = _exported()
    exprs = _dashboard_exprs() + [
        rule["expr"] for g in yaml.safe_load(RULES.read_text())["groups"] for rule in g["rules"]
    ]
    assert len(exprs) >= 10
    for expr in exprs:
        for name in _names(expr):
            assert name in exported, f"{name} (in {expr!r}) is not exported"


def test_dashboard_queries_parse_in_promtool(tmp_path: Path) -> None:
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"mw_dashboard:q{i}", "expr": e}
                    for i, e in enumerate(_dashboard_exprs())
                ],
            }
        ]
    }
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(rules))
    r = subprocess.run(
        [_promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stdout + r.stderr
