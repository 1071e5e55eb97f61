"""The batched online readers' decoding (`fraud.online_readers`) against protobuf's own parsing.

Their equality with Feast's `online_read` on real SQLite and Redis stores is tested in
tests/test_feature_store.py (`test_batched_*_reader_equals_feast_online_read`).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from feast.protos.feast.types.Value_pb2 import Value
from google.protobuf.timestamp_pb2 import Timestamp

from fraud.online_readers import decode_timestamps, decode_value_column

SAMPLES: list[Value] = [
    Value(double_val=0.0),
    Value(double_val=-1234.5678),
    Value(double_val=1e300),
    Value(double_val=5e-324),
    Value(int64_val=0),
    Value(int64_val=1),
    Value(int64_val=127),
    Value(int64_val=128),
    Value(int64_val=300),
    Value(int64_val=2**53),
    Value(int64_val=2**63 - 1),
    Value(int64_val=-1),
    Value(int64_val=-(2**63)),
    Value(int32_val=-7),
    Value(float_val=0.25),
    Value(bool_val=True),
    Value(),  # Feast's null: an empty ValueProto
]


def reference(raw: list[bytes | None]) -> np.ndarray:
    """What a per-value protobuf parse gives (NaN for no value)."""
    out = []
    for item in raw:
        if not item:
            out.append(math.nan)
            continue
        value = Value.FromString(item)
        kind = value.WhichOneof("val")
        out.append(math.nan if kind is None else float(getattr(value, kind)))
    return np.array(out)


@pytest.mark.parametrize("repeat", [1, 40], ids=["value-by-value", "vectorised"])
def test_columns_of_one_kind_decode_like_protobuf(repeat: int) -> None:
    doubles = [v.SerializeToString() for v in SAMPLES[:4]] * repeat
    ints = [v.SerializeToString() for v in SAMPLES[4:13]] * repeat
    for column in (doubles, ints, [*ints, None, b""], [None, *doubles, b""]):
        decoded = decode_value_column(column)
        np.testing.assert_array_equal(decoded, reference(column))
    # a mistake in the varint arithmetic would show here: exact values, not just "close"
    assert decode_value_column(ints)[: len(SAMPLES[4:13])].tolist() == [
        0.0,
        1.0,
        127.0,
        128.0,
        300.0,
        float(2**53),
        float(2**63 - 1),
        -1.0,
        float(-(2**63)),
    ]


@pytest.mark.parametrize("repeat", [1, 40], ids=["value-by-value", "vectorised"])
def test_mixed_and_other_numeric_kinds_fall_back_to_protobuf(repeat: int) -> None:
    column = [v.SerializeToString() for v in SAMPLES] * repeat + [None]
    np.testing.assert_array_equal(decode_value_column(column), reference(column))
    # an int64 field followed by another field is not a bare varint: parsed by protobuf (last wins)
    odd = Value(int64_val=5).SerializeToString() + Value(int64_val=9).SerializeToString()
    assert decode_value_column([odd] * repeat).tolist() == [9.0] * repeat


def test_empty_and_all_missing_columns() -> None:
    assert decode_value_column([]).shape == (0,)
    assert np.isnan(decode_value_column([None, b"", None])).all()


@pytest.mark.parametrize("repeat", [1, 40])
def test_non_numeric_values_are_refused(repeat: int) -> None:
    with pytest.raises(TypeError, match="string_val"):
        decode_value_column([Value(string_val="x").SerializeToString()] * repeat)


def test_timestamps_decode_to_epoch_nanoseconds() -> None:
    stamps = [Timestamp(seconds=1_538_352_000, nanos=123), Timestamp(seconds=0, nanos=5), Timestamp()]
    raw = [s.SerializeToString() for s in stamps] + [None]
    assert decode_timestamps(raw).tolist() == [1_538_352_000_000_000_123, 5, 0, 0]


@pytest.mark.parametrize("version", [3])
def test_entity_keys_are_feasts_serialised_keys(version: int) -> None:
    from feast.infra.key_encoding_utils import serialize_entity_key

    from fraud.online_readers import OnlineLayoutMismatch, _EntityKeys

    keys = _EntityKeys("customer_id", version, b"project")
    for entity in ["C0000001", "", "ü-\u4e2d-" + "x" * 300]:
        proto = _EntityKeys.proto("customer_id", entity)
        assert keys(entity) == serialize_entity_key(proto, entity_key_serialization_version=version) + b"project"
    keys.check(lambda proto: serialize_entity_key(proto, entity_key_serialization_version=version) + b"project")
    with pytest.raises(OnlineLayoutMismatch, match="Feast stores"):
        keys.check(lambda proto: serialize_entity_key(proto, entity_key_serialization_version=version))
