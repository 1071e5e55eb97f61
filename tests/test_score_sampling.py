"""`fraud score --sample` draws recent simulated transactions, reproducibly."""

from __future__ import annotations

import itertools
from datetime import datetime, timedelta

import pytest

from fraud.config import DataLayout
from fraud.errors import UserError
from fraud.scoring_client import SAMPLE_RECENT_DAYS, sample_raw_transactions
from tests.factories import hand_made_raw_transactions, write_raw_partitions

FIRST_DAY = datetime(2018, 4, 1)
N_DAYS = 12


def test_samples_come_from_the_most_recent_days_and_repeat_with_the_seed(data_dir):
    layout = DataLayout.current()
    customers = [f"C{i:07d}" for i in range(20)]
    terminals = [f"T{i:07d}" for i in range(6)]
    write_raw_partitions(layout, hand_made_raw_transactions(customers, terminals, FIRST_DAY, N_DAYS, 1, 5.0))

    sample = sample_raw_transactions(layout, 40, seed=3)
    assert len(sample) == 40
    cutoff = FIRST_DAY + timedelta(days=N_DAYS - SAMPLE_RECENT_DAYS)
    assert all(datetime.fromisoformat(row["tx_datetime"].replace("Z", "")) >= cutoff for row in sample)
    assert {row["tx_fraud"] for row in sample} <= {0, 1}
    assert sample == sample_raw_transactions(layout, 40, seed=3)
    assert sample != sample_raw_transactions(layout, 40, seed=4)


def test_sampling_without_data_or_with_a_bad_count_is_a_user_error(data_dir):
    layout = DataLayout.current()
    with pytest.raises(UserError, match="fraud simulate"):
        sample_raw_transactions(layout, 5)
    with pytest.raises(UserError, match="--sample"):
        sample_raw_transactions(layout, 0)


def test_card_testing_burst_is_one_card_small_purchases_minutes_apart_then_a_large_one(data_dir):
    from fraud.scoring_client import card_testing_burst
    from fraud.simulator import CARD_TESTING_GAP_SECONDS, CARD_TESTING_LARGE_AMOUNT, CARD_TESTING_SMALL_AMOUNT

    layout = DataLayout.current()
    customers = [f"C{i:07d}" for i in range(20)]
    terminals = [f"T{i:07d}" for i in range(6)]
    write_raw_partitions(layout, hand_made_raw_transactions(customers, terminals, FIRST_DAY, N_DAYS, 1, 5.0))

    burst = card_testing_burst(layout, seed=3, n_small=6)
    assert burst == card_testing_burst(layout, seed=3, n_small=6)
    assert len(burst) == 7 and len({tx["transaction_id"] for tx in burst}) == 7
    assert len({tx["customer_id"] for tx in burst}) == 1 and len({tx["terminal_id"] for tx in burst}) >= 2
    assert all(CARD_TESTING_SMALL_AMOUNT[0] <= tx["tx_amount"] <= CARD_TESTING_SMALL_AMOUNT[1] for tx in burst[:-1])
    assert CARD_TESTING_LARGE_AMOUNT[0] <= burst[-1]["tx_amount"] <= CARD_TESTING_LARGE_AMOUNT[1]
    times = [datetime.fromisoformat(tx["tx_datetime"]) for tx in burst]
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(times)]
    assert all(CARD_TESTING_GAP_SECONDS[0] <= g <= CARD_TESTING_GAP_SECONDS[1] for g in gaps)
    assert {tx["tx_fraud"] for tx in burst} == {1}
    with pytest.raises(UserError, match="--card-testing"):
        card_testing_burst(layout, n_small=0)
