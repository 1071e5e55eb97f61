"""The bundle's XGBoost model as a scorer: probabilities, SHAP reason codes, decisions.

Also resolves where a bundle comes from (local directory, KServe's /mnt/models, or an MLflow
`models:/` URI through `fraud.registry.download_bundle`).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fraud.bundle import MANIFEST_FILE, MODEL_FILE, REFERENCE_FILE, BundleError, BundleManifest, validate_bundle
from fraud.features.definitions import FEATURE_DESCRIPTIONS, MODEL_FEATURES
from predictor.codec import ReasonCode
from predictor.compiled import COMPILED_OFF, CompiledModel, load_compiled_model

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


#: Which transactions get SHAP reason codes: `flagged` = those not approved (review / decline),
#: the ones a reason must be given for; `all` = every transaction. Exact TreeSHAP costs ~40-50x the
#: prediction itself (docs/performance.md), so `flagged` is the default.
REASON_CODES_FLAGGED = "flagged"
REASON_CODES_ALL = "all"
REASON_CODE_POLICIES = (REASON_CODES_FLAGGED, REASON_CODES_ALL)
APPROVE = "approve"


@dataclass(frozen=True)
class ScoreResult:
    probabilities: np.ndarray  # [n]
    #: [n, len(features)] SHAP values (bias column dropped); NaN rows were not explained (policy)
    contributions: np.ndarray
    reason_codes: list[list[ReasonCode]]
    decisions: list[str]


class BundleScorer:
    """A loaded, validated bundle. Thread-safe for concurrent `score` calls."""

    def __init__(
        self, bundle_dir: Path, nthread: int = 1, compiled: str = "off", compiled_cache: Path | None = None
    ) -> None:
        """`compiled`: "auto" scores the probabilities with the model compiled to native code
        (predictor.compiled; XGBoost when it cannot be built or does not match), "off" with XGBoost."""
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
        self._predict: Callable[[np.ndarray], np.ndarray] = lambda values: booster.inplace_predict(
            values, validate_features=False
        )
        self.compiled: CompiledModel | None = None
        if compiled != COMPILED_OFF:
            reference_file = self.bundle_dir / REFERENCE_FILE
            reference = np.load(reference_file) if reference_file.is_file() else None
            self.compiled = load_compiled_model(
                self.bundle_dir / MODEL_FILE, self._predict, len(MODEL_FEATURES), reference, compiled_cache
            )
            if self.compiled is not None:
                self._predict = self.compiled.predict_or(self._predict)
        self.descriptions = {
            name: self.manifest.reason_codes.get(name, FEATURE_DESCRIPTIONS[name]) for name in MODEL_FEATURES
        }

    @property
    def model_version(self) -> str:
        return self.manifest.model_version

    def contributions(self, features: pd.DataFrame | np.ndarray) -> np.ndarray:
        """SHAP contributions [n, k] (XGBoost TreeSHAP, `pred_contribs=True`), bias dropped."""
        return self.contributions_with_bias(features)[:, :-1]

    def contributions_with_bias(self, features: pd.DataFrame | np.ndarray) -> np.ndarray:
        """SHAP contributions [n, k + 1] in log-odds (XGBoost TreeSHAP, `pred_contribs=True`): one
        column per feature in MODEL_FEATURES order, then the bias; each row sums to the margin."""
        import xgboost as xgb

        values = features.to_numpy(dtype=np.float64) if isinstance(features, pd.DataFrame) else features
        matrix = xgb.DMatrix(values, nthread=1)
        return np.asarray(self.booster.predict(matrix, pred_contribs=True, validate_features=False))

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

    def decisions(self, probabilities: np.ndarray) -> list[str]:
        thresholds = self.manifest.thresholds
        return [thresholds.decide(p) for p in probabilities.tolist()]

    def score(self, features: pd.DataFrame | np.ndarray, reason_codes: str = REASON_CODES_FLAGGED) -> ScoreResult:
        """Score a model feature matrix (columns = MODEL_FEATURES, float64; a DataFrame is reordered
        by column name). `reason_codes` says which rows are explained (REASON_CODE_POLICIES); rows
        not explained get no reason codes and NaN contributions."""
        if reason_codes not in REASON_CODE_POLICIES:
            raise ValueError(f"reason_codes must be one of {REASON_CODE_POLICIES}, got {reason_codes!r}")
        # Plain float64 arrays in MODEL_FEATURES order: XGBoost's pandas adapter costs more than
        # the trees for small batches.
        if isinstance(features, pd.DataFrame):
            features = features[list(MODEL_FEATURES)].to_numpy(dtype=np.float64)
        values = np.ascontiguousarray(features, dtype=np.float64)
        if values.ndim != 2 or values.shape[1] != len(MODEL_FEATURES):
            raise ValueError(f"expected a [n, {len(MODEL_FEATURES)}] feature matrix, got shape {values.shape}")
        probabilities = np.asarray(self._predict(values), dtype=np.float64)
        decisions = self.decisions(probabilities)
        if reason_codes == REASON_CODES_ALL:
            explained = np.arange(len(values))
        else:
            explained = np.flatnonzero([decision != APPROVE for decision in decisions])
        contributions = np.full(values.shape, np.nan)
        codes: list[list[ReasonCode]] = [[] for _ in range(len(values))]
        if len(explained):
            explained_contributions = self.contributions(values[explained])
            contributions[explained] = explained_contributions
            for row, row_codes in zip(explained.tolist(), self.reason_codes(explained_contributions), strict=True):
                codes[row] = row_codes
        return ScoreResult(
            probabilities=probabilities,
            contributions=contributions,
            reason_codes=codes,
            decisions=decisions,
        )
