"""Prometheus metrics of the audit trail (prometheus_client default registry, so the predictor's
`/metrics` endpoint or `fraud audit writer --metrics-port` exposes them)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_FAST_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)
_BATCH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

SPOOL_BACKLOG = Gauge("fraud_audit_spool_backlog", "Decisions in the local spool not yet committed to the database")
SPOOL_APPENDED = Counter("fraud_audit_spool_appended", "Decisions durably appended to the spool (acknowledged)")
SPOOL_DROPPED = Counter("fraud_audit_spool_dropped", "Decisions refused because the spool was full (not audited)")
SPOOL_APPEND_LATENCY = Histogram(
    "fraud_audit_spool_append_seconds", "Latency of one AuditSpool.append call (incl. fsync)", buckets=_FAST_BUCKETS
)
WRITTEN = Counter("fraud_audit_written", "Decisions inserted into the audit database")
DUPLICATES = Counter(
    "fraud_audit_duplicates_skipped", "Spooled decisions already in the database (replayed after a crash)"
)
RETRIES = Counter("fraud_audit_write_retries", "Batches retried after a database or spool error", ["reason"])
DEAD_LETTERS = Counter(
    "fraud_audit_dead_letters", "Spooled decisions the database rejects permanently, kept in the spool's dead_letters"
)
WRITE_LATENCY = Histogram(
    "fraud_audit_write_batch_seconds", "Latency of inserting and committing one batch", buckets=_BATCH_BUCKETS
)
CONFLICTS = Counter(
    "fraud_audit_conflicts",
    "Spooled decisions whose (transaction_id, model_version) is recorded with other content; kept in the dead_letters",
)
