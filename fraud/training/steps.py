"""The pipeline steps as plain, tested functions. The KFP components in `components/` are thin
wrappers that turn artifact paths and parameters into calls of these functions.

Every step takes the data directory explicitly (`FRAUD_DATA_DIR` is set from it, because the
feature repository resolves its paths from that variable) and the MLflow tracking URI ("" means
the default of `fraud.registry.tracking_uri()`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from fraud.config import DataLayout
from fraud.features.definitions import SNAPSHOT_TTL_DAYS


@dataclass(frozen=True)
class IngestedLayout(DataLayout):
    """A data layout whose raw transactions are the validated ones written by `ingest`."""

    ingested_transactions: Path = Path()

    @property
    def transactions(self) -> Path:
        return self.ingested_transactions


def use_data_dir(data_dir: str) -> DataLayout:
    """Point FRAUD_DATA_DIR at `data_dir` (when given) and return the layout."""
    if data_dir:
        os.environ["FRAUD_DATA_DIR"] = str(Path(data_dir).resolve())
    layout = DataLayout.current()
    layout.root.mkdir(parents=True, exist_ok=True)
    return layout


def tracking(uri: str) -> str | None:
    return uri or None


# --- 1. ingest ------------------------------------------------------------------------------------


def ingest(data_uri: str, valid_dir: Path, rejected_path: Path, max_timestamp: str = "") -> dict:
    """Validate the raw files at `data_uri`; write the valid rows partitioned by day to `valid_dir`
    and the rejected rows (with their reason) to `rejected_path`. Returns the report as a dict."""
    from fraud.training import validation

    upper = datetime.fromisoformat(max_timestamp) if max_timestamp else None
    result = validation.validate_uri(data_uri, max_timestamp=upper)
    validation.write_partitioned(result.valid, Path(valid_dir))
    Path(rejected_path).parent.mkdir(parents=True, exist_ok=True)
    result.rejected.to_parquet(rejected_path, index=False)
    return result.report.as_dict()


# --- 2. features ----------------------------------------------------------------------------------


@dataclass
class FeatureStepResult:
    transactions: int
    customer_rows: int
    terminal_rows: int
    first_day: str
    last_day: str
    materialized_start: str
    materialized_end: str
    seconds: float


def engineer_features(valid_dir: Path, data_dir: str) -> FeatureStepResult:
    """Offline feature tables from the validated transactions, `feast apply`, then materialise the
    last snapshots (the TTL window) into the online store."""
    import time

    from fraud import feature_store
    from fraud.features.offline import build_offline_features

    started = time.perf_counter()
    base = use_data_dir(data_dir)
    layout = IngestedLayout(root=base.root, ingested_transactions=Path(valid_dir))
    built = build_offline_features(layout)
    feature_store.apply_repo()
    end = datetime.combine(built.last_day, datetime.min.time()) + timedelta(days=1)
    start = end - timedelta(days=SNAPSHOT_TTL_DAYS + 1)
    feature_store.materialize(start, end)
    return FeatureStepResult(
        transactions=built.transactions,
        customer_rows=built.customer.rows,
        terminal_rows=built.terminal.rows,
        first_day=built.first_day.isoformat(),
        last_day=built.last_day.isoformat(),
        materialized_start=start.isoformat(),
        materialized_end=end.isoformat(),
        seconds=time.perf_counter() - started,
    )


# --- 3. training sets -----------------------------------------------------------------------------


def build_training_set(
    valid_dir: Path,
    data_dir: str,
    train_start: str,
    train_days: int,
    delay_days: int,
    test_days: int,
    n_validation_folds: int,
    train_path: Path,
    folds_dir: Path,
    test_path: Path,
) -> dict:
    """Point-in-time sets through Feast; returns their summary (rows, frauds, windows)."""
    from fraud.features.offline import labelled_transactions
    from fraud.training.dataset import SplitPlan, build_training_sets

    base = use_data_dir(data_dir)
    layout = IngestedLayout(root=base.root, ingested_transactions=Path(valid_dir))
    plan = SplitPlan.create(train_start, train_days, delay_days, test_days, n_validation_folds)
    labelled = labelled_transactions(plan.span.start, plan.span.end, layout=layout)
    sets = build_training_sets(plan, labelled=labelled)
    sets.save(train_path, folds_dir, test_path)
    return sets.summary()


# --- 4. train -------------------------------------------------------------------------------------


def train(
    train_path: Path,
    folds_dir: Path,
    model_dir: Path,
    *,
    data_dir: str,
    mlflow_tracking_uri: str,
    decline_precision: float,
    review_alerts_per_day: int,
    small_grid: bool,
) -> dict:
    """Select and fit the XGBoost model, log the MLflow run, save the model directory.
    Returns run id, validation metrics, thresholds and cost."""
    from fraud.training.dataset import TrainingSets
    from fraud.training.train import TrainConfig, log_training_run, train_served_model

    use_data_dir(data_dir)
    sets = TrainingSets.load(train_path, folds_dir)
    config = TrainConfig(
        decline_precision=decline_precision, review_alerts_per_day=review_alerts_per_day, small_grid=small_grid
    )
    trained, _, _ = train_served_model(sets, config)
    run_id = log_training_run(trained, sets, tracking_uri=tracking(mlflow_tracking_uri))
    trained.save(model_dir)
    return {
        "run_id": run_id,
        "prediction_cost_us": trained.prediction_cost_us,
        "threshold_review": trained.thresholds.thresholds.review,
        "threshold_decline": trained.thresholds.thresholds.decline,
        **trained.validation_metrics,
        "spec": trained.spec,
    }


# --- 5. evaluate ----------------------------------------------------------------------------------


def evaluate(
    model_dir: Path,
    test_path: Path,
    evaluation_path: Path,
    *,
    data_dir: str,
    mlflow_tracking_uri: str,
    run_id: str,
    train_path: Path | None = None,
    folds_dir: Path | None = None,
    compare_baselines: bool = False,
) -> tuple[object, str]:
    """Score the challenger (and the champion, if any) on the test window, log the test metrics
    to the training run; optionally select, fit and score the baselines for comparison.
    Returns (Evaluation, Markdown report)."""
    import numpy as np
    import pandas as pd

    from fraud import registry
    from fraud.training.dataset import TrainingSets, load_plan
    from fraud.training.evaluate import evaluate as evaluate_model
    from fraud.training.evaluate import markdown_report, score_champion
    from fraud.training.train import TrainConfig, TrainedModel, evaluate_baselines

    use_data_dir(data_dir)
    uri = tracking(mlflow_tracking_uri)
    trained = TrainedModel.load(model_dir)
    test = pd.read_parquet(test_path)
    window = load_plan(folds_dir).describe() if folds_dir is not None else trained.windows
    result = evaluate_model(trained.booster, trained.thresholds.thresholds, test, window)
    result.champion_version, result.champion_metrics = score_champion(test, tracking_uri=uri)
    baselines: dict = {}
    if compare_baselines and train_path is not None and folds_dir is not None:
        sets = TrainingSets.load(train_path, folds_dir, test_path)
        baselines = evaluate_baselines(sets, TrainConfig())
    report = markdown_report(
        result,
        {
            "spec": trained.spec,
            "thresholds": trained.thresholds.thresholds,
            "prediction_cost_us": trained.prediction_cost_us,
        },
    )
    if baselines:
        report += "\n## Baselines (selected on the same folds, scored on the same test window)\n\n| model | test AP | test AUC | CP@100 |\n|---|---|---|---|\n"
        report += "".join(
            f"| {name} | {b['test_ap']:.4f} | {b['test_auc']:.4f} | {b['test_cp100']:.4f} |\n"
            for name, b in baselines.items()
        )
    client = registry.client(uri)
    for key, value in result.metrics.items():
        if np.isfinite(value):
            client.log_metric(run_id, key, float(value))
    for key, value in result.champion_metrics.items():
        if np.isfinite(value):
            client.log_metric(run_id, f"champion_{key}", float(value))
    for family, values in baselines.items():
        for key, value in values.items():
            if isinstance(value, float) and np.isfinite(value):
                client.log_metric(run_id, f"baseline.{family}.{key}", value)
    client.set_tag(run_id, "champion_version", result.champion_version or "none")
    client.log_text(run_id, report, "evaluation.md")
    Path(evaluation_path).parent.mkdir(parents=True, exist_ok=True)
    Path(evaluation_path).write_text(json.dumps(result.as_dict(), indent=2, default=float))
    return result, report


# --- 6. gate --------------------------------------------------------------------------------------


def gate(
    *,
    test_average_precision: float,
    champion_average_precision: float,
    prediction_cost_us: float,
    min_average_precision: float,
    max_ap_drop_vs_champion: float,
    max_prediction_cost_us: float,
    run_id: str,
    mlflow_tracking_uri: str,
    data_dir: str,
) -> object:
    """Decide; record the decision and its reasons as tags on the training run. A negative
    champion AP means "no champion"."""
    from fraud import registry
    from fraud.training.evaluate import GateConfig
    from fraud.training.evaluate import gate as decide

    use_data_dir(data_dir)
    decision = decide(
        GateConfig(min_average_precision, max_ap_drop_vs_champion, max_prediction_cost_us),
        test_average_precision,
        None if champion_average_precision < 0 else champion_average_precision,
        prediction_cost_us,
    )
    uri = tracking(mlflow_tracking_uri)
    client = registry.client(uri)
    client.set_tag(run_id, "gate.decision", "passed" if decision.passed else "failed")
    client.set_tag(run_id, "gate.reason", decision.summary[:5000])
    return decision


# --- 7. register ----------------------------------------------------------------------------------


def register(
    model_dir: Path,
    evaluation_path: Path,
    bundle_dir: Path,
    *,
    run_id: str,
    gate_reason: str,
    data_dir: str,
    mlflow_tracking_uri: str,
) -> str:
    """Write the serving bundle, register it (alias `challenger`), record the gate decision on the
    version; also keep a copy under `DataLayout.bundles/<version>`. Returns the version."""
    import shutil

    from fraud import registry
    from fraud.bundle import signing_key_from_env
    from fraud.training.bundle_builder import build_bundle
    from fraud.training.evaluate import Evaluation
    from fraud.training.train import TrainedModel

    layout = use_data_dir(data_dir)
    uri = tracking(mlflow_tracking_uri)
    trained = TrainedModel.load(model_dir)
    trained.run_id = run_id
    evaluation = Evaluation.from_dict(json.loads(Path(evaluation_path).read_text()))
    build_bundle(Path(bundle_dir), trained, evaluation, signing_key=signing_key_from_env())
    version = registry.register_bundle(Path(bundle_dir), run_id, uri=uri, tags={"gate": "passed"})
    registry.record_decision(version, "gate", gate_reason, uri=uri)
    # the stored bundle carries the registry version; mirror it locally for the serving stack
    local = layout.bundles / version
    registry.download_bundle(f"models:/{registry.MODEL_NAME}/{version}", local, uri=uri)
    shutil.copy2(local / "bundle.json", Path(bundle_dir) / "bundle.json")
    return version
