"""The feature definitions: the one place that names every feature and says how it is computed.

Design (see docs/features.md):

* **Batch features are daily snapshots.** For entity e and calendar day D (UTC) the snapshot row
  has event timestamp D 00:00:00 and aggregates *complete* days before D only:
  - customer spending over window w: count and sum of the customer's amounts on days D-w .. D-1;
  - terminal risk over window w with the label delay L (= 7 days): count of transactions and of
    frauds on days D-L-w .. D-L-1 (labels of the last L days are not yet known at D).
  A Feast point-in-time join of a transaction at time t picks the snapshot of day floor(t), which is
  exactly what the online store holds after the daily `materialize` for that day. So training and
  serving see identical values; intra-day transactions are not in the batch windows.
* **On-demand (request-time) features** fold the current transaction into the customer windows
  (the current transaction IS counted, as in the Handbook), and add calendar flags and the amount
  relative to the customer's 30-day history. They are computed by `compute_request_features`, the
  single function used by the Feast on-demand feature view, the training set and the predictor.
* **Cold start**: an unknown entity has zero counts and sums (see `BATCH_FEATURE_DEFAULTS`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from fraud.schema import TX_AMOUNT, TX_DATETIME

CUSTOMER_WINDOWS_DAYS: tuple[int, ...] = (1, 7, 30)
TERMINAL_WINDOWS_DAYS: tuple[int, ...] = (1, 7, 30)
#: Days after a transaction until its fraud label is known (the Handbook's delay period).
LABEL_DELAY_DAYS = 7
#: A transaction whose UTC hour is <= this is a night transaction (the Handbook: hour <= 6).
NIGHT_END_HOUR = 6

# --- Feast object names ---------------------------------------------------------------------
CUSTOMER_ENTITY = "customer"
TERMINAL_ENTITY = "terminal"
CUSTOMER_SPENDING_VIEW = "customer_spending_features"
TERMINAL_RISK_VIEW = "terminal_risk_features"
REQUEST_SOURCE = "transaction_request"
REQUEST_FEATURES_VIEW = "transaction_request_features"
FEATURE_SERVICE = "fraud_model_features"
#: Event-timestamp column of both batch feature tables.
SNAPSHOT_TIMESTAMP = "snapshot_ts"
#: Feast time-to-live of a snapshot. One day is the refresh cadence; a second day of tolerance
#: keeps serving (flagged stale) when one daily materialisation is late.
SNAPSHOT_TTL_DAYS = 2

# --- batch feature columns -----------------------------------------------------------------
CUSTOMER_SPENDING_FEATURES: tuple[str, ...] = tuple(
    name for w in CUSTOMER_WINDOWS_DAYS for name in (f"customer_nb_tx_{w}d", f"customer_sum_amount_{w}d")
)
TERMINAL_RISK_FEATURES: tuple[str, ...] = tuple(
    name
    for w in TERMINAL_WINDOWS_DAYS
    for name in (f"terminal_nb_tx_{w}d", f"terminal_nb_fraud_{w}d", f"terminal_risk_{w}d")
)
#: Value of each batch feature for an entity the store does not know (cold start).
BATCH_FEATURE_DEFAULTS: dict[str, float] = {name: 0.0 for name in CUSTOMER_SPENDING_FEATURES + TERMINAL_RISK_FEATURES}

# --- request-time (on-demand) features -----------------------------------------------------
REQUEST_INPUTS: tuple[str, ...] = (TX_AMOUNT, TX_DATETIME)
REQUEST_FEATURES: tuple[str, ...] = (
    "tx_amount_feature",
    "tx_during_weekend",
    "tx_during_night",
    *(name for w in CUSTOMER_WINDOWS_DAYS for name in (f"customer_nb_tx_incl_{w}d", f"customer_avg_amount_incl_{w}d")),
    "amount_to_customer_avg_30d",
)

#: The model's input vector, in order. Training, serving, drift detection and reason codes use it.
MODEL_FEATURES: tuple[str, ...] = (
    *REQUEST_FEATURES,
    *(name for w in TERMINAL_WINDOWS_DAYS for name in (f"terminal_nb_tx_{w}d", f"terminal_risk_{w}d")),
)

#: Human-readable text for each model feature, used in reason codes and the model card.
FEATURE_DESCRIPTIONS: dict[str, str] = {
    "tx_amount_feature": "transaction amount",
    "tx_during_weekend": "transaction on a weekend",
    "tx_during_night": "transaction at night (00:00-06:59 UTC)",
    "customer_nb_tx_incl_1d": "card's number of transactions, previous day and this one",
    "customer_avg_amount_incl_1d": "card's average amount, previous day and this one",
    "customer_nb_tx_incl_7d": "card's number of transactions, previous 7 days and this one",
    "customer_avg_amount_incl_7d": "card's average amount, previous 7 days and this one",
    "customer_nb_tx_incl_30d": "card's number of transactions, previous 30 days and this one",
    "customer_avg_amount_incl_30d": "card's average amount, previous 30 days and this one",
    "amount_to_customer_avg_30d": "amount relative to the card's 30-day average",
    "terminal_nb_tx_1d": "terminal's transactions on 1 day with known labels",
    "terminal_risk_1d": "terminal's fraud share on 1 day with known labels",
    "terminal_nb_tx_7d": "terminal's transactions over 7 days with known labels",
    "terminal_risk_7d": "terminal's fraud share over 7 days with known labels",
    "terminal_nb_tx_30d": "terminal's transactions over 30 days with known labels",
    "terminal_risk_30d": "terminal's fraud share over 30 days with known labels",
}
assert set(FEATURE_DESCRIPTIONS) == set(MODEL_FEATURES)


def compute_request_features(frame: pd.DataFrame) -> pd.DataFrame:
    """Request-time features from the request fields and the customer's batch features.

    `frame` has `tx_amount`, `tx_datetime` (UTC, tz-naive or tz-aware) and the columns of
    `CUSTOMER_SPENDING_FEATURES` (missing values mean cold start and count as 0). Returns a new
    frame with exactly the columns of `REQUEST_FEATURES`, as float64, on the same index.
    """
    amount = frame[TX_AMOUNT].astype("float64")
    when = pd.to_datetime(frame[TX_DATETIME], utc=True)
    out = pd.DataFrame(index=frame.index)
    out["tx_amount_feature"] = amount
    out["tx_during_weekend"] = (when.dt.dayofweek >= 5).astype("float64")
    out["tx_during_night"] = (when.dt.hour <= NIGHT_END_HOUR).astype("float64")
    for w in CUSTOMER_WINDOWS_DAYS:
        count = frame[f"customer_nb_tx_{w}d"].astype("float64").fillna(0.0)
        total = frame[f"customer_sum_amount_{w}d"].astype("float64").fillna(0.0)
        out[f"customer_nb_tx_incl_{w}d"] = count + 1.0
        out[f"customer_avg_amount_incl_{w}d"] = (total + amount) / (count + 1.0)
    count_30 = frame["customer_nb_tx_30d"].astype("float64").fillna(0.0)
    total_30 = frame["customer_sum_amount_30d"].astype("float64").fillna(0.0)
    prior_avg = np.where(count_30 > 0, total_30 / count_30.where(count_30 > 0, 1.0), np.nan)
    ratio = amount.to_numpy() / prior_avg
    out["amount_to_customer_avg_30d"] = np.where(np.isfinite(ratio), ratio, 1.0)
    return out[list(REQUEST_FEATURES)]


def model_feature_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """The model's input matrix (columns = MODEL_FEATURES, float64) from a frame holding the request
    fields and every batch feature. Missing batch values take their cold-start default."""
    batch = frame.reindex(columns=list(CUSTOMER_SPENDING_FEATURES + TERMINAL_RISK_FEATURES))
    batch = batch.astype("float64").fillna(BATCH_FEATURE_DEFAULTS)
    request = compute_request_features(pd.concat([frame[[TX_AMOUNT, TX_DATETIME]], batch], axis=1))
    full = pd.concat([request, batch], axis=1)
    return full[list(MODEL_FEATURES)].astype("float64")
