"""Training a served model: select, fit, choose thresholds, measure cost, log everything to MLflow.

The result is saved as a directory (`TrainedModel.save`) that the evaluation and registration
steps read: `model.ubj` (the XGBoost booster), `training.json` (selection, thresholds, cost, run id,
windows) and `reference_features.npy` (validation feature vectors for the drift detector).
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from fraud.config import PROJECT_ROOT
from fraud.features.definitions import FEATURE_SERVICE, MODEL_FEATURES
from fraud.quality_metrics import quality_report
from fraud.schema import TX_FRAUD
from fraud.training.dataset import TrainingSets
from fraud.training.models import (
    SERVED_FAMILY,
    FittedModel,
    Selection,
    ThresholdChoice,
    candidate_grid,
    choose_thresholds,
    fit,
    prediction_cost_us,
    prequential_select,
    validation_days,
)

if TYPE_CHECKING:
    import xgboost as xgb

MODEL_FILE = "model.ubj"
TRAINING_FILE = "training.json"
REFERENCE_FILE = "reference_features.npy"


@dataclass(frozen=True)
class TrainConfig:
    decline_precision: float = 0.9
    review_alerts_per_day: int = 100
    reference_rows: int = 2000
    small_grid: bool = False
    baselines: tuple[str, ...] = ("logistic_regression", "random_forest")
    seed: int = 0


@dataclass
class TrainedModel:
    booster: xgb.Booster
    spec: dict
    thresholds: ThresholdChoice
    prediction_cost_us: float
    validation_metrics: dict[str, float]
    selection: list[dict]
    baselines: dict[str, dict] = field(default_factory=dict)
    windows: dict = field(default_factory=dict)
    reference_features: np.ndarray | None = None
    run_id: str = ""
    train_rows: int = 0
    train_frauds: int = 0

    def save(self, out_dir: Path) -> Path:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.booster.save_model(str(out_dir / MODEL_FILE))
        np.save(out_dir / REFERENCE_FILE, np.asarray(self.reference_features, dtype="float64"), allow_pickle=False)
        meta = {k: v for k, v in asdict_shallow(self).items() if k not in ("booster", "reference_features")}
        meta["thresholds"] = self.thresholds.as_dict()
        (out_dir / TRAINING_FILE).write_text(json.dumps(meta, indent=2, default=_json_default))
        return out_dir

    @classmethod
    def load(cls, in_dir: Path) -> TrainedModel:
        import xgboost as xgb

        from fraud.bundle import DecisionThresholds

        in_dir = Path(in_dir)
        meta = json.loads((in_dir / TRAINING_FILE).read_text())
        booster = xgb.Booster()
        booster.load_model(str(in_dir / MODEL_FILE))
        booster.feature_names = list(MODEL_FEATURES)
        choice = dict(meta.pop("thresholds"))
        choice["thresholds"] = DecisionThresholds(**choice["thresholds"])
        return cls(
            booster=booster,
            thresholds=ThresholdChoice(**choice),
            reference_features=np.load(in_dir / REFERENCE_FILE, allow_pickle=False),
            **meta,
        )


def asdict_shallow(obj) -> dict:
    return {name: getattr(obj, name) for name in obj.__dataclass_fields__}


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, float) and np.isnan(value):
        return None
    return str(value)


def git_commit() -> str:
    """`git rev-parse HEAD` of the project, or "unknown" outside a checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],  # noqa: S607 - git found on PATH, fixed arguments
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _reference_sample(frame: pd.DataFrame, rows: int, seed: int) -> np.ndarray:
    features = frame[list(MODEL_FEATURES)].astype("float64")
    if len(features) > rows:
        features = features.sample(rows, random_state=seed)
    return features.to_numpy()


def train_served_model(
    sets: TrainingSets, config: TrainConfig = TrainConfig()
) -> tuple[TrainedModel, FittedModel, Selection]:
    """Select the XGBoost grid point prequentially, fit it on the training window, choose the
    thresholds on the validation predictions and measure the single-row prediction cost."""
    selection = prequential_select(
        sets, SERVED_FAMILY, candidate_grid(SERVED_FAMILY, config.small_grid), seed=config.seed
    )
    model = fit(selection.best, sets.train, seed=config.seed)
    validation = selection.validation_predictions
    choice = choose_thresholds(
        validation[TX_FRAUD].to_numpy(),
        validation["score"].to_numpy(),
        validation_days(validation),
        decline_precision=config.decline_precision,
        review_alerts_per_day=config.review_alerts_per_day,
    )
    booster = model.booster
    # the fold assessment windows: the most recent one (fold 0) is the reference for drift detection
    latest_validation = sets.folds[0][1]
    cost = prediction_cost_us(booster, latest_validation[list(MODEL_FEATURES)].to_numpy()[0])
    best = selection.best_result
    trained = TrainedModel(
        booster=booster,
        spec={"family": selection.best.family, **selection.best.params},
        thresholds=choice,
        prediction_cost_us=cost,
        validation_metrics={
            "validation_ap": best.mean_ap,
            "validation_auc": float(np.nanmean(best.fold_auc)),
            "validation_cp100": float(np.nanmean(best.fold_cp100)),
        },
        selection=[c.as_dict() for c in selection.candidates],
        windows=sets.plan.describe(),
        reference_features=_reference_sample(latest_validation, config.reference_rows, config.seed),
        train_rows=len(sets.train),
        train_frauds=int(sets.train[TX_FRAUD].sum()),
    )
    return trained, model, selection


def evaluate_baselines(sets: TrainingSets, config: TrainConfig) -> dict[str, dict]:
    """Select, fit and score each baseline family on the test window (for comparison only)."""
    out: dict[str, dict] = {}
    for family in config.baselines:
        selection = prequential_select(sets, family, candidate_grid(family, config.small_grid), seed=config.seed)
        model = fit(selection.best, sets.train, seed=config.seed)
        scored = sets.test.assign(score=model.predict(sets.test))
        report = quality_report(scored)
        out[family] = {
            "params": selection.best.params,
            "validation_ap": selection.best_result.mean_ap,
            "test_ap": report.average_precision,
            "test_auc": report.roc_auc,
            "test_cp100": report.card_precision_at_k,
        }
    return out


def log_training_run(
    trained: TrainedModel,
    sets: TrainingSets,
    *,
    experiment: str | None = None,
    run_name: str = "train",
    extra_params: dict | None = None,
    tracking_uri: str | None = None,
) -> str:
    """Log params, metrics, the XGBoost model (signature + input example), the feature list, the
    data window and the git commit to a new MLflow run; return its id (also stored on `trained`)."""
    import mlflow
    import mlflow.xgboost
    from mlflow.models import infer_signature

    from fraud import registry

    registry.configure(tracking_uri)
    experiment_id = registry.ensure_experiment(experiment or registry.EXPERIMENT_NAME, uri=tracking_uri)
    example = sets.train[list(MODEL_FEATURES)].astype("float64").head(5)
    signature = infer_signature(example, trained.booster.inplace_predict(example.to_numpy()))
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name) as run:
        params = {f"model.{k}": v for k, v in trained.spec.items()}
        params.update(
            {
                "train_start": sets.plan.final.train.start.date().isoformat(),
                "train_days": sets.plan.train_days,
                "delay_days": sets.plan.delay_days,
                "test_days": sets.plan.test_days,
                "n_validation_folds": sets.plan.n_validation_folds,
                "feature_service": FEATURE_SERVICE,
                "n_features": len(MODEL_FEATURES),
                "threshold_rule": trained.thresholds.rule,
            }
        )
        params.update(extra_params or {})
        mlflow.log_params(params)
        metrics = dict(trained.validation_metrics)
        metrics.update(
            {
                "threshold_review": trained.thresholds.thresholds.review,
                "threshold_decline": trained.thresholds.thresholds.decline,
                "prediction_cost_us": trained.prediction_cost_us,
                "train_rows": trained.train_rows,
                "train_frauds": trained.train_frauds,
            }
        )
        for family, result in trained.baselines.items():
            metrics.update({f"baseline.{family}.{k}": v for k, v in result.items() if isinstance(v, float)})
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None and np.isfinite(v)})
        mlflow.set_tags({"git_commit": git_commit(), "model_family": trained.spec["family"]})
        mlflow.log_dict({"features": list(MODEL_FEATURES)}, "features.json")
        mlflow.log_dict(sets.plan.describe(), "data_window.json")
        mlflow.log_dict({"candidates": trained.selection}, "model_selection.json")
        mlflow.log_dict(trained.thresholds.as_dict(), "thresholds.json")
        mlflow.xgboost.log_model(trained.booster, name="model", signature=signature, input_example=example)
    trained.run_id = run.info.run_id
    return run.info.run_id
