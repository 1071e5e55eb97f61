"""The local Prometheus (`fraud.monitoring.local_prometheus`, what `fraud serve --prometheus`
runs): the Debian `prometheus` binary on a loopback port scrapes real `/metrics` endpoints with
the PrometheusRule's alert rules loaded, answers PromQL over the stack's metrics, and its web UI
renders them in Debian's headless chromium (screenshot and rendered DOM).

The default-suite test scrapes an exporter of the product's audit metrics in this process; the
slow test starts the whole stack with `fraud serve --detach --prometheus`.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter, start_http_server

from fraud.monitoring.local_prometheus import LOCAL_NAMESPACE, rule_groups, write_rule_file
from fraud.net import free_port
from tests.support.browser import rendered_dom, screenshot
from tests.support.prometheus import LocalPrometheus, PrometheusError
from tests.test_serving_stack import (  # noqa: F401 - fixtures are used by name
    STARTUP_TIMEOUT_S,
    Stack,
    alive,
    bundle,
    data_root,
)


def graph_url(base: str, expr: str) -> str:
    """The UI's graph page with `expr` evaluated in its table tab."""
    return f"{base}/graph?g0.expr={quote(expr)}&g0.tab=1"


def test_the_local_prometheus_scrapes_loads_the_alert_rules_and_its_ui_renders_the_series(tmp_path):
    registry = CollectorRegistry()
    written = Counter("fraud_audit_decisions_written", "decisions written", registry=registry)
    written.inc(7)
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        rules = write_rule_file(tmp_path / "rules.yaml")
        with LocalPrometheus(
            tmp_path / "prometheus", {"audit-writer": f"127.0.0.1:{port}"}, {"namespace": LOCAL_NAMESPACE}, [rules]
        ) as prometheus:
            (sample,) = prometheus.wait_for(f'fraud_audit_decisions_written_total{{namespace="{LOCAL_NAMESPACE}"}}')
            assert sample["metric"]["job"] == "audit-writer" and float(sample["value"][1]) == 7.0
            loaded = {group["name"] for group in prometheus.api("rules")["groups"]}
            assert loaded == {group["name"] for group in rule_groups()}
            with pytest.raises(PrometheusError, match="parse error"):
                prometheus.query("sum(")
            width, height = screenshot(graph_url(prometheus.url, "fraud_audit_decisions_written_total"),
                                       tmp_path / "graph.png")  # fmt: skip
            assert (width, height) == (1280, 900)
            assert (tmp_path / "graph.png").stat().st_size > 10_000  # a drawn page, not a blank one
            dom = rendered_dom(graph_url(prometheus.url, "fraud_audit_decisions_written_total"))
            assert 'fraud_audit_decisions_written_total{instance="127.0.0.1:' in dom
            assert f'namespace="{LOCAL_NAMESPACE}"' in dom and "Execute" in dom
            alerts = httpx.get(f"{prometheus.url}/classic/alerts", timeout=30).text  # rendered by the server
            first_alert = next(r["alert"] for g in rule_groups() for r in g["rules"] if "alert" in r)
            assert first_alert in alerts
    finally:
        server.shutdown()
        thread.join(10)


@pytest.mark.slow  # a whole serving stack plus Prometheus: minutes on a busy 2-core machine
def test_fraud_serve_prometheus_graphs_the_stacks_metrics(tmp_path, data_root, bundle):  # noqa: F811 - fixtures
    running = Stack(data_root, bundle, tmp_path)
    prometheus_port = free_port()
    url = f"http://127.0.0.1:{prometheus_port}"
    started = running.fraud(
        "serve", "--detach", "--pid-file", str(running.pid_file), *running.serve_args(),
        "--prometheus", "--prometheus-port", str(prometheus_port), timeout=STARTUP_TIMEOUT_S + 120,
    )  # fmt: skip
    assert started.returncode == 0, started.stdout + started.stderr + running.logs()
    supervisor = running.supervisor_pid()
    try:
        assert url in started.stdout  # the address is printed with the other endpoints
        scored = running.fraud("score", "--url", running.url, "--sample", "20")
        assert scored.returncode == 0, scored.stdout + scored.stderr
        query = f'sum by (namespace) (fraud_predictor_transactions_total{{namespace="{LOCAL_NAMESPACE}"}})'
        deadline = time.monotonic() + 120
        while True:
            answer = httpx.get(f"{url}/api/v1/query", params={"query": query}, timeout=10).json()
            assert answer["status"] == "success", answer
            if answer["data"]["result"] and float(answer["data"]["result"][0]["value"][1]) >= 20:
                break
            assert time.monotonic() < deadline, f"{query} stayed below 20: {answer}"
            time.sleep(1)
        expected_up = {"transformer": "1", "predictor": "1", "audit-writer": "1"}
        deadline = time.monotonic() + 60  # each target's first scrape comes at its own offset in the interval
        while True:
            up = httpx.get(f"{url}/api/v1/query", params={"query": "up"}, timeout=10).json()["data"]["result"]
            jobs = {s["metric"]["job"]: s["value"][1] for s in up}
            if jobs == expected_up or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert jobs == expected_up
        rules = httpx.get(f"{url}/api/v1/rules", timeout=10).json()["data"]["groups"]
        assert {g["name"] for g in rules} == {g["name"] for g in rule_groups()}
        shot = tmp_path / "stack.png"
        assert screenshot(graph_url(url, query), shot) == (1280, 900)
        dom = rendered_dom(graph_url(url, "fraud_drift_vectors_received_total"))
        assert 'fraud_drift_vectors_received_total{instance="127.0.0.1:' in dom
    finally:
        if alive(supervisor):
            os.kill(supervisor, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while alive(supervisor) and time.monotonic() < deadline:
        time.sleep(0.2)
    with pytest.raises(httpx.TransportError):  # the stack's Prometheus stopped with it
        httpx.get(f"{url}/-/ready", timeout=5)
    assert Path(running.log_dir / "prometheus" / "rules.yaml").is_file()
