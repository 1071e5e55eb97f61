"""Fault injection under load: a producer acknowledges thousands of decisions through the spool
while the writer process is SIGKILLed and restarted, the PostgreSQL database goes away (all its
backends terminated, connections refused for a while) and comes back, and (FRAUD_TEST_PG_RESTART=1,
as in CI) the PostgreSQL server itself is restarted. Afterwards every
acknowledged decision is in the table exactly once."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from fraud.audit.spool import AuditSpool
from fraud.audit.store import create_audit_engine, upgrade_database
from fraud.net import free_port
from tests.test_audit_support import FRAUD_CLI, make_decision, pg_database, scrape  # noqa: F401

#: Also restart the PostgreSQL server under load (disruptive to anything else using it, so opt-in;
#: .ci/run turns it on).
RESTART_SERVER = os.environ.get("FRAUD_TEST_PG_RESTART") == "1"
MIN_DECISIONS = 2_000
MAX_DECISIONS = 30_000


class Producer(threading.Thread):
    """Appends decisions in random batch sizes until stopped, remembering exactly what was
    acknowledged (the spool accepted it before append returned)."""

    def __init__(self, spool_path: Path, seed: int = 7) -> None:
        super().__init__(name="producer", daemon=True)
        self.spool_path = spool_path
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.acknowledged: list[str] = []
        self.dropped = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with AuditSpool(self.spool_path) as spool:
                index = 0
                while index < MAX_DECISIONS and not (self.stop.is_set() and index >= MIN_DECISIONS):
                    size = self.rng.randint(1, 20)
                    batch = [make_decision(i) for i in range(index, index + size)]
                    result = spool.append(batch)
                    self.acknowledged.extend(r.transaction_id for r in batch[: result.accepted])
                    self.dropped += result.dropped
                    index += size
                    time.sleep(0.005)
        except BaseException as exc:  # noqa: BLE001 - surfaced by the test
            self.error = exc


def _start_writer(
    spool_path: Path, url: str, log: Path, env: dict, metrics_port: int | None = None
) -> subprocess.Popen:
    command = [
        str(FRAUD_CLI),
        "audit",
        "writer",
        "--spool",
        str(spool_path),
        "--db-url",
        url,
        "--batch-size",
        "100",
        "--poll-interval",
        "0.02",
        "--backoff-max",
        "0.5",
    ]
    if metrics_port is not None:
        command += ["--metrics-port", str(metrics_port)]
    with log.open("ab") as handle:
        return subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env)


def restart_postgresql_server() -> None:
    """Restart the local cluster with the machine's own command and wait until it accepts connections."""
    clusters = sorted(os.listdir("/etc/postgresql")) if os.path.isdir("/etc/postgresql") else []
    assert clusters, "FRAUD_TEST_PG_RESTART=1 but no PostgreSQL cluster under /etc/postgresql"
    command = ["pg_ctlcluster", "--skip-systemctl-redirect", clusters[-1], "main", "restart"]
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    _wait_for(
        lambda: subprocess.run(["pg_isready", "-h", "127.0.0.1", "-p", "5432", "-q"], check=False).returncode == 0,
        60,
        "PostgreSQL to accept connections after the restart",
    )


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.05)


@pytest.mark.postgres
@pytest.mark.timeout(420)
def test_every_acknowledged_decision_is_stored_exactly_once(tmp_path, pg_database):  # noqa: F811
    engine = create_audit_engine(pg_database.url)
    upgrade_database(engine)
    spool_path = tmp_path / "spool.db"
    AuditSpool(spool_path).close()
    log = tmp_path / "writer.log"
    env = {**os.environ, "FRAUD_DATA_DIR": str(tmp_path / "data")}

    def stored() -> int:
        with engine.connect() as connection:
            return connection.execute(text("SELECT count(*) FROM decisions")).scalar_one()

    def writer_makes_progress(timeout: float = 60) -> None:
        before = stored()
        _wait_for(lambda: stored() > before, timeout, "the writer to commit a batch")

    producer = Producer(spool_path)
    producer.start()
    writer = _start_writer(spool_path, pg_database.url, log, env)
    with AuditSpool(spool_path) as observer:
        # 1. crash the writer while it drains under load, restart it
        writer_makes_progress()
        writer.send_signal(signal.SIGKILL)
        writer.wait(10)
        writer = _start_writer(spool_path, pg_database.url, log, env)
        writer_makes_progress()
        # 2. the database goes away: every session terminated, new connections refused
        with pg_database.outage():
            _wait_for(lambda: log.read_text().count("audit write failed") >= 1, 30, "the writer to hit the outage")
            time.sleep(1.0)
            backlog_during_outage = observer.depth()
        engine.dispose()
        writer_makes_progress()
        # 2b. the PostgreSQL server itself restarts (CI, where nothing else uses it: FRAUD_TEST_PG_RESTART=1)
        if RESTART_SERVER:
            failures_before = log.read_text().count("audit write failed")
            restart_postgresql_server()
            engine.dispose()
            writer_makes_progress(120)
            restarted_while_writing = log.read_text().count("audit write failed") > failures_before
        # 3. crash the writer again right after the recovery, restart it
        writer.send_signal(signal.SIGKILL)
        writer.wait(10)
        metrics_port = free_port()
        writer = _start_writer(spool_path, pg_database.url, log, env, metrics_port)
        producer.stop.set()
        producer.join(120)
        assert not producer.is_alive() and producer.error is None, producer.error
        _wait_for(lambda: observer.depth() == 0, 60, "the writer to drain the spool")
        assert scrape(metrics_port, "fraud_audit_written_total ") > 0  # the sidecar's own /metrics
    writer.send_signal(signal.SIGTERM)
    assert writer.wait(30) == 0

    assert producer.dropped == 0 and len(producer.acknowledged) >= MIN_DECISIONS
    assert backlog_during_outage > 0, "no decision was waiting while the database was down"
    if RESTART_SERVER:
        assert restarted_while_writing, "the writer never noticed the server restart"
    with engine.connect() as connection:
        total = connection.execute(text("SELECT count(*) FROM decisions")).scalar_one()
        ids = set(connection.execute(text("SELECT transaction_id FROM decisions")).scalars())
    engine.dispose()
    assert total == len(ids) == len(producer.acknowledged)  # exactly once
    assert ids == set(producer.acknowledged)
