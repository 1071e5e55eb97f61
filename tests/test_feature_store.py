"""The Feast feature store on real stores (SQLite, Redis; DuckDB offline store), no mocks.

The central test is the training/serving-skew guard: `get_historical_features` through the
feature service must return exactly what the offline tables + `model_feature_frame` give for the
same transactions, and the online path (materialised values + the on-demand view) must agree too.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_features_offline import random_transactions, raw_frame, write_raw_transactions

from fraud.config import FEATURE_REPO_DIR, DataLayout
from fraud.errors import UserError
from fraud.feature_store import (
    CUSTOMER_SNAPSHOT_COLUMN,
    DEFAULT_REDIS_URL,
    TERMINAL_SNAPSHOT_COLUMN,
    apply_repo,
    get_feature_store,
    historical_features,
    materialize,
    materialize_incremental,
    online_batch_features,
    repo_config,
    store_profile,
    teardown,
)
from fraud.features.definitions import (
    CUSTOMER_SPENDING_FEATURES,
    CUSTOMER_SPENDING_VIEW,
    FEATURE_SERVICE,
    FEATURE_SERVICE_FEATURES,
    MODEL_FEATURES,
    SNAPSHOT_TIMESTAMP,
    TERMINAL_RISK_FEATURES,
    TERMINAL_RISK_VIEW,
    VELOCITY_FEATURES,
    model_feature_frame,
    velocity_features,
)
from fraud.features.offline import (
    EVENT_TIMESTAMP,
    build_offline_features,
    customer_features_path,
    labelled_transactions,
    read_feature_table,
)

FEAST_CLI = Path(sys.executable).parent / "feast"


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory) -> Iterator[Path]:
    """A data dir with random raw data, built offline tables and an applied SQLite store (module-wide)."""
    path = tmp_path_factory.mktemp("feature-store") / "data"
    path.mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FRAUD_DATA_DIR", str(path))
        patch.delenv("FRAUD_FEAST_ONLINE", raising=False)
        patch.delenv("FRAUD_FEAST_REGISTRY", raising=False)
        patch.delenv("FRAUD_FEAST_PROJECT", raising=False)
        layout = DataLayout.current()
        raw = random_transactions(seed=7, n_customers=30, n_terminals=25, n_days=40)
        # a transaction exactly at midnight of the last day, to pin the point-in-time boundary
        last_day = raw["tx_datetime"].max().normalize()
        raw = pd.concat([raw, raw_frame([(str(last_day), "C0000001", "T0000001", 33.0, 0)])], ignore_index=True)
        write_raw_transactions(layout, raw)
        build_offline_features(layout)
        apply_repo()
        yield path


def _expected_model_features(entity_df: pd.DataFrame, layout: DataLayout) -> pd.DataFrame:
    """The model features computed directly: each transaction joined to its day's snapshot."""
    customers = read_feature_table(layout.features / "customer_spending_features.parquet")
    terminals = read_feature_table(layout.features / "terminal_risk_features.parquet")
    frame = entity_df.assign(**{SNAPSHOT_TIMESTAMP: entity_df["tx_datetime"].dt.floor("D").astype("datetime64[us]")})
    customers[SNAPSHOT_TIMESTAMP] = customers[SNAPSHOT_TIMESTAMP].astype("datetime64[us]")
    terminals[SNAPSHOT_TIMESTAMP] = terminals[SNAPSHOT_TIMESTAMP].astype("datetime64[us]")
    frame = frame.merge(customers, on=["customer_id", SNAPSHOT_TIMESTAMP], how="left")
    frame = frame.merge(terminals, on=["terminal_id", SNAPSHOT_TIMESTAMP], how="left")
    return model_feature_frame(frame.join(_expected_velocity(frame)))


def _expected_velocity(entity_df: pd.DataFrame) -> pd.DataFrame:
    """`velocity_features` of each row from all raw transactions of its card and terminal."""
    raw = labelled_transactions("2000-01-01", "2100-01-01")
    ts = raw["tx_datetime"].astype("datetime64[ns]").to_numpy().view("int64")
    cards, terminals = raw.groupby("customer_id").indices, raw.groupby("terminal_id").indices
    empty = np.array([], dtype=np.intp)
    rows = []
    for card, terminal, when in zip(
        entity_df["customer_id"], entity_df["terminal_id"], entity_df["tx_datetime"], strict=True
    ):
        c, t = cards.get(card, empty), terminals.get(terminal, empty)
        rows.append(
            velocity_features(
                pd.Timestamp(when).value,
                ts[c],
                raw["tx_amount"].to_numpy()[c],
                list(raw["terminal_id"].to_numpy()[c]),
                ts[t],
            )
        )
    return pd.DataFrame(rows, columns=list(VELOCITY_FEATURES), index=entity_df.index)


def test_historical_features_equal_offline_tables_plus_model_feature_frame(store_dir: Path) -> None:
    layout = DataLayout.current()
    entity_df = labelled_transactions("2000-01-01", "2100-01-01")
    cold = pd.DataFrame(
        {
            "transaction_id": ["TX-cold"],
            "customer_id": ["C-never-seen"],
            "terminal_id": ["T-never-seen"],
            EVENT_TIMESTAMP: [entity_df[EVENT_TIMESTAMP].iloc[-1]],
            "tx_datetime": [entity_df["tx_datetime"].iloc[-1]],
            "tx_amount": [12.5],
            "tx_fraud": [0],
            "tx_fraud_scenario": [0],
        }
    )
    entity_df = pd.concat([entity_df, cold], ignore_index=True).sample(frac=1.0, random_state=3)
    entity_df.index = pd.RangeIndex(1000, 1000 + len(entity_df))  # a non-default index must be kept

    result = historical_features(entity_df)

    assert list(result.columns) == [*entity_df.columns, *MODEL_FEATURES]
    pd.testing.assert_index_equal(result.index, entity_df.index)
    pd.testing.assert_frame_equal(result[entity_df.columns], entity_df)
    expected = _expected_model_features(entity_df.reset_index(drop=True), layout)
    actual = result[list(MODEL_FEATURES)].reset_index(drop=True)
    pd.testing.assert_frame_equal(actual, expected, check_exact=False, rtol=1e-12, atol=1e-12)
    # the features are not trivially zero: the windows are populated for most rows
    assert (actual["customer_nb_tx_incl_30d"] > 1).mean() > 0.8
    assert (actual["terminal_nb_tx_30d"] > 0).mean() > 0.5
    assert (actual["customer_nb_tx_24h"] > 0).mean() > 0.3
    cold_row = result.loc[result["transaction_id"] == "TX-cold"].iloc[0]
    assert cold_row["customer_nb_tx_incl_1d"] == 1.0 and cold_row["terminal_risk_7d"] == 0.0
    assert cold_row["amount_to_customer_avg_30d"] == 1.0


def test_historical_features_rejects_incomplete_entity_df(store_dir: Path) -> None:
    entity_df = labelled_transactions("2000-01-01", "2100-01-01").drop(columns=["tx_amount"])
    with pytest.raises(UserError, match="tx_amount"):
        historical_features(entity_df)


def assert_same_as_feast_get_online_features(store, ids: list[str], tids: list[str], online: pd.DataFrame) -> None:
    """`online_batch_features` reads each view with the online store's `online_read`; Feast's own
    `get_online_features` must give the same values (the guard of that shortcut)."""
    refs = [f"{CUSTOMER_SPENDING_VIEW}:{n}" for n in CUSTOMER_SPENDING_FEATURES] + [
        f"{TERMINAL_RISK_VIEW}:{n}" for n in TERMINAL_RISK_FEATURES
    ]
    feast_frame = store.get_online_features(
        features=refs, entity_rows={"customer_id": ids, "terminal_id": tids}
    ).to_df()
    columns = [*CUSTOMER_SPENDING_FEATURES, *TERMINAL_RISK_FEATURES]
    np.testing.assert_array_equal(
        online[columns].to_numpy(dtype="float64"), feast_frame[columns].to_numpy(dtype="float64", na_value=np.nan)
    )


def test_materialisation_windows_and_online_values(store_dir: Path) -> None:
    layout = DataLayout.current()
    customers = read_feature_table(layout.features / "customer_spending_features.parquet")
    terminals = read_feature_table(layout.features / "terminal_risk_features.parquet")
    first, last = customers[SNAPSHOT_TIMESTAMP].min(), customers[SNAPSHOT_TIMESTAMP].max()
    midway = first + timedelta(days=20)
    ids = sorted(customers.loc[customers[SNAPSHOT_TIMESTAMP] == midway, "customer_id"])[:6]
    tids = sorted(terminals.loc[terminals[SNAPSHOT_TIMESTAMP] == midway, "terminal_id"])[:6]
    assert len(ids) == len(tids) == 6

    def expected(snapshot: pd.Timestamp) -> pd.DataFrame:
        c = customers[customers[SNAPSHOT_TIMESTAMP] == snapshot].set_index("customer_id").loc[ids]
        t = terminals[terminals[SNAPSHOT_TIMESTAMP] == snapshot].set_index("terminal_id").loc[tids]
        return pd.concat(
            [
                c[list(CUSTOMER_SPENDING_FEATURES)].reset_index(drop=True),
                t[list(TERMINAL_RISK_FEATURES)].reset_index(drop=True),
            ],
            axis=1,
        ).astype("float64")

    materialize_incremental(midway + timedelta(seconds=1))  # first run: latest snapshots up to `midway`
    online = online_batch_features([*ids, "C-unknown"], [*tids, "T0000000"])
    pd.testing.assert_frame_equal(
        online.iloc[:6][[*CUSTOMER_SPENDING_FEATURES, *TERMINAL_RISK_FEATURES]].reset_index(drop=True),
        expected(midway),
    )
    assert (online.iloc[:6][CUSTOMER_SNAPSHOT_COLUMN] == midway).all()
    assert (online.iloc[:6][TERMINAL_SNAPSHOT_COLUMN] == midway).all()
    unknown = online.iloc[6]
    assert unknown["customer_id"] == "C-unknown" and pd.isna(unknown[CUSTOMER_SNAPSHOT_COLUMN])
    assert unknown[list(CUSTOMER_SPENDING_FEATURES)].isna().all()
    assert_same_as_feast_get_online_features(get_feature_store(), [*ids, "C-unknown"], [*tids, "T0000000"], online)

    materialize(midway, last + timedelta(seconds=1))  # an explicit window: the latest ("today's") snapshot
    online = online_batch_features(ids, tids)
    pd.testing.assert_frame_equal(
        online[[*CUSTOMER_SPENDING_FEATURES, *TERMINAL_RISK_FEATURES]].reset_index(drop=True), expected(last)
    )
    assert (online[CUSTOMER_SNAPSHOT_COLUMN] == last).all() and (online[TERMINAL_SNAPSHOT_COLUMN] == last).all()

    # the on-demand view served online agrees with model_feature_frame on the online values
    store = get_feature_store()
    when = last + timedelta(hours=3, minutes=5)
    request = {
        "customer_id": ids,
        "terminal_id": tids,
        "tx_amount": [10.0 + i for i in range(len(ids))],
        "tx_datetime": [when] * len(ids),
    }
    served = store.get_online_features(features=store.get_feature_service(FEATURE_SERVICE), entity_rows=request).to_df()
    direct = model_feature_frame(
        pd.concat([pd.DataFrame(request), online.drop(columns=["customer_id", "terminal_id"])], axis=1)
    )
    pd.testing.assert_frame_equal(
        served[list(FEATURE_SERVICE_FEATURES)].astype("float64"), direct[list(FEATURE_SERVICE_FEATURES)], rtol=1e-12
    )


def test_profiles_and_configuration(store_dir: Path, monkeypatch) -> None:
    assert store_profile().yaml_file == FEATURE_REPO_DIR / "feature_store.yaml"
    assert store_profile("redis").yaml_file.name == "feature_store.redis.yaml"
    monkeypatch.setenv("FRAUD_FEAST_ONLINE", "redis")
    monkeypatch.setenv("FRAUD_FEAST_REGISTRY", "sql")
    assert store_profile().yaml_file.name == "feature_store.redis-sql.yaml"
    with pytest.raises(UserError, match="must be one of"):
        store_profile("memcached")
    with pytest.raises(UserError, match="only configured with the redis"):
        store_profile("sqlite", "sql")
    monkeypatch.delenv("FRAUD_FEAST_ONLINE")
    monkeypatch.delenv("FRAUD_FEAST_REGISTRY")
    config = repo_config(project="fraud_custom")
    assert config.project == "fraud_custom"
    assert config.registry.path == str(store_dir / "feast" / "registry.db")
    assert config.registry.cache_mode == "thread" and config.registry.cache_ttl_seconds == 60
    assert config.online_store.path == str(store_dir / "feast" / "online_store.db")
    assert config.offline_store.type == "duckdb"
    monkeypatch.delenv("FRAUD_REDIS_URL", raising=False)
    assert repo_config("redis").online_store.connection_string == DEFAULT_REDIS_URL
    monkeypatch.setenv("FRAUD_REDIS_URL", "redis.internal:6380,db=2")
    assert repo_config("redis").online_store.connection_string == "redis.internal:6380,db=2"


def test_apply_without_offline_tables_is_a_user_error(data_dir: Path) -> None:
    with pytest.raises(UserError, match="fraud features build"):
        apply_repo()


@pytest.mark.slow
def test_plain_feast_cli_applies_and_materialises(tmp_path: Path) -> None:
    """`feast -c feature_repo apply` / `materialize` as a Feast user types them: a clean
    environment (nothing exported), on a copy of the repository (feature_repo/ next to its own
    data/), so the repository's own data directory is never written. Two Feast CLI processes:
    ~20 s of CPU, so marked slow."""
    project = tmp_path / "project"
    shutil.copytree(FEATURE_REPO_DIR, project / "feature_repo", ignore=shutil.ignore_patterns("__pycache__"))
    layout = DataLayout(project / "data")
    rows = [
        ("2024-03-01 10:00:00", "C1", "T1", 10.0, 0),
        ("2024-03-02 11:00:00", "C1", "T1", 30.0, 1),
    ]
    write_raw_transactions(layout, raw_frame(rows))
    build_offline_features(layout)
    real_feast = FEATURE_REPO_DIR.parent / "data" / "feast"
    before = sorted((p.name, p.stat().st_mtime_ns) for p in real_feast.glob("*")) if real_feast.is_dir() else []
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "LANG": "C.UTF-8"}
    run = {"cwd": project, "env": env, "capture_output": True, "text": True, "timeout": 300}
    applied = subprocess.run([str(FEAST_CLI), "-c", "feature_repo", "apply"], check=False, **run)
    assert applied.returncode == 0, applied.stdout[-2000:] + applied.stderr[-2000:]
    assert "fraud_model_features" in applied.stdout
    assert (layout.feast / "registry.db").is_file() and (layout.feast / "online_store.db").is_file()
    done = subprocess.run(
        [str(FEAST_CLI), "-c", "feature_repo", "materialize", "2024-03-01T00:00:00", "2024-03-04T00:00:00"],
        check=False,
        **run,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    after = sorted((p.name, p.stat().st_mtime_ns) for p in real_feast.glob("*")) if real_feast.is_dir() else []
    assert after == before, "the plain Feast CLI wrote into the repository's own data directory"
    with pytest.MonkeyPatch.context() as patch:  # what the CLI wrote, read back in-process
        patch.setenv("FRAUD_DATA_DIR", str(layout.root))
        online = online_batch_features(["C1"], ["T1"])
    assert online[["customer_nb_tx_1d", "customer_sum_amount_1d"]].iloc[0].tolist() == [1.0, 30.0]
    assert online[CUSTOMER_SNAPSHOT_COLUMN].iloc[0] == pd.Timestamp("2024-03-03")


@pytest.mark.redis
def test_redis_online_store_round_trip(store_dir: Path, tmp_path: Path, monkeypatch) -> None:
    import redis

    # own data dir (own registry file: teardown deletes it), same offline tables
    own = tmp_path / "data"
    shutil.copytree(store_dir / "features", own / "features")
    monkeypatch.setenv("FRAUD_DATA_DIR", str(own))
    project = f"fraud_test_{uuid.uuid4().hex[:12]}"
    client = redis.Redis.from_url(f"redis://{DEFAULT_REDIS_URL}")
    try:
        client.ping()
    except redis.exceptions.ConnectionError:
        pytest.fail(f"the Redis server on {DEFAULT_REDIS_URL} is not reachable (run `make services`)")
    layout = DataLayout.current()
    customers = read_feature_table(layout.features / "customer_spending_features.parquet")
    terminals = read_feature_table(layout.features / "terminal_risk_features.parquet")
    last = customers[SNAPSHOT_TIMESTAMP].max()
    ids = sorted(customers.loc[customers[SNAPSHOT_TIMESTAMP] == last, "customer_id"])[:5]
    tids = sorted(terminals.loc[terminals[SNAPSHOT_TIMESTAMP] == last, "terminal_id"])[:5]
    try:
        apply_repo("redis", project=project)
        materialize_incremental(online="redis", project=project)
        online = online_batch_features([*ids, "C-unknown"], [*tids, "T-unknown"], "redis", project=project)
        assert_same_as_feast_get_online_features(
            get_feature_store("redis", project=project), [*ids, "C-unknown"], [*tids, "T-unknown"], online
        )
        online, unknown = online.iloc[:-1], online.iloc[-1]
        keys = [k for k in client.scan_iter(count=1000) if project.encode() in k]
        assert keys, "materialisation wrote no Redis key carrying the project name"
    finally:
        teardown("redis", project=project)
    expected_c = customers[customers[SNAPSHOT_TIMESTAMP] == last].set_index("customer_id").loc[ids]
    expected_t = terminals[terminals[SNAPSHOT_TIMESTAMP] == last].set_index("terminal_id").loc[tids]
    np.testing.assert_array_equal(
        online[list(CUSTOMER_SPENDING_FEATURES)].to_numpy(),
        expected_c[list(CUSTOMER_SPENDING_FEATURES)].to_numpy(dtype=float),
    )
    np.testing.assert_array_equal(
        online[list(TERMINAL_RISK_FEATURES)].to_numpy(), expected_t[list(TERMINAL_RISK_FEATURES)].to_numpy(dtype=float)
    )
    assert (online[CUSTOMER_SNAPSHOT_COLUMN] == last).all()
    # Redis answers an absent key with empty values: unknown, not a snapshot from 1970
    assert unknown[[*CUSTOMER_SPENDING_FEATURES, *TERMINAL_RISK_FEATURES]].isna().all()
    assert pd.isna(unknown[CUSTOMER_SNAPSHOT_COLUMN]) and pd.isna(unknown[TERMINAL_SNAPSHOT_COLUMN])
    assert not [k for k in client.scan_iter(count=1000) if project.encode() in k], "teardown left Redis keys"


def _check_batched_reader(
    client, write_partial, customers: pd.DataFrame, terminals: pd.DataFrame, monkeypatch, caplog
) -> None:
    """The batched reader of `fraud.online_readers` against Feast's own `online_read` on the same
    store: materialised, unknown, repeated and partially written entities, a batch large enough for
    the vectorised decoding, one pair, no pair, and the fall-back when the key layout differs.

    `write_partial(key: bytes, feature_values: dict[name, ValueProto bytes], epoch_seconds)` stores an
    entity holding only some features, as the online store would."""
    from feast.protos.feast.types.Value_pb2 import Value

    from fraud.online_readers import OnlineLayoutMismatch, batch_reader

    client.views()
    reader = client._reader
    assert reader is not None, "this online store must be read by the batched reader"
    entity_keys = reader._views[0][0]
    names = list(CUSTOMER_SPENDING_FEATURES)
    write_partial(
        entity_keys("C-partial"),
        {names[0]: Value(int64_val=3).SerializeToString(), names[1]: Value(double_val=-12.5).SerializeToString()},
        1_700_000_000,
    )
    ids = [*sorted(customers["customer_id"].unique()), "C-unknown", "C-partial"]
    tids = sorted(terminals["terminal_id"].unique())
    n = 90  # above the threshold of the vectorised decoding, with repeated entities
    cust = [ids[i % len(ids)] for i in range(n)]
    term = [tids[(3 * i) % len(tids)] for i in range(n - 1)] + ["T-unknown"]
    few = (["C-partial", "C-unknown", ids[0]], [tids[0], "T-unknown", tids[1]])  # decoded value by value
    fast, small = client.arrays(cust, term), client.arrays(*few)
    client._reader = None
    generic, generic_small = client.arrays(cust, term), client.arrays(*few)
    client._reader = reader
    for batched, reference in ((fast, generic), (small, generic_small)):
        np.testing.assert_array_equal(batched.values, reference.values)
        np.testing.assert_array_equal(batched.customer_snapshot, reference.customer_snapshot)
        np.testing.assert_array_equal(batched.terminal_snapshot, reference.terminal_snapshot)
    row = cust.index("C-partial")
    assert fast.values[row, :2].tolist() == [3.0, -12.5]
    assert np.isnan(fast.values[row, 2 : len(names)]).all()
    assert fast.customer_snapshot[row] == np.datetime64(1_700_000_000, "s")
    unknown = cust.index("C-unknown")
    assert np.isnan(fast.values[unknown, : len(names)]).all()
    assert np.isnat(fast.customer_snapshot[unknown]) and np.isnat(fast.terminal_snapshot[-1])
    assert not np.isnan(fast.values[0]).any(), "a materialised pair must be fully known"
    np.testing.assert_array_equal(client.arrays(cust[:1], term[:1]).values, fast.values[:1])
    assert client.arrays([], []).values.shape == (0, len(CUSTOMER_SPENDING_FEATURES) + len(TERMINAL_RISK_FEATURES))

    # a Feast whose key layout differs: no batched reader, lookups through online_read
    import feast.infra.key_encoding_utils as key_encoding
    import feast.infra.online_stores.redis as feast_redis

    def other_layout(*args, **kwargs):
        return b"other"

    views = client.views()
    client._views = None
    with monkeypatch.context() as patch:
        patch.setattr(key_encoding, "serialize_entity_key", other_layout)
        patch.setattr(
            feast_redis.RedisOnlineStore, "_generate_redis_keys_for_entities", lambda self, config, keys: [b"x"]
        )
        with pytest.raises(OnlineLayoutMismatch):
            batch_reader(client._online_store, client.store.config, views)
        with caplog.at_level("WARNING", logger="fraud.feature_store"):
            client.views()
    assert client._reader is None and "online_read" in caplog.text
    np.testing.assert_array_equal(client.arrays(cust, term).values, fast.values)


def test_batched_sqlite_reader_equals_feast_online_read(store_dir: Path, monkeypatch, caplog) -> None:
    from fraud.feature_store import online_client

    layout = DataLayout.current()
    customers = read_feature_table(layout.features / "customer_spending_features.parquet")
    terminals = read_feature_table(layout.features / "terminal_risk_features.parquet")
    materialize_incremental()
    client = online_client()
    connection = client._online_store._get_conn(client.store.config)
    table = f"{client.store.config.project}_{CUSTOMER_SPENDING_VIEW}"

    def write_partial(key: bytes, values: dict[str, bytes], epoch_seconds: int) -> None:
        with connection:
            connection.executemany(
                f'INSERT OR REPLACE INTO "{table}" (entity_key, feature_name, value, event_ts) VALUES (?, ?, ?, ?)',  # noqa: S608 - Feast's table name of the test project; values bound
                [(key, name, value, epoch_seconds) for name, value in values.items()],
            )

    try:
        _check_batched_reader(client, write_partial, customers, terminals, monkeypatch, caplog)
    finally:
        with connection:
            connection.execute(
                f'DELETE FROM "{table}" WHERE feature_name IN (?, ?) AND event_ts = ?',  # noqa: S608 - Feast's table name of the test project; values bound
                (*CUSTOMER_SPENDING_FEATURES[:2], 1_700_000_000),
            )
        client._views = None  # the cached client gets its batched reader back


@pytest.mark.redis
def test_batched_redis_reader_equals_feast_online_read(store_dir: Path, tmp_path: Path, monkeypatch, caplog) -> None:
    import redis
    from google.protobuf.timestamp_pb2 import Timestamp

    from fraud.feature_store import online_client

    own = tmp_path / "data"
    shutil.copytree(store_dir / "features", own / "features")
    monkeypatch.setenv("FRAUD_DATA_DIR", str(own))
    project = f"fraud_test_{uuid.uuid4().hex[:12]}"
    layout = DataLayout.current()
    customers = read_feature_table(layout.features / "customer_spending_features.parquet")
    terminals = read_feature_table(layout.features / "terminal_risk_features.parquet")
    raw = redis.Redis.from_url(f"redis://{DEFAULT_REDIS_URL}")
    try:
        apply_repo("redis", project=project)
        materialize_incremental(online="redis", project=project)
        client = online_client("redis", project=project)
        client.views()
        fields = dict(zip(CUSTOMER_SPENDING_FEATURES, client._reader._views[0][1][:-1], strict=True))
        timestamp_field = client._reader._views[0][1][-1]

        def write_partial(key: bytes, values: dict[str, bytes], epoch_seconds: int) -> None:
            stamp = Timestamp(seconds=epoch_seconds).SerializeToString()
            raw.hset(key, mapping={**{fields[name]: value for name, value in values.items()}, timestamp_field: stamp})

        _check_batched_reader(client, write_partial, customers, terminals, monkeypatch, caplog)
    finally:
        teardown("redis", project=project)


@pytest.mark.redis
@pytest.mark.postgres
def test_production_profile_with_sql_registry_on_postgres(store_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """FRAUD_FEAST_ONLINE=redis FRAUD_FEAST_REGISTRY=sql: registry in PostgreSQL (own database)."""
    import sqlalchemy as sa

    database = f"fraud_feast_test_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine("postgresql+psycopg2://postgres@127.0.0.1:5432/test", isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{database}"'))
    own = tmp_path / "data"
    shutil.copytree(store_dir / "features", own / "features")
    monkeypatch.setenv("FRAUD_DATA_DIR", str(own))
    monkeypatch.setenv("FRAUD_FEAST_ONLINE", "redis")
    monkeypatch.setenv("FRAUD_FEAST_REGISTRY", "sql")
    monkeypatch.setenv("FRAUD_FEAST_REGISTRY_URL", f"postgresql+psycopg2://postgres@127.0.0.1:5432/{database}")
    project = f"fraud_test_{uuid.uuid4().hex[:12]}"
    try:
        apply_repo(project=project)
        materialize_incremental(project=project)
        store = get_feature_store(project=project)
        assert sorted(fv.name for fv in store.list_feature_views()) == sorted(
            [
                "customer_spending_features",
                "terminal_risk_features",
                "customer_recent_transactions",
                "terminal_recent_transactions",
            ]
        )
        assert store.get_feature_service(FEATURE_SERVICE).name == FEATURE_SERVICE
        online = online_batch_features(["C0000001"], ["T0000001"], project=project)
        assert online[CUSTOMER_SNAPSHOT_COLUMN].notna().all()
        registry = sa.create_engine(os.environ["FRAUD_FEAST_REGISTRY_URL"])
        with registry.connect() as connection:
            stored = connection.execute(
                sa.text("SELECT count(*) FROM feature_views WHERE project_id = :p"), {"p": project}
            ).scalar_one()
        registry.dispose()
        assert stored == 4
        assert not (own / "feast" / "registry.db").exists()  # no file registry in this profile
    finally:
        teardown(project=project)
        with admin.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
        admin.dispose()


def test_cli_show_prints_vectors(store_dir: Path, monkeypatch, capsys) -> None:
    from fraud.cli import main

    materialize_incremental()
    monkeypatch.setenv("COLUMNS", "200")
    argv = ["fraud", "features", "show", "-c", "C0000001", "-c", "C-nobody", "-t", "T0000001"]
    monkeypatch.setattr(sys, "argv", argv)
    main()
    shown = capsys.readouterr().out
    assert "C0000001 / T0000001" in shown and "C-nobody / T0000001" in shown
    assert all(name in shown for name in (*CUSTOMER_SPENDING_FEATURES, *TERMINAL_RISK_FEATURES))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("show",), "at least one --customer"),
        (("show", "-c", "C1", "-c", "C2", "-t", "T1", "-t", "T2", "-t", "T3"), "pair them"),
        (("materialize", "--start", "not-a-date"), "--start 'not-a-date'"),
        (("materialize", "--incremental", "--start", "2024-01-01"), "do not combine"),
        (("materialize", "--start", "2024-02-01", "--end", "2024-01-01"), "must be after"),
        (("apply", "--online", "memcached"), "must be one of"),
    ],
)
def test_cli_rejects_bad_input(store_dir: Path, monkeypatch, capsys, args: tuple[str, ...], message: str) -> None:
    from fraud.cli import main

    monkeypatch.setattr(sys, "argv", ["fraud", "features", *args])
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_redis_connection_string_from_the_manifests_split_settings() -> None:
    """The Kubernetes manifests give host and port (ConfigMap) and the password (Secret) separately."""
    from fraud.feature_store import redis_connection_string

    assert redis_connection_string({}) == DEFAULT_REDIS_URL
    split = {"FRAUD_REDIS_HOST": "redis-master.fraud-prod.svc", "FRAUD_REDIS_PORT": "6380"}
    assert redis_connection_string(split) == "redis-master.fraud-prod.svc:6380"
    assert (
        redis_connection_string({**split, "FRAUD_REDIS_PASSWORD": "s3"})
        == "redis-master.fraud-prod.svc:6380,password=s3"
    )
    assert redis_connection_string({"FRAUD_REDIS_HOST": "r"}) == "r:6379"
    # an explicit connection string wins over the split settings
    assert redis_connection_string({**split, "FRAUD_REDIS_URL": "other:1,db=2"}) == "other:1,db=2"


def test_point_in_time_velocity_from_the_table_equals_the_raw_computation(store_dir: Path) -> None:
    """Historical transactions take the per-transaction table `fraud features build` wrote; other
    rows are computed from the raw transactions: both give the same values."""
    from fraud.feature_store import point_in_time_velocity

    entity_df = labelled_transactions("2000-01-01", "2100-01-01").sample(n=400, random_state=2)
    from_table = point_in_time_velocity(entity_df)
    from_raw = point_in_time_velocity(entity_df.drop(columns=["transaction_id"]))
    pd.testing.assert_frame_equal(from_table, from_raw, check_exact=False, rtol=0, atol=1e-9)
    assert (from_table["customer_nb_tx_24h"] > 0).mean() > 0.3
    # a row whose time is not its transaction's is not taken from the table
    shifted = entity_df.assign(event_timestamp=entity_df["event_timestamp"] + pd.Timedelta(hours=1))
    expected = point_in_time_velocity(shifted.drop(columns=["transaction_id"]))
    pd.testing.assert_frame_equal(point_in_time_velocity(shifted), expected, check_exact=False, rtol=0, atol=1e-9)


def test_the_repo_sources_follow_the_activated_settings_without_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An entry point that activates a data directory (`--data-dir`, `fraud bench quality`) without
    FRAUD_DATA_DIR in the environment gets its own offline tables in the repository's sources; with
    nothing activated, FRAUD_DATA_DIR and then the repository's data/ decide (the plain Feast CLI)."""
    from fraud.feature_store import _inside_feature_repo
    from fraud.settings import Settings, activated

    monkeypatch.delenv("FRAUD_DATA_DIR", raising=False)

    def customer_source_path() -> Path:
        with _inside_feature_repo():
            import data_sources  # the repository module, imported afresh as Feast does

            return Path(data_sources.customer_spending_source.path)

    own = tmp_path / "own"
    with activated(Settings.from_env({}).with_data_dir(own)):
        assert customer_source_path() == customer_features_path(DataLayout(own.resolve()))
    assert customer_source_path() == customer_features_path(DataLayout(FEATURE_REPO_DIR.parent / "data"))
    monkeypatch.setenv("FRAUD_DATA_DIR", str(tmp_path / "env"))
    assert customer_source_path() == customer_features_path(DataLayout((tmp_path / "env").resolve()))
