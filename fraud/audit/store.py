"""The one data-access layer of the audit database, for PostgreSQL (production) and SQLite
(embedded default under `<data dir>/audit/audit.db`).

The URL comes from FRAUD_AUDIT_DB_URL when set. The schema is managed by Alembic
(`upgrade_database`), with its own version table so the audit tables can share a database with
other applications (MLflow keeps its own `alembic_version`).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, cast

import orjson
from sqlalchemy import Engine, Table, create_engine, event, func, inspect, select
from sqlalchemy import table as table_clause
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, SQLAlchemyError
from sqlalchemy.pool import NullPool

from fraud.audit.tables import Decision, Explanation
from fraud.config import DataLayout
from fraud.errors import UserError
from fraud.settings import Settings, current

AUDIT_DB_URL_ENV = "FRAUD_AUDIT_DB_URL"
#: The audit database as separate settings (what the Kubernetes manifests provide: host, port,
#: name and TLS from a ConfigMap, user and password from a Secret). Composed into a URL with every
#: part encoded, so a password holding `@`, `/`, `:` or `%` works.
AUDIT_DB_HOST_ENV = "FRAUD_AUDIT_DB_HOST"
AUDIT_DB_PORT_ENV = "FRAUD_AUDIT_DB_PORT"
AUDIT_DB_NAME_ENV = "FRAUD_AUDIT_DB_NAME"
AUDIT_DB_USER_ENV = "FRAUD_AUDIT_DB_USER"
AUDIT_DB_PASSWORD_ENV = "FRAUD_AUDIT_DB_PASSWORD"  # noqa: S105 - name of an environment variable, not a password
AUDIT_DB_SSLMODE_ENV = "FRAUD_AUDIT_DB_SSLMODE"
AUDIT_DB_SSLROOTCERT_ENV = "FRAUD_AUDIT_DB_SSLROOTCERT"
#: libpq's sslmode values; verify-full (certificate and host name checked) is the only one that
#: stops an impostor server, the manifests use it
SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
ALEMBIC_VERSION_TABLE = "fraud_audit_alembic_version"
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
SUPPORTED_DIALECTS = ("postgresql", "sqlite")

#: Columns of the decisions table in export order.
#: the decisions table (declarative mapping types `__table__` as a FromClause)
DECISION_TABLE = cast(Table, Decision.__table__)
DECISION_COLUMNS: tuple[str, ...] = tuple(column.name for column in DECISION_TABLE.columns)


def audit_dir(layout: DataLayout | None = None) -> Path:
    """`<data dir>/audit`: the embedded database and the default spool live here."""
    return (layout or current().layout).root / "audit"


def audit_db_url(url: str | None = None, settings: Settings | None = None) -> str:
    """The audit database URL: explicit, else FRAUD_AUDIT_DB_URL, else composed from
    FRAUD_AUDIT_DB_HOST & co. (`compose_db_url`), else the embedded SQLite file."""
    if url:
        return url
    settings = settings or current()
    if settings.audit_db_url:
        return settings.audit_db_url
    composed = compose_db_url(settings.env())
    if composed:
        return composed
    return f"sqlite:///{audit_dir(settings.layout) / 'audit.db'}"


def compose_db_url(env: Mapping[str, str]) -> str | None:
    """A PostgreSQL URL from the split settings (None without FRAUD_AUDIT_DB_HOST); user and
    password are percent-encoded, sslmode / sslrootcert become libpq query parameters."""
    host = env.get(AUDIT_DB_HOST_ENV, "").strip()
    if not host:
        return None
    port_text = env.get(AUDIT_DB_PORT_ENV, "").strip() or "5432"
    try:
        port = int(port_text)
    except ValueError:
        raise UserError(f"{AUDIT_DB_PORT_ENV}={port_text!r} is not a port number") from None
    query: dict[str, str] = {}
    sslmode = env.get(AUDIT_DB_SSLMODE_ENV, "").strip()
    if sslmode:
        if sslmode not in SSL_MODES:
            raise UserError(f"{AUDIT_DB_SSLMODE_ENV}={sslmode!r}: must be one of {', '.join(SSL_MODES)}")
        query["sslmode"] = sslmode
    root_cert = env.get(AUDIT_DB_SSLROOTCERT_ENV, "").strip()
    if root_cert:
        query["sslrootcert"] = root_cert
    url = URL.create(
        "postgresql+psycopg2",
        username=env.get(AUDIT_DB_USER_ENV) or None,
        password=env.get(AUDIT_DB_PASSWORD_ENV) or None,
        host=host,
        port=port,
        database=env.get(AUDIT_DB_NAME_ENV, "").strip() or "fraud",
        query=query,
    )
    return url.render_as_string(hide_password=False)


def _set_sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


def _json_text(value: Any) -> str:
    return orjson.dumps(value).decode()


#: JSON columns (features, reason codes) encoded with orjson: the writer binds two per decision, and
#: the standard library's encoder was a fifth of its time (docs/performance.md)
_JSON_CODEC: dict[str, Any] = {"json_serializer": _json_text, "json_deserializer": orjson.loads}


def create_audit_engine(url: str | None = None, *, pooled: bool = True) -> Engine:
    """An engine on the audit database; creates the folder of an embedded SQLite file.

    Raises UserError for a URL that is malformed or names an unsupported database.
    """
    resolved = audit_db_url(url)
    try:
        parsed = make_url(resolved)
    except ArgumentError as exc:
        raise UserError(f"audit database URL {resolved!r} is invalid: {exc}") from None
    if parsed.get_backend_name() not in SUPPORTED_DIALECTS:
        raise UserError(
            f"audit database URL {parsed.render_as_string(hide_password=True)!r}: "
            f"backend must be one of {SUPPORTED_DIALECTS}"
        )
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(parsed, **_JSON_CODEC, **({} if pooled else {"poolclass": NullPool}))
        event.listen(engine, "connect", _set_sqlite_pragmas)
        return engine
    if parsed.drivername == "postgresql":
        # SQLAlchemy 2.1 defaults to psycopg 3; the locked environment ships psycopg2.
        parsed = parsed.set(drivername="postgresql+psycopg2")
    options: dict[str, Any] = {"pool_pre_ping": True}
    if not pooled:
        options = {"poolclass": NullPool}
    try:
        return create_engine(parsed, connect_args={"connect_timeout": 5}, **_JSON_CODEC, **options)
    except ImportError as exc:
        raise UserError(f"audit database driver {parsed.drivername!r} is not installed: {exc}") from None


def _alembic_config(connection: Connection):
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    return config


def upgrade_database(engine: Engine, revision: str = "head") -> str | None:
    """Apply the Alembic migrations up to `revision` (head by default); returns the new revision.

    Works from any working directory: the configuration is built here, not read from alembic.ini.
    """
    from alembic import command

    with engine.begin() as connection:
        command.upgrade(_alembic_config(connection), revision)
    return current_revision(engine)


def current_revision(engine: Engine) -> str | None:
    """The applied migration revision, or None for a database never migrated."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"version_table": ALEMBIC_VERSION_TABLE})
        return context.get_current_revision()


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    with create_engine("sqlite://").connect() as connection:
        head = ScriptDirectory.from_config(_alembic_config(connection)).get_current_head()
    if head is None:  # a broken installation, not user input
        raise RuntimeError(f"no migrations in {MIGRATIONS_DIR}")
    return head


def require_schema(engine: Engine) -> None:
    """Raise UserError unless the database is migrated to the current head."""
    revision = current_revision(engine)
    if revision != head_revision():
        where = engine.url.render_as_string(hide_password=True)
        raise UserError(
            f"audit database {where} is at migration {revision or 'none'}, expected {head_revision()}; "
            "run `fraud audit migrate`"
        )


def dialect_insert(bind: Connection | Engine, table: Any):
    """The INSERT construct of the bind's dialect (PostgreSQL or SQLite), which has ON CONFLICT."""
    factory = postgresql_insert if bind.dialect.name == "postgresql" else sqlite_insert
    return factory(table)


def insert_decisions(connection: Connection, rows: Sequence[dict[str, Any]], *, skip_existing: bool = True) -> int:
    """Insert decision rows, skipping any (transaction_id, model_version) already present.

    `INSERT ... ON CONFLICT DO NOTHING RETURNING` executed as one executemany, which SQLAlchemy
    sends as multi-row VALUES pages ("insertmanyvalues") with a cached compiled statement on
    PostgreSQL; on SQLite one prepared statement through sqlite3's executemany. Unlike SQLite's
    `INSERT OR IGNORE` it only skips key conflicts: a row violating NOT NULL or a CHECK fails
    loudly instead of vanishing.
    Returns the number of rows actually inserted. `skip_existing=False` (the audit writer, which
    checks for existing keys itself): a plain INSERT, so a key conflict raises IntegrityError.
    """
    if not rows:
        return 0
    columns = rows[0].keys()
    same_columns = all(row.keys() == columns for row in rows)
    if connection.dialect.name == "sqlite" and same_columns:
        return _insert_decisions_sqlite(connection, rows, skip_existing)
    table = DECISION_TABLE
    if not skip_existing:
        if connection.dialect.driver == "psycopg2" and same_columns:
            return _copy_decisions_postgresql(connection, rows)
        connection.execute(table.insert(), list(rows))
        return len(rows)
    statement = (
        dialect_insert(connection, table)
        .on_conflict_do_nothing(index_elements=["transaction_id", "model_version"])
        .returning(table.c.transaction_id)
    )
    return len(connection.execute(statement, list(rows)).all())


def _insert_decisions_sqlite(connection: Connection, rows: Sequence[dict[str, Any]], skip_existing: bool) -> int:
    """`insert_decisions` on SQLite: one prepared `INSERT ... ON CONFLICT DO NOTHING` run by
    sqlite3's executemany, each value converted by its column type's own bind processor (the
    text SQLAlchemy would bind; tested equal). Skips SQLAlchemy's per-row parameter handling,
    ~60 % of the writer's insert time (docs/performance.md). The inserted count is sqlite3's
    rowcount, which sums the changes of all rows."""
    table = DECISION_TABLE
    names = list(rows[0])  # every row has these keys (checked by the caller)
    dialect = connection.dialect
    processors = [table.c[name].type.dialect_impl(dialect).bind_processor(dialect) for name in names]
    columns = [
        [row[name] for row in rows] if processor is None else [processor(row[name]) for row in rows]
        for name, processor in zip(names, processors, strict=True)
    ]
    statement = f"INSERT INTO {table.name} ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})"  # noqa: S608 - table and column names from the SQLAlchemy Table, values bound
    if skip_existing:
        statement += " ON CONFLICT (transaction_id, model_version) DO NOTHING"
    return connection.exec_driver_sql(statement, list(zip(*columns, strict=True))).rowcount


def insert_explanations(connection: Connection, rows: Sequence[dict[str, Any]]) -> int:
    """Insert explanation rows, skipping any explanation_id already present (a spool replay)."""
    if not rows:
        return 0
    table = Explanation.__table__
    statement = (
        dialect_insert(connection, table)
        .on_conflict_do_nothing(index_elements=["explanation_id"])
        .returning(table.c.explanation_id)
    )
    return len(connection.execute(statement, list(rows)).all())


_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def _copy_text(value: Any) -> str:
    """One value in PostgreSQL's COPY text format, as psycopg2 would have bound it: NULL is `\\N`,
    booleans t/f, floats by repr (what psycopg2 sends), datetimes ISO (the audit's are naive
    UTC), JSON columns already serialised by their bind processor; backslash, tab, newline and
    carriage return escaped."""
    if value is None:
        return "\\N"
    if isinstance(value, bool):
        return "t" if value else "f"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, datetime):
        return value.isoformat(sep=" ")
    return str(value).translate(_COPY_ESCAPES)


def _copy_decisions_postgresql(connection: Connection, rows: Sequence[dict[str, Any]]) -> int:
    """`insert_decisions(skip_existing=False)` on PostgreSQL: one `COPY decisions (...) FROM STDIN`
    in the connection's transaction instead of multi-row INSERT pages (half the database and
    driver time for a batch of 1,000). The values are the ones the INSERT would bind (each column
    type's bind processor, then the COPY text format); a row the database refuses fails the
    whole COPY with the driver's error wrapped as SQLAlchemy wraps it (DataError, IntegrityError,
    OperationalError, ...), so the writer tells row errors from an unusable database as before."""
    import psycopg2

    table = DECISION_TABLE
    names = list(rows[0])
    dialect = connection.dialect
    processors = [table.c[name].type.dialect_impl(dialect).bind_processor(dialect) for name in names]
    lines = []
    for row in rows:
        values = (
            row[name] if processor is None else processor(row[name])
            for name, processor in zip(names, processors, strict=True)
        )
        lines.append("\t".join(_copy_text(value) for value in values))
    payload = io.StringIO("\n".join(lines) + "\n")
    statement = f"COPY {table.name} ({', '.join(names)}) FROM STDIN"
    dbapi_connection = connection.connection.dbapi_connection
    cursor = dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.copy_expert(statement, payload)
    except psycopg2.Error as exc:
        lost = dialect.is_disconnect(exc, dbapi_connection, cursor)
        if lost:  # as SQLAlchemy does for its own statements: the pool drops this connection
            connection.invalidate(exc)
        raise DBAPIError.instance(
            statement, None, exc, psycopg2.Error, connection_invalidated=lost, dialect=dialect
        ) from exc
    finally:
        with contextlib.suppress(psycopg2.Error):
            cursor.close()
    return len(rows)


def existing_decisions(connection: Connection, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], dict]:
    """The recorded rows among these (transaction_id, model_version) keys, by key."""
    if not keys:
        return {}
    table = DECISION_TABLE
    wanted = set(keys)
    query = select(table).where(table.c.transaction_id.in_(sorted({tx for tx, _ in wanted})))
    found = {}
    for row in connection.execute(query):
        key = (row.transaction_id, row.model_version)
        if key in wanted:
            found[key] = dict(row._mapping)
    return found


def find_decisions(engine: Engine, transaction_id: str) -> list[dict[str, Any]]:
    """Every recorded decision of one transaction (one per model version that scored it)."""
    query = select(Decision.__table__).where(Decision.transaction_id == transaction_id).order_by(Decision.received_at)
    with engine.connect() as connection:
        return [dict(row._mapping) for row in connection.execute(query)]


def iter_decisions(
    engine: Engine, start: datetime | None, end: datetime | None, chunk_size: int = 10_000
) -> Iterator[list[dict[str, Any]]]:
    """Decisions with start <= received_at < end, oldest first, streamed in chunks."""
    query = select(Decision.__table__).order_by(Decision.received_at, Decision.transaction_id, Decision.model_version)
    if start is not None:
        query = query.where(Decision.received_at >= start)
    if end is not None:
        query = query.where(Decision.received_at < end)
    with engine.connect() as connection:
        result = connection.execution_options(yield_per=chunk_size).execute(query)
        for partition in result.partitions(chunk_size):
            yield [dict(row._mapping) for row in partition]


def table_names(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names())


def count_rows(engine: Engine, table: str) -> int:
    query = select(func.count()).select_from(table_clause(table))
    with engine.connect() as connection:
        return int(connection.execute(query).scalar_one())


def redacted_url(url: str) -> str:
    """A database URL fit for messages (password hidden)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<invalid URL>"


def migrate_audit_database(url: str) -> str | None:
    """Create / upgrade the audit tables (Alembic) at `url`; returns the revision. UserError if impossible."""
    engine = create_audit_engine(url, pooled=False)  # UserError for a malformed / unsupported URL
    try:
        return upgrade_database(engine)
    except SQLAlchemyError as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(
            f"cannot migrate the audit database {redacted_url(url)}: {detail}; fix it or start with --no-audit"
        ) from None
    finally:
        engine.dispose()
