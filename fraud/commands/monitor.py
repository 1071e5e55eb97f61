"""`fraud monitor` commands: the closed retraining loop (check once, or watch)."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, fields
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, get_type_hints

import typer

from fraud.errors import UserError

monitor_app = typer.Typer(
    help="Closed loop: retrain when drift or live-quality loss is sustained (rate-limited).", no_args_is_help=True
)

MetricsUrl = Annotated[
    str,
    typer.Option(
        "--metrics-url",
        help="The drift transformer's /metrics (default: the setting FRAUD_MONITOR_METRICS_URL)",
    ),
]
UseDrift = Annotated[bool, typer.Option("--drift/--no-drift", help="Read the drift signal")]
UseQuality = Annotated[bool, typer.Option("--quality/--no-quality", help="Read live quality from the audit database")]
DbUrl = Annotated[
    str | None,
    typer.Option("--db-url", help="Audit database URL (default: FRAUD_AUDIT_DB_URL, else <data dir>/audit/audit.db)"),
]
DriftWindows = Annotated[int, typer.Option("--drift-windows", min=1, help="Consecutive drifted windows that trigger")]
PrecisionFloor = Annotated[float, typer.Option("--precision-floor", min=0.0, max=1.0, help="Live precision floor")]
ApFloor = Annotated[float, typer.Option("--ap-floor", min=0.0, max=1.0, help="Live average-precision floor")]
QualityDays = Annotated[int, typer.Option("--quality-days", min=1, help="Mature days below a floor that trigger")]
MinCoverage = Annotated[
    float, typer.Option("--min-coverage", min=0.0, max=1.0, help="Label coverage a day needs to count")
]
CooldownHours = Annotated[float, typer.Option("--cooldown-hours", min=0.0, help="No second trigger within this")]
KfpHost = Annotated[str, typer.Option("--kfp-host", help="Submit the retraining run to this KFP API endpoint")]
PipelinePackage = Annotated[
    Path | None, typer.Option("--pipeline-package", help="Compiled pipeline YAML (default: compile it now)")
]
PipelineArg = Annotated[
    list[str] | None,
    typer.Option("--pipeline-arg", help="KEY=VALUE pipeline argument for --kfp-host runs (repeatable)"),
]
Experiment = Annotated[str, typer.Option("--experiment", help="KFP experiment of the retraining run")]
RetrainCommand = Annotated[
    str,
    typer.Option(
        "--retrain-command",
        help="Command run without --kfp-host (env FRAUD_RETRAIN_COMMAND; default: fraud pipeline run --local)",
    ),
]
RetrainTimeout = Annotated[
    float, typer.Option("--retrain-timeout", min=0.0, help="Longest run of the retrain command, s (0: none)")
]
MlflowUri = Annotated[
    str,
    typer.Option("--mlflow-tracking-uri", help="Record triggers as MLflow runs (default: MLFLOW_TRACKING_URI, if set)"),
]
StateDir = Annotated[
    Path | None, typer.Option("--state-dir", help="State, trigger log and lock (default <data dir>/monitoring)")
]


def parse_pipeline_args(pairs: list[str]) -> dict[str, object]:
    """`KEY=VALUE` options as pipeline arguments (ints, floats and true/false converted)."""
    arguments: dict[str, object] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--pipeline-arg must be KEY=VALUE, got {pair!r}")
        value: object = raw
        if raw.lower() in ("true", "false"):
            value = raw.lower() == "true"
        else:
            for kind in (int, float):
                try:
                    value = kind(raw)
                    break
                except ValueError:
                    continue
        arguments[key.strip()] = value
    return arguments


@dataclass(frozen=True)
class CheckerOptions:
    """The options `fraud monitor check` and `fraud monitor watch` share (one definition: the
    commands get them through `with_checker_options`)."""

    metrics_url: MetricsUrl = ""
    use_drift: UseDrift = True
    use_quality: UseQuality = True
    db_url: DbUrl = None
    drift_windows: DriftWindows = 3
    precision_floor: PrecisionFloor = 0.5
    ap_floor: ApFloor = 0.3
    quality_days: QualityDays = 3
    min_coverage: MinCoverage = 0.9
    cooldown_hours: CooldownHours = 24.0
    kfp_host: KfpHost = ""
    pipeline_package: PipelinePackage = None
    pipeline_arg: PipelineArg = None
    experiment: Experiment = "fraud"
    retrain_command: RetrainCommand = ""
    retrain_timeout: RetrainTimeout = 0.0
    mlflow_tracking_uri: MlflowUri = ""
    state_dir: StateDir = None


def with_checker_options(command: Callable[..., None]) -> Callable[..., None]:
    """Give a command every `CheckerOptions` field as a command-line option after its own; the
    command receives them as one `options: CheckerOptions` argument."""
    hints = get_type_hints(CheckerOptions, include_extras=True)
    shared = [
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=hints[f.name], default=f.default)
        for f in fields(CheckerOptions)
    ]
    own_hints = get_type_hints(command, include_extras=True)
    own = [
        p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=own_hints[name])
        for name, p in inspect.signature(command).parameters.items()
        if name != "options"
    ]

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> None:
        options = CheckerOptions(**{p.name: kwargs.pop(p.name) for p in shared})
        command(options=options, **kwargs)

    wrapper.__signature__ = inspect.Signature([*own, *shared])  # type: ignore[attr-defined]
    return wrapper


def build_checker(o: CheckerOptions):
    """The retrain checker the options describe (a clear UserError for inconsistent ones)."""
    import shlex
    from datetime import UTC, datetime

    from fraud.monitoring.retrain import (
        CommandTrigger,
        KfpTrigger,
        RetrainChecker,
        RetrainPolicy,
        RetrainTrigger,
        default_retrain_command,
        default_train_start,
        monitoring_dir,
    )
    from fraud.settings import current

    pipeline_args = o.pipeline_arg or []
    if not (o.use_drift or o.use_quality):
        raise UserError("--no-drift and --no-quality together leave nothing to check")
    settings = current()
    policy = RetrainPolicy(
        drift_windows=o.drift_windows,
        precision_floor=o.precision_floor,
        ap_floor=o.ap_floor,
        quality_days=o.quality_days,
        min_label_coverage=o.min_coverage,
        cooldown=timedelta(hours=o.cooldown_hours),
    )
    folder = (o.state_dir or monitoring_dir(settings.layout)).resolve()
    if o.kfp_host:
        arguments = parse_pipeline_args(pipeline_args)
        if "data_uri" not in arguments:
            raise UserError("--kfp-host needs --pipeline-arg data_uri=URI (where the cluster reads raw transactions)")
        if o.pipeline_package is not None and not o.pipeline_package.is_file():
            raise UserError(f"--pipeline-package {o.pipeline_package} does not exist")
        arguments.setdefault(
            "train_start",
            default_train_start(
                datetime.now(UTC).date(),
                int(str(arguments.get("train_days", 7))),
                int(str(arguments.get("delay_days", 7))),
                int(str(arguments.get("test_days", 7))),
            ),
        )
        from pipelines.training_pipeline import compile_pipeline

        trigger: RetrainTrigger = KfpTrigger(
            o.kfp_host, arguments, o.pipeline_package, o.experiment, compile_package=compile_pipeline
        )
    else:
        if pipeline_args:
            raise UserError("--pipeline-arg only applies with --kfp-host; put options in --retrain-command")
        command = shlex.split(o.retrain_command) if o.retrain_command.strip() else default_retrain_command(settings)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        trigger = CommandTrigger(tuple(command), o.retrain_timeout or None, folder / f"retrain-{stamp}.log")
    engine = None
    if o.use_quality:
        from fraud.commands.audit import open_audit_database

        engine = open_audit_database(o.db_url)
    return RetrainChecker(
        policy=policy,
        trigger=trigger,
        folder=folder,
        drift_url=(o.metrics_url or settings.monitor_metrics_url) if o.use_drift else None,
        quality_engine=engine,
        mlflow_tracking_uri=o.mlflow_tracking_uri.strip() or settings.mlflow_tracking_uri,
    )


@monitor_app.command("check")
@with_checker_options
def check(options: CheckerOptions) -> None:
    """Read drift and live quality once; trigger the training pipeline if either is sustained
    and the cool-down is over. Exit 0 whether or not it triggered, 1 if the trigger failed."""
    checker = build_checker(options)
    result = checker.check()
    typer.echo(result.summary)
    if result.trigger is not None and not result.trigger.ok:
        raise typer.Exit(code=1)


@monitor_app.command("watch")
@with_checker_options
def watch(
    interval: Annotated[float, typer.Option("--interval", min=1.0, help="Seconds between checks")] = 300.0,
    iterations: Annotated[int, typer.Option("--iterations", min=0, help="Stop after this many checks (0: never)")] = 0,
    *,
    options: CheckerOptions,
) -> None:
    """Run `check` every --interval seconds until SIGINT/SIGTERM (a failing check is reported and retried)."""
    import signal
    import threading
    from datetime import UTC, datetime

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    done = 0
    while not stop.is_set():
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        try:
            result = build_checker(options).check()
            typer.echo(f"{stamp} {result.summary}")
        except UserError as exc:
            typer.echo(f"{stamp} check failed: {exc}", err=True)
        done += 1
        if iterations and done >= iterations:
            break
        stop.wait(interval)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the top-level app."""
    app.add_typer(monitor_app, name="monitor")
