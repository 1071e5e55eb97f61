"""The pipeline steps as plain, tested functions. The KFP components in `components/` are thin
wrappers that turn artifact paths and parameters into calls of these functions.

A step reads only its input artifacts (paths), its parameters and the declared services: the
object store holding the Feast offline tables (`feature_tables_uri`), the Feast registry and
online store (the profile of `fraud.feature_store`), and the MLflow tracking server
(`mlflow_tracking_uri`, "" = `fraud.registry.tracking_uri()`). The `layout` a step is given is
the task's own scratch data directory: nothing written there is seen by another task, unless
`feature_tables_uri` is "" (the embedded single-machine mode, where every task shares one
data directory).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from fraud.config import DataLayout
from fraud.features.definitions import SNAPSHOT_TTL_DAYS
from fraud.schema import TX_FRAUD

if TYPE_CHECKING:  # the step functions import their libraries when they run (KFP task start-up)
    from fraud.training.evaluate import Evaluation, GateDecision


@dataclass(frozen=True)
class IngestedLayout(DataLayout):
    """A data layout whose raw transactions are the validated ones written by `ingest`."""

    ingested_transactions: Path = Path()

    @property
    def transactions(self) -> Path:
        return self.ingested_transactions


def task_layout() -> DataLayout:
    """The data directory of this task (FRAUD_DATA_DIR or the default), created if needed."""
    layout = DataLayout.current()
    layout.root.mkdir(parents=True, exist_ok=True)
    return layout


def feature_table_names() -> tuple[str, ...]:
    """File names of the offline feature tables (the same in every layout): the daily snapshots,
    the per-transaction velocity table and the window-state views' batch sources."""
    from fraud.features.definitions import CARD_RECENT_VIEW, TERMINAL_RECENT_VIEW
    from fraud.features.offline import customer_features_path, terminal_features_path
    from fraud.features.velocity_offline import recent_state_path, velocity_features_path

    probe = DataLayout(Path("."))
    return (
        customer_features_path(probe).name,
        terminal_features_path(probe).name,
        velocity_features_path(probe).name,
        recent_state_path(probe, CARD_RECENT_VIEW).name,
        recent_state_path(probe, TERMINAL_RECENT_VIEW).name,
    )


def tracking(uri: str) -> str | None:
    return uri or None


def latest_train_start(days: list[str], train_days: int, delay_days: int, test_days: int) -> str:
    """The latest train start whose test window still lies inside `days` (sorted YYYY-MM-DD)."""
    from datetime import date

    if not days:
        from fraud.errors import UserError

        raise UserError("cannot choose a train start: the data has no day partitions")
    last = date.fromisoformat(days[-1])
    return (last - timedelta(days=train_days + delay_days + test_days - 1)).isoformat()


def partition_days(folder: Path) -> list[str]:
    """The sorted days of the `day=YYYY-MM-DD` partitions below `folder`."""
    return sorted(p.name.split("=", 1)[1] for p in Path(folder).glob("day=*") if p.is_dir())


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


def engineer_features(
    valid_dir: Path, feature_tables_uri: str, layout: DataLayout, incremental: bool = False
) -> FeatureStepResult:
    """Offline feature tables from the validated transactions, stored at `feature_tables_uri`
    (when given), `feast apply`, then materialise into the online store: the last snapshots (the
    TTL window), or with `incremental` from where the previous materialisation ended (the
    scheduled daily feature pipeline)."""
    import time

    from fraud import feature_store, storage
    from fraud.features.offline import build_offline_features

    started = time.perf_counter()
    ingested = IngestedLayout(root=layout.root, ingested_transactions=Path(valid_dir))
    built = build_offline_features(ingested)
    if feature_tables_uri:
        storage.put_folder(layout.features, feature_tables_uri)
    feature_store.apply_repo()
    end = datetime.combine(built.last_day, datetime.min.time()) + timedelta(days=1)
    start = end - timedelta(days=SNAPSHOT_TTL_DAYS + 1)
    if incremental:
        done = feature_store.materialize_incremental(end)
        start = done.start or start
    else:
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


def materialize_feature_tables(
    feature_tables_uri: str, layout: DataLayout, incremental: bool = False
) -> FeatureStepResult:
    """The second half of :func:`engineer_features` for tables built elsewhere (the Spark
    Operator's SparkApplication, `fraud.deploy.spark`): fetch them from `feature_tables_uri`,
    `feast apply`, materialise as :func:`engineer_features` does."""
    import time

    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from fraud import feature_store, storage
    from fraud.features.offline import SNAPSHOT_TIMESTAMP, customer_features_path, terminal_features_path

    started = time.perf_counter()
    storage.get_folder(feature_tables_uri, layout.features, feature_table_names())
    customers = pq.read_table(customer_features_path(layout), columns=[SNAPSHOT_TIMESTAMP])
    terminal_rows = pq.ParquetFile(terminal_features_path(layout)).metadata.num_rows
    if customers.num_rows == 0:
        from fraud.errors import UserError

        raise UserError(f"the customer feature table at {feature_tables_uri} is empty")
    # the last snapshot is taken at midnight after the last transaction day
    end = pc.max(customers.column(SNAPSHOT_TIMESTAMP)).as_py()
    first = pc.min(customers.column(SNAPSHOT_TIMESTAMP)).as_py()
    feature_store.apply_repo()
    start = end - timedelta(days=SNAPSHOT_TTL_DAYS + 1)
    if incremental:
        done = feature_store.materialize_incremental(end)
        start = done.start or start
    else:
        feature_store.materialize(start, end)
    return FeatureStepResult(
        transactions=0,
        customer_rows=customers.num_rows,
        terminal_rows=terminal_rows,
        first_day=first.date().isoformat(),
        last_day=(end - timedelta(days=1)).date().isoformat(),
        materialized_start=start.isoformat(),
        materialized_end=end.isoformat(),
        seconds=time.perf_counter() - started,
    )


# --- 3. training sets -----------------------------------------------------------------------------


def build_training_set(
    valid_dir: Path,
    feature_tables_uri: str,
    layout: DataLayout,
    train_start: str,
    train_days: int,
    delay_days: int,
    test_days: int,
    n_validation_folds: int,
    train_path: Path,
    folds_dir: Path,
    test_path: Path,
    legit_per_day: int = 0,
) -> dict:
    """Point-in-time sets through Feast; returns their summary (rows, frauds, windows).

    `legit_per_day` > 0 keeps at most that many legitimate transactions per day of the training
    weeks (assessment and test weeks whole), weighted back (`fraud.training.sampling`), before the
    join; 0 keeps everything.

    With `feature_tables_uri`, the offline tables are fetched from there into this task's data
    directory and joined through a Feast store of its own (file registry, embedded online store):
    the shared registry records the paths of the task that applied it, which no other task can read."""
    from functools import partial

    from fraud import feature_store, storage
    from fraud.features.offline import labelled_transactions
    from fraud.training.dataset import SplitPlan, build_training_sets

    ingested = IngestedLayout(root=layout.root, ingested_transactions=Path(valid_dir))
    if not train_start:
        train_start = latest_train_start(partition_days(Path(valid_dir)), train_days, delay_days, test_days)
    plan = SplitPlan.create(train_start, train_days, delay_days, test_days, n_validation_folds)
    labelled = labelled_transactions(plan.span.start, plan.span.end, layout=ingested)
    lookup = None
    if feature_tables_uri:
        storage.get_folder(feature_tables_uri, layout.features, feature_table_names())
        feature_store.apply_repo("sqlite", registry="file")
        lookup = partial(feature_store.historical_features, online="sqlite", registry="file")
    if legit_per_day < 0:
        from fraud.errors import UserError

        raise UserError(f"legit_per_day must be >= 0 (0 = keep everything), got {legit_per_day}")
    sets = build_training_sets(plan, labelled=labelled, feature_lookup=lookup, legit_per_day=legit_per_day or None)
    sets.save(train_path, folds_dir, test_path)
    return sets.summary()


# --- 4. train -------------------------------------------------------------------------------------


def train(
    train_path: Path,
    folds_dir: Path,
    model_dir: Path,
    *,
    mlflow_tracking_uri: str,
    decline_precision: float,
    review_alerts_per_day: int,
    small_grid: bool,
) -> dict:
    """Select and fit the XGBoost model, log the MLflow run, save the model directory.
    Returns run id, validation metrics, thresholds and cost."""
    from fraud.training.dataset import TrainingSets
    from fraud.training.train import TrainConfig, log_training_run, train_served_model

    sets = TrainingSets.load(train_path, folds_dir)
    config = TrainConfig(
        decline_precision=decline_precision, review_alerts_per_day=review_alerts_per_day, small_grid=small_grid
    )
    trained, _, _ = train_served_model(sets, config)
    uri = tracking(mlflow_tracking_uri)
    run_id = log_training_run(trained, sets, tracking_uri=uri)
    log_training_dataset(run_id, sets.train, uri)
    trained.save(model_dir)
    return {
        "run_id": run_id,
        "prediction_cost_us": trained.prediction_cost_us,
        "threshold_review": trained.thresholds.thresholds.review,
        "threshold_decline": trained.thresholds.thresholds.decline,
        **trained.validation_metrics,
        "spec": trained.spec,
    }


def log_training_dataset(run_id: str, train: object, uri: str | None) -> None:
    """Record the training set as the run's dataset input (schema, profile, digest; context "training")."""
    from mlflow.data.pandas_dataset import from_pandas
    from mlflow.entities import DatasetInput, InputTag

    from fraud import registry

    dataset = from_pandas(train, name="train_set", targets=TX_FRAUD)
    registry.client(uri).log_inputs(
        run_id,
        datasets=[
            DatasetInput(
                dataset=dataset._to_mlflow_entity(), tags=[InputTag(key="mlflow.data.context", value="training")]
            )
        ],
    )


def log_curves(run_id: str, labels: object, scores: object, uri: str | None) -> None:
    """ROC and precision-recall curves of the test window as images of the run (plots/)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import PrecisionRecallDisplay, RocCurveDisplay

    from fraud import registry

    mlflow_client = registry.client(uri)
    for file_name, display in (
        ("plots/roc_curve.png", RocCurveDisplay),
        ("plots/precision_recall_curve.png", PrecisionRecallDisplay),
    ):
        figure, axes = plt.subplots(figsize=(5, 5))
        display.from_predictions(labels, scores, ax=axes, name="challenger (test window)")
        mlflow_client.log_figure(run_id, figure, file_name)
        plt.close(figure)


# --- 5. evaluate ----------------------------------------------------------------------------------


def evaluate(
    model_dir: Path,
    test_path: Path,
    evaluation_path: Path,
    *,
    mlflow_tracking_uri: str,
    run_id: str,
    train_path: Path | None = None,
    folds_dir: Path | None = None,
    compare_baselines: bool = False,
) -> tuple[Evaluation, str]:
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
        report += (
            "\n## Baselines (selected on the same folds, scored on the same test window)\n\n"
            "| model | test AP | test AUC | CP@100 |\n|---|---|---|---|\n"
        )
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
    from fraud.training.evaluate import score_booster

    log_curves(run_id, test[TX_FRAUD].to_numpy(), score_booster(trained.booster, test), uri)
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
) -> GateDecision:
    """Decide; record the decision and its reasons as tags on the training run. A negative
    champion AP means "no champion"."""
    from fraud import registry
    from fraud.training.evaluate import GateConfig
    from fraud.training.evaluate import gate as decide

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
    mlflow_tracking_uri: str,
) -> str:
    """Write the serving bundle, register it (alias `challenger`), record the gate decision on the
    version. The bundle artifact gets the manifest stamped by the registry. Returns the version."""
    import tempfile

    from fraud import registry
    from fraud.bundle import signing_key_from_env
    from fraud.training.bundle_builder import build_bundle
    from fraud.training.evaluate import Evaluation
    from fraud.training.train import TrainedModel

    uri = tracking(mlflow_tracking_uri)
    trained = TrainedModel.load(model_dir)
    trained.run_id = run_id
    evaluation = Evaluation.from_dict(json.loads(Path(evaluation_path).read_text()))
    build_bundle(Path(bundle_dir), trained, evaluation, signing_key=signing_key_from_env())
    version = registry.register_bundle(Path(bundle_dir), run_id, uri=uri, tags={"gate": "passed"})
    registry.record_decision(version, "gate", gate_reason, uri=uri)
    # the stored bundle carries the registry version: the artifact gets the same manifest
    with tempfile.TemporaryDirectory(prefix="registered-") as tmp:
        stored = registry.download_bundle(f"models:/{registry.MODEL_NAME}/{version}", Path(tmp) / "b", uri=uri)
        (Path(bundle_dir) / "bundle.json").write_bytes((stored / "bundle.json").read_bytes())
    return version
