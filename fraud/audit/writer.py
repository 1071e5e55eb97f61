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
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine
from sqlalchemy.exc import DataError, IntegrityError, SQLAlchemyError

from fraud.audit import metrics
from fraud.audit.records import DecisionRecord
from fraud.audit.spool import AuditSpool, SpooledBatch
from fraud.audit.store import create_audit_engine, insert_decisions, require_schema

logger = logging.getLogger(__name__)

#: Errors a single row can cause that no retry will fix: the row goes to the dead letters.
_ROW_ERRORS = (IntegrityError, DataError)


@dataclass(frozen=True)
class WriterSettings:
    batch_size: int = 500
    #: idle wait when the spool is empty (seconds)
    poll_interval: float = 0.2
    backoff_initial: float = 0.1
    backoff_max: float = 5.0
    #: how long stop() keeps draining before leaving the rest in the spool for the next start
    flush_timeout: float = 10.0

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
            metrics.SPOOL_BACKLOG.set(0)
            return 0
        started = time.perf_counter()
        outcome = self._write(batch)
        metrics.WRITE_LATENCY.observe(time.perf_counter() - started)
        metrics.WRITTEN.inc(outcome.written)
        metrics.DUPLICATES.inc(outcome.duplicates)
        metrics.DEAD_LETTERS.inc(outcome.dead)
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
        for seq, payload in zip(batch.seqs, batch.payloads):
            try:
                rows.append(DecisionRecord.from_payload(payload).to_row())
                row_seqs.append(seq)
            except ValueError as exc:
                dead.append((seq, f"undecodable payload: {exc}"))
        rejected: list[tuple[int, str]] = []
        try:
            with self.engine.begin() as connection:
                written = insert_decisions(connection, rows)
        except _ROW_ERRORS:
            written, rejected = self._write_row_by_row(rows, row_seqs)
        dead.extend(rejected)
        # Only now, after COMMIT, may the decisions leave the spool.
        self.spool.remove(batch, dead)
        if dead:  # the error texts may quote row values (customer ids): they stay in the spool only
            logger.error(
                "%d spooled decisions rejected (spool seq %s), kept with the reason in the dead_letters table of %s",
                len(dead),
                ", ".join(str(seq) for seq, _ in dead[:10]),
                self.spool_path,
            )
        return BatchOutcome(written=written, duplicates=len(rows) - len(rejected) - written, dead=len(dead))

    def _write_row_by_row(self, rows: list[dict], seqs: list[int]) -> tuple[int, list[tuple[int, str]]]:
        written = 0
        rejected: list[tuple[int, str]] = []
        for seq, row in zip(seqs, rows):
            try:
                with self.engine.begin() as connection:
                    written += insert_decisions(connection, [row])
            except _ROW_ERRORS as exc:
                rejected.append((seq, f"{type(exc).__name__}: {str(exc.orig)[:500]}"))
        return written, rejected

    # --- failure handling -------------------------------------------------------------------
    def _on_failure(self, exc: Exception, attempt: int) -> None:
        reason = "database" if isinstance(exc, SQLAlchemyError) else type(exc).__name__
        metrics.RETRIES.labels(reason).inc()
        if isinstance(exc, SQLAlchemyError):
            self.engine.dispose()  # drop pooled connections to a restarted server
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        log = logger.warning if attempt == 1 or attempt % 20 == 0 else logger.debug
        log("audit write failed (%s), retry %d in backoff: %s", reason, attempt, message)

    def _backoff(self, attempt: int) -> float:
        ceiling = min(self.settings.backoff_max, self.settings.backoff_initial * 2 ** min(attempt - 1, 30))
        return ceiling * random.uniform(0.5, 1.0)

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
