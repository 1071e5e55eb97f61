"""Feast data sources: the two daily-snapshot Parquet tables written by `fraud features build`
(fraud.features.offline) and the request source carrying the fields known at authorisation time.

The Parquet paths are below the data directory: that of the settings a `fraud` entry point
activated (`--data-dir`, the pipeline's task settings), else FRAUD_DATA_DIR when it is set, else
the `data/` folder next to this repository - where feature_store.yaml's relative paths point
for the plain Feast CLI, so `feast -c feature_repo apply` works as typed. The source type
follows the profile's offline store (`fraud.feature_store.repo_offline_store`): FileSource for
DuckDB, SparkSource (the same Parquet files) for Feast's Spark offline store and compute engine.
"""

import os
from pathlib import Path

from feast import Field, FileSource, PushSource, RequestSource
from feast.data_source import DataSource
from feast.types import Float64, UnixTimestamp

from fraud.config import DataLayout
from fraud.feature_store import repo_offline_store
from fraud.features.definitions import (
    CARD_RECENT_VIEW,
    CUSTOMER_SPENDING_VIEW,
    REQUEST_SOURCE,
    SNAPSHOT_TIMESTAMP,
    STATE_TIMESTAMP,
    TERMINAL_RECENT_VIEW,
    TERMINAL_RISK_VIEW,
    push_source_name,
)
from fraud.features.offline import customer_features_path, terminal_features_path
from fraud.features.velocity_offline import recent_state_path
from fraud.schema import TX_AMOUNT, TX_DATETIME
from fraud.settings import activated_settings

_activated = activated_settings()
if _activated is not None:
    _layout = _activated.layout
elif os.environ.get("FRAUD_DATA_DIR"):
    _layout = DataLayout.current()
else:
    _layout = DataLayout(Path(__file__).resolve().parent.parent / "data")
_on_spark = repo_offline_store() == "spark"


def _parquet_source(name: str, path: str, timestamp_field: str, description: str = "") -> DataSource:
    """A batch source over one Parquet file, of the type the profile's offline store reads."""
    if _on_spark:
        from feast.infra.offline_stores.contrib.spark_offline_store.spark_source import SparkSource

        return SparkSource(
            name=name, path=path, file_format="parquet", timestamp_field=timestamp_field, description=description
        )
    return FileSource(name=name, path=path, timestamp_field=timestamp_field, description=description)


customer_spending_source = _parquet_source(
    f"{CUSTOMER_SPENDING_VIEW}_source",
    str(customer_features_path(_layout)),
    SNAPSHOT_TIMESTAMP,
    "Daily snapshots of each card's spending over complete previous days.",
)

terminal_risk_source = _parquet_source(
    f"{TERMINAL_RISK_VIEW}_source",
    str(terminal_features_path(_layout)),
    SNAPSHOT_TIMESTAMP,
    "Daily snapshots of each terminal's fraud counts over days whose labels are known.",
)

transaction_request = RequestSource(
    name=REQUEST_SOURCE,
    schema=[
        Field(name=TX_AMOUNT, dtype=Float64, description="Transaction amount."),
        Field(name=TX_DATETIME, dtype=UnixTimestamp, description="Transaction time (UTC)."),
    ],
    description="Fields of the transaction being scored.",
)


def _recent_push_source(view: str, description: str) -> PushSource:
    """Push source of a window-state view; its batch source is the state table `fraud features
    build` writes (each entity's events within the horizon before its last transaction)."""
    return PushSource(
        name=push_source_name(view),
        batch_source=_parquet_source(f"{view}_source", str(recent_state_path(_layout, view)), STATE_TIMESTAMP),
        description=description,
    )


customer_recent_push = _recent_push_source(
    CARD_RECENT_VIEW, "Each card's transactions within the largest velocity window, pushed by the stream aggregator."
)
terminal_recent_push = _recent_push_source(
    TERMINAL_RECENT_VIEW, "Each terminal's transactions within the largest velocity window, pushed by the aggregator."
)
