"""Idempotent scoring: one decision per transaction id.

A scoring request may be retried (a time-out on the caller's side, a replayed message). The ledger
remembers, per `transaction_id`, a hash of the transaction's content and the answer given:

* the same id with the same content again: the recorded answer is returned - not scored again, not
  audited again (the audit trail holds the original decision);
* the same id with different content: HTTP 409 Conflict (gRPC ALREADY_EXISTS) for the whole
  request; nothing is scored, nothing is overwritten.

Ledgers:

* `RedisLedger` - shared by every predictor replica: one pipeline of GETs before scoring and one of
  `SET key value NX EX ttl` after, keyed `<prefix><transaction_id>`. The first answer recorded wins
  (`NX`): two replicas scoring the same new transaction at the same moment both answer, and the
  ledger keeps the first.
* `MemoryLedger` - in-process, bounded (least recently recorded entries go first) and with the same
  time-to-live: local serving with the SQLite online store (one predictor process).

Entries live `ttl_s` seconds (default one hour; a Redis entry is ~0.5 kB, so budget
0.5 kB x transactions per second x ttl). A ledger that cannot be reached is an online-store outage:
fail-open scores without the check (counted in `fraud_predictor_errors_total{kind="idempotency_unavailable"}`),
fail-closed answers 503.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import grpc
import numpy as np
import orjson
from grpc_interceptor.exceptions import GrpcException

from fraud.schema import TransactionRequest
from predictor.codec import ParsedRequest, ReasonCode, ScoredBatch

DEFAULT_TTL_S = 3600.0
DEFAULT_MEMORY_ENTRIES = 50_000  # ~1 kB each: ~50 MB at most
DEFAULT_KEY_PREFIX = "fraud:scored:"


class TransactionConflict(GrpcException):
    """A transaction id already answered for different content: HTTP 409 / gRPC ALREADY_EXISTS."""

    http_status = 409

    def __init__(self, message: str) -> None:
        super().__init__(details=message, status_code=grpc.StatusCode.ALREADY_EXISTS)
        self.message = message

    def __str__(self) -> str:
        return self.message


class LedgerUnavailable(RuntimeError):
    """The ledger cannot be read or written (Redis down)."""


def content_hash(tx: TransactionRequest) -> str:
    """SHA-256 of everything a transaction says, in a canonical form (the amount as a float's repr,
    the time as ISO-8601 UTC)."""
    text = "\x1f".join(
        (tx.transaction_id, tx.customer_id, tx.terminal_id, repr(float(tx.tx_amount)), tx.tx_datetime.isoformat())
    )
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Recorded:
    """One transaction's recorded answer."""

    content: str
    probability: float
    decision: str
    reason_codes: tuple[tuple[str, str, float], ...]
    model_version: str
    features_missing: bool
    features_stale: bool
    features: tuple[float, ...]

    def dumps(self) -> bytes:
        return orjson.dumps(
            [
                self.content,
                self.probability,
                self.decision,
                self.reason_codes,
                self.model_version,
                self.features_missing,
                self.features_stale,
                self.features,
            ]
        )

    @classmethod
    def loads(cls, raw: bytes | str) -> Recorded:
        content, probability, decision, codes, version, missing, stale, features = orjson.loads(raw)
        return cls(
            content,
            probability,
            decision,
            tuple(tuple(code) for code in codes),
            version,
            missing,
            stale,
            tuple(features),
        )


def recorded_rows(batch: ScoredBatch, hashes: Sequence[str]) -> list[Recorded]:
    return [
        Recorded(
            content=hashes[i],
            probability=float(batch.probabilities[i]),
            decision=batch.decisions[i],
            reason_codes=tuple((c.feature, c.description, c.contribution) for c in batch.reason_codes[i]),
            model_version=batch.model_version,
            features_missing=bool(batch.features_missing[i]),
            features_stale=bool(batch.features_stale[i]),
            features=tuple(float(v) for v in batch.feature_matrix[i]),
        )
        for i in range(len(hashes))
    ]


def replayed_batch(request: ParsedRequest, rows: Sequence[Recorded]) -> ScoredBatch:
    """A ScoredBatch answering `request` entirely from recorded rows."""
    return ScoredBatch(
        request=request,
        model_version=rows[0].model_version,
        probabilities=np.array([r.probability for r in rows], dtype=np.float64),
        decisions=[r.decision for r in rows],
        reason_codes=[[ReasonCode(*code) for code in r.reason_codes] for r in rows],
        features_missing=np.array([r.features_missing for r in rows], dtype=np.bool_),
        features_stale=np.array([r.features_stale for r in rows], dtype=np.bool_),
        feature_matrix=np.array([r.features for r in rows], dtype=np.float64),
    )


def merged_batch(request: ParsedRequest, recorded: Sequence[Recorded | None], scored: ScoredBatch) -> ScoredBatch:
    """Rows recorded before where `recorded` has them, the new scores (in order) elsewhere."""
    new_rows = iter(recorded_rows(scored, ["" for _ in range(len(scored.decisions))]))
    rows = [row if row is not None else next(new_rows) for row in recorded]
    return replace(replayed_batch(request, rows), model_version=scored.model_version, fail_open=scored.fail_open)


def check_request(transactions: Sequence[TransactionRequest], recorded: Sequence[Recorded | None]) -> list[str]:
    """Content hashes of `transactions`; TransactionConflict for an id recorded (or repeated in the
    request) with other content."""
    hashes = [content_hash(tx) for tx in transactions]
    seen: dict[str, str] = {}
    for index, (tx, digest, row) in enumerate(zip(transactions, hashes, recorded, strict=True)):
        earlier = seen.setdefault(tx.transaction_id, digest)
        if earlier != digest:
            raise TransactionConflict(
                f"transaction {tx.transaction_id!r} appears twice in the request with different content (row {index})"
            )
        if row is not None and row.content != digest:
            raise TransactionConflict(
                f"transaction {tx.transaction_id!r} was already scored with different content; "
                "a transaction id is answered once"
            )
    return hashes


class MemoryLedger:
    """In-process ledger: at most `max_entries` transactions, each for `ttl_s` seconds."""

    blocking = False

    def __init__(self, ttl_s: float = DEFAULT_TTL_S, max_entries: int = DEFAULT_MEMORY_ENTRIES) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: OrderedDict[str, tuple[float, Recorded]] = OrderedDict()
        self._lock = threading.Lock()

    def describe(self) -> str:
        return f"in-process (at most {self.max_entries} transactions, {self.ttl_s:g}s)"

    def recall(self, transaction_ids: Sequence[str]) -> list[Recorded | None]:
        now = time.monotonic()
        found: list[Recorded | None] = []
        with self._lock:
            for tx_id in transaction_ids:
                entry = self._entries.get(tx_id)
                if entry is not None and entry[0] < now:
                    del self._entries[tx_id]
                    entry = None
                found.append(entry[1] if entry else None)
        return found

    def record(self, transaction_ids: Sequence[str], rows: Sequence[Recorded]) -> list[bool]:
        """Record each row unless its id is recorded already (first wins); True where recorded now."""
        expires = time.monotonic() + self.ttl_s
        stored = []
        with self._lock:
            for tx_id, row in zip(transaction_ids, rows, strict=True):
                entry = self._entries.get(tx_id)
                if entry is not None and entry[0] >= time.monotonic():
                    stored.append(False)
                    continue
                self._entries[tx_id] = (expires, row)
                self._entries.move_to_end(tx_id)
                stored.append(True)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return stored


class RedisLedger:
    """Ledger in Redis, shared by every replica (module docstring)."""

    blocking = True

    def __init__(self, client: Any, ttl_s: float = DEFAULT_TTL_S, prefix: str = DEFAULT_KEY_PREFIX) -> None:
        self.client = client
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.prefix = prefix

    @classmethod
    def from_connection_string(cls, connection: str, ttl_s: float, prefix: str, timeout_s: float) -> RedisLedger:
        """From Feast's Redis connection string (`host:port[,password=...][,ssl=true][,db=N]`)."""
        import redis

        address, *options = [part.strip() for part in connection.split(",") if part.strip()]
        host, _, port = address.rpartition(":")
        settings = dict(option.split("=", 1) for option in options if "=" in option)
        client = redis.Redis(
            host=host or address,
            port=int(port) if host else 6379,
            db=int(settings.get("db", 0)),
            password=settings.get("password") or None,
            ssl=settings.get("ssl", "false").lower() == "true",
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
        )
        return cls(client, ttl_s, prefix)

    def describe(self) -> str:
        kwargs = self.client.connection_pool.connection_kwargs
        return f"Redis {kwargs.get('host')}:{kwargs.get('port')} ({self.prefix}*, {self.ttl_ms / 1000:g}s)"

    def recall(self, transaction_ids: Sequence[str]) -> list[Recorded | None]:
        import redis

        try:
            raw = self.client.mget([self.prefix + tx_id for tx_id in transaction_ids])
        except redis.RedisError as exc:
            raise LedgerUnavailable(f"{type(exc).__name__}: {exc}") from None
        return [Recorded.loads(value) if value is not None else None for value in raw]

    def record(self, transaction_ids: Sequence[str], rows: Sequence[Recorded]) -> list[bool]:
        import redis

        try:
            with self.client.pipeline(transaction=False) as pipe:
                for tx_id, row in zip(transaction_ids, rows, strict=True):
                    pipe.set(self.prefix + tx_id, row.dumps(), nx=True, px=self.ttl_ms)
                return [bool(reply) for reply in pipe.execute()]
        except redis.RedisError as exc:
            raise LedgerUnavailable(f"{type(exc).__name__}: {exc}") from None
