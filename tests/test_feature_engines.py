"""One definition, two engines: `fraud features build` on DuckDB and on Apache Spark (local mode).

The slow tests start a real Spark JVM (Java from Debian's default-jre-headless, `make setup`);
the others check the one-line errors that come before any JVM starts.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from fraud.config import DataLayout
from fraud.errors import UserError
from fraud.features import spark_engine, tables
from fraud.features.definitions import CARD_RECENT_VIEW, SNAPSHOT_TIMESTAMP, TERMINAL_RECENT_VIEW
from fraud.features.offline import build_offline_features, feature_table_targets
from fraud.features.spark_engine import SparkSettings
from fraud.schema import CUSTOMER_ID, TERMINAL_ID, TRANSACTION_ID
from tests.conftest import require

#: Each written table and the columns that identify its rows.
TABLE_KEYS: dict[str, tuple[str, ...]] = {
    "customer_spending_features": (SNAPSHOT_TIMESTAMP, CUSTOMER_ID),
    "terminal_risk_features": (SNAPSHOT_TIMESTAMP, TERMINAL_ID),
    "transaction_velocity_features": (TRANSACTION_ID,),
    CARD_RECENT_VIEW: (CUSTOMER_ID,),
    TERMINAL_RECENT_VIEW: (TERMINAL_ID,),
}
#: Small enough for two cores: Spark local[2] with a 1 GiB driver.
TEST_SPARK = SparkSettings(master="local[2]", driver_memory="1g", shuffle_partitions=4)


def _simulated_raw(root: Path) -> DataLayout:
    from fraud.simulator import SimulationConfig, simulate, write_dataset

    layout = DataLayout(root)
    config = SimulationConfig(
        n_customers=120, n_terminals=240, n_days=40, start_date=date(2018, 4, 1), seed=7, card_testing_per_day=2
    )
    write_dataset(simulate(config), layout.raw)
    return layout


def _copy_raw(source: DataLayout, root: Path) -> DataLayout:
    layout = DataLayout(root)
    shutil.copytree(source.raw, layout.raw)
    return layout


def _needs_java() -> None:
    require(shutil.which("java"), "java (Debian package default-jre-headless; `make setup` installs it)")


def assert_tables_equal(left: Path, right: Path, keys: tuple[str, ...]) -> None:
    """Same Arrow schema, same rows (in key order); floats to 1e-9, lists element by element."""
    a, b = pq.read_table(left), pq.read_table(right)
    assert a.schema.equals(b.schema), f"{left.name}: {a.schema} != {b.schema}"
    assert a.num_rows == b.num_rows > 0, left.name
    fa = a.to_pandas().sort_values(list(keys), kind="stable").reset_index(drop=True)
    fb = b.to_pandas().sort_values(list(keys), kind="stable").reset_index(drop=True)
    for column in fa.columns:
        x, y = fa[column], fb[column]
        if x.dtype.kind == "f":
            np.testing.assert_allclose(x.to_numpy(), y.to_numpy(), rtol=1e-9, atol=1e-9, err_msg=column)
        elif x.dtype == object and len(x) and isinstance(x.iloc[0], np.ndarray):
            for i, (p, q) in enumerate(zip(x, y, strict=True)):
                if p.dtype.kind == "f":
                    np.testing.assert_allclose(p, q, rtol=1e-9, atol=1e-9, err_msg=f"{column}[{i}]")
                else:
                    assert p.tolist() == q.tolist(), f"{left.name} {column} row {i}"
        else:
            pd.testing.assert_series_equal(x, y, check_names=False, obj=f"{left.name}.{column}")


@pytest.mark.slow
def test_duckdb_and_spark_write_equal_tables(tmp_path: Path) -> None:
    """Every table of `fraud features build`, on DuckDB and on Spark local[2] from the same
    simulated transactions (card-testing bursts included): same files, schema, rows and values."""
    _needs_java()
    on_duckdb = _simulated_raw(tmp_path / "duckdb")
    on_spark = _copy_raw(on_duckdb, tmp_path / "spark")
    duck = build_offline_features(on_duckdb, engine="duckdb")
    spark = build_offline_features(on_spark, engine="spark", spark=TEST_SPARK)

    assert (spark.transactions, spark.first_day, spark.last_day) == (duck.transactions, duck.first_day, duck.last_day)
    assert (spark.customer.rows, spark.terminal.rows) == (duck.customer.rows, duck.terminal.rows)
    written = sorted(p.name for p in on_duckdb.features.iterdir())
    assert sorted(p.name for p in on_spark.features.iterdir()) == written  # no staging folder left behind
    assert written == sorted(f"{name}.parquet" for name in TABLE_KEYS)
    for name, keys in TABLE_KEYS.items():
        assert_tables_equal(on_duckdb.features / f"{name}.parquet", on_spark.features / f"{name}.parquet", keys)
    # the snapshot and window-state tables are written in key order by both engines (the keys are
    # unique, so with the values equal above the files hold the same rows in the same order)
    for name, keys in TABLE_KEYS.items():
        if name == "transaction_velocity_features":
            continue
        for layout in (on_duckdb, on_spark):
            frame = pq.read_table(layout.features / f"{name}.parquet", columns=list(keys)).to_pandas()
            assert frame.equals(frame.sort_values(list(keys)).reset_index(drop=True)), f"{layout.root} {name}"


@pytest.mark.slow
def test_spark_out_of_memory_is_one_line(tmp_path: Path) -> None:
    """A job that exhausts the driver's heap (local mode: the executor is the driver) ends in one
    line about memory, and the JVM is gone afterwards."""
    _needs_java()
    settings = SparkSettings(master="local[1]", driver_memory="512m", shuffle_partitions=1)
    with (
        spark_engine.spark_session(settings, tmp_path) as session,
        pytest.raises(UserError, match=r"out of memory|JVM died") as caught,
        spark_engine.job_errors(settings, "computing a huge list"),
    ):
        session.sql("SELECT collect_list(repeat('x', 1000000)) AS l FROM range(4000)").collect()
    message = str(caught.value)
    assert "\n" not in message and message.startswith("computing a huge list: ")


# --- errors before any JVM starts -------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_build(data_dir: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fraud.cli", "features", "build", "--data-dir", str(data_dir), *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        env=env or dict(os.environ),
        cwd=Path(__file__).resolve().parent.parent,
    )


@pytest.fixture(scope="module")
def built_on_duckdb(tmp_path_factory: pytest.TempPathFactory) -> DataLayout:
    layout = _simulated_raw(tmp_path_factory.mktemp("engines"))
    build_offline_features(layout, engine="duckdb")
    return layout


def _snapshot(layout: DataLayout) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(layout.features.iterdir())}


def test_unreachable_spark_master_is_one_line_and_keeps_the_tables(built_on_duckdb: DataLayout) -> None:
    before = _snapshot(built_on_duckdb)
    master = f"spark://127.0.0.1:{_free_port()}"
    result = _run_build(built_on_duckdb.root, "--engine", "spark", "--spark-master", master)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"cannot reach the Spark master {master}" in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert _snapshot(built_on_duckdb) == before


def test_missing_java_is_one_line(built_on_duckdb: DataLayout, tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "JAVA_HOME"} | {"PATH": str(empty)}
    result = _run_build(built_on_duckdb.root, "--engine", "spark", env=env)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs Java 17+" in lines[0] and "default-jre-headless" in lines[0], result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--engine", "polars"), "--engine must be one of duckdb, spark"),
        (("--engine", "spark", "--spark-master", "yarn"), "is not local[N], spark://host:port"),
        (("--engine", "spark", "--spark-driver-memory", "lots"), "is not a size like 512m or 2g"),
        (("--engine", "spark", "--spark-driver-memory", "100m"), "below Spark's 512m minimum"),
        (("--spark-master", "local[2]"), "need --engine spark"),
    ],
)
def test_bad_engine_options_are_one_line(built_on_duckdb: DataLayout, args: tuple[str, ...], message: str) -> None:
    result = _run_build(built_on_duckdb.root, *args)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_every_table_compiles_for_both_engines(built_on_duckdb: DataLayout) -> None:
    """The same expressions give DuckDB and Spark SQL; the ordered snapshot tables sort outermost."""
    raw = tables.raw_transactions()
    targets = feature_table_targets(built_on_duckdb, raw, 17_700)
    assert [path.name for _, _, path in targets] == [f"{name}.parquet" for name in TABLE_KEYS]
    for _, expr, _ in targets:
        duck, spark = tables.compile_sql(expr, "duckdb"), tables.compile_sql(expr, "spark")
        assert '"' in duck and "`" in spark
        for name in expr.columns:
            assert f'AS "{name}"' in duck and f"AS `{name}`" in spark
    customer = tables.compile_sql(targets[0][1], "spark")
    assert customer.rstrip().endswith("ORDER BY `snapshot_ts` ASC, `customer_id` ASC")
    with pytest.raises(ValueError, match="unknown engine"):
        tables.compile_sql(targets[0][1], "polars")


def test_spark_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FRAUD_SPARK_MASTER", "spark://10.0.0.1:7077")
    monkeypatch.setenv("FRAUD_SPARK_DRIVER_MEMORY", "3g")
    monkeypatch.setenv("FRAUD_SPARK_SHUFFLE_PARTITIONS", "16")
    settings = SparkSettings.from_env()
    assert (settings.master, settings.driver_memory, settings.shuffle_partitions) == ("spark://10.0.0.1:7077", "3g", 16)
    assert SparkSettings.from_env("local[2]").master == "local[2]"
    monkeypatch.setenv("FRAUD_SPARK_SHUFFLE_PARTITIONS", "many")
    with pytest.raises(UserError, match="FRAUD_SPARK_SHUFFLE_PARTITIONS"):
        SparkSettings.from_env()
    assert spark_engine.memory_bytes("2g") == 2 * 1024**3


def test_failures_are_explained_in_one_line() -> None:
    settings = SparkSettings()
    oom = RuntimeError("An error occurred while calling o51.collect.\njava.lang.OutOfMemoryError: Java heap space")
    assert "ran out of memory" in spark_engine.explain_failure(oom, settings)
    assert "JVM died" in spark_engine.explain_failure(ConnectionRefusedError(111, "Connection refused"), settings)
    other = RuntimeError("[TABLE_OR_VIEW_NOT_FOUND] The table cannot be found.\n\tat org.apache.spark.Foo")
    assert spark_engine.explain_failure(other, settings) == (
        "Spark job failed: [TABLE_OR_VIEW_NOT_FOUND] The table cannot be found."
    )
