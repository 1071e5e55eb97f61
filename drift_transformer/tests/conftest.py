"""Shared test helpers of the drift environment: a small serving bundle (only the files the
transformer reads) and feature vectors drawn from the same distribution as its reference sample."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest

#: The model's input vector, in order (mirrors fraud.features.definitions.MODEL_FEATURES, which this
#: environment must not import).
FEATURE_NAMES: tuple[str, ...] = (
    "tx_amount_feature",
    "tx_during_weekend",
    "tx_during_night",
    "customer_nb_tx_incl_1d",
    "customer_avg_amount_incl_1d",
    "customer_nb_tx_incl_7d",
    "customer_avg_amount_incl_7d",
    "customer_nb_tx_incl_30d",
    "customer_avg_amount_incl_30d",
    "amount_to_customer_avg_30d",
    "terminal_nb_tx_1d",
    "terminal_risk_1d",
    "terminal_nb_tx_7d",
    "terminal_risk_7d",
    "terminal_nb_tx_30d",
    "terminal_risk_30d",
)
CATEGORICAL_FEATURES: tuple[str, ...] = ("tx_during_weekend", "tx_during_night")
AMOUNT = FEATURE_NAMES.index("tx_amount_feature")
REFERENCE_ROWS = 500


def sample_vectors(n: int, seed: int, amount_factor: float = 1.0) -> np.ndarray:
    """Feature vectors shaped like the synthetic training data (tests/factories.py of the core)."""
    rng = np.random.default_rng(seed)
    x = rng.gamma(2.0, 1.0, (n, len(FEATURE_NAMES)))
    x[:, AMOUNT] = rng.gamma(2.0, 30.0, n) * amount_factor
    for name in CATEGORICAL_FEATURES:
        x[:, FEATURE_NAMES.index(name)] = rng.integers(0, 2, n).astype(float)
    for w in (1, 7, 30):
        x[:, FEATURE_NAMES.index(f"terminal_risk_{w}d")] = rng.beta(0.5, 20.0, n)
    return x


def write_bundle(path: Path, reference: np.ndarray | None = None, **manifest_overrides) -> Path:
    """bundle.json + reference_features.npy as fraud.bundle.write_bundle lays them out."""
    path.mkdir(parents=True, exist_ok=True)
    manifest = {
        "model_name": "fraud-detector",
        "model_version": "7",
        "feature_names": list(FEATURE_NAMES),
        "categorical_features": list(CATEGORICAL_FEATURES),
        "thresholds": {"review": 0.3, "decline": 0.7},
        "reason_codes": {},
        "format_version": 1,
    }
    manifest.update(manifest_overrides)
    (path / "bundle.json").write_text(json.dumps(manifest))
    np.save(path / "reference_features.npy", sample_vectors(REFERENCE_ROWS, seed=0) if reference is None else reference)
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def bundle_dir(tmp_path) -> Path:
    return write_bundle(tmp_path / "bundle")
