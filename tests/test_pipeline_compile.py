"""The compiled pipeline IR: every component, parameter, wiring and the gate condition."""

from __future__ import annotations

import yaml
from google.protobuf import json_format
from kfp.pipeline_spec import pipeline_spec_pb2
from typer.testing import CliRunner

from components.base import CORE_IMAGE

COMPONENTS = {
    "ingest",
    "engineer-features",
    "build-training-set",
    "train",
    "evaluate",
    "gate",
    "register",
    "deploy-model",
    "analyse-canary",
}
PARAMETERS = {
    "data_uri",
    "data_dir",
    "mlflow_tracking_uri",
    "max_timestamp",
    "train_start",
    "train_days",
    "delay_days",
    "test_days",
    "n_validation_folds",
    "small_grid",
    "compare_baselines",
    "decline_precision",
    "review_alerts_per_day",
    "min_average_precision",
    "max_ap_drop_vs_champion",
    "max_prediction_cost_us",
    "deploy_target",
    "namespace",
    "canary_traffic_percent",
    "prometheus_url",
    "canary_window_seconds",
}


def _compile(tmp_path) -> pipeline_spec_pb2.PipelineSpec:
    from fraud.cli import app

    out = tmp_path / "pipeline.yaml"
    result = CliRunner().invoke(app, ["pipeline", "compile", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return json_format.ParseDict(yaml.safe_load(out.read_text()), pipeline_spec_pb2.PipelineSpec())


def test_components_parameters_and_images(tmp_path):
    spec = _compile(tmp_path)
    assert spec.pipeline_info.name == "fraud-training"
    assert set(spec.root.input_definitions.parameters) == PARAMETERS
    assert {"data_uri", "train_start"} == {
        name for name, p in spec.root.input_definitions.parameters.items() if not p.is_optional
    }
    components = {name.removeprefix("comp-") for name in spec.components}
    assert COMPONENTS <= components
    executors = json_format.MessageToDict(spec.deployment_spec)["executors"]
    for name in COMPONENTS:
        container = executors[f"exec-{name}"]["container"]
        assert container["image"] == CORE_IMAGE
        script = " ".join(container["command"]) + " ".join(container.get("args", []))
        assert "pip install" not in script  # nothing installed at run time


def test_wiring_and_the_gate_condition(tmp_path):
    spec = _compile(tmp_path)
    root_tasks = spec.root.dag.tasks
    assert set(root_tasks) == {
        "ingest",
        "engineer-features",
        "build-training-set",
        "train",
        "evaluate",
        "gate",
        "condition-1",
    }
    condition = root_tasks["condition-1"]
    assert condition.trigger_policy.condition == "inputs.parameter_values['pipelinechannel--gate-Output'] == 'passed'"
    inner = spec.components["comp-condition-1"].dag.tasks
    assert set(inner) == {"register", "deploy-model", "analyse-canary"}
    assert inner["deploy-model"].dependent_tasks == ["register"]
    assert inner["analyse-canary"].inputs.artifacts["rollout"].task_output_artifact.producer_task == "deploy-model"
    # the test set reaches evaluate but never train
    train_inputs = set(root_tasks["train"].inputs.artifacts)
    assert train_inputs == {"train_set", "validation_folds"}
    assert "test_set" in root_tasks["evaluate"].inputs.artifacts
    gate_inputs = root_tasks["gate"].inputs.parameters
    assert gate_inputs["prediction_cost_us"].task_output_parameter.producer_task == "train"
    assert gate_inputs["test_average_precision"].task_output_parameter.producer_task == "evaluate"
    evaluate_outputs = spec.components["comp-evaluate"].output_definitions
    assert evaluate_outputs.artifacts["classification"].artifact_type.schema_title == "system.ClassificationMetrics"
    assert evaluate_outputs.artifacts["report"].artifact_type.schema_title == "system.Markdown"


def test_run_needs_exactly_one_target(data_dir):
    from fraud.cli import app
    from fraud.errors import UserError

    runner = CliRunner()
    for args in (["pipeline", "run"], ["pipeline", "run", "--local", "--host", "http://127.0.0.1:1"]):
        result = runner.invoke(app, args)
        assert isinstance(result.exception, UserError) and "exactly one of --local or --host" in str(result.exception)
    result = runner.invoke(app, ["pipeline", "run", "--host", "http://127.0.0.1:1"])
    assert isinstance(result.exception, UserError) and "--train-start is required" in str(result.exception)
    result = runner.invoke(app, ["pipeline", "compile", "--out", str(data_dir / "x.json")])
    assert isinstance(result.exception, UserError) and ".yaml" in str(result.exception)
