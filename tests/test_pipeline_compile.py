"""The compiled pipeline IR: every component, parameter, wiring and the gate condition."""

from __future__ import annotations

import os

import yaml
from google.protobuf import json_format
from kfp.pipeline_spec import pipeline_spec_pb2
from typer.testing import CliRunner

from components.base import CORE_IMAGE
from fraud.config import PROJECT_ROOT

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
    "feature_tables_uri",
    "mlflow_tracking_uri",
    "max_timestamp",
    "train_start",
    "train_days",
    "delay_days",
    "test_days",
    "n_validation_folds",
    "legit_per_day",
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
    "rollout_policy",
    "first_deploy",
    "overlay",
}


def _compile(tmp_path) -> pipeline_spec_pb2.PipelineSpec:
    from fraud.cli import app

    out = tmp_path / "pipeline.yaml"
    result = CliRunner().invoke(app, ["pipeline", "compile", "--out", str(out)])
    assert result.exit_code == 0, result.output
    pipeline, *_ = yaml.safe_load_all(out.read_text())
    return json_format.ParseDict(pipeline, pipeline_spec_pb2.PipelineSpec())


def test_components_parameters_and_images(tmp_path):
    spec = _compile(tmp_path)
    assert spec.pipeline_info.name == "fraud-training"
    assert set(spec.root.input_definitions.parameters) == PARAMETERS
    assert {"data_uri"} == {name for name, p in spec.root.input_definitions.parameters.items() if not p.is_optional}
    components = {name.removeprefix("comp-") for name in spec.components}
    assert components >= COMPONENTS
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


def test_rollout_policy_and_overlay_reach_both_deploy_steps(tmp_path):
    """The rollout policy text (and the overlay) are pipeline parameters wired into deploy-model and
    analyse-canary; deploy-model alone gets first_deploy."""
    spec = _compile(tmp_path)
    inner = spec.components["comp-condition-1"].dag.tasks
    wired = {
        task: {
            name: p.component_input_parameter
            for name, p in inner[task].inputs.parameters.items()
            if p.component_input_parameter
        }
        for task in ("deploy-model", "analyse-canary")
    }
    for task in wired:
        assert wired[task]["rollout_policy"] == "pipelinechannel--rollout_policy"
        assert wired[task]["overlay"] == "pipelinechannel--overlay"
        assert wired[task]["target"] == "pipelinechannel--deploy_target"
    assert wired["deploy-model"]["first_deploy"] == "pipelinechannel--first_deploy"
    # and the condition group passes the root parameters through
    condition = spec.root.dag.tasks["condition-1"].inputs.parameters
    for name in ("rollout_policy", "overlay", "first_deploy"):
        assert condition[f"pipelinechannel--{name}"].component_input_parameter == name
    defaults = spec.root.input_definitions.parameters
    assert defaults["rollout_policy"].default_value.string_value == ""
    assert defaults["overlay"].default_value.string_value == "prod"


def test_legit_per_day_is_a_pipeline_parameter_wired_into_the_training_set_step(tmp_path):
    """Downsampling is turned on per run: the root parameter `legit_per_day` (default 0, off) is the
    `build-training-set` task's input of that name, and the component declares it as an integer."""
    spec = _compile(tmp_path)
    parameter = spec.root.input_definitions.parameters["legit_per_day"]
    assert parameter.is_optional and parameter.default_value.number_value == 0
    assert parameter.parameter_type == pipeline_spec_pb2.ParameterType.NUMBER_INTEGER
    task = spec.root.dag.tasks["build-training-set"]
    assert task.inputs.parameters["legit_per_day"].component_input_parameter == "legit_per_day"
    component = spec.components[task.component_ref.name]
    declared = component.input_definitions.parameters["legit_per_day"]
    assert declared.parameter_type == pipeline_spec_pb2.ParameterType.NUMBER_INTEGER
    # no other task takes it: only the training frames are sampled
    others = [name for name, t in spec.root.dag.tasks.items() if name != "build-training-set"]
    assert not [name for name in others if "legit_per_day" in spec.root.dag.tasks[name].inputs.parameters]


def test_run_passes_legit_per_day_and_refuses_a_negative_one_in_one_line(data_dir, monkeypatch, capsys):
    import pytest

    from fraud import cli
    from fraud.commands import pipeline as pipeline_command

    captured: dict = {}
    monkeypatch.setattr(pipeline_command, "_raw_days", lambda uri: ["2018-04-01"])
    monkeypatch.setattr("fraud.training.steps.latest_train_start", lambda days, *a: "2018-04-01", raising=True)
    monkeypatch.setattr(pipeline_command, "_run_local", lambda arguments, *a: captured.update(arguments))
    cli.main(["pipeline", "run", "--local", "--deploy-target", "record", "--legit-per-day", "1000"])
    assert captured["legit_per_day"] == 1000
    captured.clear()
    cli.main(["pipeline", "run", "--local", "--deploy-target", "record"])
    assert captured["legit_per_day"] == 0  # off unless asked for
    captured.clear()
    capsys.readouterr()
    for target in (["--local"], ["--host", "http://127.0.0.1:9", "--feature-tables-uri", "s3://b/f"]):
        with pytest.raises(SystemExit) as exited:
            cli.main(["pipeline", "run", *target, "--legit-per-day", "-5"])
        assert exited.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == ["error: --legit-per-day must be >= 0 (0 keeps every legitimate transaction), got -5"], err
    assert not captured


def test_run_policy_file_and_default_target(data_dir, tmp_path, monkeypatch):
    """`fraud pipeline run` reads --rollout-policy (a bad file is a one-line error before anything
    runs), defaults to a canary target and says which in its output."""
    from fraud.cli import app
    from fraud.commands import pipeline as pipeline_command
    from fraud.errors import UserError

    runner = CliRunner()
    bad = tmp_path / "policy.yaml"
    bad.write_text("apiVersion: fraud.platform/v1\nkind: RolloutPolicy\nsteps: [{percent: 150, windowSeconds: 5}]\n")
    result = runner.invoke(app, ["pipeline", "run", "--local", "--rollout-policy", str(bad)])
    assert isinstance(result.exception, UserError) and "--rollout-policy" in str(result.exception)
    result = runner.invoke(app, ["pipeline", "run", "--local", "--rollout-policy", str(tmp_path / "absent.yaml")])
    assert isinstance(result.exception, UserError) and "cannot read rollout policy" in str(result.exception)
    result = runner.invoke(app, ["pipeline", "run", "--local", "--deploy-target", "staging"])
    assert isinstance(result.exception, UserError) and "--deploy-target must be one of" in str(result.exception)

    captured = {}
    monkeypatch.setattr(pipeline_command, "_raw_days", lambda uri: ["2018-04-01"])
    monkeypatch.setattr("fraud.training.steps.latest_train_start", lambda days, *a: "2018-04-01", raising=True)
    monkeypatch.setattr(pipeline_command, "_run_local", lambda arguments, *a: captured.update(arguments))
    policy = PROJECT_ROOT / "kustomize" / "overlays" / "prod" / "rollout-policy.yaml"
    result = runner.invoke(app, ["pipeline", "run", "--local", "--rollout-policy", str(policy), "--first-deploy"])
    assert result.exit_code == 0, result.output
    assert captured["deploy_target"] == "local" and captured["first_deploy"] is True
    assert captured["rollout_policy"] == policy.read_text()
    assert f"deploy step: target local, canary (policy {policy})" in result.output
    result = runner.invoke(app, ["pipeline", "run", "--local", "--deploy-target", "record"])
    assert result.exit_code == 0, result.output
    assert captured["deploy_target"] == "record" and captured["rollout_policy"] == ""
    assert "target record (no canary" in result.output


def test_run_needs_exactly_one_target(data_dir):
    from fraud.cli import app
    from fraud.errors import UserError

    runner = CliRunner()
    for args in (["pipeline", "run"], ["pipeline", "run", "--local", "--host", "http://127.0.0.1:1"]):
        result = runner.invoke(app, args)
        assert isinstance(result.exception, UserError) and "exactly one of --local or --host" in str(result.exception)
    result = runner.invoke(app, ["pipeline", "run", "--host", "http://127.0.0.1:1"])
    # with --host the tasks share no disk: the offline tables need an object-store folder
    assert isinstance(result.exception, UserError) and "--feature-tables-uri" in str(result.exception)
    result = runner.invoke(app, ["pipeline", "compile", "--out", str(data_dir / "x.json")])
    assert isinstance(result.exception, UserError) and ".yaml" in str(result.exception)


def _platform(tmp_path) -> dict:
    from fraud.cli import app

    out = tmp_path / "pipeline.yaml"
    result = CliRunner().invoke(app, ["pipeline", "compile", "--out", str(out)])
    assert result.exit_code == 0, result.output
    documents = list(yaml.safe_load_all(out.read_text()))
    assert len(documents) == 2, "the IR must carry a Kubernetes platform spec"
    return documents[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def _env_of(executor: dict) -> dict[str, tuple[str, str, bool]]:
    """env var -> (kind, source name, optional) from the executor's platform config."""
    env = {}
    for entry in executor.get("secretAsEnv", []):
        for pair in entry["keyToEnv"]:
            env[pair["envVar"]] = ("secret", entry["secretName"], entry.get("optional", False))
    for entry in executor.get("configMapAsEnv", []):
        for pair in entry["keyToEnv"]:
            env[pair["envVar"]] = ("configmap", entry["configMapName"], entry.get("optional", False))
    return env


def test_platform_config_secrets_scratch_and_deployer_token(tmp_path):
    executors = _platform(tmp_path)
    assert set(executors) == {f"exec-{name}" for name in COMPONENTS}
    services = {
        "object store": {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"},
        "feast registry": {"FRAUD_FEAST_REGISTRY_URL"},
        "redis": {"FRAUD_REDIS_PASSWORD"},
        "mlflow": {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"},
    }
    uses = {
        "ingest": {"object store"},
        "engineer-features": {"object store", "feast registry", "redis"},
        "build-training-set": {"object store"},
        "train": {"mlflow"},
        "evaluate": {"mlflow"},
        "gate": {"mlflow"},
        "register": {"mlflow"},
        "deploy-model": {"mlflow"},
        "analyse-canary": {"mlflow"},
    }
    for name, used in uses.items():
        executor = executors[f"exec-{name}"]
        env = _env_of(executor)
        secret_env = {var for var, (kind, _, _) in env.items() if kind == "secret"}
        assert secret_env == set().union(*(services[s] for s in used)), name
        # every task: the non-secret settings from the pipeline ConfigMap, its own scratch disk
        for var in ("FRAUD_DATA_DIR", "FRAUD_FEAST_ONLINE", "FRAUD_FEAST_REGISTRY", "MLFLOW_TRACKING_URI"):
            assert env[var] == ("configmap", "fraud-pipeline-config", False), (name, var)
        assert env["AWS_ENDPOINT_URL"] == ("configmap", "fraud-pipeline-config", True)
        assert executor["emptyDirMounts"] == [{"mountPath": "/scratch", "volumeName": "scratch"}]
        # the deployer's token only where the InferenceService is changed
        volumes = [v["secretName"] for v in executor.get("secretAsVolume", [])]
        assert volumes == (["fraud-deployer-token"] if name in {"deploy-model", "analyse-canary"} else []), name
    assert not any(
        "serviceAccount" in str(executor) or "service_account" in str(executor) for executor in executors.values()
    )


def test_resources_retries_and_caching(tmp_path):
    from pipelines import platform

    spec = _compile(tmp_path)
    executors = json_format.MessageToDict(spec.deployment_spec)["executors"]
    for name in COMPONENTS:
        resources = executors[f"exec-{name}"]["container"]["resources"]
        assert resources["resourceCpuRequest"] and resources["resourceCpuLimit"], name
        assert resources["resourceMemoryRequest"] and resources["resourceMemoryLimit"], name
        assert float(resources["cpuRequest"]) <= float(resources["cpuLimit"])
        assert float(resources["memoryRequest"]) <= float(resources["memoryLimit"])
    tasks = dict(spec.root.dag.tasks)
    tasks.update(spec.components["comp-condition-1"].dag.tasks)
    retried = {name for name, task in tasks.items() if task.HasField("retry_policy")}
    assert retried == {"ingest", "engineer-features", "build-training-set", "evaluate", "gate"}
    for name in retried:
        policy = tasks[name].retry_policy
        assert policy.max_retry_count == platform.RETRIES
        assert policy.backoff_duration.seconds == 30 and policy.backoff_factor == 2.0
        assert policy.backoff_max_duration.seconds == 600
    uncached = {name for name, task in tasks.items() if name in COMPONENTS and not task.caching_options.enable_cache}
    assert {"register", "deploy-model", "analyse-canary", "engineer-features", "gate"} == uncached


def test_image_comes_from_one_setting_and_can_be_pinned_by_digest(tmp_path):
    """FRAUD_CORE_IMAGE is read when the components are defined: compile in a fresh interpreter."""
    import subprocess
    import sys

    pinned = "registry.example.com/fraud/fraud-core@sha256:" + "ab" * 32
    out = tmp_path / "pinned.yaml"
    env = {**os.environ, "FRAUD_CORE_IMAGE": pinned}
    code = f"from pipelines.training_pipeline import compile_pipeline; compile_pipeline({str(out)!r})"
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=300)
    ir = yaml.safe_load(out.read_text().split("\n---\n")[0])
    images = {executor["container"]["image"] for executor in ir["deploymentSpec"]["executors"].values()}
    assert images == {pinned}
    bad = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        env={**env, "FRAUD_CORE_IMAGE": "fraud-core"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode != 0 and "not an image reference with a tag or a digest" in bad.stderr


def test_no_pipeline_parameter_is_a_local_directory(tmp_path):
    spec = _compile(tmp_path)
    parameters = spec.root.input_definitions.parameters
    assert not any("dir" in name or "path" in name for name in parameters)
    assert "feature_tables_uri" in parameters and "data_uri" in parameters


def test_daily_feature_pipeline_materialises_incrementally(tmp_path):
    from pipelines.feature_pipeline import compile_feature_pipeline

    out = tmp_path / "features.yaml"
    compile_feature_pipeline(str(out))
    pipeline, platform = yaml.safe_load_all(out.read_text())
    spec = json_format.ParseDict(pipeline, pipeline_spec_pb2.PipelineSpec())
    assert spec.pipeline_info.name == "fraud-features"
    assert set(spec.root.dag.tasks) == {"ingest", "engineer-features"}
    assert set(spec.root.input_definitions.parameters) == {"data_uri", "feature_tables_uri", "max_timestamp"}
    features = spec.root.dag.tasks["engineer-features"]
    assert features.inputs.parameters["incremental"].runtime_value.constant.bool_value is True
    assert not features.caching_options.enable_cache
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    secrets = {e["secretName"] for e in executors["exec-engineer-features"]["secretAsEnv"]}
    assert secrets == {"fraud-object-store", "fraud-feast-registry", "fraud-redis"}


def test_deploy_steps_build_their_kubernetes_client_from_the_mounted_deployer_token(tmp_path, monkeypatch):
    from kubernetes import client, config

    from components.base import deployer_kubeconfig

    assert deployer_kubeconfig("") is None and deployer_kubeconfig(str(tmp_path / "absent")) is None
    (tmp_path / "token").write_text("deployer-token")
    (tmp_path / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    path = deployer_kubeconfig(str(tmp_path))
    configuration = client.Configuration()
    config.load_kube_config(config_file=path, client_configuration=configuration)
    assert configuration.host == "https://10.96.0.1:443"
    assert configuration.api_key["authorization"] == "Bearer deployer-token"
    assert configuration.ssl_ca_cert == str(tmp_path / "ca.crt")


def test_default_core_image_is_defined_once_and_is_the_manifests():
    """Components, the rollout and manifests/ agree on the core image the project ships."""
    from fraud.deploy import kserve_rollout
    from fraud.settings import Settings

    assert Settings.model_fields["core_image"].default == kserve_rollout.DEFAULT_CORE_IMAGE
    manifest = yaml.safe_load((PROJECT_ROOT / "manifests" / "inferenceservice.yaml").read_text())
    images = {c["name"]: c["image"] for c in manifest["spec"]["predictor"]["containers"]}
    assert images[kserve_rollout.PREDICTOR_CONTAINER] == kserve_rollout.DEFAULT_CORE_IMAGE
