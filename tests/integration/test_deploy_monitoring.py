"""The shipped Prometheus alert rules and Grafana dashboard: `promtool check rules` and
`promtool test rules` pass, every dashboard query is valid PromQL, and every metric the
rules and the dashboard name is one a running gateway really exports."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml

from tests.support import require_binary
from unbroken.gateway.app import create_app
from unbroken.mock import MockConfig, MockServer, ServerThread
from unbroken.settings import Settings

pytestmark = pytest.mark.integration

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
RULES = DEPLOY / "prometheus" / "alerts.yml"
RULES_TEST = DEPLOY / "prometheus" / "alerts.test.yml"
DASHBOARD = DEPLOY / "grafana" / "unbroken-gateway.json"
# The alerts the operations guide promises.
ALERTS = {
    "UnbrokenHighErrorRate",
    "UnbrokenSlowFirstToken",
    "UnbrokenCircuitOpen",
    "UnbrokenRetryBudgetPressure",
    "UnbrokenStoreUnavailable",
}


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    binary = require_binary("promtool")
    return subprocess.run(
        [binary, *args], capture_output=True, text=True, timeout=60, cwd=cwd, check=False
    )


def dashboard_queries() -> list[str]:
    data = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return [t["expr"] for p in data["panels"] for t in p["targets"]]


def test_promtool_checks_and_tests_the_alert_rules() -> None:
    """`promtool check rules` accepts the rules, and the rule unit tests (each alert fires
    on its failure and stays quiet before it) pass."""
    checked = promtool("check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in checked.stdout
    tested = promtool("test", "rules", RULES_TEST.name, cwd=RULES_TEST.parent)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    names = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    assert names == ALERTS


def test_dashboard_is_well_formed_and_its_queries_are_valid_promql(tmp_path: Path) -> None:
    """The dashboard JSON has unique panel ids and a query on each panel, and promtool
    parses every query (as recording rules)."""
    data = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert data["uid"] == "unbroken-gateway"
    ids = [p["id"] for p in data["panels"]]
    assert len(ids) == len(set(ids))
    assert all(p["targets"] for p in data["panels"])
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{i}", "expr": q.replace("$__rate_interval", "5m")}
                    for i, q in enumerate(dashboard_queries())
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules), encoding="utf-8")
    checked = promtool("check", "rules", str(path))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_every_metric_named_is_exported_by_a_gateway() -> None:
    """Each `unbroken_*` metric in the rules and the dashboard is a family on a live
    gateway's /metrics (so no alert watches a name that does not exist)."""
    text = RULES.read_text(encoding="utf-8") + "\n".join(dashboard_queries())
    named = set(re.findall(r"\bunbroken_[a-z_]+", text))
    assert len(named) >= 10
    with MockServer(MockConfig(seed=1, answer_tokens=(2, 3))) as mock:
        settings = Settings(api_key="sk-up", base_url=mock.url)
        with (
            ServerThread(create_app(settings), lifespan="on") as server,
            httpx.Client(base_url=server.url, timeout=10) as client,
        ):
            body = {"model": "deepseek-chat", "messages": [{"role": "user", "content": "hi"}]}
            assert client.post("/v1/chat/completions", json=body).status_code == 200
            exposition = client.get("/metrics").text
    families = set(re.findall(r"^# TYPE (\S+) ", exposition, re.M))
    missing = {
        name
        for name in named
        if name not in families and re.sub(r"_(bucket|count|sum|total)$", "", name) not in families
    }
    assert not missing
