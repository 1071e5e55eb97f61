"""The rollout failures users hit, each on the local target with real processes: predictor
processes (`python -m predictor`) behind the local canary router, real scoring traffic, the
analysis reading the predictors' /metrics (the same Prometheus text format Prometheus scrapes)
and a real MLflow SQLite registry.

* a canary with thresholds that decline everything (score distribution unchanged) is rolled back
  on its decision shares, before its window ends;
* a canary process killed mid-window gets no more traffic (router health checks) and the rollout
  aborts at once;
* a version rolled back before is rolled out again only with --retry, with a word that the old
  record is a past result;
* a candidate that loads but returns two outputs per row is rolled back with a one-line reason
  (the traceback stays in the predictor's log);
* no canary against a stable version that is down, and no rollback that leaves nothing serving
  (both through the console entry point: exit code and message);
* `fraud deploy history` lists the rollouts with their decisions and reasons.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from fraud.config import MODEL_NAME
from fraud.deploy import rollout as rollout_mod
from fraud.deploy.local import LocalStack, local_dir
from fraud.deploy.policy import AbortRules, CanaryCriteria, RolloutPolicy, Step
from fraud.deploy.rollout import AnalyseRequest, Connection, DeployRequest
from fraud.deploy.state import RolloutState
from fraud.processes import process_alive
from tests.test_deploy_local import Traffic
from tests.test_deploy_support import Registry, build_registry, register_variant

pytestmark = pytest.mark.slow  # four predictor start-ups: ~1.5-2 min on a busy 2-core machine

CRITERIA = CanaryCriteria(min_successful_scorings=20, min_decision_count=20, max_p99_seconds=2.0)


def _policy(window: int) -> RolloutPolicy:
    return RolloutPolicy(
        steps=(Step(50, window),),
        evaluation_interval_seconds=0.5,
        criteria=CRITERIA,
        abort=AbortRules(consecutive_errors=10, wide_breach_factor=3.0),
    )


@pytest.fixture(scope="module")
def mlflow_registry(tmp_path_factory) -> tuple[Registry, dict[str, str]]:
    root = tmp_path_factory.mktemp("mlflow-scenarios")
    reg = build_registry(root, 2, same_model=True)
    variants = {kind: register_variant(reg, root, kind) for kind in ("decline-everything", "two-outputs")}
    return reg, variants


def _deploy(reg: Registry, version: str, **options):
    return rollout_mod.deploy(
        DeployRequest(
            MODEL_NAME,
            version,
            "local",
            "local",
            50,
            mlflow_tracking_uri=reg.uri,
            connection=Connection(ready_timeout_seconds=240),
            policy=options.pop("policy", _policy(30)),
            **options,
        )
    )


def _analyse(reg: Registry, version: str, window: int, prometheus_url: str = ""):
    """The analysis of the local canary: it scrapes the predictors itself, or reads `prometheus_url`."""
    return rollout_mod.analyse(
        AnalyseRequest(
            MODEL_NAME,
            version,
            "local",
            "local",
            prometheus_url,
            window,
            mlflow_tracking_uri=reg.uri,
            connection=Connection(ready_timeout_seconds=240),
            policy=_policy(window),
        )
    )


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """The real console entry point (`fraud ...`), as an operator runs it."""
    fraud = Path(sys.executable).parent / "fraud"
    return subprocess.run([str(fraud), *args], capture_output=True, text=True, env=env, timeout=300, check=False)


def test_rollouts_protect_production_on_the_local_target(data_dir, mlflow_registry):
    reg, variants = mlflow_registry
    reg.reset(champion=reg.versions[0])
    v1, v2 = reg.versions
    env = {**os.environ, "FRAUD_DATA_DIR": str(data_dir)}
    stack = LocalStack(local_dir(), MODEL_NAME)
    try:
        # nothing serves: a canary is refused without --first-deploy
        refused = _cli(
            "deploy",
            "--target",
            "local",
            "--namespace",
            "local",
            "--version",
            v1,
            "--mlflow-tracking-uri",
            reg.uri,
            env=env,
        )
        assert refused.returncode == 2 and "--first-deploy" in refused.stderr + refused.stdout
        assert "Traceback" not in refused.stderr + refused.stdout
        first = _deploy(reg, v1, first_deploy=True)
        assert first.state is RolloutState.DEPLOYED and first.canary_traffic_percent == 100
        router = stack.load().router_url
        with Traffic(router) as traffic:
            assert _analyse(reg, v1, 3).state is RolloutState.PROMOTED
        assert set(traffic.statuses) == {200}

        # a rollback that would leave nothing serving is refused, and v1 keeps serving
        back = _cli(
            "deploy",
            "rollback",
            "--target",
            "local",
            "--namespace",
            "local",
            "--reason",
            "test",
            "--mlflow-tracking-uri",
            reg.uri,
            env=env,
        )
        assert back.returncode == 2 and "leave nothing serving" in back.stderr + back.stdout
        assert stack.healthy(stack.load().stable) and reg.champion() == v1

        # same model, thresholds that decline everything: rolled back on decision shares, early
        declining = variants["decline-everything"]
        assert _deploy(reg, declining).state is RolloutState.DEPLOYED
        with Traffic(router) as traffic:
            final = _analyse(reg, declining, 120)
        assert final.state is RolloutState.ROLLED_BACK
        assert final.step_results[-1]["early"] is True
        assert "decision_share.decline" in final.reason and final.reason.startswith("step 1 (50%), aborted early")
        assert final.analysis["aborted_after_seconds"] < 120
        assert reg.decisions(declining)["canary"] == "rolled_back" and reg.champion() == v1
        assert set(traffic.statuses) == {200}
        assert stack.load().canary is None

        # retrying it: refused with a word that the record is a past result, then allowed with --retry
        again = _cli(
            "deploy",
            "--target",
            "local",
            "--namespace",
            "local",
            "--version",
            declining,
            "--mlflow-tracking-uri",
            reg.uri,
            env=env,
        )
        assert again.returncode == 2
        assert "past result" in again.stderr + again.stdout and "--retry" in again.stderr + again.stdout

        # the canary process is killed mid-window: no traffic to it, the rollout aborts at once
        assert _deploy(reg, v2).state is RolloutState.DEPLOYED
        canary_pid = stack.load().canary.pid
        outcome: dict[str, object] = {}
        with Traffic(router) as traffic:
            watcher = threading.Thread(target=lambda: outcome.update(final=_analyse(reg, v2, 120)))
            watcher.start()
            while traffic.served.count(v2) < 20:
                threading.Event().wait(0.05)
            sent_before_kill = len(traffic.statuses)
            os.killpg(canary_pid, signal.SIGKILL)
            watcher.join(120)
            after = traffic.statuses[sent_before_kill:]
        killed = outcome["final"]
        assert killed.state is RolloutState.ROLLED_BACK and killed.step_results[-1]["early"] is True
        assert killed.reason.startswith("step 1 (50%), aborted early, metrics: cannot scrape version")
        assert not process_alive(canary_pid)
        # one request may have been in flight when the process died; every other one was served
        assert after.count(502) <= 1 and after.count(200) >= len(after) - 1
        assert reg.champion() == v1

        # a candidate that loads but returns two outputs per row: one-line reason, no traceback
        broken = _deploy(reg, variants["two-outputs"])
        assert broken.state is RolloutState.ROLLED_BACK
        assert broken.reason.startswith("readiness: canary never became ready: predictor for version")
        assert "\n" not in broken.reason and "Traceback" not in broken.reason
        stored = reg.decisions(variants["two-outputs"])["canary.reason"]
        assert stored == broken.reason and "Traceback" not in stored

        # the history lists every rollout with its decision and reason
        listing = _cli("deploy", "history", "--target", "local", "--namespace", "local", "--json", env=env)
        assert listing.returncode == 0, listing.stderr
        import json

        rows = [(r["model_version"], r["state"]) for r in json.loads(listing.stdout)]
        assert rows == [
            (v1, "promoted"),
            (declining, "rolled_back"),
            (v2, "rolled_back"),
            (variants["two-outputs"], "rolled_back"),
        ]

        # the stable predictor goes down: a new canary is refused (nothing to compare with)
        stable = stack.load().stable
        os.killpg(stable.pid, signal.SIGKILL)
        while process_alive(stable.pid):
            threading.Event().wait(0.05)
        down = _cli(
            "deploy",
            "--target",
            "local",
            "--namespace",
            "local",
            "--version",
            v2,
            "--retry",
            "--mlflow-tracking-uri",
            reg.uri,
            env=env,
        )
        assert down.returncode == 2
        assert f"stable version {v1} in local/local is unhealthy" in down.stderr + down.stdout
        assert reg.champion() == v1
        assert httpx.get(f"{router}/-/routes", timeout=5).json()["stable"]["version"] == v1
    finally:
        stack.stop_all()
