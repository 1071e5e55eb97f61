"""Training beyond memory: keep at most N legitimate transactions per day, weighted back.

Fraud is 0.2-1 % of card transactions, so a training window of a large acquirer is almost all
legitimate rows. `downsample_legit` keeps every fraud and, per calendar day (UTC), each legitimate
transaction with probability p_d = min(1, N / legitimate_d), chosen by a hash of its transaction id
(the same rows whatever the engine, order or process), and gives each kept legitimate row the
weight 1 / p_d (`SAMPLE_WEIGHT`). The weighted sample estimates the same loss as the full window,
so XGBoost's `sample_weight` (and scikit-learn's) train for the original class balance; the
training set stays at most N x days + frauds rows whatever the history.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from fraud.errors import UserError
from fraud.schema import TRANSACTION_ID, TX_DATETIME, TX_FRAUD

#: Column of a training frame holding each row's weight (absent: every row weighs 1).
SAMPLE_WEIGHT = "sample_weight"
_HASH_KEY = "fraud-legit-sample"  # 16 bytes: pandas' hash key


def _uniform(ids: pd.Series, seed: int) -> np.ndarray:
    """A number in [0, 1) per id, fixed by the id and the seed."""
    hashed = pd.util.hash_pandas_object(ids.astype(str) + f"#{seed}", index=False, hash_key=_HASH_KEY[:16])
    return (hashed.to_numpy(dtype=np.uint64) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def downsample_legit(
    frame: pd.DataFrame, legit_per_day: int | None, seed: int = 0, protect: pd.Series | None = None
) -> pd.DataFrame:
    """`frame` with at most `legit_per_day` legitimate rows per day (every fraud kept) and a
    `SAMPLE_WEIGHT` column (legitimate rows of the day / kept ones). None or 0: no sampling, weights 1.

    `protect` (boolean, same index) marks rows that must stay whatever their label, e.g. rows of an
    assessment window; their whole day is then kept (weights 1)."""
    if legit_per_day is not None and legit_per_day < 0:
        raise UserError(f"legit_per_day must be >= 0 (0 = keep everything), got {legit_per_day}")
    if not legit_per_day or frame.empty:
        return frame if SAMPLE_WEIGHT in frame.columns else frame.assign(**{SAMPLE_WEIGHT: 1.0})
    day = pd.to_datetime(frame[TX_DATETIME]).dt.floor("D")
    legit = frame[TX_FRAUD].to_numpy() == 0
    legit_count = pd.Series(legit, index=frame.index).groupby(day).transform("sum").to_numpy(dtype=np.float64)
    kept_count = np.minimum(float(legit_per_day), legit_count)
    if protect is not None:
        protected_day = pd.Series(protect.to_numpy(dtype=bool), index=frame.index).groupby(day).transform("any")
        kept_count = np.where(protected_day.to_numpy(dtype=bool), legit_count, kept_count)
    # rank of each legitimate row's hash within its day (frauds rank after every legitimate row)
    draw = np.where(legit, _uniform(frame[TRANSACTION_ID], seed), 2.0)
    rank = pd.Series(draw, index=frame.index).groupby(day).rank(method="first").to_numpy() - 1.0
    keep = ~legit | (rank < kept_count)
    # a frame sampled before keeps its weights: they compose (a day's legitimate rows share one)
    before = frame[SAMPLE_WEIGHT].to_numpy(dtype=np.float64) if SAMPLE_WEIGHT in frame.columns else 1.0
    weights = np.where(legit, before * legit_count / np.maximum(kept_count, 1.0), before)
    return frame.assign(**{SAMPLE_WEIGHT: weights}).loc[keep]
