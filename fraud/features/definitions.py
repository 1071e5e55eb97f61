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

from collections.abc import Sequence

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

# --- real-time velocity features ----------------------------------------------------------------
#
# A velocity value "at transaction t" aggregates the card's (terminal's) transactions strictly
# before t within the window: event time e with t - w < e < t. Transactions with the same
# timestamp as t are not counted (neither path can order them). The online store keeps each
# card's and terminal's recent events within VELOCITY_HORIZON_S (timestamps, amounts, terminal
# ids, transaction ids), pushed by the stream aggregator (fraud.streaming); `velocity_features`
# evaluates the windows at the request time from those arrays. The offline computation
# (fraud.features.velocity_offline, DuckDB window frames) gives every historical transaction the
# same values, and the tests compare it with this function.

#: Card windows (label, seconds): count and sum of amounts over each.
CARD_VELOCITY_WINDOWS: tuple[tuple[str, int], ...] = (("10m", 600), ("1h", 3_600), ("24h", 86_400))
#: Terminal windows (label, seconds): count over each.
TERMINAL_VELOCITY_WINDOWS: tuple[tuple[str, int], ...] = (("10m", 600), ("1h", 3_600))
#: Window (label, seconds) of the card's number of distinct terminals.
CARD_DISTINCT_TERMINALS_WINDOW: tuple[str, int] = ("1h", 3_600)
#: The largest window: how long the online store keeps an event, and the cap of the time since the
#: card's previous transaction (no earlier transaction within it: the cap).
VELOCITY_HORIZON_S = max(s for _, s in CARD_VELOCITY_WINDOWS + TERMINAL_VELOCITY_WINDOWS)
NS_PER_SECOND = 1_000_000_000

CARD_VELOCITY_FEATURES: tuple[str, ...] = (
    *(
        name
        for label, _ in CARD_VELOCITY_WINDOWS
        for name in (f"customer_nb_tx_{label}", f"customer_sum_amount_{label}")
    ),
    "customer_seconds_since_last_tx",
    f"customer_nb_terminals_{CARD_DISTINCT_TERMINALS_WINDOW[0]}",
)
TERMINAL_VELOCITY_FEATURES: tuple[str, ...] = tuple(f"terminal_nb_tx_{label}" for label, _ in TERMINAL_VELOCITY_WINDOWS)
VELOCITY_FEATURES: tuple[str, ...] = CARD_VELOCITY_FEATURES + TERMINAL_VELOCITY_FEATURES

VELOCITY_DESCRIPTIONS: dict[str, str] = {
    **{
        name: text
        for label, _ in CARD_VELOCITY_WINDOWS
        for name, text in (
            (f"customer_nb_tx_{label}", f"card's number of transactions in the last {label}"),
            (f"customer_sum_amount_{label}", f"card's total amount in the last {label}"),
        )
    },
    "customer_seconds_since_last_tx": "seconds since the card's previous transaction (capped at 24h)",
    f"customer_nb_terminals_{CARD_DISTINCT_TERMINALS_WINDOW[0]}": (
        f"card's number of distinct terminals in the last {CARD_DISTINCT_TERMINALS_WINDOW[0]}"
    ),
    **{
        f"terminal_nb_tx_{label}": f"terminal's number of transactions in the last {label}"
        for label, _ in TERMINAL_VELOCITY_WINDOWS
    },
}
if set(VELOCITY_DESCRIPTIONS) != set(VELOCITY_FEATURES):  # a programming error in this module, checked on import
    raise RuntimeError("VELOCITY_DESCRIPTIONS and VELOCITY_FEATURES name different features")
#: Value of each velocity feature for a card / terminal without earlier transactions in the windows.
VELOCITY_DEFAULTS: dict[str, float] = {name: 0.0 for name in VELOCITY_FEATURES} | {
    "customer_seconds_since_last_tx": float(VELOCITY_HORIZON_S)
}

#: The model's input vector, in order. Training, serving, drift detection and reason codes use it.
MODEL_FEATURES: tuple[str, ...] = (
    *REQUEST_FEATURES,
    *(name for w in TERMINAL_WINDOWS_DAYS for name in (f"terminal_nb_tx_{w}d", f"terminal_risk_{w}d")),
    *VELOCITY_FEATURES,
)

#: The model features the Feast feature service serves (the velocity features are evaluated from
#: the window states at request time, and point-in-time from the raw transactions for training).
FEATURE_SERVICE_FEATURES: tuple[str, ...] = tuple(name for name in MODEL_FEATURES if name not in VELOCITY_FEATURES)

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
    **VELOCITY_DESCRIPTIONS,
}
if set(FEATURE_DESCRIPTIONS) != set(MODEL_FEATURES):  # a programming error in this module, checked on import
    raise RuntimeError("FEATURE_DESCRIPTIONS and MODEL_FEATURES name different features")


NS_PER_HOUR = 3_600 * 1_000_000_000
NS_PER_DAY = 24 * NS_PER_HOUR
#: 1970-01-01 was a Thursday: (days since the epoch + 3) % 7 is the ISO weekday - 1 (Monday = 0).
_EPOCH_WEEKDAY = 3


def utc_epoch_ns(values: pd.Series | np.ndarray) -> np.ndarray:
    """Timestamps (tz-naive = UTC, or tz-aware) as int64 nanoseconds since the Unix epoch, UTC."""
    if isinstance(values, np.ndarray) and values.dtype.kind == "M":
        return values.astype("datetime64[ns]").view("int64")
    stamps = pd.to_datetime(pd.Series(values), utc=True).dt.tz_localize(None)
    return stamps.to_numpy(dtype="datetime64[ns]").view("int64")


def request_feature_matrix(amount: np.ndarray, tx_epoch_ns: np.ndarray, customer_batch: np.ndarray) -> np.ndarray:
    """The request-time features as a float64 matrix [n, len(REQUEST_FEATURES)], columns in
    REQUEST_FEATURES order.

    `amount` [n] float64; `tx_epoch_ns` [n] int64 UTC nanoseconds since the epoch (`utc_epoch_ns`);
    `customer_batch` [n, len(CUSTOMER_SPENDING_FEATURES)] in that order, NaN = unknown (cold start,
    counts as 0). This is the one implementation: `compute_request_features` (Feast on-demand view,
    training) wraps it and the predictor calls it on arrays.
    """
    amount = np.asarray(amount, dtype=np.float64)
    epoch_ns = np.asarray(tx_epoch_ns, dtype=np.int64)
    batch = np.nan_to_num(np.asarray(customer_batch, dtype=np.float64), nan=0.0)
    n = len(amount)
    out = np.empty((n, len(REQUEST_FEATURES)), dtype=np.float64)
    days = np.floor_divide(epoch_ns, NS_PER_DAY)
    out[:, 0] = amount
    out[:, 1] = ((days + _EPOCH_WEEKDAY) % 7 >= 5).astype(np.float64)
    out[:, 2] = (np.floor_divide(epoch_ns - days * NS_PER_DAY, NS_PER_HOUR) <= NIGHT_END_HOUR).astype(np.float64)
    for k, _ in enumerate(CUSTOMER_WINDOWS_DAYS):
        count, total = batch[:, 2 * k], batch[:, 2 * k + 1]
        out[:, 3 + 2 * k] = count + 1.0
        out[:, 4 + 2 * k] = (total + amount) / (count + 1.0)
    count_30, total_30 = (
        batch[:, 2 * CUSTOMER_WINDOWS_DAYS.index(30)],
        batch[:, 2 * CUSTOMER_WINDOWS_DAYS.index(30) + 1],
    )
    with np.errstate(divide="ignore", invalid="ignore"):
        prior_avg = np.where(count_30 > 0, total_30 / np.where(count_30 > 0, count_30, 1.0), np.nan)
        ratio = amount / prior_avg
    out[:, -1] = np.where(np.isfinite(ratio), ratio, 1.0)
    return out


#: Where each MODEL_FEATURES column comes from: index into REQUEST_FEATURES + BATCH + VELOCITY features.
_BATCH_FEATURES: tuple[str, ...] = CUSTOMER_SPENDING_FEATURES + TERMINAL_RISK_FEATURES
_MODEL_COLUMNS = np.array(
    [(REQUEST_FEATURES + _BATCH_FEATURES + VELOCITY_FEATURES).index(name) for name in MODEL_FEATURES]
)
_VELOCITY_DEFAULTS = np.array([VELOCITY_DEFAULTS[name] for name in VELOCITY_FEATURES])


def model_feature_matrix(
    amount: np.ndarray, tx_epoch_ns: np.ndarray, batch: np.ndarray, velocity: np.ndarray | None = None
) -> np.ndarray:
    """The model's input matrix [n, len(MODEL_FEATURES)] (float64, MODEL_FEATURES order) from the
    request fields, the batch features `batch` [n, len(CUSTOMER_SPENDING_FEATURES +
    TERMINAL_RISK_FEATURES)] in that order, NaN = unknown entity (cold-start default applies), and
    the velocity features `velocity` [n, len(VELOCITY_FEATURES)] (`velocity_features` per row;
    None or NaN: no earlier transaction known, VELOCITY_DEFAULTS)."""
    batch = np.asarray(batch, dtype=np.float64)
    defaults = np.array([BATCH_FEATURE_DEFAULTS[name] for name in _BATCH_FEATURES])
    batch = np.where(np.isnan(batch), defaults, batch)
    if velocity is None:
        velocity = np.broadcast_to(_VELOCITY_DEFAULTS, (len(batch), len(VELOCITY_FEATURES)))
    else:
        velocity = np.asarray(velocity, dtype=np.float64)
        velocity = np.where(np.isnan(velocity), _VELOCITY_DEFAULTS, velocity)
    request = request_feature_matrix(amount, tx_epoch_ns, batch[:, : len(CUSTOMER_SPENDING_FEATURES)])
    return np.ascontiguousarray(np.concatenate([request, batch, velocity], axis=1)[:, _MODEL_COLUMNS])


def compute_request_features(frame: pd.DataFrame) -> pd.DataFrame:
    """Request-time features from the request fields and the customer's batch features.

    `frame` has `tx_amount`, `tx_datetime` (UTC, tz-naive or tz-aware) and the columns of
    `CUSTOMER_SPENDING_FEATURES` (missing values mean cold start and count as 0). Returns a new
    frame with exactly the columns of `REQUEST_FEATURES`, as float64, on the same index.
    """
    values = request_feature_matrix(
        frame[TX_AMOUNT].to_numpy(dtype=np.float64),
        utc_epoch_ns(frame[TX_DATETIME]),
        frame[list(CUSTOMER_SPENDING_FEATURES)].to_numpy(dtype=np.float64, na_value=np.nan),
    )
    return pd.DataFrame(values, index=frame.index, columns=list(REQUEST_FEATURES))


def model_feature_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """The model's input matrix (columns = MODEL_FEATURES, float64) from a frame holding the request
    fields, the batch features and the velocity features. Missing values (or columns) take their
    cold-start defaults."""
    batch = frame.reindex(columns=list(_BATCH_FEATURES)).to_numpy(dtype=np.float64, na_value=np.nan)
    velocity = frame.reindex(columns=list(VELOCITY_FEATURES)).to_numpy(dtype=np.float64, na_value=np.nan)
    values = model_feature_matrix(
        frame[TX_AMOUNT].to_numpy(dtype=np.float64), utc_epoch_ns(frame[TX_DATETIME]), batch, velocity
    )
    return pd.DataFrame(values, index=frame.index, columns=list(MODEL_FEATURES))


def velocity_features(
    request_ns: int,
    card_ts_ns: np.ndarray,
    card_amounts: np.ndarray,
    card_terminals: Sequence[str],
    terminal_ts_ns: np.ndarray,
) -> np.ndarray:
    """The velocity features of one transaction at `request_ns` (int UTC ns since the epoch), in
    VELOCITY_FEATURES order, from the card's recent events (timestamps [k] int64 ns, amounts [k],
    terminal ids [k]) and the terminal's recent event timestamps [m]. The arrays may hold events at
    or after `request_ns` and older than any window: only t - w < e < t counts. This is the one
    implementation; the offline DuckDB computation is tested equal to it."""
    card_ts = np.asarray(card_ts_ns, dtype=np.int64)
    amounts = np.asarray(card_amounts, dtype=np.float64)
    terminal_ts = np.asarray(terminal_ts_ns, dtype=np.int64)
    t = int(request_ns)
    out = np.empty(len(VELOCITY_FEATURES), dtype=np.float64)
    before = card_ts < t
    k = 0
    for _, seconds in CARD_VELOCITY_WINDOWS:
        inside = before & (card_ts > t - seconds * NS_PER_SECOND)
        out[k] = float(np.count_nonzero(inside))
        out[k + 1] = float(np.sum(amounts[inside])) if out[k] else 0.0
        k += 2
    horizon = before & (card_ts > t - VELOCITY_HORIZON_S * NS_PER_SECOND)
    out[k] = (t - int(card_ts[horizon].max())) / NS_PER_SECOND if horizon.any() else float(VELOCITY_HORIZON_S)
    inside = before & (card_ts > t - CARD_DISTINCT_TERMINALS_WINDOW[1] * NS_PER_SECOND)
    out[k + 1] = float(len({card_terminals[i] for i in np.flatnonzero(inside).tolist()}))
    k += 2
    terminal_before = terminal_ts < t
    for _, seconds in TERMINAL_VELOCITY_WINDOWS:
        out[k] = float(np.count_nonzero(terminal_before & (terminal_ts > t - seconds * NS_PER_SECOND)))
        k += 1
    return out


# --- online window state of the velocity features (Feast push sources, written by the stream
# aggregator, read by the predictor) --------------------------------------------------------------
CARD_RECENT_VIEW = "customer_recent_transactions"
TERMINAL_RECENT_VIEW = "terminal_recent_transactions"
#: Event timestamp of a window state row: when the aggregator wrote it (strictly increasing per
#: entity, so Feast's online write never drops a newer state as "older").
STATE_TIMESTAMP = "state_ts"
#: Fields of the card's state: its events within VELOCITY_HORIZON_S, sorted by time.
CARD_RECENT_FIELDS: tuple[str, ...] = (
    "customer_recent_ts_ns",
    "customer_recent_amounts",
    "customer_recent_terminals",
    "customer_recent_transaction_ids",
)
TERMINAL_RECENT_FIELDS: tuple[str, ...] = ("terminal_recent_ts_ns", "terminal_recent_transaction_ids")


def push_source_name(view: str) -> str:
    """Name of the Feast push source feeding a window-state view."""
    return f"{view}_push"
