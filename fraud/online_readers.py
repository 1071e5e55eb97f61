"""Batched reads of Feast's Redis and SQLite online stores for the predictor's hot path.

Feast's `online_read` is correct but builds an `EntityKey` protobuf per entity, serialises it and
parses one `ValueProto` object per feature value (on SQLite also one datetime per stored row):
~50 ms (Redis) / ~100 ms (SQLite) for the two batch views of 1,000 transactions, most of it
Python-level protobuf and datetime handling (docs/performance.md). The readers here read exactly
the same data and decode each feature column at once:

* `RedisBatchReader`: the same hashes, both views in one pipeline (HMGET per distinct entity);
  the hash fields come from the store's `_generate_hset_keys_for_features` (feature-view
  versioning included);
* `SqliteBatchReader`: the same table rows, one query per view that pivots the entity's rows into
  one row in SQLite (`GROUP BY entity_key`), on Feast's own connection;
* the entity keys are Feast's: the key prefix is serialised once by Feast's `serialize_entity_key`
  and each reader checks its key for a probe entity against Feast's own at construction, refusing
  to be built when they differ (`OnlineLayoutMismatch`; callers then use `online_read`), so a
  Feast upgrade that changes the layout cannot make it read nothing;
* a column of `double_val` values (the wire form Feast writes for Float64: one tag byte 0x29 and
  8 little-endian bytes) is decoded with one `numpy.frombuffer`, a column of `int64_val` values
  (Int64 counts: tag byte 0x20 and a varint) with numpy per group of equal length; any other
  column is parsed in one call as a framed `RepeatedValue` message and read per value by its
  oneof kind. Missing values (absent hash field, empty `ValueProto`) are NaN.

tests/test_feature_store.py checks both readers against Feast's `online_read` on real stores
(known, unknown, repeated and partially written entities); tests/test_online_readers.py the
decoding on hand-built values.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np

#: wire prefix of a ValueProto holding only double_val (field 5, 64-bit): tag byte + 8 bytes LE
_DOUBLE_TAG = 0x29
#: wire prefix of a ValueProto holding only int64_val (field 4, varint)
_INT64_TAG = 0x20
_DOUBLE_WIRE = np.dtype([("tag", "u1"), ("value", "<f8")])
_NUMERIC_KINDS = frozenset({"double_val", "float_val", "int64_val", "int32_val", "bool_val"})
_LENGTH = struct.Struct("<I")
#: columns with fewer present values are parsed value by value
_VECTOR_MIN = 32


class OnlineLayoutMismatch(RuntimeError):
    """The installed Feast stores entity keys differently from what the reader builds."""


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _int64_varints(values: list[bytes]) -> np.ndarray | None:
    """Values that are each exactly one int64_val field (tag 0x20 + a varint ending on the last
    byte), decoded per group of equal length with numpy; None if any value is not of that form."""
    lengths = np.fromiter((len(v) for v in values), dtype=np.intp, count=len(values))
    decoded = np.empty(len(values), dtype=np.uint64)
    for length in np.unique(lengths).tolist():
        if not 2 <= length <= 11:
            return None
        rows = np.flatnonzero(lengths == length)
        wire = np.frombuffer(b"".join([values[i] for i in rows]), dtype=np.uint8).reshape(len(rows), length)
        body = wire[:, 1:]
        # every byte but the last has the continuation bit, the last has not: one complete varint
        if (body[:, :-1] < 0x80).any() or (body[:, -1] >= 0x80).any():
            return None
        shifts = np.arange(length - 1, dtype=np.uint64) * np.uint64(7)
        decoded[rows] = np.bitwise_or.reduce((body & 0x7F).astype(np.uint64) << shifts, axis=1)
    return decoded.view(np.int64).astype(np.float64)  # two's complement: negative values use 10 bytes


def decode_value_column(raw: Sequence[bytes | None]) -> np.ndarray:
    """[n] float64 from serialised Feast `ValueProto`s (None or b"": NaN).

    Numeric kinds only (double, float, int64, int32, bool); any other kind raises TypeError
    naming it, as the batch features are numbers."""
    out = np.full(len(raw), np.nan)
    present = [i for i, value in enumerate(raw) if value]
    if not present:
        return out
    values = [value for value in raw if value]
    if len(values) < _VECTOR_MIN:  # a few values: numpy's per-call overhead exceeds the parsing
        from feast.protos.feast.types.Value_pb2 import Value

        out[present] = [_number(Value.FromString(v)) for v in values]
        return out
    if all(len(v) == 9 and v[0] == _DOUBLE_TAG for v in values):
        out[present] = np.frombuffer(b"".join(values), dtype=_DOUBLE_WIRE)["value"]
        return out
    if all(v[0] == _INT64_TAG for v in values):
        decoded = _int64_varints(values)
        if decoded is not None:
            out[present] = decoded
            return out
    from feast.protos.feast.types.Value_pb2 import RepeatedValue

    # one parse for the column: each value framed as field 1 (length-delimited) of RepeatedValue
    framed = b"".join(b"\n" + (bytes((len(v),)) if len(v) < 0x80 else _varint(len(v))) + v for v in values)
    out[present] = [_number(value) for value in RepeatedValue.FromString(framed).val]
    return out


def _number(value: Any) -> float:
    kind = value.WhichOneof("val")
    if kind is None:
        return math.nan
    if kind in _NUMERIC_KINDS:
        return float(getattr(value, kind))
    raise TypeError(f"online store value of kind {kind} where a number was expected")


def decode_timestamps(raw: Sequence[bytes | None]) -> np.ndarray:
    """[n] int64 epoch nanoseconds of serialised `google.protobuf.Timestamp`s; None / b"" is the
    epoch (0), as Feast's `online_read` reports a hash without timestamp field."""
    from google.protobuf.timestamp_pb2 import Timestamp

    out = np.zeros(len(raw), dtype=np.int64)
    parse = Timestamp.FromString
    for i, value in enumerate(raw):
        if value:
            stamp = parse(value)
            out[i] = stamp.seconds * 1_000_000_000 + stamp.nanos
    return out


ViewSpec = tuple[Any, str, Sequence[str]]  # (feature view, join key, features)


class _EntityKeys:
    """Feast's serialised entity key of a single string join key, built from a prefix serialised once."""

    def __init__(self, join_key: str, version: int, suffix: bytes = b"") -> None:
        from feast.infra.key_encoding_utils import serialize_entity_key

        empty = serialize_entity_key(self.proto(join_key, ""), entity_key_serialization_version=version)
        # the serialised key ends with the value's 4-byte length and its UTF-8 bytes (empty here)
        if not empty.endswith(_LENGTH.pack(0)):
            raise OnlineLayoutMismatch(f"entity key serialisation v{version} does not end with the value length")
        self.join_key = join_key
        self._prefix = empty[: -_LENGTH.size]
        self._suffix = suffix

    @staticmethod
    def proto(join_key: str, value: str) -> Any:
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.protos.feast.types.Value_pb2 import Value

        return EntityKey(join_keys=[join_key], entity_values=[Value(string_val=value)])

    def __call__(self, entity: str) -> bytes:
        encoded = entity.encode("utf-8")
        return self._prefix + _LENGTH.pack(len(encoded)) + encoded + self._suffix

    def check(self, feast_key: Any) -> None:
        """Compare with `feast_key(EntityKey proto) -> bytes` for a probe entity."""
        probe = "probe-\u00e9-42"
        expected = feast_key(self.proto(self.join_key, probe))
        if self(probe) != expected:
            raise OnlineLayoutMismatch(f"built key {self(probe)!r} but Feast stores {expected!r}")


def _distinct(ids: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """The distinct ids in first-seen order, and for each input id its position among them."""
    position: dict[str, int] = {}
    for entity in ids:
        if entity not in position:
            position[entity] = len(position)
    return list(position), np.fromiter((position[e] for e in ids), dtype=np.intp, count=len(ids))


def _view_arrays(
    replies: Sequence[Sequence[Any] | None], width: int, stamps_ns: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """values [n, width] and snapshots [n] of distinct entities from their raw feature values
    (`replies[i][j]`, None for an entity with no data); an entity without any value is unknown (NaT)."""
    empty: tuple[None, ...] = (None,) * width
    rows = [reply if reply is not None else empty for reply in replies]
    if len(rows) * width < _VECTOR_MIN * 2:  # a few entities: value by value beats numpy's per-call cost
        from feast.protos.feast.types.Value_pb2 import Value

        parse = Value.FromString
        flat = [_number(parse(value)) if value else math.nan for row in rows for value in row[:width]]
        values = np.array(flat, dtype=np.float64).reshape(len(rows), width)
    else:
        values = np.empty((len(rows), width))
        for j in range(width):
            values[:, j] = decode_value_column([row[j] for row in rows])
    unknown = np.isnan(values).all(axis=1) if width else np.ones(len(rows), dtype=bool)
    return values, np.where(unknown, np.datetime64("NaT", "ns"), stamps_ns.view("datetime64[ns]"))


class RedisBatchReader:
    """Both batch views from Feast's Redis online store in one pipeline (see the module docstring)."""

    def __init__(self, online_store: Any, config: Any, views: Sequence[ViewSpec]) -> None:
        from feast.infra.online_stores.redis import _versioned_fv_name

        self._store, self._config = online_store, config
        self._views = []
        for view, join_key, features in views:
            _, fields = online_store._generate_hset_keys_for_features(
                view, list(features), fv_name_override=_versioned_fv_name(view, config)
            )
            keys = _EntityKeys(join_key, config.entity_key_serialization_version, config.project.encode("utf-8"))
            keys.check(lambda proto: online_store._generate_redis_keys_for_entities(config, [proto])[0])
            # hash fields: one per feature, in `features` order, then the view's timestamp field
            self._views.append((keys, list(fields), len(features)))

    def read(self, ids_per_view: Sequence[Sequence[str]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """For each view's entity ids: ([n, len(features)] float64 with NaN for missing values,
        [n] datetime64[ns] snapshot times, NaT for entities without any value)."""
        plans = []
        client = self._store._get_client(self._config.online_store)
        with client.pipeline(transaction=False) as pipe:
            for (keys, fields, _), ids in zip(self._views, ids_per_view, strict=True):
                distinct, rows = _distinct(ids)
                for entity in distinct:
                    pipe.hmget(keys(entity), fields)
                plans.append((len(distinct), rows))
            replies = pipe.execute() if any(count for count, _ in plans) else []
        results, start = [], 0
        for (_, _, width), (count, rows) in zip(self._views, plans, strict=True):
            block = replies[start : start + count]
            start += count
            # Redis answers an absent key with empty values (and no timestamp): unknown, not 1970
            stamps = decode_timestamps([reply[width] for reply in block])
            values, snapshots = _view_arrays(block, width, stamps)
            results.append((values[rows], snapshots[rows]))
        return results


class SqliteBatchReader:
    """The batch views from Feast's SQLite online store, one pivoting query per view."""

    def __init__(self, online_store: Any, config: Any, views: Sequence[ViewSpec]) -> None:
        from feast.infra.key_encoding_utils import serialize_entity_key
        from feast.infra.online_stores.helpers import compute_table_id

        self._store, self._config = online_store, config
        versioning = config.registry.enable_online_feature_view_versioning
        self._views = []
        for view, join_key, features in views:
            keys = _EntityKeys(join_key, config.entity_key_serialization_version)
            keys.check(lambda proto: serialize_entity_key(proto, config.entity_key_serialization_version))
            table = compute_table_id(config.project, view, versioning).replace('"', '""')
            # one row per entity: MAX(event_ts) (no declared type: the stored value as is, not
            # sqlite3's converted datetime) and each feature's value in `features` order
            pivot = ", ".join("MAX(CASE feature_name WHEN ? THEN value END)" for _ in features)
            select = (
                f'SELECT entity_key, MAX(event_ts), {pivot} FROM "{table}" '  # noqa: S608 - table name from Feast's compute_table_id, quotes escaped; values bound
                "WHERE entity_key IN ({marks}) GROUP BY entity_key"
            )
            self._views.append((keys, select, list(features)))

    def read(self, ids_per_view: Sequence[Sequence[str]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """As `RedisBatchReader.read`."""
        connection = self._store._get_conn(self._config)
        results = []
        for (keys, select, features), ids in zip(self._views, ids_per_view, strict=True):
            distinct, rows = _distinct(ids)
            wire = [keys(entity) for entity in distinct]
            found: dict[bytes, tuple[Any, ...]] = {}
            if wire:
                query = select.format(marks=",".join("?" * len(wire)))
                found = {row[0]: row[1:] for row in connection.execute(query, [*features, *wire])}
            replies = [found.get(key) for key in wire]
            stamps = _sqlite_event_times([reply[0] if reply is not None else None for reply in replies])
            values, snapshots = _view_arrays(
                [reply[1:] if reply is not None else None for reply in replies], len(features), stamps
            )
            results.append((values[rows], snapshots[rows]))
        return results


def _sqlite_event_times(raw: Sequence[Any]) -> np.ndarray:
    """[n] int64 nanoseconds of Feast's SQLite `event_ts` values as its `online_read` reports them:
    epoch seconds are read back with `datetime.fromtimestamp` (how Feast's converter reads what its
    adapter wrote), ISO text with `datetime.fromisoformat`; None is 0 (no row)."""
    out = np.zeros(len(raw), dtype=np.int64)
    converted: dict[Any, int] = {}
    for i, value in enumerate(raw):
        if value is None:
            continue
        stamp = converted.get(value)
        if stamp is None:
            if isinstance(value, (int, float)):
                moment = datetime.fromtimestamp(int(value))
            else:
                moment = datetime.fromisoformat(value.decode() if isinstance(value, bytes) else str(value))
            if moment.tzinfo is not None:
                moment = moment.astimezone(UTC).replace(tzinfo=None)
            stamp = converted[value] = int(np.datetime64(moment, "ns").view("int64"))
        out[i] = stamp
    return out


def batch_reader(
    online_store: Any, config: Any, views: Sequence[ViewSpec]
) -> RedisBatchReader | SqliteBatchReader | None:
    """The batched reader of the configured online store, or None (use `online_read`): Redis through
    redis-py, or SQLite; raises OnlineLayoutMismatch when Feast's key layout is not the expected one."""
    from feast.infra.online_stores.redis import RedisClient, RedisOnlineStore
    from feast.infra.online_stores.sqlite import SqliteOnlineStore

    if isinstance(online_store, RedisOnlineStore) and config.online_store.client == RedisClient.redis:
        return RedisBatchReader(online_store, config, views)
    if isinstance(online_store, SqliteOnlineStore) and not config.online_store.vector_enabled:
        return SqliteBatchReader(online_store, config, views)
    return None
