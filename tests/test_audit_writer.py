"""The spool and the writer: durable bounded appends, draining, replay after a crash between
commit and delete, dead letters, a database that is not ready or goes down and comes back."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time

import pytest
from prometheus_client import REGISTRY

from fraud.audit.spool import AuditSpool
from fraud.audit.store import count_rows, create_audit_engine, insert_decisions, upgrade_database
from fraud.audit.writer import AuditWriter, WriterSettings
from fraud.config import PROJECT_ROOT
from tests.test_audit_support import make_decision, pg_database  # noqa: F401

FAST = WriterSettings(batch_size=50, poll_interval=0.02, backoff_initial=0.05, backoff_max=0.3, flush_timeout=5.0)


def _metric(name: str, labels: dict | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


def _wait_until(condition, timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s: {message}")
        time.sleep(0.02)


@pytest.fixture
def sqlite_engine(tmp_path):
    engine = create_audit_engine(f"sqlite:///{tmp_path / 'audit.db'}")
    upgrade_database(engine)
    yield engine
    engine.dispose()


def test_append_is_fifo_and_bounded_with_a_drop_counter(tmp_path):
    dropped_before = _metric("fraud_audit_spool_dropped_total")
    with AuditSpool(tmp_path / "spool.db", max_records=5) as spool:
        assert spool.append([make_decision(0)]).accepted == 1
        result = spool.append([make_decision(i) for i in range(1, 8)])
        assert (result.accepted, result.dropped) == (4, 3)
        assert spool.depth() == 5
        assert spool.append([make_decision(99)]).dropped == 1
        batch = spool.oldest(3)
        assert [p for p in batch.payloads] == [make_decision(i).to_payload() for i in range(3)]
        spool.remove(batch)
        assert spool.depth() == 2
        assert spool.append([make_decision(50), make_decision(51), make_decision(52)]).accepted == 3
    assert _metric("fraud_audit_spool_dropped_total") - dropped_before == 4
    assert _metric("fraud_audit_spool_backlog") == 5


def test_invalid_spool_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="synchronous"):
        AuditSpool(tmp_path / "s.db", synchronous="OFF")
    with pytest.raises(ValueError, match="max_records"):
        AuditSpool(tmp_path / "s.db", max_records=0)


def test_acknowledged_appends_survive_sigkill_of_the_appending_process(tmp_path):
    """A child acknowledges appends on stdout; we SIGKILL it mid-stream: every acknowledged
    decision must be in the spool afterwards."""
    spool_path = tmp_path / "spool.db"
    child = textwrap.dedent(
        f"""
        from fraud.audit.spool import AuditSpool
        from tests.test_audit_support import make_decision
        spool = AuditSpool({str(spool_path)!r})
        for i in range(100000):
            spool.append([make_decision(i)])
            print(i, flush=True)
        """
    )
    process = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True, cwd=PROJECT_ROOT)
    acknowledged = -1
    for line in process.stdout:
        acknowledged = int(line)
        if acknowledged >= 150:
            break
    process.kill()
    process.wait(10)
    with AuditSpool(spool_path) as spool:
        batch = spool.oldest(1_000_000)
    assert len(batch) >= acknowledged + 1
    assert batch.payloads[acknowledged] == make_decision(acknowledged).to_payload()


def test_writer_drains_in_batches_and_replays_idempotently(tmp_path, sqlite_engine):
    spool = AuditSpool(tmp_path / "spool.db")
    records = [make_decision(i) for i in range(120)]
    spool.append(records)
    # a previous writer committed the first 30 and died before deleting them from the spool
    with sqlite_engine.begin() as connection:
        insert_decisions(connection, [r.to_row() for r in records[:30]])
    written_before = _metric("fraud_audit_written_total")
    duplicates_before = _metric("fraud_audit_duplicates_skipped_total")
    writer = AuditWriter(spool.path, engine=sqlite_engine, settings=FAST)
    assert writer.drain_once() == 50
    assert writer.drain_all() == 70
    assert spool.depth() == 0
    assert count_rows(sqlite_engine, "decisions") == 120
    assert _metric("fraud_audit_written_total") - written_before == 90
    assert _metric("fraud_audit_duplicates_skipped_total") - duplicates_before == 30
    assert _metric("fraud_audit_write_batch_seconds_count") >= 3
    spool.close()


def test_undecodable_payloads_go_to_dead_letters_without_blocking_the_rest(tmp_path, sqlite_engine):
    spool = AuditSpool(tmp_path / "spool.db")
    spool.append([make_decision(1)])
    spool._conn.execute('INSERT INTO spool (enqueued_at, payload) VALUES (0, \'{"v": 1, "oops": true}\')')
    spool.append([make_decision(2)])
    writer = AuditWriter(spool.path, engine=sqlite_engine, settings=FAST)
    assert writer.drain_all() == 3
    assert count_rows(sqlite_engine, "decisions") == 2
    assert spool.dead_letter_count() == 1
    spool.close()


def test_rows_the_database_rejects_are_parked_and_never_logged_in_clear(tmp_path, sqlite_engine, caplog):
    from dataclasses import replace

    from sqlalchemy import text

    with sqlite_engine.begin() as connection:  # a rule the database enforces and the record does not know
        connection.execute(
            text(
                "CREATE TRIGGER reject_terminal BEFORE INSERT ON decisions WHEN NEW.terminal_id = 'T-blocked' "
                "BEGIN SELECT RAISE(ABORT, 'terminal blocked'); END"
            )
        )
    spool = AuditSpool(tmp_path / "spool.db")
    rejected = replace(make_decision(2, customer_id="C-SECRET-42"), terminal_id="T-blocked")
    spool.append([make_decision(1), rejected, make_decision(3)])
    dead_before = _metric("fraud_audit_dead_letters_total")
    writer = AuditWriter(spool.path, engine=sqlite_engine, settings=FAST)
    with caplog.at_level("ERROR", logger="fraud.audit.writer"):
        assert writer.drain_all() == 3
    assert count_rows(sqlite_engine, "decisions") == 2
    assert spool.dead_letter_count() == 1
    assert _metric("fraud_audit_dead_letters_total") - dead_before == 1
    assert "dead_letters" in caplog.text and "C-SECRET-42" not in caplog.text
    writer.close()
    spool.close()


def test_writer_thread_waits_for_the_schema_then_drains_and_flushes_on_stop(tmp_path):
    engine = create_audit_engine(f"sqlite:///{tmp_path / 'audit.db'}")  # not migrated yet
    spool = AuditSpool(tmp_path / "spool.db")
    spool.append([make_decision(i) for i in range(10)])
    retries_before = _metric("fraud_audit_write_retries_total", {"reason": "UserError"})
    writer = AuditWriter(spool.path, engine=engine, settings=FAST)
    writer.start()
    _wait_until(
        lambda: _metric("fraud_audit_write_retries_total", {"reason": "UserError"}) > retries_before,
        5,
        "writer never retried on a database without schema",
    )
    assert spool.depth() == 10
    upgrade_database(engine)
    _wait_until(lambda: spool.depth() == 0, 10, "writer did not drain after the migration")
    spool.append([make_decision(i) for i in range(10, 15)])
    writer.stop()
    assert count_rows(engine, "decisions") == 15
    spool.close()


def test_only_one_writer_drains_a_spool_at_a_time(tmp_path, sqlite_engine):
    spool = AuditSpool(tmp_path / "spool.db")
    spool.append([make_decision(i) for i in range(5)])
    active = AuditWriter(spool.path, engine=sqlite_engine, settings=FAST)
    standby = AuditWriter(spool.path, engine=sqlite_engine, settings=FAST)
    assert active._lock.try_acquire()
    assert not standby._lock.try_acquire()
    standby.start()
    time.sleep(0.3)
    assert spool.depth() == 5  # the standby waits
    active._lock.release()
    _wait_until(lambda: spool.depth() == 0, 10, "standby did not take over")
    standby.stop()
    assert count_rows(sqlite_engine, "decisions") == 5
    spool.close()


@pytest.mark.postgres
def test_writer_rides_out_a_postgres_outage(tmp_path, pg_database):  # noqa: F811
    engine = create_audit_engine(pg_database.url)
    upgrade_database(engine)
    spool = AuditSpool(tmp_path / "spool.db")
    writer = AuditWriter(spool.path, engine=engine, settings=FAST)
    writer.start()
    retries_before = _metric("fraud_audit_write_retries_total", {"reason": "database"})
    spool.append([make_decision(i) for i in range(100)])
    _wait_until(lambda: spool.depth() == 0, 10, "initial drain")
    with pg_database.outage():
        appended = threading.Thread(target=lambda: [spool.append([make_decision(i)]) for i in range(100, 300)])
        appended.start()
        appended.join()
        _wait_until(
            lambda: _metric("fraud_audit_write_retries_total", {"reason": "database"}) > retries_before,
            10,
            "writer never noticed the outage",
        )
        assert spool.depth() > 0  # decisions wait in the spool while the database is down
    _wait_until(lambda: spool.depth() == 0, 20, "writer did not drain after the database came back")
    writer.stop()
    with engine.connect() as connection:
        from sqlalchemy import text

        total, distinct = connection.execute(
            text("SELECT count(*), count(DISTINCT transaction_id) FROM decisions")
        ).one()
    assert (total, distinct) == (300, 300)
    engine.dispose()
    spool.close()
