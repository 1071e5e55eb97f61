"""Builders of small but real test objects shared by several test modules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from fraud.bundle import BundleManifest, DecisionThresholds, write_bundle
from fraud.config import MODEL_NAME
from fraud.features.definitions import FEATURE_DESCRIPTIONS, FEATURE_SERVICE, MODEL_FEATURES


def synthetic_feature_matrix(n: int, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    """A feature matrix shaped like MODEL_FEATURES with a label that depends on amount and terminal risk."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({name: rng.gamma(2.0, 1.0, n) for name in MODEL_FEATURES})
    frame["tx_amount_feature"] = rng.gamma(2.0, 30.0, n)
    frame["tx_during_weekend"] = rng.integers(0, 2, n).astype(float)
    frame["tx_during_night"] = rng.integers(0, 2, n).astype(float)
    for w in (1, 7, 30):
        frame[f"terminal_risk_{w}d"] = rng.beta(0.5, 20.0, n)
    logit = -4.0 + 0.02 * frame["tx_amount_feature"] + 20.0 * frame["terminal_risk_7d"]
    label = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(int)
    return frame[list(MODEL_FEATURES)], label


def make_synthetic_bundle(bundle_dir: Path, version: str = "1", seed: int = 0) -> Path:
    """Train a small XGBoost model on synthetic data and write it as a complete serving bundle."""
    import xgboost as xgb

    features, label = synthetic_feature_matrix(2000, seed)
    dtrain = xgb.DMatrix(features, label=label, feature_names=list(MODEL_FEATURES))
    booster = xgb.train({"objective": "binary:logistic", "max_depth": 3, "nthread": 1}, dtrain, num_boost_round=20)
    manifest = BundleManifest(
        model_name=MODEL_NAME,
        model_version=version,
        feature_names=list(MODEL_FEATURES),
        thresholds=DecisionThresholds(review=0.3, decline=0.7),
        reason_codes=dict(FEATURE_DESCRIPTIONS),
        feature_service=FEATURE_SERVICE,
        categorical_features=["tx_during_weekend", "tx_during_night"],
    )
    return write_bundle(bundle_dir, booster, manifest, features.sample(500, random_state=seed).to_numpy(), "# test model\n")
