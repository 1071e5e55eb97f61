"""The Apache Spark engine of the offline feature tables (`fraud features build --engine spark`).

Spark runs the SQL that ibis compiles from the one definition in `fraud.features.tables`; the DuckDB
engine (`fraud.features.offline`) runs the same expressions. Each table is written by Spark as part
files into a hidden staging folder next to the target, then merged, in order and batch by batch
(memory bounded by a row group), into the single Parquet file the DuckDB engine writes (same name,
same Arrow schema, zstd), and renamed into place: a failed build leaves the previous tables intact.

Masters: `local[N]` (in this process's JVM, the default `local[2]`), `spark://host:port` (a
standalone cluster) or `k8s://https://host:port` (Spark on Kubernetes, client mode). With a cluster
master the data directory must be on a filesystem the executors mount at the same path.

Java comes from the operating system's packages (Debian: `default-jre-headless`, installed by
`make setup`). A missing Java, an unreachable master, a driver or executor out of memory each end
the build with one line (`UserError`).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.parquet as pq

from fraud.errors import UserError
from fraud.features import tables

if TYPE_CHECKING:
    import ibis.expr.types as ir
    from pyspark.sql import SparkSession

#: Default master: two local cores in this process's JVM.
DEFAULT_MASTER = "local[2]"
#: Default driver heap (local mode: the whole engine).
DEFAULT_DRIVER_MEMORY = "2g"
_MEMORY_PATTERN = re.compile(r"^(\d+)([kmgt])$", re.IGNORECASE)
_MASTER_PATTERN = re.compile(r"^(local(\[(\d+|\*)(,\d+)?\])?|spark://.+|k8s://.+)$")
_ROW_GROUP_SIZE = 122_880
_CONNECT_TIMEOUT_S = 5.0


def memory_bytes(text: str) -> int:
    """Bytes of a JVM memory size such as 512m or 2g."""
    match = _MEMORY_PATTERN.match(text.strip())
    if match is None:
        raise UserError(f"Spark memory {text!r} is not a size like 512m or 2g")
    return int(match.group(1)) * 1024 ** "kmgt".index(match.group(2).lower()) * 1024


@dataclass(frozen=True)
class SparkSettings:
    """Where and with how much memory the Spark engine runs."""

    master: str = DEFAULT_MASTER
    driver_memory: str = DEFAULT_DRIVER_MEMORY
    executor_memory: str = "2g"
    #: partitions of each shuffle (group by, window, sort); a few per core
    shuffle_partitions: int = 8

    def __post_init__(self) -> None:
        if not _MASTER_PATTERN.match(self.master):
            raise UserError(
                f"Spark master {self.master!r} is not local[N], spark://host:port or k8s://https://host:port"
            )
        for name in ("driver_memory", "executor_memory"):
            if memory_bytes(getattr(self, name)) < 512 * 1024**2:
                raise UserError(f"Spark {name.replace('_', ' ')} {getattr(self, name)!r} is below Spark's 512m minimum")
        if self.shuffle_partitions < 1:
            raise UserError(f"Spark shuffle partitions must be >= 1, got {self.shuffle_partitions}")

    @classmethod
    def from_env(cls, master: str | None = None) -> SparkSettings:
        """The Spark settings of the process's settings (FRAUD_SPARK_MASTER, FRAUD_SPARK_DRIVER_MEMORY,
        FRAUD_SPARK_EXECUTOR_MEMORY, FRAUD_SPARK_SHUFFLE_PARTITIONS); `master` overrides the first."""
        from fraud.settings import current

        settings = current()
        return cls(
            master=master or settings.spark_master,
            driver_memory=settings.spark_driver_memory,
            executor_memory=settings.spark_executor_memory,
            shuffle_partitions=settings.spark_shuffle_partitions,
        )


# --- preconditions --------------------------------------------------------------------------------


def java_executable() -> str:
    """The `java` Spark will start ($JAVA_HOME/bin/java, else the PATH's); UserError without one."""
    home = os.environ.get("JAVA_HOME")
    if home:
        candidate = Path(home) / "bin" / "java"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
        raise UserError(f"JAVA_HOME={home} holds no bin/java: point it at a Java 17+ runtime or unset it")
    found = shutil.which("java")
    if found is None:
        raise UserError(
            "the Spark engine needs Java 17+: install it (Debian: apt-get install default-jre-headless, "
            "as `make setup` does) or use --engine duckdb"
        )
    return found


def check_master_reachable(master: str, timeout: float = _CONNECT_TIMEOUT_S) -> None:
    """For spark:// and k8s:// masters, open a TCP connection to each host:port first, so that an
    unreachable master fails in seconds with one line instead of Spark's minutes of retries."""
    if master.startswith("local"):
        return
    url = master.removeprefix("k8s://") if master.startswith("k8s://") else master
    if "://" not in url:
        url = f"https://{url}"
    endpoints = urlsplit(url).netloc.split(",")  # spark://host1:port1,host2:port2 (standby masters)
    default_port = 7077 if master.startswith("spark://") else 443
    errors = []
    for endpoint in endpoints:
        host, _, port = endpoint.rpartition(":") if ":" in endpoint else (endpoint, "", str(default_port))
        try:
            with socket.create_connection((host, int(port)), timeout=timeout):
                return
        except (OSError, ValueError) as exc:
            errors.append(f"{endpoint}: {exc}")
    raise UserError(f"cannot reach the Spark master {master} ({'; '.join(errors)})")


# --- session --------------------------------------------------------------------------------------


def _session_conf(settings: SparkSettings, local_dir: Path) -> dict[str, str]:
    conf = {
        "spark.app.name": "fraud-offline-features",
        "spark.driver.memory": settings.driver_memory,
        "spark.executor.memory": settings.executor_memory,
        "spark.sql.shuffle.partitions": str(settings.shuffle_partitions),
        # timestamps are UTC wall-clock values without a zone, as in the raw data and DuckDB's tables
        "spark.sql.session.timeZone": "UTC",
        "spark.sql.timestampType": "TIMESTAMP_NTZ",
        "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",
        "spark.sql.parquet.compression.codec": "zstd",
        "spark.local.dir": str(local_dir),
        "spark.ui.enabled": "false",
        "spark.ui.showConsoleProgress": "false",
        # the JVM dies instead of limping on after an OutOfMemoryError; the build reports it
        "spark.driver.extraJavaOptions": "-XX:+ExitOnOutOfMemoryError",
        "spark.executor.extraJavaOptions": "-XX:+ExitOnOutOfMemoryError",
    }
    if settings.master.startswith("local"):
        conf["spark.driver.bindAddress"] = "127.0.0.1"
        conf["spark.driver.host"] = "127.0.0.1"
    return conf


@contextmanager
def spark_session(settings: SparkSettings, local_dir: Path) -> Iterator[SparkSession]:
    """A Spark session for one build (stopped, with its JVM, on exit)."""
    java_executable()
    check_master_reachable(settings.master)
    from pyspark.errors import PySparkException
    from pyspark.sql import SparkSession

    builder = SparkSession.builder.master(settings.master)
    for key, value in _session_conf(settings, local_dir).items():
        builder = builder.config(key, value)
    try:
        session = builder.getOrCreate()
    except (PySparkException, Exception) as exc:  # noqa: BLE001 - py4j and JVM start-up errors have no common base
        raise UserError(f"cannot start Spark (master {settings.master}): {_first_line(exc)}") from None
    session.sparkContext.setLogLevel("ERROR")
    try:
        yield session
    finally:
        with suppress(Exception):  # a JVM that already died cannot be stopped; nothing to release
            session.stop()
        _shutdown_gateway()


def _shutdown_gateway() -> None:
    """Stop the py4j gateway and its JVM so the next build starts a fresh one (with its settings)."""
    from pyspark import SparkContext

    gateway = SparkContext._gateway
    if gateway is None:
        return
    with suppress(Exception):  # the JVM may already be gone
        gateway.shutdown()
    process = getattr(gateway, "proc", None)
    if process is not None:  # PySpark's gateway JVM exits when its standard input closes
        if process.stdin is not None:
            with suppress(OSError):
                process.stdin.close()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)
    SparkContext._gateway = None
    SparkContext._jvm = None
    forget_stopped_session()


def forget_stopped_session() -> None:
    """Drop PySpark's process-wide references to a context whose JVM is gone, so the next
    `getOrCreate` (a build, or Feast's Spark offline store) starts a new one instead of failing
    on the stopped one."""
    from pyspark import SparkContext
    from pyspark.sql import SparkSession

    active = SparkContext._active_spark_context
    if active is not None and (SparkContext._gateway is None or getattr(active, "_jvm", None) is None):
        SparkContext._active_spark_context = None
    if SparkContext._active_spark_context is None:
        SparkSession._instantiatedSession = None
        SparkSession._activeSession = None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("at ", "JVM stacktrace")):
            return line[:400]
    return type(exc).__name__


def explain_failure(exc: BaseException, settings: SparkSettings) -> str:
    """One line for a failed Spark job."""
    text = str(exc)
    if "OutOfMemoryError" in text or "java.lang.OutOfMemory" in text or "Java heap space" in text:
        return (
            f"Spark ran out of memory (driver {settings.driver_memory}, executor {settings.executor_memory}): "
            "raise FRAUD_SPARK_DRIVER_MEMORY / FRAUD_SPARK_EXECUTOR_MEMORY or FRAUD_SPARK_SHUFFLE_PARTITIONS"
        )
    if (
        isinstance(exc, ConnectionError | EOFError)
        or "Py4JNetworkError" in type(exc).__name__
        or ("Answer from Java side is empty" in text or "Connection refused" in text)
    ):
        return (
            f"the Spark JVM died during the build (driver {settings.driver_memory}); "
            "usually out of memory: raise FRAUD_SPARK_DRIVER_MEMORY or FRAUD_SPARK_SHUFFLE_PARTITIONS"
        )
    return f"Spark job failed: {_first_line(exc)}"


@contextmanager
def job_errors(settings: SparkSettings, step: str) -> Iterator[None]:
    """Turn a failure of the Spark work inside into one line naming `step` (UserError)."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - py4j, PySpark and JVM failures have no common base
        raise UserError(f"{step}: {explain_failure(exc, settings)}") from None


# --- running and writing --------------------------------------------------------------------------


def register_raw(session: SparkSession, files: list[Path]) -> None:
    """Register the raw transaction files as the relation the expressions read."""
    frame = session.read.parquet(*[str(path) for path in files]).select(*tables.RAW_COLUMNS)
    frame.createOrReplaceTempView(tables.RAW_TRANSACTIONS)


def collect_rows(session: SparkSession, expr: ir.Table) -> list[tuple[Any, ...]]:
    """The (small) result of an expression as tuples."""
    return [tuple(row) for row in session.sql(tables.compile_sql(expr, "spark")).collect()]


def write_table(session: SparkSession, expr: ir.Table, target: Path) -> None:
    """Run `expr` on Spark and write its rows, in the expression's order, to the single Parquet file
    `target` with the expression's Arrow schema (a staging folder and temporary file, then renamed)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    schema = expr.schema().to_pyarrow()
    staging = Path(tempfile.mkdtemp(prefix=f".{target.stem}.spark-", dir=target.parent))
    parts_dir = staging / "parts"
    try:
        session.sql(tables.compile_sql(expr, "spark")).write.parquet(str(parts_dir))
        parts = sorted(parts_dir.glob("part-*.parquet"))  # part numbers follow the sort order
        temp = staging / target.name
        with pq.ParquetWriter(temp, schema, compression="zstd") as writer:
            for part in parts:
                source = pq.ParquetFile(part)
                for group in range(source.num_row_groups):
                    batch = source.read_row_group(group)
                    writer.write_table(_conform(batch, schema), row_group_size=_ROW_GROUP_SIZE)
            if not parts:
                writer.write_table(schema.empty_table())
        os.replace(temp, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _conform(batch: pa.Table, schema: pa.Schema) -> pa.Table:
    """Spark's columns in the expression's names, order and Arrow types (nullable, as DuckDB writes)."""
    return pa.Table.from_arrays(
        [batch.column(field.name).cast(field.type) for field in schema], schema=schema
    ).combine_chunks()
