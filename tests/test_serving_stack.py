"""The local serving stack end to end: `fraud serve` runs the real predictor (core environment,
real Feast SQLite online store) and the real drift transformer (drift environment) as processes;
`fraud score` and plain HTTP clients go through the transformer.

The bundle's drift reference sample is made of the feature vectors the predictor itself computes
for "normal" traffic (in-process `predictor.model.FraudModel` on the same Feast store), so traffic
drawn the same way must raise no drift and traffic with amounts x3 must.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fraud.bundle import REFERENCE_FILE
from fraud.config import MODEL_NAME, PROJECT_ROOT, DataLayout
from fraud.net import free_port
from tests.factories import (
    hand_made_raw_transactions,
    make_synthetic_bundle,
    materialised_sqlite_store,
    restamp_bundle_digests,
    write_raw_partitions,
)

FRAUD = str(Path(sys.executable).with_name("fraud"))
FIRST_DAY = datetime(2026, 1, 1)
N_DAYS = 20
SCORING_DAY = FIRST_DAY + timedelta(days=N_DAYS)  # the online store holds this day's snapshots
CUSTOMERS = [f"C{i:07d}" for i in range(12)]
TERMINALS = [f"T{i:07d}" for i in range(8)]
DRIFT_WINDOW = 100
STARTUP_TIMEOUT_S = 240
STORE_TIMEOUT_S = 20.0


# --- data: raw history -> offline tables -> Feast SQLite online store ------------------------------
def raw_transactions(seed: int = 5) -> pd.DataFrame:
    """A few transactions per customer and day, some fraud at the first terminal, in the raw schema."""
    return hand_made_raw_transactions(CUSTOMERS, TERMINALS, FIRST_DAY, N_DAYS, seed, amount_step=5)


def write_raw(layout: DataLayout, frame: pd.DataFrame) -> None:
    write_raw_partitions(layout, frame)


def traffic(n: int, seed: int, amount_factor: float = 1.0, prefix: str = "RQ") -> list[dict]:
    """Transactions of the known customers over the two days after the history (like live traffic:
    within the snapshots' TTL, so the online store serves every one)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        c = int(rng.integers(0, len(CUSTOMERS)))
        when = SCORING_DAY + timedelta(seconds=int(rng.integers(0, 2 * 86_400)))
        amount = (float(rng.gamma(2.0, 20.0 + 5 * c)) + 0.01) * amount_factor
        rows.append(
            {
                "transaction_id": f"{prefix}{seed:03d}{i:05d}",
                "customer_id": CUSTOMERS[c],
                "terminal_id": TERMINALS[int(rng.integers(0, len(TERMINALS)))],
                "tx_amount": round(amount, 2),
                "tx_datetime": when.isoformat(),
            }
        )
    return rows


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stack") / "data"
    patch = materialised_sqlite_store(root, raw_transactions())
    yield root
    patch.undo()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, data_root) -> Path:
    """A synthetic model whose drift reference is the predictor's own feature vectors of normal traffic."""
    from predictor.codec import parse_v1
    from predictor.features import FeastFeatureSource
    from predictor.model import FraudModel, PredictorSettings

    base = make_synthetic_bundle(tmp_path_factory.mktemp("bundle") / "model", version="5")
    # a generous lookup time-out: on a loaded machine the first Feast lookup can exceed the
    # predictor's 1 s default, and its fail-open mode would silently put defaults in the reference
    source = FeastFeatureSource.connect("sqlite", timeout_s=STORE_TIMEOUT_S)
    model = FraudModel(MODEL_NAME, PredictorSettings(bundle=str(base), online_store="sqlite"), feature_source=source)
    model.load()
    scored = model.score_request(parse_v1({"instances": traffic(400, seed=1)}, 512))
    # every entity is known to the store: the reference holds real batch features, not cold-start defaults
    assert not scored.features_missing.any(), f"{int(scored.features_missing.sum())} of 400 rows scored with defaults"
    path = base.parent / "fraud-detector"
    shutil.copytree(base, path)
    np.save(path / REFERENCE_FILE, scored.feature_matrix, allow_pickle=False)
    return restamp_bundle_digests(path)


# --- the running stack -----------------------------------------------------------------------------
def process_env(data_root: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRAUD_")}
    env["FRAUD_DATA_DIR"] = str(data_root)
    return env


class Stack:
    def __init__(self, data_root: Path, bundle: Path, work: Path, velocity: bool = False) -> None:
        self.data_root = data_root
        self.bundle = bundle
        # off by default: the drift reference holds no velocity history, live windows would drift from it
        self.velocity = velocity
        self.port, self.grpc_port, self.predictor_port = free_port(), free_port(), free_port()
        self.pid_file = work / "serve.pid"
        self.log_dir = work / "logs"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def serve_args(self) -> list[str]:
        return [
            "--bundle", str(self.bundle),
            "--port", str(self.port),
            "--grpc-port", str(self.grpc_port),
            "--predictor-port", str(self.predictor_port),
            "--online-store", "sqlite",
            "--store-timeout", str(STORE_TIMEOUT_S),
            "--drift-window", str(DRIFT_WINDOW),
            "--drift-online-ert", "0",
            "--log-dir", str(self.log_dir),
            "--velocity" if self.velocity else "--no-velocity",
        ]  # fmt: skip

    def fraud(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [FRAUD, *args],
            check=False,
            env=process_env(self.data_root),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=PROJECT_ROOT,
        )

    def supervisor_pid(self) -> int:
        return int(self.pid_file.read_text().strip())

    def metrics(self) -> dict[tuple[str, tuple], float]:
        values = {}
        for family in text_string_to_metric_families(httpx.get(f"{self.url}/metrics", timeout=5).text):
            for sample in family.samples:
                values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return values

    def metric(self, name: str, **labels) -> float | None:
        return self.metrics().get((name, tuple(sorted(labels.items()))))

    def wait_idle(self, timeout: float = 60.0) -> None:
        """Until the drift worker has handled every vector it accepted (so window_fill is current)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            values = self.metrics()
            received = values.get(("fraud_drift_vectors_received_total", ()), 0.0)
            handled = values.get(("fraud_drift_vectors_processed_total", ()), 0.0) + values.get(
                ("fraud_drift_invalid_vectors_total", ()), 0.0
            )
            if handled >= received:
                return
            time.sleep(0.1)
        raise AssertionError("the drift worker did not catch up with the queued vectors")

    def wait_for_metric(self, name: str, at_least: float, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.metric(name)
            if value is not None and value >= at_least:
                return
            time.sleep(0.25)
        raise AssertionError(f"{name} stayed at {self.metric(name)}, expected >= {at_least}")

    def drift_report(self) -> str:
        return "\n".join(
            f"{name}{dict(labels)} = {value}"
            for (name, labels), value in sorted(self.metrics().items())
            if name.startswith("fraud_drift_")
        )

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}" for p in sorted(self.log_dir.glob("*.log"))
        )


def child_pids(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


@pytest.fixture(scope="module")
def stack(tmp_path_factory, data_root, bundle):
    """Started as the demo does: `fraud serve --detach --pid-file ...`; stopped with `fraud serve stop` by a test."""
    running = Stack(data_root, bundle, tmp_path_factory.mktemp("serve"))
    result = running.fraud(
        "serve", "--detach", "--pid-file", str(running.pid_file), *running.serve_args(), timeout=STARTUP_TIMEOUT_S + 60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert running.pid_file.exists()
    yield running
    if running.pid_file.exists() and alive(running.supervisor_pid()):
        os.kill(running.supervisor_pid(), signal.SIGTERM)


# --- tests -----------------------------------------------------------------------------------------
def test_fraud_score_returns_decisions_through_the_transformer(stack):
    result = stack.fraud("score", "--url", stack.url, "--sample", "5")
    assert result.returncode == 0, result.stdout + result.stderr + stack.logs()
    output = result.stdout
    assert sum(output.count(word) for word in ("approve", "review", "decline")) >= 5
    assert "TX" in output
    assert stack.metric("fraud_transformer_requests_total", protocol="v1", status="200") >= 1


def test_fraud_score_summary_counts_every_transaction_across_batches(stack):
    before = stack.metric("fraud_transformer_requests_total", protocol="v1", status="200")
    result = stack.fraud("score", "--url", stack.url, "--sample", "7", "--batch-size", "3", "--summary")
    assert result.returncode == 0, result.stdout + result.stderr + stack.logs()
    assert "7 decisions" in result.stdout
    rows = [
        line for line in result.stdout.splitlines() if line.strip("│ ").startswith(("approve", "review", "decline"))
    ]
    counts = [int(n) for line in rows for n in line.replace("│", " ").split()[1:]]
    assert len(rows) == 3 and sum(counts) == 7
    # 7 transactions in batches of 3 -> 3 requests
    assert stack.metric("fraud_transformer_requests_total", protocol="v1", status="200") - before == 3


def test_fraud_score_v2_and_a_file(stack, tmp_path):
    file = tmp_path / "tx.jsonl"
    file.write_text("\n".join(json.dumps(t) for t in traffic(3, seed=7, prefix="FILE")))
    result = stack.fraud("score", "--url", stack.url, "--file", str(file), "--protocol", "v2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("FILE007") == 3
    assert stack.metric("fraud_transformer_requests_total", protocol="v2", status="200") >= 1


def test_v2_grpc_through_the_transformer_reaches_the_real_predictor(stack):
    """A gRPC client of the transformer (KServe's own client: the predictor module already loaded its protos)."""
    import asyncio

    import grpc
    from kserve import InferenceGRPCClient, InferInput, InferRequest

    rows = traffic(2, seed=10, prefix="GRPC")

    def request(amounts: list[float]) -> InferRequest:
        inputs = []
        for name in ("transaction_id", "customer_id", "terminal_id", "tx_amount", "tx_datetime"):
            values = amounts if name == "tx_amount" else [r[name] for r in rows]
            tensor = InferInput(name, [len(rows)], "FP64" if name == "tx_amount" else "BYTES")
            tensor.set_data_from_numpy(np.array(values, dtype=np.float64 if name == "tx_amount" else np.object_))
            inputs.append(tensor)
        return InferRequest(model_name=MODEL_NAME, infer_inputs=inputs, request_id="grpc-1")

    async def call(amounts: list[float]):
        client = InferenceGRPCClient(f"127.0.0.1:{stack.grpc_port}", timeout=30, retries=0)
        try:
            return await client.infer(request(amounts))
        finally:
            await client.close()

    response = asyncio.run(call([r["tx_amount"] for r in rows]))
    outputs = {o.name: o for o in response.outputs}

    def text(name):
        return [v.decode() if isinstance(v, bytes) else str(v) for v in outputs[name].as_numpy()]

    assert text("transaction_id") == [r["transaction_id"] for r in rows]
    assert set(text("decision")) <= {"approve", "review", "decline"}
    assert "feature_vector" not in outputs  # least disclosure: no caller of the stack has the debug scope
    with pytest.raises(grpc.aio.AioRpcError) as error:
        asyncio.run(call([-1.0, 5.0]))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "tx_amount" in error.value.details()


def test_fraud_score_reports_bad_input_and_an_unreachable_server(stack, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({**traffic(1, seed=8)[0], "tx_amount": -3}) + "\n")
    result = stack.fraud("score", "--url", stack.url, "--file", str(bad))
    assert result.returncode == 2
    assert "line 1" in result.stderr and "tx_amount" in result.stderr
    result = stack.fraud("score", "--url", f"http://127.0.0.1:{free_port()}", "--sample", "2")
    assert result.returncode == 2
    assert "cannot reach the scoring service" in result.stderr


def test_the_predictor_port_answers_only_the_transformer(stack):
    """The predictor binds loopback and needs the transformer's own token (it alone gets feature vectors)."""
    body = {"instances": traffic(1, seed=11)}
    predictor_url = f"http://127.0.0.1:{stack.predictor_port}"
    response = httpx.post(f"{predictor_url}/v1/models/{MODEL_NAME}:predict", json=body, timeout=30)
    assert response.status_code == 401
    credentials = stack.log_dir / "credentials"
    assert oct(credentials.stat().st_mode & 0o777) == "0o700"
    assert oct((credentials / "transformer-token").stat().st_mode & 0o777) == "0o600"
    through = httpx.post(f"{stack.url}/v1/models/{MODEL_NAME}:predict", json=body, timeout=30)
    assert through.status_code == 200 and "features" not in through.json()["predictions"][0]


def test_card_numbers_are_refused_by_the_transformer_before_the_predictor(stack):
    bad = {**traffic(1, seed=12)[0], "customer_id": "4111 1111 1111 1111"}
    response = httpx.post(f"{stack.url}/v1/models/{MODEL_NAME}:predict", json={"instances": [bad]}, timeout=30)
    assert response.status_code == 400
    assert "instances[0].customer_id" in response.json()["error"] and "4111" not in response.text
    pan = {**traffic(1, seed=12)[0], "terminal_id": "4111111111111111"}
    response = httpx.post(f"{stack.url}/v1/models/{MODEL_NAME}:predict", json={"instances": [pan]}, timeout=30)
    assert response.status_code == 400 and "looks like a card number" in response.json()["error"]


def test_a_transaction_the_predictor_rejects_is_a_400_through_the_transformer(stack):
    bad = {**traffic(1, seed=9)[0], "tx_amount": "lots"}
    response = httpx.post(f"{stack.url}/v1/models/{MODEL_NAME}:predict", json={"instances": [bad]}, timeout=30)
    assert response.status_code == 400
    assert "tx_amount" in response.json()["error"]


def test_drift_end_to_end(stack):
    url = f"{stack.url}/v1/models/{MODEL_NAME}:predict"
    stack.wait_idle()
    evaluated = stack.metric("fraud_drift_windows_evaluated_total") or 0.0
    fill = int(stack.metric("fraud_drift_window_fill") or 0)
    if fill:  # finish the window earlier tests started so the next ones hold only this test's traffic
        assert httpx.post(url, json={"instances": traffic(DRIFT_WINDOW - fill, seed=20)}, timeout=30).status_code == 200
        evaluated += 1
    for seed in (21, 22):  # reference-like traffic, one window
        response = httpx.post(url, json={"instances": traffic(DRIFT_WINDOW // 2, seed=seed)}, timeout=60)
        assert response.status_code == 200, response.text
        assert not any(p["features_missing"] for p in response.json()["predictions"])
    stack.wait_for_metric("fraud_drift_windows_evaluated_total", evaluated + 1)
    assert stack.metric("fraud_drift_detected") == 0, stack.drift_report()
    assert stack.metric("fraud_drift_feature_drift", feature="tx_amount_feature") == 0
    for seed in (23, 24):  # amounts x3, one window
        response = httpx.post(
            url, json={"instances": traffic(DRIFT_WINDOW // 2, seed=seed, amount_factor=3.0)}, timeout=30
        )
        assert response.status_code == 200, response.text
    stack.wait_for_metric("fraud_drift_windows_evaluated_total", evaluated + 2)
    assert stack.metric("fraud_drift_detected") == 1
    assert stack.metric("fraud_drift_feature_drift", feature="tx_amount_feature") == 1
    assert stack.metric("fraud_drift_feature_p_value", feature="tx_amount_feature") < 0.001


def test_predictor_killed_transformer_answers_503_promptly(stack):
    supervisor = stack.supervisor_pid()
    predictors = [pid for pid in child_pids(supervisor) if "-m predictor" in cmdline(pid)]
    assert len(predictors) == 1, [cmdline(pid) for pid in child_pids(supervisor)]
    os.kill(predictors[0], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while alive(predictors[0]) and time.monotonic() < deadline:
        time.sleep(0.05)
    unavailable = stack.metric("fraud_transformer_predictor_errors_total", kind="unavailable") or 0
    response = httpx.post(
        f"{stack.url}/v1/models/{MODEL_NAME}:predict", json={"instances": traffic(1, seed=30)}, timeout=30
    )
    assert response.status_code == 503, response.text
    # promptly: the refused connection is the answer - no connect or read timeout was waited for
    assert "unreachable" in response.json()["error"]
    assert stack.metric("fraud_transformer_predictor_errors_total", kind="unavailable") == unavailable + 1
    assert stack.metric("fraud_transformer_predictor_errors_total", kind="timeout") is None


def test_fraud_serve_stop_ends_the_detached_stack_and_its_children(stack):
    supervisor = stack.supervisor_pid()
    children = child_pids(supervisor)
    assert children  # the transformer, the audit writer (and the predictor being restarted)
    assert any("fraud.cli audit writer" in cmdline(pid) for pid in children), [cmdline(p) for p in children]
    result = stack.fraud("serve", "stop", "--pid-file", str(stack.pid_file))
    assert result.returncode == 0, result.stdout + result.stderr
    assert not stack.pid_file.exists()
    assert not alive(supervisor)
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [pid for pid in children if alive(pid)] == []
    result = stack.fraud("serve", "stop", "--pid-file", str(stack.pid_file))
    assert result.returncode == 2 and "no running stack" in result.stderr
    # the sidecar writer went last and flushed: every decision the tests above got is in the table
    with sqlite3.connect(stack.data_root / "audit" / "audit.db") as db:
        audited = {row[0] for row in db.execute("SELECT transaction_id FROM decisions")}
    with sqlite3.connect(stack.data_root / "audit" / "spool.db") as spool:
        assert spool.execute("SELECT count(*) FROM spool").fetchone()[0] == 0
    assert len(audited) >= 7, sorted(audited)


def wait_for_children(pid: int, count: int, timeout: float = 60.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = child_pids(pid)
        if len(children) >= count:
            return children
        time.sleep(0.05)
    raise AssertionError(f"process {pid} has children {child_pids(pid)}, expected {count}")


def test_ctrl_c_while_fraud_serve_starts_leaves_no_child_process(data_root, bundle, tmp_path):
    foreground = Stack(data_root, bundle, tmp_path)
    process = subprocess.Popen(
        [FRAUD, "serve", *foreground.serve_args()],
        env=process_env(data_root), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=PROJECT_ROOT,
    )  # fmt: skip
    try:
        children = wait_for_children(process.pid, 2)
        assert all(alive(pid) for pid in children)
        process.send_signal(signal.SIGINT)  # both servers are still importing their libraries
        output, _ = process.communicate(timeout=60)
        assert b"serving stack stopped" in output, output
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [pid for pid in children if alive(pid)] == []
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.slow
def test_ctrl_c_of_fraud_serve_leaves_no_child_process(data_root, bundle, tmp_path):
    foreground = Stack(data_root, bundle, tmp_path)
    process = subprocess.Popen(
        [FRAUD, "serve", *foreground.serve_args()],
        env=process_env(data_root), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=PROJECT_ROOT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        ready = False
        while time.monotonic() < deadline and process.poll() is None:
            try:
                ready = httpx.get(f"{foreground.url}/v2/models/{MODEL_NAME}/ready", timeout=1).status_code == 200
            except httpx.TransportError:
                ready = False
            if ready:
                break
            time.sleep(0.3)
        assert ready, (process.poll(), foreground.logs())
        children = wait_for_children(process.pid, 3)  # the audit writer starts once the predictor is ready
        # a child forked a moment ago shows its parent's command line until it has exec'd
        deadline = time.monotonic() + 10
        while not any("fraud.cli audit writer" in cmdline(p) for p in children) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(children) == 3 and {"-m predictor" in cmdline(p) for p in children} == {True, False}
        assert sum("fraud.cli audit writer" in cmdline(p) for p in children) == 1
        # a port of the running stack is reported as taken by a second `fraud serve`
        clash = foreground.fraud("serve", *foreground.serve_args())
        assert clash.returncode == 2 and f"port {foreground.port} (--port) is already in use" in clash.stderr
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=60)
        assert process.returncode == 0, output
        assert b"serving stack stopped" in output
        assert [pid for pid in children if alive(pid)] == []
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
