"""Ingest validation: each rejection reason, each fatal error, the partitioned output."""

from __future__ import annotations

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fraud.schema import RAW_TRANSACTION_SCHEMA, transaction_key
from fraud.training import validation
from fraud.training.validation import ValidationError


def _good_rows(n: int = 6) -> pd.DataFrame:
    when = pd.date_range("2018-04-01 08:00", periods=n, freq="9h")
    return pd.DataFrame(
        {
            "transaction_id": [transaction_key(i) for i in range(n)],
            "tx_datetime": when.astype("datetime64[us]"),
            "customer_id": ["C0000001"] * n,
            "terminal_id": ["T0000002"] * n,
            "tx_amount": [10.0 + i for i in range(n)],
            "tx_time_seconds": [int((t - when[0]).total_seconds()) for t in when],
            "tx_time_days": [(t - when[0]).days for t in when],
            "tx_fraud": [0] * n,
            "tx_fraud_scenario": [0] * n,
        }
    )


def _write(frame: pd.DataFrame, path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path)


def test_each_rejection_reason_is_counted_and_rows_kept(tmp_path):
    frame = _good_rows(10).astype({"tx_amount": object, "tx_fraud": object, "tx_datetime": object})
    frame.loc[1, "tx_amount"] = "abc"  # invalid_type
    frame.loc[2, "customer_id"] = None  # null_value
    frame.loc[3, "tx_amount"] = 0.0  # non_positive_amount
    frame.loc[4, "tx_amount"] = -5.0  # non_positive_amount
    frame.loc[5, "tx_fraud"] = 2  # invalid_label
    frame.loc[6, "tx_datetime"] = pd.Timestamp("1990-01-01")  # timestamp_out_of_range
    frame.loc[7, "transaction_id"] = frame.loc[0, "transaction_id"]  # duplicate_transaction_id
    frame = frame.astype(str).replace({"None": None})
    path = tmp_path / "in.csv"
    frame.to_csv(path, index=False)
    result = validation.validate_uri(str(path))
    assert result.report.rejected == {
        "invalid_type": 1,
        "null_value": 1,
        "non_positive_amount": 2,
        "invalid_label": 1,
        "timestamp_out_of_range": 1,
        "duplicate_transaction_id": 1,
        "invalid_identifier": 0,
    }
    assert result.report.rows_read == 10 and result.report.rows_valid == 3
    assert list(result.valid["transaction_id"]) == [transaction_key(i) for i in (0, 8, 9)]
    assert sorted(result.rejected["rejection_reason"]) == sorted(
        [
            "invalid_type",
            "null_value",
            "non_positive_amount",
            "non_positive_amount",
            "invalid_label",
            "timestamp_out_of_range",
            "duplicate_transaction_id",
        ]
    )
    # the valid rows have exactly the raw schema
    table = pa.Table.from_pandas(result.valid, schema=RAW_TRANSACTION_SCHEMA, preserve_index=False)
    assert table.num_rows == 3


def test_future_timestamp_is_out_of_range():
    frame = _good_rows(3)
    frame.loc[2, "tx_datetime"] = pd.Timestamp("2999-01-01")
    result = validation.validate_frame(frame)
    assert result.report.rejected["timestamp_out_of_range"] == 1
    result = validation.validate_frame(_good_rows(3), max_timestamp=pd.Timestamp("2018-04-01 12:00").to_pydatetime())
    assert result.report.rejected["timestamp_out_of_range"] == 2


def test_partitioned_directory_round_trip(tmp_path):
    raw = tmp_path / "raw"
    rows = _good_rows(6)
    for day, part in rows.groupby(rows["tx_datetime"].dt.floor("D")):
        _write(part, raw / "transactions" / f"day={day.date()}" / "part-0.parquet")
    result = validation.validate_uri(str(raw))  # the raw dir with a transactions/ sub-folder
    assert result.report.files == 3 and result.report.rows_valid == 6
    out = validation.write_partitioned(result.valid, tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == ["day=2018-04-01", "day=2018-04-02", "day=2018-04-03"]
    back = pq.read_table(out / "day=2018-04-02" / "part-0.parquet")
    assert back.schema.equals(RAW_TRANSACTION_SCHEMA, check_metadata=False)
    assert validation.validate_uri(f"file://{out}").report.rows_valid == 6


def test_missing_column_is_fatal_and_named(tmp_path):
    _write(_good_rows(2).drop(columns=["tx_amount"]), tmp_path / "a.parquet")
    with pytest.raises(ValidationError, match=r"missing required column.*tx_amount"):
        validation.validate_uri(str(tmp_path / "a.parquet"))


def test_unreadable_file_is_fatal_and_named(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "broken.parquet").write_bytes(b"this is not parquet")
    with pytest.raises(ValidationError, match=r"cannot read .*broken.parquet"):
        validation.validate_uri(str(tmp_path / "d"))


def test_nothing_to_read_and_all_rejected_are_fatal(tmp_path):
    with pytest.raises(ValidationError, match="does not exist"):
        validation.validate_uri(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValidationError, match="no Parquet or CSV"):
        validation.validate_uri(str(tmp_path / "empty"))
    bad = _good_rows(2).assign(tx_amount=-1.0)
    _write(bad, tmp_path / "bad.parquet")
    with pytest.raises(ValidationError, match=r"all 2 rows rejected.*non_positive_amount=2"):
        validation.validate_uri(str(tmp_path / "bad.parquet"))


def test_remote_scheme_without_its_package_names_it():
    import importlib.util

    if importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed; the missing-package message cannot be shown")
    with pytest.raises(ValidationError, match="gcsfs"):
        validation.validate_uri("gs://some-bucket/raw")


def test_identifiers_outside_the_rule_and_card_numbers_are_rejected_and_not_stored(tmp_path):
    frame = _good_rows(5).astype({"customer_id": object})
    frame.loc[1, "customer_id"] = "4111111111111111"  # a Luhn-valid card number
    frame.loc[2, "terminal_id"] = "T\u00e9rminal"
    frame.loc[3, "transaction_id"] = "TX\x07bell"
    path = tmp_path / "in.csv"
    frame.to_csv(path, index=False)
    result = validation.validate_uri(str(path))
    assert result.report.rejected["invalid_identifier"] == 3
    assert list(result.valid["transaction_id"]) == [transaction_key(i) for i in (0, 4)]
    assert "4111111111111111" not in result.rejected.to_csv()
    assert validation.CARD_NUMBER_REMOVED in set(result.rejected["customer_id"])
