"""`fraud pipeline`: compile the training pipeline, run it locally (kfp.local) or on a cluster, upload
it and the feature pipelines and schedule them."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from fraud import atomic
from fraud.errors import UserError

pipeline_app = typer.Typer(help="The training and feature pipelines (Kubeflow Pipelines v2).", no_args_is_help=True)

DEFAULT_IR_FILE = "fraud-training-pipeline.yaml"


@pipeline_app.command("compile")
def compile_command(
    out: Annotated[Path, typer.Option("--out", help="Where to write the pipeline IR YAML.")] = Path(DEFAULT_IR_FILE),
) -> None:
    """Compile the training pipeline to KFP IR YAML (upload it in the KFP UI or with `run --host`)."""
    from pipelines.training_pipeline import compile_pipeline

    out = out.resolve()
    if out.suffix not in (".yaml", ".yml"):
        raise UserError(f"--out must end with .yaml or .yml, got {out.name}")
    with atomic.replacing(out, suffix=out.suffix) as tmp:
        compile_pipeline(str(tmp))
    typer.echo(f"wrote {out}")


def _raw_days(data_uri: str) -> list[str]:
    from fraud.training.steps import partition_days

    root = Path(data_uri.removeprefix("file://"))
    tx = root / "transactions" if (root / "transactions").is_dir() else root
    days = partition_days(tx)
    if not days:
        raise UserError(f"cannot infer --train-start: no day=YYYY-MM-DD partitions under {tx}; pass --train-start")
    return days


@contextlib.contextmanager
def _output_to(log_path: Path):
    """Send this process's and its subprocesses' stdout/stderr (kfp's task logs) to `log_path`;
    yields a stream on the original stderr for the progress display."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(2), "w", buffering=1)
    with open(log_path, "ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield terminal
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved_out, 1)
            os.dup2(saved_err, 2)
            os.close(saved_out)
            os.close(saved_err)
            terminal.close()


def _watch(pipeline_root: Path, before: set[str], progress, task_ids: dict, stop: threading.Event) -> None:
    """Mark tasks done as their executor_output.json appears (kfp.local runs them in order)."""
    from pipelines.local_run import TASKS

    while not stop.is_set():
        runs = [p for p in pipeline_root.iterdir() if p.is_dir() and p.name not in before]
        if runs:
            run_dir = max(runs, key=lambda p: p.stat().st_mtime)
            for task in TASKS:
                if (run_dir / task / "executor_output.json").is_file():
                    progress.update(task_ids[task], completed=1, description=f"[green]✓ {task}")
                elif (run_dir / task).is_dir():
                    progress.update(task_ids[task], description=f"[yellow]… {task}")
        stop.wait(1.0)


@pipeline_app.command("run")
def run_command(
    local: Annotated[
        bool, typer.Option("--local", help="Run with kfp.local (subprocesses of this environment).")
    ] = False,
    isolated: Annotated[
        bool,
        typer.Option(
            "--isolated",
            help="With --local: each task in its own empty working/home/temp/data directory, seeing only the "
            "service settings (object store, Feast registry, Redis, MLflow server) from this environment.",
        ),
    ] = False,
    host: Annotated[str, typer.Option("--host", help="KFP API endpoint to submit the run to (kfp.Client).")] = "",
    namespace: Annotated[
        str, typer.Option("--namespace", help="Kubeflow profile namespace of the run (multi-user installs).")
    ] = "",
    service_account: Annotated[
        str, typer.Option("--service-account", help="ServiceAccount the run's pods use (with --host).")
    ] = "",
    token_file: Annotated[
        Path | None,
        typer.Option(
            "--token-file", help="Bearer token for the KFP API. Default: the pod's ServiceAccount token, if any."
        ),
    ] = None,
    feature_tables_uri: Annotated[
        str,
        typer.Option(
            "--feature-tables-uri",
            help="Object-store folder of the Feast offline tables (s3://bucket/prefix). Required with --host and "
            "--isolated; default for --local: the data directory (shared by every task).",
        ),
    ] = "",
    data_uri: Annotated[
        str,
        typer.Option(
            "--data-uri", help="Raw transactions (path, file://, gs://, s3://). Default: the data dir's raw folder."
        ),
    ] = "",
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir", help="Data directory of the run (features, Feast, MLflow). Default: FRAUD_DATA_DIR."
        ),
    ] = None,
    train_start: Annotated[
        str,
        typer.Option("--train-start", help="First training day YYYY-MM-DD. Default: the latest that fits the data."),
    ] = "",
    train_days: Annotated[int, typer.Option("--train-days", min=1, help="Days in the training window.")] = 7,
    delay_days: Annotated[
        int, typer.Option("--delay-days", min=0, help="Gap between training and test windows (label delay).")
    ] = 7,
    test_days: Annotated[int, typer.Option("--test-days", min=1, help="Days in the test window.")] = 7,
    validation_folds: Annotated[
        int, typer.Option("--validation-folds", help="Prequential validation folds (earlier weeks).")
    ] = 3,
    legit_per_day: Annotated[
        int,
        typer.Option(
            "--legit-per-day",
            help="Keep at most N legitimate transactions per training day (every fraud kept, weighted back); "
            "0 keeps everything.",
        ),
    ] = 0,
    small_grid: Annotated[bool, typer.Option("--small-grid", help="One grid point per family (smoke runs).")] = False,
    compare_baselines: Annotated[
        bool, typer.Option("--compare-baselines", help="Also select and score LR / RF.")
    ] = False,
    min_ap: Annotated[float, typer.Option("--min-ap", help="Gate: test average-precision floor.")] = 0.5,
    max_ap_drop: Annotated[
        float, typer.Option("--max-ap-drop", help="Gate: tolerated AP drop vs the champion.")
    ] = 0.02,
    max_cost_us: Annotated[
        float, typer.Option("--max-cost-us", help="Gate: per-transaction prediction cost budget (µs).")
    ] = 2000.0,
    deploy_target: Annotated[
        str,
        typer.Option(
            "--deploy-target",
            help="kubernetes (KServe canary; default with --host) | local (canary through the local router; "
            "default with --local) | record (a test target: no canary, moves champion)",
        ),
    ] = "",
    rollout_policy_file: Annotated[
        Path | None,
        typer.Option(
            "--rollout-policy",
            help="Rollout policy file (steps, windows, checks), e.g. kustomize/overlays/prod/rollout-policy.yaml. "
            "Default: one step at --canary-percent for --canary-window.",
        ),
    ] = None,
    first_deploy: Annotated[
        bool, typer.Option("--first-deploy", help="Nothing serves yet: the deploy step goes straight to 100 %.")
    ] = False,
    overlay: Annotated[
        str,
        typer.Option(
            "--overlay", help="Kustomize overlay (dev | staging | prod) a first Kubernetes deployment creates."
        ),
    ] = "prod",
    serving_namespace: Annotated[
        str,
        typer.Option(
            "--serving-namespace", help="Kubernetes namespace of the InferenceService (deploy target kubernetes)."
        ),
    ] = "fraud",
    canary_percent: Annotated[
        int, typer.Option("--canary-percent", min=1, max=100, help="Share of traffic the new version gets as a canary.")
    ] = 10,
    prometheus_url: Annotated[
        str,
        typer.Option(
            "--prometheus-url", help="Prometheus HTTP API for the canary analysis (deploy target kubernetes)."
        ),
    ] = "",
    canary_window: Annotated[int, typer.Option("--canary-window", help="Canary analysis window (seconds).")] = 600,
    mlflow_tracking_uri: Annotated[
        str, typer.Option("--mlflow-tracking-uri", help="Default: MLFLOW_TRACKING_URI or the local SQLite store.")
    ] = "",
    experiment: Annotated[str, typer.Option("--experiment", help="KFP experiment name (with --host).")] = "fraud",
) -> None:
    """Run the training pipeline: `--local` here, or `--host URL` on a Kubeflow Pipelines cluster."""
    if local == bool(host):
        raise UserError("choose exactly one of --local or --host URL")
    if isolated and not local:
        raise UserError("--isolated goes with --local")
    if legit_per_day < 0:
        raise UserError(f"--legit-per-day must be >= 0 (0 keeps every legitimate transaction), got {legit_per_day}")
    if (host or isolated) and not feature_tables_uri:
        raise UserError(
            "--feature-tables-uri (s3://bucket/prefix) is required with --host and --isolated: tasks share no disk"
        )
    deploy_target = _deploy_target(deploy_target, local)
    rollout_policy = _rollout_policy_text(rollout_policy_file)
    from fraud import registry
    from fraud.settings import current

    settings = current()
    if data_dir is not None:
        settings = settings.with_data_dir(data_dir)
    layout = settings.layout
    data_uri = data_uri or str(layout.raw)
    if not train_start and local and not isolated:
        from fraud.training.steps import latest_train_start

        train_start = latest_train_start(_raw_days(data_uri), train_days, delay_days, test_days)
    if isolated:
        mlflow_tracking_uri = mlflow_tracking_uri or settings.mlflow_tracking_uri or ""
        if not mlflow_tracking_uri.startswith(("http://", "https://")):
            raise UserError(
                "--isolated needs an MLflow tracking server (--mlflow-tracking-uri or MLFLOW_TRACKING_URI http(s)://): "
                "a task's own disk is gone when it ends"
            )
    arguments = {
        "data_uri": data_uri,
        "train_start": train_start,
        "feature_tables_uri": feature_tables_uri,
        "mlflow_tracking_uri": mlflow_tracking_uri or (registry.tracking_uri(settings) if local else ""),
        "train_days": train_days,
        "delay_days": delay_days,
        "test_days": test_days,
        "n_validation_folds": validation_folds,
        "legit_per_day": legit_per_day,
        "small_grid": small_grid,
        "compare_baselines": compare_baselines,
        "min_average_precision": min_ap,
        "max_ap_drop_vs_champion": max_ap_drop,
        "max_prediction_cost_us": max_cost_us,
        "deploy_target": deploy_target,
        "namespace": serving_namespace,
        "canary_traffic_percent": canary_percent,
        "prometheus_url": prometheus_url,
        "canary_window_seconds": canary_window,
        "rollout_policy": rollout_policy,
        "first_deploy": first_deploy,
        "overlay": overlay,
    }
    plan = _deploy_plan(deploy_target, rollout_policy_file, canary_percent, canary_window)
    if host:
        from pipelines.remote import Endpoint, read_token, submit_run
        from pipelines.training_pipeline import training_pipeline

        endpoint = Endpoint(host, namespace, read_token(token_file))
        arguments = {k: v for k, v in arguments.items() if v != ""}
        run_id = submit_run(
            endpoint, training_pipeline, arguments, experiment=experiment, service_account=service_account
        )
        typer.echo(f"submitted run {run_id} to {host} (experiment {experiment}); {plan}")
        return
    typer.echo(plan, err=True)
    _run_local(arguments, settings, isolated)


def _deploy_target(target: str, local: bool) -> str:
    """The deploy step goes through a canary unless told otherwise: `local` for --local runs,
    `kubernetes` for cluster runs."""
    from fraud.deploy.state import TARGETS

    target = target or ("local" if local else "kubernetes")
    if target not in TARGETS:
        raise UserError(f"--deploy-target must be one of {', '.join(TARGETS)}, got {target!r}")
    return target


def _rollout_policy_text(path: Path | None) -> str:
    """The policy file's text, validated here so a bad file fails before the run starts."""
    from fraud.deploy.policy import PolicyError, load_policy

    if path is None:
        return ""
    try:
        load_policy(path)
    except PolicyError as exc:
        raise UserError(f"--rollout-policy: {exc}") from None
    return path.read_text()


def _deploy_plan(target: str, policy_file: Path | None, canary_percent: int, canary_window: int) -> str:
    if target == "record":
        return "deploy step: target record (no canary: a passing version becomes champion directly)"
    how = f"policy {policy_file}" if policy_file else f"{canary_percent}% for {canary_window}s"
    return f"deploy step: target {target}, canary ({how})"


def _isolation(settings):
    from pipelines.local_run import Isolation
    from pipelines.platform import service_env_names

    # what the cluster's secrets would provide: the service settings (and the object store's and
    # MLflow's own credentials, which are not settings of this platform)
    env = {**os.environ, **settings.env()}
    service_env = {name: env[name] for name in service_env_names() if env.get(name)}
    return Isolation(sandbox_root=settings.layout.pipeline_root / "sandboxes", service_env=service_env)


def _run_local(arguments: dict, settings, isolated: bool = False) -> None:
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from pipelines.local_run import TASKS, run_local

    root = settings.layout.pipeline_root
    root.mkdir(parents=True, exist_ok=True)
    log_path = root / f"run-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.log"
    before = {p.name for p in root.iterdir()}
    started = time.perf_counter()
    failure: Exception | None = None
    result = None
    with _output_to(log_path) as terminal:
        console = Console(file=terminal)
        console.print(f"pipeline root {root}\ntask logs     {log_path}\narguments     {json.dumps(arguments)}")
        with Progress(
            SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console
        ) as progress:
            task_ids = {task: progress.add_task(f"  {task}", total=1) for task in TASKS}
            stop = threading.Event()
            watcher = threading.Thread(target=_watch, args=(root, before, progress, task_ids, stop), daemon=True)
            watcher.start()
            try:
                result = run_local(
                    arguments,
                    root,
                    _isolation(settings) if isolated else None,
                    # embedded: every task gets this command's settings (its data directory)
                    task_env=None if isolated else {**os.environ, **settings.env()},
                )
            except Exception as exc:  # noqa: BLE001 - kfp raises RuntimeError (and others) on a failed task
                failure = exc
            finally:
                stop.set()
                watcher.join(timeout=5)
    seconds = time.perf_counter() - started
    if failure is not None or result is None:
        raise UserError(f"the pipeline failed after {seconds:.0f} s: {failure} (task logs: {log_path})")
    console = Console(stderr=True)
    console.print(f"run directory {result.run_dir} ({seconds:.0f} s)")
    console.print(f"gate: {result.gate_reason or result.gate_verdict}")
    if result.model_version:
        console.print(f"registered version {result.model_version} (alias challenger); rollout: {result.rollout_state}")
    else:
        console.print("nothing registered or deployed")


HostOption = Annotated[
    str, typer.Option("--host", help="KFP API endpoint, e.g. https://kubeflow.example.com/pipeline.")
]
NamespaceOption = Annotated[str, typer.Option("--namespace", help="Kubeflow profile namespace (multi-user installs).")]
TokenOption = Annotated[
    Path | None,
    typer.Option("--token-file", help="Bearer token for the KFP API. Default: the pod's ServiceAccount token, if any."),
]


def _endpoint(host: str, namespace: str, token_file: Path | None):
    from pipelines.remote import Endpoint, read_token

    if not host:
        raise UserError("--host URL of the KFP API is required")
    return Endpoint(host, namespace, read_token(token_file))


#: --feature-engine of `schedule` -> the feature pipeline its daily recurring run uses
FEATURE_ENGINES = ("duckdb", "spark")


def _pipelines() -> dict:
    """Name -> pipeline function of every pipeline `upload` and `schedule` upload."""
    from pipelines.feature_pipeline import PIPELINE_NAME as FEATURES
    from pipelines.feature_pipeline import SPARK_PIPELINE_NAME as SPARK_FEATURES
    from pipelines.feature_pipeline import feature_pipeline, spark_feature_pipeline
    from pipelines.training_pipeline import PIPELINE_NAME as TRAINING
    from pipelines.training_pipeline import training_pipeline

    return {TRAINING: training_pipeline, FEATURES: feature_pipeline, SPARK_FEATURES: spark_feature_pipeline}


@pipeline_app.command("upload")
def upload_command(
    host: HostOption = "",
    namespace: NamespaceOption = "",
    token_file: TokenOption = None,
    version: Annotated[str, typer.Option("--version", help="Version name. Default: <pipeline>-<UTC timestamp>.")] = "",
) -> None:
    """Upload the training pipeline and both daily feature pipelines, in-pod (DuckDB) and Spark
    Operator (a new version of each when they exist)."""
    from pipelines.remote import upload

    endpoint = _endpoint(host, namespace, token_file)
    for name, func in _pipelines().items():
        uploaded = upload(endpoint, func, name, f"{version}-{name}" if version else "")
        what = "new pipeline" if uploaded.new_pipeline else "new version"
        typer.echo(
            f"{name}: {what} {uploaded.version_name} (pipeline {uploaded.pipeline_id}, version {uploaded.version_id})"
        )


@pipeline_app.command("schedule")
def schedule_command(
    host: HostOption = "",
    namespace: NamespaceOption = "",
    token_file: TokenOption = None,
    data_uri: Annotated[str, typer.Option("--data-uri", help="Raw transactions in the object store (s3://...).")] = "",
    feature_tables_uri: Annotated[
        str, typer.Option("--feature-tables-uri", help="Object-store folder of the Feast offline tables.")
    ] = "",
    experiment: Annotated[str, typer.Option("--experiment", help="KFP experiment of the recurring runs.")] = "fraud",
    service_account: Annotated[
        str, typer.Option("--service-account", help="ServiceAccount of the scheduled runs' pods.")
    ] = "",
    features_cron: Annotated[
        str, typer.Option("--features-cron", help="Daily feature build + incremental materialisation (6-field cron).")
    ] = "",
    retrain_cron: Annotated[str, typer.Option("--retrain-cron", help="Weekly retraining (6-field cron).")] = "",
    deploy_target: Annotated[str, typer.Option("--deploy-target", help="record | kubernetes")] = "kubernetes",
    serving_namespace: Annotated[
        str, typer.Option("--serving-namespace", help="Namespace of the InferenceService.")
    ] = "fraud",
    prometheus_url: Annotated[str, typer.Option("--prometheus-url", help="Prometheus for the canary analysis.")] = "",
    feature_engine: Annotated[
        str,
        typer.Option(
            "--feature-engine",
            help="duckdb: the daily run builds the tables in its pod (fraud-features); spark: as a Spark Operator "
            "SparkApplication (fraud-features-spark).",
        ),
    ] = "duckdb",
    spark_namespace: Annotated[
        str,
        typer.Option(
            "--spark-namespace",
            help="With --feature-engine spark: namespace of the SparkApplication (the fraud-spark-* accounts). "
            "Default: --serving-namespace.",
        ),
    ] = "",
    spark_executors: Annotated[
        int | None,
        typer.Option("--spark-executors", help="With --feature-engine spark: executor pods. Default: the pipeline's."),
    ] = None,
    spark_executor_memory: Annotated[
        str,
        typer.Option(
            "--spark-executor-memory",
            help="With --feature-engine spark: heap per executor, e.g. 8g. Default: the pipeline's.",
        ),
    ] = "",
) -> None:
    """Upload the pipelines and create the recurring runs: daily features (in-pod or on Spark),
    weekly retraining."""
    from pipelines.feature_pipeline import PIPELINE_NAME as FEATURES
    from pipelines.feature_pipeline import SPARK_PIPELINE_NAME as SPARK_FEATURES
    from pipelines.remote import (
        DAILY_FEATURES_CRON,
        WEEKLY_RETRAIN_CRON,
        Schedule,
        create_recurring_runs,
        upload,
        validate_cron,
    )
    from pipelines.training_pipeline import PIPELINE_NAME as TRAINING

    if not data_uri or not feature_tables_uri:
        raise UserError("--data-uri and --feature-tables-uri (object-store URLs) are required")
    if feature_engine not in FEATURE_ENGINES:
        raise UserError(f"--feature-engine must be one of {', '.join(FEATURE_ENGINES)}, got {feature_engine!r}")
    if feature_engine == "spark":
        features_pipeline = SPARK_FEATURES
        features_arguments = _spark_feature_arguments(
            spark_namespace or serving_namespace, feature_tables_uri, spark_executors, spark_executor_memory
        )
    else:
        if spark_namespace or spark_executors is not None or spark_executor_memory:
            raise UserError(
                "--spark-namespace, --spark-executors and --spark-executor-memory go with --feature-engine spark"
            )
        features_pipeline = FEATURES
        features_arguments = {"data_uri": data_uri, "feature_tables_uri": feature_tables_uri}
    features_cron = validate_cron(features_cron or DAILY_FEATURES_CRON)
    retrain_cron = validate_cron(retrain_cron or WEEKLY_RETRAIN_CRON)
    endpoint = _endpoint(host, namespace, token_file)
    uploaded = {name: upload(endpoint, func, name) for name, func in _pipelines().items()}
    training_arguments = {
        "data_uri": data_uri,
        "feature_tables_uri": feature_tables_uri,
        "deploy_target": deploy_target,
        "namespace": serving_namespace,
    }
    if prometheus_url:
        training_arguments["prometheus_url"] = prometheus_url
    schedules = [
        Schedule("fraud-features-daily", features_cron, uploaded[features_pipeline], features_arguments),
        Schedule("fraud-retrain-weekly", retrain_cron, uploaded[TRAINING], training_arguments),
    ]
    ids = create_recurring_runs(endpoint, schedules, experiment=experiment, service_account=service_account)
    for schedule, recurring_id in zip(schedules, ids, strict=True):
        typer.echo(
            f"{schedule.name}: cron '{schedule.cron}' -> {schedule.pipeline.name} (recurring run {recurring_id})"
        )


def _spark_feature_arguments(
    namespace: str, feature_tables_uri: str, executors: int | None, executor_memory: str
) -> dict[str, object]:
    """Arguments of `spark_feature_pipeline` for the daily run (the pipeline's defaults for what is
    not given), checked as the SparkApplication builder checks them, so that a bad value fails
    here and not in the first scheduled run."""
    from fraud.deploy.spark import SparkApplicationError, SparkFeatureJob

    # the pipeline's parameters carry the names of the builder's fields
    overrides: dict[str, Any] = {}
    if executors is not None:
        overrides["executor_instances"] = executors
    if executor_memory:
        overrides["executor_memory"] = executor_memory
    options = {
        "namespace": "--spark-namespace",
        "executor_instances": "--spark-executors",
        "executor_memory": "--spark-executor-memory",
    }
    try:
        SparkFeatureJob(name="fraud-features-daily", namespace=namespace, image="core", **overrides)
    except SparkApplicationError as exc:
        field, _, rest = str(exc).partition(" ")
        raise UserError(f"{options.get(field, field)} {rest}") from None
    return {"namespace": namespace, "feature_tables_uri": feature_tables_uri, **overrides}


def register(app: typer.Typer) -> None:
    """Add this module's commands to the top-level app."""
    app.add_typer(pipeline_app, name="pipeline")
