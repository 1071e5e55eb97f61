"""`fraud score --sample` draws recent simulated transactions, reproducibly."""

from __future__ import annotations

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
