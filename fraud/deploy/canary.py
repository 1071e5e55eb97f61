"""Canary analysis: compare the canary's and the stable version's live metrics and decide.

The numbers come from the predictor's own Prometheus metrics (`predictor/prometheus.py`), which
carry a `model_version` label, so canary and stable are told apart by version whatever revision
or pod serves them:

    fraud_predictor_requests_total{protocol, model_version, outcome}   ok|invalid_input|unavailable|error
    fraud_predictor_request_latency_seconds_bucket{..., le}
    fraud_predictor_fraud_probability_bucket{model_version, le}
    fraud_predictor_transactions_total{model_version}
    fraud_predictor_decisions_total{model_version, decision}           approve|review|decline
    fraud_predictor_reason_codes_total{model_version, reason}          top reason of explained rows
    fraud_predictor_features_missing_total / _stale_total{model_version}
    fraud_drift_windows_drifted_total                                  the drift transformer (shared)

Two sources produce the same `VariantStats`: `PrometheusSource` (Prometheus HTTP API,
`/api/v1/query`, over the time elapsed in the window) on Kubernetes, and `ScrapeSource` (scrapes
of each local predictor's `/metrics`, deltas since the start of the window) on the local target.

`checks` runs every check of the rollout policy (`fraud.deploy.policy.CanaryCriteria`) and gives
each a value, a limit and a verdict; a value that cannot be computed (NaN) fails, it never passes.
`decide` turns them into the verdict at the end of a window; `abort_reason` is what `watch` asks
at every look during the window (consecutive failures, a guardrail breached by a wide margin, a
canary that no longer answers its metrics endpoint).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from scipy.stats import norm

from fraud.deploy.policy import AbortRules, CanaryCriteria

REQUESTS_METRIC = "fraud_predictor_requests_total"
LATENCY_METRIC = "fraud_predictor_request_latency_seconds"
SCORE_METRIC = "fraud_predictor_fraud_probability"
TRANSACTIONS_METRIC = "fraud_predictor_transactions_total"
DECISIONS_METRIC = "fraud_predictor_decisions_total"
REASONS_METRIC = "fraud_predictor_reason_codes_total"
MISSING_METRIC = "fraud_predictor_features_missing_total"
STALE_METRIC = "fraud_predictor_features_stale_total"
DRIFT_METRIC = "fraud_drift_windows_drifted_total"
VERSION_LABEL = "model_version"
#: outcomes that count against the model as server errors
SERVER_ERROR_OUTCOMES = ("error", "unavailable")
#: outcomes of requests the model refused (HTTP 4xx): compared with stable's rate
CLIENT_ERROR_OUTCOMES = ("invalid_input",)
DECISION_CLASSES = ("approve", "review", "decline")

PROMOTE = "promoted"
ROLL_BACK = "rolled_back"

PASS, FAIL, SKIP = "pass", "fail", "skip"

__all__ = ["AbortRules", "CanaryCriteria"]


class AnalysisError(Exception):
    """The metrics could not be obtained (Prometheus unreachable, bad answer, predictor down)."""


@dataclass(frozen=True)
class VariantStats:
    """One model version's behaviour over the analysis window."""

    version: str
    requests: float
    server_errors: float
    client_errors: float = 0.0
    #: cumulative latency histogram of successful requests: [(upper bound seconds, count)], last +Inf
    latency_buckets: tuple[tuple[float, float], ...] = ()
    #: cumulative score histogram, same shape
    score_buckets: tuple[tuple[float, float], ...] = ()
    transactions: float = 0.0
    decisions: Mapping[str, float] = field(default_factory=dict)
    reasons: Mapping[str, float] = field(default_factory=dict)
    missing: float = 0.0
    stale: float = 0.0
    #: windows the drift transformer flagged in the window; None = no drift transformer reports here
    drifted_windows: float | None = None

    @property
    def successful(self) -> float:
        return max(0.0, self.requests - self.server_errors - self.client_errors)

    @property
    def error_rate(self) -> float:
        return self.server_errors / self.requests if self.requests > 0 else math.nan

    @property
    def client_error_rate(self) -> float:
        return self.client_errors / self.requests if self.requests > 0 else math.nan

    @property
    def p99_seconds(self) -> float:
        return histogram_quantile(0.99, self.latency_buckets)

    @property
    def missing_stale_rate(self) -> float:
        if self.transactions <= 0:
            return math.nan
        return min(1.0, (self.missing + self.stale) / self.transactions)


@dataclass(frozen=True)
class Check:
    """One check's outcome: the measured value, its limit, the verdict and a one-line detail."""

    name: str
    verdict: str
    value: float | None
    limit: float | None
    detail: str
    #: value / limit when failed (how wide the breach is; drives the early abort)
    breach: float = 0.0
    #: a guardrail may abort the window early when breached widely
    guardrail: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Verdict:
    decision: str
    reasons: tuple[str, ...]
    numbers: dict[str, Any] = field(default_factory=dict)
    checks: tuple[Check, ...] = ()
    #: decided before the window ended (early abort)
    early: bool = False

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


def two_proportion_test(x1: float, n1: float, x2: float, n2: float) -> tuple[float, float]:
    """(difference p1 - p2, two-sided p-value) of the pooled two-proportion z-test."""
    p1, p2 = x1 / n1, x2 / n2
    pooled = (x1 + x2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:
        return p1 - p2, 1.0 if p1 == p2 else 0.0
    return p1 - p2, float(2 * norm.sf(abs(p1 - p2) / se))


def total_variation(a: Mapping[str, float], b: Mapping[str, float]) -> float:
    total_a, total_b = sum(a.values()), sum(b.values())
    keys = set(a) | set(b)
    return 0.5 * sum(abs(a.get(k, 0.0) / total_a - b.get(k, 0.0) / total_b) for k in keys)


def _fmt(value: float) -> str:
    return "NaN" if math.isnan(value) else f"{value:.4g}"


def _limit_check(name: str, value: float, limit: float, what: str, *, unit: float = 1.0, suffix: str = "") -> Check:
    """value <= limit passes; NaN fails."""
    shown = f"{_fmt(value * unit)}{suffix}"
    if math.isnan(value):
        return Check(name, FAIL, None, limit, f"{name}: {what} could not be computed (NaN)", math.inf, True)
    if value > limit:
        breach = value / limit if limit > 0 else math.inf
        return Check(
            name, FAIL, value, limit, f"{name}: {what} {shown} > limit {_fmt(limit * unit)}{suffix}", breach, True
        )
    return Check(name, PASS, value, limit, f"{name}: {what} {shown} <= limit {_fmt(limit * unit)}{suffix}", 0.0, True)


def checks(canary: VariantStats, stable: VariantStats | None, criteria: CanaryCriteria) -> list[Check]:
    """Every check of the policy on the canary (and stable, for the relative ones)."""
    out: list[Check] = []
    ok = canary.successful
    if ok < criteria.min_successful_scorings:
        out.append(
            Check(
                "successful_scorings",
                FAIL,
                ok,
                criteria.min_successful_scorings,
                f"successful_scorings: canary answered {ok:.0f} requests successfully, "
                f"fewer than {criteria.min_successful_scorings}",
            )
        )
    else:
        out.append(
            Check(
                "successful_scorings",
                PASS,
                ok,
                criteria.min_successful_scorings,
                f"successful_scorings: {ok:.0f} >= {criteria.min_successful_scorings}",
            )
        )
    stable_errors = stable.error_rate if stable is not None and stable.requests > 0 else 0.0
    stable_client = stable.client_error_rate if stable is not None and stable.requests > 0 else 0.0
    out.append(
        _limit_check(
            "server_error_rate",
            canary.error_rate,
            max(criteria.max_error_rate, stable_errors + criteria.max_error_rate_increase),
            "canary 5xx rate",
        )
    )
    out.append(
        _limit_check(
            "client_error_rate",
            canary.client_error_rate,
            max(criteria.max_client_error_rate, stable_client + criteria.max_client_error_rate_increase),
            "canary 4xx rate",
        )
    )
    p99_limit = criteria.max_p99_seconds
    if stable is not None and not math.isnan(stable.p99_seconds):
        p99_limit = max(p99_limit, stable.p99_seconds * criteria.max_p99_ratio)
    out.append(_limit_check("p99_latency", canary.p99_seconds, p99_limit, "canary p99", unit=1000, suffix=" ms"))
    if canary.drifted_windows is None:
        out.append(Check("drift", SKIP, None, None, "drift: no drift transformer reports to this metrics source"))
    else:
        out.append(
            _limit_check(
                "drift",
                canary.drifted_windows,
                float(criteria.max_drifted_windows),
                "drift transformer windows flagged during the window",
            )
        )
    relative = ("score_shift", "decision_share", "reason_mix", "missing_stale")
    if stable is None:
        out += [Check(name, SKIP, None, None, f"{name}: no stable version to compare with") for name in relative]
        return out
    out.append(
        _limit_check(
            "score_shift",
            score_shift(canary.score_buckets, stable.score_buckets),
            criteria.max_score_shift,
            "KS distance of the score distributions",
        )
    )
    out += _decision_checks(canary, stable, criteria)
    out.append(_reason_check(canary, stable, criteria))
    out.append(
        _limit_check(
            "missing_stale",
            canary.missing_stale_rate - stable.missing_stale_rate,
            criteria.max_missing_stale_increase,
            f"canary missing/stale-feature rate {_fmt(canary.missing_stale_rate)} minus stable's "
            f"{_fmt(stable.missing_stale_rate)} =",
        )
    )
    return out


def _decision_checks(canary: VariantStats, stable: VariantStats, criteria: CanaryCriteria) -> list[Check]:
    n1, n2 = sum(canary.decisions.values()), sum(stable.decisions.values())
    if min(n1, n2) < criteria.min_decision_count:
        return [
            Check(
                "decision_share",
                FAIL,
                min(n1, n2),
                criteria.min_decision_count,
                f"decision_share: {n1:.0f} canary / {n2:.0f} stable decisions, "
                f"fewer than {criteria.min_decision_count} to compare",
            )
        ]
    out = []
    for decision in DECISION_CLASSES:
        x1, x2 = canary.decisions.get(decision, 0.0), stable.decisions.get(decision, 0.0)
        diff, p_value = two_proportion_test(x1, n1, x2, n2)
        name = f"decision_share.{decision}"
        limit = criteria.max_decision_share_difference
        text = f"{name}: canary {_fmt(x1 / n1)} vs stable {_fmt(x2 / n2)} (difference {diff:+.4f}, p={p_value:.2g})"
        if p_value < criteria.decision_alpha and abs(diff) > limit:
            breach = abs(diff) / limit if limit > 0 else math.inf
            out.append(Check(name, FAIL, diff, limit, f"{text} > limit {limit}", breach, True))
        else:
            out.append(Check(name, PASS, diff, limit, text, 0.0, True))
    return out


def _reason_check(canary: VariantStats, stable: VariantStats, criteria: CanaryCriteria) -> Check:
    n1, n2 = sum(canary.reasons.values()), sum(stable.reasons.values())
    if min(n1, n2) < criteria.min_reason_count:
        return Check(
            "reason_mix",
            SKIP,
            None,
            criteria.max_reason_mix_distance,
            f"reason_mix: {n1:.0f} canary / {n2:.0f} stable explained transactions, "
            f"fewer than {criteria.min_reason_count} to compare",
        )
    return _limit_check(
        "reason_mix",
        total_variation(canary.reasons, stable.reasons),
        criteria.max_reason_mix_distance,
        "total variation distance of the top reason codes",
    )


def _numbers(canary: VariantStats, stable: VariantStats | None) -> dict[str, Any]:
    numbers: dict[str, Any] = {
        "canary_version": canary.version,
        "canary_requests": canary.requests,
        "canary_successful": canary.successful,
        "canary_error_rate": canary.error_rate,
        "canary_client_error_rate": canary.client_error_rate,
        "canary_p99_seconds": canary.p99_seconds,
        "canary_decisions": dict(canary.decisions),
    }
    if stable is not None:
        numbers.update(
            stable_version=stable.version,
            stable_requests=stable.requests,
            stable_successful=stable.successful,
            stable_error_rate=stable.error_rate,
            stable_client_error_rate=stable.client_error_rate,
            stable_p99_seconds=stable.p99_seconds,
            stable_decisions=dict(stable.decisions),
        )
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in numbers.items()}


def decide(canary: VariantStats, stable: VariantStats | None, criteria: CanaryCriteria) -> Verdict:
    """Promote only if no check fails; otherwise roll back, with one line per failed check.

    Without a stable version (first deployment) the relative checks are skipped."""
    results = checks(canary, stable, criteria)
    numbers = _numbers(canary, stable)
    failed = [c.detail for c in results if c.verdict == FAIL]
    if failed:
        return Verdict(ROLL_BACK, tuple(failed), numbers, tuple(results))
    return Verdict(PROMOTE, ("canary within every limit",), numbers, tuple(results))


def abort_reason(
    canary: VariantStats,
    previous: VariantStats | None,
    stable: VariantStats | None,
    criteria: CanaryCriteria,
    rules: AbortRules,
) -> tuple[str, tuple[Check, ...]]:
    """Why the window must end now ("" = keep watching), and the checks it looked at.

    * consecutive failures: since the previous look the canary failed at least
      `rules.consecutive_errors` requests (5xx or 4xx) and answered none successfully;
    * a wide breach: with at least `min_successful_scorings` requests seen, a guardrail check is
      over its limit by `rules.wide_breach_factor` or more."""
    failed_now = canary.server_errors + canary.client_errors
    failed_before = (previous.server_errors + previous.client_errors) if previous else 0.0
    ok_since = canary.successful - (previous.successful if previous else 0.0)
    if failed_now - failed_before >= rules.consecutive_errors and ok_since <= 0:
        failures = failed_now - failed_before
        reason = (
            f"consecutive_errors: canary failed {failures:.0f} requests in a row (limit {rules.consecutive_errors})"
        )
        return reason, ()
    if canary.requests < criteria.min_successful_scorings:
        return "", ()
    results = tuple(checks(canary, stable, criteria))
    wide = [
        c
        for c in results
        if c.guardrail and c.verdict == FAIL and c.value is not None and c.breach >= rules.wide_breach_factor
    ]
    if wide:
        # ties (approve down as much as decline up) name the class the canary has more of
        widest = max(wide, key=lambda c: (c.breach, (c.value or 0.0) > 0))
        return f"wide breach (x{widest.breach:.1f} of its limit): {widest.detail}", results
    return "", results


# --------------------------------------------------------------------------- Prometheus source


def _matchers(version: str | None, extra: Mapping[str, str]) -> str:
    pairs = {**extra, **({VERSION_LABEL: version} if version is not None else {})}
    return ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(pairs.items()))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def promql_for(version: str, window_seconds: int, extra_labels: Mapping[str, str] | None = None) -> dict[str, str]:
    """The PromQL queries the analysis runs for one version (also used by the Grafana dashboard)."""
    sel = _matchers(version, extra_labels or {})
    window = f"{int(window_seconds)}s"
    errors = "|".join(SERVER_ERROR_OUTCOMES)
    client = "|".join(CLIENT_ERROR_OUTCOMES)
    return {
        "requests": f"sum(increase({REQUESTS_METRIC}{{{sel}}}[{window}]))",
        "server_errors": f'sum(increase({REQUESTS_METRIC}{{{sel},outcome=~"{errors}"}}[{window}]))',
        "client_errors": f'sum(increase({REQUESTS_METRIC}{{{sel},outcome=~"{client}"}}[{window}]))',
        "latency_buckets": f'sum by (le) (increase({LATENCY_METRIC}_bucket{{{sel},outcome="ok"}}[{window}]))',
        "score_buckets": f"sum by (le) (increase({SCORE_METRIC}_bucket{{{sel}}}[{window}]))",
        "transactions": f"sum(increase({TRANSACTIONS_METRIC}{{{sel}}}[{window}]))",
        "decisions": f"sum by (decision) (increase({DECISIONS_METRIC}{{{sel}}}[{window}]))",
        "reasons": f"sum by (reason) (increase({REASONS_METRIC}{{{sel}}}[{window}]))",
        "missing": f"sum(increase({MISSING_METRIC}{{{sel}}}[{window}]))",
        "stale": f"sum(increase({STALE_METRIC}{{{sel}}}[{window}]))",
    }


def drift_promql(window_seconds: int, extra_labels: Mapping[str, str] | None = None) -> str:
    """Windows the drift transformer flagged as drifted over the window (it serves both versions)."""
    sel = _matchers(None, extra_labels or {})
    return f"sum(increase({DRIFT_METRIC}{{{sel}}}[{int(window_seconds)}s]))"


class PrometheusSource:
    """Reads VariantStats from a Prometheus server's HTTP API (instant queries over a range window)."""

    def __init__(
        self,
        base_url: str,
        *,
        extra_labels: Mapping[str, str] | None = None,
        timeout: float = 10.0,
        client: httpx.Client | None = None,
        drift: bool = True,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise AnalysisError(f"prometheus_url must be an http(s) URL, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.extra_labels = dict(extra_labels or {})
        self.drift = drift
        self._client = client or httpx.Client(timeout=timeout)

    def start(self) -> None:
        return None  # Prometheus keeps the history: the window is given by each query's range

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

    def _by(self, promql: str, label: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for sample in self.query(promql):
            key = sample.get("metric", {}).get(label)
            if key is not None:
                out[key] = out.get(key, 0.0) + float(sample["value"][1])
        return out

    def _buckets(self, promql: str) -> tuple[tuple[float, float], ...]:
        return tuple(sorted((float(le), count) for le, count in self._by(promql, "le").items()))

    def stats(self, version: str, window_seconds: int) -> VariantStats:
        queries = promql_for(version, window_seconds, self.extra_labels)
        drifted: float | None = None
        if self.drift:
            result = self.query(drift_promql(window_seconds, self.extra_labels))
            drifted = float(result[0]["value"][1]) if result else None
        return VariantStats(
            version=version,
            requests=self._scalar(queries["requests"]),
            server_errors=self._scalar(queries["server_errors"]),
            client_errors=self._scalar(queries["client_errors"]),
            latency_buckets=self._buckets(queries["latency_buckets"]),
            score_buckets=self._buckets(queries["score_buckets"]),
            transactions=self._scalar(queries["transactions"]),
            decisions=self._by(queries["decisions"], "decision"),
            reasons=self._by(queries["reasons"], "reason"),
            missing=self._scalar(queries["missing"]),
            stale=self._scalar(queries["stale"]),
            drifted_windows=drifted,
        )


# --------------------------------------------------------------------------- /metrics scrape source


@dataclass(frozen=True)
class Scrape:
    """The predictor metrics of one /metrics scrape, summed over protocols, keyed by version."""

    requests: dict[str, float]
    server_errors: dict[str, float]
    latency: dict[str, dict[float, float]]
    scores: dict[str, dict[float, float]]
    client_errors: dict[str, float] = field(default_factory=dict)
    transactions: dict[str, float] = field(default_factory=dict)
    decisions: dict[str, dict[str, float]] = field(default_factory=dict)
    reasons: dict[str, dict[str, float]] = field(default_factory=dict)
    missing: dict[str, float] = field(default_factory=dict)
    stale: dict[str, float] = field(default_factory=dict)


def _add(table: dict[str, float], key: str, value: float) -> None:
    table[key] = table.get(key, 0.0) + value


def parse_metrics(text: str) -> Scrape:
    """Sum the predictor's counters/histograms in a Prometheus text exposition by model_version."""
    scrape = Scrape({}, {}, {}, {})
    plain = {
        TRANSACTIONS_METRIC: scrape.transactions,
        MISSING_METRIC: scrape.missing,
        STALE_METRIC: scrape.stale,
    }
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            version = sample.labels.get(VERSION_LABEL)
            if version is None:
                continue
            name, labels, value = sample.name, sample.labels, sample.value
            if name == REQUESTS_METRIC:
                _add(scrape.requests, version, value)
                if labels.get("outcome") in SERVER_ERROR_OUTCOMES:
                    _add(scrape.server_errors, version, value)
                elif labels.get("outcome") in CLIENT_ERROR_OUTCOMES:
                    _add(scrape.client_errors, version, value)
            elif name == f"{LATENCY_METRIC}_bucket" and labels.get("outcome") == "ok":
                le = float(labels["le"])
                scrape.latency.setdefault(version, {})[le] = scrape.latency.get(version, {}).get(le, 0.0) + value
            elif name == f"{SCORE_METRIC}_bucket":
                le = float(labels["le"])
                scrape.scores.setdefault(version, {})[le] = scrape.scores.get(version, {}).get(le, 0.0) + value
            elif name == DECISIONS_METRIC:
                _add(scrape.decisions.setdefault(version, {}), labels.get("decision", ""), value)
            elif name == REASONS_METRIC:
                _add(scrape.reasons.setdefault(version, {}), labels.get("reason", ""), value)
            elif name in plain:
                _add(plain[name], version, value)
    return scrape


def _diff(a: float, b: float) -> float:
    return a - b if a >= b else a  # counter reset: the process restarted in between


def _delta(after: dict[float, float], before: dict[float, float]) -> tuple[tuple[float, float], ...]:
    return tuple(sorted((le, max(0.0, count - before.get(le, 0.0))) for le, count in after.items()))


def _delta_by(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {key: _diff(value, before.get(key, 0.0)) for key, value in after.items()}


def stats_between(version: str, before: Scrape, after: Scrape) -> VariantStats:
    """What `version` did between two scrapes (counter deltas; a restart resets to the later value)."""

    def scalar(field_name: str) -> float:
        return _diff(getattr(after, field_name).get(version, 0.0), getattr(before, field_name).get(version, 0.0))

    return VariantStats(
        version=version,
        requests=scalar("requests"),
        server_errors=scalar("server_errors"),
        client_errors=scalar("client_errors"),
        latency_buckets=_delta(after.latency.get(version, {}), before.latency.get(version, {})),
        score_buckets=_delta(after.scores.get(version, {}), before.scores.get(version, {})),
        transactions=scalar("transactions"),
        decisions=_delta_by(after.decisions.get(version, {}), before.decisions.get(version, {})),
        reasons=_delta_by(after.reasons.get(version, {}), before.reasons.get(version, {})),
        missing=scalar("missing"),
        stale=scalar("stale"),
    )


class ScrapeSource:
    """Reads VariantStats by scraping predictors' /metrics at the start of the window and at each look."""

    def __init__(self, metrics_urls: Mapping[str, str], *, timeout: float = 2.0) -> None:
        self.metrics_urls = dict(metrics_urls)  # version -> http://host:port/metrics
        self.timeout = timeout
        self._first: dict[str, Scrape] = {}

    def scrape(self, version: str) -> Scrape:
        url = self.metrics_urls[version]
        try:
            response = httpx.get(url, timeout=self.timeout)
            response.raise_for_status()
        except httpx.HTTPError as exc:
            raise AnalysisError(f"cannot scrape version {version} at {url}: {type(exc).__name__}") from None
        return parse_metrics(response.text)

    def start(self) -> None:
        self._first = {version: self.scrape(version) for version in self.metrics_urls}

    def stats(self, version: str, window_seconds: int) -> VariantStats:
        if version not in self._first:
            raise AnalysisError(f"no scrape of version {version} at the start of the window")
        return stats_between(version, self._first[version], self.scrape(version))


# --------------------------------------------------------------------------- the analysis


def watch(
    source: PrometheusSource | ScrapeSource,
    canary_version: str,
    stable_version: str | None,
    window_seconds: int,
    criteria: CanaryCriteria,
    *,
    rules: AbortRules | None = None,
    interval_seconds: float = 5.0,
    wait: bool = True,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> Verdict:
    """Watch the canary for `window_seconds`, looking every `interval_seconds` (early abort), then decide.

    `wait=False` decides at once over a window that has already elapsed. A metrics outage is not
    evidence the canary is healthy: AnalysisError becomes a roll back."""
    if window_seconds <= 0:
        raise ValueError(f"window_seconds must be > 0, got {window_seconds}")
    rules = rules or AbortRules()
    started = clock()
    try:
        source.start()
    except AnalysisError as exc:
        return Verdict(ROLL_BACK, (f"metrics: {exc}",), {"canary_version": canary_version}, early=True)
    previous: VariantStats | None = None
    while True:
        if wait:
            remaining = window_seconds - (clock() - started)
            if remaining > 0:
                sleep(min(interval_seconds, remaining))
        elapsed = clock() - started
        final = not wait or elapsed >= window_seconds
        span = window_seconds if final else max(1, math.ceil(elapsed))
        try:
            canary = source.stats(canary_version, span)
            stable = source.stats(stable_version, span) if stable_version else None
        except AnalysisError as exc:
            return Verdict(ROLL_BACK, (f"metrics: {exc}",), {"canary_version": canary_version}, early=not final)
        if final:
            return decide(canary, stable, criteria)
        reason, looked = abort_reason(canary, previous, stable, criteria, rules)
        if reason:
            numbers = {**_numbers(canary, stable), "aborted_after_seconds": round(elapsed, 2)}
            return Verdict(ROLL_BACK, (reason,), numbers, looked, early=True)
        previous = canary


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
    """One window without early abort looks in between (`watch` with a single look at the end)."""
    return watch(
        source,
        canary_version,
        stable_version,
        window_seconds,
        criteria,
        interval_seconds=float(window_seconds),
        wait=wait,
        sleep=sleep,
    )
