"""`fraud pipeline run --host`, `upload` and `schedule` against a loopback stand-in of the KFP
API (tests/support/kfp_api.py) that checks every request against the kfp_server_api models."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from fraud.cli import app
from tests.support.kfp_api import kfp_api

TOKEN = "s3cr3t-token"


@pytest.fixture
def api(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    with kfp_api(token=TOKEN) as (url, state):
        yield url, state, token_file


class _Outcome:
    """The CLI's exit code and what it told the user (a UserError is printed by `fraud.cli.main`)."""

    def __init__(self, result) -> None:
        from fraud.errors import UserError

        self.exit_code = result.exit_code
        self.output = result.output
        if isinstance(result.exception, UserError):
            self.output += f"error: {result.exception}\n"
        elif result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception


def _invoke(*args: str) -> _Outcome:
    return _Outcome(CliRunner().invoke(app, list(args)))


def test_run_submits_to_the_namespace_experiment_and_service_account(api):
    url, state, token_file = api
    result = _invoke(
        "pipeline", "run", "--host", url, "--token-file", str(token_file), "--namespace", "team-fraud",
        "--experiment", "nightly", "--service-account", "pipeline-runner", "--data-uri", "s3://fraud/raw",
        "--feature-tables-uri", "s3://fraud/features", "--train-start", "2018-07-25", "--legit-per-day", "2000",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (experiment,) = state.experiments.values()
    assert experiment["display_name"] == "nightly" and experiment["namespace"] == "team-fraud"
    (run,) = state.runs.values()
    assert run["experiment_id"] == experiment["experiment_id"]
    assert run["service_account"] == "pipeline-runner"
    spec = run["pipeline_spec"]
    assert spec["pipeline_spec"]["pipelineInfo"]["name"] == "fraud-training"
    assert "kubernetes" in spec["platform_spec"]["platforms"]  # the platform config travels with the run
    parameters = run["runtime_config"]["parameters"]
    assert parameters["data_uri"] == "s3://fraud/raw" and parameters["feature_tables_uri"] == "s3://fraud/features"
    assert parameters["train_start"] == "2018-07-25"
    assert parameters["legit_per_day"] == 2000  # a declared input of the pipeline (the stand-in checks)
    assert run["run_id"] in result.output


PIPELINES = {"fraud-training", "fraud-features", "fraud-features-spark"}


def _version_inputs(state, pipeline_name: str) -> set[str]:
    """The root input parameters of the latest uploaded version of `pipeline_name`."""
    (pipeline_id,) = [p["pipeline_id"] for p in state.pipelines.values() if p["display_name"] == pipeline_name]
    version = max(
        (v for v in state.versions.values() if v["pipeline_id"] == pipeline_id), key=lambda v: v["created_at"]
    )
    spec = version["pipeline_spec"]
    return set(spec["root"]["inputDefinitions"]["parameters"])


def test_upload_creates_pipelines_then_versions(api):
    url, state, token_file = api
    first = _invoke("pipeline", "upload", "--host", url, "--token-file", str(token_file))
    assert first.exit_code == 0, first.output
    assert {p["display_name"] for p in state.pipelines.values()} == PIPELINES
    assert len(state.versions) == 3
    # each name carries its own pipeline: the Spark variant submits a SparkApplication
    assert {"namespace", "executor_instances", "executor_memory"} <= _version_inputs(state, "fraud-features-spark")
    assert "data_uri" in _version_inputs(state, "fraud-features")
    assert "legit_per_day" in _version_inputs(state, "fraud-training")
    for name in PIPELINES:
        assert f"{name}: new pipeline" in first.output
    second = _invoke("pipeline", "upload", "--host", url, "--token-file", str(token_file), "--version", "v2")
    assert second.exit_code == 0, second.output
    assert len(state.pipelines) == 3 and len(state.versions) == 6
    assert {v["display_name"] for v in state.versions.values()} >= {f"v2-{name}" for name in PIPELINES}
    assert "new version v2-fraud-training" in second.output
    assert "new version v2-fraud-features-spark" in second.output
    # the same version name again is refused by the API: one line, non-zero exit
    third = _invoke("pipeline", "upload", "--host", url, "--token-file", str(token_file), "--version", "v2")
    assert third.exit_code != 0 and "HTTP 409" in third.output


def _schedule(url: str, token_file, *extra: str) -> _Outcome:
    return _invoke(
        "pipeline", "schedule", "--host", url, "--token-file", str(token_file), "--data-uri", "s3://fraud/raw",
        "--feature-tables-uri", "s3://fraud/features", *extra,
    )  # fmt: skip


def test_schedule_creates_daily_features_and_weekly_retraining(api):
    url, state, token_file = api
    result = _schedule(url, token_file, "--service-account", "pipeline-runner")
    assert result.exit_code == 0, result.output
    by_name = {r["display_name"]: r for r in state.recurring_runs.values()}
    assert set(by_name) == {"fraud-features-daily", "fraud-retrain-weekly"}
    pipelines = {p["pipeline_id"]: p["display_name"] for p in state.pipelines.values()}
    daily, weekly = by_name["fraud-features-daily"], by_name["fraud-retrain-weekly"]
    assert pipelines[daily["pipeline_version_reference"]["pipeline_id"]] == "fraud-features"
    assert pipelines[weekly["pipeline_version_reference"]["pipeline_id"]] == "fraud-training"
    assert daily["trigger"]["cron_schedule"]["cron"] == "0 30 1 * * *"
    assert weekly["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * 1"
    for recurring in (daily, weekly):
        assert recurring["mode"] == "ENABLE" and recurring["no_catchup"] is True
        assert int(recurring["max_concurrency"]) == 1 and recurring["service_account"] == "pipeline-runner"
    assert daily["runtime_config"]["parameters"] == {
        "data_uri": "s3://fraud/raw",
        "feature_tables_uri": "s3://fraud/features",
    }
    assert weekly["runtime_config"]["parameters"]["deploy_target"] == "kubernetes"
    bad = _schedule(url, token_file, "--retrain-cron", "0 3 * * 1")
    assert bad.exit_code != 0 and "six fields" in bad.output


def test_schedule_uploads_all_three_pipelines_and_the_default_engine_is_duckdb(api):
    url, state, token_file = api
    result = _schedule(url, token_file)
    assert result.exit_code == 0, result.output
    assert {p["display_name"] for p in state.pipelines.values()} == PIPELINES
    pipelines = {p["pipeline_id"]: p["display_name"] for p in state.pipelines.values()}
    daily = next(r for r in state.recurring_runs.values() if r["display_name"] == "fraud-features-daily")
    assert pipelines[daily["pipeline_version_reference"]["pipeline_id"]] == "fraud-features"
    assert "fraud-features-daily: cron '0 30 1 * * *' -> fraud-features " in result.output


def test_schedule_with_the_spark_engine_runs_the_spark_feature_pipeline_daily(api):
    url, state, token_file = api
    result = _schedule(
        url, token_file, "--feature-engine", "spark", "--serving-namespace", "fraud-prod",
        "--spark-executors", "8", "--spark-executor-memory", "16g", "--service-account", "pipeline-runner",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    by_name = {r["display_name"]: r for r in state.recurring_runs.values()}
    assert set(by_name) == {"fraud-features-daily", "fraud-retrain-weekly"}
    pipelines = {p["pipeline_id"]: p["display_name"] for p in state.pipelines.values()}
    daily, weekly = by_name["fraud-features-daily"], by_name["fraud-retrain-weekly"]
    reference = daily["pipeline_version_reference"]
    assert pipelines[reference["pipeline_id"]] == "fraud-features-spark"
    assert pipelines[weekly["pipeline_version_reference"]["pipeline_id"]] == "fraud-training"
    # the Spark pipeline's parameters: the SparkApplication's namespace (default: the serving
    # namespace, where the overlays put the fraud-spark-* accounts), no data_uri (it reads the data volume)
    assert daily["runtime_config"]["parameters"] == {
        "namespace": "fraud-prod",
        "feature_tables_uri": "s3://fraud/features",
        "executor_instances": 8,
        "executor_memory": "16g",
    }
    version = state.versions[reference["pipeline_version_id"]]
    assert version["pipeline_spec"]["pipelineInfo"]["name"] == "fraud-features-spark"
    assert daily["trigger"]["cron_schedule"]["cron"] == "0 30 1 * * *" and daily["service_account"] == "pipeline-runner"
    assert "-> fraud-features-spark " in result.output
    # an explicit namespace wins; without executor settings the pipeline's defaults apply
    state.recurring_runs.clear()
    result = _schedule(url, token_file, "--feature-engine", "spark", "--spark-namespace", "spark-jobs")
    assert result.exit_code == 0, result.output
    daily = next(r for r in state.recurring_runs.values() if r["display_name"] == "fraud-features-daily")
    assert daily["runtime_config"]["parameters"] == {
        "namespace": "spark-jobs",
        "feature_tables_uri": "s3://fraud/features",
    }


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--feature-engine", "pandas"], "error: --feature-engine must be one of duckdb, spark, got 'pandas'"),
        (["--feature-engine", "Spark"], "error: --feature-engine must be one of duckdb, spark, got 'Spark'"),
        (
            ["--feature-engine", "spark", "--spark-executors", "0"],
            "error: --spark-executors must be a positive integer",
        ),
        (
            ["--feature-engine", "spark", "--spark-executor-memory", "lots"],
            "error: --spark-executor-memory must be like",
        ),
        (["--feature-engine", "spark", "--spark-namespace", "Fraud_Prod"], "error: --spark-namespace 'Fraud_Prod'"),
        (["--spark-executors", "4"], "error: --spark-namespace, --spark-executors and --spark-executor-memory go with"),
    ],
)
def test_schedule_refuses_a_bad_feature_engine_in_one_line_with_exit_2(api, capsys, extra, message):
    """From the console entry point: one line on stderr, exit code 2, nothing uploaded or scheduled."""
    from fraud import cli

    url, state, token_file = api
    args = ["pipeline", "schedule", "--host", url, "--token-file", str(token_file), "--data-uri", "s3://fraud/raw"]
    args += ["--feature-tables-uri", "s3://fraud/features", *extra]
    with pytest.raises(SystemExit) as exited:
        cli.main(args)
    assert exited.value.code == 2
    captured = capsys.readouterr()
    lines = (captured.out + captured.err).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), lines
    assert not state.pipelines and not state.recurring_runs


def test_unreachable_api_is_one_line_and_non_zero_exit_from_the_real_command(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    fraud = Path(sys.executable).parent / "fraud"
    args = ["pipeline", "run", "--host", "http://127.0.0.1:9", "--train-start", "2018-07-25"]
    args += ["--data-uri", "s3://b/raw", "--feature-tables-uri", "s3://b/f"]
    done = subprocess.run([str(fraud), *args], check=False, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode != 0
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert len(lines) == 1 and "cannot connect" in lines[0] and "127.0.0.1:9" in lines[0], lines


def test_refusals_are_one_line(api, tmp_path):
    url, state, _ = api
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-token")
    cases = [
        (["--host", url, "--token-file", str(wrong)], "HTTP 401"),
        (["--host", "http://127.0.0.1:9"], "cannot connect"),
        (["--host", url, "--token-file", str(tmp_path / "missing")], "cannot read the token file"),
    ]
    for extra, expected in cases:
        result = _invoke(
            "pipeline", "run", *extra, "--data-uri", "s3://fraud/raw", "--feature-tables-uri", "s3://fraud/f",
        )  # fmt: skip
        assert result.exit_code != 0, result.output
        assert expected in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
    assert not state.runs


def test_the_stand_in_refuses_what_the_api_refuses(api):
    import httpx

    url, _, _ = api
    headers = {"Authorization": f"Bearer {TOKEN}"}
    bad_field = httpx.post(
        f"{url}/apis/v2beta1/experiments", json={"display_name": "x", "colour": "red"}, headers=headers
    )
    assert bad_field.status_code == 400 and "unknown field" in bad_field.json()["error"]
    no_spec = httpx.post(f"{url}/apis/v2beta1/runs", json={"display_name": "r"}, headers=headers)
    assert no_spec.status_code == 400
    unknown_param = httpx.post(
        f"{url}/apis/v2beta1/runs",
        json={
            "display_name": "r",
            "pipeline_spec": {"pipelineInfo": {"name": "p"}, "root": {"dag": {"tasks": {"t": {}}}}},
            "runtime_config": {"parameters": {"nope": 1}},
        },
        headers=headers,
    )
    assert unknown_param.status_code == 400 and "no input parameter" in unknown_param.json()["error"]
    assert httpx.get(f"{url}/apis/v1beta1/runs", headers=headers).status_code == 404
    assert httpx.get(f"{url}/apis/v2beta1/healthz").status_code == 401


def test_run_isolated_needs_the_object_store_and_a_tracking_server(data_dir, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = _invoke("pipeline", "run", "--local", "--isolated", "--train-start", "2018-04-22")
    assert result.exit_code != 0 and "--feature-tables-uri" in result.output
    result = _invoke(
        "pipeline", "run", "--local", "--isolated", "--feature-tables-uri", "s3://b/f", "--train-start", "2018-04-22"
    )
    assert result.exit_code != 0 and "MLflow tracking server" in result.output
    result = _invoke("pipeline", "run", "--host", "http://127.0.0.1:9", "--data-uri", "s3://b/raw")
    assert result.exit_code != 0 and "--feature-tables-uri" in result.output


def test_token_from_file_else_the_pods_service_account(tmp_path):
    from fraud.errors import UserError
    from pipelines.remote import read_token

    in_cluster = tmp_path / "serviceaccount-token"
    assert read_token(None, in_cluster=in_cluster) is None  # outside a pod: no token
    in_cluster.write_text("pod-token\n")
    assert read_token(None, in_cluster=in_cluster) == "pod-token"
    explicit = tmp_path / "token"
    explicit.write_text("user-token")
    assert read_token(explicit, in_cluster=in_cluster) == "user-token"
    explicit.write_text("  \n")
    with pytest.raises(UserError, match="is empty"):
        read_token(explicit, in_cluster=in_cluster)
