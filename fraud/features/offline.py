"""Offline computation of the feature tables from the raw transactions, on DuckDB or Apache Spark.

The semantics are those of `fraud.features.definitions` (read its docstring): one *daily snapshot*
row per entity and calendar day D, event timestamp D 00:00:00, aggregating complete days before D.

* customer spending, window w: count and sum of amounts on days D-w .. D-1;
* terminal risk, window w, label delay L: count of transactions and of frauds on days
  D-L-w .. D-L-1, and their ratio (0 when there is no transaction).

Each entity gets one row per day from its first activity day through the day after the last
transaction day of the dataset, so that after the daily materialisation the online store holds
"today's" snapshot. Days without activity are rows too (the windows slide over them). The build
also writes the per-transaction velocity table and the window-state tables
(`fraud.features.velocity_offline`).

How: every table is one ibis expression (`fraud.features.tables`), compiled to the SQL of the
engine that runs it. DuckDB (the default) reads the Parquet day partitions directly and writes each
table with `COPY ... TO` into a temporary file next to the target, then renames it; Spark
(`fraud.features.spark_engine`) writes the same file, schema and row order the same way.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path

import duckdb
import ibis
import pandas as pd

from fraud.config import DataLayout
from fraud.errors import UserError
from fraud.features import tables
from fraud.features.definitions import (
    CUSTOMER_SPENDING_FEATURES,
    CUSTOMER_SPENDING_VIEW,
    SNAPSHOT_TIMESTAMP,
    TERMINAL_RISK_FEATURES,
    TERMINAL_RISK_VIEW,
)
from fraud.features.spark_engine import SparkSettings
from fraud.features.velocity_offline import VELOCITY_TABLE, recent_state_path, velocity_features_path
from fraud.schema import (
    CUSTOMER_ID,
    TERMINAL_ID,
    TRANSACTION_ID,
    TX_AMOUNT,
    TX_DATETIME,
    TX_FRAUD,
    TX_FRAUD_SCENARIO,
)

#: Column of the entity dataframe that Feast uses as the point-in-time of each row.
EVENT_TIMESTAMP = "event_timestamp"
#: Columns of the labelled entity dataframe returned by `labelled_transactions`.
LABELLED_TRANSACTION_COLUMNS: tuple[str, ...] = (
    TRANSACTION_ID,
    CUSTOMER_ID,
    TERMINAL_ID,
    EVENT_TIMESTAMP,
    TX_DATETIME,
    TX_AMOUNT,
    TX_FRAUD,
    TX_FRAUD_SCENARIO,
)

_PARTITION_PATTERN = re.compile(r"^day=(\d{4}-\d{2}-\d{2})$")
_PARTITION_FILE_GLOB = "*.parquet"


def customer_features_path(layout: DataLayout) -> Path:
    """Parquet file of the customer spending snapshots (the Feast FileSource of that view)."""
    return layout.features / f"{CUSTOMER_SPENDING_VIEW}.parquet"


def terminal_features_path(layout: DataLayout) -> Path:
    """Parquet file of the terminal risk snapshots (the Feast FileSource of that view)."""
    return layout.features / f"{TERMINAL_RISK_VIEW}.parquet"


@dataclass(frozen=True)
class DuckDBSettings:
    """Resource limits of the DuckDB connection that computes the features."""

    memory_limit: str = "2GB"
    threads: int = 2

    @classmethod
    def from_env(cls) -> DuckDBSettings:
        """FRAUD_DUCKDB_MEMORY_LIMIT (e.g. "2GB") and FRAUD_DUCKDB_THREADS override the defaults."""
        threads_text = os.environ.get("FRAUD_DUCKDB_THREADS", str(cls.threads))
        try:
            threads = int(threads_text)
        except ValueError:
            raise UserError(f"FRAUD_DUCKDB_THREADS must be an integer, got {threads_text!r}") from None
        if threads < 1:
            raise UserError(f"FRAUD_DUCKDB_THREADS must be >= 1, got {threads}")
        return cls(memory_limit=os.environ.get("FRAUD_DUCKDB_MEMORY_LIMIT", cls.memory_limit), threads=threads)


@dataclass(frozen=True)
class FeatureTable:
    """One written feature table."""

    name: str
    path: Path
    rows: int
    entities: int


@dataclass(frozen=True)
class FeatureBuildResult:
    """What `build_offline_features` wrote."""

    customer: FeatureTable
    terminal: FeatureTable
    transactions: int
    first_day: date
    last_day: date
    seconds: float
    #: the per-transaction velocity table (fraud.features.velocity_offline)
    velocity_path: Path | None = None
    #: the engine that computed the tables ("duckdb" or "spark")
    engine: str = "duckdb"

    @property
    def tables(self) -> tuple[FeatureTable, FeatureTable]:
        return (self.customer, self.terminal)


# --- raw data discovery --------------------------------------------------------------------------


def transaction_partitions(layout: DataLayout) -> dict[date, list[Path]]:
    """The day partitions of the raw transactions and their Parquet files, by day (sorted)."""
    root = layout.transactions
    if not root.is_dir():
        raise UserError(f"no raw transactions: {root} does not exist (run `fraud simulate` first)")
    partitions: dict[date, list[Path]] = {}
    for child in root.iterdir():
        match = _PARTITION_PATTERN.match(child.name)
        if not child.is_dir() or match is None:
            continue
        files = sorted(child.glob(_PARTITION_FILE_GLOB))
        if files:
            partitions[date.fromisoformat(match.group(1))] = files
    if not partitions:
        raise UserError(
            f"no raw transactions: {root} holds no day=YYYY-MM-DD/*.parquet partitions (run `fraud simulate` first)"
        )
    return dict(sorted(partitions.items()))


def _sql_file_list(files: Sequence[Path]) -> str:
    quoted = ", ".join("'" + str(path).replace("'", "''") + "'" for path in files)
    return f"[{quoted}]"


def _connect(settings: DuckDBSettings, spill_dir: Path | None = None) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect(database=":memory:")
    con.execute(f"SET memory_limit = '{settings.memory_limit}'")
    con.execute(f"SET threads = {int(settings.threads)}")
    con.execute("SET preserve_insertion_order = false")
    if spill_dir is not None:
        con.execute(f"SET temp_directory = '{spill_dir}'")
    return con


# --- running the expressions -----------------------------------------------------------------------


def _register_raw(con: duckdb.DuckDBPyConnection, files: Sequence[Path]) -> None:
    """The raw transaction files as the relation the expressions of `fraud.features.tables` read."""
    columns = ", ".join(tables.RAW_COLUMNS)
    con.execute(
        f"CREATE TEMP VIEW {tables.RAW_TRANSACTIONS} AS SELECT {columns} "  # noqa: S608 - column-name constants and paths quoted by _sql_file_list, no user values
        f"FROM read_parquet({_sql_file_list(files)}, hive_partitioning = false)"
    )


def _copy_atomically(con: duckdb.DuckDBPyConnection, query: str, target: Path) -> None:
    """COPY the query result into a temporary Parquet file next to `target`, then rename it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=".parquet.tmp", dir=target.parent)
    os.close(handle)
    temp = Path(temp_name)
    try:
        con.execute(
            f"COPY ({query}) TO '{temp}' (FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE 122880, OVERWRITE true)"
        )
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def _table_summary(
    con: duckdb.DuckDBPyConnection, name: str, path: Path, entity: str, features: Sequence[str]
) -> FeatureTable:
    describe = f"DESCRIBE SELECT * FROM read_parquet({_sql_file_list([path])})"  # noqa: S608 - path quoted by _sql_file_list
    written = [row[0] for row in con.execute(describe).fetchall()]
    expected = [entity, SNAPSHOT_TIMESTAMP, *features]
    if written != expected:  # the expressions and definitions.py disagree: a programming error, never user input
        raise RuntimeError(f"{path} has columns {written}, definitions.py says {expected}")
    rows, entities = con.execute(
        f"SELECT count(*), count(DISTINCT {entity}) FROM read_parquet({_sql_file_list([path])})"  # noqa: S608 - column-name constants and paths quoted by _sql_file_list, no user values
    ).fetchone()
    return FeatureTable(name=name, path=path, rows=int(rows), entities=int(entities))


ProgressCallback = Callable[[str], None]


def feature_table_targets(
    layout: DataLayout, raw: ibis.Table, last_snapshot_nr: int
) -> list[tuple[str, ibis.Table, Path]]:
    """Every table `fraud features build` writes: (step name, expression, file), in build order."""
    return [
        (CUSTOMER_SPENDING_VIEW, tables.customer_spending(raw, last_snapshot_nr), customer_features_path(layout)),
        (TERMINAL_RISK_VIEW, tables.terminal_risk(raw, last_snapshot_nr), terminal_features_path(layout)),
        (VELOCITY_TABLE, tables.velocity(raw), velocity_features_path(layout)),
        *((view, expr, recent_state_path(layout, view)) for view, expr in tables.recent_states(raw).items()),
    ]


def _build_with_duckdb(
    files: Sequence[Path], layout: DataLayout, settings: DuckDBSettings, report: ProgressCallback
) -> tuple[int, int, int]:
    raw = tables.raw_transactions()
    with tempfile.TemporaryDirectory(prefix=".duckdb-spill-", dir=layout.features) as spill:
        con = _connect(settings, Path(spill))
        try:
            report("reading raw transactions")
            try:
                _register_raw(con, files)
                first_nr, last_snapshot_nr, nb_tx = con.execute(
                    tables.compile_sql(tables.bounds(raw), "duckdb")
                ).fetchone()
            except duckdb.Error as exc:
                raise UserError(f"cannot read the raw transactions under {layout.transactions}: {exc}") from exc
            if not nb_tx:
                raise UserError(f"no raw transactions: the partitions under {layout.transactions} are empty")
            for step, expr, path in feature_table_targets(layout, raw, int(last_snapshot_nr)):
                report(f"computing {step}")
                _copy_atomically(con, tables.compile_sql(expr, "duckdb"), path)
        finally:
            con.close()
    return int(first_nr), int(last_snapshot_nr), int(nb_tx)


def _build_with_spark(
    files: Sequence[Path], layout: DataLayout, settings: SparkSettings, report: ProgressCallback
) -> tuple[int, int, int]:
    from fraud.features import spark_engine

    raw = tables.raw_transactions()
    with tempfile.TemporaryDirectory(prefix=".spark-local-", dir=layout.features) as local_dir:
        report(f"starting Spark ({settings.master})")
        with spark_engine.spark_session(settings, Path(local_dir)) as session:
            report("reading raw transactions")
            with spark_engine.job_errors(settings, "reading raw transactions"):
                spark_engine.register_raw(session, list(files))
                first_nr, last_snapshot_nr, nb_tx = spark_engine.collect_rows(session, tables.bounds(raw))[0]
            if not nb_tx:
                raise UserError(f"no raw transactions: the partitions under {layout.transactions} are empty")
            for step, expr, path in feature_table_targets(layout, raw, int(last_snapshot_nr)):
                report(f"computing {step}")
                with spark_engine.job_errors(settings, f"computing {step}"):
                    spark_engine.write_table(session, expr, path)
    return int(first_nr), int(last_snapshot_nr), int(nb_tx)


def build_offline_features(
    layout: DataLayout | None = None,
    settings: DuckDBSettings | None = None,
    progress: ProgressCallback | None = None,
    engine: str = "duckdb",
    spark: SparkSettings | None = None,
) -> FeatureBuildResult:
    """Compute every offline feature table (`feature_table_targets`) from `layout.transactions` on
    `engine` ("duckdb", the default, or "spark" with `spark` settings) and write them under
    `layout.features` (each file replaced atomically). `progress` receives a short step name."""
    if engine not in tables.ENGINES:
        raise UserError(f"unknown feature engine {engine!r}: choose one of {', '.join(tables.ENGINES)}")
    layout = layout or DataLayout.current()
    settings = settings or DuckDBSettings.from_env()
    report = progress or (lambda step: None)
    started = time.perf_counter()
    files = [path for paths in transaction_partitions(layout).values() for path in paths]
    layout.features.mkdir(parents=True, exist_ok=True)
    if engine == "spark":
        first_nr, last_snapshot_nr, nb_tx = _build_with_spark(files, layout, spark or SparkSettings.from_env(), report)
    else:
        first_nr, last_snapshot_nr, nb_tx = _build_with_duckdb(files, layout, settings, report)
    con = _connect(settings)
    try:
        customer = _table_summary(
            con, CUSTOMER_SPENDING_VIEW, customer_features_path(layout), CUSTOMER_ID, CUSTOMER_SPENDING_FEATURES
        )
        terminal = _table_summary(
            con, TERMINAL_RISK_VIEW, terminal_features_path(layout), TERMINAL_ID, TERMINAL_RISK_FEATURES
        )
    finally:
        con.close()
    epoch = date(1970, 1, 1)
    return FeatureBuildResult(
        customer=customer,
        terminal=terminal,
        transactions=nb_tx,
        first_day=epoch + timedelta(days=first_nr),
        last_day=epoch + timedelta(days=last_snapshot_nr - 1),
        seconds=time.perf_counter() - started,
        velocity_path=velocity_features_path(layout),
        engine=engine,
    )


# --- reading --------------------------------------------------------------------------------------


def read_feature_table(path: Path) -> pd.DataFrame:
    """A written feature table as a DataFrame (snapshot timestamps tz-naive UTC)."""
    if not path.is_file():
        raise UserError(f"feature table {path} does not exist (run `fraud features build` first)")
    return pd.read_parquet(path)


def snapshot_day(timestamps: pd.Series) -> pd.Series:
    """Snapshot timestamp (day D 00:00:00) a transaction at each timestamp reads."""
    return pd.to_datetime(timestamps).dt.floor("D")


def _as_naive_utc(value: datetime | date | str) -> datetime:
    stamp = pd.Timestamp(value)
    if stamp.tzinfo is not None:
        stamp = stamp.tz_convert("UTC").tz_localize(None)
    return stamp.to_pydatetime()


def labelled_transactions(
    start: datetime | date | str,
    end: datetime | date | str,
    layout: DataLayout | None = None,
    settings: DuckDBSettings | None = None,
) -> pd.DataFrame:
    """Raw labelled transactions with start <= tx_datetime < end (UTC), as a Feast entity dataframe.

    Columns: `LABELLED_TRANSACTION_COLUMNS` — the ids, `event_timestamp` (= tx_datetime, the
    point-in-time of the feature join), `tx_datetime` and `tx_amount` (the on-demand request
    inputs) and the labels. Sorted by tx_datetime then transaction_id. Only the day partitions that
    overlap the window are read.
    """
    layout = layout or DataLayout.current()
    settings = settings or DuckDBSettings.from_env()
    lower, upper = _as_naive_utc(start), _as_naive_utc(end)
    if upper <= lower:
        raise UserError(f"end ({upper.isoformat()}) must be after start ({lower.isoformat()})")
    partitions = transaction_partitions(layout)
    files = [path for day, paths in partitions.items() if lower.date() <= day <= upper.date() for path in paths]
    columns = [c for c in LABELLED_TRANSACTION_COLUMNS if c != EVENT_TIMESTAMP]
    if not files:
        return _empty_labelled_frame()
    con = _connect(settings)
    try:
        frame = con.execute(
            f"""
            SELECT {TRANSACTION_ID}, {CUSTOMER_ID}, {TERMINAL_ID}, {TX_DATETIME} AS {EVENT_TIMESTAMP},
                   {", ".join(columns[3:])}
            FROM read_parquet({_sql_file_list(files)}, hive_partitioning = false)
            WHERE {TX_DATETIME} >= ? AND {TX_DATETIME} < ?
            ORDER BY {TX_DATETIME}, {TRANSACTION_ID}
            """,  # noqa: S608 - column-name constants and paths quoted by _sql_file_list, no user values
            [lower, upper],
        ).df()
    finally:
        con.close()
    frame[EVENT_TIMESTAMP] = frame[EVENT_TIMESTAMP].astype("datetime64[us]")
    frame[TX_DATETIME] = frame[TX_DATETIME].astype("datetime64[us]")
    return frame[list(LABELLED_TRANSACTION_COLUMNS)]


def _empty_labelled_frame() -> pd.DataFrame:
    dtypes = {
        TRANSACTION_ID: "object",
        CUSTOMER_ID: "object",
        TERMINAL_ID: "object",
        EVENT_TIMESTAMP: "datetime64[us]",
        TX_DATETIME: "datetime64[us]",
        TX_AMOUNT: "float64",
        TX_FRAUD: "int8",
        TX_FRAUD_SCENARIO: "int8",
    }
    return pd.DataFrame({name: pd.Series(dtype=dtypes[name]) for name in LABELLED_TRANSACTION_COLUMNS})


def raw_transaction_span(layout: DataLayout | None = None) -> tuple[date, date]:
    """First and last day partition of the raw transactions."""
    days = list(transaction_partitions(layout or DataLayout.current()))
    return days[0], days[-1]


__all__ = [
    "EVENT_TIMESTAMP",
    "LABELLED_TRANSACTION_COLUMNS",
    "DuckDBSettings",
    "FeatureBuildResult",
    "FeatureTable",
    "build_offline_features",
    "customer_features_path",
    "labelled_transactions",
    "raw_transaction_span",
    "read_feature_table",
    "snapshot_day",
    "terminal_features_path",
    "transaction_partitions",
]
