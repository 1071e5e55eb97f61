"""The Feast feature store of the fraud platform: configuration selection, apply, materialise,
point-in-time training features and batched online lookups.

Configuration profiles (files in `feature_repo/`, selected without editing anything):

=====================  ======================  ================================================
FRAUD_FEAST_ONLINE     FRAUD_FEAST_REGISTRY    file
=====================  ======================  ================================================
sqlite (default)       file (default)          feature_store.yaml
redis                  file                    feature_store.redis.yaml
redis                  sql                     feature_store.redis-sql.yaml (PostgreSQL registry)
=====================  ======================  ================================================

The yaml files name the stores the plain Feast CLI uses as typed (paths relative to
feature_repo/: `../data`, the default data directory; the local Redis and PostgreSQL). Here they
are replaced with this process's settings: the data directory (fraud.config), FRAUD_REDIS_URL (or
the split FRAUD_REDIS_* settings), FRAUD_FEAST_REGISTRY_URL; ${VAR} placeholders, if a yaml has
any, are expanded with those defaults. FRAUD_FEAST_PROJECT (or the `project` argument) overrides
the Feast project name, which also namespaces the Redis keys.

A command only ever touches the stores of its own data directory: a registry copied from another
one (its SQLite online tables recorded with the other directory's absolute path) is adopted by
`apply_repo` and refused by materialisation (`foreign_online_tables`).

FRAUD_FEAST_OFFLINE=spark (default duckdb) selects the same profile on Apache Spark: Feast's Spark
offline store (point-in-time joins) and Spark compute engine (materialisation), with SparkSource
data sources over the same Parquet tables: feature_store.spark.yaml (sqlite/file),
feature_store.redis-spark.yaml (redis/file) and feature_store.redis-sql-spark.yaml (redis/sql, the
cluster profile). FRAUD_SPARK_MASTER, FRAUD_SPARK_DRIVER_MEMORY and FRAUD_SPARK_PYTHON (defaults
local[2], 2g, this interpreter) fill their Spark settings.

"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import string
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote, urlsplit

import duckdb
import numpy as np
import pandas as pd
import yaml

from fraud.config import FEATURE_REPO_DIR, DataLayout, data_dir
from fraud.errors import UserError
from fraud.features.definitions import (
    BATCH_FEATURE_DEFAULTS,
    CUSTOMER_SPENDING_FEATURES,
    CUSTOMER_SPENDING_VIEW,
    FEATURE_SERVICE,
    FEATURE_SERVICE_FEATURES,
    MODEL_FEATURES,
    SNAPSHOT_TIMESTAMP,
    SNAPSHOT_TTL_DAYS,
    TERMINAL_RISK_FEATURES,
    TERMINAL_RISK_VIEW,
    VELOCITY_FEATURES,
    VELOCITY_HORIZON_S,
)
from fraud.features.offline import (
    EVENT_TIMESTAMP,
    _one_row,
    _sql_file_list,
    customer_features_path,
    labelled_transactions,
    terminal_features_path,
)
from fraud.features.spark_engine import DEFAULT_MASTER
from fraud.features.velocity_offline import velocity_features_path, velocity_frame
from fraud.schema import CUSTOMER_ID, TERMINAL_ID, TRANSACTION_ID, TX_AMOUNT, TX_DATETIME
from fraud.settings import current

_logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from feast import FeatureStore
    from feast.repo_config import RepoConfig

ONLINE_ENV = "FRAUD_FEAST_ONLINE"
REGISTRY_ENV = "FRAUD_FEAST_REGISTRY"
OFFLINE_ENV = "FRAUD_FEAST_OFFLINE"
PROJECT_ENV = "FRAUD_FEAST_PROJECT"
REDIS_URL_ENV = "FRAUD_REDIS_URL"
REDIS_HOST_ENV = "FRAUD_REDIS_HOST"
REDIS_PORT_ENV = "FRAUD_REDIS_PORT"
REDIS_PASSWORD_ENV = "FRAUD_REDIS_PASSWORD"  # noqa: S105 - name of an environment variable, not a password
REDIS_TLS_ENV = "FRAUD_REDIS_TLS"
REDIS_CA_CERT_ENV = "FRAUD_REDIS_CA_CERT"
REGISTRY_URL_ENV = "FRAUD_FEAST_REGISTRY_URL"
DEFAULT_REDIS_URL = "127.0.0.1:6379"
DEFAULT_REGISTRY_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/feast_registry"

#: Columns of `online_batch_features` holding the event timestamp of the snapshot each row's
#: values come from (NaT when the entity is unknown to the online store).
CUSTOMER_SNAPSHOT_COLUMN = f"customer_{SNAPSHOT_TIMESTAMP}"
TERMINAL_SNAPSHOT_COLUMN = f"terminal_{SNAPSHOT_TIMESTAMP}"
#: Columns an entity dataframe must have for `historical_features`.
ENTITY_DF_COLUMNS: tuple[str, ...] = (CUSTOMER_ID, TERMINAL_ID, EVENT_TIMESTAMP, TX_AMOUNT, TX_DATETIME)

_YAML_FILES: dict[tuple[str, str, str], str] = {
    ("sqlite", "file", "duckdb"): "feature_store.yaml",
    ("redis", "file", "duckdb"): "feature_store.redis.yaml",
    ("redis", "sql", "duckdb"): "feature_store.redis-sql.yaml",
    ("sqlite", "file", "spark"): "feature_store.spark.yaml",
    ("redis", "file", "spark"): "feature_store.redis-spark.yaml",
    ("redis", "sql", "spark"): "feature_store.redis-sql-spark.yaml",
}
ONLINE_STORES: tuple[str, ...] = ("sqlite", "redis")
REGISTRIES: tuple[str, ...] = ("file", "sql")
OFFLINE_STORES: tuple[str, ...] = ("duckdb", "spark")
_ROW_ORDER = "__fraud_row_order"
_PLACEHOLDER = re.compile(r"\$\{(\w+)\}")


# --- configuration --------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoreProfile:
    """Which online store, registry and offline store to use, and the yaml file describing them."""

    online: str
    registry: str
    offline: str = "duckdb"

    @property
    def yaml_file(self) -> Path:
        return FEATURE_REPO_DIR / _YAML_FILES[(self.online, self.registry, self.offline)]


def store_profile(online: str | None = None, registry: str | None = None, offline: str | None = None) -> StoreProfile:
    """The profile from the arguments, else FRAUD_FEAST_ONLINE / FRAUD_FEAST_REGISTRY /
    FRAUD_FEAST_OFFLINE, else sqlite/file/duckdb."""
    settings = current()
    chosen_online = (online or settings.feast_online).strip().lower()
    chosen_registry = (registry or settings.feast_registry).strip().lower()
    chosen_offline = (offline or settings.feast_offline).strip().lower()
    if chosen_offline not in OFFLINE_STORES:
        raise UserError(f"offline store {chosen_offline!r} (from {OFFLINE_ENV}) must be one of {OFFLINE_STORES}")
    if chosen_online not in ONLINE_STORES:
        raise UserError(
            f"online store {chosen_online!r} (from {ONLINE_ENV} or --online) must be one of {ONLINE_STORES}"
        )
    if chosen_registry not in REGISTRIES:
        raise UserError(f"registry {chosen_registry!r} (from {REGISTRY_ENV}) must be one of {REGISTRIES}")
    if (chosen_online, chosen_registry, chosen_offline) not in _YAML_FILES:
        raise UserError(
            f"the {chosen_registry} registry is only configured with the redis online store "
            f"(set {ONLINE_ENV}=redis or {REGISTRY_ENV}=file)"
        )
    return StoreProfile(online=chosen_online, registry=chosen_registry, offline=chosen_offline)


def redis_connection_string(env: Mapping[str, str] | None = None) -> str:
    """Feast's Redis connection string: FRAUD_REDIS_URL if set (Feast's `host:port,key=value`
    form, or a `redis://` / `rediss://` URL: rediss = TLS), else composed from the split
    settings the Kubernetes manifests provide (FRAUD_REDIS_HOST / FRAUD_REDIS_PORT, FRAUD_REDIS_TLS
    and FRAUD_REDIS_CA_CERT from the ConfigMap, FRAUD_REDIS_PASSWORD from a Secret), else the
    local default."""
    env = current().env() if env is None else env
    if env.get(REDIS_URL_ENV):
        configured = env[REDIS_URL_ENV]
        return _feast_form(configured) if "://" in configured else configured
    host = env.get(REDIS_HOST_ENV, "").strip()
    if not host:
        return DEFAULT_REDIS_URL
    parts = [f"{host}:{env.get(REDIS_PORT_ENV, '').strip() or '6379'}"]
    password = env.get(REDIS_PASSWORD_ENV, "")
    if password:
        parts.append(f"password={password}")
    if env.get(REDIS_TLS_ENV, "").strip().lower() in ("1", "true", "yes"):
        parts.append("ssl=true")
        if env.get(REDIS_CA_CERT_ENV, "").strip():
            parts.append(f"ssl_ca_certs={env[REDIS_CA_CERT_ENV].strip()}")
    return ",".join(parts)


def _feast_form(url: str) -> str:
    """`redis[s]://[user:password@]host[:port][?ssl_ca_certs=path]` in Feast's form (decoded)."""
    parsed = urlsplit(url)
    if parsed.scheme not in ("redis", "rediss") or not parsed.hostname:
        raise UserError(f"{REDIS_URL_ENV}: {parsed.scheme}:// URLs are not Redis URLs (use redis:// or rediss://)")
    parts = [f"{parsed.hostname}:{parsed.port or 6379}"]
    if parsed.username:
        parts.append(f"username={unquote(parsed.username)}")
    if parsed.password:
        parts.append(f"password={unquote(parsed.password)}")
    if parsed.scheme == "rediss":
        parts.append("ssl=true")
    parts += [f"{key}={value}" for key, value in parse_qsl(parsed.query) if key in ("ssl_ca_certs", "db")]
    return ",".join(parts)


def _placeholder_values() -> dict[str, str]:
    """Environment for the ${VAR} placeholders of the yaml files, with the project's defaults."""
    values = {
        "FRAUD_DATA_DIR": str(data_dir()),
        REGISTRY_URL_ENV: DEFAULT_REGISTRY_URL,
        # the Python of the Spark compute engine's workers: the one running this (with feast)
        "FRAUD_SPARK_PYTHON": sys.executable,
    }
    values.update(current().env())
    values[REDIS_URL_ENV] = redis_connection_string()
    return values


#: Where the yaml files' relative paths point (relative to feature_repo/): the repository's
#: default data directory, so that the plain Feast CLI works as typed.
_YAML_DATA_DIR = Path("../data")


def _in_data_dir(path: str) -> str:
    """A yaml path below `../data` moved below this process's data directory (absolute)."""
    written = Path(path)
    if written.is_absolute():
        return path
    try:
        inside = written.relative_to(_YAML_DATA_DIR)
    except ValueError:
        return str((FEATURE_REPO_DIR / written).resolve())  # Feast's own rule: relative to the repo
    return str(data_dir() / inside)


def _locate_stores(raw: dict[str, Any]) -> None:
    """The stores of this process's settings in place of the yaml's plain-CLI values: the file
    registry and SQLite file in the data directory, the registry URL and the Redis connection."""
    registry, online = raw["registry"], raw["online_store"]
    if registry.get("registry_type", "file") == "file":
        registry["path"] = _in_data_dir(registry["path"])
    else:
        registry["path"] = current().feast_registry_url or registry["path"]
    if online.get("type") == "sqlite":
        online["path"] = _in_data_dir(online["path"])
    elif online.get("type") == "redis":
        online["connection_string"] = redis_connection_string()


def repo_config(
    online: str | None = None, registry: str | None = None, project: str | None = None, *, offline: str | None = None
) -> RepoConfig:
    """The Feast RepoConfig of the selected profile, placeholders expanded with defaults."""
    from feast.repo_config import RepoConfig

    profile = store_profile(online, registry, offline)
    text = profile.yaml_file.read_text()
    expanded = string.Template(text).safe_substitute(_placeholder_values())
    settings = "\n".join(line for line in expanded.splitlines() if not line.lstrip().startswith("#"))
    unresolved = sorted(set(_PLACEHOLDER.findall(settings)))
    if unresolved:
        raise UserError(f"{profile.yaml_file} has placeholders without a value: {unresolved} (set them)")
    raw = yaml.safe_load(expanded)
    _locate_stores(raw)
    chosen_project = project or current().feast_project
    if chosen_project:
        raw["project"] = chosen_project
    config = RepoConfig(**raw)
    config.repo_path = FEATURE_REPO_DIR
    return config


def get_feature_store(
    online: str | None = None, *, registry: str | None = None, project: str | None = None, offline: str | None = None
) -> FeatureStore:
    """A Feast FeatureStore on the feature repository with the selected profile (see module doc)."""
    from feast import FeatureStore

    config = repo_config(online, registry, project, offline=offline)
    if config.offline_store.type == "spark":
        _start_spark(dict(config.offline_store.spark_conf or {}))
    return FeatureStore(repo_path=str(FEATURE_REPO_DIR), config=config)


def _start_spark(spark_conf: dict[str, str]) -> None:
    """Start the Spark session Feast's Spark offline store and compute engine then reuse (they take
    the active one): one line for a missing Java or an unreachable master first, and the Python of
    the UDF workers (`spark.pyspark.python`, which PySpark otherwise takes from PYSPARK_PYTHON only)."""
    from fraud.features.spark_engine import check_master_reachable, forget_stopped_session, java_executable

    java_executable()
    check_master_reachable(spark_conf.get("spark.master", DEFAULT_MASTER))
    forget_stopped_session()  # a feature build in this process stops its session and JVM
    from pyspark.sql import SparkSession

    builder = SparkSession.builder
    for key, value in spark_conf.items():
        builder = builder.config(key, value)
    try:
        session = builder.getOrCreate()
    except Exception as exc:  # noqa: BLE001 - py4j and JVM start-up errors have no common base
        raise UserError(f"cannot start Spark (master {spark_conf.get('spark.master')}): {exc}") from None
    if spark_conf.get("spark.pyspark.python"):
        session.sparkContext.pythonExec = spark_conf["spark.pyspark.python"]


# --- apply ----------------------------------------------------------------------------------------


def _require_offline_tables(layout: DataLayout) -> None:
    missing = [p for p in (customer_features_path(layout), terminal_features_path(layout)) if not p.is_file()]
    if missing:
        raise UserError(f"missing feature tables {[str(p) for p in missing]} (run `fraud features build` first)")


_REPO_OFFLINE_STORE: list[str] = []


def repo_offline_store() -> str:
    """The offline store the feature repository's data sources are declared for ("duckdb":
    FileSource, "spark": SparkSource): the profile of the `apply_repo` under way, else
    FRAUD_FEAST_OFFLINE (the plain Feast CLI), else duckdb."""
    if _REPO_OFFLINE_STORE:
        return _REPO_OFFLINE_STORE[-1]
    return store_profile().offline


@contextmanager
def _inside_feature_repo(offline: str = "duckdb") -> Iterator[None]:
    """Feast imports the repo's modules by name from the working directory: run there, with the
    modules re-imported (their data source paths depend on FRAUD_DATA_DIR, their types on the
    offline store), then restore."""
    _REPO_OFFLINE_STORE.append(offline)
    previous_cwd = Path.cwd()
    repo = str(FEATURE_REPO_DIR)
    added_to_path = repo not in sys.path
    if added_to_path:
        sys.path.append(repo)
    for name, module in list(sys.modules.items()):
        origin = getattr(module, "__file__", None) or ""
        if origin.startswith(repo + os.sep):
            del sys.modules[name]
    try:
        yield
    finally:
        _REPO_OFFLINE_STORE.pop()
        os.chdir(previous_cwd)
        if added_to_path and repo in sys.path:
            sys.path.remove(repo)


def apply_repo(
    online: str | None = None, *, registry: str | None = None, project: str | None = None, offline: str | None = None
) -> None:
    """`feast apply` of feature_repo/ with the selected profile (registers the objects, creates the
    online tables). The offline tables must exist (their schemas are validated)."""
    from feast.repo_operations import apply_total

    _require_offline_tables(DataLayout.current())
    profile = store_profile(online, registry, offline)
    config = repo_config(online, registry, project, offline=profile.offline)
    adopt_copied_registry(config)
    with _inside_feature_repo(profile.offline):
        apply_total(config, FEATURE_REPO_DIR, skip_source_validation=False)


def teardown(
    online: str | None = None, *, registry: str | None = None, project: str | None = None, offline: str | None = None
) -> None:
    """Delete the project's online data (tables / Redis keys) and its registry, and forget the
    cached online client of that configuration."""
    get_feature_store(online, registry=registry, project=project, offline=offline).teardown()
    _CLIENTS.pop(_client_key(store_profile(online, registry, offline), project), None)


# --- ownership: a command touches only the stores of its own data directory ----------------------


def _own_sqlite_path(config: RepoConfig) -> Path:
    """The SQLite online store of this data directory (the profile's path, or the embedded
    profile's when the profile stores online data elsewhere)."""
    if config.online_store.type == "sqlite":
        return Path(config.online_store.path)
    return DataLayout.current().feast / "online_store.db"


def _file_registry_path(config: RepoConfig) -> Path | None:
    if config.registry.registry_type != "file":
        return None
    return Path(config.registry.path)


def foreign_online_tables(config: RepoConfig) -> list[str]:
    """SQLite files outside this data directory in which the registry records online tables.

    Feast records each SQLite online table with its absolute path in the registry and, when it
    applies, drops the recorded tables that the new plan lacks - at the recorded path. A registry
    copied with its data directory (`cp -r A C`) therefore names A's store, and applying it in C
    would empty A's. The registry file is read as a protobuf: nothing is opened at those paths."""
    from feast.protos.feast.core.Registry_pb2 import Registry as RegistryProto

    registry_file = _file_registry_path(config)
    if registry_file is None or not registry_file.is_file():
        return []
    proto = RegistryProto.FromString(registry_file.read_bytes())
    own = str(_own_sqlite_path(config))
    return sorted(
        {
            item.sqlite_table.path
            for item in proto.infra.infra_objects
            if item.WhichOneof("infra_object") == "sqlite_table" and item.sqlite_table.path != own
        }
    )


def adopt_copied_registry(config: RepoConfig) -> list[str]:
    """Re-root the online tables a copied registry records elsewhere onto this data directory's
    SQLite file (the copy's own store), so that Feast's apply never drops another directory's
    tables. Returns the foreign paths it replaced (logged); the file is replaced atomically."""
    from feast.protos.feast.core.Registry_pb2 import Registry as RegistryProto

    foreign = foreign_online_tables(config)
    if not foreign:
        return []
    registry_file = _file_registry_path(config)
    assert registry_file is not None  # noqa: S101 - narrows the type: foreign tables come from a file registry
    proto = RegistryProto.FromString(registry_file.read_bytes())
    own = str(_own_sqlite_path(config))
    for item in proto.infra.infra_objects:
        if item.WhichOneof("infra_object") == "sqlite_table":
            item.sqlite_table.path = own
    partial = registry_file.with_name(registry_file.name + ".adopting")
    partial.write_bytes(proto.SerializeToString())
    os.replace(partial, registry_file)
    _logger.warning(
        "the Feast registry %s was copied from another data directory (online tables in %s): "
        "its online tables are now this directory's %s; the other store is left untouched",
        registry_file,
        ", ".join(foreign),
        own,
    )
    return foreign


def require_own_registry(config: RepoConfig) -> None:
    """Refuse to work on a registry copied from another data directory (see
    `foreign_online_tables`) until `fraud features apply` has adopted it."""
    foreign = foreign_online_tables(config)
    if foreign:
        raise UserError(
            f"the Feast registry {_file_registry_path(config)} records online tables in {foreign[0]}, "
            f"outside this data directory (a copied data directory?): run `fraud features apply` here "
            f"to adopt it; nothing was changed"
        )


# --- health and rebuild of the online store --------------------------------------------------------

#: the batch feature views the online store must hold for the predictor
BATCH_VIEWS: tuple[str, ...] = (CUSTOMER_SPENDING_VIEW, TERMINAL_RISK_VIEW)
_REDIS_SCAN_CALLS = 50


def online_store_problem(store: FeatureStore) -> str | None:
    """Why the online store cannot serve the batch features, or None. One line, naming the command
    that repairs it: a view not registered; a SQLite file or table missing (lost, or torn down while
    the registry kept its record, which `apply` then does not recreate); a view never materialised;
    a view the registry says is materialised whose online rows are gone (SQLite table empty, no
    Redis key of the project holding it)."""
    from feast.errors import FeastObjectNotFoundException

    repair = "run `fraud features rebuild-online`"
    views = []
    for name in BATCH_VIEWS:
        try:
            views.append(store.get_feature_view(name))
        except FeastObjectNotFoundException:
            return f"feature view {name} is not registered (run `fraud features apply`, then materialise)"
    config = store.config
    sqlite_rows: dict[str, bool] = {}
    if config.online_store.type == "sqlite":
        found = _sqlite_rows(config, repair)
        if isinstance(found, str):
            return found
        sqlite_rows = found
    for view in views:
        if not view.materialization_intervals:
            return f"feature view {view.name} was never materialised (run `fraud features materialize`)"
    if config.online_store.type == "sqlite":
        empty = [name for name, held in sqlite_rows.items() if not held]
        if empty:
            where = config.online_store.path
            return f"the online store {where} holds no {empty[0]} rows (materialised per the registry): {repair}"
    if config.online_store.type == "redis":
        return _redis_problem(store, repair)
    return None


def _sqlite_rows(config: RepoConfig, repair: str) -> dict[str, bool] | str:
    """Whether each batch view's SQLite table holds a row, or the problem of a missing file/table."""
    import sqlite3

    from feast.infra.online_stores.helpers import compute_table_id

    path = Path(config.online_store.path)
    if not path.is_file():
        return f"the online store {path} is missing: {repair}"
    versioning = config.registry.enable_online_feature_view_versioning
    held: dict[str, bool] = {}
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as con:
        for name in BATCH_VIEWS:
            table = compute_table_id(config.project, _ViewName(name), versioning).replace('"', '""')
            try:
                row = con.execute(f'SELECT 1 FROM "{table}" LIMIT 1').fetchone()  # noqa: S608 - Feast's table id, quotes escaped
            except sqlite3.OperationalError:
                return f"the online store {path} has no table for {name}: {repair}"
            held[name] = row is not None
    return held


@dataclass(frozen=True)
class _ViewName:
    """What compute_table_id reads of a feature view."""

    name: str
    current_version_number: int | None = None


def _redis_problem(store: FeatureStore, repair: str) -> str | None:
    """Scan the project's keys (bounded: a few SCAN calls) for one holding each view's timestamp."""
    online: Any = store._get_provider().online_store  # a RedisOnlineStore here (the caller checked the type)
    client = online._get_client(store.config.online_store)
    pattern = b"*" + re.sub(rb"([*?\[\]\\])", rb"\\\1", store.config.project.encode())
    wanted = {f"_ts:{name}".encode(): name for name in BATCH_VIEWS}
    found: set[str] = set()
    cursor = 0
    for _ in range(_REDIS_SCAN_CALLS):
        cursor, keys = client.scan(cursor=cursor, match=pattern, count=1000)
        if keys:  # one round trip per SCAN batch
            pipe = client.pipeline(transaction=False)
            asked = [(key, field) for key in keys for field in wanted]
            for key, field in asked:
                pipe.hexists(key, field)
            found.update(wanted[field] for (_, field), held in zip(asked, pipe.execute(), strict=True) if held)
        if len(found) == len(wanted):
            return None
        if cursor == 0:
            lost = sorted(set(wanted.values()) - found)
            return f"the Redis online store holds no {', '.join(lost)} key of project {store.config.project}: {repair}"
    return None  # a large keyspace not scanned to the end: not evidence of a loss


@dataclass(frozen=True)
class RebuildResult:
    tables: tuple[str, ...]
    materialized: MaterializationResult


def rebuild_online(
    end: datetime | date | str | None = None,
    online: str | None = None,
    *,
    registry: str | None = None,
    project: str | None = None,
) -> RebuildResult:
    """Recreate the online tables of every registered feature view (a lost or emptied store) and
    fully re-materialise the batch views: each entity's latest snapshot up to `end`, whatever the
    registry says was materialised before. Velocity window states come back as the aggregator
    pushes new transactions."""
    from feast.errors import FeastObjectNotFoundException

    upper = _as_utc(end) if end is not None else default_materialization_end()
    config = repo_config(online, registry, project)
    adopt_copied_registry(config)
    store = get_feature_store(online, registry=registry, project=project)
    try:
        for name in BATCH_VIEWS:
            store.get_feature_view(name)
    except FeastObjectNotFoundException:
        raise UserError("the feature repository is not applied here (run `fraud features apply` first)") from None
    views = store.list_feature_views()
    provider = store._get_provider()
    provider.update_infra(
        project=config.project,
        tables_to_delete=[],
        tables_to_keep=views,
        entities_to_delete=[],
        entities_to_keep=store.list_entities(),
        partial=True,
    )
    first, last = snapshot_span()
    if upper < first:
        raise UserError(f"--end ({upper.isoformat()}) is before the first snapshot ({first.isoformat()})")
    start = max(first, min(upper, last) - timedelta(days=SNAPSHOT_TTL_DAYS))
    started = time.perf_counter()
    store.materialize(start_date=start, end_date=upper, feature_views=list(BATCH_VIEWS))
    _CLIENTS.clear()
    result = MaterializationResult(start=start, end=upper, views=BATCH_VIEWS, seconds=time.perf_counter() - started)
    return RebuildResult(tables=tuple(view.name for view in views), materialized=result)


# --- materialisation --------------------------------------------------------------------------------


def _as_utc(value: datetime | date | str) -> datetime:
    stamp = pd.Timestamp(value)
    stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
    return stamp.to_pydatetime()


def snapshot_span(layout: DataLayout | None = None) -> tuple[datetime, datetime]:
    """Earliest and latest snapshot timestamp over both offline tables (UTC, tz-aware)."""
    layout = layout or DataLayout.current()
    _require_offline_tables(layout)
    paths = _sql_file_list([customer_features_path(layout), terminal_features_path(layout)])
    with duckdb.connect() as con:
        first, last = _one_row(
            con,
            f"SELECT min({SNAPSHOT_TIMESTAMP}), max({SNAPSHOT_TIMESTAMP}) FROM read_parquet({paths})",  # noqa: S608 - column-name constants, paths quoted by _sql_file_list
        )
    return _as_utc(first), _as_utc(last)


@dataclass(frozen=True)
class MaterializationResult:
    start: datetime | None
    end: datetime
    views: tuple[str, ...]
    seconds: float


def materialize(
    start: datetime | date | str,
    end: datetime | date | str,
    online: str | None = None,
    *,
    registry: str | None = None,
    project: str | None = None,
    offline: str | None = None,
) -> MaterializationResult:
    """Load the latest snapshot of each entity with start <= snapshot_ts <= end into the online store
    (on the Spark profile: a Spark job of Feast's Spark compute engine)."""
    lower, upper = _as_utc(start), _as_utc(end)
    if upper <= lower:
        raise UserError(f"--end ({upper.isoformat()}) must be after --start ({lower.isoformat()})")
    require_own_registry(repo_config(online, registry, project, offline=offline))
    store = get_feature_store(online, registry=registry, project=project, offline=offline)
    views = BATCH_VIEWS
    started = time.perf_counter()
    store.materialize(start_date=lower, end_date=upper, feature_views=list(views))
    return MaterializationResult(start=lower, end=upper, views=views, seconds=time.perf_counter() - started)


def _lost_store_problem(store: FeatureStore) -> str | None:
    """The online store's problem when it is a loss (not merely a view never materialised, which
    an incremental materialisation fills)."""
    problem = online_store_problem(store)
    if problem is None or "never materialised" in problem or "not registered" in problem:
        return None
    return problem


def default_materialization_end(layout: DataLayout | None = None) -> datetime:
    """Now, or just after the last snapshot if the data lie in the future (simulated calendars)."""
    _, last = snapshot_span(layout)
    return max(datetime.now(UTC), last + timedelta(seconds=1))


def materialize_incremental(
    end: datetime | date | str | None = None,
    online: str | None = None,
    *,
    registry: str | None = None,
    project: str | None = None,
    offline: str | None = None,
) -> MaterializationResult:
    """Materialise each view from where its last materialisation ended up to `end` (default: see
    `default_materialization_end`). A view never materialised loads the latest snapshot of every
    entity up to `end` (Feast's own first-run start, now - ttl, would skip historical data); it
    reads from one TTL before min(end, last snapshot), as every entity has a snapshot each day
    through the last one."""
    upper = _as_utc(end) if end is not None else default_materialization_end()
    require_own_registry(repo_config(online, registry, project, offline=offline))
    store = get_feature_store(online, registry=registry, project=project, offline=offline)
    problem = _lost_store_problem(store)
    if problem:
        raise UserError(problem)
    views = BATCH_VIEWS
    started = time.perf_counter()
    never = [name for name in views if not store.get_feature_view(name).materialization_intervals]
    first_start: datetime | None = None
    if never:
        first, last = snapshot_span()
        if upper < first:
            raise UserError(f"--end ({upper.isoformat()}) is before the first snapshot ({first.isoformat()})")
        # Every entity has a snapshot on every day up to the last one, so its latest snapshot up to
        # `upper` lies within one TTL of min(upper, last): scanning further back loads nothing more.
        first_start = max(first, min(upper, last) - timedelta(days=SNAPSHOT_TTL_DAYS))
        store.materialize(start_date=first_start, end_date=upper, feature_views=never)
    rest = [name for name in views if name not in never]
    if rest:
        store.materialize_incremental(end_date=upper, feature_views=rest)
    return MaterializationResult(start=first_start, end=upper, views=views, seconds=time.perf_counter() - started)


# --- retrieval --------------------------------------------------------------------------------------


def historical_features(
    entity_df: pd.DataFrame,
    online: str | None = None,
    *,
    registry: str | None = None,
    project: str | None = None,
    store: FeatureStore | None = None,
    offline: str | None = None,
) -> pd.DataFrame:
    """Point-in-time correct model features for each row of `entity_df` through the feature service
    (the join runs on the profile's offline store: DuckDB, or a Spark job on the Spark profile).

    `entity_df` needs `ENTITY_DF_COLUMNS` (event_timestamp is the point in time; tx_amount and
    tx_datetime feed the on-demand features); other columns (labels, ids) are passed through.
    Returns `entity_df`'s columns followed by MODEL_FEATURES (float64, cold-start defaults for
    entities without a snapshot within the TTL), in the input row order and index. The velocity
    features come from `point_in_time_velocity` (the raw transactions before each row).
    """
    missing = [c for c in ENTITY_DF_COLUMNS if c not in entity_df.columns]
    if missing:
        raise UserError(f"entity dataframe lacks column(s) {missing}; it needs {list(ENTITY_DF_COLUMNS)}")
    clash = [c for c in MODEL_FEATURES if c in entity_df.columns]
    if clash:
        raise UserError(f"entity dataframe already has feature column(s) {clash}")
    if entity_df.empty:
        return entity_df.assign(**{name: pd.Series(dtype="float64") for name in MODEL_FEATURES})
    store = store or get_feature_store(online, registry=registry, project=project, offline=offline)
    request = entity_df[list(ENTITY_DF_COLUMNS)].copy()
    request[_ROW_ORDER] = np.arange(len(request), dtype="int64")
    # tz-aware UTC: naive timestamps would be read as local time by parts of Feast
    request[EVENT_TIMESTAMP] = _aware_utc(request[EVENT_TIMESTAMP])
    request[TX_DATETIME] = _aware_utc(request[TX_DATETIME])
    service = store.get_feature_service(FEATURE_SERVICE)
    joined = store.get_historical_features(entity_df=request, features=service, full_feature_names=False).to_df()
    joined = joined.sort_values(_ROW_ORDER).set_index(_ROW_ORDER)
    if len(joined) != len(request):
        raise RuntimeError(f"Feast returned {len(joined)} rows for {len(request)} entity rows")
    features = joined[list(FEATURE_SERVICE_FEATURES)].astype("float64")
    features = features.fillna({k: v for k, v in BATCH_FEATURE_DEFAULTS.items() if k in features.columns})
    features.index = entity_df.index
    velocity = point_in_time_velocity(entity_df)
    features = pd.concat([features, velocity], axis=1)[list(MODEL_FEATURES)]
    return pd.concat([entity_df, features], axis=1)


def point_in_time_velocity(entity_df: pd.DataFrame, layout: DataLayout | None = None) -> pd.DataFrame:
    """VELOCITY_FEATURES of each entity row at its `event_timestamp` from the transactions strictly
    before it: the values the stream aggregator's windows give the predictor at that instant.

    A row that is a historical transaction (its transaction_id and time in the table
    `fraud features build` wrote, `velocity_features_path`) takes that row; any other row (e.g. a
    hypothetical request) is computed from the raw transactions of the layout. Both are
    `fraud.features.velocity_offline.velocity_sql`. Same index as `entity_df`."""
    layout = layout or DataLayout.current()
    when = pd.to_datetime(entity_df[EVENT_TIMESTAMP], utc=True)
    when_ns = when.dt.tz_localize(None).astype("datetime64[ns]").to_numpy().view("int64")
    result = pd.DataFrame(np.nan, index=entity_df.index, columns=list(VELOCITY_FEATURES))
    table_path = velocity_features_path(layout)
    if TRANSACTION_ID in entity_df.columns and table_path.is_file():
        keys = pd.DataFrame(
            {
                "row": np.arange(len(entity_df)),
                TRANSACTION_ID: entity_df[TRANSACTION_ID].astype(str).to_numpy(),
                "ts_ns": when_ns,
            }
        )
        with duckdb.connect() as con:
            con.register("wanted", keys)
            found = con.execute(
                f"SELECT w.row, t.* EXCLUDE ({TRANSACTION_ID}, ts_ns) "  # noqa: S608 - column-name constants, paths quoted by _sql_file_list
                f"FROM wanted w JOIN read_parquet({_sql_file_list([table_path])}) t USING ({TRANSACTION_ID}, ts_ns)"
            ).df()
        if len(found):
            result.iloc[found["row"].to_numpy(), :] = found[list(VELOCITY_FEATURES)].to_numpy()
    missing = result.isna().any(axis=1).to_numpy()
    if missing.any():
        rows = entity_df.loc[missing]
        stamps = when[missing]
        horizon = timedelta(seconds=VELOCITY_HORIZON_S)
        history = labelled_transactions(stamps.min() - horizon, stamps.max() + timedelta(microseconds=1), layout)
        requests = pd.DataFrame(
            {CUSTOMER_ID: rows[CUSTOMER_ID], TERMINAL_ID: rows[TERMINAL_ID], TX_DATETIME: stamps}, index=rows.index
        )
        result.loc[missing] = velocity_frame(history, requests).to_numpy()
    return result


def _aware_utc(values: pd.Series) -> pd.Series:
    """Timestamps as tz-aware UTC; naive input is UTC (the project's convention)."""
    return pd.to_datetime(values, utc=True)


@dataclass(frozen=True)
class OnlineBatchArrays:
    """Batch features of n (customer, terminal) pairs as arrays (row i = pair i)."""

    #: [n, len(CUSTOMER_SPENDING_FEATURES + TERMINAL_RISK_FEATURES)] float64, NaN = no value (cold start)
    values: np.ndarray
    #: [n] datetime64[ns] (tz-naive UTC) event time of each row's customer / terminal snapshot, NaT when unknown
    customer_snapshot: np.ndarray
    terminal_snapshot: np.ndarray


class OnlineFeatureClient:
    """Batched online lookups of the batch features of (customer, terminal) pairs.

    Holds one FeatureStore (registry read once, refreshed in the background per the yaml cache
    settings) and reads each batch feature view with the online store's own `online_read` (the
    interface every Feast online store implements): one read per view and request, no per-request
    registry access, no response protobuf, values decoded straight into arrays. For one
    transaction this is ~10x cheaper than `FeatureStore.get_online_features`, for 1,000 ~2x
    (docs/performance.md); `tests/test_feature_store.py` checks both give the same values.

    On Redis (redis-py client) and SQLite the views are read by `fraud.online_readers` instead:
    one Redis pipeline / one pivoting SQLite query per view, Feast's own key layout (checked
    against Feast when the views are resolved; `online_read` is the fall-back), feature columns
    decoded at once - 1,000 pairs ~3x faster than `online_read`; tested equal to it.
    """

    def __init__(self, store: FeatureStore) -> None:
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.protos.feast.types.Value_pb2 import Value

        self.store = store
        store.refresh_registry()
        self._entity_key = lambda join_key, value: EntityKey(
            join_keys=[join_key], entity_values=[Value(string_val=value)]
        )
        self._online_store = store._get_provider().online_store  # the configured OnlineStore instance
        self._views: tuple[tuple[Any, str, tuple[str, ...]], ...] | None = None
        #: the batched reader of `fraud.online_readers` (None: each view through `online_read`)
        self._reader: Any = None

    def views(self) -> tuple[tuple[Any, str, tuple[str, ...]], ...]:
        """(feature view, join key, features) of both batch views, from the registry on first use: a
        registry not applied yet fails the lookups (the predictor's degraded mode), not the start."""
        if self._views is None:
            views = (
                (self.store.get_feature_view(CUSTOMER_SPENDING_VIEW), CUSTOMER_ID, CUSTOMER_SPENDING_FEATURES),
                (self.store.get_feature_view(TERMINAL_RISK_VIEW), TERMINAL_ID, TERMINAL_RISK_FEATURES),
            )
            self._reader = self._batch_reader(views)
            self._views = views
        return self._views

    def _batch_reader(self, views: tuple[tuple[Any, str, tuple[str, ...]], ...]) -> Any:
        """`fraud.online_readers`' reader of the online store (Redis via redis-py, SQLite) when the
        installed Feast stores the layout it reads; else None (`online_read`)."""
        from fraud.online_readers import OnlineLayoutMismatch, batch_reader

        try:
            return batch_reader(self._online_store, self.store.config, views)
        except OnlineLayoutMismatch as exc:
            _logger.warning("batched online reader disabled, using Feast's online_read: %s", exc)
            return None

    def arrays(self, customer_ids: Sequence[str], terminal_ids: Sequence[str]) -> OnlineBatchArrays:
        """Batch features of each (customer_ids[i], terminal_ids[i]) pair; see `OnlineBatchArrays`."""
        customers, terminals = [str(c) for c in customer_ids], [str(t) for t in terminal_ids]
        if len(customers) != len(terminals):
            raise UserError(f"got {len(customers)} customer ids but {len(terminals)} terminal ids")
        self.views()
        if self._reader is not None:
            (customer_values, customer_snapshot), (terminal_values, terminal_snapshot) = self._reader.read(
                (customers, terminals)
            )
            return OnlineBatchArrays(
                np.hstack([customer_values, terminal_values]), customer_snapshot, terminal_snapshot
            )
        blocks, snapshots = [], []
        for (view, join_key, features), ids in zip(self.views(), (customers, terminals), strict=True):
            values, snapshot = self._read_view(view, join_key, features, ids)
            blocks.append(values)
            snapshots.append(snapshot)
        return OnlineBatchArrays(np.hstack(blocks), *snapshots)

    def _read_view(
        self, view: Any, join_key: str, features: tuple[str, ...], ids: list[str]
    ) -> tuple[np.ndarray, np.ndarray]:
        if not ids:
            return np.empty((0, len(features))), np.empty(0, dtype="datetime64[ns]")
        entity_key = self._entity_key
        rows = self._online_store.online_read(
            self.store.config, view, [entity_key(join_key, entity) for entity in ids], list(features)
        )
        unknown = [math.nan] * len(features)
        table: list[list[Any]] = []
        stamps: list[Any] = []
        for event_ts, row in rows:
            if not row:
                table.append(unknown)
                stamps.append(None)
                continue
            values = []
            for name in features:
                value = row.get(name)
                kind = value.WhichOneof("val") if value is not None else None
                values.append(getattr(value, kind) if kind is not None else math.nan)
            # Redis answers an absent entity with empty values (and the epoch as timestamp)
            known = event_ts is not None and any(not math.isnan(v) for v in values)
            table.append(values)
            if event_ts is not None and known:
                stamps.append(event_ts.astimezone(UTC).replace(tzinfo=None) if event_ts.tzinfo else event_ts)
            else:
                stamps.append(None)
        return np.array(table, dtype=np.float64), np.array(stamps, dtype="datetime64[ns]")

    def batch(self, customer_ids: Sequence[str], terminal_ids: Sequence[str]) -> pd.DataFrame:
        """One row per (customer_ids[i], terminal_ids[i]): the ids, CUSTOMER_SPENDING_FEATURES,
        TERMINAL_RISK_FEATURES (NaN when the online store has no value: cold start) and
        CUSTOMER_SNAPSHOT_COLUMN / TERMINAL_SNAPSHOT_COLUMN (tz-naive UTC, NaT when missing),
        which lets callers flag stale features (older than today's snapshot)."""
        arrays = self.arrays(customer_ids, terminal_ids)
        frame = pd.DataFrame(
            {
                CUSTOMER_ID: pd.Series([str(c) for c in customer_ids], dtype="object"),
                TERMINAL_ID: pd.Series([str(t) for t in terminal_ids], dtype="object"),
            }
        )
        features = pd.DataFrame(arrays.values, columns=[*CUSTOMER_SPENDING_FEATURES, *TERMINAL_RISK_FEATURES])
        frame = pd.concat([frame, features], axis=1)
        frame[CUSTOMER_SNAPSHOT_COLUMN] = arrays.customer_snapshot.astype("datetime64[us]")
        frame[TERMINAL_SNAPSHOT_COLUMN] = arrays.terminal_snapshot.astype("datetime64[us]")
        return frame


_CLIENTS: dict[tuple[str, ...], OnlineFeatureClient] = {}


def _client_key(profile: StoreProfile, project: str | None) -> tuple[str, ...]:
    """Everything the configuration of a client depends on, without parsing the yaml."""
    settings = current()
    return (
        profile.online,
        profile.registry,
        profile.offline,
        project or settings.feast_project or "",
        str(settings.layout.root),
        settings.redis_url or "",
        settings.feast_registry_url or "",
    )


def online_client(
    online: str | None = None, *, registry: str | None = None, project: str | None = None
) -> OnlineFeatureClient:
    """A process-wide client per configuration (profile, project, data dir, URLs): the yaml and
    the registry are read once, so a lookup costs one online-store round trip."""
    profile = store_profile(online, registry)
    key = _client_key(profile, project)
    client = _CLIENTS.get(key)
    if client is None:
        from feast import FeatureStore

        config = repo_config(profile.online, profile.registry, project, offline=profile.offline)
        client = OnlineFeatureClient(FeatureStore(repo_path=str(FEATURE_REPO_DIR), config=config))
        _CLIENTS[key] = client
    return client


def online_batch_arrays(
    customer_ids: Sequence[str],
    terminal_ids: Sequence[str],
    online: str | None = None,
    *,
    registry: str | None = None,
    project: str | None = None,
) -> OnlineBatchArrays:
    """`online_batch_features` as arrays (the predictor's per-request path): one online-store
    read per batch feature view, no DataFrame."""
    return online_client(online, registry=registry, project=project).arrays(customer_ids, terminal_ids)


def online_batch_features(
    customer_ids: Sequence[str],
    terminal_ids: Sequence[str],
    online: str | None = None,
    *,
    registry: str | None = None,
    project: str | None = None,
) -> pd.DataFrame:
    """Batch features of each (customer, terminal) pair in ONE online-store round trip; see
    `OnlineFeatureClient.batch` for the columns. Missing values are NaN (apply
    BATCH_FEATURE_DEFAULTS, e.g. through `model_feature_frame`)."""
    return online_client(online, registry=registry, project=project).batch(customer_ids, terminal_ids)
