"""Explanations in the audit trail: spooled beside the decisions, written by the same writer into
the append-only `explanations` table, never into `decisions`; the decisions' hash chain still
verifies; a replayed explanation is written once. On SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest
from sqlalchemy import text

from fraud.audit.chain import verify_decisions
from fraud.audit.records import DecisionRecord, ExplanationRecord, explanation_payloads, is_explanation_payload
from fraud.audit.spool import AuditSpool
from fraud.audit.store import count_rows, create_audit_engine, upgrade_database
from fraud.audit.writer import AuditWriter, WriterSettings
from tests.test_audit_support import make_decision, pg_database  # noqa: F401 - the PostgreSQL fixture

FAST = WriterSettings(batch_size=50, poll_interval=0.02, backoff_initial=0.05, backoff_max=0.3, flush_timeout=5.0)
NAMES = ["amount", "night", "count_7d"]


def explanations(n: int, prefix: str = "EXP") -> list[str]:
    contributions = np.arange(n * (len(NAMES) + 1), dtype=np.float64).reshape(n, -1) / 10.0
    return explanation_payloads(
        transaction_ids=[f"{prefix}{i:04d}" for i in range(n)],
        customer_ids=[f"C{i:07d}" for i in range(n)],
        terminal_ids=["T0000001"] * n,
        feature_names=NAMES,
        contributions=contributions,
        scores=[0.5] * n,
        decisions=["review"] * n,
        features_missing=[False] * n,
        features_stale=[False] * n,
        fail_open=False,
        model_name="fraud-detector",
        model_version="7",
        variant="stable",
        received_at=datetime(2026, 3, 1, tzinfo=UTC),
    )


def test_explanation_payloads_round_trip_and_are_told_apart_from_decisions():
    payloads = explanations(2)
    assert all(is_explanation_payload(p) for p in payloads)
    assert not is_explanation_payload(make_decision(0).to_payload())
    record = ExplanationRecord.from_payload(payloads[1])
    assert record.transaction_id == "EXP0001"
    assert record.contributions == {"amount": 0.4, "night": 0.5, "count_7d": 0.6}
    assert record.bias == pytest.approx(0.7)
    assert ExplanationRecord.from_payload(record.to_payload()) == record
    with pytest.raises(ValueError, match="not a decision record"):
        DecisionRecord.from_payload(payloads[0])
    with pytest.raises(ValueError, match="not an explanation"):
        ExplanationRecord.from_payload(make_decision(0).to_payload())
    with pytest.raises(ValueError, match=r"contributions must be \[n, 4\]"):
        explanation_payloads(
            **{
                **dict(
                    transaction_ids=["A1"],
                    customer_ids=["C1"],
                    terminal_ids=["T1"],
                    feature_names=NAMES,
                    scores=[0.1],
                    decisions=["approve"],
                    features_missing=[False],
                    features_stale=[False],
                    fail_open=False,
                    model_name="m",
                    model_version="1",
                    variant="stable",
                    received_at=datetime(2026, 3, 1),
                ),
                "contributions": np.zeros((1, 3)),
            }
        )


def _drain_and_check(engine, tmp_path) -> None:
    spool = AuditSpool(tmp_path / "spool.db")
    decisions = [make_decision(i) for i in range(5)]
    given = explanations(3)
    spool.append_payloads([*given[:2], *(d.to_payload() for d in decisions), given[2]])
    spool.append_payloads(given[:1])  # a replayed explanation (crash between commit and delete)
    writer = AuditWriter(spool.path, engine=engine, settings=FAST)
    writer.drain_all()
    assert spool.depth() == 0 and spool.dead_letter_count() == 0
    assert count_rows(engine, "decisions") == 5
    assert count_rows(engine, "explanations") == 3
    with engine.connect() as connection:
        ids = {row[0] for row in connection.execute(text("SELECT transaction_id FROM explanations"))}
        assert ids == {"EXP0000", "EXP0001", "EXP0002"}
        decided = {row[0] for row in connection.execute(text("SELECT transaction_id FROM decisions"))}
        assert not decided & ids  # an explanation is not a decision
    assert verify_decisions(engine, key=None).ok
    with pytest.raises(Exception, match="append-only"), engine.begin() as connection:
        connection.execute(text("UPDATE explanations SET bias = 0"))
    spool.close()


def test_the_writer_puts_explanations_in_their_own_table_sqlite(tmp_path):
    engine = create_audit_engine(f"sqlite:///{tmp_path / 'audit.db'}")
    upgrade_database(engine)
    try:
        _drain_and_check(engine, tmp_path)
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_the_writer_puts_explanations_in_their_own_table_postgres(tmp_path, pg_database):  # noqa: F811 - fixture
    engine = create_audit_engine(pg_database.url)
    upgrade_database(engine)
    try:
        _drain_and_check(engine, tmp_path)
    finally:
        engine.dispose()
