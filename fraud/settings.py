"""The platform's settings: one typed object, read from the environment once at each entry point
(the `fraud` command line, each pipeline component, the predictor, the audit writer) and passed
down. Nothing in the product writes the environment.

Each setting has exactly one name: the environment variable in `Setting.env` (the Kubernetes
manifests set the same variable; a command-line flag that overrides it names it in its help). The
README's configuration table lists every setting (tests/test_settings.py checks both ways).

A value that does not parse or is out of range raises `SettingsError` (a UserError: one line that
names the variable, non-zero exit), never a traceback.

The drift transformer runs in its own environment and cannot import this module: it has its own
typed settings (drift_transformer/drift_transformer/settings.py) for the few it reads; a test checks
that their names and defaults agree with these.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fraud.config import PROJECT_ROOT, DataLayout
from fraud.errors import UserError


class SettingsError(UserError):
    """A setting's value is unusable; the message names its environment variable."""


def _env(name: str, meaning: str, default_text: str | None = None) -> Any:
    """Field metadata: the environment variable, what it means and (for computed defaults) how the
    README states the default."""
    extra: dict[str, str] = {"env": name, "meaning": meaning}
    if default_text is not None:
        extra["default_text"] = default_text
    return extra


Text = Annotated[str, Field(min_length=1)]


class Settings(BaseModel):
    """Every setting of the platform (see the README's configuration table)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # --- where things live -----------------------------------------------------------------------
    data_dir: Path = Field(
        default=PROJECT_ROOT / "data",
        json_schema_extra=_env(
            "FRAUD_DATA_DIR",
            "every file the platform writes (raw data, features, Feast, MLflow, pipeline root, bundles, audit)",
            "`./data`",
        ),
    )
    # --- feature store -----------------------------------------------------------------------------
    feast_online: Literal["sqlite", "redis"] = Field(
        default="sqlite",
        json_schema_extra=_env(
            "FRAUD_FEAST_ONLINE",
            "Feast online store: `sqlite` (embedded) or `redis`; `--online` / `--online-store` override it",
        ),
    )
    feast_registry: Literal["file", "sql"] = Field(
        default="file",
        json_schema_extra=_env("FRAUD_FEAST_REGISTRY", "Feast registry: `file` or `sql` (PostgreSQL)"),
    )
    feast_registry_url: str | None = Field(
        default=None,
        json_schema_extra=_env(
            "FRAUD_FEAST_REGISTRY_URL",
            "SQLAlchemy URL of the SQL registry",
            "`postgresql+psycopg2://postgres@127.0.0.1:5432/feast_registry`",
        ),
    )
    feast_project: str | None = Field(
        default=None,
        json_schema_extra=_env("FRAUD_FEAST_PROJECT", "Feast project name", "`fraud_detection`"),
    )
    redis_url: str | None = Field(
        default=None,
        json_schema_extra=_env(
            "FRAUD_REDIS_URL",
            "Redis connection string (else composed from the `FRAUD_REDIS_*` parts)",
            "`127.0.0.1:6379`",
        ),
    )
    redis_host: str | None = Field(default=None, json_schema_extra=_env("FRAUD_REDIS_HOST", "Redis host", "none"))
    redis_port: int | None = Field(
        default=None, ge=1, le=65535, json_schema_extra=_env("FRAUD_REDIS_PORT", "Redis port", "none")
    )
    redis_password: str | None = Field(
        default=None, json_schema_extra=_env("FRAUD_REDIS_PASSWORD", "Redis password", "none")
    )
    redis_tls: bool = Field(default=False, json_schema_extra=_env("FRAUD_REDIS_TLS", "connect to Redis over TLS"))
    redis_ca_cert: Path | None = Field(
        default=None, json_schema_extra=_env("FRAUD_REDIS_CA_CERT", "CA certificate of Redis's TLS", "none")
    )
    duckdb_threads: int = Field(
        default=2, ge=1, json_schema_extra=_env("FRAUD_DUCKDB_THREADS", "DuckDB threads of the offline feature build")
    )
    duckdb_memory_limit: Text = Field(
        default="2GB",
        json_schema_extra=_env("FRAUD_DUCKDB_MEMORY_LIMIT", "DuckDB memory cap of the offline feature build"),
    )
    feast_offline: Literal["duckdb", "spark"] = Field(
        default="duckdb",
        json_schema_extra=_env(
            "FRAUD_FEAST_OFFLINE",
            "Feast offline store and compute engine: `duckdb` or `spark` (point-in-time sets and "
            "materialisation as Spark jobs)",
        ),
    )
    spark_master: Text = Field(
        default="local[2]",
        json_schema_extra=_env(
            "FRAUD_SPARK_MASTER",
            "Spark master of `fraud features build --engine spark` and the Feast Spark profiles "
            "(`local[N]`, `spark://…`, `k8s://…`)",
        ),
    )
    spark_driver_memory: Text = Field(
        default="2g", json_schema_extra=_env("FRAUD_SPARK_DRIVER_MEMORY", "Spark driver heap")
    )
    spark_executor_memory: Text = Field(
        default="2g", json_schema_extra=_env("FRAUD_SPARK_EXECUTOR_MEMORY", "Spark executor heap")
    )
    spark_shuffle_partitions: int = Field(
        default=8,
        ge=1,
        json_schema_extra=_env("FRAUD_SPARK_SHUFFLE_PARTITIONS", "Spark SQL shuffle partitions of the feature build"),
    )
    spark_python: str | None = Field(
        default=None,
        json_schema_extra=_env(
            "FRAUD_SPARK_PYTHON", "Python of the Spark workers of the Feast Spark profiles", "this interpreter"
        ),
    )
    # --- transaction stream (velocity features) -----------------------------------------------------
    stream_redis_url: str | None = Field(
        default=None,
        json_schema_extra=_env("FRAUD_STREAM_REDIS_URL", "Redis of the transaction stream", "the feature store's"),
    )
    stream_prefix: str | None = Field(
        default=None,
        json_schema_extra=_env("FRAUD_STREAM_PREFIX", "key prefix of the transaction stream", "one per data directory"),
    )
    stream_partitions: int = Field(
        default=4, ge=1, json_schema_extra=_env("FRAUD_STREAM_PARTITIONS", "partitions of the transaction stream")
    )
    stream_maxlen: int = Field(
        default=1_000_000,
        ge=1,
        json_schema_extra=_env("FRAUD_STREAM_MAXLEN", "approximate length cap of each stream partition"),
    )
    stream_group: Text = Field(
        default="velocity-aggregator",
        json_schema_extra=_env("FRAUD_STREAM_GROUP", "consumer group of the velocity aggregator"),
    )
    stream_publish: bool = Field(
        default=False,
        json_schema_extra=_env("FRAUD_STREAM_PUBLISH", "the predictor publishes every scored transaction"),
    )
    # --- training and registry -----------------------------------------------------------------------
    mlflow_tracking_uri: str | None = Field(
        default=None,
        json_schema_extra=_env(
            "MLFLOW_TRACKING_URI", "MLflow tracking and registry store", "`sqlite:///$FRAUD_DATA_DIR/mlflow/mlflow.db`"
        ),
    )
    mlflow_artifact_root: str | None = Field(
        default=None,
        json_schema_extra=_env(
            "FRAUD_MLFLOW_ARTIFACT_ROOT", "artifact root of new MLflow experiments", "next to the tracking database"
        ),
    )
    train_threads: int | None = Field(
        default=None,
        ge=1,
        json_schema_extra=_env("FRAUD_TRAIN_THREADS", "XGBoost threads of training", "min(2, CPUs)"),
    )
    bundle_signing_key: Path | None = Field(
        default=None,
        json_schema_extra=_env("FRAUD_BUNDLE_SIGNING_KEY", "private key that signs serving bundles", "unsigned"),
    )
    core_image: Text = Field(
        default="ghcr.io/fraud-platform/fraud-core:0.1.0",
        json_schema_extra=_env("FRAUD_CORE_IMAGE", "image of every pipeline task (a digest pins it)"),
    )
    retrain_command: str | None = Field(
        default=None,
        json_schema_extra=_env("FRAUD_RETRAIN_COMMAND", "command `fraud monitor` runs to retrain", "the pipeline"),
    )
    # --- serving -------------------------------------------------------------------------------------
    bundle: Path = Field(
        default=Path("/mnt/models"),
        json_schema_extra=_env("FRAUD_BUNDLE", "bundle directory the predictor and the transformer serve"),
    )
    bundle_public_key: Path | None = Field(
        default=None,
        json_schema_extra=_env("FRAUD_BUNDLE_PUBLIC_KEY", "public key the predictor checks bundles with", "none"),
    )
    model_variant: Literal["stable", "canary"] = Field(
        default="stable",
        json_schema_extra=_env("FRAUD_MODEL_VARIANT", "which side of a canary this predictor is"),
    )
    reason_codes: Literal["flagged", "all"] = Field(
        default="flagged",
        json_schema_extra=_env("FRAUD_REASON_CODES", "which decisions carry SHAP reason codes: `flagged` or `all`"),
    )
    thresholds_dir: Path | None = Field(
        default=None,
        json_schema_extra=_env("FRAUD_THRESHOLDS_DIR", "folder of live decision-threshold overrides", "none"),
    )
    stable_version_file: Path | None = Field(
        default=None,
        json_schema_extra=_env("FRAUD_STABLE_VERSION_FILE", "file naming the stable model version", "none"),
    )
    model_version: str | None = Field(
        default=None,
        json_schema_extra=_env(
            "FRAUD_MODEL_VERSION", "model version the predictor pod serves (set by `fraud deploy`)", "none"
        ),
    )
    api_token: str | None = Field(
        default=None,
        json_schema_extra=_env("FRAUD_API_TOKEN", "bearer token `fraud score` sends", "none"),
    )
    # --- audit trail ---------------------------------------------------------------------------------
    audit_db_url: str | None = Field(
        default=None,
        json_schema_extra=_env(
            "FRAUD_AUDIT_DB_URL",
            "audit database (else composed from the `FRAUD_AUDIT_DB_*` parts)",
            "SQLite under `$FRAUD_DATA_DIR/audit`",
        ),
    )
    audit_db_host: str | None = Field(
        default=None, json_schema_extra=_env("FRAUD_AUDIT_DB_HOST", "audit PostgreSQL host", "none")
    )
    audit_db_port: int | None = Field(
        default=None, ge=1, le=65535, json_schema_extra=_env("FRAUD_AUDIT_DB_PORT", "audit PostgreSQL port", "5432")
    )
    audit_db_name: str | None = Field(
        default=None, json_schema_extra=_env("FRAUD_AUDIT_DB_NAME", "audit PostgreSQL database", "none")
    )
    audit_db_user: str | None = Field(
        default=None, json_schema_extra=_env("FRAUD_AUDIT_DB_USER", "audit PostgreSQL user", "none")
    )
    audit_db_password: str | None = Field(
        default=None, json_schema_extra=_env("FRAUD_AUDIT_DB_PASSWORD", "audit PostgreSQL password", "none")
    )
    audit_db_sslmode: Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] | None = Field(
        default=None, json_schema_extra=_env("FRAUD_AUDIT_DB_SSLMODE", "libpq sslmode of the audit database", "none")
    )
    audit_db_sslrootcert: Path | None = Field(
        default=None,
        json_schema_extra=_env("FRAUD_AUDIT_DB_SSLROOTCERT", "CA certificate of the audit database", "none"),
    )
    audit_spool: Path | None = Field(
        default=None,
        json_schema_extra=_env(
            "FRAUD_AUDIT_SPOOL", "the predictor's audit spool file", "`$FRAUD_DATA_DIR/audit/spool.db`"
        ),
    )
    audit_spool_sync: Literal["NORMAL", "FULL"] | None = Field(
        default=None,
        json_schema_extra=_env(
            "FRAUD_AUDIT_SPOOL_SYNC",
            "SQLite `synchronous` of the audit spool: `NORMAL` or `FULL`",
            "`NORMAL` in the predictor, `FULL` elsewhere",
        ),
    )
    pseudonym_key: str | None = Field(
        default=None,
        json_schema_extra=_env("FRAUD_PSEUDONYM_KEY", "HMAC key of the pseudonyms in audit exports", "none"),
    )
    audit_chain_key: str | None = Field(
        default=None,
        json_schema_extra=_env("FRAUD_AUDIT_CHAIN_KEY", "HMAC key of the audit trail's hash chain", "none"),
    )
    # --- rollout and monitoring ------------------------------------------------------------------------
    rollout_state_dir: Path | None = Field(
        default=None,
        json_schema_extra=_env(
            "FRAUD_ROLLOUT_STATE_DIR", "where rollout records are kept", "`$FRAUD_DATA_DIR/rollouts`"
        ),
    )
    local_router_port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        json_schema_extra=_env("FRAUD_LOCAL_ROUTER_PORT", "port of the local canary router", "a free port"),
    )
    monitor_metrics_url: Text = Field(
        default="http://127.0.0.1:8080/metrics",
        json_schema_extra=_env("FRAUD_MONITOR_METRICS_URL", "the drift transformer's /metrics `fraud monitor` reads"),
    )
    prometheus_namespace_label: Text = Field(
        default="namespace",
        json_schema_extra=_env("FRAUD_PROMETHEUS_NAMESPACE_LABEL", "Prometheus label that holds the namespace"),
    )

    # --- reading -------------------------------------------------------------------------------------
    @classmethod
    def env_names(cls) -> dict[str, str]:
        """Field name -> environment variable."""
        return {name: _extra(field)["env"] for name, field in cls.model_fields.items()}

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """The settings in `environ` (default: the process environment). Empty values count as unset.
        SettingsError naming the variable if one is unusable."""
        environ = os.environ if environ is None else environ
        values = {
            name: environ[env].strip()
            for name, env in cls.env_names().items()
            if environ.get(env) is not None and environ[env].strip()
        }
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            error = exc.errors()[0]
            name = str(error["loc"][0]) if error["loc"] else ""
            env = cls.env_names().get(name, name)
            secret = any(word in env for word in ("PASSWORD", "KEY", "TOKEN"))
            shown = "<hidden>" if secret else repr(values.get(name, ""))
            raise SettingsError(f"{env}={shown}: {error['msg']}") from None

    def env(self) -> dict[str, str]:
        """The settings that are set, as environment variables (for a child process's environment)."""
        out = {}
        for name, env in self.env_names().items():
            value = getattr(self, name)
            if value is None:
                continue
            out[env] = ("true" if value else "false") if isinstance(value, bool) else str(value)
        return out

    # --- derived -------------------------------------------------------------------------------------
    @property
    def layout(self) -> DataLayout:
        return DataLayout(Path(self.data_dir).expanduser().resolve())

    def with_data_dir(self, data_dir: Path) -> Settings:
        return self.model_copy(update={"data_dir": Path(data_dir).expanduser().resolve()})


#: Settings an entry point has activated (innermost last); see `activated`.
_ACTIVE: list[Settings] = []


def current() -> Settings:
    """The settings of this process: those the entry point activated, else the environment's.

    Entry points read the settings once (`Settings.from_env`) and activate them for the command
    they run; library functions take settings or paths as parameters and fall back to this only
    when their caller passed none."""
    return _ACTIVE[-1] if _ACTIVE else Settings.from_env()


@contextlib.contextmanager
def activated(settings: Settings) -> Iterator[Settings]:
    """Make `settings` the process's settings (`current()`) for the duration of the block."""
    _ACTIVE.append(settings)
    try:
        yield settings
    finally:
        _ACTIVE.pop()


def activated_settings() -> Settings | None:
    """The settings an entry point activated in this process, or None (`current()` then reads the
    environment). For code that Feast imports by file (the feature repository), which has no caller
    to pass settings down."""
    return _ACTIVE[-1] if _ACTIVE else None


def read_at_entry() -> Settings:
    """For a one-shot process's entry point (a pipeline component): read the settings from the
    environment once and make them the process's settings for the rest of its life."""
    settings = Settings.from_env()
    _ACTIVE.append(settings)
    return settings


def _extra(field: Any) -> dict[str, str]:
    """The metadata `_env()` gave the field (every field is declared with it)."""
    return cast(dict[str, str], field.json_schema_extra)


def documentation_rows() -> list[tuple[str, str, str, str]]:
    """(name, environment variable, default as the README states it, meaning) of every setting, in
    declaration order: the rows of the README's configuration table."""
    rows = []
    for name, field in Settings.model_fields.items():
        extra = _extra(field)
        default = extra.get("default_text")
        if default is None:
            value = field.default
            default = f"`{'true' if value else 'false'}`" if isinstance(value, bool) else f"`{value}`"
        rows.append((f"`{name}`", f"`{extra['env']}`", default, extra["meaning"]))
    return rows


def documentation_table() -> str:
    """The README's configuration table (Markdown)."""
    lines = ["| setting | environment variable | default | meaning |", "|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in documentation_rows()]
    return "\n".join(lines)
