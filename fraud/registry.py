"""The MLflow model registry as the project uses it.

One registered model, `fraud.config.MODEL_NAME`. Each version is a real MLflow model logged from
the training run (xgboost flavour, signature over the model features, input example, so
`mlflow.pyfunc.load_model("models:/fraud-detector@champion")` and `mlflow models serve` work) and
linked to that run and its logged model. The model's artifacts are also a complete serving bundle
(see `fraud.bundle`: the flavour's `model.ubj` is the bundle's model file, next to `bundle.json`,
the reference sample and the model card), so `models:/fraud-detector@champion` downloads a
directory that `fraud.bundle.validate_bundle` accepts and KServe's storage initializer can lay
out as is.

Aliases carry the lifecycle: `challenger` (registered, passed the gate), `champion` (serving).
Deployment decisions are tags on the model version (`record_decision`).

Tracking store: env `MLFLOW_TRACKING_URI`, else a local SQLite database below
`DataLayout.mlflow` with artifacts under `DataLayout.mlflow/artifacts`. Any SQLAlchemy URI that
MLflow accepts works too (PostgreSQL is tested).
"""

from __future__ import annotations

import contextlib
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from fraud.bundle import MANIFEST_FILE, MODEL_FILE, REFERENCE_FILE, BundleError, validate_bundle
from fraud.config import MODEL_NAME
from fraud.errors import UserError
from fraud.settings import Settings, current

if TYPE_CHECKING:  # pragma: no cover
    from mlflow import MlflowClient

CHALLENGER_ALIAS = "challenger"
CHAMPION_ALIAS = "champion"
#: Name of the logged model (in the training run) of a registered version.
BUNDLE_ARTIFACT_PATH = "bundle"
#: Output column of the model signature: the fraud probability.
PROBABILITY_OUTPUT = "fraud_probability"
#: Rows of the reference sample used as the model's input example.
INPUT_EXAMPLE_ROWS = 5
#: Experiment the training pipeline logs to.
EXPERIMENT_NAME = "fraud-detection"
#: Prefix of the model-version tags written by `record_decision`.
DECISION_TAG_PREFIX = "decision."

_ALIAS_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,62}$")


#: Where experiments created by this project keep their artifacts (see default_artifact_location).
ARTIFACT_ROOT_ENV = "FRAUD_MLFLOW_ARTIFACT_ROOT"


def tracking_uri(settings: Settings | None = None) -> str:
    """The tracking (and registry) URI: the setting `mlflow_tracking_uri` (MLFLOW_TRACKING_URI) or
    the local SQLite default below the data directory."""
    settings = settings or current()
    if settings.mlflow_tracking_uri:
        return settings.mlflow_tracking_uri
    folder = settings.layout.mlflow
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


def default_artifact_location(uri: str | None = None, settings: Settings | None = None) -> str | None:
    """Artifact root for new experiments of a tracking store without a server.

    MLflow's own default for a database-backed store is `./mlruns` of whatever the current working
    directory is, which scatters model artifacts. So: `FRAUD_MLFLOW_ARTIFACT_ROOT` if set; for a
    SQLite store the `artifacts` folder next to the database file; for another database (PostgreSQL)
    `DataLayout.mlflow/artifacts`; for a tracking server (http/https/databricks) None: the server decides.
    """
    settings = settings or current()
    resolved = uri or tracking_uri(settings)
    if resolved.startswith(("http://", "https://", "databricks")):
        return None
    if settings.mlflow_artifact_root:
        return settings.mlflow_artifact_root
    if resolved.startswith("sqlite:///"):
        folder = Path(resolved[len("sqlite:///") :]).parent / "artifacts"
    else:
        folder = settings.layout.mlflow / "artifacts"
    folder.mkdir(parents=True, exist_ok=True)
    # a plain path: MLflow 3 ignores a file:// URI here and falls back to ./mlruns
    return str(folder)


def database_uri(uri: str) -> str:
    """`uri` with a PostgreSQL driver SQLAlchemy can load: SQLAlchemy 2.1 maps a bare
    `postgresql://` to psycopg 3, while the project ships psycopg2; other URIs are returned as is."""
    if uri.startswith(("postgresql://", "postgres://")):
        import importlib.util

        if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None:
            return "postgresql+psycopg2://" + uri.split("://", 1)[1]
    return uri


def configure(uri: str | None = None) -> str:
    """Point the mlflow module (tracking and registry) at `uri` or `tracking_uri()`; return the URI."""
    import mlflow

    resolved = database_uri(uri or tracking_uri())
    # MLflow itself exports the URI as MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI for its
    # subprocesses; the settings of this process were read before, at its entry point.
    mlflow.set_tracking_uri(resolved)
    mlflow.set_registry_uri(resolved)
    return resolved


def client(uri: str | None = None) -> MlflowClient:
    from mlflow import MlflowClient

    resolved = configure(uri)
    return MlflowClient(tracking_uri=resolved, registry_uri=resolved)


def ensure_experiment(name: str = EXPERIMENT_NAME, uri: str | None = None) -> str:
    """Create the experiment if needed (artifacts in the local default location) and return its id."""
    mlflow_client = client(uri)
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = default_artifact_location(uri)
    try:
        return mlflow_client.create_experiment(name, artifact_location=location)
    except Exception:  # created concurrently by another process
        experiment = mlflow_client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def _ensure_registered_model(mlflow_client: MlflowClient, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        mlflow_client.get_registered_model(name)
    except MlflowException:
        try:
            mlflow_client.create_registered_model(
                name, description="Card-fraud scoring model; each version's artifacts are a serving bundle."
            )
        except MlflowException:
            mlflow_client.get_registered_model(name)  # created concurrently


def model_signature(feature_names: list[str]):
    """The MLflow signature of a bundle's model: one double column per feature -> the probability."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("double", name) for name in feature_names]),
        outputs=Schema([ColSpec("double", PROBABILITY_OUTPUT)]),
    )


def _input_example(bundle_dir: Path, feature_names: list[str]):
    import numpy as np
    import pandas as pd

    reference = np.load(Path(bundle_dir) / REFERENCE_FILE)
    return pd.DataFrame(reference[:INPUT_EXAMPLE_ROWS], columns=list(feature_names))


def _pip_requirements() -> list[str]:
    """Pinned from this environment (MLflow would otherwise infer them by loading the model)."""
    from importlib.metadata import version

    return [f"{package}=={version(package)}" for package in ("mlflow", "xgboost-cpu", "numpy", "pandas")]


def register_bundle(
    bundle_dir: Path,
    run_id: str,
    *,
    alias: str = CHALLENGER_ALIAS,
    tags: dict[str, str] | None = None,
    description: str = "",
    name: str = MODEL_NAME,
    uri: str | None = None,
) -> str:
    """Log the bundle as an MLflow model of run `run_id`, register it as a new version of `name`
    carrying `alias`; return the version (a string).

    The model is logged first (xgboost flavour from the bundle's booster, signature, input
    example), then the version is created (source: the logged model, linked to run and model),
    then the bundle files are added to the model's artifacts with the manifest's `model_version`
    set to the new version number, and only then does `alias` move to it — so an alias never
    points at a version whose files are incomplete.
    """
    import dataclasses

    import mlflow
    import mlflow.xgboost
    import xgboost as xgb

    try:
        manifest = validate_bundle(Path(bundle_dir))
    except BundleError as exc:
        raise UserError(f"cannot register {bundle_dir}: {exc}") from None
    mlflow_client = client(uri)
    booster = xgb.Booster(model_file=str(Path(bundle_dir) / MODEL_FILE))
    booster.feature_names = list(manifest.feature_names)
    _ensure_registered_model(mlflow_client, name)
    active = mlflow.active_run()
    resumed = (
        contextlib.nullcontext()
        if active is not None and active.info.run_id == run_id
        else mlflow.start_run(run_id=run_id, nested=active is not None)
    )
    with resumed:
        info = mlflow.xgboost.log_model(
            booster,
            name=BUNDLE_ARTIFACT_PATH,
            signature=model_signature(list(manifest.feature_names)),
            input_example=_input_example(Path(bundle_dir), list(manifest.feature_names)),
            pip_requirements=_pip_requirements(),
            model_format=MODEL_FILE.rsplit(".", 1)[1],
        )
    version_tags = {"feature_service": manifest.feature_service, "bundle_format": str(manifest.format_version)}
    version_tags.update(tags or {})
    # register_model links the version to the logged model (its `mlflow.modelVersions` tag) and run
    version = str(mlflow.register_model(info.model_uri, name, tags=version_tags).version)
    if description:
        mlflow_client.update_model_version(name, version, description=description)
    with tempfile.TemporaryDirectory(prefix="bundle-upload-") as tmp:
        staged = Path(tmp) / "bundle"
        # the flavour's model file (same booster, feature names set) is the bundle's model file
        shutil.copytree(bundle_dir, staged, ignore=shutil.ignore_patterns(MODEL_FILE))
        stamped = dataclasses.replace(manifest, model_name=name, model_version=version, mlflow_run_id=run_id)
        (staged / MANIFEST_FILE).write_text(stamped.to_json())
        mlflow_client.log_model_artifacts(info.model_id, str(staged))
    mlflow_client.set_registered_model_alias(name, alias, version)
    return version


def register_bundle_dir(
    bundle_dir: Path, *, description: str = "", name: str = MODEL_NAME, uri: str | None = None
) -> str:
    """Register a bundle made outside the pipeline (a hot-fix, an incident reproduction) under a
    run of its own; alias `challenger`, tag `registered_by=cli`. Returns the version."""
    mlflow_client = client(uri)
    run = mlflow_client.create_run(
        ensure_experiment(uri=uri), run_name=f"register {Path(bundle_dir).name}", tags={"registered_by": "cli"}
    )
    mlflow_client.log_param(run.info.run_id, "bundle_dir", str(Path(bundle_dir).resolve()))
    try:
        version = register_bundle(
            Path(bundle_dir),
            run.info.run_id,
            tags={"registered_by": "cli"},
            description=description,
            name=name,
            uri=uri,
        )
    except BaseException:
        mlflow_client.set_terminated(run.info.run_id, status="FAILED")
        raise
    mlflow_client.set_terminated(run.info.run_id)
    return version


def set_alias(alias: str, version: str, *, name: str = MODEL_NAME, uri: str | None = None) -> None:
    """Point `alias` (e.g. `champion`) at `version` of the registered model."""
    if not _ALIAS_PATTERN.match(alias):
        raise UserError(f"alias {alias!r} is not a valid name (letters, digits, '_' or '-')")
    from mlflow.exceptions import MlflowException

    try:
        client(uri).set_registered_model_alias(name, alias, str(version))
    except MlflowException as exc:
        raise UserError(f"cannot set alias {alias!r} on {name} version {version}: {exc.message}") from None


def delete_alias(alias: str, *, name: str = MODEL_NAME, uri: str | None = None) -> None:
    """Remove `alias` from the registered model (no error if it is not set)."""
    from mlflow.exceptions import MlflowException

    try:
        client(uri).delete_registered_model_alias(name, alias)
    except MlflowException:
        return


def get_version_by_alias(alias: str, *, name: str = MODEL_NAME, uri: str | None = None) -> str | None:
    """The version `alias` points at, or None when the alias (or the model) does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client(uri).get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def record_decision(version: str, key: str, value: str, *, name: str = MODEL_NAME, uri: str | None = None) -> None:
    """Write a decision (gate outcome, canary verdict, promotion ...) as tag `decision.<key>` on the version."""
    if not key or not re.match(r"^[A-Za-z0-9_.\-/]+$", key):
        raise UserError(f"decision key {key!r} must be non-empty and use letters, digits, '_', '-', '.', '/'")
    client(uri).set_model_version_tag(name, str(version), f"{DECISION_TAG_PREFIX}{key}", str(value))


def get_decisions(version: str, *, name: str = MODEL_NAME, uri: str | None = None) -> dict[str, str]:
    """The decisions recorded on a version, keyed without the `decision.` prefix."""
    tags = client(uri).get_model_version(name, str(version)).tags
    return {k[len(DECISION_TAG_PREFIX) :]: v for k, v in tags.items() if k.startswith(DECISION_TAG_PREFIX)}


def model_version_source(version: str, *, name: str = MODEL_NAME, uri: str | None = None) -> str:
    """The artifact URI holding the version's bundle (what a KServe storageUri points at)."""
    mlflow_client = client(uri)
    return mlflow_client.get_model_version_download_uri(name, str(version))


_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[A-Za-z][A-Za-z0-9_-]*))$")


def download_bundle(model_uri: str, dst: Path, *, uri: str | None = None) -> Path:
    """Fetch a bundle to `dst` and validate it. `model_uri` is `models:/<name>@<alias>`,
    `models:/<name>/<version>` or a local bundle directory. `dst` is replaced atomically."""
    from mlflow.exceptions import MlflowException

    dst = Path(dst)
    local = (
        Path(model_uri.removeprefix("file://")) if "://" not in model_uri or model_uri.startswith("file://") else None
    )
    if local is not None and not model_uri.startswith("models:/"):
        if not local.is_dir():
            raise UserError(f"model {model_uri!r} is neither a models:/ URI nor an existing bundle directory")
        source_dir = local
        cleanup = None
    else:
        match = _MODELS_URI.match(model_uri)
        if not match:
            raise UserError(
                f"model URI {model_uri!r} must look like models:/<name>@<alias> or models:/<name>/<version>"
            )
        mlflow_client = client(uri)
        try:
            if match["alias"]:
                version = str(mlflow_client.get_model_version_by_alias(match["name"], match["alias"]).version)
            else:
                version = match["version"]
            source = mlflow_client.get_model_version_download_uri(match["name"], version)
        except MlflowException as exc:
            raise UserError(f"cannot resolve {model_uri}: {exc.message}") from None
        import mlflow.artifacts

        dst.parent.mkdir(parents=True, exist_ok=True)
        cleanup = Path(tempfile.mkdtemp(prefix=f".{dst.name}-dl-", dir=dst.parent))
        try:
            source_dir = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(cleanup)))
        except MlflowException as exc:
            shutil.rmtree(cleanup, ignore_errors=True)
            raise UserError(f"cannot download {model_uri} from {source}: {exc.message}") from None
    try:
        try:
            validate_bundle(source_dir)
        except BundleError as exc:
            raise UserError(f"{model_uri} is not a valid bundle: {exc}") from None
        if dst.resolve() == source_dir.resolve():
            return dst
        dst.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{dst.name}-", dir=dst.parent))
        staged = staging / "bundle"
        shutil.copytree(source_dir, staged)
        from fraud.bundle import write_bundle_atomically

        write_bundle_atomically(staged, dst)
        shutil.rmtree(staging, ignore_errors=True)
        return dst
    finally:
        if cleanup is not None:
            shutil.rmtree(cleanup, ignore_errors=True)
