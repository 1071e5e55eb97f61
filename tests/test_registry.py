"""The MLflow registry round trip on the default local SQLite store and on PostgreSQL."""

from __future__ import annotations

import uuid

import pytest

from fraud import registry
from fraud.bundle import read_manifest, validate_bundle
from fraud.config import MODEL_NAME
from fraud.errors import UserError
from tests.factories import make_synthetic_bundle


def _new_run(uri: str | None = None) -> str:
    import mlflow

    registry.configure(uri)
    experiment_id = registry.ensure_experiment(uri=uri)
    with mlflow.start_run(experiment_id=experiment_id) as run:
        mlflow.log_param("purpose", "registry-test")
    return run.info.run_id


def _round_trip(tmp_path, uri: str | None) -> None:
    bundle = make_synthetic_bundle(tmp_path / "bundle-src", version="0")
    first = registry.register_bundle(bundle, _new_run(uri), uri=uri)
    second = registry.register_bundle(bundle, _new_run(uri), uri=uri, tags={"origin": "test"})
    assert int(second) == int(first) + 1
    assert registry.get_version_by_alias("challenger", uri=uri) == second
    assert registry.get_version_by_alias("champion", uri=uri) is None

    registry.set_alias("champion", first, uri=uri)
    assert registry.get_version_by_alias("champion", uri=uri) == first

    by_alias = registry.download_bundle(f"models:/{MODEL_NAME}@champion", tmp_path / "dl-alias", uri=uri)
    assert validate_bundle(by_alias).feature_names == read_manifest(bundle).feature_names
    # the stored manifest carries the registry version and run, whatever the local bundle said
    assert read_manifest(by_alias).model_version == first
    assert read_manifest(by_alias).mlflow_run_id
    by_version = registry.download_bundle(f"models:/{MODEL_NAME}/{second}", tmp_path / "dl-version", uri=uri)
    assert (by_version / "model.ubj").read_bytes() == (bundle / "model.ubj").read_bytes()
    # downloading again replaces the directory atomically
    registry.download_bundle(f"models:/{MODEL_NAME}/{first}", tmp_path / "dl-version", uri=uri)
    validate_bundle(tmp_path / "dl-version")

    registry.record_decision(second, "gate", "passed", uri=uri)
    registry.record_decision(second, "canary", "rolled_back: p99 latency", uri=uri)
    assert registry.get_decisions(second, uri=uri) == {"gate": "passed", "canary": "rolled_back: p99 latency"}

    with pytest.raises(UserError, match="cannot resolve"):
        registry.download_bundle(f"models:/{MODEL_NAME}@nosuchalias", tmp_path / "x", uri=uri)
    with pytest.raises(UserError, match="must look like"):
        registry.download_bundle("models:/", tmp_path / "x", uri=uri)
    with pytest.raises(UserError, match=r"not a valid alias|valid name"):
        registry.set_alias("bad alias!", first, uri=uri)


def test_sqlite_round_trip(data_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert registry.tracking_uri() == f"sqlite:///{data_dir / 'mlflow' / 'mlflow.db'}"
    _round_trip(tmp_path, None)
    # artifacts land below the data dir, not in the working directory
    assert list((data_dir / "mlflow" / "artifacts").rglob("bundle.json"))


def test_download_local_directory_and_rejects_non_bundle(data_dir, tmp_path):
    bundle = make_synthetic_bundle(tmp_path / "b", version="7")
    out = registry.download_bundle(str(bundle), tmp_path / "copy")
    assert read_manifest(out).model_version == "7"
    assert registry.download_bundle(str(bundle), bundle) == bundle
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a valid bundle"):
        registry.download_bundle(str(tmp_path / "empty"), tmp_path / "copy2")
    with pytest.raises(UserError, match="neither"):
        registry.download_bundle(str(tmp_path / "missing"), tmp_path / "copy3")


def test_register_rejects_incomplete_bundle(data_dir, tmp_path):
    (tmp_path / "half").mkdir()
    with pytest.raises(UserError, match="cannot register"):
        registry.register_bundle(tmp_path / "half", "run-id-that-is-never-used")


@pytest.mark.postgres
def test_postgres_round_trip(data_dir, tmp_path, monkeypatch):
    sqlalchemy = pytest.importorskip("sqlalchemy")
    admin_url = registry.database_uri("postgresql://postgres@127.0.0.1:5432/postgres")
    database = f"mlflow_test_{uuid.uuid4().hex[:10]}"
    try:
        admin = sqlalchemy.create_engine(admin_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f'CREATE DATABASE "{database}"'))
    except sqlalchemy.exc.OperationalError as exc:
        pytest.skip(f"PostgreSQL not reachable on 127.0.0.1:5432: {exc}")
    uri = f"postgresql://postgres@127.0.0.1:5432/{database}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # a remote tracking store needs an explicit artifact root for new experiments

    try:
        experiment_id = registry.client(uri).create_experiment(
            registry.EXPERIMENT_NAME, artifact_location=(tmp_path / "pg-artifacts").as_uri()
        )
        assert experiment_id
        _round_trip(tmp_path, uri)
        pg = sqlalchemy.create_engine(registry.database_uri(uri))
        with pg.connect() as conn:
            versions = conn.execute(
                sqlalchemy.text("SELECT count(*) FROM model_versions WHERE name = :n"), {"n": MODEL_NAME}
            ).scalar()
            aliases = conn.execute(sqlalchemy.text("SELECT alias FROM registered_model_aliases")).scalars().all()
        pg.dispose()
        assert versions == 2
        assert set(aliases) == {"challenger", "champion"}
    finally:
        with admin.connect() as conn:
            conn.execute(
                sqlalchemy.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = :d AND pid <> pg_backend_pid()"
                ),
                {"d": database},
            )
            conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{database}"'))
        admin.dispose()


def test_experiment_artifacts_stay_next_to_an_explicit_sqlite_store(tmp_path, monkeypatch):
    """MLflow would default a database store's artifacts to ./mlruns of the working directory."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(registry.ARTIFACT_ROOT_ENV, raising=False)
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    run_id = _new_run(uri)
    artifact_uri = registry.client(uri).get_run(run_id).info.artifact_uri
    assert artifact_uri.replace("file://", "").startswith(str(tmp_path / "store" / "artifacts"))
    assert not (workdir / "mlruns").exists()
    assert registry.default_artifact_location("http://mlflow:5000") is None
    monkeypatch.setenv(registry.ARTIFACT_ROOT_ENV, "s3://bucket/mlflow")
    assert registry.default_artifact_location(uri) == "s3://bucket/mlflow"


def test_a_registered_version_is_an_mlflow_model_scoring_like_the_predictor(data_dir, tmp_path, monkeypatch):
    """pyfunc loads the champion and gives the predictor's probabilities on the same feature rows."""
    import mlflow
    import numpy as np
    import pandas as pd
    import yaml

    from fraud.features.definitions import MODEL_FEATURES
    from predictor.scoring import BundleScorer
    from tests.factories import synthetic_feature_matrix

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    bundle = make_synthetic_bundle(tmp_path / "bundle-src", version="0")
    run_id = _new_run()
    version = registry.register_bundle(bundle, run_id)
    registry.set_alias("champion", version)

    mlflow_client = registry.client()
    model_version = mlflow_client.get_model_version(MODEL_NAME, version)
    assert model_version.run_id == run_id and model_version.source.startswith("models:/m-")
    logged = mlflow_client.get_logged_model(model_version.source.removeprefix("models:/"))
    assert logged.source_run_id == run_id
    linked = __import__("json").loads(logged.tags["mlflow.modelVersions"])
    assert {"name": MODEL_NAME, "version": version} in [{k: str(v) for k, v in e.items()} for e in linked]

    downloaded = registry.download_bundle(f"models:/{MODEL_NAME}@champion", tmp_path / "champion")
    mlmodel = yaml.safe_load((downloaded / "MLmodel").read_text())
    assert "xgboost" in mlmodel["flavors"] and "python_function" in mlmodel["flavors"]
    inputs = [column["name"] for column in __import__("json").loads(mlmodel["signature"]["inputs"])]
    assert inputs == list(MODEL_FEATURES)
    assert (downloaded / "input_example.json").is_file() or (downloaded / "serving_input_example.json").is_file()
    assert read_manifest(downloaded).model_version == version

    features, _ = synthetic_feature_matrix(300, seed=11)
    rows = pd.DataFrame(features.to_numpy(dtype=np.float64), columns=list(MODEL_FEATURES))
    registry.configure()
    pyfunc = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@champion")
    from_mlflow = np.asarray(pyfunc.predict(rows), dtype=np.float64).ravel()
    from_predictor = BundleScorer(downloaded).score(rows).probabilities
    assert from_mlflow.shape == (300,)
    np.testing.assert_allclose(from_mlflow, from_predictor, rtol=1e-6, atol=1e-7)
    assert 0 < from_predictor.min() < from_predictor.max() < 1
