"""Offline computation of the real-time velocity features for every historical transaction.

Each transaction gets the values the online path (the stream aggregator's windows read by the
predictor through `fraud.features.definitions.velocity_features`) had at its timestamp: all
strictly earlier transactions of its card / terminal with t - w < e < t. DuckDB computes them with
window frames over the integer nanosecond timestamp:

    RANGE BETWEEN (w - 1 ns) PRECEDING AND CURRENT ROW EXCLUDE GROUP

`(w - 1 ns) PRECEDING` is e >= t - w + 1 ns, i.e. e > t - w; `EXCLUDE GROUP` drops the row itself
and every row with the same timestamp (strictly earlier only). The time since the previous
transaction is t minus the frame's maximum over the largest window (capped there, as online).

`tests/test_feature_velocity.py` compares the result with `velocity_features` on every row.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd

from fraud import atomic
from fraud.config import DataLayout
from fraud.errors import UserError
from fraud.features.definitions import (
    CARD_DISTINCT_TERMINALS_WINDOW,
    CARD_RECENT_FIELDS,
    CARD_RECENT_VIEW,
    CARD_VELOCITY_WINDOWS,
    NS_PER_SECOND,
    STATE_TIMESTAMP,
    TERMINAL_RECENT_FIELDS,
    TERMINAL_RECENT_VIEW,
    TERMINAL_VELOCITY_WINDOWS,
    VELOCITY_FEATURES,
    VELOCITY_HORIZON_S,
)
from fraud.schema import CUSTOMER_ID, TERMINAL_ID, TRANSACTION_ID, TX_AMOUNT, TX_DATETIME

#: File name (under features/) of the per-transaction velocity table.
VELOCITY_TABLE = "transaction_velocity_features"
#: Columns of that table: the transaction, its time (UTC ns since the epoch) and its features.
VELOCITY_COLUMNS: tuple[str, ...] = (TRANSACTION_ID, "ts_ns", *VELOCITY_FEATURES)


def velocity_features_path(layout: DataLayout) -> Path:
    """Parquet file of the per-transaction velocity features written by `build_velocity_features`."""
    return layout.features / f"{VELOCITY_TABLE}.parquet"


def _frame(entity: str, seconds: int) -> str:
    return (
        f"(PARTITION BY {entity} ORDER BY ts_ns RANGE BETWEEN {seconds * NS_PER_SECOND - 1} PRECEDING "
        "AND CURRENT ROW EXCLUDE GROUP)"
    )


_INPUT_COLUMNS = (TRANSACTION_ID, CUSTOMER_ID, TERMINAL_ID, TX_AMOUNT, TX_DATETIME)


def velocity_sql(history: str, requests: str | None = None, key: str = "request_key") -> str:
    """SELECT of `request_key` + VELOCITY_FEATURES (DOUBLE) for each row of `requests` from the
    transactions of `history` (both relations with customer_id, terminal_id, tx_amount, tx_datetime
    as TIMESTAMP UTC; `requests` also `request_key`, `history` also transaction_id). Only history
    rows count, strictly before each request. Without `requests`, every history row is a request
    at its own time and `request_key` is its transaction_id. The key column is named `key`."""
    if requests is None:
        requests = f"(SELECT {TRANSACTION_ID} AS request_key, * FROM {history})"  # noqa: S608 - relation and column names from this module's constants, no user values
    history_only = "CASE WHEN is_history THEN {} END"
    columns = []
    for label, seconds in CARD_VELOCITY_WINDOWS:
        frame = _frame(CUSTOMER_ID, seconds)
        columns.append(f"(count({history_only.format(1)}) OVER {frame})::DOUBLE AS customer_nb_tx_{label}")
        columns.append(
            f"coalesce(sum({history_only.format(TX_AMOUNT)}) OVER {frame}, 0)::DOUBLE AS customer_sum_amount_{label}"
        )
    last = f"max({history_only.format('ts_ns')}) OVER {_frame(CUSTOMER_ID, VELOCITY_HORIZON_S)}"
    columns.append(
        f"coalesce((ts_ns - {last})::DOUBLE / {NS_PER_SECOND}, {float(VELOCITY_HORIZON_S)})::DOUBLE "
        "AS customer_seconds_since_last_tx"
    )
    label, seconds = CARD_DISTINCT_TERMINALS_WINDOW
    columns.append(
        f"(count(DISTINCT {history_only.format(TERMINAL_ID)}) OVER {_frame(CUSTOMER_ID, seconds)})::DOUBLE "
        f"AS customer_nb_terminals_{label}"
    )
    for label, seconds in TERMINAL_VELOCITY_WINDOWS:
        columns.append(
            f"(count({history_only.format(1)}) OVER {_frame(TERMINAL_ID, seconds)})::DOUBLE AS terminal_nb_tx_{label}"
        )
    names = [c.rsplit(" AS ", 1)[1] for c in columns]
    if names != list(VELOCITY_FEATURES):  # the SQL and definitions.py disagree: a programming error
        raise RuntimeError(f"velocity SQL computes {names}, definitions.py says {list(VELOCITY_FEATURES)}")
    select = ",\n           ".join(columns)
    return f"""
    WITH src AS (
        SELECT TRUE AS is_history, NULL AS request_key, {CUSTOMER_ID}, {TERMINAL_ID},
               {TX_AMOUNT}::DOUBLE AS {TX_AMOUNT}, epoch_ns({TX_DATETIME}::TIMESTAMP) AS ts_ns
        FROM {history}
        UNION ALL
        SELECT FALSE, request_key, {CUSTOMER_ID}, {TERMINAL_ID}, NULL, epoch_ns({TX_DATETIME}::TIMESTAMP)
        FROM {requests}
    ), windows AS (
        SELECT is_history, request_key, ts_ns,
           {select}
        FROM src
    )
    SELECT request_key AS {key}, ts_ns, {", ".join(VELOCITY_FEATURES)} FROM windows WHERE NOT is_history
    """  # noqa: S608 - relation and column names from this module's constants, no user values


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
        result = con.execute(
            f"SELECT * FROM ({velocity_sql('velocity_history', 'velocity_requests')}) ORDER BY request_key"  # noqa: S608 - relation and column names from this module's constants, no user values
        ).df()
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


def _recent_state_sql(source: str, entity: str, fields: Sequence[str], values: Sequence[str]) -> str:
    lists = ", ".join(
        f"list({value} ORDER BY ts_ns, {TRANSACTION_ID}) AS {name}" for name, value in zip(fields, values, strict=True)
    )
    return f"""
    WITH src AS (
        SELECT {TRANSACTION_ID}, {CUSTOMER_ID}, {TERMINAL_ID}, {TX_AMOUNT}::DOUBLE AS {TX_AMOUNT},
               epoch_ns({TX_DATETIME}::TIMESTAMP) AS ts_ns
        FROM {source}
    ), newest AS (SELECT {entity}, max(ts_ns) AS last_ns FROM src GROUP BY {entity})
    SELECT {entity}, make_timestamp(max(last_ns) // 1000) AS {STATE_TIMESTAMP}, {lists}
    FROM src JOIN newest USING ({entity})
    WHERE ts_ns > last_ns - {VELOCITY_HORIZON_S * NS_PER_SECOND}
    GROUP BY {entity}
    ORDER BY {entity}
    """  # noqa: S608 - relation and column names from this module's constants, no user values


def recent_state_queries(source: str) -> dict[str, str]:
    """The window-state tables (by view name) as of each entity's last transaction."""
    return {
        CARD_RECENT_VIEW: _recent_state_sql(
            source, CUSTOMER_ID, CARD_RECENT_FIELDS, ("ts_ns", TX_AMOUNT, TERMINAL_ID, TRANSACTION_ID)
        ),
        TERMINAL_RECENT_VIEW: _recent_state_sql(source, TERMINAL_ID, TERMINAL_RECENT_FIELDS, ("ts_ns", TRANSACTION_ID)),
    }


def _copy(con: duckdb.DuckDBPyConnection, query: str, target: Path) -> None:
    with atomic.replacing(target, suffix=".parquet.tmp") as temp:
        con.execute(f"COPY ({query}) TO '{temp}' (FORMAT parquet, COMPRESSION zstd, OVERWRITE true)")


def build_velocity_features(
    files: Sequence[Path], layout: DataLayout, memory_limit: str = "2GB", threads: int = 2
) -> Path:
    """Compute the velocity features of every transaction in the raw Parquet `files` and write
    them to `velocity_features_path(layout)`, and the window-state tables (the batch sources of the
    push-fed views) to `recent_state_path` (each a temporary file, then renamed)."""
    target = velocity_features_path(layout)
    target.parent.mkdir(parents=True, exist_ok=True)
    quoted = ", ".join("'" + str(path).replace("'", "''") + "'" for path in files)
    source = f"read_parquet([{quoted}], hive_partitioning = false)"
    con = duckdb.connect(database=":memory:")
    try:
        con.execute(f"SET memory_limit = '{memory_limit}'")
        con.execute(f"SET threads = {int(threads)}")
        con.execute("SET preserve_insertion_order = false")
        _copy(
            con,
            velocity_sql(source, key=TRANSACTION_ID),
            target,
        )
        for view, query in recent_state_queries(source).items():
            _copy(con, query, recent_state_path(layout, view))
    finally:
        con.close()
    return target


def read_velocity_features(layout: DataLayout) -> pd.DataFrame:
    """The per-transaction velocity table (VELOCITY_COLUMNS)."""
    path = velocity_features_path(layout)
    if not path.is_file():
        raise UserError(f"velocity feature table {path} does not exist (run `fraud features build` first)")
    return pd.read_parquet(path)
