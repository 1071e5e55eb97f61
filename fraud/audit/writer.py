"""AuditWriter: drains the spool into the audit database, off the request path.

Loop: read the oldest batch from the spool -> one `INSERT ... ON CONFLICT DO NOTHING` +
COMMIT -> delete the batch from the spool. A crash between commit and delete replays the batch,
and the key (transaction_id, model_version) makes the replay a no-op, so every acknowledged
decision lands exactly once. A database that is down or restarting is retried with capped
exponential backoff (with jitter); the spool keeps the decisions meanwhile.

Only one writer drains a given spool at a time (an exclusive `flock` on `<spool>.writer.lock`,
released by the OS even on SIGKILL); other writers wait as hot standbys. Run it as a thread
inside the predictor (`start()` / `stop()`) or as its own process (`fraud audit writer`).
"""

from __future__ import annotations

import fcntl
import logging
import os
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from sqlalchemy import Engine, Table
from sqlalchemy.exc import (
    DBAPIError,
    DisconnectionError,
    InterfaceError,
    OperationalError,
    ProgrammingError,
    SQLAlchemyError,
)
from sqlalchemy.exc import (
    TimeoutError as PoolTimeoutError,
)

from fraud.audit import prometheus
from fraud.audit.chain import ChainState, checkpoint_row
from fraud.audit.records import DecisionRecord, ExplanationRecord, is_explanation_payload
from fraud.audit.spool import AuditSpool, SpooledBatch
from fraud.audit.store import (
    create_audit_engine,
    existing_decisions,
    insert_decisions,
    insert_explanations,
    require_schema,
)
from fraud.audit.tables import AuditCheckpoint

logger = logging.getLogger(__name__)

#: Errors that say the database (not a row) is unusable right now: the batch stays spooled and is
#: retried. Lost connections and refused logins (OperationalError, InterfaceError), a pool that
#: is exhausted, and ProgrammingError (a missing table or privilege: the schema or grants are
#: wrong, which an operator fixes, not the row). Every other error of an INSERT is the row's
#: fault, whatever the driver calls it: IntegrityError, DataError, InternalError (a trigger's
#: RAISE EXCEPTION on PostgreSQL), or a plain ValueError (psycopg2 refusing a NUL character).
_RETRYABLE = (OperationalError, InterfaceError, DisconnectionError, PoolTimeoutError, ProgrammingError)

#: Columns that must agree for a replayed (transaction_id, model_version) to be the same decision;
#: arrival time and latency may differ between two deliveries of one decision.
CONTENT_COLUMNS = (
    "model_name",
    "variant",
    "customer_id",
    "terminal_id",
    "features",
    "score",
    "decision",
    "reason_codes",
    "features_missing",
    "features_stale",
    "fail_open",
    "review_threshold",
    "decline_threshold",
)


def is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, _RETRYABLE)


def differing_fields(recorded: dict, incoming: dict) -> list[str]:
    """Content columns in which two decisions of one key differ (thresholds only when both have them)."""
    changed = []
    for name in CONTENT_COLUMNS:
        old, new = recorded.get(name), incoming.get(name)
        if name.endswith("_threshold") and (old is None or new is None):
            continue
        if old != new:
            changed.append(name)
    return changed


@dataclass
class _InsertOutcome:
    written: int = 0
    duplicates: int = 0
    conflicts: list[tuple[int, str]] = field(default_factory=list)
    rejected: list[tuple[int, str]] = field(default_factory=list)


@dataclass(frozen=True)
class WriterSettings:
    batch_size: int = 500
    #: idle wait when the spool is empty (seconds)
    poll_interval: float = 0.2
    backoff_initial: float = 0.1
    backoff_max: float = 5.0
    #: how long stop() keeps draining before leaving the rest in the spool for the next start
    flush_timeout: float = 10.0
    #: HMAC key of the hash chain (FRAUD_AUDIT_CHAIN_KEY); None: plain SHA-256
    chain_key: bytes | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.poll_interval <= 0 or self.backoff_initial <= 0 or self.backoff_max < self.backoff_initial:
            raise ValueError(f"invalid writer timings: {self}")


@dataclass(frozen=True)
class BatchOutcome:
    written: int
    duplicates: int
    dead: int


class _DrainLock:
    """Exclusive advisory lock: one active writer per spool."""

    def __init__(self, spool_path: Path) -> None:
        self.path = Path(f"{spool_path}.writer.lock")
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        if self.held:
            return True
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class AuditWriter:
    """Moves spooled decisions into the audit database in batches (thread or process)."""

    def __init__(
        self,
        spool_path: Path | str,
        db_url: str | None = None,
        settings: WriterSettings | None = None,
        engine: Engine | None = None,
    ) -> None:
        self.spool_path = Path(spool_path)
        self.settings = settings or WriterSettings()
        self._owns_engine = engine is None
        self.engine = engine if engine is not None else create_audit_engine(db_url)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = _DrainLock(self.spool_path)
        self._spool: AuditSpool | None = None
        self._schema_checked = False
        #: this writer's hash chain (fraud.audit.chain), started fresh by every writer
        self.chain = ChainState(key=self.settings.chain_key)

    # --- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        """Drain in a background daemon thread until `stop()`."""
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError("audit writer already running")
        self._stop.clear()
        self._thread = threading.Thread(target=self.run, name="audit-writer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop draining: finish the batch in flight, flush what the database accepts within
        `settings.flush_timeout`, leave the rest in the spool for the next start."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout if timeout is not None else self.settings.flush_timeout + 5.0)
            self._thread = None

    def close(self) -> None:
        """Release the spool connection (and the engine this writer created); after `stop()`."""
        if self._spool is not None:
            self._spool.close()
            self._spool = None
        if self._owns_engine:
            self.engine.dispose()

    def request_stop(self) -> None:
        """Ask `run()` to return (signal-handler safe)."""
        self._stop.set()

    def run(self) -> None:
        """Drain until stopped (blocking): the body of the thread and of `fraud audit writer`."""
        attempt = 0
        try:
            while not self._stop.is_set():
                if not self._lock.try_acquire():
                    self._stop.wait(self.settings.poll_interval)
                    continue
                try:
                    moved = self.drain_once()
                except Exception as exc:  # noqa: BLE001 - any failure keeps the batch spooled; retried
                    attempt += 1
                    self._on_failure(exc, attempt)
                    self._stop.wait(self._backoff(attempt))
                    continue
                if attempt:
                    logger.info("audit database reachable again after %d retries", attempt)
                    attempt = 0
                if moved == 0:
                    self._stop.wait(self.settings.poll_interval)
            if self._lock.held:
                self._flush()
        finally:
            self._lock.release()
            self.close()

    # --- one batch --------------------------------------------------------------------------
    @property
    def spool(self) -> AuditSpool:
        if self._spool is None:
            self._spool = AuditSpool(self.spool_path)
        return self._spool

    def drain_once(self) -> int:
        """Move at most one batch from the spool to the database; returns how many left the spool.

        Raises on a database error that a retry may fix (the batch stays in the spool).
        """
        if not self._schema_checked:
            require_schema(self.engine)
            self._schema_checked = True
        batch = self.spool.oldest(self.settings.batch_size)
        if batch is None:
            prometheus.SPOOL_BACKLOG.set(0)
            return 0
        started = time.perf_counter()
        outcome = self._write(batch)
        prometheus.WRITE_LATENCY.observe(time.perf_counter() - started)
        prometheus.WRITTEN.inc(outcome.written)
        prometheus.DUPLICATES.inc(outcome.duplicates)
        prometheus.DEAD_LETTERS.inc(outcome.dead)
        return len(batch)

    def drain_all(self) -> int:
        """Drain until the spool is empty (raises on a database error); returns the count moved."""
        total = 0
        while moved := self.drain_once():
            total += moved
        return total

    def _write(self, batch: SpooledBatch) -> BatchOutcome:
        rows: list[dict] = []
        row_seqs: list[int] = []
        dead: list[tuple[int, str]] = []
        explanations: list[dict] = []
        explanation_seqs: list[int] = []
        for seq, payload in zip(batch.seqs, batch.payloads, strict=True):
            try:
                if is_explanation_payload(payload):
                    explanations.append(ExplanationRecord.from_payload(payload).to_row())
                    explanation_seqs.append(seq)
                    continue
                rows.append(DecisionRecord.from_payload(payload).to_row())
                row_seqs.append(seq)
            except ValueError as exc:
                dead.append((seq, f"undecodable payload: {exc}"))
        dead.extend(self._insert_explanations(explanations, explanation_seqs))
        try:
            outcome = self._insert(rows, row_seqs)
        except Exception as exc:
            if is_retryable(exc):
                raise
            # some row is refused (constraint, trigger, value the driver cannot send): one by one
            outcome = self._write_row_by_row(rows, row_seqs)
        dead.extend(outcome.rejected)
        dead.extend(outcome.conflicts)
        # Only now, after COMMIT, may the decisions leave the spool.
        self.spool.remove(batch, dead)
        if dead:  # the error texts may quote row values (customer ids): they stay in the spool only
            logger.error(
                "%d spooled decisions rejected (%d conflicting with a recorded decision; spool seq %s), "
                "kept with the reason in the dead_letters table of %s",
                len(dead),
                len(outcome.conflicts),
                ", ".join(str(seq) for seq, _ in dead[:10]),
                self.spool_path,
            )
        prometheus.CONFLICTS.inc(len(outcome.conflicts))
        return BatchOutcome(written=outcome.written, duplicates=outcome.duplicates, dead=len(dead))

    def _insert_explanations(self, rows: list[dict], seqs: list[int]) -> list[tuple[int, str]]:
        """Explanation records into the `explanations` table (a replayed one is skipped by its id);
        the rejected ones (seq, reason). Retryable database errors propagate: the batch stays spooled."""
        if not rows:
            return []
        try:
            with self.engine.begin() as connection:
                insert_explanations(connection, rows)
            return []
        except Exception as exc:
            if is_retryable(exc):
                raise
            if len(rows) == 1:
                detail = str(getattr(exc, "orig", None) or exc)
                return [(seqs[0], f"{type(exc).__name__}: {detail[:500]}")]
        # some row is refused: one by one, so that only the refused ones are dead-lettered
        rejected: list[tuple[int, str]] = []
        for seq, row in zip(seqs, rows, strict=True):
            rejected.extend(self._insert_explanations([row], [seq]))
        return rejected

    def _insert(self, rows: list[dict], seqs: list[int]) -> _InsertOutcome:
        """One transaction: look up which keys are recorded already, insert the new rows linked
        into this writer's hash chain plus the chain's checkpoint; advance the chain after COMMIT."""
        outcome = _InsertOutcome()
        if not rows:
            return outcome
        with self.engine.begin() as connection:
            recorded = existing_decisions(connection, [(r["transaction_id"], r["model_version"]) for r in rows])
            fresh: list[dict] = []
            for seq, row in zip(seqs, rows, strict=True):
                key = (row["transaction_id"], row["model_version"])
                prior = recorded.get(key)
                if prior is None:
                    fresh.append(row)
                    recorded[key] = row
                    continue
                changed = differing_fields(prior, row)
                if changed:
                    outcome.conflicts.append(
                        (
                            seq,
                            f"conflict: transaction {key[0]!r} (model {key[1]}) "
                            f"is recorded with other {', '.join(changed)}",
                        )
                    )
                else:
                    outcome.duplicates += 1
            chain_seq, head = self.chain.link(fresh)
            if fresh:
                insert_decisions(connection, fresh, skip_existing=False)
                connection.execute(
                    cast(Table, AuditCheckpoint.__table__).insert(),
                    [checkpoint_row(self.chain.chain_id, chain_seq, head)],
                )
        self.chain.advance(chain_seq, head)
        outcome.written = len(fresh)
        return outcome

    def _write_row_by_row(self, rows: list[dict], seqs: list[int]) -> _InsertOutcome:
        total = _InsertOutcome()
        for seq, row in zip(seqs, rows, strict=True):
            try:
                one = self._insert([row], [seq])
            except Exception as exc:
                if is_retryable(exc):
                    raise
                detail = str(getattr(exc, "orig", None) or exc)
                total.rejected.append((seq, f"{type(exc).__name__}: {detail[:500]}"))
                continue
            total.written += one.written
            total.duplicates += one.duplicates
            total.conflicts.extend(one.conflicts)
        return total

    # --- failure handling -------------------------------------------------------------------
    def _on_failure(self, exc: Exception, attempt: int) -> None:
        reason = "database" if isinstance(exc, SQLAlchemyError) else type(exc).__name__
        prometheus.RETRIES.labels(reason).inc()
        if isinstance(exc, SQLAlchemyError):
            self.engine.dispose()  # drop pooled connections to a restarted server
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        log = logger.warning if attempt == 1 or attempt % 20 == 0 else logger.debug
        log("audit write failed (%s), retry %d in backoff: %s", reason, attempt, message)

    def _backoff(self, attempt: int) -> float:
        ceiling = min(self.settings.backoff_max, self.settings.backoff_initial * 2 ** min(attempt - 1, 30))
        return ceiling * random.uniform(0.5, 1.0)  # noqa: S311 - retry back-off jitter, not security

    def _flush(self) -> None:
        deadline = time.monotonic() + self.settings.flush_timeout
        while time.monotonic() < deadline:
            try:
                if self.drain_once() == 0:
                    return
            except Exception as exc:  # noqa: BLE001 - what is not flushed stays spooled
                logger.warning(
                    "audit flush at stop stopped early, %d decisions stay spooled: %s",
                    self.spool.depth(),
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                )
                return
