"""Canary analysis: the decision rule, Prometheus' histogram_quantile, PromQL against a loopback
Prometheus API, /metrics scraping of a real prometheus_client exposition, the local router's split
and the rollout state machine."""

from __future__ import annotations

import json
import math
import threading
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import httpx
import pytest
import yaml
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from fraud.config import PROJECT_ROOT
from fraud.deploy.canary import (
    PROMOTE,
    ROLL_BACK,
    AnalysisError,
    PrometheusSource,
    ScrapeSource,
    VariantStats,
    abort_reason,
    analyse,
    decide,
    drift_promql,
    histogram_quantile,
    parse_metrics,
    promql_for,
    score_shift,
    stats_between,
    two_proportion_test,
    watch,
)
from fraud.deploy.policy import AbortRules, CanaryCriteria, PolicyError, RolloutPolicy, load_policy, parse_policy
from fraud.deploy.state import RolloutError, RolloutRecord, RolloutState, StateStore
from tests.support.prometheus_stub import FakePrometheus, drift_series, predictor_series

INF = math.inf


def stats(
    version: str,
    requests: float,
    errors: float = 0,
    latency: float = 0.01,
    score_mean: float = 0.1,
    *,
    client_errors: float = 0,
    decline: float = 0.01,
    review: float = 0.04,
    reasons: dict[str, float] | None = None,
    missing: float = 0,
) -> VariantStats:
    """Stats of one version: every successful request scored one transaction."""
    bounds = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, INF)
    ok = requests - errors - client_errors
    latency_buckets = tuple((b, ok if latency <= b else 0.0) for b in bounds)
    score_bounds = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, INF)
    score_buckets = tuple((b, ok if score_mean <= b else 0.0) for b in score_bounds)
    decisions = {"decline": round(ok * decline), "review": round(ok * review)}
    decisions["approve"] = ok - decisions["decline"] - decisions["review"]
    return VariantStats(
        version,
        requests,
        errors,
        client_errors,
        latency_buckets,
        score_buckets,
        transactions=ok,
        decisions=decisions,
        reasons=reasons or {"tx_amount": ok * 0.05, "terminal_risk_7d": ok * 0.03},
        missing=missing,
    )


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


def test_two_proportion_test_matches_the_textbook_z_test():
    # 30/200 vs 20/400: pooled p = 50/600, z = 0.1 / sqrt(p(1-p)(1/200+1/400)) = 4.1779,
    # two-sided p = erfc(z / sqrt(2)) = 2.943e-05
    diff, p_value = two_proportion_test(30, 200, 20, 400)
    assert diff == pytest.approx(0.1)
    assert p_value == pytest.approx(math.erfc(4.1779 / math.sqrt(2)), rel=1e-3)
    assert p_value == pytest.approx(2.943e-05, rel=1e-3)
    assert two_proportion_test(0, 100, 0, 100) == (0.0, 1.0)


def _by_name(verdict):
    return {c.name: c for c in verdict.checks}


def test_decide_promotes_a_healthy_canary():
    verdict = decide(stats("2", 200), stats("1", 1800, errors=2), CanaryCriteria())
    assert verdict.decision == PROMOTE, verdict.reason
    assert verdict.numbers["canary_requests"] == 200 and verdict.numbers["stable_version"] == "1"
    checks = _by_name(verdict)
    assert {c.verdict for c in checks.values()} == {"pass", "skip"}
    assert checks["drift"].verdict == "skip"  # no drift transformer behind these stats
    assert checks["decision_share.decline"].verdict == "pass"


@pytest.mark.parametrize(
    ("canary", "check"),
    [
        (stats("2", 200, errors=10), "server_error_rate"),
        (stats("2", 200, latency=0.5), "p99_latency"),
        (stats("2", 200, score_mean=0.6), "score_shift"),
        (stats("2", 20), "successful_scorings"),
        (stats("2", 200, client_errors=200), "client_error_rate"),
        (stats("2", 400, decline=0.997, review=0.0), "decision_share.decline"),
        (stats("2", 400, decline=0.01, review=0.2), "decision_share.review"),
        (stats("2", 400, reasons={"tx_amount": 2, "customer_nb_tx_1d": 40}), "reason_mix"),
        (stats("2", 400, missing=80), "missing_stale"),
    ],
    ids=[
        "errors",
        "latency",
        "score-shift",
        "too-little-traffic",
        "all-4xx",
        "decline-all",
        "review",
        "reasons",
        "missing",
    ],
)
def test_decide_rolls_back_a_bad_canary(canary, check):
    verdict = decide(canary, stats("1", 1800), CanaryCriteria())
    assert verdict.decision == ROLL_BACK
    assert _by_name(verdict)[check].verdict == "fail"
    assert verdict.reason.startswith(check) or f"; {check}" in verdict.reason
    assert "\n" not in verdict.reason and "Traceback" not in verdict.reason


def test_a_check_that_cannot_be_computed_fails():
    """A canary answering every request 400: no latency, no scores; NaN never passes."""
    all_400 = stats("2", 300, client_errors=300)
    verdict = decide(all_400, stats("1", 1800), CanaryCriteria())
    checks = _by_name(verdict)
    assert checks["p99_latency"].verdict == "fail" and "NaN" in checks["p99_latency"].detail
    assert checks["score_shift"].verdict == "fail"
    assert checks["successful_scorings"].verdict == "fail"
    silent = VariantStats("2", 0, 0)
    assert _by_name(decide(silent, None, CanaryCriteria()))["server_error_rate"].verdict == "fail"


def test_decision_shares_need_a_significant_and_large_difference():
    # 3 % vs 1 % declines on small counts: not significant at alpha 0.001 -> pass
    assert (
        _by_name(decide(stats("2", 200, decline=0.03), stats("1", 1800), CanaryCriteria()))[
            "decision_share.decline"
        ].verdict
        == "pass"
    )
    # the same shares on large counts are significant, but under the 5-point limit -> pass
    big = decide(stats("2", 20000, decline=0.03), stats("1", 200000), CanaryCriteria())
    assert _by_name(big)["decision_share.decline"].verdict == "pass"
    # too few decisions to compare: fails (not evidence of health)
    few = decide(stats("2", 20), stats("1", 1800), CanaryCriteria(min_successful_scorings=10))
    assert _by_name(few)["decision_share"].verdict == "fail"


def test_decide_is_relative_to_the_stable_version():
    noisy_stable = stats("1", 1000, errors=30, latency=0.5)
    assert decide(stats("2", 200, errors=6, latency=0.5), noisy_stable, CanaryCriteria()).decision == PROMOTE
    assert decide(stats("2", 200, errors=6, latency=0.5), None, CanaryCriteria()).decision == ROLL_BACK


def test_early_abort_on_consecutive_errors_and_wide_breaches():
    rules = AbortRules(consecutive_errors=20, wide_breach_factor=3.0)
    criteria = CanaryCriteria()
    stable = stats("1", 1800)
    before = stats("2", 100)
    after = replace(stats("2", 100), requests=125, server_errors=25)
    reason, _ = abort_reason(after, before, stable, criteria, rules)
    assert reason.startswith("consecutive_errors: canary failed 25 requests")
    reason, _ = abort_reason(stats("2", 400, decline=0.997, review=0.0), None, stable, criteria, rules)
    assert reason.startswith("wide breach") and "decision_share.decline" in reason
    # a breach below the wide margin waits for the end of the window
    assert abort_reason(stats("2", 400, errors=8), None, stable, criteria, rules)[0] == ""
    # not enough requests yet: no early verdict
    assert abort_reason(stats("2", 20, decline=1.0, review=0.0), None, stable, criteria, rules)[0] == ""


def test_policy_files_of_every_overlay_load_and_match_the_rollout_settings():
    """One policy per overlay; its first step is the overlay's CANARY_TRAFFIC_PERCENT / _WINDOW_SECONDS."""
    overlays = sorted(p for p in (PROJECT_ROOT / "kustomize" / "overlays").iterdir() if p.is_dir())
    assert [o.name for o in overlays] == ["dev", "prod", "staging"]
    for overlay in overlays:
        policy = load_policy(overlay / "rollout-policy.yaml")
        kustomization = yaml.safe_load((overlay / "kustomization.yaml").read_text())
        settings = {}
        for patch in kustomization.get("patches", []):
            if patch.get("target", {}).get("name") == "fraud-rollout-settings":
                settings = {op["path"].rsplit("/", 1)[-1]: op["value"] for op in yaml.safe_load(patch["patch"])}
        assert policy.steps[0].percent == int(settings["CANARY_TRAFFIC_PERCENT"]), overlay.name
        assert policy.steps[0].window_seconds == int(settings["CANARY_WINDOW_SECONDS"]), overlay.name
        assert RolloutPolicy.from_dict(policy.to_dict()) == policy


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("steps: [{percent: 100, windowSeconds: 60}]", "1..99"),
        ("steps: [{percent: 20, windowSeconds: 60}, {percent: 10, windowSeconds: 60}]", "increasing"),
        ("checks: {maxErrorRate: -1}", "checks.maxErrorRate"),
        ("checks: {maxEroRate: 0.1}", "maxEroRate is not a known field"),
        ("abort: {consecutiveErrors: 0}", "consecutiveErrors"),
        ("stepz: []", "unknown field"),
        ("checks: {minSuccessfulScorings: .nan}", "minSuccessfulScorings"),
    ],
)
def test_policy_rejects_nonsense_naming_the_field(text, message):
    with pytest.raises(PolicyError, match=message):
        parse_policy(text)


def test_prometheus_source_reads_stats_through_the_http_api():
    series = predictor_series(
        "1",
        requests=900,
        server_errors=9,
        client_errors=3,
        latency_seconds=0.02,
        reasons={"tx_amount": 40},
        missing=5,
        extra_labels={"namespace": "a"},
    ) + predictor_series("1", requests=500, server_errors=500, extra_labels={"namespace": "other"})
    series += drift_series(2, extra_labels={"namespace": "a"})
    with FakePrometheus(series) as prometheus:
        source = PrometheusSource(prometheus.url, extra_labels={"namespace": "a"})
        got = source.stats("1", 600)
        expected = [drift_promql(600, {"namespace": "a"}), *promql_for("1", 600, {"namespace": "a"}).values()]
        assert sorted(prometheus.queries) == sorted(expected)
    assert (got.requests, got.server_errors, got.client_errors) == (900.0, 9.0, 3.0)
    assert got.error_rate == pytest.approx(0.01)
    assert 0.01 < got.p99_seconds <= 0.025
    assert got.score_buckets[-1] == (INF, 888.0)
    assert got.decisions == {"approve": 844.0, "review": 36.0, "decline": 9.0}
    assert got.reasons == {"tx_amount": 40.0} and got.missing == 5.0 and got.drifted_windows == 2.0


def test_prometheus_stand_in_honours_the_range_of_a_query():
    recent = predictor_series("1", requests=100, age_seconds=30)
    old = predictor_series("1", requests=1000, age_seconds=1200)
    with FakePrometheus(recent + old) as prometheus:
        source = PrometheusSource(prometheus.url, drift=False)
        assert source.stats("1", 60).requests == 100.0
        assert source.stats("1", 1800).requests == 1100.0
        assert source.stats("1", 20).requests == 0.0
        code, body = prometheus.evaluate('sum(increase(fraud_predictor_requests_total{model_version="1"}[2m]))')
        assert code == 200 and body["data"]["result"][0]["value"][1] == "100.0"
        code, body = prometheus.evaluate('sum(increase(fraud_predictor_requests_total{model_version="1"}[1h]))')
        assert body["data"]["result"][0]["value"][1] == "1100.0"
        code, body = prometheus.evaluate("rate(fraud_predictor_requests_total[5m])")
        assert code == 400 and body["errorType"] == "bad_data"


def test_prometheus_errors_become_analysis_errors():
    with FakePrometheus() as prometheus:
        prometheus.down = True
        with pytest.raises(AnalysisError, match="unavailable"):
            PrometheusSource(prometheus.url).stats("1", 60)
        verdict = analyse(PrometheusSource(prometheus.url), "2", "1", 60, CanaryCriteria(), wait=False)
        assert verdict.decision == ROLL_BACK and verdict.reason.startswith("metrics: ")
    with pytest.raises(AnalysisError, match="http"):
        PrometheusSource("prometheus:9090")
    with pytest.raises(AnalysisError, match="unreachable"):
        PrometheusSource("http://127.0.0.1:9", timeout=0.5).query("up")


def _exposition(requests_ok: int, errors: int, version: str = "3", invalid: int = 4) -> str:
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
    requests.labels("v1", version, "invalid_input").inc(invalid)
    decisions = Counter("fraud_predictor_decisions", "d", ["model_version", "decision"], registry=registry)
    decisions.labels(version, "approve").inc(requests_ok)
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
    pages: ClassVar[list[str]] = []

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
    assert verdict.decision == ROLL_BACK and "server_error_rate" in verdict.reason
    assert verdict.numbers["canary_requests"] == 220.0  # 200 ok + 20 errors (invalid_input unchanged)


def test_scrape_source_rolls_back_a_canary_answering_every_request_400():
    """4xx are not successful scorings, the 4xx rate is compared with stable's, and the latency
    and score checks that cannot be computed fail instead of being skipped."""
    pages = {"4": [_exposition(0, 0, "4", 0), _exposition(0, 0, "4", 300)], "3": [_exposition(0, 0, "3", 0)]}
    pages["3"].append(_exposition(1500, 0, "3", 2))
    servers = {}
    for version, page_list in pages.items():
        handler = type("H", (_MetricsHandler,), {"pages": list(page_list)})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers[version] = server
    try:
        urls = {v: f"http://127.0.0.1:{s.server_address[1]}/metrics" for v, s in servers.items()}
        verdict = analyse(ScrapeSource(urls), "4", "3", 1, CanaryCriteria(), wait=False)
    finally:
        for server in servers.values():
            server.shutdown()
            server.server_close()
    checks = {c.name: c.verdict for c in verdict.checks}
    assert verdict.decision == ROLL_BACK
    assert checks["successful_scorings"] == checks["client_error_rate"] == "fail"
    assert checks["p99_latency"] == checks["score_shift"] == "fail"
    assert checks["server_error_rate"] == "pass"  # 4xx are not server errors, and still it cannot pass
    assert verdict.reason.startswith("successful_scorings: canary answered 0 requests successfully")


# ----------------------------------------------------------------------------- state machine


def _record(**changes):
    fields = {
        "model_name": "fraud-detector",
        "model_version": "2",
        "target": "kubernetes",
        "namespace": "ns",
        "canary_traffic_percent": 10,
        "previous_version": "1",
    }
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
    with pytest.raises(RolloutError, match=r"0..100"):
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

        def do_GET(self):  # the router's liveness probe
            self.send_response(200 if self.path == "/v2/health/live" else 404)
            self.send_header("Content-Length", "0")
            self.end_headers()

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

    def url(server):
        return f"http://127.0.0.1:{server.server_address[1]}"

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
            # refused: 502 until the health checker has marked it down, 503 (no healthy version) after
            assert client.post(f"{base}/x", json={}).status_code in (502, 503)
    finally:
        for server in (router, stable, canary):
            server.shutdown()
            server.server_close()


def test_router_sends_no_traffic_to_a_dead_backend(tmp_path):
    """A killed canary: requests that find its port closed go to stable at once, and the health
    checker takes it out of the split; it comes back when its probe succeeds again."""
    from fraud.deploy.router import VERSION_HEADER, serve

    stable, canary = _backend("1"), _backend("2")
    canary_port = canary.server_address[1]
    routes = tmp_path / "routes.json"
    routes.write_text(
        json.dumps(
            {
                "stable": {"version": "1", "url": f"http://127.0.0.1:{stable.server_address[1]}"},
                "canary": {"version": "2", "url": f"http://127.0.0.1:{canary_port}"},
                "canary_percent": 50,
            }
        )
    )
    router = serve(routes, "127.0.0.1", 0, seed=3, health_interval=0.1)
    base = f"http://127.0.0.1:{router.server_address[1]}"
    try:
        with httpx.Client(timeout=5) as client:
            before = [client.post(f"{base}/p", json={}).headers[VERSION_HEADER] for _ in range(60)]
            assert set(before) == {"1", "2"}
            canary.shutdown()
            canary.server_close()
            after = [client.post(f"{base}/p", json={}) for _ in range(200)]
            assert {a.status_code for a in after} == {200}
            assert {a.headers[VERSION_HEADER] for a in after} == {"1"}
            table = client.get(f"{base}/-/routes").json()
            assert table["canary"]["healthy"] is False and table["stable"]["healthy"] is True
            revived = ThreadingHTTPServer(("127.0.0.1", canary_port), _backend("2").RequestHandlerClass)
            threading.Thread(target=revived.serve_forever, daemon=True).start()
            try:
                for _ in range(600):  # the checker probes every 0.1 s
                    if client.get(f"{base}/-/routes").json()["canary"]["healthy"]:
                        break
                    threading.Event().wait(0.05)
                again = {client.post(f"{base}/p", json={}).headers[VERSION_HEADER] for _ in range(60)}
                assert again == {"1", "2"}
            finally:
                revived.shutdown()
                revived.server_close()
    finally:
        for server in (router, stable):
            server.shutdown()
            server.server_close()


def test_local_backend_steps_the_routers_canary_share(tmp_path):
    """A progressive step on the local target rewrites the router's table (no process restarts)."""
    from fraud.deploy.local import LocalBackend, Served, StackState

    backend = LocalBackend("fraud-detector", "local", StateStore(tmp_path / "state"), None, None, root=tmp_path)
    stable = Served("1", 41001, 0, "/b/1", "/l/1")
    canary = Served("2", 41002, 0, "/b/2", "/l/2")
    backend.stack.save(StackState(stable=stable, canary=canary, canary_percent=5))
    record = _record(target="local", previous_version="1", canary_traffic_percent=5)
    for percent in (25, 50):
        backend.set_traffic(record, percent)
        routes = json.loads(backend.stack.routes_file.read_text())
        assert routes["canary_percent"] == percent and routes["canary"]["version"] == "2"
        assert backend.stack.load().canary_percent == percent
    with pytest.raises(RolloutError, match="not the local canary"):
        backend.set_traffic(_record(target="local", model_version="9"), 50)


def test_the_predictors_own_metrics_feed_every_check():
    """What `predictor.prometheus.record_scores` exports is what the analysis parses: decisions,
    top reason codes, missing/stale counts, per version (exact deltas of a version no one else uses)."""
    from prometheus_client import REGISTRY

    from predictor import prometheus

    version = "canary-metrics-test"
    before = parse_metrics(generate_latest(REGISTRY).decode())
    prometheus.record_scores(
        version,
        [0.1, 0.8, 0.95],
        ["approve", "decline", "decline"],
        missing=1,
        stale=2,
        top_reasons=["tx_amount", "tx_amount"],
    )
    prometheus.record_request("v1", version, "ok", 0.004)
    prometheus.record_request("v1", version, "invalid_input", 0.001)
    got = stats_between(version, before, parse_metrics(generate_latest(REGISTRY).decode()))
    assert got.transactions == 3.0 and (got.missing, got.stale) == (1.0, 2.0)
    assert got.decisions == {"approve": 1.0, "decline": 2.0}
    assert got.reasons == {"tx_amount": 2.0}
    assert (got.requests, got.client_errors, got.server_errors, got.successful) == (2.0, 1.0, 0.0, 1.0)
    assert dict(got.score_buckets)[INF] == 3.0


def test_the_pipeline_deploys_through_a_canary_unless_told_otherwise():
    """`record` (no canary, moves champion) is a test target: nothing defaults to it."""
    import inspect

    from fraud.commands.deploy import deploy as deploy_command
    from pipelines.training_pipeline import training_pipeline

    assert training_pipeline.component_spec.inputs["deploy_target"].default == "kubernetes"
    target = inspect.signature(deploy_command).parameters["target"].default
    assert target == "local"


def test_watch_aborts_early_from_prometheus_and_looks_at_the_time_elapsed():
    """The Kubernetes path of early abort: each look queries Prometheus over the time elapsed in
    the window; a canary declining everything is rolled back at the first look."""
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    series = predictor_series("1", requests=1800) + predictor_series(
        "2", requests=300, decision_shares={"decline": 0.997, "approve": 0.003}
    )
    with FakePrometheus(series) as prometheus:
        verdict = watch(
            PrometheusSource(prometheus.url, drift=False),
            "2",
            "1",
            600,
            CanaryCriteria(),
            interval_seconds=5,
            sleep=sleep,
            clock=lambda: now[0],
        )
        assert verdict.decision == ROLL_BACK and verdict.early
        assert now[0] == 5  # one look, not the 600 s window
        assert all("[5s]" in q for q in prometheus.queries)
        assert "decision_share.decline" in verdict.reason
    healthy = predictor_series("1", requests=1800) + predictor_series("2", requests=300)
    now[0] = 0.0
    with FakePrometheus(healthy) as prometheus:
        verdict = watch(
            PrometheusSource(prometheus.url, drift=False),
            "2",
            "1",
            20,
            CanaryCriteria(),
            interval_seconds=5,
            sleep=sleep,
            clock=lambda: now[0],
        )
        assert verdict.decision == PROMOTE and not verdict.early
        ranges = sorted({q.rsplit("[", 1)[1] for q in prometheus.queries})
        assert ranges == ["10s]))", "15s]))", "20s]))", "5s]))"]
