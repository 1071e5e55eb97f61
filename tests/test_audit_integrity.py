"""Integrity of the audit trail on SQLite and PostgreSQL: rows the database refuses go to the dead
letters whatever the driver calls the error, a replayed transaction with other content is a
recorded conflict (never a silent drop), the hash chain and `fraud audit verify` catch every
changed, inserted or deleted row, the append-only triggers and the writer/reader roles hold, and
every decision records the thresholds that applied."""

from __future__ import annotations

import contextlib
import subprocess
import uuid
from dataclasses import replace
from datetime import datetime

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import bindparam, text
from sqlalchemy.exc import DBAPIError

from fraud.audit.chain import CHAIN_KEY_ENV, verify_decisions
from fraud.audit.records import DecisionRecord, ScoredColumns, decision_payloads, decision_records
from fraud.audit.roles import grant_roles
from fraud.audit.spool import AuditSpool
from fraud.audit.store import count_rows, create_audit_engine, find_decisions, insert_decisions, upgrade_database
from fraud.audit.writer import AuditWriter, WriterSettings
from fraud.bundle import DecisionThresholds
from fraud.errors import UserError
from tests.test_audit_support import FRAUD_CLI, PG_HOST, PG_PORT, make_decision, pg_database  # noqa: F401

FAST = WriterSettings(batch_size=50, poll_interval=0.02, backoff_initial=0.05, backoff_max=0.3, flush_timeout=5.0)
KEY = b"test-chain-key"


def _metric(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request, tmp_path):
    """(engine, kind) on a migrated database of each backend."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'audit.db'}"
    else:
        url = request.getfixturevalue("pg_database").url
    engine = create_audit_engine(url)
    upgrade_database(engine)
    yield engine, request.param
    engine.dispose()


def _drain(tmp_path, engine, records, *, key: bytes | None = KEY, name: str = "spool.db") -> AuditSpool:
    spool = AuditSpool(tmp_path / name)
    spool.append(records)
    writer = AuditWriter(spool.path, engine=engine, settings=replace(FAST, chain_key=key))
    writer.drain_all()
    return spool


@contextlib.contextmanager
def _tampering(engine, kind: str):
    """A connection of someone who bypasses the append-only triggers (a superuser / file owner)."""
    with engine.begin() as connection:
        if kind == "postgres":
            connection.execute(text("SET LOCAL session_replication_role = replica"))
        else:
            for trigger in ("decisions_no_update", "decisions_no_delete"):
                connection.execute(text(f"DROP TRIGGER {trigger}"))
        yield connection


# --- dead letters whatever the error class --------------------------------------------------


@pytest.mark.postgres
def test_rows_postgres_refuses_are_dead_lettered_whatever_the_driver_raises(tmp_path, pg_database):  # noqa: F811
    """A trigger's RAISE EXCEPTION (InternalError) and a NUL character (psycopg2's ValueError)
    park their row; the rest of the batch is written and the writer keeps draining."""
    engine = create_audit_engine(pg_database.url)
    upgrade_database(engine)
    with engine.begin() as connection:
        connection.execute(
            text(
                "CREATE FUNCTION refuse_blocked() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                "IF NEW.terminal_id = 'T-blocked' THEN RAISE EXCEPTION 'terminal blocked'; END IF; "
                "RETURN NEW; END $$"
            )
        )
        connection.execute(
            text(
                "CREATE TRIGGER refuse_blocked BEFORE INSERT ON decisions "
                "FOR EACH ROW EXECUTE FUNCTION refuse_blocked()"
            )
        )
    blocked = replace(make_decision(2), terminal_id="T-blocked")
    nul = replace(make_decision(3), transaction_id="TX-\x00-nul")
    records = [make_decision(1), blocked, nul, make_decision(4)]
    dead_before = _metric("fraud_audit_dead_letters_total")
    spool = _drain(tmp_path, engine, records)
    assert spool.depth() == 0
    assert spool.dead_letter_count() == 2
    errors = [row[0] for row in spool._conn.execute("SELECT error FROM dead_letters ORDER BY seq")]
    assert errors[0].startswith("InternalError") and "terminal blocked" in errors[0]
    assert errors[1].startswith("ValueError") and "NUL" in errors[1]
    assert _metric("fraud_audit_dead_letters_total") - dead_before == 2
    assert count_rows(engine, "decisions") == 2
    assert verify_decisions(engine, KEY).ok
    spool.close()
    engine.dispose()


@pytest.mark.postgres
def test_a_lost_connection_is_still_retried_not_dead_lettered(tmp_path, pg_database):  # noqa: F811
    engine = create_audit_engine(pg_database.url)
    upgrade_database(engine)
    spool = AuditSpool(tmp_path / "spool.db")
    spool.append([make_decision(i) for i in range(3)])
    writer = AuditWriter(spool.path, engine=engine, settings=FAST)
    writer.drain_once()  # schema checked, connection pooled
    spool.append([make_decision(i) for i in range(3, 6)])
    with pg_database.outage(), pytest.raises(DBAPIError):
        writer.drain_once()
    assert spool.depth() == 3 and spool.dead_letter_count() == 0
    engine.dispose()
    assert writer.drain_all() == 3
    assert count_rows(engine, "decisions") == 6
    spool.close()
    engine.dispose()


# --- replays: idempotent when equal, a conflict when not ------------------------------------


def test_a_replay_with_other_content_is_a_recorded_conflict(tmp_path, backend):
    engine, _ = backend
    first = make_decision(1, score=0.01, decision="approve")
    spool = _drain(tmp_path, engine, [first])
    conflicts_before = _metric("fraud_audit_conflicts_total")
    duplicates_before = _metric("fraud_audit_duplicates_skipped_total")
    same = replace(first, received_at=datetime(2026, 11, 2), latency_ms=9.0)  # the same decision delivered again
    other = replace(first, score=0.99, decision="decline", features={**first.features, "tx_amount": 99_999.0})
    spool.append([same, other])
    AuditWriter(spool.path, engine=engine, settings=replace(FAST, chain_key=KEY)).drain_all()
    assert _metric("fraud_audit_duplicates_skipped_total") - duplicates_before == 1
    assert _metric("fraud_audit_conflicts_total") - conflicts_before == 1
    [stored] = find_decisions(engine, first.transaction_id)
    assert stored["score"] == 0.01 and stored["decision"] == "approve"  # nothing overwritten
    [(payload, error)] = spool._conn.execute("SELECT payload, error FROM dead_letters").fetchall()
    assert DecisionRecord.from_payload(payload) == other
    assert error.startswith("conflict:") and "score" in error and "features" in error
    assert verify_decisions(engine, KEY).ok
    spool.close()


# --- the hash chain -------------------------------------------------------------------------


def _chained(tmp_path, engine) -> list[DecisionRecord]:
    records = [make_decision(i) for i in range(12)]
    spool = _drain(tmp_path, engine, records[:7])
    spool.close()
    spool = _drain(tmp_path, engine, records[7:], name="other-spool.db")  # a second writer: a second chain
    spool.close()
    report = verify_decisions(engine, KEY)
    assert report.ok, report.problems
    assert (report.rows, report.chains) == (12, 2)
    return records


def _tamper_change(connection, records):
    connection.execute(
        text("UPDATE decisions SET score = 0.001 WHERE transaction_id = :t"), {"t": records[3].transaction_id}
    )


def _tamper_delete_middle(connection, records):
    connection.execute(text("DELETE FROM decisions WHERE transaction_id = :t"), {"t": records[3].transaction_id})


def _tamper_delete_tail(connection, records):
    connection.execute(text("DELETE FROM decisions WHERE transaction_id = :t"), {"t": records[6].transaction_id})


def _tamper_insert_unchained(connection, records):
    insert_decisions(connection, [make_decision(500).to_row()])


def _tamper_insert_linked(connection, records):
    """A forged row appended to a chain with a correct link, but without the key."""
    from fraud.audit.chain import row_hash

    head = connection.execute(
        text("SELECT chain_id, chain_seq, row_hash FROM decisions WHERE transaction_id = :t"),
        {"t": records[6].transaction_id},
    ).one()
    row = make_decision(501).to_row() | {"chain_id": head[0], "chain_seq": head[1] + 1}
    row["row_hash"] = row_hash(head[2], row, None)
    insert_decisions(connection, [row])


def _tamper_delete_chain(connection, records):
    connection.execute(
        text("DELETE FROM decisions WHERE transaction_id IN :t").bindparams(bindparam("t", expanding=True)),
        {"t": [r.transaction_id for r in records[7:]]},
    )


@pytest.mark.parametrize(
    ("tamper", "expected"),
    [
        (_tamper_change, "does not match its hash"),
        (_tamper_delete_middle, "missing (deleted)"),
        (_tamper_delete_tail, "rows deleted"),
        (_tamper_insert_unchained, "no hash chain"),
        (_tamper_insert_linked, "does not match its hash"),
        (_tamper_delete_chain, "has no rows (deleted)"),
    ],
    ids=["changed", "deleted", "deleted-newest", "inserted", "inserted-forged-link", "deleted-chain"],
)
def test_verify_detects_every_changed_inserted_or_deleted_row(tmp_path, backend, tamper, expected):
    engine, kind = backend
    records = _chained(tmp_path, engine)
    with _tampering(engine, kind) as connection:
        tamper(connection, records)
    report = verify_decisions(engine, KEY)
    assert not report.ok
    assert any(expected in problem for problem in report.problems), report.problems


def test_verify_needs_the_writers_key(tmp_path, backend):
    engine, _ = backend
    _chained(tmp_path, engine)
    assert not verify_decisions(engine, b"another key").ok
    assert not verify_decisions(engine, None).ok


def test_fraud_audit_verify_exits_1_naming_the_changed_row(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    engine = create_audit_engine(url)
    upgrade_database(engine)
    records = _chained(tmp_path, engine)
    env = {"PATH": "/usr/bin:/bin", "FRAUD_DATA_DIR": str(tmp_path / "data"), CHAIN_KEY_ENV: KEY.decode()}
    ok = subprocess.run(
        [FRAUD_CLI, "audit", "verify", "--db-url", url], check=False, capture_output=True, text=True, env=env
    )
    assert ok.returncode == 0, ok.stderr
    assert "intact: 12 decisions in 2 chains" in ok.stdout
    with _tampering(engine, "sqlite") as connection:
        _tamper_change(connection, records)
    bad = subprocess.run(
        [FRAUD_CLI, "audit", "verify", "--db-url", url], check=False, capture_output=True, text=True, env=env
    )
    assert bad.returncode == 1
    assert records[3].transaction_id in bad.stderr and "FAILED verification" in bad.stderr
    assert "Traceback" not in bad.stderr
    engine.dispose()


def test_rows_from_before_the_chain_are_covered_by_the_migrations_digest(tmp_path, backend):
    engine, kind = backend
    # a database that ran the audit trail before chaining existed
    fresh = tmp_path / "old.db"
    if kind == "sqlite":
        engine = create_audit_engine(f"sqlite:///{fresh}")
    else:
        with engine.begin() as connection:
            connection.execute(
                text(
                    "DROP TABLE decisions, explanations, labels, live_quality, audit_checkpoints, "
                    "fraud_audit_alembic_version"
                )
            )
            connection.execute(text("DROP FUNCTION fraud_audit_append_only()"))
    upgrade_database(engine, "0002_labels_live_quality")
    old = [make_decision(i) for i in range(5)]
    with engine.begin() as connection:
        legacy_rows = [{k: v for k, v in r.to_row().items() if not k.endswith("_threshold")} for r in old]
        insert_decisions(connection, legacy_rows)
    upgrade_database(engine)
    spool = _drain(tmp_path, engine, [make_decision(10)])
    spool.close()
    assert verify_decisions(engine, KEY).ok
    with _tampering(engine, kind) as connection:
        _tamper_change(connection, old)
    report = verify_decisions(engine, KEY)
    assert any("rows without a hash chain changed" in p for p in report.problems), report.problems


def test_decisions_are_append_only_even_for_the_owner(tmp_path, backend):
    engine, _ = backend
    records = _chained(tmp_path, engine)
    for statement in ("UPDATE decisions SET score = 0", "DELETE FROM decisions", "DELETE FROM audit_checkpoints"):
        with pytest.raises(DBAPIError, match="append-only"), engine.begin() as connection:
            connection.execute(text(statement))
    assert count_rows(engine, "decisions") == len(records)


# --- roles ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _roles(pg_database):  # noqa: F811
    suffix = uuid.uuid4().hex[:8]
    writer, reader = f"fraud_writer_{suffix}", f"fraud_reader_{suffix}"
    for role in (writer, reader):
        pg_database.execute_admin(f"CREATE ROLE {role} LOGIN")
    try:
        yield writer, reader
    finally:
        pg_database.drop_roles(writer, reader)


def _url_as(pg_database, role: str) -> str:  # noqa: F811
    return f"postgresql+psycopg2://{role}@{PG_HOST}:{PG_PORT}/{pg_database.name}"


@pytest.mark.postgres
def test_the_writer_role_may_only_insert_and_the_reader_only_read_decisions(tmp_path, pg_database):  # noqa: F811
    owner = create_audit_engine(pg_database.url)
    upgrade_database(owner)
    with _roles(pg_database) as (writer_role, reader_role):
        grant_roles(owner, writer_role, reader_role)
        writer_engine = create_audit_engine(_url_as(pg_database, writer_role))
        spool = _drain(tmp_path, writer_engine, [make_decision(i) for i in range(5)])
        assert spool.dead_letter_count() == 0 and count_rows(owner, "decisions") == 5
        for statement in (
            "UPDATE decisions SET score = 0",
            "DELETE FROM decisions",
            "TRUNCATE decisions",
            "UPDATE audit_checkpoints SET row_hash = 'x'",
            "INSERT INTO labels VALUES ('TX', 1, now(), now(), 'forged')",
        ):
            with pytest.raises(DBAPIError, match="permission denied"), writer_engine.begin() as connection:
                connection.execute(text(statement))
        reader_engine = create_audit_engine(_url_as(pg_database, reader_role))
        with reader_engine.begin() as connection:
            assert connection.execute(text("SELECT count(*) FROM decisions")).scalar_one() == 5
            connection.execute(text("INSERT INTO labels VALUES ('TX0000000001', 1, now(), now(), 'chargebacks')"))
            connection.execute(text("UPDATE labels SET label = 0 WHERE transaction_id = 'TX0000000001'"))
        for statement in ("INSERT INTO decisions (transaction_id) VALUES ('x')", "DELETE FROM decisions"):
            with pytest.raises(DBAPIError, match="permission denied"), reader_engine.begin() as connection:
                connection.execute(text(statement))
        assert verify_decisions(reader_engine, KEY).ok  # the reader can verify
        with pytest.raises(UserError, match="does not exist"):
            grant_roles(owner, "no_such_role_xyz", reader_role)
        spool.close()
        writer_engine.dispose()
        reader_engine.dispose()
    owner.dispose()


def test_roles_are_refused_on_sqlite(tmp_path):
    engine = create_audit_engine(f"sqlite:///{tmp_path / 'a.db'}")
    upgrade_database(engine)
    with pytest.raises(UserError, match="PostgreSQL only"):
        grant_roles(engine, "w", "r")


# --- thresholds -----------------------------------------------------------------------------


def test_every_decision_records_the_thresholds_that_applied(tmp_path, backend):
    engine, _ = backend
    thresholds = DecisionThresholds(review=0.31, decline=0.87)
    batch = {
        "customer_ids": ["C1", "C2"],
        "terminal_ids": ["T1", "T2"],
        "feature_names": ["tx_amount"],
        "feature_matrix": [[1.0], [2.0]],
        "scores": [0.5, 0.9],
        "decisions": ["review", "decline"],
        "reason_codes": [[], []],
        "features_missing": [False, False],
        "features_stale": [False, False],
        "fail_open": False,
        "model_name": "fraud-detector",
        "model_version": "9",
        "variant": "canary",
        "received_at": datetime(2026, 12, 1),
        "latency_ms": 1.0,
        "thresholds": thresholds,
    }
    payloads = decision_payloads(ScoredColumns(transaction_ids=["TXA", "TXB"], **batch))
    assert payloads == [
        r.to_payload() for r in decision_records(ScoredColumns(transaction_ids=["TXA", "TXB"], **batch))
    ]
    spool = AuditSpool(tmp_path / "spool.db")
    spool.append_payloads(payloads)
    AuditWriter(spool.path, engine=engine, settings=FAST).drain_all()
    stored = find_decisions(engine, "TXA")[0]
    assert (stored["review_threshold"], stored["decline_threshold"], stored["variant"]) == (0.31, 0.87, "canary")
    spool.close()
