"""The offline feature tables as ibis expressions: one definition, compiled to DuckDB or Spark SQL.

Every table that `fraud features build` writes is defined here once, over the relation
`RAW_TRANSACTIONS` (the raw transactions, `RAW_COLUMNS`). `compile_sql(expr, engine)` turns an
expression into the SQL of the engine that runs it: DuckDB (the embedded default,
`fraud.features.offline`) or Apache Spark (`fraud.features.spark_engine`). Neither engine has a
hand-written copy of the computation; `tests/test_feature_engines.py` runs both on the same data and
compares the tables row by row.

The semantics are those of `fraud.features.definitions`:

* daily snapshots (customer spending, terminal risk): one row per entity and day D from the
  entity's first activity day through the day after the last transaction day, aggregating complete
  days before D (`RANGE` frames over the integer day number; days without activity are rows too);
* velocity features: for each transaction, its card's (terminal's) transactions strictly before it
  within the window, t - w < e < t (`RANGE BETWEEN w - 1 ns PRECEDING AND 1 PRECEDING` over the
  integer nanosecond timestamp: ties with t are not counted);
* window-state tables: each card's (terminal's) events within the velocity horizon before its last
  transaction, sorted by time then transaction id.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Literal

import ibis
import ibis.expr.operations as ops
import ibis.expr.types as ir

from fraud.features.definitions import (
    CARD_DISTINCT_TERMINALS_WINDOW,
    CARD_RECENT_FIELDS,
    CARD_RECENT_VIEW,
    CARD_VELOCITY_WINDOWS,
    CUSTOMER_SPENDING_FEATURES,
    CUSTOMER_WINDOWS_DAYS,
    LABEL_DELAY_DAYS,
    NS_PER_SECOND,
    SNAPSHOT_TIMESTAMP,
    STATE_TIMESTAMP,
    TERMINAL_RECENT_FIELDS,
    TERMINAL_RECENT_VIEW,
    TERMINAL_RISK_FEATURES,
    TERMINAL_VELOCITY_WINDOWS,
    TERMINAL_WINDOWS_DAYS,
    VELOCITY_FEATURES,
    VELOCITY_HORIZON_S,
)
from fraud.schema import CUSTOMER_ID, TERMINAL_ID, TRANSACTION_ID, TX_AMOUNT, TX_DATETIME, TX_FRAUD

#: The engines that run the expressions.
Engine = Literal["duckdb", "spark"]
ENGINES: tuple[str, ...] = ("duckdb", "spark")
_DIALECTS: dict[str, str] = {"duckdb": "duckdb", "spark": "pyspark"}

#: Name of the raw-transaction relation the expressions read (a view each engine registers).
RAW_TRANSACTIONS = "raw_transactions"
#: The raw columns the feature tables need, and their types.
RAW_COLUMNS: dict[str, str] = {
    TRANSACTION_ID: "string",
    CUSTOMER_ID: "string",
    TERMINAL_ID: "string",
    TX_AMOUNT: "float64",
    TX_FRAUD: "int8",
    TX_DATETIME: "timestamp",
}
#: Column of the velocity table holding the transaction time (UTC ns since the epoch).
TS_NS = "ts_ns"

_EPOCH_DATE = ibis.date(1970, 1, 1)
_EPOCH_TIMESTAMP = ibis.timestamp("1970-01-01 00:00:00")


def raw_transactions(name: str = RAW_TRANSACTIONS) -> ir.Table:
    """The unbound raw-transaction relation the expressions are built on."""
    return ibis.table(RAW_COLUMNS, name=name)


def compile_sql(expr: ir.Expr, engine: str) -> str:
    """The SQL of `expr` for `engine` ("duckdb" or "spark"). A table expression's columns are cast to
    the types of its ibis schema: ibis leaves out a cast to the type it infers, and an engine may
    infer another one (DuckDB sums integers to HUGEINT, which Parquet stores as a double)."""
    if engine not in _DIALECTS:
        raise ValueError(f"unknown engine {engine!r}; expected one of {ENGINES}")
    if engine == "spark":
        _register_spark_options()
    if not isinstance(expr, ir.Table):
        return str(ibis.to_sql(expr, dialect=_DIALECTS[engine]))
    from ibis.backends.sql.datatypes import DuckDBType, PySparkType

    mapper, dialect, quote = (DuckDBType, "duckdb", '"') if engine == "duckdb" else (PySparkType, "spark", "`")
    order = ""
    node = expr.op()
    if isinstance(node, ops.Sort):  # the order applies to the typed result, outermost
        keys = []
        for key in node.keys:
            if not isinstance(key.arg, ops.Field):
                raise ValueError("compile_sql sorts by plain columns only")
            keys.append(f"{quote}{key.arg.name}{quote} {'ASC' if key.ascending else 'DESC'}")
        order = f" ORDER BY {', '.join(keys)}"
        expr = node.parent.to_expr()
    sql = str(ibis.to_sql(expr, dialect=_DIALECTS[engine]))
    columns = ", ".join(
        f"CAST({quote}{name}{quote} AS {mapper.from_ibis(dtype).sql(dialect)}) AS {quote}{name}{quote}"
        for name, dtype in expr.schema().items()
    )
    return f"SELECT {columns} FROM ({sql}) AS typed{order}"  # noqa: S608 - column names and types from the expression


def _register_spark_options() -> None:
    """ibis reads `ibis.options.pyspark` while compiling; it is registered when a backend connects,
    which the Spark engine never does (it runs the compiled SQL on its own session)."""
    if getattr(ibis.options, "pyspark", None) is None:
        from ibis.backends.pyspark import Backend

        Backend.register_options()


# --- shared column expressions --------------------------------------------------------------------


def day_number(timestamp: ir.TimestampValue) -> ir.IntegerValue:
    """Days since 1970-01-01 of a (UTC) timestamp."""
    return timestamp.date().delta(_EPOCH_DATE, unit="day")


def epoch_ns(timestamp: ir.TimestampValue) -> ir.IntegerValue:
    """UTC nanoseconds since the epoch (microsecond precision, as the raw data)."""
    return (timestamp.delta(_EPOCH_TIMESTAMP, unit="microsecond") * 1000).cast("int64")


def _day_start(day_nr: ir.IntegerValue) -> ir.TimestampValue:
    return (_EPOCH_DATE + day_nr.as_interval("D")).cast("timestamp")


# --- daily snapshots ------------------------------------------------------------------------------


def bounds(raw: ir.Table) -> ir.Table:
    """One row: first transaction day number, last snapshot day number (the day after the last
    transaction day) and the number of transactions."""
    day = day_number(raw[TX_DATETIME])
    return raw.aggregate(first_nr=day.min(), last_snapshot_nr=day.max() + 1, nb_tx=raw.count())


def _dense_daily_grid(
    daily_input: ir.Table,
    entity: str,
    measures: Callable[[ir.Table], Mapping[str, ir.Value]],
    last_snapshot_nr: int,
) -> ir.Table:
    """Every (entity, day) from the entity's first activity day to `last_snapshot_nr`, with the
    per-day `measures` (zero on days without activity)."""
    daily = daily_input.group_by([entity, "day_nr"]).aggregate(**measures(daily_input))
    firsts = daily.group_by(entity).aggregate(first_nr=daily.day_nr.min())
    grid = firsts.select(
        firsts[entity], day_nr=ibis.range(firsts.first_nr, ibis.literal(last_snapshot_nr + 1), 1).unnest()
    )
    joined = grid.left_join(daily, [entity, "day_nr"])
    names = [name for name in daily.columns if name not in (entity, "day_nr")]
    return joined.select(joined[entity], joined.day_nr, **{name: joined[name].coalesce(0) for name in names})


def _window_sum(grid: ir.Table, column: str, entity: str, lower: int, upper: int) -> ir.NumericValue:
    """Sum of `column` over the entity's days day_nr - lower .. day_nr - upper."""
    window = ibis.window(group_by=grid[entity], order_by=grid.day_nr, range=(-lower, -upper))
    return grid[column].sum().over(window).coalesce(0)


def customer_spending(raw: ir.Table, last_snapshot_nr: int) -> ir.Table:
    """The customer spending snapshots (columns: customer_id, snapshot_ts, CUSTOMER_SPENDING_FEATURES)."""
    days = raw.select(raw[CUSTOMER_ID], day_nr=day_number(raw[TX_DATETIME]), amount=raw[TX_AMOUNT])
    grid = _dense_daily_grid(
        days,
        CUSTOMER_ID,
        lambda t: {"nb_tx": t.count(), "sum_amount": t.amount.sum()},
        last_snapshot_nr,
    )
    features: dict[str, ir.Value] = {}
    for w in CUSTOMER_WINDOWS_DAYS:
        features[f"customer_nb_tx_{w}d"] = _window_sum(grid, "nb_tx", CUSTOMER_ID, w, 1).cast("int64")
        features[f"customer_sum_amount_{w}d"] = _window_sum(grid, "sum_amount", CUSTOMER_ID, w, 1).cast("float64")
    _check_names(features, CUSTOMER_SPENDING_FEATURES)
    table = grid.select(grid[CUSTOMER_ID], **{SNAPSHOT_TIMESTAMP: _day_start(grid.day_nr)}, **features)
    return table.order_by([SNAPSHOT_TIMESTAMP, CUSTOMER_ID])


def terminal_risk(raw: ir.Table, last_snapshot_nr: int) -> ir.Table:
    """The terminal risk snapshots (columns: terminal_id, snapshot_ts, TERMINAL_RISK_FEATURES)."""
    days = raw.select(raw[TERMINAL_ID], day_nr=day_number(raw[TX_DATETIME]), fraud=raw[TX_FRAUD].cast("int64"))
    grid = _dense_daily_grid(
        days,
        TERMINAL_ID,
        lambda t: {"nb_tx": t.count(), "nb_fraud": t.fraud.sum()},
        last_snapshot_nr,
    )
    counts: dict[str, ir.Value] = {}
    for w in TERMINAL_WINDOWS_DAYS:
        lower, upper = LABEL_DELAY_DAYS + w, LABEL_DELAY_DAYS + 1
        counts[f"terminal_nb_tx_{w}d"] = _window_sum(grid, "nb_tx", TERMINAL_ID, lower, upper).cast("int64")
        counts[f"terminal_nb_fraud_{w}d"] = _window_sum(grid, "nb_fraud", TERMINAL_ID, lower, upper).cast("int64")
    windows = grid.select(grid[TERMINAL_ID], grid.day_nr, **counts)
    features: dict[str, ir.Value] = {}
    for w in TERMINAL_WINDOWS_DAYS:
        nb_tx, nb_fraud = windows[f"terminal_nb_tx_{w}d"], windows[f"terminal_nb_fraud_{w}d"]
        features[f"terminal_nb_tx_{w}d"] = nb_tx
        features[f"terminal_nb_fraud_{w}d"] = nb_fraud
        features[f"terminal_risk_{w}d"] = ibis.ifelse(nb_tx > 0, nb_fraud.cast("float64") / nb_tx, 0.0).cast("float64")
    _check_names(features, TERMINAL_RISK_FEATURES)
    table = windows.select(windows[TERMINAL_ID], **{SNAPSHOT_TIMESTAMP: _day_start(windows.day_nr)}, **features)
    return table.order_by([SNAPSHOT_TIMESTAMP, TERMINAL_ID])


# --- velocity features ----------------------------------------------------------------------------


def _strictly_before(table: ir.Table, entity: str, seconds: int) -> ibis.expr.builders.LegacyWindowBuilder:
    """Frame of the rows of the same entity with t - w < e < t (ts_ns is an integer)."""
    return ibis.window(group_by=table[entity], order_by=table[TS_NS], range=(-(seconds * NS_PER_SECOND - 1), -1))


def velocity(history: ir.Table, requests: ir.Table | None = None, key: str = TRANSACTION_ID) -> ir.Table:
    """Columns `key`, ts_ns, VELOCITY_FEATURES (float64) for each row of `requests` from the
    transactions of `history` strictly before it.

    `history` has transaction_id, customer_id, terminal_id, tx_amount, tx_datetime; `requests` has
    request_key (any type), customer_id, terminal_id, tx_datetime. Without `requests`, every history
    row is a request at its own time, keyed by its transaction_id."""
    own = requests is None
    history_rows = history.select(
        is_history=ibis.literal(True),
        is_request=ibis.literal(own),
        request_key=history[TRANSACTION_ID] if own else ibis.null(requests.request_key.type()),  # type: ignore[union-attr]
        **{
            CUSTOMER_ID: history[CUSTOMER_ID],
            TERMINAL_ID: history[TERMINAL_ID],
            TX_AMOUNT: history[TX_AMOUNT].cast("float64"),
            TS_NS: epoch_ns(history[TX_DATETIME]),
        },
    )
    src = history_rows
    if requests is not None:
        request_rows = requests.select(
            is_history=ibis.literal(False),
            is_request=ibis.literal(True),
            request_key=requests.request_key,
            **{
                CUSTOMER_ID: requests[CUSTOMER_ID],
                TERMINAL_ID: requests[TERMINAL_ID],
                TX_AMOUNT: ibis.null("float64"),
                TS_NS: epoch_ns(requests[TX_DATETIME]),
            },
        )
        src = ibis.union(history_rows, request_rows, distinct=False)

    def history_only(value: ir.Value) -> ir.Value:
        return ibis.ifelse(src.is_history, value, ibis.null(value.type()))

    features: dict[str, ir.Value] = {}
    for label, seconds in CARD_VELOCITY_WINDOWS:
        frame = _strictly_before(src, CUSTOMER_ID, seconds)
        features[f"customer_nb_tx_{label}"] = history_only(ibis.literal(1)).count().over(frame).cast("float64")
        features[f"customer_sum_amount_{label}"] = (
            history_only(src[TX_AMOUNT]).sum().over(frame).coalesce(0.0).cast("float64")
        )
    last = history_only(src[TS_NS]).max().over(_strictly_before(src, CUSTOMER_ID, VELOCITY_HORIZON_S))
    features["customer_seconds_since_last_tx"] = (
        ((src[TS_NS] - last).cast("float64") / NS_PER_SECOND).coalesce(float(VELOCITY_HORIZON_S)).cast("float64")
    )
    label, seconds = CARD_DISTINCT_TERMINALS_WINDOW
    terminals = history_only(src[TERMINAL_ID]).collect().over(_strictly_before(src, CUSTOMER_ID, seconds))
    features[f"customer_nb_terminals_{label}"] = terminals.unique().length().coalesce(0).cast("float64")
    for label, seconds in TERMINAL_VELOCITY_WINDOWS:
        frame = _strictly_before(src, TERMINAL_ID, seconds)
        features[f"terminal_nb_tx_{label}"] = history_only(ibis.literal(1)).count().over(frame).cast("float64")
    _check_names(features, VELOCITY_FEATURES)
    windows = src.select(src.is_request, src.request_key, src[TS_NS], **features)
    requested = windows.filter(windows.is_request)
    return requested.select(
        **{key: requested.request_key, TS_NS: requested[TS_NS]}, **{name: requested[name] for name in VELOCITY_FEATURES}
    )


def _recent_state(raw: ir.Table, entity: str, fields: tuple[str, ...], values: tuple[str, ...]) -> ir.Table:
    src = raw.select(
        raw[TRANSACTION_ID],
        raw[CUSTOMER_ID],
        raw[TERMINAL_ID],
        raw[TX_DATETIME],
        **{TX_AMOUNT: raw[TX_AMOUNT].cast("float64"), TS_NS: epoch_ns(raw[TX_DATETIME])},
    )
    newest = src.group_by(entity).aggregate(last_ns=src[TS_NS].max())
    joined = src.join(newest, entity)
    recent = joined.filter(joined[TS_NS] > joined.last_ns - VELOCITY_HORIZON_S * NS_PER_SECOND)
    lists: dict[str, ir.Value] = {}
    for name, value in zip(fields, values, strict=True):
        # sorted by (time, transaction id): the structs' order, the same in both engines
        ordered = ibis.struct({"t": recent[TS_NS], "id": recent[TRANSACTION_ID], "v": recent[value]}).collect().sort()
        lists[name] = ordered.map(lambda item: item.v)
    state = recent.group_by(recent[entity]).aggregate(**{STATE_TIMESTAMP: recent[TX_DATETIME].max()}, **lists)
    return state.order_by(entity)


def recent_states(raw: ir.Table) -> dict[str, ir.Table]:
    """The window-state tables (by view name) as of each entity's last transaction."""
    return {
        CARD_RECENT_VIEW: _recent_state(
            raw, CUSTOMER_ID, CARD_RECENT_FIELDS, (TS_NS, TX_AMOUNT, TERMINAL_ID, TRANSACTION_ID)
        ),
        TERMINAL_RECENT_VIEW: _recent_state(raw, TERMINAL_ID, TERMINAL_RECENT_FIELDS, (TS_NS, TRANSACTION_ID)),
    }


def _check_names(columns: Mapping[str, object], expected: tuple[str, ...]) -> None:
    if tuple(columns) != expected:  # this module and definitions.py disagree: a programming error
        raise RuntimeError(f"feature expression computes {list(columns)}, definitions.py says {list(expected)}")
