"""The decision audit trail.

Predictor-facing API (see docs/audit.md):

    spool = AuditSpool(default_spool_path())            # at load()
    writer = AuditWriter(spool.path); writer.start()    # at load(), unless a sidecar runs `fraud audit writer`
    spool.append_payloads(decision_payloads(columns))   # before answering (column-wise;
                                                        # = spool.append(decision_records(columns)))
    writer.stop(); spool.close()                        # at stop()
"""

from fraud.audit.records import (
    DecisionRecord,
    ExplanationRecord,
    ScoredColumns,
    decision_payloads,
    decision_records,
    explanation_payloads,
    pseudonymise,
)
from fraud.audit.spool import AppendResult, AuditSpool, default_spool_path
from fraud.audit.store import audit_db_url, create_audit_engine, upgrade_database
from fraud.audit.writer import AuditWriter, WriterSettings

__all__ = [
    "AppendResult",
    "AuditSpool",
    "AuditWriter",
    "DecisionRecord",
    "ExplanationRecord",
    "ScoredColumns",
    "WriterSettings",
    "audit_db_url",
    "create_audit_engine",
    "decision_payloads",
    "decision_records",
    "default_spool_path",
    "explanation_payloads",
    "pseudonymise",
    "upgrade_database",
]
