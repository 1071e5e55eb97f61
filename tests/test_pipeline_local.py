"""A real kfp.local run of the whole training pipeline on a tiny simulated dataset.

100 customers, 200 terminals, 50 days; two validation folds; the one-point grid. Every step runs
as a subprocess of this interpreter; MLflow is the local SQLite store of the run's data dir.
"""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fraud.bundle import validate_bundle
from fraud.config import MODEL_NAME
from fraud.features.definitions import MODEL_FEATURES

TRAIN_START = "2018-04-22"  # span 2018-04-01 .. 05-13 with two folds


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from fraud.simulator import SimulationConfig, simulate, write_dataset

    root = tmp_path_factory.mktemp("pipeline-local")
    data_dir = root / "data"
    raw = root / "incoming" / "raw"
    write_dataset(
        simulate(SimulationConfig(n_customers=100, n_terminals=200, n_days=50, start_date=date(2018, 4, 1), seed=3)),
        raw,
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FRAUD_DATA_DIR", str(data_dir))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        from fraud import registry

        yield {"data_dir": data_dir, "raw": raw, "tracking_uri": registry.tracking_uri()}


def _arguments(ctx: dict, **overrides) -> dict:
    arguments = {
        "data_uri": str(ctx["raw"]),
        "train_start": TRAIN_START,
        "mlflow_tracking_uri": ctx["tracking_uri"],
        "n_validation_folds": 2,
        "small_grid": True,
        "min_average_precision": 0.1,
        "deploy_target": "record",
    }
    arguments.update(overrides)
    return arguments


def _executor_output(task_dir: Path) -> dict:
    return json.loads((task_dir / "executor_output.json").read_text())


def test_local_run_registers_a_valid_challenger(tiny_run, tmp_path):
    from fraud import registry
    from pipelines.local_run import TASKS, run_local

    result = run_local(_arguments(tiny_run), tiny_run["data_dir"] / "pipeline_root")
    assert result.tasks_run == list(TASKS)

    # ingest: the simulator's rows are all valid and written partitioned by day
    ingest_out = _executor_output(result.task_dir("ingest"))
    valid_dir = Path(ingest_out["artifacts"]["valid_transactions"]["artifacts"][0]["uri"])
    assert len(list(valid_dir.glob("day=*/part-0.parquet"))) == 50
    assert ingest_out["parameterValues"]["Output"] > 1000

    # training sets: the test set never reaches `train`; folds end before the test window
    sets_dir = result.task_dir("build-training-set")
    test = pd.read_parquet(sets_dir / "test_set")
    assert test["tx_datetime"].min() >= pd.Timestamp("2018-05-06") and test["tx_datetime"].max() < pd.Timestamp(
        "2018-05-13"
    )
    folds = sets_dir / "validation_folds"
    assert sorted(p.name for p in folds.iterdir()) == [
        "fold-0-train.parquet",
        "fold-0-validation.parquet",
        "fold-1-train.parquet",
        "fold-1-validation.parquet",
        "plan.json",
    ]
    assert pd.read_parquet(folds / "fold-0-validation.parquet")["tx_datetime"].max() < pd.Timestamp("2018-04-29")

    # evaluate: classification metrics and the Markdown report
    evaluate_out = _executor_output(result.task_dir("evaluate"))
    classification = evaluate_out["artifacts"]["classification"]["artifacts"][0]["metadata"]
    assert classification["confidenceMetrics"] and classification["confusionMatrix"]["annotationSpecs"]
    assert "# Fraud model evaluation" in (result.task_dir("evaluate") / "report").read_text()
    assert evaluate_out["parameterValues"]["champion_average_precision"] == -1.0

    # gate passed, with its reasons; then register and the deploy components ran
    assert result.gate_verdict == "passed" and "floor 0.1000" in result.gate_reason
    version = result.model_version
    assert version and registry.get_version_by_alias("challenger") == version
    decisions = registry.get_decisions(version)
    assert decisions["gate"].startswith("passed")
    assert result.rollout_state  # the deploy engineer's analyse_canary returned a state

    # the registered bundle is complete and carries the registry version
    bundle = registry.download_bundle(f"models:/{MODEL_NAME}@challenger", tmp_path / "bundle")
    manifest = validate_bundle(bundle)
    assert manifest.model_version == version and manifest.feature_names == list(MODEL_FEATURES)
    assert 0 <= manifest.thresholds.review <= manifest.thresholds.decline <= 1
    assert manifest.training_window == {
        "train_start": "2018-04-22",
        "train_end": "2018-04-29",
        "delay_start": "2018-04-29",
        "delay_end": "2018-05-06",
        "test_start": "2018-05-06",
        "test_end": "2018-05-13",
    }
    reference = np.load(bundle / "reference_features.npy")
    assert reference.shape[1] == len(MODEL_FEATURES) and 0 < reference.shape[0] <= 2000
    # the register task's bundle artifact carries the same stamped manifest
    assert validate_bundle(result.task_dir("register") / "bundle").model_version == version

    run = registry.client().get_run(manifest.mlflow_run_id)
    assert run.data.tags["gate.decision"] == "passed"
    # ROC / PR plots and the training dataset are on the run; the version is an MLflow model
    plots = {artifact.path for artifact in registry.client().list_artifacts(run.info.run_id, "plots")}
    assert {"plots/roc_curve.png", "plots/precision_recall_curve.png"} <= plots
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["train_set"]
    assert (bundle / "MLmodel").is_file()
    assert run.data.metrics["test_average_precision"] > 0.1


@pytest.mark.slow
def test_failed_gate_stops_before_register(tiny_run):
    """A second run with an unreachable floor: nothing registered, the reason is visible."""
    from fraud import registry
    from pipelines.local_run import run_local

    before = registry.client().search_model_versions(f"name='{MODEL_NAME}'")
    result = run_local(_arguments(tiny_run, min_average_precision=0.999), tiny_run["data_dir"] / "pipeline_root")
    assert result.gate_verdict == "failed"
    assert "below the floor 0.9990" in result.gate_reason
    assert "register" not in result.tasks_run and "deploy-model" not in result.tasks_run
    assert len(registry.client().search_model_versions(f"name='{MODEL_NAME}'")) == len(before)
    runs = registry.client().search_runs(
        [registry.ensure_experiment()], filter_string="tags.`gate.decision` = 'failed'"
    )
    assert runs and "below the floor" in runs[0].data.tags["gate.reason"]
