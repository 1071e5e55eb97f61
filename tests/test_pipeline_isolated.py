"""The pipeline as a cluster runs it: each task in its own empty working directory, HOME, TMPDIR
and data directory, sharing nothing but KFP artifacts and the services (moto's S3 server for the
raw data and the offline feature tables, PostgreSQL for the Feast registry, Redis for the online
store, an MLflow tracking server), all on loopback."""

from datetime import date
from pathlib import Path

import fsspec
import pytest
from kfp import dsl, local

from fraud.training.steps import feature_table_names
from pipelines.local_run import TASKS, Isolation, isolated_tasks, run_local
from tests.support.pipeline_services import running_services

TRAIN_START = "2018-04-22"
#: the simulated data runs 2018-04-01 .. 2018-05-20; the training run sees it up to this instant
LAST_DAY = "2018-05-19T23:59:59"


def _s3(env: dict[str, str]) -> fsspec.AbstractFileSystem:
    return fsspec.filesystem(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        key=env["AWS_ACCESS_KEY_ID"],
        secret=env["AWS_SECRET_ACCESS_KEY"],
        client_kwargs={"region_name": env["AWS_DEFAULT_REGION"]},
    )


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def write_note(text: str) -> str:
    """Writes into its data directory and returns the file's path."""
    from fraud.config import DataLayout

    layout = DataLayout.current()
    layout.root.mkdir(parents=True, exist_ok=True)
    path = layout.root / "note.txt"
    path.write_text(text)
    return str(path)


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def read_note(path: str) -> str:
    """Reads a file another task wrote to its own disk: neither an artifact nor a service."""
    from pathlib import Path

    return Path(path).read_text()


@dsl.pipeline(name="shared-disk")
def shared_disk_pipeline(text: str):
    written = write_note(text=text)
    read_note(path=written.output)


def test_a_task_reading_another_tasks_disk_fails_only_when_isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("FRAUD_DATA_DIR", str(tmp_path / "shared-data"))
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))
    # embedded: both tasks share this process's data directory, so the read works
    shared_disk_pipeline(text="hello")
    assert (tmp_path / "shared-data" / "note.txt").read_text() == "hello"

    sandboxes = tmp_path / "sandboxes"
    with isolated_tasks(Isolation(sandbox_root=sandboxes)), pytest.raises(RuntimeError, match="read-note"):
        shared_disk_pipeline(text="isolated")
    assert list(sandboxes.iterdir()) == []  # every task's sandbox is gone when it ends
    assert (tmp_path / "shared-data" / "note.txt").read_text() == "hello"  # nor did it write here


def test_isolated_task_sees_only_declared_services(tmp_path, monkeypatch):
    monkeypatch.setenv("FRAUD_SECRET_OF_THE_HOST", "leaked")

    @dsl.component(base_image="python:3.11", install_kfp_package=False)
    def environment_probe() -> str:
        import json
        import os
        from pathlib import Path

        return json.dumps(
            {"env": sorted(os.environ), "cwd": str(Path.cwd()), "listing": sorted(os.listdir(Path.cwd()))}
        )

    import json

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))
    sandboxes = tmp_path / "sandboxes"
    with isolated_tasks(Isolation(sandbox_root=sandboxes, service_env={"MLFLOW_TRACKING_URI": "http://mlflow"})):
        task = environment_probe()
    seen = json.loads(task.output)
    assert "FRAUD_SECRET_OF_THE_HOST" not in seen["env"]
    assert {"MLFLOW_TRACKING_URI", "HOME", "TMPDIR", "FRAUD_DATA_DIR"} <= set(seen["env"])
    assert seen["cwd"].startswith(str(sandboxes)) and seen["listing"] == []


@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.postgres
def test_whole_pipeline_passes_isolated_on_loopback_services(tmp_path, monkeypatch):
    from fraud.simulator import SimulationConfig, simulate, write_dataset

    raw = tmp_path / "raw"
    write_dataset(
        simulate(SimulationConfig(n_customers=100, n_terminals=200, n_days=50, start_date=date(2018, 4, 1), seed=3)),
        raw,
    )
    host_data = tmp_path / "host-data"
    monkeypatch.setenv("FRAUD_DATA_DIR", str(host_data))
    with running_services(tmp_path) as services:
        s3 = _s3(services.env)
        s3.put(str(raw / "transactions"), f"{services.bucket}/raw/", recursive=True)
        arguments = {
            "data_uri": services.s3("raw"),
            "feature_tables_uri": services.s3("features"),
            "train_start": TRAIN_START,
            "n_validation_folds": 2,
            "small_grid": True,
            "min_average_precision": 0.1,
            "deploy_target": "record",
            # the day after is left for the daily feature pipeline below
            "max_timestamp": LAST_DAY,
        }
        isolation = Isolation(sandbox_root=tmp_path / "sandboxes", service_env=services.env)
        result = run_local(arguments, tmp_path / "pipeline_root", isolation)

        assert result.tasks_run == list(TASKS)
        assert result.gate_verdict == "passed", result.gate_reason
        assert result.model_version
        assert list((tmp_path / "sandboxes").iterdir()) == []
        assert not host_data.exists()  # no task wrote to the host's data directory
        # the offline tables are in the object store
        stored = sorted(Path(p).name for p in s3.ls(f"{services.bucket}/features"))
        assert stored == sorted(feature_table_names())  # snapshots, velocity table, window-state sources

        # the registry on the tracking server has the version, alias challenger
        from fraud import registry

        assert registry.get_version_by_alias("challenger", uri=services.mlflow_url) == result.model_version
        assert registry.get_decisions(result.model_version, uri=services.mlflow_url)["gate"].startswith("passed")

        # the Feast registry is in PostgreSQL; the online store in Redis serves the latest snapshots
        # of the offline tables in the object store
        import pandas as pd

        from fraud import feature_store
        from fraud.features.definitions import CUSTOMER_SPENDING_FEATURES, SNAPSHOT_TIMESTAMP
        from fraud.schema import CUSTOMER_ID

        with s3.open(f"{services.bucket}/features/customer_spending_features.parquet", "rb") as handle:
            customers = pd.read_parquet(handle)
        latest = customers[customers[SNAPSHOT_TIMESTAMP] == customers[SNAPSHOT_TIMESTAMP].max()].head(5)
        for name, value in services.env.items():
            if not name.startswith("AWS_"):
                monkeypatch.setenv(name, value)
        ids = latest[CUSTOMER_ID].astype(str).tolist()
        online = feature_store.online_batch_features(ids, ["0"] * len(ids))
        expected = latest[list(CUSTOMER_SPENDING_FEATURES)].to_numpy(dtype=float)
        assert online[list(CUSTOMER_SPENDING_FEATURES)].to_numpy(dtype=float) == pytest.approx(expected)

        # the daily feature pipeline, isolated too: it sees one more day of raw data, rebuilds the
        # offline tables and materialises incrementally, so the online store moves on by a day
        from pipelines.feature_pipeline import feature_pipeline

        before = customers[SNAPSHOT_TIMESTAMP].max()
        with isolated_tasks(isolation):
            feature_pipeline(data_uri=services.s3("raw"), feature_tables_uri=services.s3("features"))
        assert list((tmp_path / "sandboxes").iterdir()) == []
        s3.invalidate_cache()  # the file was replaced: s3fs would hold on to the old ETag
        with s3.open(f"{services.bucket}/features/customer_spending_features.parquet", "rb") as handle:
            customers = pd.read_parquet(handle)
        newest = customers[SNAPSHOT_TIMESTAMP].max()
        assert newest == before + pd.Timedelta(days=1)
        latest = customers[customers[SNAPSHOT_TIMESTAMP] == newest].head(5)
        ids = latest[CUSTOMER_ID].astype(str).tolist()
        feature_store._CLIENTS.clear()  # a new process would read the registry afresh
        online = feature_store.online_batch_features(ids, ["0"] * len(ids))
        naive = newest.tz_convert(None) if newest.tzinfo is not None else newest
        assert (online[feature_store.CUSTOMER_SNAPSHOT_COLUMN] == naive).all(), online
        expected = latest[list(CUSTOMER_SPENDING_FEATURES)].to_numpy(dtype=float)
        assert online[list(CUSTOMER_SPENDING_FEATURES)].to_numpy(dtype=float) == pytest.approx(expected)


def test_object_store_helpers_copy_folders_and_name_what_is_missing(tmp_path):
    from fraud import storage
    from fraud.errors import UserError

    source = tmp_path / "tables"
    source.mkdir()
    (source / "a.parquet").write_bytes(b"a")
    (source / "b.parquet").write_bytes(b"b")
    assert storage.put_folder(source, f"file://{tmp_path / 'store'}") == ["a.parquet", "b.parquet"]
    fetched = storage.get_folder(str(tmp_path / "store"), tmp_path / "task", ["a.parquet", "b.parquet"])
    assert (fetched / "b.parquet").read_bytes() == b"b"
    with pytest.raises(UserError, match=r"c.parquet does not exist"):
        storage.get_folder(str(tmp_path / "store"), tmp_path / "task2", ["c.parquet"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no files"):
        storage.put_folder(tmp_path / "empty", str(tmp_path / "store"))
    assert storage.is_remote("s3://b/x") and not storage.is_remote("file:///x") and not storage.is_remote("/x")
