"""The audit data layer on SQLite and PostgreSQL: migrations from empty, idempotent inserts,
round trips, and the decision record / pseudonym helpers."""

from __future__ import annotations

import json
import math
import re
from datetime import UTC, datetime

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from fraud.audit.records import DecisionRecord, ScoredColumns, decision_payloads, decision_records, pseudonymise
from fraud.audit.store import (
    ALEMBIC_VERSION_TABLE,
    audit_db_url,
    count_rows,
    create_audit_engine,
    current_revision,
    find_decisions,
    head_revision,
    insert_decisions,
    iter_decisions,
    require_schema,
    table_names,
    upgrade_database,
)
from fraud.audit.tables import AuditBase
from fraud.errors import UserError
from tests.test_audit_support import make_decision, pg_database  # noqa: F401

AUDIT_TABLES = {"decisions", "labels", "live_quality", ALEMBIC_VERSION_TABLE}


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def engine(request, tmp_path, monkeypatch):
    """A migrated-from-empty engine on each backend, migrated from an unrelated working directory."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'nested' / 'audit.db'}"
    else:
        url = request.getfixturevalue("pg_database").url
    engine = create_audit_engine(url)
    assert current_revision(engine) is None
    with pytest.raises(UserError, match="fraud audit migrate"):
        require_schema(engine)
    monkeypatch.chdir(tmp_path)  # migrations must not depend on the working directory
    assert upgrade_database(engine) == head_revision()
    yield engine
    engine.dispose()


def test_migrations_create_the_schema_the_models_describe(engine):
    assert table_names(engine) >= AUDIT_TABLES
    require_schema(engine)
    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"compare_type": True, "version_table": ALEMBIC_VERSION_TABLE}
        )
        differences = compare_metadata(context, AuditBase.metadata)
    assert differences == []
    # a second upgrade is a no-op
    assert upgrade_database(engine) == head_revision()


def test_insert_is_idempotent_per_transaction_and_model_version(engine):
    records = [make_decision(i) for i in range(3)]
    with engine.begin() as connection:
        assert insert_decisions(connection, [r.to_row() for r in records]) == 3
    retried = [*records, make_decision(3), make_decision(0, model_version="8", variant="canary")]
    with engine.begin() as connection:
        assert insert_decisions(connection, [r.to_row() for r in retried]) == 2
    assert count_rows(engine, "decisions") == 5
    assert {d["model_version"] for d in find_decisions(engine, records[0].transaction_id)} == {"7", "8"}


def test_decision_round_trip_keeps_every_field(engine):
    record = make_decision(5, score=0.875, decision="decline")
    with engine.begin() as connection:
        insert_decisions(connection, [record.to_row()])
    [stored] = find_decisions(engine, record.transaction_id)
    assert stored == record.to_row() | {"chain_id": None, "chain_seq": None, "row_hash": None}
    assert stored["features"]["terminal_risk_7d"] is None  # NaN is stored as null
    assert stored["features_missing"] is True and stored["fail_open"] is False
    assert find_decisions(engine, "TX-unknown") == []


def test_sqlite_bulk_insert_stores_what_sqlalchemy_would(tmp_path):
    """On SQLite `insert_decisions` binds through sqlite3's executemany: the stored column text must
    be exactly what SQLAlchemy's own statement stores, and a constraint violation must still raise
    IntegrityError (the writer's dead-letter path)."""
    from sqlalchemy.exc import IntegrityError

    from fraud.audit.store import dialect_insert
    from fraud.audit.tables import Decision

    engine = create_audit_engine(f"sqlite:///{tmp_path / 'audit.db'}")
    upgrade_database(engine)
    bulk = [make_decision(i, score=0.1 * i, decision="review").to_row() for i in range(5)]
    reference = [dict(row, model_version="sqlalchemy") for row in bulk]
    table = Decision.__table__
    with engine.begin() as connection:
        assert insert_decisions(connection, bulk) == 5
        assert insert_decisions(connection, bulk[:2]) == 0  # duplicates are skipped and not counted
        connection.execute(dialect_insert(connection, table), reference)
    with engine.connect() as connection:
        stored = connection.exec_driver_sql("SELECT * FROM decisions ORDER BY transaction_id, model_version").fetchall()
    by_version = {}
    for row in stored:
        by_version.setdefault(row[1], []).append(tuple(row[:1]) + tuple(row[2:]))
    assert by_version["7"] == by_version["sqlalchemy"] and len(by_version["7"]) == 5
    broken = dict(bulk[0], transaction_id="TX-broken", decision=None)  # violates NOT NULL
    with pytest.raises(IntegrityError), engine.begin() as connection:
        insert_decisions(connection, [bulk[1] | {"transaction_id": "TX-ok"}, broken])
    assert count_rows(engine, "decisions") == 10  # the failed batch left nothing behind
    engine.dispose()


def test_iter_decisions_selects_a_half_open_time_range_in_order(engine):
    records = [make_decision(i) for i in range(10)]
    with engine.begin() as connection:
        insert_decisions(connection, [r.to_row() for r in reversed(records)])
    chunks = list(iter_decisions(engine, records[2].received_at, records[7].received_at, chunk_size=2))
    assert [len(c) for c in chunks] == [2, 2, 1]
    assert [row["transaction_id"] for chunk in chunks for row in chunk] == [r.transaction_id for r in records[2:7]]


def test_default_url_is_the_embedded_sqlite_file_under_the_data_dir(data_dir, monkeypatch):
    monkeypatch.delenv("FRAUD_AUDIT_DB_URL", raising=False)
    assert audit_db_url() == f"sqlite:///{data_dir.resolve() / 'audit' / 'audit.db'}"
    monkeypatch.setenv("FRAUD_AUDIT_DB_URL", "postgresql://u@db:5432/audit")
    assert audit_db_url() == "postgresql://u@db:5432/audit"
    assert audit_db_url("sqlite:///x.db") == "sqlite:///x.db"


def test_unsupported_or_malformed_urls_are_user_errors():
    with pytest.raises(UserError, match="backend must be one of"):
        create_audit_engine("mysql://u@h/db")
    with pytest.raises(UserError, match="invalid"):
        create_audit_engine("not a url")


def test_record_validation_and_payload_round_trip():
    record = make_decision(1)
    again = DecisionRecord.from_payload(record.to_payload())
    assert again == DecisionRecord.from_payload(again.to_payload())
    assert again.to_row() == record.to_row()
    assert "NaN" not in record.to_payload()
    aware = DecisionRecord(**{**_fields(record), "received_at": datetime(2026, 1, 1, 13, tzinfo=UTC)})
    assert aware.received_at == datetime(2026, 1, 1, 13)
    for change, message in [
        ({"decision": "maybe"}, "decision"),
        ({"variant": "shadow"}, "variant"),
        ({"score": 1.5}, "score"),
        ({"transaction_id": ""}, "transaction_id"),
        ({"customer_id": "C" * 65}, "customer_id"),
    ]:
        with pytest.raises(ValueError, match=message):
            DecisionRecord(**{**_fields(record), **change})
    with pytest.raises(ValueError, match="version"):
        DecisionRecord.from_payload(json.dumps({"transaction_id": "x"}))
    with pytest.raises(ValueError, match="not JSON"):
        DecisionRecord.from_payload("{broken")


def test_pseudonyms_are_keyed_stable_and_never_the_clear_id(monkeypatch):
    monkeypatch.setenv("FRAUD_PSEUDONYM_KEY", "key-one")
    first = pseudonymise("C0000042")
    assert first == pseudonymise("C0000042") and first != pseudonymise("C0000043")
    assert "C0000042" not in first
    monkeypatch.setenv("FRAUD_PSEUDONYM_KEY", "key-two")
    assert pseudonymise("C0000042") != first
    fields = make_decision(42, customer_id="C0000042").log_fields()
    assert fields["customer"] == pseudonymise("C0000042")
    assert "C0000042" not in json.dumps(fields)
    assert not math.isnan(fields["score"])


def _fields(record: DecisionRecord) -> dict:
    return {name: getattr(record, name) for name in DecisionRecord.__dataclass_fields__}


def test_decision_records_of_a_scored_batch():
    import numpy as np

    matrix = np.array([[1.0, np.nan], [3.0, 4.0]])
    common = {
        "customer_ids": ["C1", "C2"],
        "terminal_ids": ["T1", "T2"],
        "feature_names": ["tx_amount", "terminal_risk_7d"],
        "feature_matrix": matrix,
        "scores": np.array([0.1, 0.9]),
        "decisions": ["approve", "decline"],
        "reason_codes": [[], [{"feature": "tx_amount", "contribution": 1.2}]],
        "features_missing": np.array([True, False]),
        "features_stale": np.array([False, True]),
        "fail_open": True,
        "model_name": "fraud-detector",
        "model_version": "3",
        "variant": "canary",
        "received_at": datetime(2026, 11, 1, 8),
        "latency_ms": 2.0,
    }
    first, second = decision_records(ScoredColumns(transaction_ids=["TX1", "TX2"], **common))
    assert first.features == {"tx_amount": 1.0, "terminal_risk_7d": None}
    assert (first.features_missing, first.features_stale, first.fail_open) == (True, False, True)
    assert (second.decision, second.score, second.customer_id, second.variant) == ("decline", 0.9, "C2", "canary")
    assert isinstance(second.features_stale, bool)
    with pytest.raises(ValueError, match="one entry per transaction"):
        decision_records(ScoredColumns(transaction_ids=["TX1"], **common))


def _scored_batch(n: int, seed: int = 0) -> dict:
    import numpy as np

    from fraud.features.definitions import MODEL_FEATURES
    from predictor.codec import ReasonCode

    rng = np.random.default_rng(seed)
    matrix = rng.normal(size=(n, len(MODEL_FEATURES))) * 1e3
    if n >= 4:
        matrix[1, 2], matrix[2, 0], matrix[3, 5] = np.nan, np.inf, -np.inf
    decisions = rng.choice(["approve", "review", "decline"], size=n).tolist()
    return {
        "transaction_ids": [f"TX{i:08d}" for i in range(n)],
        "customer_ids": [f"C{i % 7:07d}" for i in range(n)],
        "terminal_ids": ["T\u00e9" + "x" * (i % 60) for i in range(n)],
        "feature_names": MODEL_FEATURES,
        "feature_matrix": matrix,
        "scores": np.concatenate([[0.0, 1.0], rng.random(n - 2)]),
        "decisions": decisions,
        "reason_codes": [
            [ReasonCode("tx_amount", "Transaction amount", 0.5)] if d != "approve" else [] for d in decisions
        ],
        "features_missing": rng.random(n) < 0.3,
        "features_stale": rng.random(n) < 0.3,
        "fail_open": True,
        "model_name": "fraud-detector",
        "model_version": "12",
        "variant": "canary",
        "received_at": datetime(2026, 11, 1, 8, 30, 1, 123456, tzinfo=UTC),
        "latency_ms": 3.25,
    }


def test_decision_payloads_equal_the_records_payloads_byte_for_byte():
    batch = _scored_batch(50)
    expected = [record.to_payload() for record in decision_records(ScoredColumns(**batch))]
    assert decision_payloads(ScoredColumns(**batch)) == expected
    decoded = DecisionRecord.from_payload(expected[1])
    assert decoded.features[batch["feature_names"][2]] is None and decoded.variant == "canary"


@pytest.mark.parametrize(
    "change",
    [
        {"transaction_ids": ["TX1", "", "TX3"]},
        {"customer_ids": ["C1", "C2", "C" * 65]},
        {"model_version": ""},
        {"variant": "blue"},
        {"decisions": ["approve", "maybe", "decline"]},
        {"scores": [0.1, 1.5, 0.2]},
        {"scores": [0.1, float("nan"), 0.2]},
        {"received_at": "2026-11-01"},
        {"reason_codes": [[], []]},
    ],
    ids=["empty-id", "long-id", "empty-version", "variant", "decision", "score", "nan-score", "received-at", "length"],
)
def test_decision_payloads_refuse_what_decision_records_refuse(change: dict):
    batch = {**_scored_batch(3), **change}
    with pytest.raises((ValueError, TypeError)) as expected:
        decision_records(ScoredColumns(**batch))
    with pytest.raises(type(expected.value), match=re.escape(str(expected.value))):
        decision_payloads(ScoredColumns(**batch))
