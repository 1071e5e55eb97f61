"""Feast on Apache Spark (FRAUD_FEAST_OFFLINE=spark): point-in-time training features and
materialisation into Redis as Spark jobs, equal to the embedded DuckDB profile on the same tables.

A real Spark JVM (local[2], Java from Debian's default-jre-headless) and the real Redis on
127.0.0.1:6379 (a project of its own, torn down afterwards).
"""

from __future__ import annotations

import os
import shutil
from datetime import date, datetime
from pathlib import Path

import pandas as pd
import pytest

from fraud import feature_store
from fraud.config import FEATURE_REPO_DIR, DataLayout
from fraud.errors import UserError
from fraud.features.offline import build_offline_features, labelled_transactions
from tests.conftest import require


def test_spark_profiles_select_their_files(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("FRAUD_FEAST_ONLINE", "FRAUD_FEAST_REGISTRY", "FRAUD_FEAST_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    assert feature_store.store_profile(offline="spark").yaml_file.name == "feature_store.spark.yaml"
    assert feature_store.store_profile("redis", offline="spark").yaml_file.name == "feature_store.redis-spark.yaml"
    monkeypatch.setenv("FRAUD_FEAST_OFFLINE", "spark")
    cluster = feature_store.store_profile("redis", "sql")
    assert cluster.yaml_file == FEATURE_REPO_DIR / "feature_store.redis-sql-spark.yaml"
    config = feature_store.repo_config("redis", "sql")
    assert config.offline_store.type == "spark"
    assert config.offline_store.spark_conf["spark.master"] == "local[2]"
    assert config.batch_engine_config["type"] == "spark.engine"
    monkeypatch.setenv("FRAUD_SPARK_MASTER", "k8s://https://10.0.0.1:6443")
    assert (
        feature_store.repo_config().batch_engine_config["spark_conf"]["spark.master"] == "k8s://https://10.0.0.1:6443"
    )
    monkeypatch.setenv("FRAUD_FEAST_OFFLINE", "bigquery")
    with pytest.raises(UserError, match="FRAUD_FEAST_OFFLINE"):
        feature_store.store_profile()


def test_unreachable_spark_master_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FRAUD_SPARK_MASTER", "spark://127.0.0.1:9")
    with pytest.raises(UserError, match=r"cannot reach the Spark master spark://127\.0\.0\.1:9"):
        feature_store.get_feature_store("sqlite", offline="spark")


@pytest.fixture
def two_stores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Two data directories with the same raw transactions and offline tables."""
    from fraud.simulator import SimulationConfig, simulate, write_dataset

    for name in ("FRAUD_FEAST_ONLINE", "FRAUD_FEAST_REGISTRY", "FRAUD_FEAST_OFFLINE", "FRAUD_FEAST_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    on_duckdb, on_spark = DataLayout(tmp_path / "duckdb"), DataLayout(tmp_path / "spark")
    config = SimulationConfig(n_customers=80, n_terminals=160, n_days=30, start_date=date(2018, 4, 1), seed=2)
    write_dataset(simulate(config), on_duckdb.raw)
    build_offline_features(on_duckdb)
    shutil.copytree(on_duckdb.raw, on_spark.raw)
    shutil.copytree(on_duckdb.features, on_spark.features)
    return on_duckdb, on_spark


@pytest.mark.slow
@pytest.mark.redis
def test_spark_profile_equals_the_duckdb_profile(two_stores, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point-in-time features of labelled transactions through the feature service, and the online
    vectors after materialising into Redis with the Spark compute engine, equal the embedded
    profile's (DuckDB join, SQLite online store)."""
    require(shutil.which("java"), "java (Debian package default-jre-headless; `make setup` installs it)")
    on_duckdb, on_spark = two_stores
    entities = labelled_transactions(datetime(2018, 4, 20), datetime(2018, 4, 25), on_duckdb)
    start, end = datetime(2018, 4, 28), datetime(2018, 5, 1, 0, 0, 1)
    customers, terminals = list(entities.customer_id[:25]), list(entities.terminal_id[:25])

    monkeypatch.setenv("FRAUD_DATA_DIR", str(on_duckdb.root))
    feature_store.apply_repo("sqlite")
    expected = feature_store.historical_features(entities, "sqlite")
    feature_store.materialize(start, end, "sqlite")
    expected_online = feature_store.online_batch_features(customers, terminals, "sqlite")

    project = f"fraud_spark_{os.getpid()}"
    monkeypatch.setenv("FRAUD_DATA_DIR", str(on_spark.root))
    feature_store.apply_repo("redis", offline="spark", project=project)
    try:
        got = feature_store.historical_features(entities, "redis", offline="spark", project=project)
        pd.testing.assert_frame_equal(got, expected, check_exact=False, rtol=1e-9, atol=1e-9)
        assert len(got) == len(entities) > 100 and got["tx_fraud"].sum() > 0
        done = feature_store.materialize(start, end, "redis", offline="spark", project=project)
        assert done.end == end.replace(tzinfo=done.end.tzinfo)
        online = feature_store.online_batch_features(customers, terminals, "redis", project=project)
        pd.testing.assert_frame_equal(online, expected_online, check_exact=False, rtol=1e-9, atol=1e-9)
        assert online.notna().all().all()
    finally:
        feature_store.teardown("redis", offline="spark", project=project)


@pytest.mark.slow
def test_training_step_joins_on_the_spark_profile(two_stores, monkeypatch: pytest.MonkeyPatch) -> None:
    """`build_training_set` with FRAUD_FEAST_OFFLINE=spark makes the same training set as on DuckDB."""
    require(shutil.which("java"), "java (Debian package default-jre-headless; `make setup` installs it)")
    from fraud.training.steps import build_training_set

    on_duckdb, on_spark = two_stores
    sets = {}
    for layout, offline in ((on_duckdb, "duckdb"), (on_spark, "spark")):
        monkeypatch.setenv("FRAUD_DATA_DIR", str(layout.root))
        monkeypatch.setenv("FRAUD_FEAST_OFFLINE", offline)
        out = layout.root / "sets"
        summary = build_training_set(
            valid_dir=layout.transactions,
            feature_tables_uri=str(layout.features),
            layout=layout,
            train_start="2018-04-10",
            train_days=7,
            delay_days=3,
            test_days=3,
            n_validation_folds=1,
            train_path=out / "train.parquet",
            folds_dir=out / "folds",
            test_path=out / "test.parquet",
        )
        sets[offline] = (summary, pd.read_parquet(out / "train.parquet"), pd.read_parquet(out / "test.parquet"))
    assert sets["spark"][0] == sets["duckdb"][0]
    for k in (1, 2):
        pd.testing.assert_frame_equal(sets["spark"][k], sets["duckdb"][k], check_exact=False, rtol=1e-9, atol=1e-9)
