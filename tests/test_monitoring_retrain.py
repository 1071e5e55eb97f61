"""The closed retraining loop: decision logic (sustained vs transient drift, quality floor,
cool-down, lock) and `fraud monitor check` end to end against a real HTTP server exposing a real
prometheus_client registry, with a real retrain command that writes a marker file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from datetime import date, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest, start_http_server

from fraud.config import MODEL_NAME
from fraud.errors import UserError
from fraud.labels import DailyQuality
from fraud.monitoring.retrain import (
    CommandTrigger,
    DriftSample,
    DriftTracker,
    LockHeld,
    QualityDay,
    RetrainChecker,
    RetrainPolicy,
    decide,
    load_state,
    mature_quality_days,
    parse_drift_exposition,
    quality_below_floor,
    read_quality_days,
    read_trigger_log,
    retrain_lock,
)
from fraud.net import free_port

FRAUD = str(Path(sys.executable).with_name("fraud"))
NOW = datetime(2026, 3, 10, 12, 0, 0)
POLICY = RetrainPolicy(drift_windows=3, precision_floor=0.5, ap_floor=0.3, quality_days=3, cooldown=timedelta(hours=24))


class DriftExporter:
    """A real prometheus_client registry with the transformer's drift series, served over HTTP."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        kw = {"registry": self.registry}
        self.evaluated = Counter("fraud_drift_windows_evaluated", "windows tested", **kw)
        self.drifted = Counter("fraud_drift_windows_drifted", "windows drifted", **kw)
        self.detected = Gauge("fraud_drift_detected", "last window drifted", **kw)
        self.p_value = Gauge("fraud_drift_feature_p_value", "p-value", ["feature"], **kw)
        self.feature_drift = Gauge("fraud_drift_feature_drift", "feature drifted", ["feature"], **kw)
        self.server = None

    def window(self, drifted: bool, p_amount: float = 0.5) -> None:
        self.evaluated.inc()
        if drifted:
            self.drifted.inc()
        self.detected.set(1 if drifted else 0)
        self.p_value.labels("tx_amount_feature").set(p_amount)
        self.p_value.labels("terminal_risk_7d").set(0.4)
        self.feature_drift.labels("tx_amount_feature").set(1 if drifted else 0)
        self.feature_drift.labels("terminal_risk_7d").set(0)

    def sample(self) -> DriftSample:
        return parse_drift_exposition(generate_latest(self.registry).decode())

    def serve(self) -> str:
        port = free_port()
        self.server, _thread = start_http_server(port, addr="127.0.0.1", registry=self.registry)
        return f"http://127.0.0.1:{port}/metrics"

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


# --- drift: sustained vs transient ---------------------------------------------------------------
def test_sustained_drift_over_several_checks_triggers():
    exporter = DriftExporter()
    tracker = DriftTracker()
    exporter.window(drifted=True, p_amount=1e-6)
    tracker = tracker.advance(exporter.sample())
    assert tracker.streak == 1
    assert not decide(POLICY, tracker, exporter.sample(), None, None, NOW).retrain
    exporter.window(drifted=True, p_amount=1e-7)
    exporter.window(drifted=True, p_amount=1e-8)
    sample = exporter.sample()
    tracker = tracker.advance(sample)
    assert tracker.streak == 3
    decision = decide(POLICY, tracker, sample, None, None, NOW)
    assert decision.retrain
    assert "3 consecutive windows" in decision.reasons[0] and "tx_amount_feature (p=1e-08)" in decision.reasons[0]
    assert "terminal_risk_7d" not in decision.reasons[0]


def test_transient_drift_never_triggers():
    exporter = DriftExporter()
    tracker = DriftTracker()
    for drifted in (True, True, False, True, True, False, True):
        exporter.window(drifted)
        tracker = tracker.advance(exporter.sample())
        assert not decide(POLICY, tracker, exporter.sample(), None, None, NOW).retrain
    assert tracker.streak == 1


def test_mixed_windows_between_checks_count_only_what_is_certain():
    exporter = DriftExporter()
    tracker = DriftTracker(streak=0)
    for drifted in (True, True, False, True):  # four windows between two checks, the last drifted
        exporter.window(drifted)
    tracker = tracker.advance(exporter.sample())
    assert tracker.streak == 1  # only the last one is known to be part of a run
    exporter.window(False)
    assert tracker.advance(exporter.sample()).streak == 0
    no_new_window = tracker.advance(exporter.sample())
    assert no_new_window.advance(exporter.sample()).streak == no_new_window.streak


def test_transformer_restart_resets_the_counters():
    tracker = DriftTracker(windows_evaluated=50, windows_drifted=10, streak=2)
    restarted = tracker.advance(DriftSample(windows_evaluated=2, windows_drifted=2, last_window_drifted=True))
    assert (restarted.windows_evaluated, restarted.streak) == (2, 2)  # counts from zero, not 2 - 50


def test_a_foreign_exposition_is_refused():
    registry = CollectorRegistry()
    Counter("fraud_predictor_requests", "x", registry=registry).inc()
    with pytest.raises(UserError, match="fraud_drift_windows_drifted_total, fraud_drift_windows_evaluated_total"):
        parse_drift_exposition(generate_latest(registry).decode(), "http://x/metrics")
    with pytest.raises(UserError, match="not a Prometheus text exposition"):
        parse_drift_exposition("fraud_drift_detected{ 1\n", "http://x/metrics")


# --- live quality ---------------------------------------------------------------------------------
def quality_row(day: int, precision: float | None, ap: float | None = 0.8, version: str = "4", labelled: int = 95):
    return DailyQuality(MODEL_NAME, version, date(2026, 3, day), 100, labelled, 5, 8, precision, 0.6, ap, 0.1)


def test_quality_below_the_floor_for_n_mature_days_triggers():
    rows = [quality_row(1, 0.9), quality_row(2, 0.4), quality_row(3, 0.3), quality_row(4, 0.45)]
    days = mature_quality_days(rows, POLICY.min_label_coverage)
    reason = quality_below_floor(days, POLICY)
    assert reason and "version 4" in reason and "2026-03-04: precision 0.450 < 0.5" in reason
    assert decide(POLICY, DriftTracker(), None, days, None, NOW).retrain


def test_quality_dip_shorter_than_n_days_or_on_immature_days_does_not_trigger():
    short = [quality_row(1, 0.9), quality_row(2, 0.9), quality_row(3, 0.3), quality_row(4, 0.3)]
    assert quality_below_floor(mature_quality_days(short, 0.9), POLICY) is None
    # the third bad day has only 50% of its labels: still maturing, ignored
    immature = [quality_row(1, 0.9), quality_row(2, 0.3), quality_row(3, 0.3), quality_row(4, 0.2, labelled=50)]
    assert quality_below_floor(mature_quality_days(immature, 0.9), POLICY) is None


def test_average_precision_floor_and_only_the_current_version_count():
    rows = [quality_row(d, 0.9, ap=0.1, version="3") for d in (1, 2, 3)] + [quality_row(4, 0.9, ap=0.9, version="4")]
    days = mature_quality_days(rows, 0.9)
    assert {d.model_version for d in days} == {"4"}
    assert quality_below_floor(days, POLICY) is None
    rows += [quality_row(d, 0.9, ap=0.2, version="4") for d in (5, 6, 7)]
    reason = quality_below_floor(mature_quality_days(rows, 0.9), POLICY)
    assert reason and "AP 0.200 < 0.3" in reason and "precision" not in reason.split("(", 1)[1]


def test_quality_is_read_from_a_real_audit_database(tmp_path):
    from sqlalchemy import insert

    from fraud.audit.store import create_audit_engine, upgrade_database
    from fraud.audit.tables import LiveQuality

    engine = create_audit_engine(f"sqlite:///{tmp_path / 'audit.db'}")
    upgrade_database(engine)
    rows = [quality_row(d, p) for d, p in ((1, 0.9), (2, 0.2), (3, 0.25), (4, 0.3))]
    with engine.begin() as connection:
        connection.execute(
            insert(LiveQuality.__table__),
            [{**{k: getattr(r, k) for k in DailyQuality.__dataclass_fields__}, "computed_at": NOW} for r in rows],
        )
    days = read_quality_days(engine, POLICY)
    assert [d.day.day for d in days] == [1, 2, 3, 4]
    assert quality_below_floor(days, POLICY).startswith("live quality of version 4 below the floor")


# --- cool-down and lock --------------------------------------------------------------------------
def test_cooldown_blocks_a_second_trigger_until_it_is_over():
    days = [QualityDay("4", date(2026, 3, d), 0.1, 0.1, 1.0) for d in (1, 2, 3)]
    blocked = decide(POLICY, DriftTracker(), None, days, NOW - timedelta(hours=23), NOW)
    assert not blocked.retrain and "cool-down until 2026-03-10T13:00:00" in blocked.blocked_by
    assert decide(POLICY, DriftTracker(), None, days, NOW - timedelta(hours=24, seconds=1), NOW).retrain


def test_lock_is_exclusive_and_released(tmp_path):
    with retrain_lock(tmp_path), pytest.raises(LockHeld), retrain_lock(tmp_path):
        pass
    with retrain_lock(tmp_path):  # released on exit
        pass


def test_a_failed_trigger_is_logged_and_does_not_start_the_cooldown(tmp_path):
    exporter = DriftExporter()
    url = exporter.serve()
    try:
        for _ in range(3):
            exporter.window(drifted=True, p_amount=1e-9)
        checker = RetrainChecker(
            policy=POLICY,
            trigger=CommandTrigger((sys.executable, "-c", "raise SystemExit(3)")),
            folder=tmp_path,
            drift_url=url,
            clock=lambda: NOW,
        )
        result = checker.check()
    finally:
        exporter.close()
    assert result.decision.retrain and not result.triggered
    assert "exited with 3" in result.trigger.detail
    (entry,) = read_trigger_log(tmp_path)
    assert entry["ok"] is False and entry["drifted_features"] == ["tx_amount_feature"]
    assert load_state(tmp_path).last_trigger_at is None


def test_cli_rejects_bad_options(tmp_path):
    env = {**os.environ, "FRAUD_DATA_DIR": str(tmp_path)}
    bad_arg = subprocess.run(
        [FRAUD, "monitor", "check", "--no-quality", "--kfp-host", "http://kfp", "--pipeline-arg", "oops"],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    assert bad_arg.returncode == 2 and "--pipeline-arg must be KEY=VALUE, got 'oops'" in bad_arg.stderr
    no_data = subprocess.run(
        [FRAUD, "monitor", "check", "--no-quality", "--kfp-host", "http://kfp"],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    assert no_data.returncode == 2 and "data_uri" in no_data.stderr
    nothing = subprocess.run(
        [FRAUD, "monitor", "check", "--no-quality", "--no-drift"],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    assert nothing.returncode == 2 and "nothing to check" in nothing.stderr


# --- end to end: real /metrics server, real command, separate processes ----------------------------
MARKER_SCRIPT = textwrap.dedent(
    """
    import os, sys, json
    with open(sys.argv[1], "a") as marker:
        marker.write(json.dumps({"reason": os.environ["FRAUD_RETRAIN_REASON"], "pid": os.getpid()}) + "\\n")
    """
)


@pytest.fixture
def loop(tmp_path):
    exporter = DriftExporter()
    url = exporter.serve()
    script = tmp_path / "retrain.py"
    script.write_text(MARKER_SCRIPT)
    marker = tmp_path / "retrained.jsonl"
    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FRAUD_", "MLFLOW_"))}
    env.update(FRAUD_DATA_DIR=str(data), FRAUD_RETRAIN_COMMAND=f"{sys.executable} {script} {marker}")

    def check(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [FRAUD, "monitor", "check", "--no-quality", "--metrics-url", url, "--drift-windows", "3", *extra],
            capture_output=True, text=True, env=env, timeout=120, check=False, cwd=tmp_path,
        )  # fmt: skip

    yield exporter, check, marker, data / "monitoring"
    exporter.close()


def test_check_triggers_once_on_sustained_drift_and_honours_the_cooldown_across_processes(loop, tmp_path):
    exporter, check, marker, state_dir = loop
    exporter.window(drifted=True, p_amount=1e-5)
    first = check()
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("no retrain") and not marker.exists()

    exporter.window(drifted=True, p_amount=1e-6)
    exporter.window(drifted=True, p_amount=1e-7)
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    second = check("--mlflow-tracking-uri", tracking)
    assert second.returncode == 0, second.stderr
    assert "retrain: feature drift in 3 consecutive windows" in second.stdout and "triggered" in second.stdout
    (run,) = [json.loads(line) for line in marker.read_text().splitlines()]
    assert "tx_amount_feature (p=1e-07)" in run["reason"]
    (entry,) = read_trigger_log(state_dir)
    assert entry["ok"] and entry["drift_streak"] == 3 and entry["mlflow_run_id"]
    import mlflow

    logged = mlflow.MlflowClient(tracking_uri=tracking).get_run(entry["mlflow_run_id"])
    assert "3 consecutive windows" in logged.data.tags["fraud.retrain.reason"]
    assert logged.data.tags["fraud.retrain.outcome"] == "ok"

    for _ in range(4):  # drift goes on: sustained again, but inside the 24 h cool-down
        exporter.window(drifted=True, p_amount=1e-8)
    third = check()
    assert third.returncode == 0, third.stderr
    assert third.stdout.startswith("no retrain (cool-down until") and "4 consecutive windows" in third.stdout
    assert len(marker.read_text().splitlines()) == 1
    assert len(read_trigger_log(state_dir)) == 1

    fourth = check("--cooldown-hours", "0")  # the cool-down is the only thing that held it back
    assert "triggered" in fourth.stdout, fourth.stdout + fourth.stderr
    assert len(marker.read_text().splitlines()) == 2


def test_a_second_checker_is_locked_out(loop):
    exporter, check, marker, state_dir = loop
    for _ in range(3):
        exporter.window(drifted=True)
    with retrain_lock(state_dir):  # another checker is mid-check
        blocked = check()
    assert blocked.returncode == 0, blocked.stderr
    assert blocked.stdout.startswith("skipped: another retraining check holds")
    assert not marker.exists()
    assert "triggered" in check().stdout
    assert marker.exists()


def test_watch_loops_check(loop, tmp_path):
    exporter, _check, _marker, state_dir = loop
    for _ in range(3):
        exporter.window(drifted=True)
    result = subprocess.run(
        [
            FRAUD, "monitor", "watch", "--interval", "1", "--iterations", "2", "--no-quality",
            "--metrics-url", exporter_url(exporter),
        ],
        capture_output=True, text=True, timeout=120, check=False, cwd=tmp_path,
        env={**os.environ, "FRAUD_DATA_DIR": str(state_dir.parent),
             "FRAUD_RETRAIN_COMMAND": f"{sys.executable} -c pass"},
    )  # fmt: skip
    lines = result.stdout.strip().splitlines()
    assert result.returncode == 0 and len(lines) == 2, result.stdout + result.stderr
    assert "triggered" in lines[0]
    # a trigger restarts the window count (the new model gets a fresh reference): nothing sustained yet
    assert lines[1].endswith("no retrain: no sustained drift or quality loss")
    assert len(read_trigger_log(state_dir)) == 1


def exporter_url(exporter: DriftExporter) -> str:
    host, port = exporter.server.server_address[:2]
    return f"http://{host}:{port}/metrics"


def test_kfp_submission_failure_is_reported_and_retried_next_time(loop):
    """The cluster path with a real kfp.Client (pipeline compiled on the fly) against a closed port."""
    exporter, check, marker, state_dir = loop
    for _ in range(3):
        exporter.window(drifted=True)
    closed = f"http://127.0.0.1:{free_port()}"
    result = check(
        "--kfp-host", closed, "--pipeline-arg", "data_uri=s3://bucket/raw", "--pipeline-arg", "small_grid=true"
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"trigger FAILED: KFP submission to {closed} failed" in result.stdout
    (entry,) = read_trigger_log(state_dir)
    assert entry["ok"] is False and entry["trigger"].startswith(f"KFP run on {closed}")
    assert load_state(state_dir).last_trigger_at is None  # no cool-down: the next check tries again
    assert not marker.exists()  # the local command is not used with --kfp-host


def test_a_stored_drift_streak_does_not_trigger_when_drift_is_not_read(tmp_path):
    from fraud.monitoring.retrain import MonitorState, save_state

    save_state(tmp_path, MonitorState(drift=DriftTracker(10, 10, streak=10), drift_source="http://old/metrics"))
    checker = RetrainChecker(
        policy=POLICY,
        trigger=CommandTrigger((sys.executable, "-c", "raise SystemExit(9)")),
        folder=tmp_path,
        drift_url=None,
        quality_engine=None,
        clock=lambda: NOW,
    )
    result = checker.check()
    assert not result.decision.retrain and result.trigger is None
    assert load_state(tmp_path).drift.streak == 10  # kept for when drift is read again
