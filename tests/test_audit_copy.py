"""The audit writer's PostgreSQL COPY path (fraud.audit.store._copy_decisions_postgresql), on a real
PostgreSQL: it stores exactly what the INSERT it replaces stores, and a refused row surfaces as the
error class the writer sorts by (row error vs database down)."""

from __future__ import annotations

import pytest
from sqlalchemy import select
from sqlalchemy.exc import DataError, IntegrityError

from fraud.audit.store import create_audit_engine, insert_decisions, upgrade_database
from fraud.audit.tables import Decision
from fraud.audit.writer import is_retryable
from tests.test_audit_support import make_decision, pg_database  # noqa: F401

pytestmark = pytest.mark.postgres

AWKWARD = "tab\there, newline\nand CR\r, back\\slash \\N 'single' \"double\" é ✓ 𝄞"


def rows(count: int = 40) -> list[dict]:
    out = []
    for i in range(count):
        record = make_decision(i, score=0.1 + i / 100, decision="review" if i % 3 else "approve")
        row = record.to_row()
        row["reason_codes"] = [{"feature": "tx_amount", "contribution": 0.1 * i, "text": AWKWARD}]
        row["features"] = {**row["features"], "note_value": 1e-300 if i % 2 else 123456789.123456789}
        if i % 4 == 0:
            row["review_threshold"] = row["decline_threshold"] = None
        out.append(row)
    return out


def stored(engine) -> list[dict]:
    with engine.connect() as connection:
        return [dict(r._mapping) for r in connection.execute(select(Decision.__table__).order_by("transaction_id"))]


@pytest.fixture
def engines(tmp_path_factory, request):
    made = []
    for _ in range(2):
        database = request.getfixturevalue("pg_database") if not made else _second_database(request)
        engine = create_audit_engine(database.url)
        upgrade_database(engine)
        made.append(engine)
    yield made
    for engine in made:
        engine.dispose()


def _second_database(request):
    import uuid

    from tests.test_audit_support import PgDatabase

    database = PgDatabase(f"fraud_audit_test_{uuid.uuid4().hex[:12]}")
    database.execute_admin(f'CREATE DATABASE "{database.name}"')

    def drop() -> None:
        database.execute_admin(f'DROP DATABASE IF EXISTS "{database.name}" WITH (FORCE)')

    request.addfinalizer(drop)
    return database


def test_copy_stores_what_the_insert_stores(engines) -> None:
    copy_engine, insert_engine = engines
    data = rows()
    with copy_engine.begin() as connection:
        assert insert_decisions(connection, data, skip_existing=False) == len(data)
    with insert_engine.begin() as connection:
        connection.execute(Decision.__table__.insert(), data)  # the statement COPY replaces
    copied, inserted = stored(copy_engine), stored(insert_engine)
    assert len(copied) == len(data)
    assert copied == inserted
    assert copied[1]["reason_codes"][0]["text"] == AWKWARD
    assert copied[0]["review_threshold"] is None


def test_copy_is_part_of_the_transaction_and_a_refused_row_is_a_row_error(engines) -> None:
    engine = engines[0]
    data = rows(5)
    data[3] = {**data[3], "model_name": "m" * 500}  # longer than the column: the database refuses it
    with pytest.raises(DataError) as raised, engine.begin() as connection:
        insert_decisions(connection, data, skip_existing=False)
    assert not is_retryable(raised.value)
    assert stored(engine) == []  # nothing of the failed COPY was committed
    good = rows(5)
    with engine.begin() as connection:
        insert_decisions(connection, good, skip_existing=False)
    with pytest.raises(IntegrityError), engine.begin() as connection:  # a key recorded already
        insert_decisions(connection, good[:1], skip_existing=False)
    # the connection that failed went back to the pool usable
    with engine.begin() as connection:
        insert_decisions(connection, rows(8)[5:], skip_existing=False)
    assert len(stored(engine)) == 8
