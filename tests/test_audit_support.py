"""Shared helpers of the audit and label tests (no tests here): decision factories and a fresh
PostgreSQL database per test, dropped afterwards, plus a real outage of that database."""

from __future__ import annotations

import contextlib
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from fraud.audit.records import DecisionRecord

#: The real console script of the environment running the tests.
FRAUD_CLI = Path(sys.executable).with_name("fraud")
PG_HOST = "127.0.0.1"
PG_PORT = 5432
PG_ADMIN_DB = "test"
PG_USER = "postgres"


def make_decision(
    index: int,
    *,
    model_version: str = "7",
    received_at: datetime | None = None,
    score: float = 0.25,
    decision: str = "approve",
    customer_id: str | None = None,
    variant: str = "stable",
) -> DecisionRecord:
    """A realistic decision record; `index` makes the transaction id unique."""
    return DecisionRecord(
        transaction_id=f"TX{index:010d}",
        received_at=received_at or datetime(2026, 11, 1, 12, 0, 0) + timedelta(seconds=index),
        model_name="fraud-detector",
        model_version=model_version,
        variant=variant,
        features={"tx_amount": 10.0 + index, "customer_nb_tx_1d": 2.0, "terminal_risk_7d": float("nan")},
        score=score,
        decision=decision,
        reason_codes=[{"feature": "tx_amount", "contribution": 0.42, "text": "transaction amount"}],
        customer_id=customer_id or f"C{index % 97:07d}",
        terminal_id=f"T{index % 13:07d}",
        latency_ms=3.5,
        features_missing=index % 5 == 0,
        features_stale=index % 7 == 0,
        fail_open=False,
    )


def scrape(port: int, metric_line_prefix: str, timeout: float = 60.0) -> float:
    """GET /metrics on loopback until a sample line with this prefix appears; returns its value."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            body = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2.0).text
            for line in body.splitlines():
                if line.startswith(metric_line_prefix):
                    return float(line.rsplit(" ", 1)[1])
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"no {metric_line_prefix!r} on :{port}/metrics after {timeout}s")
        time.sleep(0.2)


def _admin_connection():
    psycopg2 = pytest.importorskip("psycopg2")
    try:
        connection = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname=PG_ADMIN_DB, connect_timeout=5)
    except psycopg2.OperationalError as exc:
        pytest.skip(f"PostgreSQL not reachable on {PG_HOST}:{PG_PORT}: {exc}")
    connection.autocommit = True
    return connection


@dataclass(frozen=True)
class PgDatabase:
    name: str

    @property
    def url(self) -> str:
        return f"postgresql+psycopg2://{PG_USER}@{PG_HOST}:{PG_PORT}/{self.name}"

    def execute_admin(self, sql: str, *params) -> list[tuple]:
        with contextlib.closing(_admin_connection()) as admin, admin.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchall() if cursor.description else []

    def drop_roles(self, *roles: str) -> None:
        """Drop login roles a test created, after removing their grants in this database."""
        psycopg2 = pytest.importorskip("psycopg2")
        self.terminate_backends()
        connection = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname=self.name, connect_timeout=5)
        connection.autocommit = True
        with contextlib.closing(connection), connection.cursor() as cursor:
            for role in roles:
                cursor.execute(f"DROP OWNED BY {role}")
        for role in roles:
            self.execute_admin(f"DROP ROLE IF EXISTS {role}")

    def terminate_backends(self) -> int:
        rows = self.execute_admin(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            self.name,
        )
        return len(rows)

    @contextlib.contextmanager
    def outage(self) -> Iterator[None]:
        """The database refuses connections and every open session is killed, until the block ends."""
        self.execute_admin(f'ALTER DATABASE "{self.name}" ALLOW_CONNECTIONS false')
        try:
            self.terminate_backends()
            yield
        finally:
            self.execute_admin(f'ALTER DATABASE "{self.name}" ALLOW_CONNECTIONS true')


@pytest.fixture
def pg_database() -> Iterator[PgDatabase]:
    """A brand-new PostgreSQL database for one test, dropped afterwards."""
    database = PgDatabase(f"fraud_audit_test_{uuid.uuid4().hex[:12]}")
    database.execute_admin(f'CREATE DATABASE "{database.name}"')
    try:
        yield database
    finally:
        database.execute_admin(f'ALTER DATABASE "{database.name}" ALLOW_CONNECTIONS true')
        database.execute_admin(f'DROP DATABASE IF EXISTS "{database.name}" WITH (FORCE)')
