"""The dashboard and the alert rules against live scrapes: a real Prometheus (Debian package
`prometheus`) scrapes the running endpoints — the real predictor and drift transformer (on a real
Feast SQLite store, bundle from `make_synthetic_bundle`), `fraud audit writer --metrics-port` and
`fraud labels exporter --port` — with the alert rules loaded. Every panel and variable query must
evaluate there and return series, every rule must evaluate without error, every `fraud_*` name a
query reads must be exported, and the input series of the promtool alert tests (tests/promtool/)
must name exported metrics with labels the live series carry. A misspelt metric or label fails here.

One stack per module; the Feast store and bundle fixtures are the serving-stack test's own.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from fraud.config import PROJECT_ROOT
from fraud.features.definitions import SNAPSHOT_TTL_DAYS
from fraud.monitoring.local_prometheus import rule_groups, write_rule_file
from fraud.net import free_port
from fraud.scoring_client import score_transactions
from fraud.serving_stack import ServingStack, StackConfig
from tests.support.prometheus import LocalPrometheus, PrometheusError, names_read
from tests.test_serving_stack import (  # noqa: F401 - fixtures are used by name
    SCORING_DAY,
    STORE_TIMEOUT_S,
    bundle,
    data_root,
    traffic,
)

FRAUD = str(Path(sys.executable).with_name("fraud"))
DASHBOARD = PROJECT_ROOT / "manifests" / "fraud-detector-dashboard.json"
DRIFT_WINDOW = 50
#: labels Prometheus adds at scrape time (the endpoints cannot export them)
TARGET_LABELS = {"namespace", "pod", "instance", "job"}
NAMESPACE = "fraud-live"
#: Grafana's $__rate_interval for a 1 s scrape interval is a few seconds; one minute spans all scrapes
RATE_INTERVAL = "1m"
#: panel queries that select only failures, empty while the stack serves without errors, and the
#: live-quality panels, empty until delayed labels mature in the (fresh) audit database
EMPTY_WITHOUT_FAILURES = {
    "fraud_live_quality",
    "fraud_transformer_predictor_errors_total",  # the predictor never failed the transformer
    'outcome=~"error|unavailable"',  # no request failed
    "fraud_audit_write_retries_total",  # labelled by reason: no retry, no series
}


def dashboard_queries(dashboard: dict) -> list[str]:
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def grafana_to_promql(query: str) -> str:
    """A panel query as Grafana sends it to Prometheus for the test namespace."""
    return query.replace("$__rate_interval", RATE_INTERVAL).replace("$namespace", NAMESPACE)


def variable_queries(dashboard: dict) -> list[str]:
    queries = []
    for variable in dashboard["templating"]["list"]:
        if variable.get("type") == "query":
            query = variable["query"]
            queries.append(query["query"] if isinstance(query, dict) else query)
    return queries


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
def endpoints(tmp_path_factory, data_root, bundle) -> dict[str, str]:  # noqa: F811 - fixtures by name
    """/metrics URL of every endpoint, after real traffic went through the stack."""
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
        transformer_args=("--online-ert", "0"),
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
        # a new card (cold start) and a snapshot beyond the TTL: the missing/expired feature series
        late = traffic(2, seed=23, prefix="MONF")
        late[0]["customer_id"] = "C-new-card"
        late[1]["tx_datetime"] = (SCORING_DAY + timedelta(days=SNAPSHOT_TTL_DAYS, hours=6)).isoformat()
        score_transactions(config.url, late, "v1")
        yield {
            "transformer": transformer_url,
            "predictor": f"{config.predictor_url}/metrics",
            "audit-writer": writer_url,
            "labels-exporter": exporter_url,
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
def scrapes(endpoints) -> dict[str, str]:
    """Live expositions of every endpoint."""
    return {name: httpx.get(url, timeout=5).text for name, url in endpoints.items()}


@pytest.fixture(scope="module")
def prometheus(endpoints, tmp_path_factory):
    """A real Prometheus scraping every endpoint each second, the PrometheusRule's groups loaded."""
    work = tmp_path_factory.mktemp("prometheus")
    rules = write_rule_file(work / "rules.yaml")
    targets = {name: httpx.URL(url).netloc.decode() for name, url in endpoints.items()}
    server = LocalPrometheus(work, targets, {"namespace": NAMESPACE}, rule_files=[rules])
    with server:
        # every target scraped at least three times: rate() over the panels' window has two points
        server.wait_for(f"min(count_over_time(up[{RATE_INTERVAL}])) >= 3 and min(up) == 1")
        assert len(server.query("up")) == len(endpoints)
        # traffic while Prometheus watches: the rate panels show it
        score_transactions(endpoints["transformer"].removesuffix("/metrics"), traffic(20, seed=23, prefix="MONP"), "v1")
        server.wait_for(
            f'sum(rate(fraud_predictor_transactions_total{{namespace="{NAMESPACE}"}}[{RATE_INTERVAL}])) > 0'
        )
        yield server


@pytest.fixture(scope="module")
def exported(prometheus) -> set[str]:
    """Series names the endpoints export, as Prometheus scraped them."""
    return prometheus.series_names()


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


def test_every_dashboard_query_evaluates_on_prometheus(prometheus, exported):
    dashboard = json.loads(DASHBOARD.read_text())
    queries = dashboard_queries(dashboard)
    assert len(queries) >= 12
    empty, unknown = [], {}
    for query in queries:
        result = prometheus.query(grafana_to_promql(query))  # PrometheusError: parse or evaluation error
        if not result and not any(marker in query for marker in EMPTY_WITHOUT_FAILURES):
            empty.append(query)
        if names_read(query) - exported:
            unknown[query] = names_read(query) - exported
    assert empty == [], f"panel queries without data on a stack that served traffic: {empty}"
    (rate,) = prometheus.query(grafana_to_promql(queries[0]))  # requests/s by model version: v1 traffic
    assert float(rate["value"][1]) > 0
    assert unknown == {}
    read = set().union(*(names_read(q) for q in queries))
    for family in ("fraud_predictor_", "fraud_drift_", "fraud_transformer_", "fraud_live_quality", "fraud_audit_"):
        assert any(name.startswith(family) for name in read), f"no panel reads {family}*"


def test_the_dashboard_variables_list_the_namespace(prometheus):
    """`label_values(metric, label)` (Grafana's variable query) is Prometheus's label-values API."""
    variables = variable_queries(json.loads(DASHBOARD.read_text()))
    assert variables
    for query in variables:
        match = re.fullmatch(r"label_values\((?:(?P<selector>.+),\s*)?(?P<label>\w+)\)", query.strip())
        assert match, query
        params = {"match[]": match["selector"]} if match["selector"] else {}
        assert NAMESPACE in prometheus.api(f"label/{match['label']}/values", **params), query


def test_prometheus_evaluates_every_rule(prometheus, exported):
    """The rule groups loaded into a real Prometheus: every rule evaluated without error, every
    recording rule produced series from the live scrapes, every `fraud_*` name read is exported."""
    expected = {rule.get("alert") or rule["record"] for group in rule_groups() for rule in group["rules"]}
    deadline = time.monotonic() + 60
    while True:
        loaded = [rule for group in prometheus.api("rules")["groups"] for rule in group["rules"]]
        if loaded and not any(rule["lastEvaluation"].startswith("0001") for rule in loaded):  # 0001: never
            break
        assert time.monotonic() < deadline, "rules not evaluated within 60 s"
        time.sleep(0.5)
    assert {rule["name"] for rule in loaded} == expected
    assert [(rule["name"], rule.get("lastError")) for rule in loaded if rule["health"] != "ok"] == []
    for group in rule_groups():
        for rule in group["rules"]:
            if "record" in rule and not any(marker in rule["expr"] for marker in EMPTY_WITHOUT_FAILURES):
                prometheus.wait_for(rule["record"], timeout=30)
    unknown = {e: names_read(e) - exported - recorded_names() for e in rule_expressions()}
    assert {e: names for e, names in unknown.items() if names} == {}
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


def test_alert_unit_test_series_are_live_series(exported, live_labels):
    """The promtool tests make every alert fire from their input series; those series must be what
    the endpoints export (name and label names), so a misspelt metric or label in an alert fails
    either its unit test or this test."""
    checked = 0
    for path in sorted((PROJECT_ROOT / "tests" / "promtool").glob("*.yaml")):
        for case in yaml.safe_load(path.read_text())["tests"]:
            for series in case["input_series"]:
                (family,) = text_string_to_metric_families(f"{series['series']} 0\n")
                (sample,) = family.samples
                assert sample.name in exported, f"{path.name}: {sample.name} is not exported"
                if sample.name in live_labels:  # a labelled family with no child yet is not checked
                    checked += 1
                    unknown = set(sample.labels) - TARGET_LABELS - live_labels[sample.name]
                    assert unknown == set(), f"{path.name}: {series['series']}"
    assert checked >= 40


def test_a_misspelt_metric_or_label_in_the_dashboard_is_caught(prometheus, exported):
    dashboard = json.loads(DASHBOARD.read_text())
    query = dashboard_queries(dashboard)[0]
    assert "fraud_predictor_requests_total" in query and prometheus.query(grafana_to_promql(query))
    misspelt = query.replace("fraud_predictor_requests_total", "fraud_predictor_request_total")
    assert prometheus.query(grafana_to_promql(misspelt)) == []
    assert names_read(misspelt) - exported == {"fraud_predictor_request_total"}
    mislabelled = 'sum(rate(fraud_predictor_requests_total{namespace="$namespace", outcom="ok"}[5m]))'
    assert prometheus.query(grafana_to_promql(mislabelled)) == []
    with pytest.raises(PrometheusError, match="parse error"):
        prometheus.query("sum(rate(fraud_predictor_requests_total[5m])")
