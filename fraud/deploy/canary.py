"""Canary analysis: compare the canary's and the stable version's live metrics and decide.

The numbers come from the predictor's own Prometheus metrics (`predictor/metrics.py`), which
carry a `model_version` label, so canary and stable are told apart by version whatever revision
or pod serves them:

    fraud_predictor_requests_total{protocol, model_version, outcome}      outcome: ok|invalid_input|unavailable|error
    fraud_predictor_request_latency_seconds_bucket{..., le}
    fraud_predictor_fraud_probability_bucket{model_version, le}

Two sources produce the same `VariantStats`: `PrometheusSource` (Prometheus HTTP API,
`/api/v1/query`, over a window) on Kubernetes, and `ScrapeSource` (two scrapes of each local
predictor's `/metrics`, window = time between them) on the local target. `decide` is the one
decision rule both targets use.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

REQUESTS_METRIC = "fraud_predictor_requests_total"
LATENCY_METRIC = "fraud_predictor_request_latency_seconds"
SCORE_METRIC = "fraud_predictor_fraud_probability"
VERSION_LABEL = "model_version"
#: outcomes that count against the model (client errors such as invalid_input do not)
SERVER_ERROR_OUTCOMES = ("error", "unavailable")

PROMOTE = "promoted"
ROLL_BACK = "rolled_back"


class AnalysisError(Exception):
    """The metrics could not be obtained (Prometheus unreachable, bad answer, predictor down)."""


@dataclass(frozen=True)
class CanaryCriteria:
    """When a canary is good enough. Every limit is checked; any breach rolls back."""

    #: canary server-error rate may not exceed max(stable rate + this, max_error_rate)
    max_error_rate: float = 0.01
    max_error_rate_increase: float = 0.005
    #: canary p99 latency may not exceed stable p99 * this factor, nor max_p99_seconds
    max_p99_ratio: float = 1.5
    max_p99_seconds: float = 0.25
    #: Kolmogorov-Smirnov distance between binned score distributions
    max_score_shift: float = 0.2
    #: fewer canary requests than this in the window: not enough evidence -> roll back
    min_requests: int = 50

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"canary criterion {name} must be a finite number >= 0, got {value!r}")


@dataclass(frozen=True)
class VariantStats:
    """One model version's behaviour over the analysis window."""

    version: str
    requests: float
    server_errors: float
    #: cumulative latency histogram: [(upper bound seconds, count)], ascending, last bound +Inf
    latency_buckets: tuple[tuple[float, float], ...] = ()
    #: cumulative score histogram, same shape
    score_buckets: tuple[tuple[float, float], ...] = ()

    @property
    def error_rate(self) -> float:
        return self.server_errors / self.requests if self.requests > 0 else 0.0

    @property
    def p99_seconds(self) -> float:
        return histogram_quantile(0.99, self.latency_buckets)


@dataclass(frozen=True)
class Verdict:
    decision: str
    reasons: tuple[str, ...]
    numbers: dict[str, Any] = field(default_factory=dict)

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float:
    """Prometheus' histogram_quantile on cumulative (le, count) pairs; NaN without observations."""
    ordered = sorted(buckets, key=lambda b: b[0])
    if not ordered or ordered[-1][1] <= 0:
        return math.nan
    total = ordered[-1][1]
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for upper, count in ordered:
        if count >= rank:
            if math.isinf(upper):
                return lower_bound  # Prometheus returns the highest finite bound
            if count == lower_count:
                return upper
            return lower_bound + (upper - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = upper, count
    return ordered[-1][0]


def score_shift(canary: Sequence[tuple[float, float]], stable: Sequence[tuple[float, float]]) -> float:
    """Kolmogorov-Smirnov distance between two binned distributions (cumulative bucket counts)."""
    a, b = dict(canary), dict(stable)
    if not a or not b:
        return math.nan
    total_a, total_b = max(a.values()), max(b.values())
    if total_a <= 0 or total_b <= 0:
        return math.nan
    bounds = sorted(set(a) & set(b))
    return max((abs(a[le] / total_a - b[le] / total_b) for le in bounds), default=math.nan)


def decide(canary: VariantStats, stable: VariantStats | None, criteria: CanaryCriteria) -> Verdict:
    """Promote only if the canary saw enough traffic and breaks no limit; otherwise roll back.

    Without a stable version (first deployment) only the absolute limits apply."""
    reasons: list[str] = []
    numbers: dict[str, Any] = {
        "canary_version": canary.version,
        "canary_requests": canary.requests,
        "canary_error_rate": canary.error_rate,
        "canary_p99_seconds": canary.p99_seconds,
    }
    if canary.requests < criteria.min_requests:
        reasons.append(
            f"canary served {canary.requests:.0f} requests in the window, fewer than {criteria.min_requests}"
        )
    error_limit = criteria.max_error_rate
    p99_limit = criteria.max_p99_seconds
    if stable is not None:
        numbers.update(
            stable_version=stable.version,
            stable_requests=stable.requests,
            stable_error_rate=stable.error_rate,
            stable_p99_seconds=stable.p99_seconds,
        )
        error_limit = max(error_limit, stable.error_rate + criteria.max_error_rate_increase)
        if not math.isnan(stable.p99_seconds):
            p99_limit = max(p99_limit, stable.p99_seconds * criteria.max_p99_ratio)
        shift = score_shift(canary.score_buckets, stable.score_buckets)
        numbers["score_shift_ks"] = shift
        if not math.isnan(shift) and shift > criteria.max_score_shift:
            reasons.append(f"score distribution shifted by KS {shift:.3f} > {criteria.max_score_shift}")
    if canary.error_rate > error_limit:
        reasons.append(f"canary error rate {canary.error_rate:.4f} > limit {error_limit:.4f}")
    if not math.isnan(canary.p99_seconds) and canary.p99_seconds > p99_limit:
        reasons.append(f"canary p99 latency {canary.p99_seconds * 1000:.1f} ms > limit {p99_limit * 1000:.1f} ms")
    numbers = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in numbers.items()}
    if reasons:
        return Verdict(ROLL_BACK, tuple(reasons), numbers)
    return Verdict(PROMOTE, ("canary within every limit",), numbers)


# --------------------------------------------------------------------------- Prometheus source


def _matchers(version: str, extra: Mapping[str, str]) -> str:
    pairs = {**extra, VERSION_LABEL: version}
    return ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(pairs.items()))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def promql_for(version: str, window_seconds: int, extra_labels: Mapping[str, str] | None = None) -> dict[str, str]:
    """The PromQL queries the analysis runs for one version (also used by the Grafana dashboard)."""
    sel = _matchers(version, extra_labels or {})
    window = f"{int(window_seconds)}s"
    errors = "|".join(SERVER_ERROR_OUTCOMES)
    return {
        "requests": f"sum(increase({REQUESTS_METRIC}{{{sel}}}[{window}]))",
        "server_errors": f'sum(increase({REQUESTS_METRIC}{{{sel},outcome=~"{errors}"}}[{window}]))',
        "latency_buckets": f'sum by (le) (increase({LATENCY_METRIC}_bucket{{{sel},outcome="ok"}}[{window}]))',
        "score_buckets": f"sum by (le) (increase({SCORE_METRIC}_bucket{{{sel}}}[{window}]))",
    }


class PrometheusSource:
    """Reads VariantStats from a Prometheus server's HTTP API (instant queries over a range window)."""

    def __init__(
        self,
        base_url: str,
        *,
        extra_labels: Mapping[str, str] | None = None,
        timeout: float = 10.0,
        client: httpx.Client | None = None,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise AnalysisError(f"prometheus_url must be an http(s) URL, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.extra_labels = dict(extra_labels or {})
        self._client = client or httpx.Client(timeout=timeout)

    def query(self, promql: str) -> list[dict[str, Any]]:
        """The result vector of an instant query; raises AnalysisError on any failure."""
        try:
            response = self._client.get(f"{self.base_url}/api/v1/query", params={"query": promql})
        except httpx.HTTPError as exc:
            raise AnalysisError(f"Prometheus at {self.base_url} unreachable: {exc}") from None
        try:
            body = response.json()
        except ValueError:
            raise AnalysisError(
                f"Prometheus answered HTTP {response.status_code} with non-JSON for {promql!r}"
            ) from None
        if response.status_code != 200 or body.get("status") != "success":
            raise AnalysisError(
                f"Prometheus query {promql!r} failed: "
                f"{body.get('errorType', response.status_code)} {body.get('error', '')}"
            )
        data = body.get("data", {})
        if data.get("resultType") != "vector":
            raise AnalysisError(f"Prometheus query {promql!r} returned {data.get('resultType')!r}, expected a vector")
        return list(data.get("result", []))

    def _scalar(self, promql: str) -> float:
        result = self.query(promql)
        return float(result[0]["value"][1]) if result else 0.0

    def _buckets(self, promql: str) -> tuple[tuple[float, float], ...]:
        pairs = []
        for sample in self.query(promql):
            le = sample.get("metric", {}).get("le")
            if le is None:
                continue
            pairs.append((float(le), float(sample["value"][1])))
        return tuple(sorted(pairs))

    def stats(self, version: str, window_seconds: int) -> VariantStats:
        queries = promql_for(version, window_seconds, self.extra_labels)
        return VariantStats(
            version=version,
            requests=self._scalar(queries["requests"]),
            server_errors=self._scalar(queries["server_errors"]),
            latency_buckets=self._buckets(queries["latency_buckets"]),
            score_buckets=self._buckets(queries["score_buckets"]),
        )


# --------------------------------------------------------------------------- /metrics scrape source


@dataclass(frozen=True)
class Scrape:
    """The predictor metrics of one /metrics scrape, summed over protocols, keyed by version."""

    requests: dict[str, float]
    server_errors: dict[str, float]
    latency: dict[str, dict[float, float]]
    scores: dict[str, dict[float, float]]


def parse_metrics(text: str) -> Scrape:
    """Sum the predictor's counters/histograms in a Prometheus text exposition by model_version."""
    from prometheus_client.parser import text_string_to_metric_families

    requests: dict[str, float] = {}
    errors: dict[str, float] = {}
    latency: dict[str, dict[float, float]] = {}
    scores: dict[str, dict[float, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            version = sample.labels.get(VERSION_LABEL)
            if version is None:
                continue
            if sample.name == REQUESTS_METRIC:
                requests[version] = requests.get(version, 0.0) + sample.value
                if sample.labels.get("outcome") in SERVER_ERROR_OUTCOMES:
                    errors[version] = errors.get(version, 0.0) + sample.value
            elif sample.name == f"{LATENCY_METRIC}_bucket" and sample.labels.get("outcome") == "ok":
                le = float(sample.labels["le"])
                latency.setdefault(version, {})[le] = latency.get(version, {}).get(le, 0.0) + sample.value
            elif sample.name == f"{SCORE_METRIC}_bucket":
                le = float(sample.labels["le"])
                scores.setdefault(version, {})[le] = scores.get(version, {}).get(le, 0.0) + sample.value
    return Scrape(requests, errors, latency, scores)


def _delta(after: dict[float, float], before: dict[float, float]) -> tuple[tuple[float, float], ...]:
    return tuple(sorted((le, max(0.0, count - before.get(le, 0.0))) for le, count in after.items()))


def stats_between(version: str, before: Scrape, after: Scrape) -> VariantStats:
    """What `version` did between two scrapes (counter deltas; a restart resets to the later value)."""

    def diff(a: float, b: float) -> float:
        return a - b if a >= b else a  # counter reset: the process restarted in between

    return VariantStats(
        version=version,
        requests=diff(after.requests.get(version, 0.0), before.requests.get(version, 0.0)),
        server_errors=diff(after.server_errors.get(version, 0.0), before.server_errors.get(version, 0.0)),
        latency_buckets=_delta(after.latency.get(version, {}), before.latency.get(version, {})),
        score_buckets=_delta(after.scores.get(version, {}), before.scores.get(version, {})),
    )


class ScrapeSource:
    """Reads VariantStats by scraping predictors' /metrics at the start and end of the window."""

    def __init__(self, metrics_urls: Mapping[str, str], *, timeout: float = 5.0) -> None:
        self.metrics_urls = dict(metrics_urls)  # version -> http://host:port/metrics
        self.timeout = timeout
        self._first: dict[str, Scrape] = {}

    def scrape(self, version: str) -> Scrape:
        url = self.metrics_urls[version]
        try:
            response = httpx.get(url, timeout=self.timeout)
            response.raise_for_status()
        except httpx.HTTPError as exc:
            raise AnalysisError(f"cannot scrape {url} for version {version}: {exc}") from None
        return parse_metrics(response.text)

    def start(self) -> None:
        self._first = {version: self.scrape(version) for version in self.metrics_urls}

    def stats(self, version: str, window_seconds: int) -> VariantStats:
        if version not in self._first:
            raise AnalysisError(f"no scrape of version {version} at the start of the window")
        return stats_between(version, self._first[version], self.scrape(version))


# --------------------------------------------------------------------------- the analysis


def analyse(
    source: PrometheusSource | ScrapeSource,
    canary_version: str,
    stable_version: str | None,
    window_seconds: int,
    criteria: CanaryCriteria,
    *,
    wait: bool = True,
    sleep: Callable[[float], None] = time.sleep,
) -> Verdict:
    """Let the window elapse (when `wait`), collect both versions' stats and decide.

    A metrics outage is not evidence the canary is healthy: AnalysisError becomes a roll back."""
    if window_seconds <= 0:
        raise ValueError(f"window_seconds must be > 0, got {window_seconds}")
    if isinstance(source, ScrapeSource):
        source.start()
    if wait:
        sleep(window_seconds)
    try:
        canary = source.stats(canary_version, window_seconds)
        stable = source.stats(stable_version, window_seconds) if stable_version else None
    except AnalysisError as exc:
        return Verdict(ROLL_BACK, (f"canary metrics unavailable: {exc}",), {"canary_version": canary_version})
    return decide(canary, stable, criteria)
