"""The dashboard and the alert rules against live scrapes: every metric any panel query, variable
or alert expression reads must be exported by a running endpoint — the real predictor and drift
transformer (on a real Feast SQLite store, bundle from `make_synthetic_bundle`), `fraud audit writer
--metrics-port` and `fraud labels exporter --port`. A misspelt metric in the dashboard fails here.

One stack per module; the Feast store and bundle fixtures are the serving-stack test's own.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from fraud.config import PROJECT_ROOT
from fraud.monitoring.promql import (
    exported_names,
    grafana_variable_metrics,
    missing_metrics,
    referenced_metrics,
    selector_labels,
)
from fraud.serving_stack import ServingStack, StackConfig, score_transactions
from tests.test_serving_stack import (  # noqa: F401 - fixtures are used by name
    STORE_TIMEOUT_S,
    bundle,
    data_root,
    free_port,
    traffic,
)

FRAUD = str(Path(sys.executable).with_name("fraud"))
DASHBOARD = PROJECT_ROOT / "manifests" / "fraud-detector-dashboard.json"
RULES = PROJECT_ROOT / "manifests" / "prometheusrule.yaml"
DRIFT_WINDOW = 50
#: labels Prometheus adds at scrape time (the endpoints cannot export them)
TARGET_LABELS = {"namespace", "pod", "instance", "job"}


def dashboard_queries(dashboard: dict) -> list[str]:
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def variable_queries(dashboard: dict) -> list[str]:
    queries = []
    for variable in dashboard["templating"]["list"]:
        if variable.get("type") == "query":
            query = variable["query"]
            queries.append(query["query"] if isinstance(query, dict) else query)
    return queries


def rule_groups() -> list[dict]:
    return yaml.safe_load(RULES.read_text())["spec"]["groups"]


def recorded_names() -> set[str]:
    return {rule["record"] for group in rule_groups() for rule in group["rules"] if "record" in rule}


def rule_expressions() -> list[str]:
    return [rule["expr"] for group in rule_groups() for rule in group["rules"]]


def wait_for_metrics(url: str, process: subprocess.Popen | None = None, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"{process.args} exited with {process.returncode}: {process.stdout.read()}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"{url} did not answer within {timeout:.0f}s")


def windows_evaluated(exposition: str) -> float:
    return sum(
        sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
        if sample.name == "fraud_drift_windows_evaluated_total"
    )


@pytest.fixture(scope="module")
def scrapes(tmp_path_factory, data_root, bundle) -> dict[str, str]:  # noqa: F811 - fixtures by name
    """Live expositions of every endpoint, after real traffic went through the stack."""
    work = tmp_path_factory.mktemp("monitoring-live")
    audit_db = f"sqlite:///{work / 'audit.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRAUD_AUDIT")}
    migrated = subprocess.run(
        [FRAUD, "audit", "migrate", "--db-url", audit_db],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert migrated.returncode == 0, migrated.stderr
    writer_port, exporter_port = free_port(), free_port()
    sidecars = [
        subprocess.Popen(
            [FRAUD, "audit", "writer", "--db-url", audit_db, "--spool", str(work / "spool.db"),
             "--metrics-port", str(writer_port)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ),
        subprocess.Popen(
            [FRAUD, "labels", "exporter", "--db-url", audit_db, "--port", str(exporter_port), "--interval", "5"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ),
    ]  # fmt: skip
    config = StackConfig(
        bundle=bundle,
        port=free_port(),
        grpc_port=free_port(),
        predictor_port=free_port(),
        online_store="sqlite",
        store_timeout_s=STORE_TIMEOUT_S,
        log_dir=work / "logs",
        drift_window_size=DRIFT_WINDOW,
        transformer_args=("--online_ert", "0"),
        startup_timeout_s=240,
    )
    stack = ServingStack(config)
    try:
        stack.start()
        writer_url = f"http://127.0.0.1:{writer_port}/metrics"
        exporter_url = f"http://127.0.0.1:{exporter_port}/metrics"
        wait_for_metrics(writer_url, sidecars[0])
        wait_for_metrics(exporter_url, sidecars[1])
        score_transactions(config.url, traffic(2 * DRIFT_WINDOW, seed=21, prefix="MON"), "v1")
        score_transactions(config.url, traffic(20, seed=22, prefix="MONV2"), "v2")
        bad = httpx.post(f"{config.url}/v1/models/fraud-detector:predict", json={"instances": [{"tx_amount": -1}]})
        assert bad.status_code == 400
        transformer_url = f"{config.url}/metrics"
        deadline = time.monotonic() + 60
        while True:  # the drift worker tests windows off the request path
            text = httpx.get(transformer_url, timeout=5).text
            if windows_evaluated(text) >= 2 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        yield {
            "transformer": text,
            "predictor": httpx.get(f"{config.predictor_url}/metrics", timeout=5).text,
            "audit writer": httpx.get(writer_url, timeout=5).text,
            "labels exporter": httpx.get(exporter_url, timeout=5).text,
        }
    finally:
        stack.stop()
        for process in sidecars:
            process.terminate()
        for process in sidecars:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


@pytest.fixture(scope="module")
def exported(scrapes) -> set[str]:
    return set().union(*(exported_names(text) for text in scrapes.values()))


@pytest.fixture(scope="module")
def live_labels(scrapes) -> dict[str, set[str]]:
    """Series name -> label names seen on its live samples."""
    labels: dict[str, set[str]] = {}
    for text in scrapes.values():
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels.setdefault(sample.name, set()).update(sample.labels)
    return labels


def test_the_live_endpoints_carry_the_traffic(scrapes, exported):
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for text in scrapes.values()
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    served = sum(v for (name, _), v in samples.items() if name == "fraud_predictor_transactions_total")
    assert served >= 2 * DRIFT_WINDOW + 20
    assert samples[("fraud_drift_windows_evaluated_total", ())] >= 2
    assert any(name == "fraud_drift_feature_p_value" for name, _ in samples)
    # the latency SLO rules read the le="0.1" bucket: it must exist with exactly that label value
    assert any(name == "fraud_predictor_request_latency_seconds_bucket" and ("le", "0.1") in labels
               for name, labels in samples)  # fmt: skip
    assert {"fraud_audit_spool_backlog", "fraud_live_quality", "fraud_live_quality_label_coverage"} <= exported


def test_every_dashboard_query_reads_exported_metrics(exported):
    dashboard = json.loads(DASHBOARD.read_text())
    queries = dashboard_queries(dashboard)
    assert len(queries) >= 12
    assert missing_metrics(queries, exported) == {}
    variables = variable_queries(dashboard)
    assert variables and all(grafana_variable_metrics(q) <= exported for q in variables)
    read = set().union(*(referenced_metrics(q) for q in queries))
    for family in ("fraud_predictor_", "fraud_drift_", "fraud_transformer_", "fraud_live_quality", "fraud_audit_"):
        assert any(name.startswith(family) for name in read), f"no panel reads {family}*"


def test_every_alert_expression_reads_exported_metrics(exported):
    assert missing_metrics(rule_expressions(), exported, recorded_names()) == {}
    used_records = set().union(*(referenced_metrics(e) for e in rule_expressions())) & recorded_names()
    assert used_records, "the alerts read their recording rules"
    alerts = {rule["alert"] for group in rule_groups() for rule in group["rules"] if "alert" in rule}
    assert {
        "FraudPredictorLatencySLOBurnFast",
        "FraudPredictorLatencySLOBurnSlow",
        "FraudPredictorHighErrorRate",
        "FraudFeatureDriftDetected",
        "FraudDeclineRateAnomaly",
        "FraudAuditBacklogGrowing",
        "FraudLivePrecisionBelowFloor",
    } <= alerts


def test_label_matchers_name_labels_the_series_really_have(live_labels):
    """`outcome="ok"`, `decision="decline"`, `le="0.1"`...: a misspelt label selects nothing."""
    dashboard = json.loads(DASHBOARD.read_text())
    problems, checked = [], 0
    for expr in dashboard_queries(dashboard) + rule_expressions():
        for name, labels in selector_labels(expr).items():
            if name in live_labels:  # a labelled family with no child yet (no samples) is not checked
                checked += 1
                unknown = labels - TARGET_LABELS - live_labels[name]
                if unknown:
                    problems.append(f"{name}: {sorted(unknown)} in {expr.strip()[:120]}")
    assert checked >= 20 and problems == []


def test_a_misspelt_metric_or_label_in_the_dashboard_is_caught(exported, live_labels):
    dashboard = json.loads(DASHBOARD.read_text())
    broken = copy.deepcopy(dashboard)
    target = broken["panels"][0]["targets"][0]
    target["expr"] = target["expr"].replace("fraud_predictor_requests_total", "fraud_predictor_request_total")
    missing = missing_metrics(dashboard_queries(broken), exported)
    assert list(missing.values()) == [{"fraud_predictor_request_total"}]
    histogram = broken["panels"][1]["targets"][0]
    histogram["expr"] = histogram["expr"].replace("_seconds_bucket", "_seconds_buckets")
    assert {"fraud_predictor_request_latency_seconds_buckets"} in missing_metrics(
        dashboard_queries(broken), exported
    ).values()
    mislabelled = 'sum(rate(fraud_predictor_requests_total{outcom="ok"}[5m]))'
    labels = selector_labels(mislabelled)["fraud_predictor_requests_total"]
    assert labels - live_labels["fraud_predictor_requests_total"] == {"outcom"}
