"""The local target end to end with real processes: predictor processes (`python -m predictor`)
for two model versions behind the local canary router, real scoring traffic, the same analysis
code reading both predictors' /metrics, promotion (alias `champion` moved in a real MLflow
SQLite registry) and the rollback of a canary that never becomes ready. Also the `record` target
through the CLI."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Self

import httpx
import pytest
from typer.testing import CliRunner

from fraud.config import MODEL_NAME, PROJECT_ROOT
from fraud.deploy import rollout as rollout_mod
from fraud.deploy.local import LocalStack, local_dir
from fraud.deploy.policy import CanaryCriteria
from fraud.deploy.rollout import AnalyseRequest, Connection, DeployRequest
from fraud.deploy.state import RolloutState
from fraud.processes import process_alive
from tests.test_deploy_support import Registry, build_registry

PREDICTOR_MAIN = PROJECT_ROOT / "predictor" / "__main__.py"


@pytest.fixture(scope="module")
def mlflow_registry(tmp_path_factory) -> Registry:
    reg = build_registry(tmp_path_factory.mktemp("mlflow-local"), 3, same_model=True)
    # version 3's model file is corrupt: its predictor exits at load, it never becomes ready
    from fraud import registry
    from tests.factories import restamp_bundle_digests

    source = Path(registry.model_version_source(reg.versions[2], uri=reg.uri).removeprefix("file://"))
    (source / "model.ubj").write_bytes(b"not an xgboost model")
    restamp_bundle_digests(source)  # listed digests match: the load itself must fail
    return reg


class Traffic:
    """Scoring requests through the router from a background thread."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.served: list[str] = []
        self.statuses: list[int] = []
        self.prefix = f"t{time.time_ns()}-"  # a new transaction per request (the predictors are idempotent)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=10) as client:
            i = 0
            while not self._stop.is_set():
                body = {
                    "instances": [
                        {
                            "transaction_id": f"{self.prefix}{i}",
                            "customer_id": f"c{i % 50}",
                            "terminal_id": f"k{i % 30}",
                            "tx_amount": 10.0 + i % 200,
                            "tx_datetime": "2026-11-01T12:00:00",
                        }
                    ]
                }
                try:
                    answer = client.post(f"{self.url}/v1/models/{MODEL_NAME}:predict", json=body)
                    self.statuses.append(answer.status_code)
                    self.served.append(answer.headers.get("x-fraud-model-version", ""))
                except httpx.HTTPError:
                    self.statuses.append(0)
                i += 1

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(15)


def _deploy(reg: Registry, version: str, percent: int, **options):
    return rollout_mod.deploy(
        DeployRequest(
            MODEL_NAME,
            version,
            "local",
            "local",
            percent,
            mlflow_tracking_uri=reg.uri,
            connection=Connection(ready_timeout_seconds=240),
            **options,
        )
    )


def _analyse(reg: Registry, version: str, window: int):
    criteria = CanaryCriteria(min_successful_scorings=20, min_decision_count=20, max_p99_seconds=2.0)
    return rollout_mod.analyse(
        AnalyseRequest(
            MODEL_NAME,
            version,
            "local",
            "local",
            "",
            window,
            mlflow_tracking_uri=reg.uri,
            criteria=criteria,
            connection=Connection(ready_timeout_seconds=240),
        )
    )


@pytest.mark.slow  # three predictor start-ups: ~1.5 min on a busy 2-core machine
@pytest.mark.skipif(not PREDICTOR_MAIN.is_file(), reason="predictor/__main__.py is not written yet")
def test_local_canary_is_promoted_and_a_broken_one_rolled_back(data_dir, mlflow_registry):
    reg = mlflow_registry
    reg.reset(champion=reg.versions[0])
    v1, v2, v3 = reg.versions
    stack = LocalStack(local_dir(), MODEL_NAME)
    try:
        first = _deploy(reg, v1, 50, first_deploy=True)
        assert first.state is RolloutState.DEPLOYED and first.previous_version == ""
        router = stack.load().router_url
        with Traffic(router) as traffic:
            assert _analyse(reg, v1, 4).state is RolloutState.PROMOTED
        assert set(traffic.served) == {v1} and set(traffic.statuses) == {200}

        canary = _deploy(reg, v2, 50)
        assert canary.state is RolloutState.DEPLOYED and canary.previous_version == v1
        old_stable_pid = stack.load().stable.pid
        with Traffic(router) as traffic:
            final = _analyse(reg, v2, 6)
        assert final.state is RolloutState.PROMOTED, final.reason
        assert set(traffic.served) == {v1, v2} and set(traffic.statuses) == {200}
        assert final.analysis["canary_requests"] >= 20 and final.analysis["stable_requests"] >= 20
        assert reg.champion() == v2 and reg.decisions(v2)["canary"] == "promoted"
        state = stack.load()
        assert state.stable.version == v2 and state.canary is None
        deadline = time.monotonic() + 30
        while process_alive(old_stable_pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not process_alive(old_stable_pid)

        broken = _deploy(reg, v3, 50)
        assert broken.state is RolloutState.ROLLED_BACK and "never became ready" in broken.reason
        assert reg.champion() == v2 and reg.decisions(v3)["canary"] == "rolled_back"
        with Traffic(router) as traffic:
            time.sleep(1.5)
        assert set(traffic.served) == {v2} and set(traffic.statuses) == {200}
        status = rollout_mod.status("local", MODEL_NAME, "local")
        assert status["serving"]["stable"]["version"] == v2 and status["serving"]["stable"]["healthy"]
        assert status["record"]["state"] == "rolled_back"
    finally:
        stack.stop_all()
    assert not process_alive(stack.load().router_pid or -1)


def test_record_target_through_the_cli(data_dir, mlflow_registry):
    from fraud.cli import app

    reg = mlflow_registry
    reg.reset(champion=reg.versions[0])
    runner = CliRunner()
    args = [
        "deploy",
        "--target",
        "record",
        "--version",
        reg.versions[1],
        "--mlflow-tracking-uri",
        reg.uri,
        "--window",
        "1",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "promoted" in result.output
    assert reg.champion() == reg.versions[1]
    assert reg.decisions(reg.versions[1])["canary"] == "promoted"
    again = runner.invoke(app, args)  # idempotent: the finished rollout is reported, nothing redone
    assert again.exit_code == 0 and "promoted" in again.output

    status = runner.invoke(app, ["deploy", "status", "--target", "record", "--json"])
    assert status.exit_code == 0 and '"state": "promoted"' in status.output

    back = runner.invoke(
        app,
        ["deploy", "rollback", "--target", "record", "--reason", "analyst complaint", "--mlflow-tracking-uri", reg.uri],
    )
    assert back.exit_code == 0, back.output
    assert reg.champion() == reg.versions[0]
    assert "analyst complaint" in reg.decisions(reg.versions[1])["rollback"]

    bad = runner.invoke(app, ["deploy", "--target", "cloud", "--version", "1"])
    assert bad.exit_code != 0
    missing = runner.invoke(app, ["deploy", "--target", "record", "--version", "999", "--mlflow-tracking-uri", reg.uri])
    assert missing.exit_code != 0
