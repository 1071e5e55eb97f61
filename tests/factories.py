"""Builders of small but real test objects shared by several test modules."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd

from fraud.bundle import BundleManifest, DecisionThresholds, write_bundle
from fraud.config import MODEL_NAME
from fraud.features.definitions import (
    FEATURE_DESCRIPTIONS,
    FEATURE_SERVICE,
    MODEL_FEATURES,
    VELOCITY_DEFAULTS,
    VELOCITY_FEATURES,
)


def synthetic_feature_matrix(n: int, seed: int = 0, velocity: bool = False) -> tuple[pd.DataFrame, np.ndarray]:
    """A feature matrix shaped like MODEL_FEATURES with a label that depends on amount and terminal
    risk; with `velocity` also on the card's number of transactions in the last 10 minutes (a
    card-testing burst), else the velocity features hold their no-history values."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({name: rng.gamma(2.0, 1.0, n) for name in MODEL_FEATURES if name not in VELOCITY_FEATURES})
    for name in VELOCITY_FEATURES:  # no history anywhere: the model ignores them (and draws nothing)
        frame[name] = VELOCITY_DEFAULTS[name]
    frame["tx_amount_feature"] = rng.gamma(2.0, 30.0, n)
    frame["tx_during_weekend"] = rng.integers(0, 2, n).astype(float)
    frame["tx_during_night"] = rng.integers(0, 2, n).astype(float)
    for w in (1, 7, 30):
        frame[f"terminal_risk_{w}d"] = rng.beta(0.5, 20.0, n)
    logit = -4.0 + 0.02 * frame["tx_amount_feature"] + 20.0 * frame["terminal_risk_7d"]
    if velocity:
        recent = np.where(rng.random(n) < 0.3, rng.integers(0, 10, n), 0).astype(float)
        frame["customer_nb_tx_10m"] = recent
        frame["customer_nb_tx_1h"] = recent + rng.integers(0, 2, n)
        frame["customer_nb_tx_24h"] = frame["customer_nb_tx_1h"] + rng.integers(0, 3, n)
        logit = logit + 1.5 * recent
    label = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(int)
    return frame[list(MODEL_FEATURES)], label


def make_synthetic_bundle(bundle_dir: Path, version: str = "1", seed: int = 0, velocity: bool = False) -> Path:
    """Train a small XGBoost model on synthetic data (`synthetic_feature_matrix`) and write it as a
    complete serving bundle."""
    import xgboost as xgb

    features, label = synthetic_feature_matrix(2000, seed, velocity)
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
    return write_bundle(
        bundle_dir, booster, manifest, features.sample(500, random_state=seed).to_numpy(), "# test model\n"
    )


def restamp_bundle_digests(bundle_dir: Path) -> Path:
    """Rewrite bundle.json's file digests after a test replaced one of the bundle's files on purpose
    (an unsigned bundle; a signed one would need re-signing)."""
    import dataclasses

    from fraud.bundle import MANIFEST_FILE, bundle_digests, read_manifest

    manifest = read_manifest(bundle_dir)
    (bundle_dir / MANIFEST_FILE).write_text(dataclasses.replace(manifest, files=bundle_digests(bundle_dir)).to_json())
    return bundle_dir


def hand_made_raw_transactions(
    customers: list[str],
    terminals: list[str],
    first_day: datetime,
    n_days: int,
    seed: int,
    amount_step: float,
) -> pd.DataFrame:
    """0-3 transactions per customer and day at random terminals, in the raw schema; transactions at
    the first terminal are fraud with probability 0.4. Customer c's amounts scale with c * amount_step."""
    from datetime import timedelta

    from fraud.schema import RAW_TRANSACTION_SCHEMA

    rng = np.random.default_rng(seed)
    rows = []
    for day in range(n_days):
        for c, customer in enumerate(customers):
            for _ in range(int(rng.integers(0, 4))):
                terminal = terminals[int(rng.integers(0, len(terminals)))]
                when = first_day + timedelta(days=day, seconds=int(rng.integers(0, 86_400)))
                amount = round(float(rng.gamma(2.0, 20.0 + amount_step * c)) + 0.01, 2)
                fraud = int(terminal == terminals[0] and rng.random() < 0.4)
                rows.append((when, customer, terminal, amount, fraud))
    frame = pd.DataFrame(rows, columns=["tx_datetime", "customer_id", "terminal_id", "tx_amount", "tx_fraud"])
    frame = frame.sort_values("tx_datetime", kind="stable").reset_index(drop=True)
    seconds = (frame["tx_datetime"] - first_day).dt.total_seconds().astype("int64")
    frame["transaction_id"] = [f"TX{i:010d}" for i in range(len(frame))]
    frame["tx_time_seconds"] = seconds
    frame["tx_time_days"] = seconds // 86_400
    frame["tx_fraud"] = frame["tx_fraud"].astype("int8")
    frame["tx_fraud_scenario"] = frame["tx_fraud"].astype("int8")
    frame["tx_datetime"] = frame["tx_datetime"].astype("datetime64[us]")
    return frame[RAW_TRANSACTION_SCHEMA.names]


def write_raw_partitions(layout, frame: pd.DataFrame) -> None:
    """Write raw transactions in the simulator's layout: transactions/day=YYYY-MM-DD/part-0.parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fraud.schema import RAW_TRANSACTION_SCHEMA

    for day, part in frame.groupby(frame["tx_datetime"].dt.date):
        folder = layout.transactions / f"day={day.isoformat()}"
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(
            pa.Table.from_pandas(part, schema=RAW_TRANSACTION_SCHEMA, preserve_index=False), folder / "part-0.parquet"
        )


def materialised_sqlite_store(root: Path, raw: pd.DataFrame):
    """Fill the data directory `root` with `raw` transactions, their offline feature tables and a
    Feast SQLite online store materialised over every snapshot. Sets FRAUD_DATA_DIR (and clears the
    store-selection variables) for the caller's lifetime: returns the MonkeyPatch to undo."""
    from datetime import timedelta

    import pytest

    from fraud.config import DataLayout
    from fraud.feature_store import apply_repo, materialize, snapshot_span
    from fraud.features.offline import build_offline_features

    patch = pytest.MonkeyPatch()
    patch.setenv("FRAUD_DATA_DIR", str(root))
    for name in ("FRAUD_FEAST_ONLINE", "FRAUD_FEAST_REGISTRY", "FRAUD_FEAST_PROJECT"):
        patch.delenv(name, raising=False)
    layout = DataLayout(root)
    write_raw_partitions(layout, raw)
    build_offline_features(layout)
    apply_repo("sqlite")
    first, last = snapshot_span(layout)
    materialize(first, last + timedelta(seconds=1), "sqlite")
    return patch
