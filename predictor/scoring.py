"""The bundle's XGBoost model as a scorer: probabilities, SHAP reason codes, decisions.

Also resolves where a bundle comes from (local directory, KServe's /mnt/models, or an MLflow
`models:/` URI through `fraud.registry.download_bundle`).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fraud.bundle import MANIFEST_FILE, MODEL_FILE, BundleError, BundleManifest, validate_bundle
from fraud.features.definitions import FEATURE_DESCRIPTIONS, MODEL_FEATURES
from predictor.codec import ReasonCode

logger = logging.getLogger(__name__)

#: Where KServe's storage initializer puts the model of an InferenceService with a storageUri.
KSERVE_MODEL_DIR = Path("/mnt/models")
#: Bundle locations fetched through the MLflow model registry (fraud.registry.download_bundle).
REMOTE_URI_SCHEMES = ("models:/",)


def is_remote_uri(location: str) -> bool:
    return location.startswith(REMOTE_URI_SCHEMES)


def resolve_bundle_dir(location: str, download_root: Path | None = None) -> Path:
    """A local bundle directory for `location`. Raises BundleError when there is none.

    A local directory may be the bundle itself or (as a storage initializer can lay it out) hold it
    as its only subdirectory with a bundle.json.
    """
    if is_remote_uri(location):
        from fraud.registry import download_bundle

        target = Path(download_root or tempfile.mkdtemp(prefix="fraud-bundle-")) / "bundle"
        try:
            return Path(download_bundle(location, target))
        except BundleError:
            raise
        except Exception as exc:  # registry unreachable, unknown alias, ...
            raise BundleError(f"cannot download bundle {location}: {type(exc).__name__}: {exc}") from exc
    path = Path(location)
    if not path.is_dir():
        raise BundleError(f"bundle directory {path} does not exist")
    if (path / MANIFEST_FILE).is_file():
        return path
    nested = [child for child in path.iterdir() if child.is_dir() and (child / MANIFEST_FILE).is_file()]
    if len(nested) == 1:
        return nested[0]
    raise BundleError(
        f"no {MANIFEST_FILE} in {path}" + (f" (and {len(nested)} candidate subdirectories)" if nested else "")
    )


@dataclass(frozen=True)
class ScoreResult:
    probabilities: np.ndarray  # [n]
    contributions: np.ndarray  # [n, len(features)] SHAP values (bias column dropped)
    reason_codes: list[list[ReasonCode]]
    decisions: list[str]


class BundleScorer:
    """A loaded, validated bundle. Thread-safe for concurrent `score` calls."""

    def __init__(self, bundle_dir: Path, nthread: int = 1) -> None:
        import xgboost as xgb

        self.bundle_dir = Path(bundle_dir)
        self.manifest: BundleManifest = validate_bundle(self.bundle_dir)
        if list(self.manifest.feature_names) != list(MODEL_FEATURES):
            raise BundleError(
                f"bundle {self.bundle_dir} was trained on features {self.manifest.feature_names}, "
                f"this predictor computes {list(MODEL_FEATURES)}"
            )
        if self.manifest.max_reason_codes < 0:
            raise BundleError(f"max_reason_codes must be >= 0, got {self.manifest.max_reason_codes}")
        try:
            booster = xgb.Booster(model_file=str(self.bundle_dir / MODEL_FILE))
        except xgb.core.XGBoostError as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BundleError(f"{self.bundle_dir / MODEL_FILE} is not a readable XGBoost model: {first_line}") from None
        if booster.num_features() != len(MODEL_FEATURES):
            raise BundleError(
                f"{MODEL_FILE} expects {booster.num_features()} features, the manifest lists {len(MODEL_FEATURES)}"
            )
        booster.set_param({"nthread": nthread})
        booster.feature_names = list(MODEL_FEATURES)
        self.booster = booster
        self.descriptions = {
            name: self.manifest.reason_codes.get(name, FEATURE_DESCRIPTIONS[name]) for name in MODEL_FEATURES
        }

    @property
    def model_version(self) -> str:
        return self.manifest.model_version

    def contributions(self, features: pd.DataFrame | np.ndarray) -> np.ndarray:
        """SHAP contributions [n, k] (XGBoost TreeSHAP, `pred_contribs=True`), bias dropped."""
        import xgboost as xgb

        values = features.to_numpy(dtype=np.float64) if isinstance(features, pd.DataFrame) else features
        matrix = xgb.DMatrix(values, nthread=1)
        return np.asarray(self.booster.predict(matrix, pred_contribs=True, validate_features=False))[:, :-1]

    def reason_codes(self, contributions: np.ndarray) -> list[list[ReasonCode]]:
        """Per row, the `max_reason_codes` features with the largest positive contribution."""
        limit = self.manifest.max_reason_codes
        codes: list[list[ReasonCode]] = []
        for row in contributions:
            order = np.argsort(-row, kind="stable")[:limit]
            codes.append(
                [
                    ReasonCode(MODEL_FEATURES[j], self.descriptions[MODEL_FEATURES[j]], float(row[j]))
                    for j in order
                    if row[j] > 0.0
                ]
            )
        return codes

    def score(self, features: pd.DataFrame) -> ScoreResult:
        """Score a model feature frame (columns = MODEL_FEATURES, float64)."""
        # Plain float64 arrays in MODEL_FEATURES order: XGBoost's pandas adapter costs more than
        # the trees for small batches.
        values = np.ascontiguousarray(features[list(MODEL_FEATURES)].to_numpy(dtype=np.float64))
        probabilities = np.asarray(self.booster.inplace_predict(values, validate_features=False), dtype=np.float64)
        contributions = self.contributions(values)
        thresholds = self.manifest.thresholds
        return ScoreResult(
            probabilities=probabilities,
            contributions=contributions,
            reason_codes=self.reason_codes(contributions),
            decisions=[thresholds.decide(float(p)) for p in probabilities],
        )
