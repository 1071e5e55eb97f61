"""`fraud deploy` commands: roll a registered model version out as a canary and promote or roll
it back on metrics; `fraud deploy status`; `fraud deploy rollback` by hand.

    fraud deploy --target kubernetes --version 7 --namespace fraud-staging --canary-percent 20 \\
                 --window 900 --prometheus-url http://prometheus.monitoring:9090
    fraud deploy --target kubernetes --version 7 --namespace fraud-prod \\
                 --policy kustomize/overlays/prod/rollout-policy.yaml --prometheus-url ...
    fraud deploy --target local --version 7 --window 120
    fraud deploy --target local --version 1 --first-deploy
    fraud deploy --target local --version 7 --retry          # after an earlier roll back
    fraud deploy status --target kubernetes --namespace fraud-staging
    fraud deploy history --target kubernetes --namespace fraud-staging
    fraud deploy rollback --target kubernetes --namespace fraud-staging --reason "false declines"
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from fraud.config import MODEL_NAME
from fraud.errors import UserError

TARGET_HELP = (
    "local (local predictor processes), kubernetes (KServe InferenceService) or record "
    "(a test target: no canary, the decision is recorded in MLflow only)"
)

# Options shared by `fraud deploy`, `status` and `rollback`: defined once so their help stays the same.
TargetOption = Annotated[str, typer.Option("--target", help=TARGET_HELP)]
NamespaceOption = Annotated[
    str, typer.Option("--namespace", help="Kubernetes namespace (a label for the other targets)")
]
KubeContextOption = Annotated[str | None, typer.Option("--kube-context", help="kubeconfig context")]
KubeconfigOption = Annotated[str | None, typer.Option("--kubeconfig", help="kubeconfig file (default ~/.kube/config)")]
ModelNameOption = Annotated[str, typer.Option("--model-name", help="registered model name")]
TrackingUriOption = Annotated[
    str, typer.Option("--mlflow-tracking-uri", help="default: MLFLOW_TRACKING_URI or the local store")
]

deploy_app = typer.Typer(
    help="Canary rollout of a model version: deploy, analyse, promote or roll back.",
    invoke_without_command=True,
    no_args_is_help=False,
)


#: the Prometheus of the kube-prometheus stack (`prometheus-operated` service)
CLUSTER_PROMETHEUS_URL = "http://prometheus-operated.monitoring.svc:9090"


def _connection(kubeconfig: str | None, kube_context: str | None, ready_timeout: float, overlay: str = "") -> Any:
    from fraud.deploy.rollout import Connection

    if ready_timeout <= 0:
        raise UserError(f"--ready-timeout must be > 0 seconds, got {ready_timeout}")
    return Connection(
        kubeconfig=kubeconfig, kube_context=kube_context, overlay=overlay, ready_timeout_seconds=ready_timeout
    )


def _check_target(target: str) -> str:
    from fraud.deploy.state import TARGETS

    if target not in TARGETS:
        raise UserError(f"--target must be one of {', '.join(TARGETS)}, got {target!r}")
    return target


def _show(record: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"rollout of {record.model_name} version {record.model_version}", show_header=False)
    for key, value in (
        ("target", f"{record.target} / {record.namespace}"),
        ("state", record.state.value),
        ("previous version", record.previous_version or "(none)"),
        ("canary traffic", f"{record.canary_traffic_percent}%"),
        ("decision", record.decision or "-"),
        ("reason", record.reason or "-"),
    ):
        table.add_row(key, str(value))
    for step in record.step_results:
        early = ", aborted early" if step.get("early") else ""
        table.add_row(
            f"step {step['step']}", f"{step['percent']}% for {step['window_seconds']}s: {step['decision']}{early}"
        )
    for check in record.checks:
        table.add_row(f"  {check['name']}", f"{check['verdict']}: {check['detail']}")
    Console().print(table)


def _rollout_errors(fn: Any) -> Any:
    from fraud.deploy.canary import AnalysisError
    from fraud.deploy.policy import PolicyError
    from fraud.deploy.state import RolloutError

    try:
        return fn()
    except (RolloutError, AnalysisError, PolicyError) as exc:
        raise UserError(str(exc)) from None


def _policy(policy_file: str | None, canary_percent: int | None, window: int | None) -> Any:
    from fraud.deploy.policy import RolloutPolicy, load_policy

    if policy_file:
        if canary_percent is not None or window is not None:
            raise UserError("--policy sets the steps and windows: drop --canary-percent / --window")
        return _rollout_errors(lambda: load_policy(policy_file))
    percent = 10 if canary_percent is None else canary_percent
    if percent >= 100:
        raise UserError("--canary-percent must be within 1..99 (promotion is the 100 %)")
    return _rollout_errors(lambda: RolloutPolicy.single_step(percent, 600 if window is None else window))


def _check_overlay(overlay: str, namespace: str) -> None:
    """Read the overlay before anything moves: a bad --overlay is a one-line error."""
    from fraud.deploy.overlay import load_inference_service, overlay_for_namespace

    _rollout_errors(lambda: load_inference_service(overlay or overlay_for_namespace(namespace)))


@deploy_app.callback()
def deploy(
    ctx: typer.Context,
    target: TargetOption = "local",
    version: str | None = typer.Option(None, "--version", help="registered model version to roll out"),
    namespace: NamespaceOption = "fraud-dev",
    canary_percent: int | None = typer.Option(
        None, "--canary-percent", min=1, max=99, help="share of traffic for the canary (one step; default 10)"
    ),
    window: int | None = typer.Option(None, "--window", min=1, help="analysis window in seconds (default 600)"),
    policy_file: str | None = typer.Option(
        None,
        "--policy",
        help="rollout policy file (steps, windows, checks), e.g. kustomize/overlays/prod/rollout-policy.yaml",
    ),
    first_deploy: bool = typer.Option(
        False, "--first-deploy", help="nothing serves yet: deploy straight to 100 % (no comparison)"
    ),
    force: bool = typer.Option(
        False, "--force", help="replace an unhealthy or absent stable version at 100 % (no comparison)"
    ),
    retry: bool = typer.Option(False, "--retry", help="roll out again a version whose rollout was rolled back"),
    prometheus_url: str = typer.Option(
        "",
        "--prometheus-url",
        help="Prometheus HTTP API the canary analysis reads. kubernetes target: default "
        f"{CLUSTER_PROMETHEUS_URL}; local target: a Prometheus scraping the predictors listed in "
        "<data dir>/serving/local-canary/prometheus-targets.json (file_sd), else the analysis scrapes them itself",
    ),
    kube_context: KubeContextOption = None,
    kubeconfig: KubeconfigOption = None,
    model_name: ModelNameOption = MODEL_NAME,
    mlflow_tracking_uri: TrackingUriOption = "",
    ready_timeout: float = typer.Option(
        600.0, "--ready-timeout", help="seconds to wait for the new revision to be ready"
    ),
    analyse_after: bool = typer.Option(True, "--analyse/--no-analyse", help="run the analysis window after deploying"),
    overlay: str = typer.Option(
        "",
        "--overlay",
        help="kubernetes target: the InferenceService a first deployment creates, from a kustomize overlay: "
        "dev | staging | prod (packaged) or a kustomization directory / rendered YAML file "
        "(default: the packaged overlay of --namespace)",
    ),
) -> None:
    """Deploy VERSION as a canary, analyse it over the window, then promote or roll back."""
    if ctx.invoked_subcommand is not None:
        return
    if version is None:
        raise UserError("--version is required (the registered model version to roll out); see `fraud deploy --help`")
    _check_target(target)
    from fraud.deploy.rollout import AnalyseRequest, DeployRequest, analyse
    from fraud.deploy.rollout import deploy as run_deploy

    connection = _connection(kubeconfig, kube_context, ready_timeout, overlay)
    if target == "kubernetes":
        _check_overlay(overlay, namespace)
        prometheus_url = prometheus_url or CLUSTER_PROMETHEUS_URL
    policy = _policy(policy_file, canary_percent, window)

    def run() -> Any:
        record = run_deploy(
            DeployRequest(
                model_name,
                version,
                target,
                namespace,
                policy.steps[0].percent,
                mlflow_tracking_uri=mlflow_tracking_uri,
                connection=connection,
                policy=policy,
                first_deploy=first_deploy,
                force=force,
                retry=retry,
            )
        )
        typer.echo(f"version {version}: {record.state.value}")
        if analyse_after and not record.state.final:
            plan = ", ".join(f"{s.percent}% for {s.window_seconds}s" for s in policy.steps)
            typer.echo(f"analysing the canary ({plan if record.previous_version else 'first deployment'}) ...")
            record = analyse(
                AnalyseRequest(
                    model_name,
                    version,
                    target,
                    namespace,
                    prometheus_url,
                    policy.steps[0].window_seconds,
                    mlflow_tracking_uri=mlflow_tracking_uri,
                    criteria=policy.criteria,
                    connection=connection,
                    policy=policy,
                ),
                deployed=record,
            )
        return record

    record = _rollout_errors(run)
    _show(record)
    if record.state.value == "rolled_back":
        raise typer.Exit(code=3)


@deploy_app.command("status")
def status(
    target: TargetOption = "local",
    namespace: NamespaceOption = "fraud-dev",
    kube_context: KubeContextOption = None,
    kubeconfig: KubeconfigOption = None,
    model_name: ModelNameOption = MODEL_NAME,
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """Show the current rollout record and what the serving stack reports."""
    _check_target(target)
    from fraud.deploy.rollout import status as rollout_status
    from fraud.deploy.state import RolloutRecord

    report = _rollout_errors(
        lambda: rollout_status(target, model_name, namespace, connection=_connection(kubeconfig, kube_context, 600.0))
    )
    if as_json:
        typer.echo(json.dumps(report, indent=2, default=str))
        return
    if report["record"] is None:
        typer.echo(f"no rollout of {model_name} recorded for {target}/{namespace}")
    else:
        _show(RolloutRecord.from_dict(report["record"]))
    typer.echo(json.dumps(report["serving"], indent=2, default=str))


@deploy_app.command("rollback")
def rollback(
    reason: str = typer.Option(..., "--reason", help="why (recorded in MLflow and the rollout record)"),
    target: TargetOption = "local",
    namespace: NamespaceOption = "fraud-dev",
    kube_context: KubeContextOption = None,
    kubeconfig: KubeconfigOption = None,
    model_name: ModelNameOption = MODEL_NAME,
    mlflow_tracking_uri: TrackingUriOption = "",
) -> None:
    """Roll the current rollout back by hand (after a promotion: champion alias moves back too)."""
    _check_target(target)
    if not reason.strip():
        raise UserError("--reason must not be empty")
    from fraud.deploy.rollout import manual_rollback

    record = _rollout_errors(
        lambda: manual_rollback(
            target,
            model_name,
            namespace,
            reason,
            mlflow_tracking_uri=mlflow_tracking_uri,
            connection=_connection(kubeconfig, kube_context, 600.0),
        )
    )
    _show(record)


@deploy_app.command("history")
def history(
    target: TargetOption = "local",
    namespace: NamespaceOption = "fraud-dev",
    model_name: ModelNameOption = MODEL_NAME,
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """List past rollouts (oldest first) with their decisions and reasons."""
    _check_target(target)
    from rich.console import Console
    from rich.table import Table

    from fraud.deploy.rollout import history as rollout_history

    records = _rollout_errors(lambda: rollout_history(target, model_name, namespace))
    if as_json:
        typer.echo(json.dumps([r.to_dict() for r in records], indent=2, default=str))
        return
    if not records:
        typer.echo(f"no rollout of {model_name} recorded for {target}/{namespace}")
        return
    table = Table(title=f"rollouts of {model_name} in {target}/{namespace}")
    for column in ("started", "version", "from", "state", "reason"):
        table.add_column(column, overflow="fold")
    for record in records:
        table.add_row(
            record.started_at,
            record.model_version,
            record.previous_version or "-",
            record.state.value,
            record.reason or "-",
        )
    Console().print(table)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the top-level app."""
    app.add_typer(deploy_app, name="deploy")
