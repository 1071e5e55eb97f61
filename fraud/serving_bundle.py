"""Which bundle `fraud serve` serves: a local bundle directory, validated, or the model registry's
champion, downloaded below the data directory."""

from __future__ import annotations

from pathlib import Path

from fraud import registry
from fraud.bundle import BundleError, validate_bundle
from fraud.config import MODEL_NAME, DataLayout
from fraud.errors import UserError

CHAMPION_URI = f"models:/{MODEL_NAME}@champion"


def resolve_bundle(bundle: Path | None, download_dir: Path | None = None) -> Path:
    """A local, validated bundle: `bundle` itself, or the registry's champion downloaded."""
    if bundle is not None:
        try:
            validate_bundle(bundle)
        except BundleError as exc:
            raise UserError(f"--bundle {bundle}: {exc}") from None
        return Path(bundle).resolve()
    try:
        version = registry.get_version_by_alias("champion")
    except Exception as exc:  # noqa: BLE001 - any failure to read the registry (DB, file store, network) is reported
        raise UserError(
            f"cannot read the model registry at {registry.tracking_uri()}: {type(exc).__name__}: {exc}; "
            "pass --bundle PATH to serve a local bundle"
        ) from None
    if version is None:
        raise UserError(
            f"no model is registered as {MODEL_NAME}@champion in the registry at {registry.tracking_uri()}: "
            "run the training pipeline (it promotes a champion) or pass --bundle PATH"
        )
    target = (download_dir or DataLayout.current().bundles / "serving") / f"champion-v{version}"
    return registry.download_bundle(CHAMPION_URI, target).resolve()
