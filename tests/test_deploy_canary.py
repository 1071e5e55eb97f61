"""Canary analysis: the decision rule, Prometheus' histogram_quantile, PromQL against a loopback
Prometheus API, /metrics scraping of a real prometheus_client exposition, the local router's split
and the rollout state machine."""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from fraud.deploy.canary import (
    PROMOTE,
    ROLL_BACK,
    AnalysisError,
    CanaryCriteria,
    PrometheusSource,
    ScrapeSource,
    VariantStats,
    analyse,
    decide,
    histogram_quantile,
    parse_metrics,
    promql_for,
    score_shift,
    stats_between,
)
from fraud.deploy.state import RolloutError, RolloutRecord, RolloutState, StateStore
from fraud.deploy.testing import FakePrometheus, predictor_series

INF = math.inf


def stats(
    version: str, requests: float, errors: float = 0, latency: float = 0.01, score_mean: float = 0.1
) -> VariantStats:
    bounds = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, INF)
    ok = requests - errors
    latency_buckets = tuple((b, ok if latency <= b else 0.0) for b in bounds)
    score_bounds = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, INF)
    score_buckets = tuple((b, ok if score_mean <= b else 0.0) for b in score_bounds)
    return VariantStats(version, requests, errors, latency_buckets, score_buckets)


def test_histogram_quantile_matches_prometheus_interpolation():
    buckets = ((0.1, 50.0), (0.2, 90.0), (0.5, 100.0), (INF, 100.0))
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1)
    assert histogram_quantile(0.7, buckets) == pytest.approx(0.15)
    assert histogram_quantile(0.99, buckets) == pytest.approx(0.47)
    assert histogram_quantile(0.99, ((0.1, 10.0), (INF, 100.0))) == pytest.approx(0.1)  # +Inf: highest finite bound
    assert math.isnan(histogram_quantile(0.99, ()))
    assert math.isnan(histogram_quantile(0.99, ((0.1, 0.0), (INF, 0.0))))


def test_score_shift_is_the_ks_distance_of_binned_distributions():
    same = ((0.1, 10.0), (0.5, 80.0), (1.0, 100.0))
    assert score_shift(same, same) == 0.0
    shifted = ((0.1, 0.0), (0.5, 20.0), (1.0, 100.0))
    assert score_shift(shifted, same) == pytest.approx(0.6)
    assert math.isnan(score_shift((), same))


def test_decide_promotes_a_healthy_canary():
    verdict = decide(stats("2", 200), stats("1", 1800, errors=2), CanaryCriteria())
    assert verdict.decision == PROMOTE
    assert verdict.numbers["canary_requests"] == 200 and verdict.numbers["stable_version"] == "1"


@pytest.mark.parametrize(
    ("canary", "reason"),
    [
        (stats("2", 200, errors=10), "error rate"),
        (stats("2", 200, latency=0.5), "p99 latency"),
        (stats("2", 200, score_mean=0.6), "score distribution shifted"),
        (stats("2", 20), "fewer than 50"),
    ],
    ids=["errors", "latency", "score-shift", "too-little-traffic"],
)
def test_decide_rolls_back_a_bad_canary(canary, reason):
    verdict = decide(canary, stats("1", 1800), CanaryCriteria())
    assert verdict.decision == ROLL_BACK
    assert reason in verdict.reason


def test_decide_is_relative_to_the_stable_version():
    noisy_stable = stats("1", 1000, errors=30, latency=0.5)
    assert decide(stats("2", 200, errors=6, latency=0.5), noisy_stable, CanaryCriteria()).decision == PROMOTE
    assert decide(stats("2", 200, errors=6, latency=0.5), None, CanaryCriteria()).decision == ROLL_BACK


def test_criteria_reject_nonsense():
    with pytest.raises(ValueError, match="max_error_rate"):
        CanaryCriteria(max_error_rate=-1)
    with pytest.raises(ValueError, match="min_requests"):
        CanaryCriteria(min_requests=math.nan)


def test_prometheus_source_reads_stats_through_the_http_api():
    series = predictor_series(
        "1", requests=900, server_errors=9, latency_seconds=0.02, extra_labels={"namespace": "a"}
    ) + predictor_series("1", requests=500, server_errors=500, extra_labels={"namespace": "other"})
    with FakePrometheus(series) as prometheus:
        source = PrometheusSource(prometheus.url, extra_labels={"namespace": "a"})
        got = source.stats("1", 600)
        assert prometheus.queries == list(promql_for("1", 600, {"namespace": "a"}).values())
    assert (got.requests, got.server_errors) == (900.0, 9.0)
    assert got.error_rate == pytest.approx(0.01)
    assert 0.01 < got.p99_seconds <= 0.025
    assert got.score_buckets[-1] == (INF, 891.0)


def test_prometheus_errors_become_analysis_errors():
    with FakePrometheus() as prometheus:
        prometheus.down = True
        with pytest.raises(AnalysisError, match="unavailable"):
            PrometheusSource(prometheus.url).stats("1", 60)
        verdict = analyse(PrometheusSource(prometheus.url), "2", "1", 60, CanaryCriteria(), wait=False)
        assert verdict.decision == ROLL_BACK and "metrics unavailable" in verdict.reason
    with pytest.raises(AnalysisError, match="http"):
        PrometheusSource("prometheus:9090")
    with pytest.raises(AnalysisError, match="unreachable"):
        PrometheusSource("http://127.0.0.1:9", timeout=0.5).query("up")


def _exposition(requests_ok: int, errors: int, version: str = "3") -> str:
    registry = CollectorRegistry()
    requests = Counter("fraud_predictor_requests", "r", ["protocol", "model_version", "outcome"], registry=registry)
    latency = Histogram(
        "fraud_predictor_request_latency_seconds",
        "l",
        ["protocol", "model_version", "outcome"],
        buckets=(0.01, 0.1, 1.0),
        registry=registry,
    )
    scores = Histogram(
        "fraud_predictor_fraud_probability", "s", ["model_version"], buckets=(0.1, 0.5, 1.0), registry=registry
    )
    for _ in range(requests_ok):
        requests.labels("v1", version, "ok").inc()
        latency.labels("v1", version, "ok").observe(0.005)
        scores.labels(version).observe(0.05)
    for _ in range(errors):
        requests.labels("v2", version, "error").inc()
    requests.labels("v1", version, "invalid_input").inc(4)
    return generate_latest(registry).decode()


def test_scrape_deltas_between_two_expositions():
    before = parse_metrics(_exposition(10, 1))
    after = parse_metrics(_exposition(110, 3))
    got = stats_between("3", before, after)
    assert (got.requests, got.server_errors) == (102.0, 2.0)
    assert dict(got.latency_buckets)[0.01] == 100.0
    assert dict(got.score_buckets)[INF] == 100.0
    restarted = stats_between("3", parse_metrics(_exposition(500, 0)), after)  # counter reset
    assert restarted.requests == after.requests["3"]


class _MetricsHandler(BaseHTTPRequestHandler):
    pages: list[str] = []

    def log_message(self, *args):
        return None

    def do_GET(self):
        body = (self.pages.pop(0) if len(self.pages) > 1 else self.pages[0]).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_scrape_source_analyses_live_metrics_endpoints():
    canary_pages = [_exposition(0, 0, "4"), _exposition(200, 20, "4")]
    stable_pages = [_exposition(0, 0, "3"), _exposition(1000, 1, "3")]
    servers = []
    for pages in (canary_pages, stable_pages):
        handler = type("H", (_MetricsHandler,), {"pages": list(pages)})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    try:
        urls = {v: f"http://127.0.0.1:{s.server_address[1]}/metrics" for v, s in zip(("4", "3"), servers, strict=True)}
        verdict = analyse(ScrapeSource(urls), "4", "3", 1, CanaryCriteria(), wait=False)
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
    assert verdict.decision == ROLL_BACK and "error rate" in verdict.reason
    assert verdict.numbers["canary_requests"] == 220.0  # 200 ok + 20 errors (invalid_input unchanged)


# ----------------------------------------------------------------------------- state machine


def _record(**changes):
    fields = dict(
        model_name="fraud-detector",
        model_version="2",
        target="kubernetes",
        namespace="ns",
        canary_traffic_percent=10,
        previous_version="1",
    )
    fields.update(changes)
    return RolloutRecord.start(**fields)


def test_state_machine_allows_only_its_transitions():
    record = _record()
    assert record.state is RolloutState.PENDING
    with pytest.raises(RolloutError, match="cannot go from pending to promoted"):
        record.advance(RolloutState.PROMOTED)
    done = record.advance(RolloutState.DEPLOYED).advance(RolloutState.ANALYSING).advance(RolloutState.PROMOTED)
    assert done.state.final and [t.state for t in done.history] == ["pending", "deployed", "analysing", "promoted"]
    rolled = done.advance(RolloutState.ROLLED_BACK, "by hand")
    with pytest.raises(RolloutError):
        rolled.advance(RolloutState.DEPLOYED)
    with pytest.raises(RolloutError, match="target"):
        _record(target="cloud")
    with pytest.raises(RolloutError, match="0..100"):
        _record(canary_traffic_percent=101)


def test_records_round_trip_through_the_state_store(tmp_path):
    store = StateStore(tmp_path / "rollouts")
    record = _record().advance(RolloutState.DEPLOYED, "ready", generation=4)
    path = store.save(record)
    assert json.loads(path.read_text())["state"] == "deployed"
    assert store.load("kubernetes", "ns", "fraud-detector") == record
    assert store.load("kubernetes", "other", "fraud-detector") is None
    assert RolloutRecord.from_json(record.to_json()) == record
    with pytest.raises(RolloutError, match="invalid"):
        RolloutRecord.from_dict({"state": "flying"})
    assert not list((tmp_path / "rollouts").glob(".*"))  # no temp files left behind


# ----------------------------------------------------------------------------- local router


def _backend(version: str) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            return None

        def do_POST(self):
            length = int(self.headers["Content-Length"])
            body = json.dumps({"version": version, "echo": json.loads(self.rfile.read(length))}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_router_splits_traffic_and_follows_the_routing_file(tmp_path):
    from fraud.deploy.router import VERSION_HEADER, serve

    stable, canary = _backend("1"), _backend("2")
    routes = tmp_path / "routes.json"

    def publish(table):
        tmp = tmp_path / ".routes.tmp"
        tmp.write_text(json.dumps(table))
        tmp.replace(routes)

    url = lambda server: f"http://127.0.0.1:{server.server_address[1]}"
    publish(
        {
            "stable": {"version": "1", "url": url(stable)},
            "canary": {"version": "2", "url": url(canary)},
            "canary_percent": 25,
        }
    )
    router = serve(routes, "127.0.0.1", 0, seed=7)
    base = f"http://127.0.0.1:{router.server_address[1]}"
    try:
        with httpx.Client(timeout=5) as client:
            served = []
            for i in range(400):
                answer = client.post(f"{base}/v1/models/fraud-detector:predict", json={"i": i})
                assert answer.status_code == 200 and answer.json()["echo"] == {"i": i}
                assert answer.headers[VERSION_HEADER] == answer.json()["version"]
                served.append(answer.json()["version"])
            assert 0.18 < served.count("2") / len(served) < 0.32
            publish({"stable": {"version": "2", "url": url(canary)}, "canary": None, "canary_percent": 0})
            assert {client.post(f"{base}/x", json={}).headers[VERSION_HEADER] for _ in range(30)} == {"2"}
            assert client.get(f"{base}/-/routes").json()["stable"]["version"] == "2"
            publish({"stable": None, "canary": None, "canary_percent": 0})
            assert client.post(f"{base}/x", json={}).status_code == 503
            publish({"stable": {"version": "9", "url": "http://127.0.0.1:9"}, "canary": None, "canary_percent": 0})
            assert client.post(f"{base}/x", json={}).status_code == 502
    finally:
        for server in (router, stable, canary):
            server.shutdown()
            server.server_close()
