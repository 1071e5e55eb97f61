"""The serving bundle: what training hands to serving, as one directory.

Layout (also what KServe's storage initializer lays out under /mnt/models):

    bundle.json              BundleManifest (below), JSON
    model.ubj                XGBoost Booster in UBJSON
    reference_features.npy   float64 array [n, len(feature_names)]: reference sample for drift detection
    model_card.md            human-readable model card

The drift transformer runs in another Python environment and reads bundle.json and
reference_features.npy with the standard library and numpy only, so both stay plain formats.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MANIFEST_FILE = "bundle.json"
MODEL_FILE = "model.ubj"
REFERENCE_FILE = "reference_features.npy"
MODEL_CARD_FILE = "model_card.md"
BUNDLE_FORMAT_VERSION = 1

DECISIONS = ("approve", "review", "decline")


class BundleError(Exception):
    """A bundle directory is missing, incomplete or inconsistent."""


@dataclass(frozen=True)
class DecisionThresholds:
    """probability < review -> approve; review <= p < decline -> review; p >= decline -> decline."""

    review: float
    decline: float

    def __post_init__(self) -> None:
        if not (0.0 <= self.review <= self.decline <= 1.0):
            raise BundleError(f"thresholds must satisfy 0 <= review <= decline <= 1, got {self}")

    def decide(self, probability: float) -> str:
        if probability >= self.decline:
            return "decline"
        if probability >= self.review:
            return "review"
        return "approve"


@dataclass(frozen=True)
class BundleManifest:
    model_name: str
    model_version: str
    feature_names: list[str]
    thresholds: DecisionThresholds
    #: feature name -> reason text shown to analysts
    reason_codes: dict[str, str]
    #: how many reason codes a response carries
    max_reason_codes: int = 3
    feature_service: str = ""
    created_at: str = ""
    training_window: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    #: features treated as categorical by the drift detector (chi-squared), by name
    categorical_features: list[str] = field(default_factory=list)
    mlflow_run_id: str = ""
    format_version: int = BUNDLE_FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BundleManifest":
        try:
            data = dict(data)
            data["thresholds"] = DecisionThresholds(**data["thresholds"])
            manifest = cls(**data)
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"{MANIFEST_FILE} is invalid: {exc}") from None
        if manifest.format_version != BUNDLE_FORMAT_VERSION:
            raise BundleError(
                f"{MANIFEST_FILE} has format_version {manifest.format_version}, expected {BUNDLE_FORMAT_VERSION}"
            )
        if not manifest.feature_names:
            raise BundleError(f"{MANIFEST_FILE} lists no feature_names")
        return manifest


def read_manifest(bundle_dir: Path) -> BundleManifest:
    path = Path(bundle_dir) / MANIFEST_FILE
    if not path.is_file():
        raise BundleError(f"no {MANIFEST_FILE} in {bundle_dir}")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"cannot read {path}: {exc}") from None
    return BundleManifest.from_dict(data)


def validate_bundle(bundle_dir: Path) -> BundleManifest:
    """Check that every file of the bundle exists; return its manifest. Raises BundleError."""
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise BundleError(f"bundle directory {bundle_dir} does not exist")
    manifest = read_manifest(bundle_dir)
    for name in (MODEL_FILE, REFERENCE_FILE, MODEL_CARD_FILE):
        if not (bundle_dir / name).is_file():
            raise BundleError(f"bundle {bundle_dir} has no {name}")
    return manifest


def write_bundle_atomically(staging_dir: Path, final_dir: Path) -> Path:
    """Move a completely written staging directory into place; never leaves a half bundle at final_dir."""
    validate_bundle(staging_dir)
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    if final_dir.exists():
        trash = Path(tempfile.mkdtemp(prefix=".old-", dir=final_dir.parent))
        os.replace(final_dir, trash / final_dir.name)
        os.replace(staging_dir, final_dir)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staging_dir, final_dir)
    return final_dir


def write_bundle(
    bundle_dir: Path,
    booster: Any,
    manifest: BundleManifest,
    reference_features: Any,
    model_card: str,
) -> Path:
    """Write a complete bundle to `bundle_dir` atomically (staged next to it, then renamed).

    `booster` is an xgboost.Booster; `reference_features` a 2-D float array whose columns follow
    `manifest.feature_names`.
    """
    import numpy as np

    reference = np.asarray(reference_features, dtype="float64")
    if reference.ndim != 2 or reference.shape[1] != len(manifest.feature_names):
        raise BundleError(
            f"reference sample must have shape [n, {len(manifest.feature_names)}], got {list(reference.shape)}"
        )
    if list(booster.feature_names or []) not in ([], list(manifest.feature_names)):
        raise BundleError("booster feature names differ from the manifest's feature_names")
    bundle_dir = Path(bundle_dir)
    bundle_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{bundle_dir.name}-", dir=bundle_dir.parent))
    try:
        booster.save_model(str(staging / MODEL_FILE))
        np.save(staging / REFERENCE_FILE, reference, allow_pickle=False)
        (staging / MODEL_CARD_FILE).write_text(model_card)
        (staging / MANIFEST_FILE).write_text(manifest.to_json())
        return write_bundle_atomically(staging, bundle_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


#: Files of a thresholds folder (the keys of the `fraud-decision-thresholds` ConfigMap).
THRESHOLD_FILES = ("review", "decline")


def read_threshold_overrides(folder: Path) -> DecisionThresholds | None:
    """Decision thresholds an operator set without retraining: a folder holding the files `review`
    and `decline`, each one probability (a mounted ConfigMap). None when the folder does not exist;
    BundleError when it is incomplete or invalid, so a typo never silently keeps the old cut-offs."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    values: dict[str, float] = {}
    for name in THRESHOLD_FILES:
        path = folder / name
        if not path.is_file():
            needed = " and ".join(THRESHOLD_FILES)
            raise BundleError(f"thresholds folder {folder} has no {name!r} file (needs {needed})")
        text = path.read_text().strip()
        try:
            values[name] = float(text)
        except ValueError:
            raise BundleError(f"{path}: {text!r} is not a probability") from None
    return DecisionThresholds(**values)
