"""The serving bundle of a trained model (`fraud.bundle` format) and its model card."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fraud.bundle import BundleManifest, write_bundle
from fraud.config import MODEL_NAME
from fraud.features.definitions import FEATURE_DESCRIPTIONS, FEATURE_SERVICE, MODEL_FEATURES
from fraud.training.evaluate import Evaluation
from fraud.training.train import TrainedModel

#: Binary features: the drift detector compares them with a chi-squared test.
CATEGORICAL_FEATURES: tuple[str, ...] = ("tx_during_weekend", "tx_during_night")


def _window_text(window: dict) -> dict[str, str]:
    out: dict[str, str] = {}
    for key in ("train", "delay", "test"):
        if key in window:
            out[f"{key}_start"] = window[key]["start"]
            out[f"{key}_end"] = window[key]["end"]
    return out


def model_card(trained: TrainedModel, evaluation: Evaluation, version: str) -> str:
    m = evaluation.metrics
    t = trained.thresholds
    features = "\n".join(f"| `{name}` | {FEATURE_DESCRIPTIONS[name]} |" for name in MODEL_FEATURES)
    reference_rows = 0 if trained.reference_features is None else len(trained.reference_features)
    return f"""# Model card: {MODEL_NAME}

Registered version and MLflow run: see `bundle.json` (`model_version`, `mlflow_run_id`).

## What it does
Scores a card transaction at authorisation time with the probability that it is fraudulent and
maps it to approve / review / decline. Input: the transaction request plus the card's spending and
the terminal's risk features from the Feast feature service `{FEATURE_SERVICE}`.

## Training
- Model: XGBoost `{trained.spec}` selected by prequential validation average precision over
  {len(trained.windows.get("folds", []))} earlier weeks (candidates in the MLflow run `{trained.run_id}`).
- Windows: {trained.windows.get("train")} training, {trained.windows.get("delay")} label delay (unused),
  {trained.windows.get("test")} test. Training rows: {trained.train_rows} ({trained.train_frauds} frauds).

## Quality (test window, never used for any choice)
| metric | value |
|---|---|
| average precision | {m.get("test_average_precision", float("nan")):.4f} |
| ROC AUC | {m.get("test_roc_auc", float("nan")):.4f} |
| card precision@100 | {m.get("test_card_precision_at_k", float("nan")):.4f} |
| recall at {int(m.get("test_alert_budget", 0))} alerts | {m.get("test_recall_at_budget", float("nan")):.4f} |
| validation AP (mean over folds) | {trained.validation_metrics.get("validation_ap", float("nan")):.4f} |

## Decisions
- review if p >= {t.thresholds.review:.4f}, decline if p >= {t.thresholds.decline:.4f}.
- Rule: {t.rule}.
- On validation data the decline band had precision {t.decline_precision:.3f} and recall {t.decline_recall:.3f}.

## Cost
Median single-row `inplace_predict`: {trained.prediction_cost_us:.1f} µs (one thread).

## Features
| feature | meaning |
|---|---|
{features}

## Limits
Trained on simulated transactions (Fraud Detection Handbook generator). Frauds whose labels arrive
later than {trained.windows.get("delay_days", 7)} days are not learned from. Drift is watched against a
reference sample of {reference_rows} validation feature vectors.
"""


def build_bundle(
    bundle_dir: Path,
    trained: TrainedModel,
    evaluation: Evaluation,
    version: str = "candidate",
    signing_key: Ed25519PrivateKey | None = None,
) -> Path:
    """Write the complete bundle (file digests in bundle.json; signed in bundle.sig with
    `signing_key`); `version` is replaced by the registry version at registration."""
    metrics = {k: float(v) for k, v in evaluation.metrics.items()}
    metrics.update({k: float(v) for k, v in trained.validation_metrics.items()})
    metrics["prediction_cost_us"] = float(trained.prediction_cost_us)
    manifest = BundleManifest(
        model_name=MODEL_NAME,
        model_version=str(version),
        feature_names=list(MODEL_FEATURES),
        thresholds=trained.thresholds.thresholds,
        reason_codes={name: FEATURE_DESCRIPTIONS[name] for name in MODEL_FEATURES},
        feature_service=FEATURE_SERVICE,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        training_window=_window_text(trained.windows),
        metrics=metrics,
        categorical_features=list(CATEGORICAL_FEATURES),
        mlflow_run_id=trained.run_id,
    )
    return write_bundle(
        bundle_dir,
        trained.booster,
        manifest,
        trained.reference_features,
        model_card(trained, evaluation, version),
        signing_key=signing_key,
    )
