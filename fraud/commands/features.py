"""`fraud features` commands: build the offline snapshot tables, apply the Feast repository,
materialise to the online store and inspect online vectors.

Heavy libraries (feast, duckdb) are imported inside the command bodies so `fraud --help` stays fast.
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from fraud.errors import UserError

if TYPE_CHECKING:
    import pandas as pd

features_app = typer.Typer(
    name="features",
    help="Offline feature tables (DuckDB or Spark) and the Feast feature store (apply, materialize, show).",
    no_args_is_help=True,
)

_ONLINE_HELP = "Online store: sqlite (embedded) or redis. Default: $FRAUD_FEAST_ONLINE, else sqlite."
_DATA_DIR_HELP = "Data directory (raw/, features/, feast/). Default: $FRAUD_DATA_DIR, else <project>/data."


def _use_data_dir(data_dir: Path | None) -> None:
    if data_dir is not None:
        os.environ["FRAUD_DATA_DIR"] = str(data_dir.expanduser().resolve())


def _parse_time(value: str | None, option: str) -> datetime | None:
    if value is None:
        return None
    import pandas as pd

    try:
        stamp = pd.Timestamp(value)
    except (ValueError, TypeError):
        raise UserError(f"{option} {value!r} is not an ISO-8601 date or timestamp (e.g. 2024-06-01T00:00:00)") from None
    if pd.isna(stamp):
        raise UserError(f"{option} must be a date or timestamp, got {value!r}")
    return stamp.to_pydatetime()


def _print_build(result) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"offline feature tables ({result.transactions:,} transactions, {result.engine}, {result.seconds:.1f} s)"
    )
    for column in ("table", "rows", "entities", "file"):
        table.add_column(column, overflow="fold")  # a long path wraps at 80 columns instead of being cut
    for item in result.tables:
        table.add_row(item.name, f"{item.rows:,}", f"{item.entities:,}", str(item.path))
    Console().print(table)
    Console().print(
        f"transaction days {result.first_day} .. {result.last_day}; last snapshot {result.last_day} + 1 day"
    )


def _run_build(
    memory_limit: str | None,
    threads: int | None,
    engine: str = "duckdb",
    spark_master: str | None = None,
    spark_driver_memory: str | None = None,
) -> None:
    from dataclasses import replace

    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from fraud.features.offline import DuckDBSettings, build_offline_features
    from fraud.features.spark_engine import SparkSettings
    from fraud.features.tables import ENGINES

    if engine not in ENGINES:
        raise UserError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine != "spark" and (spark_master or spark_driver_memory):
        raise UserError("--spark-master and --spark-driver-memory need --engine spark")
    spark = None
    if engine == "spark":
        spark = SparkSettings.from_env(spark_master)
        if spark_driver_memory is not None:
            spark = replace(spark, driver_memory=spark_driver_memory)
    settings = DuckDBSettings.from_env()
    if memory_limit is not None:
        settings = replace(settings, memory_limit=memory_limit)
    if threads is not None:
        if threads < 1:
            raise UserError(f"--threads must be >= 1, got {threads}")
        settings = replace(settings, threads=threads)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), transient=True) as progress:
        task = progress.add_task("starting", total=None)
        result = build_offline_features(
            settings=settings,
            progress=lambda step: progress.update(task, description=step),
            engine=engine,
            spark=spark,
        )
    _print_build(result)


def _run_apply(online: str | None) -> None:
    from fraud.feature_store import apply_repo, store_profile

    profile = store_profile(online)
    typer.echo(f"applying feature_repo/ ({profile.yaml_file.name})")
    apply_repo(profile.online)


def _run_materialize(start: str | None, end: str | None, incremental: bool, online: str | None) -> None:
    from fraud.feature_store import default_materialization_end, materialize, materialize_incremental

    start_at, end_at = _parse_time(start, "--start"), _parse_time(end, "--end")
    if incremental and start_at is not None:
        raise UserError("--incremental continues from the last materialisation: do not combine it with --start")
    if start_at is None:
        result = materialize_incremental(end_at, online)
    else:
        result = materialize(start_at, end_at or default_materialization_end(), online)
    typer.echo(f"materialised {', '.join(result.views)} up to {result.end.isoformat()} in {result.seconds:.1f} s")


def _pair_ids(customers: list[str], terminals: list[str]) -> tuple[list[str], list[str]]:
    if not customers and not terminals:
        raise UserError("give at least one --customer or --terminal")
    customers = customers or [""] * len(terminals)
    terminals = terminals or [""] * len(customers)
    if len(customers) == 1 and len(terminals) > 1:
        customers = customers * len(terminals)
    if len(terminals) == 1 and len(customers) > 1:
        terminals = terminals * len(customers)
    if len(customers) != len(terminals):
        raise UserError(f"--customer given {len(customers)} times and --terminal {len(terminals)} times: pair them")
    for name, values in (("--customer", customers), ("--terminal", terminals)):
        for value in values:
            if len(value) > 64:
                raise UserError(f"{name} {value[:20]}... is longer than 64 characters")
    return customers, terminals


def _print_vectors(frame: pd.DataFrame) -> None:
    import pandas as pd
    from rich.console import Console
    from rich.table import Table

    from fraud.feature_store import CUSTOMER_SNAPSHOT_COLUMN, TERMINAL_SNAPSHOT_COLUMN

    table = Table(title="online feature vectors (blank = unknown entity: cold-start defaults apply)")
    # feature names keep their width at 80 columns; the value columns (short numbers) give way
    table.add_column("feature", no_wrap=True, min_width=max(len(str(c)) for c in frame.columns[2:]))
    for _, row in frame.iterrows():
        table.add_column(f"{row['customer_id'] or '-'} / {row['terminal_id'] or '-'}", justify="right")
    for column in frame.columns[2:]:
        cells = []
        for value in frame[column]:
            if pd.isna(value):  # unknown entity: NaN / NaT
                cells.append("")
            elif column in (CUSTOMER_SNAPSHOT_COLUMN, TERMINAL_SNAPSHOT_COLUMN):
                cells.append(str(value))
            else:
                cells.append(f"{float(value):,.4g}")
        table.add_row(column, *cells)
    Console().print(table)


def _run_show(customers: list[str], terminals: list[str], online: str | None) -> None:
    from fraud.feature_store import online_batch_features

    paired_customers, paired_terminals = _pair_ids(customers, terminals)
    _print_vectors(online_batch_features(paired_customers, paired_terminals, online))


def _sample_pairs(count: int) -> tuple[list[str], list[str]]:
    """(customer, terminal) pairs of the last transactions in the raw data, for the demo printout."""
    from fraud.config import DataLayout
    from fraud.features.offline import labelled_transactions, raw_transaction_span

    _, last = raw_transaction_span(DataLayout.current())
    frame = labelled_transactions(last, datetime.combine(last, datetime.max.time()))
    frame = frame.drop_duplicates("customer_id").tail(count)
    return list(frame["customer_id"]), list(frame["terminal_id"])


def register(app: typer.Typer) -> None:
    """Add this module's commands to the top-level app."""
    app.add_typer(features_app, name="features")


@features_app.command("build")
def build_command(
    data_dir: Annotated[Path | None, typer.Option("--data-dir", help=_DATA_DIR_HELP)] = None,
    memory_limit: Annotated[
        str | None,
        typer.Option(
            "--memory-limit", help="DuckDB memory limit, e.g. 2GB. Default: $FRAUD_DUCKDB_MEMORY_LIMIT, else 2GB."
        ),
    ] = None,
    threads: Annotated[
        int | None, typer.Option("--threads", help="DuckDB threads. Default: $FRAUD_DUCKDB_THREADS, else 2.")
    ] = None,
    engine: Annotated[
        str, typer.Option("--engine", help="duckdb (embedded, default) or spark (Apache Spark; needs Java 17+).")
    ] = "duckdb",
    spark_master: Annotated[
        str | None,
        typer.Option(
            "--spark-master",
            help="With --engine spark: local[N], spark://host:port or k8s://https://host:port. "
            "Default: $FRAUD_SPARK_MASTER, else local[2].",
        ),
    ] = None,
    spark_driver_memory: Annotated[
        str | None,
        typer.Option(
            "--spark-driver-memory",
            help="With --engine spark: driver heap, e.g. 2g. Default: $FRAUD_SPARK_DRIVER_MEMORY, else 2g.",
        ),
    ] = None,
) -> None:
    """Compute the offline feature tables (daily snapshots, velocity, window states) from
    raw/transactions, on DuckDB or Spark, from one definition (fraud.features.tables)."""
    _use_data_dir(data_dir)
    _run_build(memory_limit, threads, engine, spark_master, spark_driver_memory)


@features_app.command("apply")
def apply_command(
    data_dir: Annotated[Path | None, typer.Option("--data-dir", help=_DATA_DIR_HELP)] = None,
    online: Annotated[str | None, typer.Option("--online", help=_ONLINE_HELP)] = None,
) -> None:
    """Register the feature repository (feature_repo/) in the Feast registry (feast apply)."""
    _use_data_dir(data_dir)
    _run_apply(online)


@features_app.command("materialize")
def materialize_command(
    start: Annotated[
        str | None,
        typer.Option("--start", help="Window start (ISO-8601, UTC). Without it: incremental from the last run."),
    ] = None,
    end: Annotated[
        str | None,
        typer.Option("--end", help="Window end (ISO-8601, UTC). Default: now, or after the last snapshot if later."),
    ] = None,
    incremental: Annotated[
        bool,
        typer.Option(
            "--incremental", help="Continue from the last materialisation (first run: each entity's latest snapshot)."
        ),
    ] = False,
    data_dir: Annotated[Path | None, typer.Option("--data-dir", help=_DATA_DIR_HELP)] = None,
    online: Annotated[str | None, typer.Option("--online", help=_ONLINE_HELP)] = None,
) -> None:
    """Load the latest snapshots into the online store (feast materialize)."""
    _use_data_dir(data_dir)
    _run_materialize(start, end, incremental, online)


@features_app.command("show")
def show_command(
    customer: Annotated[list[str] | None, typer.Option("--customer", "-c", help="Customer (card) id; repeat.")] = None,
    terminal: Annotated[
        list[str] | None, typer.Option("--terminal", "-t", help="Terminal id; repeat, paired with --customer.")
    ] = None,
    data_dir: Annotated[Path | None, typer.Option("--data-dir", help=_DATA_DIR_HELP)] = None,
    online: Annotated[str | None, typer.Option("--online", help=_ONLINE_HELP)] = None,
) -> None:
    """Print the online feature vectors of customer/terminal pairs."""
    _use_data_dir(data_dir)
    _run_show(customer or [], terminal or [], online)


@features_app.command("all")
def all_command(
    data_dir: Annotated[Path | None, typer.Option("--data-dir", help=_DATA_DIR_HELP)] = None,
    online: Annotated[str | None, typer.Option("--online", help=_ONLINE_HELP)] = None,
    samples: Annotated[
        int, typer.Option("--samples", help="Number of online vectors printed at the end.", min=0, max=20)
    ] = 3,
) -> None:
    """build + apply + materialize (incremental) + print a few online vectors."""
    _use_data_dir(data_dir)
    _run_build(None, None)
    _run_apply(online)
    _run_materialize(None, None, True, online)
    if samples:
        customers, terminals = _sample_pairs(samples)
        _run_show(customers, terminals, online)


def _run_aggregate(online: str | None, consumer: str | None, metrics_port: int, batch_size: int) -> None:
    import logging
    import signal
    import threading

    from fraud.feature_store import get_feature_store
    from fraud.streaming.aggregator import Aggregator, AggregatorSettings, default_consumer_name
    from fraud.streaming.events import StreamSettings
    from fraud.streaming.state import WindowStateStore

    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    if not 0 <= metrics_port <= 65535:
        raise UserError(f"--metrics-port must be in 0..65535, got {metrics_port}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stream = StreamSettings.from_env()
    try:
        states = WindowStateStore(get_feature_store(online))
    except Exception as exc:  # an unapplied or unreadable registry
        raise UserError(f"cannot open the Feast feature store (run `fraud features apply`): {exc}") from exc
    settings = AggregatorSettings(
        consumer=consumer or default_consumer_name(), metrics_port=metrics_port, batch_size=batch_size
    )
    aggregator = Aggregator(stream, states, settings)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    port = aggregator.serve_http()
    logging.getLogger("fraud.streaming.aggregator").info(
        "aggregating %s (%d partitions, group %s) as %s; metrics on port %s",
        stream.prefix,
        stream.partitions,
        stream.group,
        settings.consumer,
        port,
    )
    try:
        aggregator.run(stop)
    finally:
        aggregator.close()


@features_app.command("aggregate")
def aggregate_command(
    data_dir: Annotated[Path | None, typer.Option("--data-dir", help=_DATA_DIR_HELP)] = None,
    online: Annotated[str | None, typer.Option("--online", help=_ONLINE_HELP)] = None,
    consumer: Annotated[
        str | None, typer.Option("--consumer", help="Consumer name in the group. Default: <hostname>-<pid>.")
    ] = None,
    metrics_port: Annotated[
        int, typer.Option("--metrics-port", help="Port of /metrics, /healthz, /readyz (0: any free port).")
    ] = 9102,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Stream entries per XREADGROUP.")] = 500,
) -> None:
    """Run the velocity aggregator: consume the transaction stream (FRAUD_STREAM_*), keep each
    card's and terminal's recent events in the online store (Feast push). Stops on SIGTERM."""
    _use_data_dir(data_dir)
    _run_aggregate(online, consumer, metrics_port, batch_size)
