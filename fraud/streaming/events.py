"""Transaction events on Redis Streams: wire form, settings, partitioning and the publisher.

Each transaction is one event on the stream partition of its card (kind `card`) and one on the
partition of its terminal (kind `terminal`): an entity's events always land in one partition, and
one aggregator owns a partition at a time, so each window state has a single writer.

Wire fields (all strings): transaction_id, customer_id, terminal_id, tx_amount, ts_ns (event time,
UTC ns since the epoch), published_ns (wall clock of the publisher, for the freshness metric) and
kind.
"""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import redis
from redis.typing import EncodableT, FieldT

from fraud.errors import UserError
from fraud.schema import CUSTOMER_ID, MAX_ID_LENGTH, MAX_TX_AMOUNT, TERMINAL_ID, TRANSACTION_ID, TX_AMOUNT
from fraud.settings import Settings, current

TS_FIELD = "ts_ns"
PUBLISHED_FIELD = "published_ns"
KIND_FIELD = "kind"
CARD = "card"
TERMINAL = "terminal"
KINDS: tuple[str, ...] = (CARD, TERMINAL)
EVENT_FIELDS: tuple[str, ...] = (
    TRANSACTION_ID,
    CUSTOMER_ID,
    TERMINAL_ID,
    TX_AMOUNT,
    TS_FIELD,
    PUBLISHED_FIELD,
    KIND_FIELD,
)


@dataclass(frozen=True)
class StreamSettings:
    """Where the transaction stream lives and how it is consumed (FRAUD_STREAM_* variables)."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    #: key prefix: partitions are `<prefix>:<p>`, the dead letters `<prefix>:dead-letter`
    prefix: str = "fraud:transactions"
    partitions: int = 4
    #: approximate length cap of each partition (XADD MAXLEN ~)
    maxlen: int = 1_000_000
    group: str = "velocity-aggregator"

    def __post_init__(self) -> None:
        if self.partitions < 1:
            raise UserError(f"FRAUD_STREAM_PARTITIONS must be >= 1, got {self.partitions}")
        if self.maxlen < 1:
            raise UserError(f"FRAUD_STREAM_MAXLEN must be >= 1, got {self.maxlen}")

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> StreamSettings:
        """The stream the settings describe (FRAUD_STREAM_*; the feature store's Redis by default)."""
        settings = settings or current()
        return cls(
            redis_url=settings.stream_redis_url or _redis_url(settings),
            prefix=settings.stream_prefix or cls.prefix,
            partitions=settings.stream_partitions,
            maxlen=settings.stream_maxlen,
            group=settings.stream_group,
        )

    def stream(self, partition: int) -> str:
        return f"{self.prefix}:{partition}"

    @property
    def streams(self) -> list[str]:
        return [self.stream(p) for p in range(self.partitions)]

    @property
    def dead_letter(self) -> str:
        return f"{self.prefix}:dead-letter"

    def partition_of(self, entity_id: str) -> int:
        return zlib.crc32(entity_id.encode()) % self.partitions

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url, socket_timeout=5.0, socket_connect_timeout=2.0)


def _redis_url(settings: Settings) -> str:
    """The Redis the feature store uses (FRAUD_REDIS_HOST/PORT/PASSWORD), as a redis:// URL."""
    host = settings.redis_host or "127.0.0.1"
    port = settings.redis_port or 6379
    password = settings.redis_password
    return f"redis://:{password}@{host}:{port}/0" if password else f"redis://{host}:{port}/0"


class BadEvent(ValueError):
    """An event that cannot be applied; `reason` is the metric label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class TransactionEvent:
    transaction_id: str
    customer_id: str
    terminal_id: str
    amount: float
    ts_ns: int
    published_ns: int
    kind: str

    @property
    def entity_id(self) -> str:
        return self.customer_id if self.kind == CARD else self.terminal_id


def encode(
    transaction_id: str, customer_id: str, terminal_id: str, amount: float, ts_ns: int, kind: str, published_ns: int
) -> dict[str, str]:
    return {
        TRANSACTION_ID: transaction_id,
        CUSTOMER_ID: customer_id,
        TERMINAL_ID: terminal_id,
        TX_AMOUNT: repr(float(amount)),
        TS_FIELD: str(int(ts_ns)),
        PUBLISHED_FIELD: str(int(published_ns)),
        KIND_FIELD: kind,
    }


def _text(fields: Mapping[Any, Any], name: str) -> str:
    value = fields.get(name, fields.get(name.encode()))
    if value is None:
        raise BadEvent("missing_field", f"event lacks field {name!r}")
    return value.decode() if isinstance(value, bytes) else str(value)


def _identifier(fields: Mapping[Any, Any], name: str) -> str:
    value = _text(fields, name).strip()
    if not value or len(value) > MAX_ID_LENGTH:
        raise BadEvent("unknown_entity", f"field {name!r} must be a non-empty id of at most {MAX_ID_LENGTH} characters")
    return value


def decode(fields: Mapping[Any, Any]) -> TransactionEvent:
    """The event of a stream entry's fields; raises BadEvent naming the field."""
    for name in EVENT_FIELDS:
        _text(fields, name)  # every field present, else missing_field naming the first absent one
    kind = _text(fields, KIND_FIELD)
    if kind not in KINDS:
        raise BadEvent("invalid_field", f"field {KIND_FIELD!r} must be one of {KINDS}, got {kind!r}")
    try:
        amount = float(_text(fields, TX_AMOUNT))
        ts_ns = int(_text(fields, TS_FIELD))
        published_ns = int(_text(fields, PUBLISHED_FIELD))
    except ValueError as exc:
        raise BadEvent("invalid_field", f"unparsable number: {exc}") from None
    if not math.isfinite(amount) or not 0 < amount <= MAX_TX_AMOUNT:
        raise BadEvent("invalid_field", f"field {TX_AMOUNT!r} must be in (0, {MAX_TX_AMOUNT:g}], got {amount!r}")
    if ts_ns <= 0:
        raise BadEvent("invalid_field", f"field {TS_FIELD!r} must be a positive epoch in ns, got {ts_ns}")
    return TransactionEvent(
        transaction_id=_identifier(fields, TRANSACTION_ID),
        customer_id=_identifier(fields, CUSTOMER_ID),
        terminal_id=_identifier(fields, TERMINAL_ID),
        amount=amount,
        ts_ns=ts_ns,
        published_ns=published_ns,
        kind=kind,
    )


class TransactionPublisher:
    """XADDs transactions to the stream (one event per card partition and one per terminal
    partition), MAXLEN ~ settings.maxlen, one pipeline round trip per call."""

    def __init__(self, settings: StreamSettings, client: redis.Redis | None = None) -> None:
        self.settings = settings
        self.client = client or settings.client()

    def publish(self, transactions: Iterable[tuple[str, str, str, float, int]]) -> int:
        """Publish (transaction_id, customer_id, terminal_id, amount, ts_ns) tuples; returns how many."""
        settings = self.settings
        published_ns = time.time_ns()
        count = 0
        with self.client.pipeline(transaction=False) as pipe:
            for transaction_id, customer_id, terminal_id, amount, ts_ns in transactions:
                for kind, entity in ((CARD, customer_id), (TERMINAL, terminal_id)):
                    fields = encode(transaction_id, customer_id, terminal_id, amount, ts_ns, kind, published_ns)
                    pipe.xadd(
                        settings.stream(settings.partition_of(str(entity))),
                        cast("dict[FieldT, EncodableT]", fields),
                        maxlen=settings.maxlen,
                        approximate=True,
                    )
                count += 1
            if count:
                pipe.execute()
        return count
