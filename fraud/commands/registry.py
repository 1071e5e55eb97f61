"""`fraud registry register --bundle DIR`: register a serving bundle made outside the pipeline
(a hot-fix, an incident reproduction) so `fraud deploy` can roll it out.

The bundle gets the pipeline's validation (`fraud.bundle.validate_bundle`: manifest, model,
drift reference, model card) plus a load check: the XGBoost model loads, takes the manifest's
features and returns one probability per row for the bundle's own reference rows. A bundle that
fails is not registered; the message names the file and the problem.

    fraud registry register --bundle ./hotfix-bundle --description "threshold hot-fix"
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from fraud.bundle import MODEL_FILE, REFERENCE_FILE, BundleError, validate_bundle
from fraud.config import MODEL_NAME
from fraud.errors import UserError

registry_app = typer.Typer(help="The model registry: register serving bundles.", no_args_is_help=True)


def check_bundle(bundle_dir: Path) -> str:
    """The pipeline's bundle validation plus a load-and-score check; returns a one-line summary."""
    import xgboost as xgb

    try:
        manifest = validate_bundle(bundle_dir)
    except BundleError as exc:
        raise UserError(f"{bundle_dir} is not a valid bundle: {exc}") from None
    try:
        booster = xgb.Booster(model_file=str(bundle_dir / MODEL_FILE))
    except xgb.core.XGBoostError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{bundle_dir / MODEL_FILE} does not load as an XGBoost model: {first}") from None
    try:
        reference = np.load(bundle_dir / REFERENCE_FILE, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise UserError(f"{bundle_dir / REFERENCE_FILE} is not a numpy array file: {exc}") from None
    features = list(manifest.feature_names)
    if reference.ndim != 2 or reference.shape[1] != len(features):
        raise UserError(
            f"{bundle_dir / REFERENCE_FILE} has shape {reference.shape}, expected (rows, {len(features)}) "
            "for the manifest's feature_names"
        )
    if booster.num_features() != len(features):
        raise UserError(f"the model takes {booster.num_features()} features, the manifest lists {len(features)}")
    rows = reference[: min(len(reference), 64)].astype(np.float32)
    scores = np.asarray(booster.inplace_predict(rows))
    if scores.shape != (len(rows),):
        raise UserError(
            f"the model returns shape {scores.shape} for {len(rows)} rows: the predictor needs one "
            "fraud probability per row (a binary:logistic model)"
        )
    if not np.all((scores >= 0) & (scores <= 1)):
        raise UserError("the model returns scores outside [0, 1]: the predictor needs probabilities")
    t = manifest.thresholds
    return f"{len(features)} features, thresholds review {t.review} / decline {t.decline}"


@registry_app.command("register")
def register_bundle(
    bundle: Annotated[Path, typer.Option("--bundle", help="the bundle directory (bundle.json, model.ubj, ...)")],
    description: Annotated[str, typer.Option("--description", help="shown on the MLflow version")] = "",
    model_name: Annotated[str, typer.Option("--model-name", help="registered model name")] = MODEL_NAME,
    mlflow_tracking_uri: Annotated[
        str, typer.Option("--mlflow-tracking-uri", help="default: MLFLOW_TRACKING_URI or the local store")
    ] = "",
) -> None:
    """Validate BUNDLE as the pipeline does and register it as a new version (alias challenger)."""
    from fraud import registry

    summary = check_bundle(bundle)
    version = registry.register_bundle_dir(
        bundle, description=description, name=model_name, uri=mlflow_tracking_uri or None
    )
    typer.echo(f"registered {bundle} as {model_name} version {version} ({summary}); roll it out with:")
    typer.echo(f"  fraud deploy --version {version} --target local|kubernetes ...")


def register(app: typer.Typer) -> None:
    """Add `fraud registry` to the top-level app."""
    app.add_typer(registry_app, name="registry")
