"""Feast feature views of the fraud model.

* `customer_spending_features`, `terminal_risk_features`: batch views over the daily snapshots
  (fraud.features.offline). TTL = SNAPSHOT_TTL_DAYS, so a point-in-time join never reaches back
  further than the refresh cadence plus one day of tolerance.
* `transaction_request_features`: on-demand view folding the scored transaction into the
  customer windows. Its UDF delegates to fraud.features.definitions.compute_request_features,
  the single implementation also used by the training set builder and the predictor.
* `fraud_model_features`: the feature service giving FEATURE_SERVICE_FEATURES (MODEL_FEATURES but
  the velocity features, which come from the window-state views).

Every name comes from fraud.features.definitions / fraud.schema.
"""

from datetime import timedelta

import pandas as pd
from data_sources import (
    customer_recent_push,
    customer_spending_source,
    terminal_recent_push,
    terminal_risk_source,
    transaction_request,
)
from entities import customer, terminal
from feast import FeatureService, FeatureView, Field
from feast.on_demand_feature_view import on_demand_feature_view
from feast.types import Array, Float64, Int64, PrimitiveFeastType, String

from fraud.features.definitions import (
    CARD_RECENT_FIELDS,
    CARD_RECENT_VIEW,
    CUSTOMER_SPENDING_FEATURES,
    CUSTOMER_SPENDING_VIEW,
    FEATURE_SERVICE,
    FEATURE_SERVICE_FEATURES,
    REQUEST_FEATURES,
    REQUEST_FEATURES_VIEW,
    SNAPSHOT_TTL_DAYS,
    TERMINAL_RECENT_FIELDS,
    TERMINAL_RECENT_VIEW,
    TERMINAL_RISK_FEATURES,
    TERMINAL_RISK_VIEW,
)


def _batch_dtype(feature: str) -> PrimitiveFeastType:
    """Counts (`*_nb_*`) are integers in the snapshot tables; sums and risks are floats."""
    return Int64 if "_nb_" in feature else Float64


def _batch_schema(features: tuple[str, ...]) -> list[Field]:
    return [Field(name=name, dtype=_batch_dtype(name)) for name in features]


customer_spending_features = FeatureView(
    name=CUSTOMER_SPENDING_VIEW,
    entities=[customer],
    ttl=timedelta(days=SNAPSHOT_TTL_DAYS),
    schema=_batch_schema(CUSTOMER_SPENDING_FEATURES),
    source=customer_spending_source,
    online=True,
    description="Card spending (count, sum) over complete previous days; daily snapshot at 00:00 UTC.",
)

terminal_risk_features = FeatureView(
    name=TERMINAL_RISK_VIEW,
    entities=[terminal],
    ttl=timedelta(days=SNAPSHOT_TTL_DAYS),
    schema=_batch_schema(TERMINAL_RISK_FEATURES),
    source=terminal_risk_source,
    online=True,
    description="Terminal fraud counts and share over days with known labels; daily snapshot at 00:00 UTC.",
)


_RECENT_TYPES = {"ts_ns": Array(Int64), "amounts": Array(Float64), "terminals": Array(String)}


def _recent_schema(fields: tuple[str, ...]) -> list[Field]:
    """Window-state fields: parallel arrays sorted by time (ids are strings)."""
    return [Field(name=name, dtype=_RECENT_TYPES.get(name.split("_recent_")[1], Array(String))) for name in fields]


# Window state of the velocity features: written through the push sources by the stream aggregator
# (fraud.streaming), evaluated at request time by fraud.features.definitions.velocity_features.
# No TTL: the function keeps only events inside each window of the request time.
customer_recent_transactions = FeatureView(
    name=CARD_RECENT_VIEW,
    entities=[customer],
    ttl=timedelta(0),
    schema=_recent_schema(CARD_RECENT_FIELDS),
    source=customer_recent_push,
    online=True,
    description="Card's transactions within the largest velocity window (timestamps, amounts, terminals, ids).",
)

terminal_recent_transactions = FeatureView(
    name=TERMINAL_RECENT_VIEW,
    entities=[terminal],
    ttl=timedelta(0),
    schema=_recent_schema(TERMINAL_RECENT_FIELDS),
    source=terminal_recent_push,
    online=True,
    description="Terminal's transactions within the largest velocity window (timestamps, ids).",
)


@on_demand_feature_view(
    name=REQUEST_FEATURES_VIEW,
    sources=[customer_spending_features, transaction_request],
    # No per-field descriptions: Feast checks the declared schema against the inferred one with
    # Field equality, which includes the description.
    schema=[Field(name=name, dtype=Float64) for name in REQUEST_FEATURES],
    mode="pandas",
    description="Request-time features: the scored transaction folded into the card's windows.",
)
def transaction_request_features(inputs: pd.DataFrame) -> pd.DataFrame:
    # Imports inside the body: Feast stores this function's source in the registry and serving
    # processes rebuild it by exec'ing that source in a namespace holding only pd/np, so the body
    # imports the one implementation by name (the `fraud` package must be installed there).
    from pandas.api.types import is_numeric_dtype

    from fraud.features.definitions import compute_request_features
    from fraud.schema import TX_DATETIME

    when = inputs[TX_DATETIME]
    if is_numeric_dtype(when):  # UnixTimestamp request values may arrive as epoch seconds
        inputs = inputs.assign(**{TX_DATETIME: pd.to_datetime(when, unit="s", utc=True)})
    return compute_request_features(inputs)


fraud_model_features = FeatureService(
    name=FEATURE_SERVICE,
    features=[
        transaction_request_features,
        terminal_risk_features[[name for name in FEATURE_SERVICE_FEATURES if name in TERMINAL_RISK_FEATURES]],
    ],
    description="The fraud model's input vector but the velocity features (definitions.FEATURE_SERVICE_FEATURES).",
)
