"""KFP v2 lightweight components of the training pipeline.

Each is a thin wrapper over a tested function of `fraud.training.steps`: project code is imported
inside the function body (the component runs in the project's core image, where the `fraud`
package is installed; nothing is pip-installed at run time).
"""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, ClassificationMetrics, Dataset, Input, Markdown, Metrics, Model, Output

from components.base import CORE_IMAGE


@dsl.component(base_image=CORE_IMAGE, install_kfp_package=False)
def ingest(
    data_uri: str,
    max_timestamp: str,
    valid_transactions: Output[Dataset],
    rejected_transactions: Output[Dataset],
    report: Output[Metrics],
) -> int:
    """Validate the raw transaction files at `data_uri`; return the number of valid rows."""
    from fraud.settings import read_at_entry

    read_at_entry()  # the one read of the environment in this task
    from pathlib import Path

    from fraud.training.steps import ingest as run_ingest

    result = run_ingest(data_uri, Path(valid_transactions.path), Path(rejected_transactions.path), max_timestamp)
    report.log_metric("rows_read", result["rows_read"])
    report.log_metric("rows_valid", result["rows_valid"])
    report.log_metric("rows_rejected", result["rows_rejected"])
    for reason, count in result["rejected"].items():
        report.log_metric(f"rejected_{reason}", count)
    valid_transactions.metadata.update(
        {
            "rows": result["rows_valid"],
            "first": result["first_timestamp"],
            "last": result["last_timestamp"],
            "layout": "day=YYYY-MM-DD/part-0.parquet",
        }
    )
    rejected_transactions.metadata["rows"] = result["rows_rejected"]
    return int(result["rows_valid"])


@dsl.component(base_image=CORE_IMAGE, install_kfp_package=False)
def engineer_features(
    valid_transactions: Input[Dataset],
    feature_tables_uri: str,
    report: Output[Metrics],
    incremental: bool = False,
) -> str:
    """Offline feature tables (stored at `feature_tables_uri`), `feast apply`, materialisation;
    return the last feature day."""
    from fraud.settings import read_at_entry

    read_at_entry()  # the one read of the environment in this task
    from pathlib import Path

    from fraud.training.steps import engineer_features as run_features
    from fraud.training.steps import task_layout

    result = run_features(Path(valid_transactions.path), feature_tables_uri, task_layout(), incremental)
    report.log_metric("transactions", result.transactions)
    report.log_metric("customer_snapshot_rows", result.customer_rows)
    report.log_metric("terminal_snapshot_rows", result.terminal_rows)
    report.log_metric("seconds", round(result.seconds, 3))
    report.metadata.update({"first_day": result.first_day, "last_day": result.last_day})
    return result.last_day


@dsl.component(base_image=CORE_IMAGE, install_kfp_package=False)
def build_training_set(
    valid_transactions: Input[Dataset],
    features_ready: str,
    feature_tables_uri: str,
    train_start: str,
    train_days: int,
    delay_days: int,
    test_days: int,
    n_validation_folds: int,
    train_set: Output[Dataset],
    validation_folds: Output[Dataset],
    test_set: Output[Dataset],
    summary: Output[Metrics],
    legit_per_day: int = 0,
):
    """Point-in-time train / prequential validation folds / test sets through Feast
    (`train_start` "": the latest that fits the ingested data; `legit_per_day` > 0: at most that
    many legitimate transactions per training day, weighted back). The join runs on the Feast
    profile of the task's environment (FRAUD_FEAST_OFFLINE=spark: a Spark job)."""
    from fraud.settings import read_at_entry

    read_at_entry()  # the one read of the environment in this task
    from pathlib import Path

    from fraud.training.steps import build_training_set as run_build
    from fraud.training.steps import task_layout

    result = run_build(
        Path(valid_transactions.path),
        feature_tables_uri,
        task_layout(),
        train_start,
        train_days,
        delay_days,
        test_days,
        n_validation_folds,
        Path(train_set.path),
        Path(validation_folds.path),
        Path(test_set.path),
        legit_per_day,
    )
    summary.log_metric("train_rows", result["train"]["rows"])
    summary.log_metric("train_frauds", result["train"]["frauds"])
    summary.log_metric("test_rows", result["test"]["rows"])
    summary.log_metric("test_frauds", result["test"]["frauds"])
    for i, fold in enumerate(result["folds"]):
        summary.log_metric(f"fold{i}_validation_rows", fold["validation"]["rows"])
    windows = result["windows"]
    train_set.metadata.update(windows["train"])
    test_set.metadata.update(windows["test"])
    validation_folds.metadata["folds"] = windows["folds"]
    summary.metadata["features_ready_through"] = features_ready


@dsl.component(base_image=CORE_IMAGE, install_kfp_package=False)
def train(
    train_set: Input[Dataset],
    validation_folds: Input[Dataset],
    mlflow_tracking_uri: str,
    decline_precision: float,
    review_alerts_per_day: int,
    small_grid: bool,
    model: Output[Model],
    metrics: Output[Metrics],
) -> NamedTuple("TrainOutputs", [("run_id", str), ("prediction_cost_us", float)]):
    """Prequential selection + fit of XGBoost, thresholds, cost; everything logged to MLflow."""
    from fraud.settings import read_at_entry

    read_at_entry()  # the one read of the environment in this task
    from collections import namedtuple
    from pathlib import Path

    from fraud.training.steps import train as run_train

    result = run_train(
        Path(train_set.path),
        Path(validation_folds.path),
        Path(model.path),
        mlflow_tracking_uri=mlflow_tracking_uri,
        decline_precision=decline_precision,
        review_alerts_per_day=review_alerts_per_day,
        small_grid=small_grid,
    )
    for key in (
        "validation_ap",
        "validation_auc",
        "validation_cp100",
        "threshold_review",
        "threshold_decline",
        "prediction_cost_us",
    ):
        metrics.log_metric(key, float(result[key]))
    model.metadata.update(
        {"framework": "xgboost", "mlflow_run_id": result["run_id"], **{k: str(v) for k, v in result["spec"].items()}}
    )
    TrainOutputs = namedtuple("TrainOutputs", ["run_id", "prediction_cost_us"])
    return TrainOutputs(result["run_id"], float(result["prediction_cost_us"]))


@dsl.component(base_image=CORE_IMAGE, install_kfp_package=False)
def evaluate(
    model: Input[Model],
    train_set: Input[Dataset],
    validation_folds: Input[Dataset],
    test_set: Input[Dataset],
    run_id: str,
    mlflow_tracking_uri: str,
    compare_baselines: bool,
    metrics: Output[Metrics],
    classification: Output[ClassificationMetrics],
    report: Output[Markdown],
    evaluation: Output[Artifact],
) -> NamedTuple(
    "EvaluateOutputs",
    [("test_average_precision", float), ("champion_average_precision", float), ("champion_version", str)],
):
    """Test-window metrics of the challenger and of the current champion (if any); -1 = no champion."""
    from fraud.settings import read_at_entry

    read_at_entry()  # the one read of the environment in this task
    import math
    from collections import namedtuple
    from pathlib import Path

    from fraud.training.steps import evaluate as run_evaluate

    result, markdown = run_evaluate(
        Path(model.path),
        Path(test_set.path),
        Path(evaluation.path),
        mlflow_tracking_uri=mlflow_tracking_uri,
        run_id=run_id,
        train_path=Path(train_set.path),
        folds_dir=Path(validation_folds.path),
        compare_baselines=compare_baselines,
    )
    for key, value in result.metrics.items():
        if math.isfinite(value):
            metrics.log_metric(key, float(value))
    classification.log_roc_curve(result.roc.fpr, result.roc.tpr, result.roc.thresholds)
    classification.log_confusion_matrix(["genuine", "fraud"], result.confusion_decline)
    Path(report.path).write_text(markdown)
    champion_ap = result.champion_metrics.get("test_average_precision", -1.0)
    if champion_ap is None or not math.isfinite(champion_ap):
        champion_ap = -1.0
    EvaluateOutputs = namedtuple(
        "EvaluateOutputs", ["test_average_precision", "champion_average_precision", "champion_version"]
    )
    challenger_ap = float(result.metrics["test_average_precision"])
    return EvaluateOutputs(challenger_ap, float(champion_ap), result.champion_version or "")


@dsl.component(base_image=CORE_IMAGE, install_kfp_package=False)
def gate(
    test_average_precision: float,
    champion_average_precision: float,
    prediction_cost_us: float,
    min_average_precision: float,
    max_ap_drop_vs_champion: float,
    max_prediction_cost_us: float,
    run_id: str,
    mlflow_tracking_uri: str,
    decision: Output[Metrics],
) -> str:
    """Return "passed" or "failed". The reasons are in `decision` (metadata `reason`), in the task
    log and in the tags `gate.decision` / `gate.reason` of the MLflow run.

    (A single unnamed return value on purpose: kfp.local resolves `dsl.If` conditions on a task's
    `Output` but not on named outputs of a NamedTuple.)"""
    from fraud.settings import read_at_entry

    read_at_entry()  # the one read of the environment in this task
    from fraud.training.steps import gate as run_gate

    result = run_gate(
        test_average_precision=test_average_precision,
        champion_average_precision=champion_average_precision,
        prediction_cost_us=prediction_cost_us,
        min_average_precision=min_average_precision,
        max_ap_drop_vs_champion=max_ap_drop_vs_champion,
        max_prediction_cost_us=max_prediction_cost_us,
        run_id=run_id,
        mlflow_tracking_uri=mlflow_tracking_uri,
    )
    decision.log_metric("passed", 1.0 if result.passed else 0.0)
    decision.metadata["verdict"] = "passed" if result.passed else "failed"
    decision.metadata["reason"] = result.summary
    print(f"gate {result.summary}")
    return "passed" if result.passed else "failed"


@dsl.component(base_image=CORE_IMAGE, install_kfp_package=False)
def register(
    model: Input[Model],
    evaluation: Input[Artifact],
    gate_decision: Input[Metrics],
    run_id: str,
    mlflow_tracking_uri: str,
    bundle: Output[Model],
) -> str:
    """Write the serving bundle and register it in MLflow with alias `challenger`; return the version."""
    from fraud.settings import read_at_entry

    read_at_entry()  # the one read of the environment in this task
    from pathlib import Path

    from fraud.training.steps import register as run_register

    version = run_register(
        Path(model.path),
        Path(evaluation.path),
        Path(bundle.path),
        run_id=run_id,
        gate_reason=str(gate_decision.metadata.get("reason", "passed")),
        mlflow_tracking_uri=mlflow_tracking_uri,
    )
    bundle.metadata.update({"model_version": version, "mlflow_run_id": run_id, "format": "fraud-bundle/1"})
    return version
