"""The per-transaction velocity table and the window-state tables: paths, and the velocity features
of arbitrary request rows (training sets, tests).

Each transaction gets the values the online path (the stream aggregator's windows read by the
predictor through `fraud.features.definitions.velocity_features`) had at its timestamp: all
strictly earlier transactions of its card / terminal with t - w < e < t. The computation is the ibis
expression `fraud.features.tables.velocity` (window frames over the integer nanosecond timestamp,
`RANGE BETWEEN w - 1 ns PRECEDING AND 1 PRECEDING`: ties with t are not counted); `fraud features
build` writes it for every transaction on DuckDB or Spark, `velocity_frame` runs it on DuckDB for
given request rows.

`tests/test_feature_velocity.py` compares the result with `velocity_features` on every row.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import ibis
import numpy as np
import pandas as pd

from fraud.config import DataLayout
from fraud.errors import UserError
from fraud.features import tables
from fraud.features.definitions import VELOCITY_FEATURES
from fraud.schema import CUSTOMER_ID, TERMINAL_ID, TRANSACTION_ID, TX_AMOUNT, TX_DATETIME

#: File name (under features/) of the per-transaction velocity table.
VELOCITY_TABLE = "transaction_velocity_features"
#: Columns of that table: the transaction, its time (UTC ns since the epoch) and its features.
VELOCITY_COLUMNS: tuple[str, ...] = (TRANSACTION_ID, "ts_ns", *VELOCITY_FEATURES)


def velocity_features_path(layout: DataLayout) -> Path:
    """Parquet file of the per-transaction velocity features (VELOCITY_COLUMNS), written by `fraud features build`."""
    return layout.features / f"{VELOCITY_TABLE}.parquet"


_HISTORY_SCHEMA = {CUSTOMER_ID: "string", TERMINAL_ID: "string", TX_AMOUNT: "float64", TX_DATETIME: "timestamp"}
_REQUEST_SCHEMA = {"request_key": "int64", CUSTOMER_ID: "string", TERMINAL_ID: "string", TX_DATETIME: "timestamp"}


def velocity_frame(transactions: pd.DataFrame, requests: pd.DataFrame | None = None, threads: int = 2) -> pd.DataFrame:
    """VELOCITY_FEATURES for each row of `requests` (same index and order) from `transactions`
    strictly before it. Without `requests`: for each transaction at its own time, with its
    transaction_id as first column (VELOCITY_COLUMNS). Both frames need customer_id, terminal_id,
    tx_amount (transactions only) and tx_datetime (tz-naive or tz-aware UTC)."""
    needed = (CUSTOMER_ID, TERMINAL_ID, TX_AMOUNT, TX_DATETIME)
    missing = [c for c in (TRANSACTION_ID, *needed) if c not in transactions]
    if missing:
        raise UserError(f"transactions lack column(s) {missing}")
    own = requests is None
    if requests is None:
        requests = transactions
    missing = [c for c in (CUSTOMER_ID, TERMINAL_ID, TX_DATETIME) if c not in requests]
    if missing:
        raise UserError(f"requests lack column(s) {missing}")
    history = transactions[list(needed)].assign(**{TX_DATETIME: _naive_utc(transactions[TX_DATETIME])})
    asked = pd.DataFrame(
        {
            "request_key": np.arange(len(requests), dtype=np.int64),
            CUSTOMER_ID: requests[CUSTOMER_ID].astype(str).to_numpy(),
            TERMINAL_ID: requests[TERMINAL_ID].astype(str).to_numpy(),
            TX_DATETIME: _naive_utc(requests[TX_DATETIME]).to_numpy(),
        }
    )
    con = duckdb.connect(database=":memory:")
    try:
        con.execute(f"SET threads = {int(threads)}")
        con.register("velocity_history", history)
        con.register("velocity_requests", asked)
        expr = tables.velocity(
            ibis.table(_HISTORY_SCHEMA, name="velocity_history"),
            ibis.table(_REQUEST_SCHEMA, name="velocity_requests"),
            key="request_key",
        ).order_by("request_key")
        result = con.execute(tables.compile_sql(expr, "duckdb")).df()
    finally:
        con.close()
    result = result.drop(columns=["request_key", "ts_ns"])
    result.index = requests.index
    if own:
        result.insert(0, TRANSACTION_ID, transactions[TRANSACTION_ID].to_numpy())
    return result


def _naive_utc(values: pd.Series) -> pd.Series:
    stamps = pd.to_datetime(values, utc=True).dt.tz_localize(None)
    return stamps.astype("datetime64[us]")


def recent_state_path(layout: DataLayout, view: str) -> Path:
    """Parquet file of a window-state view's batch source (CARD_RECENT_VIEW / TERMINAL_RECENT_VIEW):
    each entity's events within the horizon before its last transaction."""
    return layout.features / f"{view}.parquet"


def read_velocity_features(layout: DataLayout) -> pd.DataFrame:
    """The per-transaction velocity table (VELOCITY_COLUMNS)."""
    path = velocity_features_path(layout)
    if not path.is_file():
        raise UserError(f"velocity feature table {path} does not exist (run `fraud features build` first)")
    return pd.read_parquet(path)
