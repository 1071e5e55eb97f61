"""The services a pipeline task may use, on loopback: an S3-compatible object store (moto's
standalone server, which stands in for MinIO / S3 / GCS), an MLflow tracking server, a PostgreSQL
database for the Feast SQL registry and a Redis key space (a Feast project of its own).

`running_services()` starts them and yields the environment a task gets (on a cluster the same
variables come from Kubernetes secrets); everything is removed at the end.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from fraud.net import free_port

BIN = Path(sys.executable).parent
PG_ADMIN_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
REDIS_URL = "127.0.0.1:6379"


def _wait_http(url: str, process: subprocess.Popen, seconds: float = 300.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode} before answering {url}")
        try:
            if httpx.get(url, timeout=1.0).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {seconds:.0f} s")


@contextlib.contextmanager
def _process(args: list[str], log: Path, health_url: str, env: dict[str, str] | None = None) -> Iterator[None]:
    """Run a server in a process group of its own (MLflow starts workers), stopped as a group."""
    with open(log, "wb") as out:
        process = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **(env or {})}
        )
    try:
        _wait_http(health_url, process)
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@contextlib.contextmanager
def object_store(workdir: Path, bucket: str = "fraud-pipeline") -> Iterator[dict[str, str]]:
    """moto's standalone S3 server with `bucket` created; yields the object store's env."""
    import boto3

    port = free_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "fraud-test",
        "AWS_SECRET_ACCESS_KEY": "fraud-test-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    with _process(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], workdir / "moto.log", env["AWS_ENDPOINT_URL"]
    ):
        boto3.client(
            "s3",
            endpoint_url=env["AWS_ENDPOINT_URL"],
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            region_name=env["AWS_DEFAULT_REGION"],
        ).create_bucket(Bucket=bucket)
        yield env


@contextlib.contextmanager
def mlflow_server(workdir: Path) -> Iterator[str]:
    """`mlflow server` on loopback (SQLite backend, artifacts proxied by the server); yields its URL."""
    port = free_port()
    store = workdir / "mlflow-server"
    store.mkdir(parents=True, exist_ok=True)
    url = f"http://127.0.0.1:{port}"
    args = [
        str(BIN / "mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{store / 'mlflow.db'}",
        "--artifacts-destination",
        str(store / "artifacts"),
    ]
    # no background job runner (MLflow 3 starts one by default): the tests need only tracking
    with _process(
        args, workdir / "mlflow-server.log", f"{url}/health", env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    ):
        yield url


@contextlib.contextmanager
def postgres_database(prefix: str) -> Iterator[str]:
    """A new PostgreSQL database; yields its SQLAlchemy URL; dropped at the end."""
    import sqlalchemy

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = sqlalchemy.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    try:
        yield f"postgresql+psycopg2://postgres@127.0.0.1:5432/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(
                sqlalchemy.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = :d AND pid <> pg_backend_pid()"
                ),
                {"d": name},
            )
            conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


@dataclass(frozen=True)
class PipelineServices:
    env: dict[str, str]
    bucket: str
    mlflow_url: str
    feast_project: str

    def s3(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"


@contextlib.contextmanager
def running_services(workdir: Path) -> Iterator[PipelineServices]:
    """All four services; yields them with the environment a task gets."""
    project = f"fraud_it_{uuid.uuid4().hex[:8]}"
    bucket = "fraud-pipeline"
    with (
        object_store(workdir, bucket) as s3_env,
        mlflow_server(workdir) as mlflow_url,
        postgres_database("feast_registry_it") as registry_url,
    ):
        env = {
            **s3_env,
            "MLFLOW_TRACKING_URI": mlflow_url,
            "FRAUD_FEAST_ONLINE": "redis",
            "FRAUD_FEAST_REGISTRY": "sql",
            "FRAUD_FEAST_REGISTRY_URL": registry_url,
            "FRAUD_FEAST_PROJECT": project,
            "FRAUD_REDIS_URL": REDIS_URL,
        }
        try:
            yield PipelineServices(env=env, bucket=bucket, mlflow_url=mlflow_url, feast_project=project)
        finally:
            _drop_redis_project(project)


def _drop_redis_project(project: str) -> None:
    """Delete the Redis keys of the Feast project (Feast's keys end with the project name)."""
    import redis

    client = redis.Redis(host="127.0.0.1", port=6379)
    batch = []
    for key in client.scan_iter(match=f"*{project}*", count=1000):
        batch.append(key)
        if len(batch) >= 500:
            client.delete(*batch)
            batch.clear()
    if batch:
        client.delete(*batch)
    client.close()
