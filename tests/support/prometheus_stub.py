"""A Prometheus HTTP API stand-in for the canary-analysis tests (`/api/v1/query`).

It evaluates the query shapes the analysis sends (`fraud.deploy.canary.promql_for`,
`drift_promql`): `sum [by (label)] (increase(metric{matchers}[window]))`, over scripted counter
increases that each happened `age_seconds` before the query. The range of the query is honoured:
an increase older than the window is not counted, as Prometheus would not. Anything else is
refused with Prometheus' 400 `bad_data`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlparse

from fraud.deploy.canary import (
    DECISIONS_METRIC,
    DRIFT_METRIC,
    LATENCY_METRIC,
    MISSING_METRIC,
    REASONS_METRIC,
    REQUESTS_METRIC,
    SCORE_METRIC,
    STALE_METRIC,
    TRANSACTIONS_METRIC,
)
from tests.support.kube_api import _LoopbackServer


@dataclass(frozen=True)
class Series:
    """An increase of one time series, `age_seconds` before the query time."""

    metric: str
    labels: dict[str, str]
    increase: float
    age_seconds: float = 0.0


_QUERY = re.compile(
    r"^sum(?: by \((?P<by>\w+)\))? ?"
    r"\(increase\((?P<metric>[a-zA-Z_:][a-zA-Z0-9_:]*)\{(?P<matchers>[^}]*)\}\[(?P<window>\d+)(?P<unit>[smh])\]\)\)$"
)
_MATCHER = re.compile(r'(?P<label>[a-zA-Z_]\w*)(?P<op>=~|!=|=)"(?P<value>(?:[^"\\]|\\.)*)"')
_UNIT = {"s": 1, "m": 60, "h": 3600}


class FakePrometheus(_LoopbackServer):
    """A Prometheus HTTP API on loopback evaluating `sum [by (x)] (increase(m{...}[w]))` over `series`."""

    def __init__(self, series: Iterable[Series] = ()) -> None:
        self.series: list[Series] = list(series)
        self.queries: list[str] = []
        self.down = False
        self._start_server()

    def evaluate(self, query: str) -> tuple[int, dict[str, Any]]:
        match = _QUERY.match(query.strip())
        if not match:
            return 400, {"status": "error", "errorType": "bad_data", "error": f"unsupported query {query!r}"}
        window = int(match["window"]) * _UNIT[match["unit"]]
        if window <= 0:
            return 400, {"status": "error", "errorType": "bad_data", "error": "zero range in a range selector"}
        matchers = [(m["label"], m["op"], m["value"].replace('\\"', '"')) for m in _MATCHER.finditer(match["matchers"])]

        def selected(s: Series) -> bool:
            if s.metric != match["metric"] or s.age_seconds >= window:
                return False
            for label, op, value in matchers:
                actual = s.labels.get(label, "")
                if op == "=" and actual != value:
                    return False
                if op == "!=" and actual == value:
                    return False
                if op == "=~" and not re.fullmatch(value, actual):
                    return False
            return True

        chosen = [s for s in self.series if selected(s)]
        if match["by"]:
            groups: dict[str, float] = {}
            for s in chosen:
                key = s.labels.get(match["by"], "")
                groups[key] = groups.get(key, 0.0) + s.increase
            result = [{"metric": {match["by"]: k}, "value": [0, repr(v)]} for k, v in sorted(groups.items())]
        else:
            result = [{"metric": {}, "value": [0, repr(sum(s.increase for s in chosen))]}] if chosen else []
        return 200, {"status": "success", "data": {"resultType": "vector", "result": result}}

    def handle(self, method: str, path: str, content_type: str, body: Any) -> tuple[int, Any]:
        """GET /api/v1/query only (an instant query); a scripted outage answers 503 to everything."""
        parsed = urlparse(path)
        if self.down:
            return 503, {"status": "error", "errorType": "unavailable", "error": "scripted outage"}
        if parsed.path != "/api/v1/query":
            return 404, {"status": "error", "errorType": "not_found", "error": parsed.path}
        if method != "GET":
            return 405, {"status": "error", "errorType": "bad_data", "error": f"{method} is not served here"}
        query = parse_qs(parsed.query).get("query", [""])[0]
        self.queries.append(query)
        return self.evaluate(query)


def predictor_series(
    version: str,
    *,
    requests: int,
    server_errors: int = 0,
    client_errors: int = 0,
    latency_seconds: float = 0.01,
    score_mean: float = 0.1,
    decision_shares: dict[str, float] | None = None,
    reasons: dict[str, int] | None = None,
    missing: int = 0,
    stale: int = 0,
    age_seconds: float = 0.0,
    extra_labels: dict[str, str] | None = None,
) -> list[Series]:
    """The series a predictor serving `version` would produce over a window: `requests` scoring
    requests (`server_errors` of them 5xx, `client_errors` 4xx), the successful ones
    `latency_seconds` long, one transaction each, with fraud scores spread around `score_mean` and
    decisions split by `decision_shares` (default 95 % approve, 4 % review, 1 % decline). Bucket
    bounds are the predictor's own (`predictor/prometheus.py`)."""
    latency_bounds = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, float("inf"))
    score_bounds = (0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0, float("inf"))
    base = {"model_version": version, **(extra_labels or {})}
    ok = requests - server_errors - client_errors
    age = age_seconds

    def series(metric: str, labels: dict[str, str], value: float) -> Series:
        return Series(metric, {**base, **labels}, float(value), age)

    out = [
        series(REQUESTS_METRIC, {"protocol": "v2", "outcome": "ok"}, ok),
        series(REQUESTS_METRIC, {"protocol": "v2", "outcome": "error"}, server_errors),
        series(REQUESTS_METRIC, {"protocol": "v2", "outcome": "invalid_input"}, client_errors),
        series(TRANSACTIONS_METRIC, {}, ok),
        series(MISSING_METRIC, {}, missing),
        series(STALE_METRIC, {}, stale),
    ]
    for le in latency_bounds:
        label = "+Inf" if le == float("inf") else repr(le)
        count = ok if latency_seconds <= le else 0
        out.append(series(f"{LATENCY_METRIC}_bucket", {"protocol": "v2", "outcome": "ok", "le": label}, count))
    # scores: a triangular spread of width 0.2 around score_mean, as cumulative counts
    for le in score_bounds:
        label = "+Inf" if le == float("inf") else repr(le)
        low, high = max(0.0, score_mean - 0.1), min(1.0, score_mean + 0.1)
        fraction = 1.0 if le >= high else 0.0 if le <= low else (le - low) / (high - low)
        out.append(series(f"{SCORE_METRIC}_bucket", {"le": label}, round(ok * fraction)))
    shares = decision_shares or {"approve": 0.95, "review": 0.04, "decline": 0.01}
    for decision, share in shares.items():
        out.append(series(DECISIONS_METRIC, {"decision": decision}, round(ok * share)))
    for reason, count in (reasons or {}).items():
        out.append(series(REASONS_METRIC, {"reason": reason}, count))
    return out


def drift_series(drifted_windows: int, *, age_seconds: float = 0.0, extra_labels: dict[str, str] | None = None):
    """The drift transformer's count of drifted windows (it has no model_version label)."""
    return [Series(DRIFT_METRIC, dict(extra_labels or {}), float(drifted_windows), age_seconds)]
