"""Batched reads of the Feast Redis online store for the predictor's hot path.

Feast's `RedisOnlineStore.online_read` is correct but builds an `EntityKey` protobuf, serialises
it, issues one HMGET and then parses one `ValueProto` object per feature value, per view and per
call: ~50 ms for the two batch views of 1,000 transactions, most of it Python-level protobuf
handling (docs/performance.md). `RedisBatchReader` reads exactly the same hashes in one
pipeline for both views and decodes each feature column at once:

* the Redis keys and hash fields are Feast's own: the entity-key prefix is serialised once by
  Feast's `serialize_entity_key` and the hash fields come from the store's
  `_generate_hset_keys_for_features` (feature-view versioning included); at construction the
  reader checks its key for a probe entity against the store's `_generate_redis_keys_for_entities`
  and refuses to be built when they differ (`RedisLayoutMismatch`; callers then use
  `online_read`), so a Feast upgrade that changes the layout cannot make it read nothing;
* a column of `double_val` values (the wire form Feast writes for Float64: one tag byte 0x29 and
  8 little-endian bytes) is decoded with one `numpy.frombuffer`, a column of `int64_val` values
  (Int64 counts: tag byte 0x20 and a varint) with numpy per group of equal length; any other
  column is parsed in one call as a framed `RepeatedValue` message and read per value by its
  oneof kind. Missing values (absent hash field, empty `ValueProto`) are NaN.

`tests/test_online_redis.py` checks the reader against Feast's `online_read` on a real Redis
server (known, unknown and partially written entities) and the decoder on hand-built values.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
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


class RedisLayoutMismatch(RuntimeError):
    """The installed Feast writes Redis keys differently from what this reader builds."""


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
    values = [raw[i] for i in present]
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


class RedisViewLayout:
    """Redis key and hash fields of one batch feature view with a single string join key."""

    def __init__(self, online_store: Any, config: Any, view: Any, join_key: str, features: Sequence[str]) -> None:
        from feast.infra.key_encoding_utils import serialize_entity_key
        from feast.infra.online_stores.redis import _versioned_fv_name
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.protos.feast.types.Value_pb2 import Value

        def entity_key(value: str) -> Any:
            return EntityKey(join_keys=[join_key], entity_values=[Value(string_val=value)])

        self.features = tuple(features)
        _, fields = online_store._generate_hset_keys_for_features(
            view, list(features), fv_name_override=_versioned_fv_name(view, config)
        )
        #: hash fields: one per feature, in `features` order, then the view's timestamp field
        self.fields: list[bytes | str] = list(fields)
        version = config.entity_key_serialization_version
        empty = serialize_entity_key(entity_key(""), entity_key_serialization_version=version)
        # the serialised key ends with the value's 4-byte length and its UTF-8 bytes (empty here)
        if not empty.endswith(_LENGTH.pack(0)):
            raise RedisLayoutMismatch(f"entity key serialisation v{version} does not end with the value length")
        self._prefix = empty[: -_LENGTH.size]
        self._suffix = config.project.encode("utf-8")
        probe = "probe-\u00e9-42"
        expected = online_store._generate_redis_keys_for_entities(config, [entity_key(probe)])[0]
        if self.key(probe) != expected:
            raise RedisLayoutMismatch(f"built key {self.key(probe)!r} but Feast writes {expected!r}")

    def key(self, entity: str) -> bytes:
        encoded = entity.encode("utf-8")
        return self._prefix + _LENGTH.pack(len(encoded)) + encoded + self._suffix


def read_views(
    client: Any, requests: Sequence[tuple[RedisViewLayout, Sequence[str]]]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each (layout, entity ids): ([n, len(features)] float64 with NaN for missing values,
    [n] datetime64[ns] snapshot times, NaT for entities without any value) - all views in one
    Redis pipeline, each distinct entity read once."""
    plans = []
    with client.pipeline(transaction=False) as pipe:
        for layout, ids in requests:
            position: dict[str, int] = {}
            for entity in ids:
                if entity not in position:
                    position[entity] = len(position)
                    pipe.hmget(layout.key(entity), layout.fields)
            rows = np.fromiter((position[e] for e in ids), dtype=np.intp, count=len(ids))
            plans.append((layout, len(position), rows))
        replies = pipe.execute() if any(count for _, count, _ in plans) else []
    results = []
    start = 0
    for layout, count, rows in plans:
        block = replies[start : start + count]
        start += count
        width = len(layout.features)
        values = np.empty((count, width))
        for j in range(width):
            values[:, j] = decode_value_column([reply[j] for reply in block])
        stamps = decode_timestamps([reply[width] for reply in block]).view("datetime64[ns]")
        # Redis answers an absent key with empty values: such an entity is unknown, not from 1970
        unknown = np.isnan(values).all(axis=1) if width else np.ones(count, dtype=bool)
        stamps = np.where(unknown, np.datetime64("NaT", "ns"), stamps)
        results.append((values[rows], stamps[rows]))
    return results
