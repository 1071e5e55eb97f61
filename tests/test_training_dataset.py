"""Training windows: prequential folds on earlier weeks only, the gap, the known-compromised rule."""

from __future__ import annotations

from datetime import datetime, timedelta

import numpy as np
import pandas as pd
import pytest

from fraud.errors import UserError
from fraud.features.definitions import MODEL_FEATURES
from fraud.training.dataset import ID_COLUMNS, SplitPlan, TrainingSets, build_training_sets, split_featured

T = datetime(2018, 7, 25)


def test_plan_windows_follow_the_handbook():
    plan = SplitPlan.create("2018-07-25", n_validation_folds=4)
    assert plan.final.train.as_dict() == {"start": "2018-07-25", "end": "2018-08-01"}
    assert plan.final.delay.as_dict() == {"start": "2018-08-01", "end": "2018-08-08"}
    assert plan.final.assess.as_dict() == {"start": "2018-08-08", "end": "2018-08-15"}
    # fold 0 assesses on the training week with a model trained two weeks earlier
    assert plan.fold(0).train.as_dict() == {"start": "2018-07-11", "end": "2018-07-18"}
    assert plan.fold(0).assess.as_dict() == {"start": "2018-07-25", "end": "2018-08-01"}
    for i, block in enumerate(plan.folds):
        assert block.assess.end <= plan.final.train.end  # every label known when training ends
        assert block.assess.start - block.train.end == timedelta(days=7)  # the gap
        assert block.assess.end <= plan.final.delay.start < plan.final.assess.start  # never the test week
        if i:
            assert plan.fold(i - 1).train.start - block.train.start == timedelta(days=7)
    assert plan.span.start == datetime(2018, 6, 20) and plan.span.end == datetime(2018, 8, 15)


def test_plan_parameters_are_validated_and_free():
    plan = SplitPlan.create("2018-05-01", train_days=14, delay_days=3, test_days=5, n_validation_folds=1)
    assert plan.final.assess.as_dict() == {"start": "2018-05-18", "end": "2018-05-23"}
    assert plan.fold(0).assess.end == plan.final.train.end
    with pytest.raises(UserError, match="train_days"):
        SplitPlan.create("2018-05-01", train_days=0)
    with pytest.raises(UserError, match="not a date"):
        SplitPlan.create("May 1st")


def _daily_transactions(start: datetime, days: int, cards: int = 6) -> pd.DataFrame:
    """One transaction per card per day at noon; features are the day number (to trace rows)."""
    rows = []
    for d in range(days):
        for c in range(cards):
            rows.append(
                {
                    "transaction_id": f"TX{d:03d}{c}",
                    "customer_id": f"C{c}",
                    "terminal_id": f"T{c}",
                    "tx_datetime": start + timedelta(days=d, hours=12),
                    "tx_amount": 10.0 + c,
                    "tx_fraud": 0,
                }
            )
    frame = pd.DataFrame(rows)
    frame["tx_datetime"] = frame["tx_datetime"].astype("datetime64[us]")
    return frame


def _featured(frame: pd.DataFrame) -> pd.DataFrame:
    day = (frame["tx_datetime"] - frame["tx_datetime"].min()).dt.days.astype(float)
    return frame.assign(**{name: day for name in MODEL_FEATURES})


def test_sets_never_use_the_test_week_and_drop_known_compromised_cards():
    plan = SplitPlan.create(T, n_validation_folds=2)
    frame = _daily_transactions(plan.span.start, plan.span.days)
    when = frame["tx_datetime"]
    # every card commits fraud every day of some fold's training windows (so folds have frauds)
    frame.loc[frame["customer_id"].eq("C5"), "tx_fraud"] = 1
    # C1: fraud in the training week -> removed from the whole test week
    frame.loc[frame["customer_id"].eq("C1") & (when.dt.date == T.date() + timedelta(days=2)), "tx_fraud"] = 1
    # C2: fraud on the 4th delay day (train_end + 3) -> known from test day 4 on
    delay_day_3 = (T + timedelta(days=7 + 3)).date()
    frame.loc[frame["customer_id"].eq("C2") & (when.dt.date == delay_day_3), "tx_fraud"] = 1
    # C3: fraud on test day 1 -> stays in the test set (not known before)
    test_day_1 = (T + timedelta(days=15)).date()
    frame.loc[frame["customer_id"].eq("C3") & (when.dt.date == test_day_1), "tx_fraud"] = 1

    sets = split_featured(_featured(frame), plan)
    test_start, test_end = plan.final.assess.start, plan.final.assess.end
    for fold_train, fold_valid in sets.folds:
        for part in (fold_train, fold_valid):
            assert part["tx_datetime"].max() < plan.final.train.end
    assert sets.train["tx_datetime"].between(plan.final.train.start, plan.final.train.end).all()
    assert sets.test["tx_datetime"].min() >= test_start and sets.test["tx_datetime"].max() < test_end
    # no row of the gap in any set
    gap = plan.final.delay
    assert not sets.test["tx_datetime"].between(gap.start, gap.end - timedelta(seconds=1)).any()

    test_days = (sets.test["tx_datetime"] - test_start).dt.days
    cards_by_day = sets.test.groupby(test_days)["customer_id"].apply(set)
    assert all("C1" not in cards for cards in cards_by_day)  # known from the training week
    assert all("C5" not in cards for cards in cards_by_day)
    assert all("C2" in cards_by_day[d] for d in range(4)) and all("C2" not in cards_by_day[d] for d in range(4, 7))
    assert all("C3" in cards for cards in cards_by_day)
    assert list(sets.test.columns) == list(ID_COLUMNS) + list(MODEL_FEATURES)


def test_build_training_sets_joins_features_in_row_order_and_round_trips(tmp_path):
    plan = SplitPlan.create(T, n_validation_folds=1)
    labelled = _daily_transactions(plan.span.start, plan.span.days)
    labelled.loc[labelled["customer_id"].eq("C0"), "tx_fraud"] = 1
    labelled["event_timestamp"] = labelled["tx_datetime"]
    seen: list[int] = []

    def amount_features(entity: pd.DataFrame) -> pd.DataFrame:
        """Features that identify each row: the amount repeated, in the entity frame's order."""
        seen.append(len(entity))
        return entity.assign(**{name: entity["tx_amount"].to_numpy() for name in MODEL_FEATURES})

    sets = build_training_sets(plan, labelled=labelled, feature_lookup=amount_features)
    # span = 35 days; only the 21 days of train / assessment windows are looked up, not the 14 gap days
    assert len(labelled) == 35 * 6 and seen == [21 * 6]
    for frame in (sets.train, sets.test, *sets.folds[0]):
        assert np.allclose(frame["tx_amount_feature"], frame["tx_amount"])
    sets.save(tmp_path / "train.parquet", tmp_path / "folds", tmp_path / "test.parquet")
    back = TrainingSets.load(tmp_path / "train.parquet", tmp_path / "folds")
    assert back.plan == plan and back.test.empty and len(back.train) == len(sets.train)
    pd.testing.assert_frame_equal(back.folds[0][1], sets.folds[0][1])


def test_empty_windows_are_reported():
    plan = SplitPlan.create(T, n_validation_folds=3)
    frame = _featured(_daily_transactions(T - timedelta(days=14), 35))
    frame.loc[frame["customer_id"].eq("C0"), "tx_fraud"] = 1
    with pytest.raises(UserError, match=r"validation fold 1 .* must start by 2018-06-27"):
        split_featured(frame, plan)
