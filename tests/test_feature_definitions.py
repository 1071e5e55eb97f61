"""The request-time feature definitions (`fraud.features.definitions`): the array implementation the
predictor calls per request, against hand-computed values and against a plain-Python reference
written from the definitions' text, and the DataFrame wrappers (Feast on-demand view, training)
against the arrays. One implementation serves training and serving; these tests pin what it is."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pytest

from fraud.features.definitions import (
    BATCH_FEATURE_DEFAULTS,
    CUSTOMER_SPENDING_FEATURES,
    CUSTOMER_WINDOWS_DAYS,
    MODEL_FEATURES,
    NIGHT_END_HOUR,
    REQUEST_FEATURES,
    TERMINAL_RISK_FEATURES,
    VELOCITY_DEFAULTS,
    VELOCITY_FEATURES,
    compute_request_features,
    model_feature_frame,
    model_feature_matrix,
    request_feature_matrix,
    utc_epoch_ns,
)

BATCH = CUSTOMER_SPENDING_FEATURES + TERMINAL_RISK_FEATURES


def reference_request_features(amount: float, when: datetime, customer: dict[str, float]) -> dict[str, float]:
    """The definitions' text, one transaction at a time, in plain Python."""
    history = {k: (0.0 if v is None or math.isnan(v) else v) for k, v in customer.items()}
    out = {
        "tx_amount_feature": amount,
        "tx_during_weekend": 1.0 if when.weekday() >= 5 else 0.0,
        "tx_during_night": 1.0 if when.hour <= NIGHT_END_HOUR else 0.0,
    }
    for w in CUSTOMER_WINDOWS_DAYS:
        count, total = history[f"customer_nb_tx_{w}d"], history[f"customer_sum_amount_{w}d"]
        out[f"customer_nb_tx_incl_{w}d"] = count + 1.0
        out[f"customer_avg_amount_incl_{w}d"] = (total + amount) / (count + 1.0)
    count, total = history["customer_nb_tx_30d"], history["customer_sum_amount_30d"]
    ratio = amount / (total / count) if count > 0 and total > 0 else 1.0
    out["amount_to_customer_avg_30d"] = ratio
    return out


def random_inputs(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    start = pd.Timestamp("2018-04-01").value
    frame = pd.DataFrame(
        {
            "tx_amount": np.round(rng.gamma(2.0, 40.0, n) + 0.01, 2),
            "tx_datetime": pd.to_datetime(start + rng.integers(0, 400 * 86_400, n) * 1_000_000_000),
        }
    )
    for name in BATCH + VELOCITY_FEATURES:
        values = rng.integers(0, 6, n).astype("float64") * (50.0 if "amount" in name else 1.0)
        values[rng.random(n) < 0.15] = np.nan  # unknown entity / cold start
        frame[name] = values
    return frame


def test_hand_computed_rows():
    when = np.array(
        [
            "2026-03-14T06:59:59",  # Saturday, last second of the night
            "2026-03-15T07:00:00",  # Sunday, first second of the day
            "2026-03-16T00:00:00",  # Monday midnight
        ],
        dtype="datetime64[ns]",
    ).view("int64")
    customer = np.array(
        [
            [2, 30.0, 4, 100.0, 10, 500.0],  # 30-day average 50
            [np.nan] * 6,  # cold start
            [1, 0.0, 1, 0.0, 1, 0.0],  # history of zero amounts: ratio undefined -> 1
        ]
    )
    got = request_feature_matrix(np.array([100.0, 20.0, 7.0]), when, customer)
    expected = [
        [100.0, 1.0, 1.0, 3.0, 130.0 / 3, 5.0, 40.0, 11.0, 600.0 / 11, 2.0],
        [20.0, 1.0, 0.0, 1.0, 20.0, 1.0, 20.0, 1.0, 20.0, 1.0],
        [7.0, 0.0, 1.0, 2.0, 3.5, 2.0, 3.5, 2.0, 3.5, 1.0],
    ]
    assert list(REQUEST_FEATURES)[-1] == "amount_to_customer_avg_30d"
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_model_feature_frame_equals_a_plain_python_reference(seed: int):
    frame = random_inputs(3_000, seed)
    got = model_feature_frame(frame)
    assert list(got.columns) == list(MODEL_FEATURES) and (got.dtypes == "float64").all()
    for i in range(0, len(frame), 7):
        row = frame.iloc[i]
        customer = {name: row[name] for name in CUSTOMER_SPENDING_FEATURES}
        expected = reference_request_features(float(row["tx_amount"]), row["tx_datetime"].to_pydatetime(), customer)
        for name in TERMINAL_RISK_FEATURES:
            value = row[name]
            expected[name] = BATCH_FEATURE_DEFAULTS[name] if math.isnan(value) else value
        for name in VELOCITY_FEATURES:
            value = row[name]
            expected[name] = VELOCITY_DEFAULTS[name] if math.isnan(value) else value
        assert got.iloc[i][list(MODEL_FEATURES)].tolist() == pytest.approx(
            [expected[name] for name in MODEL_FEATURES], rel=1e-12, abs=0
        ), f"row {i}"


def test_array_and_frame_interfaces_are_identical_and_timezones_are_utc():
    frame = random_inputs(2_000, 3)
    matrix = model_feature_matrix(
        frame["tx_amount"].to_numpy(),
        utc_epoch_ns(frame["tx_datetime"]),
        frame[list(BATCH)].to_numpy(),
        frame[list(VELOCITY_FEATURES)].to_numpy(),
    )
    assert np.array_equal(matrix, model_feature_frame(frame).to_numpy())  # bit for bit
    # the same instants written with an offset (Feast hands the on-demand view tz-aware values)
    aware = frame.assign(tx_datetime=frame["tx_datetime"].dt.tz_localize("UTC").dt.tz_convert("America/New_York"))
    assert np.array_equal(compute_request_features(aware).to_numpy(), compute_request_features(frame).to_numpy())
    # the predictor's path: naive UTC datetimes from the request schema
    stamps = [ts.to_pydatetime() for ts in frame["tx_datetime"]]
    from_request = np.array(stamps, dtype="datetime64[ns]").view("int64")
    assert np.array_equal(from_request, utc_epoch_ns(frame["tx_datetime"]))
    assert (
        utc_epoch_ns(pd.Series([datetime(2018, 4, 1, 1, 0, tzinfo=UTC)]))[0] == pd.Timestamp("2018-04-01T01:00").value
    )


def test_missing_batch_columns_take_cold_start_defaults():
    frame = pd.DataFrame({"tx_amount": [12.5], "tx_datetime": [pd.Timestamp("2026-03-10T12:00")]})
    got = model_feature_frame(frame).iloc[0]
    assert got["customer_nb_tx_incl_30d"] == 1.0 and got["customer_avg_amount_incl_30d"] == 12.5
    assert got["amount_to_customer_avg_30d"] == 1.0
    assert all(got[name] == BATCH_FEATURE_DEFAULTS[name] for name in TERMINAL_RISK_FEATURES if name in MODEL_FEATURES)
    assert all(got[name] == VELOCITY_DEFAULTS[name] for name in VELOCITY_FEATURES)
    assert got["customer_seconds_since_last_tx"] == 86_400.0
