"""Prometheus metrics of the fraud predictor.

Registered in prometheus_client's default registry, which KServe's ModelServer exposes on the
HTTP port at `/metrics` (next to KServe's own `request_*_seconds` histograms).
"""

from __future__ import annotations

import collections
import functools
import threading
import time
from collections.abc import Mapping, Sequence

import numpy as np
from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
SCORE_BUCKETS = (0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)

REQUESTS = Counter(
    "fraud_predictor_requests",
    "Scoring requests by protocol (v1, v2, grpc-v2), model version and outcome (ok, invalid_input, unavailable, error)",
    ["protocol", "model_version", "outcome"],
)
REQUEST_LATENCY = Histogram(
    "fraud_predictor_request_latency_seconds",
    "Scoring request latency inside the model (parse, feature lookup, scoring, encoding)",
    ["protocol", "model_version", "outcome"],
    buckets=LATENCY_BUCKETS,
)
TRANSACTIONS = Counter(
    "fraud_predictor_transactions",
    "Transactions scored",
    ["model_version"],
)
DECISIONS = Counter(
    "fraud_predictor_decisions",
    "Decisions by class",
    ["model_version", "decision"],
)
SCORES = Histogram(
    "fraud_predictor_fraud_probability",
    "Distribution of the fraud probability",
    ["model_version"],
    buckets=SCORE_BUCKETS,
)
REASON_CODES = Counter(
    "fraud_predictor_reason_codes",
    "Explained transactions by their top reason code (the feature contributing most to the score)",
    ["model_version", "reason"],
)
FEATURE_LOOKUP_LATENCY = Histogram(
    "fraud_predictor_feature_lookup_seconds",
    "Latency of the one batched online-store lookup per request",
    ["source", "outcome"],
    buckets=LATENCY_BUCKETS,
)
FEATURES_MISSING = Counter(
    "fraud_predictor_features_missing",
    "Transactions scored with cold-start defaults for at least one entity",
    ["model_version"],
)
FEATURES_STALE = Counter(
    "fraud_predictor_features_stale",
    "Transactions scored with a snapshot older than the transaction's day",
    ["model_version"],
)
FEATURES_EXPIRED = Counter(
    "fraud_predictor_features_expired",
    "Transactions for which an entity's snapshot was older than its feature view's TTL: not served, "
    "cold-start defaults used (also counted in fraud_predictor_features_missing)",
    ["model_version"],
)
SNAPSHOT_AGE = Gauge(
    "fraud_predictor_feature_snapshot_age_seconds",
    "Age (now minus its event time) of the newest batch-feature snapshot served, per feature view; "
    "absent until the view has served one",
    ["view"],
)
ERRORS = Counter(
    "fraud_predictor_errors",
    "Errors by kind (invalid_input, feature_store_unavailable, audit_unavailable, idempotency_unavailable, "
    "conflict, internal)",
    ["kind"],
)
REPLAYED = Counter(
    "fraud_predictor_replayed_transactions",
    "Transactions answered from the idempotency ledger (the same transaction id and content again)",
)
DEGRADED = Counter(
    "fraud_predictor_degraded_requests",
    "Requests during an online-store outage, by mode (fail_open: scored with defaults; fail_closed: refused with 503)",
    ["mode"],
)


def record_request(protocol: str, model_version: str, outcome: str, seconds: float) -> None:
    REQUESTS.labels(protocol, model_version, outcome).inc()
    REQUEST_LATENCY.labels(protocol, model_version, outcome).observe(seconds)


def record_scores(
    model_version: str,
    probabilities: Sequence[float] | np.ndarray,
    decisions: Sequence[str],
    missing: int,
    stale: int,
    top_reasons: Sequence[str] = (),
) -> None:
    """Counters and the score histogram for one scored batch (label children resolved once)."""
    TRANSACTIONS.labels(model_version).inc(len(decisions))
    if missing:
        FEATURES_MISSING.labels(model_version).inc(missing)
    if stale:
        FEATURES_STALE.labels(model_version).inc(stale)
    observe = SCORES.labels(model_version).observe
    for probability in np.asarray(probabilities, dtype=np.float64).tolist():
        observe(probability)
    for decision, count in collections.Counter(decisions).items():
        DECISIONS.labels(model_version, decision).inc(count)
    for reason, count in collections.Counter(top_reasons).items():
        REASON_CODES.labels(model_version, reason).inc(count)


class _NewestSnapshots:
    """The newest snapshot served per view; the age gauge reads it at scrape time, so it keeps
    growing when nothing newer arrives (a stopped feature pipeline), traffic or not."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._newest_ns: dict[str, int] = {}

    def observe(self, newest_ns: Mapping[str, int | None]) -> None:
        for view, stamp in newest_ns.items():
            if stamp is None:
                continue
            with self._lock:
                known = self._newest_ns.get(view)
                if known is not None and known >= stamp:
                    continue
                self._newest_ns[view] = stamp
            if known is None:
                SNAPSHOT_AGE.labels(view).set_function(functools.partial(self.age_seconds, view))

    def age_seconds(self, view: str) -> float:
        return time.time() - self._newest_ns[view] / 1e9


NEWEST_SNAPSHOTS = _NewestSnapshots()


def record_snapshots(model_version: str, newest_ns: Mapping[str, int | None], expired: int) -> None:
    """The freshness of one scored batch: newest snapshot per view, transactions with expired snapshots."""
    NEWEST_SNAPSHOTS.observe(newest_ns)
    if expired:
        FEATURES_EXPIRED.labels(model_version).inc(expired)
