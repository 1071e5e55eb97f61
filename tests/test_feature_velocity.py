"""Velocity features: the one definition (`velocity_features`) by hand, and the offline DuckDB
computation equal to it on every transaction of random data with bursts, ties and exact window
boundaries."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fraud.errors import UserError
from fraud.features.definitions import (
    NS_PER_SECOND,
    VELOCITY_FEATURES,
    VELOCITY_HORIZON_S,
    velocity_features,
)
from fraud.features.velocity_offline import velocity_frame

T0 = pd.Timestamp("2024-03-01 12:00:00")


def _ns(stamp: pd.Timestamp) -> int:
    return int(stamp.value)


def _value(vector: np.ndarray, name: str) -> float:
    return float(vector[VELOCITY_FEATURES.index(name)])


def test_hand_computed_windows_are_open_and_strictly_earlier() -> None:
    t = _ns(T0)
    card_ts = np.array(
        [
            t - 86_400 * NS_PER_SECOND,  # exactly 24 h before: outside (open lower bound)
            t - 86_399 * NS_PER_SECOND,  # inside 24h only
            t - 600 * NS_PER_SECOND,  # exactly 10 min before: outside 10m, inside 1h
            t - 599 * NS_PER_SECOND,  # inside 10m
            t,  # same timestamp: not earlier, not counted
            t + NS_PER_SECOND,  # later: not counted
        ],
        dtype=np.int64,
    )
    amounts = np.array([1.0, 2.0, 4.0, 8.0, 16.0, 32.0])
    terminals = ["A", "B", "C", "C", "D", "E"]
    terminal_ts = np.array([t - 3_600 * NS_PER_SECOND, t - 3_599 * NS_PER_SECOND, t - 1, t], dtype=np.int64)
    v = velocity_features(t, card_ts, amounts, terminals, terminal_ts)
    assert _value(v, "customer_nb_tx_10m") == 1 and _value(v, "customer_sum_amount_10m") == 8.0
    assert _value(v, "customer_nb_tx_1h") == 2 and _value(v, "customer_sum_amount_1h") == 12.0
    assert _value(v, "customer_nb_tx_24h") == 3 and _value(v, "customer_sum_amount_24h") == 14.0
    assert _value(v, "customer_seconds_since_last_tx") == 599.0
    assert _value(v, "customer_nb_terminals_1h") == 1  # C twice
    assert _value(v, "terminal_nb_tx_10m") == 1  # t - 1 ns
    assert _value(v, "terminal_nb_tx_1h") == 2


def test_no_history_gives_zero_counts_and_the_capped_gap() -> None:
    empty = np.array([], dtype=np.int64)
    v = velocity_features(_ns(T0), empty, np.array([]), [], empty)
    expected = dict.fromkeys(VELOCITY_FEATURES, 0.0) | {"customer_seconds_since_last_tx": float(VELOCITY_HORIZON_S)}
    assert dict(zip(VELOCITY_FEATURES, v.tolist(), strict=True)) == expected


def random_velocity_transactions(seed: int, n: int = 1_500) -> pd.DataFrame:
    """Transactions of few cards/terminals over 3 days: bursts seconds apart, ties (same
    timestamp), and events exactly 10 min / 1 h / 24 h apart."""
    rng = np.random.default_rng(seed)
    offsets = rng.integers(0, 3 * 86_400, size=n)
    burst = rng.random(n) < 0.3
    offsets[burst] = offsets[np.roll(np.flatnonzero(burst), 1)][: burst.sum()] + rng.integers(0, 120, burst.sum())
    exact = rng.random(n) < 0.1
    offsets[exact] = offsets[np.flatnonzero(exact) - 1] + rng.choice([600, 3_600, 86_400], exact.sum())
    frame = pd.DataFrame(
        {
            "transaction_id": [f"TX{i:06d}" for i in range(n)],
            "customer_id": [f"C{c:03d}" for c in rng.integers(0, 12, n)],
            "terminal_id": [f"T{t:03d}" for t in rng.integers(0, 8, n)],
            "tx_amount": np.round(rng.gamma(2.0, 40.0, n), 2),
            "tx_datetime": (pd.Timestamp("2024-02-28") + pd.to_timedelta(offsets, unit="s")).astype("datetime64[us]"),
        }
    )
    return frame.sample(frac=1.0, random_state=seed).reset_index(drop=True)  # input order must not matter


def reference(frame: pd.DataFrame) -> np.ndarray:
    """`velocity_features` of every row from all transactions of its card and terminal."""
    ts = frame["tx_datetime"].astype("datetime64[ns]").to_numpy().view("int64")
    by_card = frame.groupby("customer_id").indices
    by_terminal = frame.groupby("terminal_id").indices
    out = np.empty((len(frame), len(VELOCITY_FEATURES)))
    terminals = frame["terminal_id"].to_numpy()
    amounts = frame["tx_amount"].to_numpy()
    for i, (card, terminal) in enumerate(zip(frame["customer_id"], frame["terminal_id"], strict=True)):
        rows, trows = by_card[card], by_terminal[terminal]
        out[i] = velocity_features(ts[i], ts[rows], amounts[rows], list(terminals[rows]), ts[trows])
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_duckdb_equals_the_definition_on_every_transaction(seed: int) -> None:
    frame = random_velocity_transactions(seed)
    offline = velocity_frame(frame)
    assert list(offline.columns) == ["transaction_id", *VELOCITY_FEATURES]
    assert offline["transaction_id"].tolist() == frame["transaction_id"].tolist()
    expected = reference(frame)
    np.testing.assert_allclose(offline[list(VELOCITY_FEATURES)].to_numpy(), expected, rtol=0, atol=1e-9)
    # the data exercise every window: bursts, and both empty and non-empty frames
    assert (expected[:, VELOCITY_FEATURES.index("customer_nb_tx_10m")] >= 2).any()
    assert (expected[:, VELOCITY_FEATURES.index("customer_nb_tx_24h")] == 0).any()


def test_velocity_frame_names_missing_columns() -> None:
    with pytest.raises(UserError, match="tx_amount"):
        velocity_frame(pd.DataFrame({"transaction_id": [], "customer_id": [], "terminal_id": [], "tx_datetime": []}))


def test_requests_at_arbitrary_times_count_only_earlier_history() -> None:
    """Point-in-time for rows that are not transactions themselves (the training-set join and
    hypothetical requests): each gets `velocity_features` of the history strictly before it."""
    history = random_velocity_transactions(2, n=600)
    rng = np.random.default_rng(9)
    picked = history.sample(n=200, random_state=4)
    requests = pd.DataFrame(
        {
            "customer_id": picked["customer_id"].to_numpy(),
            "terminal_id": picked["terminal_id"].sample(frac=1.0, random_state=5).to_numpy(),
            # some at a transaction's exact time, some in between, tz-aware
            "tx_datetime": (
                picked["tx_datetime"] + pd.to_timedelta(rng.choice([0, 1, 30, 599, 600], len(picked)), unit="s")
            )
            .dt.tz_localize("UTC")
            .to_numpy(),
        },
        index=pd.RangeIndex(500, 700),
    )
    got = velocity_frame(history, requests)
    assert list(got.columns) == list(VELOCITY_FEATURES) and got.index.equals(requests.index)
    ts = history["tx_datetime"].astype("datetime64[ns]").to_numpy().view("int64")
    for i, row in enumerate(requests.itertuples()):
        card = (history["customer_id"] == row.customer_id).to_numpy()
        term = (history["terminal_id"] == row.terminal_id).to_numpy()
        expected = velocity_features(
            pd.Timestamp(row.tx_datetime).value,
            ts[card],
            history["tx_amount"].to_numpy()[card],
            list(history["terminal_id"].to_numpy()[card]),
            ts[term],
        )
        np.testing.assert_allclose(got.iloc[i].to_numpy(), expected, rtol=0, atol=1e-9)
