"""The local, durable spool between the request path and the audit database.

`AuditSpool.append` is what the predictor calls before it answers: one SQLite transaction in WAL
mode, committed with `synchronous=FULL` (the WAL is fsynced at every commit, so an acknowledged
decision survives a process crash *and* a power loss; `NORMAL` survives process crashes only and
is cheaper, see docs/audit.md). The spool is bounded: when it holds `max_records`, further
decisions are refused and counted (`fraud_audit_spool_dropped_total`).

Several processes may append to the same file (SQLite serialises writers); `AuditWriter` drains
it in sequence order and deletes a batch only after the database committed it.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from fraud.audit import prometheus
from fraud.audit.records import DecisionRecord
from fraud.audit.store import audit_dir
from fraud.config import DataLayout
from fraud.settings import Settings, current

#: Environment variable overriding the spool file location.
SPOOL_PATH_ENV = "FRAUD_AUDIT_SPOOL"

DEFAULT_MAX_RECORDS = 200_000
SYNCHRONOUS_MODES = ("NORMAL", "FULL")
#: Environment variable choosing the spool's fsync policy when the constructor does not.
SPOOL_SYNC_ENV = "FRAUD_AUDIT_SPOOL_SYNC"

_SCHEMA = (
    (
        "CREATE TABLE IF NOT EXISTS spool ("
        " seq INTEGER PRIMARY KEY AUTOINCREMENT, enqueued_at REAL NOT NULL, payload TEXT NOT NULL)"
    ),
    (
        "CREATE TABLE IF NOT EXISTS dead_letters ("
        " seq INTEGER PRIMARY KEY, enqueued_at REAL NOT NULL, payload TEXT NOT NULL, error TEXT NOT NULL,"
        " failed_at REAL NOT NULL)"
    ),
)


def default_spool_path(layout: DataLayout | None = None, settings: Settings | None = None) -> Path:
    """FRAUD_AUDIT_SPOOL, else `<data dir>/audit/spool.db` (put it on a persistent local volume)."""
    settings = settings or current()
    if settings.audit_spool:
        return Path(settings.audit_spool)
    return audit_dir(layout or settings.layout) / "spool.db"


@dataclass(frozen=True)
class AppendResult:
    """How many decisions of one append call are durably spooled, and how many were dropped."""

    accepted: int
    dropped: int


@dataclass(frozen=True)
class SpooledBatch:
    """The oldest spooled decisions, as raw payloads with their sequence numbers."""

    seqs: list[int]
    enqueued_at: list[float]
    payloads: list[str]

    @property
    def first_seq(self) -> int:
        return self.seqs[0]

    @property
    def last_seq(self) -> int:
        return self.seqs[-1]

    def __len__(self) -> int:
        return len(self.seqs)


class AuditSpool:
    """A bounded, crash-safe FIFO of decision records in one SQLite file (thread-safe)."""

    def __init__(
        self,
        path: Path | str,
        max_records: int = DEFAULT_MAX_RECORDS,
        synchronous: str | None = None,
        busy_timeout_s: float = 10.0,
    ) -> None:
        """`synchronous`: FULL (default; fsync per append, survives power loss) or NORMAL (no
        fsync per append, survives process crashes); default from FRAUD_AUDIT_SPOOL_SYNC."""
        if max_records < 1:
            raise ValueError(f"max_records must be >= 1, got {max_records}")
        synchronous = (synchronous or current().audit_spool_sync or "FULL").strip().upper()
        if synchronous not in SYNCHRONOUS_MODES:
            raise ValueError(f"synchronous must be one of {SYNCHRONOUS_MODES}, got {synchronous!r}")
        self.path = Path(path)
        self.max_records = max_records
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(
            str(self.path), timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
        )
        mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise RuntimeError(f"cannot put spool {self.path} in WAL mode (got {mode}); is it on a network filesystem?")
        self._conn.execute(f"PRAGMA synchronous={synchronous}")
        self._conn.execute("PRAGMA journal_size_limit=67108864")
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in _SCHEMA:
                    self._conn.execute(statement)
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    # --- request path -----------------------------------------------------------------------
    def append(self, records: Sequence[DecisionRecord]) -> AppendResult:
        """Durably append decisions (one transaction, fsynced); returns how many were accepted.

        When the spool is full the surplus (the newest records of this call) is dropped and
        counted; the caller decides whether an unaudited decision may still be answered.
        """
        return self.append_payloads([record.to_payload() for record in records])

    def append_payloads(self, payloads: Sequence[str]) -> AppendResult:
        """`append` for decisions already serialised by `DecisionRecord.to_payload` or
        `decision_payloads` (the predictor's path); the writer validates each on the way out."""
        if not payloads:
            return AppendResult(0, 0)
        started = time.perf_counter()
        now = time.time()
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                depth = self._depth_locked()
                room = max(0, self.max_records - depth)
                accepted = payloads[:room]
                if accepted:
                    self._conn.executemany(
                        "INSERT INTO spool (enqueued_at, payload) VALUES (?, ?)", [(now, p) for p in accepted]
                    )
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        dropped = len(payloads) - len(accepted)
        prometheus.SPOOL_APPENDED.inc(len(accepted))
        if dropped:
            prometheus.SPOOL_DROPPED.inc(dropped)
        prometheus.SPOOL_BACKLOG.set(depth + len(accepted))
        prometheus.SPOOL_APPEND_LATENCY.observe(time.perf_counter() - started)
        return AppendResult(len(accepted), dropped)

    # --- drain side -------------------------------------------------------------------------
    def depth(self) -> int:
        """Decisions waiting. Exact: sequence numbers are assigned under SQLite's write lock and
        batches leave as whole prefixes, so the spooled range has no holes."""
        with self._lock:
            return self._depth_locked()

    def _depth_locked(self) -> int:
        # two scalar subqueries: SQLite answers each min/max from the rowid b-tree (one combined
        # query would scan the table)
        low, high = self._conn.execute("SELECT (SELECT min(seq) FROM spool), (SELECT max(seq) FROM spool)").fetchone()
        return 0 if low is None else high - low + 1

    def backlog(self) -> tuple[int, float | None]:
        """(decisions waiting, enqueue time of the oldest one as a UNIX time or None): what the
        predictor's readiness watches."""
        with self._lock:
            depth = self._depth_locked()
            row = self._conn.execute("SELECT enqueued_at FROM spool ORDER BY seq LIMIT 1").fetchone()
        return depth, None if row is None else float(row[0])

    def oldest(self, limit: int) -> SpooledBatch | None:
        """The `limit` oldest spooled decisions, or None when the spool is empty."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT seq, enqueued_at, payload FROM spool ORDER BY seq LIMIT ?", (limit,)
            ).fetchall()
        if not rows:
            return None
        seqs, enqueued, payloads = (list(column) for column in zip(*rows, strict=True))
        return SpooledBatch(seqs, enqueued, payloads)

    def remove(self, batch: SpooledBatch, dead: Sequence[tuple[int, str]] = ()) -> None:
        """Delete a batch once the database committed it; `dead` (seq, error) pairs are kept in
        `dead_letters` for an operator instead of being retried forever."""
        by_seq = dict(zip(batch.seqs, zip(batch.enqueued_at, batch.payloads, strict=True), strict=True))
        failed_at = time.time()
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.executemany(
                    "INSERT OR REPLACE INTO dead_letters (seq, enqueued_at, payload, error, failed_at)"
                    " VALUES (?, ?, ?, ?, ?)",
                    [(seq, by_seq[seq][0], by_seq[seq][1], error, failed_at) for seq, error in dead],
                )
                self._conn.execute("DELETE FROM spool WHERE seq >= ? AND seq <= ?", (batch.first_seq, batch.last_seq))
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            depth = self._depth_locked()
        prometheus.SPOOL_BACKLOG.set(depth)

    def dead_letter_count(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT count(*) FROM dead_letters").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()
