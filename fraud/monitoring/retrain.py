"""The closed retraining loop: decide from drift and live quality whether to retrain, and trigger
the training pipeline at most once per cool-down.

Signals
    * **Drift** — the drift transformer's `/metrics`: the counters
      `fraud_drift_windows_evaluated_total` / `fraud_drift_windows_drifted_total` and the gauge
      `fraud_drift_detected` (last window). Between two checks the counters say how many windows
      were tested and how many drifted; the persisted *streak* of consecutive drifted windows grows
      when every new window drifted, restarts at 1 when only the last one is known to have drifted,
      and drops to 0 when the last one did not. Counters that went down mean the transformer
      restarted: the new values count from zero. Drift is *sustained* when the streak reaches
      `drift_windows`. A transient flag (one window) never triggers.
    * **Live quality** — the `live_quality` table of the audit database (`fraud.labels`): per model
      version and decision day, precision / average precision on delayed labels. Days whose label
      coverage is below `min_label_coverage` are still maturing and ignored. Quality is *below the
      floor* when the last `quality_days` mature days of the current model version (the one with the
      latest decision day) all have precision < `precision_floor` or AP < `ap_floor`.

Trigger
    When either signal is sustained, the pipeline is started by a `RetrainTrigger` (a KFP run in a
    cluster, a command locally), the reason is appended to `<data dir>/monitoring/triggers.json`
    (atomic rewrite) and, when an MLflow tracking URI is configured, logged as an MLflow run.
    Rate limit: no trigger within `cooldown` of the last successful one (persisted in
    `state.json`, so it holds across processes and restarts), and the whole check runs under an
    exclusive, non-blocking `flock` on `retrain.lock`, so two checkers never both trigger.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import IO, Protocol

import httpx
from prometheus_client.parser import text_string_to_metric_families

from fraud import atomic
from fraud.config import MODEL_NAME, DataLayout
from fraud.errors import UserError
from fraud.settings import Settings, current

log = logging.getLogger("fraud.monitoring")

RETRAIN_COMMAND_ENV = "FRAUD_RETRAIN_COMMAND"
STATE_FILE = "state.json"
TRIGGER_LOG = "triggers.json"
LOCK_FILE = "retrain.lock"
MLFLOW_EXPERIMENT = "fraud-monitoring"

EVALUATED = "fraud_drift_windows_evaluated_total"
DRIFTED = "fraud_drift_windows_drifted_total"
DETECTED = "fraud_drift_detected"
FEATURE_P_VALUE = "fraud_drift_feature_p_value"
FEATURE_DRIFT = "fraud_drift_feature_drift"


def monitoring_dir(layout: DataLayout | None = None) -> Path:
    """`<data dir>/monitoring`: state, trigger log and lock of the retraining loop."""
    return (layout or DataLayout.current()).root / "monitoring"


def default_retrain_command(settings: Settings | None = None) -> list[str]:
    """`FRAUD_RETRAIN_COMMAND` (shell-split) or `fraud pipeline run --local` of this environment."""
    configured = (settings or current()).retrain_command
    if configured:
        return shlex.split(configured)
    fraud = Path(sys.executable).with_name("fraud")
    return [str(fraud) if fraud.is_file() else "fraud", "pipeline", "run", "--local"]


# --- policy -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RetrainPolicy:
    """When to retrain."""

    #: consecutive drifted batch windows that make drift sustained
    drift_windows: int = 3
    #: live precision of the alerts below this on every one of the last `quality_days` mature days
    precision_floor: float = 0.5
    #: or live average precision below this
    ap_floor: float = 0.3
    quality_days: int = 3
    #: share of a day's decisions that must be labelled before the day counts
    min_label_coverage: float = 0.9
    cooldown: timedelta = timedelta(hours=24)

    def __post_init__(self) -> None:
        if self.drift_windows < 1:
            raise UserError(f"--drift-windows must be >= 1, got {self.drift_windows}")
        if self.quality_days < 1:
            raise UserError(f"--quality-days must be >= 1, got {self.quality_days}")
        for name in ("precision_floor", "ap_floor", "min_label_coverage"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise UserError(f"--{name.replace('_', '-')} must be in [0, 1], got {value}")
        if self.cooldown < timedelta(0):
            raise UserError(f"--cooldown-hours must be >= 0, got {self.cooldown.total_seconds() / 3600:g}")


# --- drift --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DriftSample:
    """One scrape of the drift transformer."""

    windows_evaluated: float
    windows_drifted: float
    last_window_drifted: bool
    feature_p_values: dict[str, float] = field(default_factory=dict)
    drifted_features: tuple[str, ...] = ()


def parse_drift_exposition(text: str, source: str = "the exposition") -> DriftSample:
    """The drift counters and gauges from a Prometheus text exposition (several replicas' series
    are summed / OR-ed); UserError if it is not a drift transformer's."""
    evaluated = drifted = 0.0
    detected = False
    seen: set[str] = set()
    p_values: dict[str, float] = {}
    drifted_features: set[str] = set()
    try:
        families = list(text_string_to_metric_families(text))
    except ValueError as exc:
        raise UserError(f"{source} is not a Prometheus text exposition: {exc}") from None
    for family in families:
        for sample in family.samples:
            if sample.name == EVALUATED:
                evaluated += sample.value
            elif sample.name == DRIFTED:
                drifted += sample.value
            elif sample.name == DETECTED:
                detected = detected or sample.value >= 1
            elif sample.name == FEATURE_P_VALUE and "feature" in sample.labels:
                feature = sample.labels["feature"]
                p_values[feature] = min(sample.value, p_values.get(feature, math.inf))
            elif sample.name == FEATURE_DRIFT and sample.value >= 1 and "feature" in sample.labels:
                drifted_features.add(sample.labels["feature"])
            else:
                continue
            seen.add(sample.name)
    missing = {EVALUATED, DRIFTED} - seen
    if missing:
        raise UserError(f"{source} has no {', '.join(sorted(missing))}: is it the drift transformer's /metrics?")
    return DriftSample(evaluated, drifted, detected, p_values, tuple(sorted(drifted_features)))


def scrape_drift(url: str, timeout_s: float = 10.0) -> DriftSample:
    """GET the transformer's `/metrics` and parse it; UserError when unreachable or not a transformer."""
    try:
        response = httpx.get(url, timeout=timeout_s)
    except httpx.InvalidURL as exc:
        raise UserError(f"--metrics-url {url!r} is not a valid URL: {exc}") from None
    except httpx.HTTPError as exc:
        raise UserError(f"cannot scrape the drift metrics at {url} ({type(exc).__name__}: {exc})") from None
    if response.status_code != 200:
        raise UserError(f"the drift metrics at {url} answered HTTP {response.status_code}")
    return parse_drift_exposition(response.text, url)


@dataclass(frozen=True)
class DriftTracker:
    """What the previous checks learnt about the drift windows (persisted between checks)."""

    windows_evaluated: float = 0.0
    windows_drifted: float = 0.0
    streak: int = 0

    def advance(self, sample: DriftSample) -> DriftTracker:
        """The tracker after seeing `sample` (see the module docstring for the streak rules)."""
        restarted = sample.windows_evaluated < self.windows_evaluated or sample.windows_drifted < self.windows_drifted
        base = DriftTracker() if restarted else self
        new_windows = round(sample.windows_evaluated - base.windows_evaluated)
        new_drifted = round(sample.windows_drifted - base.windows_drifted)
        if new_windows <= 0:
            streak = base.streak
        elif new_drifted >= new_windows:
            streak = base.streak + new_windows
        elif sample.last_window_drifted and new_drifted > 0:
            streak = 1  # the last one drifted, an earlier new one did not: at least one in a row
        else:
            streak = 0
        return DriftTracker(sample.windows_evaluated, sample.windows_drifted, streak)


# --- live quality -------------------------------------------------------------------------------
@dataclass(frozen=True)
class QualityDay:
    """Live quality of one model version on one mature decision day."""

    model_version: str
    day: date
    precision: float | None
    average_precision: float | None
    label_coverage: float


def mature_quality_days(rows: Sequence, min_label_coverage: float, model_name: str = MODEL_NAME) -> list[QualityDay]:
    """The mature days (enough labels) of the current model version — the one with the latest
    decision day — oldest first. `rows` are `fraud.labels.DailyQuality`."""
    mine = [r for r in rows if r.model_name == model_name and r.n_labelled and r.label_coverage >= min_label_coverage]
    if not mine:
        return []
    current = max(mine, key=lambda r: (r.day, r.model_version)).model_version
    return [
        QualityDay(r.model_version, r.day, r.precision, r.average_precision, r.label_coverage)
        for r in sorted(mine, key=lambda r: r.day)
        if r.model_version == current
    ]


def read_quality_days(engine, policy: RetrainPolicy, model_name: str = MODEL_NAME) -> list[QualityDay]:
    from fraud.labels import read_live_quality

    return mature_quality_days(read_live_quality(engine), policy.min_label_coverage, model_name)


def quality_below_floor(days: Sequence[QualityDay], policy: RetrainPolicy) -> str | None:
    """The reason when each of the last `quality_days` mature days is below a floor, else None."""
    recent = list(days)[-policy.quality_days :]
    if len(recent) < policy.quality_days:
        return None

    def below(day: QualityDay) -> list[str]:
        found = []
        if day.precision is not None and day.precision < policy.precision_floor:
            found.append(f"precision {day.precision:.3f} < {policy.precision_floor:g}")
        if day.average_precision is not None and day.average_precision < policy.ap_floor:
            found.append(f"AP {day.average_precision:.3f} < {policy.ap_floor:g}")
        return found

    findings = [below(day) for day in recent]
    if not all(findings):
        return None
    detail = "; ".join(f"{day.day.isoformat()}: {', '.join(f)}" for day, f in zip(recent, findings, strict=True))
    version = recent[-1].model_version
    return f"live quality of version {version} below the floor on the last {len(recent)} mature days ({detail})"


# --- decision -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Decision:
    retrain: bool
    reasons: tuple[str, ...]
    blocked_by: str | None = None  # why a sustained condition does not trigger (cool-down)

    @property
    def summary(self) -> str:
        if self.retrain:
            return "retrain: " + " | ".join(self.reasons)
        if self.blocked_by:
            return f"no retrain ({self.blocked_by}): " + " | ".join(self.reasons)
        return "no retrain: " + (" | ".join(self.reasons) if self.reasons else "no sustained drift or quality loss")


def drift_reason(tracker: DriftTracker, sample: DriftSample | None, policy: RetrainPolicy) -> str | None:
    if tracker.streak < policy.drift_windows:
        return None
    features = ""
    if sample is not None and sample.drifted_features:
        shown = [
            f"{name} (p={sample.feature_p_values.get(name, float('nan')):.2g})" for name in sample.drifted_features
        ]
        features = f"; drifted features: {', '.join(shown)}"
    return f"feature drift in {tracker.streak} consecutive windows (>= {policy.drift_windows}){features}"


def decide(
    policy: RetrainPolicy,
    tracker: DriftTracker,
    sample: DriftSample | None,
    quality_days: Sequence[QualityDay] | None,
    last_trigger_at: datetime | None,
    now: datetime,
) -> Decision:
    """Pure decision: retrain when drift or quality loss is sustained and the cool-down is over."""
    reasons = tuple(
        r
        for r in (
            drift_reason(tracker, sample, policy),
            quality_below_floor(quality_days, policy) if quality_days is not None else None,
        )
        if r
    )
    if not reasons:
        return Decision(False, ())
    if last_trigger_at is not None and now - last_trigger_at < policy.cooldown:
        until = last_trigger_at + policy.cooldown
        return Decision(
            False, reasons, f"cool-down until {until.isoformat()}Z, last trigger {last_trigger_at.isoformat()}Z"
        )
    return Decision(True, reasons)


# --- persisted state, trigger log and lock --------------------------------------------------------
@dataclass(frozen=True)
class MonitorState:
    drift: DriftTracker = DriftTracker()
    drift_source: str = ""
    last_trigger_at: datetime | None = None
    last_check_at: datetime | None = None

    def to_json(self) -> dict:
        return {
            "drift": asdict(self.drift),
            "drift_source": self.drift_source,
            "last_trigger_at": self.last_trigger_at.isoformat() if self.last_trigger_at else None,
            "last_check_at": self.last_check_at.isoformat() if self.last_check_at else None,
        }

    @classmethod
    def from_json(cls, data: dict) -> MonitorState:
        def parse(value: str | None) -> datetime | None:
            return datetime.fromisoformat(value) if value else None

        return cls(
            drift=DriftTracker(**data.get("drift", {})),
            drift_source=data.get("drift_source", ""),
            last_trigger_at=parse(data.get("last_trigger_at")),
            last_check_at=parse(data.get("last_check_at")),
        )


def _read_json(path: Path, default):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return default
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is corrupt ({exc}); move it away to reset the retraining loop's state") from None


def load_state(folder: Path) -> MonitorState:
    data = _read_json(folder / STATE_FILE, {})
    try:
        return MonitorState.from_json(data)
    except (TypeError, ValueError) as exc:
        raise UserError(f"{folder / STATE_FILE} is not a monitoring state file ({exc})") from None


def save_state(folder: Path, state: MonitorState) -> None:
    atomic.write_json(folder / STATE_FILE, state.to_json(), indent=2)


def read_trigger_log(folder: Path) -> list[dict]:
    return list(_read_json(folder / TRIGGER_LOG, []))


def append_trigger_log(folder: Path, entry: dict) -> None:
    atomic.write_json(folder / TRIGGER_LOG, [*read_trigger_log(folder), entry], indent=2)


class LockHeld(Exception):
    """Another checker holds the retraining lock."""


@contextlib.contextmanager
def retrain_lock(folder: Path) -> Iterator[None]:
    """Exclusive, non-blocking `flock` on `<folder>/retrain.lock`; LockHeld if another process
    (or another open of the file) holds it. Released when the process dies, so never stale."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockHeld(f"another retraining check holds {folder / LOCK_FILE}") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)  # closing releases the lock


# --- triggers -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TriggerResult:
    ok: bool
    detail: str
    run_id: str | None = None


class RetrainTrigger(Protocol):
    def describe(self) -> str: ...

    def fire(self, reasons: Sequence[str]) -> TriggerResult: ...


@dataclass(frozen=True)
class CommandTrigger:
    """Runs the pipeline as a command (default `fraud pipeline run --local`) and waits for it.
    The reasons are passed in `FRAUD_RETRAIN_REASON`."""

    command: tuple[str, ...]
    timeout_s: float | None = None
    log_path: Path | None = None

    def describe(self) -> str:
        return shlex.join(self.command)

    def fire(self, reasons: Sequence[str]) -> TriggerResult:
        # the child's environment: this process's, plus why it runs
        env = {**os.environ, "FRAUD_RETRAIN_REASON": " | ".join(reasons)}
        output: int | IO[bytes] = subprocess.DEVNULL
        handle = None
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            handle = output = self.log_path.open("ab")
        try:
            completed = subprocess.run(  # noqa: PLW1510 - the return code is reported
                list(self.command), env=env, stdout=output, stderr=subprocess.STDOUT, timeout=self.timeout_s
            )
        except FileNotFoundError:
            return TriggerResult(False, f"retrain command not found: {self.command[0]}")
        except subprocess.TimeoutExpired:
            return TriggerResult(False, f"retrain command did not finish within {self.timeout_s:g}s")
        finally:
            if handle is not None:
                handle.close()
        where = f" (log {self.log_path})" if self.log_path else ""
        if completed.returncode != 0:
            return TriggerResult(False, f"retrain command exited with {completed.returncode}{where}")
        return TriggerResult(True, f"retrain command finished{where}")


def default_train_start(today: date, train_days: int = 7, delay_days: int = 7, test_days: int = 7) -> str:
    """The latest train start whose test window ends yesterday (the last complete day)."""
    last = today - timedelta(days=1)
    return (last - timedelta(days=train_days + delay_days + test_days - 1)).isoformat()


@dataclass(frozen=True)
class KfpTrigger:
    """Submits a run of the compiled training pipeline to Kubeflow Pipelines
    (`kfp.Client(host).create_run_from_pipeline_package`); returns once it is created.

    The pipeline comes from `package_path` (a compiled package) or, without one, from `compile_package`
    (writes the package to the path it is given): the caller - `fraud monitor check` - passes
    `pipelines.training_pipeline.compile_pipeline`, so the library does not import the orchestration layer."""

    host: str
    arguments: dict[str, object]
    package_path: Path | None = None
    experiment: str = "fraud"
    compile_package: Callable[[str], object] | None = None

    def __post_init__(self) -> None:
        if self.package_path is None and self.compile_package is None:
            raise ValueError("KfpTrigger needs a package_path or a compile_package function")

    def describe(self) -> str:
        return f"KFP run on {self.host} (experiment {self.experiment})"

    def fire(self, reasons: Sequence[str]) -> TriggerResult:
        import kfp

        with tempfile.TemporaryDirectory() as tmp:
            package = self.package_path
            if package is None and self.compile_package is not None:  # one of them is set (__post_init__)
                package = Path(tmp) / "fraud-training-pipeline.yaml"
                self.compile_package(str(package))
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
            try:
                client = kfp.Client(host=self.host)
                run = client.create_run_from_pipeline_package(
                    str(package),
                    arguments=dict(self.arguments),
                    run_name=f"retrain-{stamp}",
                    experiment_name=self.experiment,
                    enable_caching=False,
                )
            except Exception as exc:  # noqa: BLE001 - kfp raises ApiException, connection errors, ValueError
                return TriggerResult(False, f"KFP submission to {self.host} failed: {type(exc).__name__}: {exc}")
        return TriggerResult(True, f"submitted KFP run {run.run_id} to {self.host}", run.run_id)


def log_to_mlflow(tracking_uri: str, entry: dict) -> str:
    """Record a trigger as an MLflow run (experiment `fraud-monitoring`); returns the run id."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(MLFLOW_EXPERIMENT)
    if experiment is not None:
        experiment_id = experiment.experiment_id
    else:
        from fraud.registry import default_artifact_location

        experiment_id = client.create_experiment(
            MLFLOW_EXPERIMENT, artifact_location=default_artifact_location(tracking_uri)
        )
    tags = {
        "fraud.retrain.reason": " | ".join(entry["reasons"])[:5000],
        "fraud.retrain.trigger": entry["trigger"][:5000],
        "fraud.retrain.outcome": "ok" if entry["ok"] else "failed",
        "fraud.retrain.detail": entry["detail"][:5000],
    }
    if entry.get("run_id"):
        tags["fraud.retrain.kfp_run_id"] = entry["run_id"]
    run = client.create_run(experiment_id, run_name=f"retrain-trigger-{entry['at']}", tags=tags)
    client.log_metric(run.info.run_id, "drift_streak", float(entry["drift_streak"]))
    client.set_terminated(run.info.run_id, "FINISHED" if entry["ok"] else "FAILED")
    return run.info.run_id


# --- one check ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class CheckResult:
    decision: Decision
    state: MonitorState
    triggered: bool = False
    trigger: TriggerResult | None = None
    skipped: str | None = None  # e.g. the lock is held

    @property
    def summary(self) -> str:
        if self.skipped:
            return f"skipped: {self.skipped}"
        text = self.decision.summary
        if self.trigger is not None:
            text += f" -> {'triggered' if self.trigger.ok else 'trigger FAILED'}: {self.trigger.detail}"
        return text


@dataclass
class RetrainChecker:
    """One `fraud monitor check`: read signals, decide, trigger, record — under the lock."""

    policy: RetrainPolicy
    trigger: RetrainTrigger
    folder: Path
    drift_url: str | None = None
    quality_engine: object | None = None
    mlflow_tracking_uri: str | None = None
    model_name: str = MODEL_NAME
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC).replace(tzinfo=None))

    def check(self) -> CheckResult:
        try:
            with retrain_lock(self.folder):
                return self._check_locked()
        except LockHeld as held:
            state = load_state(self.folder)
            return CheckResult(Decision(False, ()), state, skipped=str(held))

    def _check_locked(self) -> CheckResult:
        state = load_state(self.folder)
        now = self.clock()
        sample = None
        tracker = state.drift
        if self.drift_url is not None:
            sample = scrape_drift(self.drift_url)
            if state.drift_source and state.drift_source != self.drift_url:
                tracker = DriftTracker()  # another transformer: its counters are not comparable
            tracker = tracker.advance(sample)
        quality = None
        if self.quality_engine is not None:
            quality = read_quality_days(self.quality_engine, self.policy, self.model_name)
        # with drift not read this time, a streak stored by an earlier check must not trigger
        observed = tracker if self.drift_url is not None else DriftTracker()
        decision = decide(self.policy, observed, sample, quality, state.last_trigger_at, now)
        state = replace(state, drift=tracker, drift_source=self.drift_url or state.drift_source, last_check_at=now)
        if not decision.retrain:
            save_state(self.folder, state)
            return CheckResult(decision, state)
        log.info("triggering retraining via %s: %s", self.trigger.describe(), " | ".join(decision.reasons))
        result = self.trigger.fire(decision.reasons)
        entry = {
            "at": now.isoformat(),
            "reasons": list(decision.reasons),
            "trigger": self.trigger.describe(),
            "ok": result.ok,
            "detail": result.detail,
            "run_id": result.run_id,
            "drift_streak": tracker.streak,
            "drifted_features": list(sample.drifted_features) if sample else [],
        }
        if self.mlflow_tracking_uri:
            try:
                entry["mlflow_run_id"] = log_to_mlflow(self.mlflow_tracking_uri, entry)
            except Exception as exc:  # noqa: BLE001 - the trigger happened; a tracking outage must not hide it
                entry["mlflow_error"] = f"{type(exc).__name__}: {exc}"
                log.warning("could not record the trigger in MLflow at %s: %s", self.mlflow_tracking_uri, exc)
        append_trigger_log(self.folder, entry)
        if result.ok:
            # a new model resets the drift reference: start counting windows afresh
            state = replace(state, last_trigger_at=now, drift=replace(tracker, streak=0))
        save_state(self.folder, state)
        return CheckResult(decision, state, triggered=result.ok, trigger=result)
