"""Downsampling legitimate transactions per day, weighted back in training."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fraud.errors import UserError
from fraud.features.definitions import MODEL_FEATURES
from fraud.schema import TRANSACTION_ID, TX_DATETIME, TX_FRAUD
from fraud.training.models import ModelSpec, fit
from fraud.training.sampling import SAMPLE_WEIGHT, downsample_legit


def _transactions(n: int = 6000, days: int = 6, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            TRANSACTION_ID: [f"TX{i:08d}" for i in range(n)],
            TX_DATETIME: pd.Timestamp("2018-04-01") + pd.to_timedelta(rng.integers(0, days * 86_400, n), unit="s"),
            TX_FRAUD: (rng.random(n) < 0.03).astype("int8"),
        }
    )


def test_keeps_every_fraud_and_at_most_n_legitimate_per_day_weighted_to_the_day_count() -> None:
    frame = _transactions()
    kept = downsample_legit(frame, 200)
    day = kept[TX_DATETIME].dt.date
    legit = kept[kept[TX_FRAUD] == 0]
    assert (legit.groupby(day[legit.index]).size() == 200).all()
    assert kept[TX_FRAUD].sum() == frame[TX_FRAUD].sum()
    assert (kept.loc[kept[TX_FRAUD] == 1, SAMPLE_WEIGHT] == 1.0).all()
    # the weights of the kept legitimate rows add up to the day's legitimate count: an unbiased sample
    full = frame[frame[TX_FRAUD] == 0].groupby(frame[TX_DATETIME].dt.date).size()
    weighted = legit.groupby(day[legit.index])[SAMPLE_WEIGHT].sum()
    pd.testing.assert_series_equal(weighted, full.astype("float64"), check_names=False)


def test_the_same_rows_whatever_the_order_and_a_seed_changes_them() -> None:
    frame = _transactions()
    kept = set(downsample_legit(frame, 100)[TRANSACTION_ID])
    shuffled = frame.sample(frac=1.0, random_state=3)
    assert set(downsample_legit(shuffled, 100)[TRANSACTION_ID]) == kept
    assert set(downsample_legit(frame, 100, seed=1)[TRANSACTION_ID]) != kept


def test_protected_days_and_no_cap_keep_everything() -> None:
    frame = _transactions()
    everything = downsample_legit(frame, None)
    assert len(everything) == len(frame) and (everything[SAMPLE_WEIGHT] == 1.0).all()
    first_day = frame[TX_DATETIME].dt.date == frame[TX_DATETIME].dt.date.min()
    protect = first_day & (frame.index % 50 == 0)  # one protected row protects its whole day
    kept = downsample_legit(frame, 10, protect=protect)
    assert first_day[kept.index].sum() == first_day.sum()
    assert (kept.loc[first_day[kept.index], SAMPLE_WEIGHT] == 1.0).all()
    with pytest.raises(UserError, match="legit_per_day"):
        downsample_legit(frame, -1)


def test_xgboost_uses_the_weights() -> None:
    """A row of weight 2 trains exactly like the row twice: the weights reach XGBoost."""
    rng = np.random.default_rng(5)
    n = 600
    train = pd.DataFrame(rng.normal(size=(n, len(MODEL_FEATURES))), columns=list(MODEL_FEATURES))
    train[TX_FRAUD] = (train[MODEL_FEATURES[0]] + rng.normal(scale=0.5, size=n) > 1.2).astype(int)
    heavy = np.arange(n) % 3 == 0
    weighted = train.assign(**{SAMPLE_WEIGHT: np.where(heavy, 2.0, 1.0)})
    duplicated = pd.concat([train, train[heavy]], ignore_index=True)
    spec = ModelSpec("xgboost", {"max_depth": 3, "n_estimators": 20, "learning_rate": 0.3, "scale_pos_weight": "sqrt"})
    probe = train.drop(columns=[TX_FRAUD])
    np.testing.assert_allclose(
        fit(spec, weighted).predict(probe), fit(spec, duplicated).predict(probe), rtol=1e-5, atol=1e-6
    )
    assert not np.allclose(fit(spec, train).predict(probe), fit(spec, weighted).predict(probe))


def test_training_sets_downsample_training_days_only_before_the_join() -> None:
    """With legit_per_day the join sees fewer rows; assessment and test windows stay whole and only
    the training frames carry weights above 1."""
    from datetime import datetime

    from fraud.schema import CUSTOMER_ID, TERMINAL_ID, TX_AMOUNT
    from fraud.training.dataset import SplitPlan, build_training_sets

    plan = SplitPlan.create(datetime(2018, 7, 25), n_validation_folds=1)
    rng = np.random.default_rng(2)
    n = plan.span.days * 40
    labelled = pd.DataFrame(
        {
            TRANSACTION_ID: [f"TX{i:06d}" for i in range(n)],
            CUSTOMER_ID: [f"C{i % 30}" for i in range(n)],
            TERMINAL_ID: [f"T{i % 17}" for i in range(n)],
            TX_DATETIME: plan.span.start + pd.to_timedelta(np.sort(rng.integers(0, plan.span.days * 86_400, n)), "s"),
            TX_AMOUNT: rng.gamma(2.0, 30.0, n),
            TX_FRAUD: (rng.random(n) < 0.05).astype("int8"),
        }
    )
    labelled["event_timestamp"] = labelled[TX_DATETIME]
    joined: list[int] = []

    def amount_features(entity: pd.DataFrame) -> pd.DataFrame:
        joined.append(len(entity))
        return entity.assign(**{name: entity[TX_AMOUNT].to_numpy() for name in MODEL_FEATURES})

    full = build_training_sets(plan, labelled=labelled, feature_lookup=amount_features)
    sampled = build_training_sets(plan, labelled=labelled, feature_lookup=amount_features, legit_per_day=5)
    assert joined[1] < joined[0]
    pd.testing.assert_frame_equal(sampled.test.drop(columns=[SAMPLE_WEIGHT]), full.test)
    assert (sampled.test[SAMPLE_WEIGHT] == 1.0).all()
    train = sampled.train
    assert train[TX_FRAUD].sum() == full.train[TX_FRAUD].sum()
    assert (train[train[TX_FRAUD] == 0].groupby(train[TX_DATETIME].dt.date).size() <= 5).all()
    assert train.loc[train[TX_FRAUD] == 0, SAMPLE_WEIGHT].sum() == pytest.approx((full.train[TX_FRAUD] == 0).sum())
