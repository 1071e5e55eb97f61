"""The transformer as a real process in front of a small real upstream.

The upstream is a stand-in predictor written here: a threaded HTTP server on loopback that speaks
the predictor's response formats (V1 `predictions[i]["features"]`, V2 output `feature_vector`)
and derives each transaction's amount feature from the amount sent, so shifted traffic shifts the
feature vectors. The end-to-end test through the real predictor lives in the core suite
(tests/test_serving_stack.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import AMOUNT, FEATURE_NAMES, free_port, sample_vectors
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

MODEL = "fraud-detector"
#: Bearer tokens of the test transformers (`--token-file`): scoring with the feature vectors, scoring only
DEBUG_TOKEN = "debug-token-0123456789abcdef"
SCORE_TOKEN = "score-token-0123456789abcdef"
TOKEN_LINES = f"{DEBUG_TOKEN} score,debug\n{SCORE_TOKEN} score\n"
DEBUG_HEADERS = {"authorization": f"Bearer {DEBUG_TOKEN}"}


def post(url: str, **kwargs) -> httpx.Response:
    """httpx.post with the debug token unless the call sets its own Authorization."""
    return httpx.post(url, headers={**DEBUG_HEADERS, **kwargs.pop("headers", {})}, **kwargs)


PROJECT_DIR = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT_S = 300  # a loaded CI machine imports KServe and Alibi Detect slowly


# --- the stand-in predictor ---------------------------------------------------------------------
def feature_vector(transaction_id: str, amount: float) -> list[float]:
    seed = int("".join(ch for ch in transaction_id if ch.isdigit()) or "0")
    vector = sample_vectors(1, seed=seed)[0]
    vector[AMOUNT] = amount
    return vector.tolist()


STAND_IN_SERVER_METADATA = {"name": "kserve", "version": "0.21.0", "extensions": ["model_repository_extension"]}
STAND_IN_MODEL_METADATA = {
    "name": MODEL,
    "versions": None,
    "platform": "",
    "inputs": [{"name": "transaction_id", "datatype": "BYTES", "shape": [-1]}],
    "outputs": [{"name": "decision", "datatype": "BYTES", "shape": [-1]}],
}


@dataclass
class StandInPredictor:
    port: int
    paths: list[str] = field(default_factory=list)
    #: the request headers of every POST, in order (lower-case names)
    headers: list[dict[str, str]] = field(default_factory=list)
    #: the bytes of every answer sent, in order
    answers: list[bytes] = field(default_factory=list)
    #: transactions whose id starts with "SLOW" are answered after this many seconds
    slow_seconds: float = 3.0
    #: False: the readiness routes answer 503, as the real predictor's do on a lost online store
    ready: bool = True
    #: set by stop(): connections kept alive from before are closed without an answer
    stopped: bool = False
    server: ThreadingHTTPServer | None = None

    def start(self) -> StandInPredictor:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep pytest output quiet
                return

            def _send(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                owner.answers.append(data)
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if owner.stopped:
                    self.close_connection = True
                    return
                # the real predictor's GET routes (KServe's ModelServer); anything else is a 404
                answers = {
                    "/": {"status": "alive"},
                    "/v2": STAND_IN_SERVER_METADATA,
                    "/v2/health/live": {"live": True},
                    "/v2/health/ready": {"ready": True},
                    f"/v2/models/{MODEL}": STAND_IN_MODEL_METADATA,
                    f"/v2/models/{MODEL}/ready": {"name": MODEL, "ready": True},
                }
                readiness = ("/v2/health/ready", f"/v2/models/{MODEL}/ready")
                if self.path in readiness and not owner.ready:
                    self._send(503, {"error": "Server is not ready."})
                elif self.path in answers:
                    self._send(200, answers[self.path])
                else:
                    self._send(404, {"error": f"no route {self.path}"})

            def do_POST(self) -> None:
                owner.paths.append(self.path)
                owner.headers.append({k.lower(): v for k, v in self.headers.items()})
                raw = self.rfile.read(int(self.headers["content-length"]))
                if self.headers.get("inference-header-content-length"):
                    # like KServe 0.21's model server: the binary tensor extension is not parsed
                    self._send(400, {"detail": "There was an error parsing the body"})
                    return
                if b'"SLOW' in raw:
                    time.sleep(owner.slow_seconds)
                try:
                    body = json.loads(raw)
                    if self.path == f"/v1/models/{MODEL}:predict":
                        self._v1(body)
                    elif self.path == f"/v2/models/{MODEL}/infer":
                        self._v2(body)
                    else:
                        self._send(404, {"error": f"no route {self.path}"})
                except (ValueError, KeyError, TypeError, AttributeError, IndexError):
                    # the real predictor refuses any malformed request with a 400
                    self._send(400, {"error": "malformed request"})

            def _v1(self, body: dict) -> None:
                predictions = []
                for i, tx in enumerate(body["instances"]):
                    if tx["tx_amount"] <= 0:
                        self._send(400, {"error": f"instances[{i}].tx_amount: must be > 0, got {tx['tx_amount']}"})
                        return
                    predictions.append(
                        {
                            "transaction_id": tx["transaction_id"],
                            "fraud_probability": 0.1,
                            "decision": "approve",
                            "features": dict(
                                zip(FEATURE_NAMES, feature_vector(tx["transaction_id"], tx["tx_amount"]), strict=True)
                            ),
                        }
                    )
                self._send(200, {"predictions": predictions})

            def _v2(self, body: dict) -> None:
                inputs = {tensor["name"]: tensor["data"] for tensor in body["inputs"]}
                ids, amounts = inputs["transaction_id"], inputs["tx_amount"]
                if any(a <= 0 for a in amounts):
                    self._send(400, {"error": "input 'tx_amount'[0]: must be > 0"})
                    return
                vectors = [feature_vector(t, a) for t, a in zip(ids, amounts, strict=True)]
                self._send(
                    200,
                    {
                        "model_name": MODEL,
                        "model_version": "7",
                        "id": body.get("id", "stand-in"),
                        "outputs": [
                            {"name": "transaction_id", "datatype": "BYTES", "shape": [len(ids)], "data": ids},
                            {
                                "name": "decision",
                                "datatype": "BYTES",
                                "shape": [len(ids)],
                                "data": ["approve"] * len(ids),
                            },
                            {
                                "name": "feature_vector",
                                "datatype": "FP64",
                                "shape": [len(ids), len(FEATURE_NAMES)],
                                "data": [v for row in vectors for v in row],
                            },
                        ],
                    },
                )

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.stopped = True
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


# --- the transformer process ----------------------------------------------------------------------
@dataclass
class Transformer:
    process: subprocess.Popen
    http_port: int
    grpc_port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def metrics(self) -> dict[tuple[str, tuple], float]:
        text = httpx.get(f"{self.url}/metrics", timeout=5).text
        values = {}
        for family in text_string_to_metric_families(text):
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

    def wait_for_metric(self, name: str, at_least: float, timeout: float = 60.0, **labels) -> float:
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            value = self.metric(name, **labels)
            if value is not None and value >= at_least:
                return value
            time.sleep(0.2)
        raise AssertionError(
            f"{name}{labels} stayed at {value}, expected >= {at_least}\n{self.log.read_text()[-3000:]}"
        )


def spawn_transformer(bundle: Path, predictor_port: int, log: Path, *extra: str) -> Transformer:
    """Start the transformer process without waiting for it (its output unbuffered into `log`)."""
    http_port, grpc_port = free_port(), free_port()
    token_file = log.parent / "tokens"
    token_file.write_text(TOKEN_LINES)
    command = [
        sys.executable, "-m", "drift_transformer",
        "--model_name", MODEL,
        "--predictor_host", f"127.0.0.1:{predictor_port}",
        "--protocol", "v2",
        "--http_port", str(http_port),
        "--grpc_port", str(grpc_port),
        "--bundle", str(bundle),
        "--predictor_request_timeout_seconds", "10",
        "--token-file", str(token_file),
        *extra,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # the log file shows every line as it is written
    process = subprocess.Popen(command, cwd=PROJECT_DIR, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)
    return Transformer(process, http_port, grpc_port, log)


def start_transformer(bundle: Path, predictor_port: int, log: Path, *extra: str) -> Transformer:
    transformer = spawn_transformer(bundle, predictor_port, log, *extra)
    process = transformer.process
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"transformer exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{transformer.url}/v2/models/{MODEL}/ready", timeout=1).status_code == 200:
                return transformer
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    stop_process(process)
    raise AssertionError(f"transformer not ready after {STARTUP_TIMEOUT_S}s:\n{log.read_text()[-3000:]}")


def stop_process(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


@pytest.fixture(scope="module")
def module_dir(tmp_path_factory) -> Path:
    from conftest import write_bundle

    path = tmp_path_factory.mktemp("transformer")
    write_bundle(path / "bundle")
    return path


@pytest.fixture(scope="module")
def predictor() -> Iterator[StandInPredictor]:
    stand_in = StandInPredictor(free_port()).start()
    yield stand_in
    stand_in.stop()


@pytest.fixture(scope="module")
def transformer(module_dir, predictor) -> Iterator[Transformer]:
    running = start_transformer(
        module_dir / "bundle",
        predictor.port,
        module_dir / "transformer.log",
        "--drift-window-size", "100",
        "--online-ert", "200",
        "--online-window-sizes", "20",
        "--online-bootstraps", "700",
        "--online-max-vectors-per-second", "2000",  # this module's traffic stays within the one-second burst
    )  # fmt: skip
    yield running
    stop_process(running.process)
    assert running.process.returncode is not None


def transactions(n: int, start: int, amount_factor: float = 1.0, seed: int = 0) -> list[dict]:
    amounts = np.random.default_rng(seed).gamma(2.0, 30.0, n) * amount_factor
    return [
        {
            "transaction_id": f"TX{start + i:010d}",
            "customer_id": "C0000001",
            "terminal_id": "T0000001",
            "tx_amount": round(float(a), 2),
            "tx_datetime": "2026-11-29T10:00:00",
        }
        for i, a in enumerate(amounts)
    ]


def v2_body(txs: list[dict]) -> dict:
    n = len(txs)
    return {
        "id": "req-1",
        "inputs": [
            {"name": "transaction_id", "datatype": "BYTES", "shape": [n], "data": [t["transaction_id"] for t in txs]},
            {"name": "customer_id", "datatype": "BYTES", "shape": [n], "data": [t["customer_id"] for t in txs]},
            {"name": "terminal_id", "datatype": "BYTES", "shape": [n], "data": [t["terminal_id"] for t in txs]},
            {"name": "tx_amount", "datatype": "FP64", "shape": [n], "data": [t["tx_amount"] for t in txs]},
            {"name": "tx_datetime", "datatype": "BYTES", "shape": [n], "data": [t["tx_datetime"] for t in txs]},
        ],
    }


# --- tests ------------------------------------------------------------------------------------------
def test_v1_request_is_forwarded_and_answer_returned_unchanged(transformer, predictor):
    txs = transactions(3, start=1)
    response = post(f"{transformer.url}/v1/models/{MODEL}:predict", json={"instances": txs}, timeout=10)
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert [p["transaction_id"] for p in predictions] == [t["transaction_id"] for t in txs]
    expected = feature_vector(txs[1]["transaction_id"], txs[1]["tx_amount"])
    assert [predictions[1]["features"][name] for name in FEATURE_NAMES] == pytest.approx(expected)
    assert predictor.paths[-1] == f"/v1/models/{MODEL}:predict"
    assert transformer.metric("fraud_transformer_requests_total", protocol="v1", status="200") >= 1


def test_v2_rest_request_is_forwarded_to_the_v2_endpoint(transformer, predictor):
    txs = transactions(4, start=100)
    response = post(f"{transformer.url}/v2/models/{MODEL}/infer", json=v2_body(txs), timeout=10)
    assert response.status_code == 200, response.text
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    assert outputs["transaction_id"]["data"] == [t["transaction_id"] for t in txs]
    assert outputs["feature_vector"]["shape"] == [4, len(FEATURE_NAMES)]
    assert outputs["feature_vector"]["data"][: len(FEATURE_NAMES)] == pytest.approx(
        feature_vector(txs[0]["transaction_id"], txs[0]["tx_amount"])
    )
    assert predictor.paths[-1] == f"/v2/models/{MODEL}/infer"


def test_v2_grpc_request_from_a_client_is_forwarded(transformer, predictor):
    import asyncio

    from kserve import InferenceGRPCClient, InferInput, InferRequest

    txs = transactions(2, start=200)

    async def call():
        client = InferenceGRPCClient(f"127.0.0.1:{transformer.grpc_port}", timeout=10)
        inputs = []
        for name, dtype in [("transaction_id", "BYTES"), ("customer_id", "BYTES"), ("terminal_id", "BYTES"),
                            ("tx_amount", "FP64"), ("tx_datetime", "BYTES")]:  # fmt: skip
            values = [t[name] for t in txs]
            tensor = InferInput(name, [len(txs)], dtype)
            array = np.array(values, dtype=np.float64 if dtype == "FP64" else np.object_)
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        try:
            request = InferRequest(model_name=MODEL, infer_inputs=inputs, request_id="g1")
            return await client.infer(request, headers=tuple(DEBUG_HEADERS.items()))
        finally:
            await client.close()

    response = asyncio.run(call())
    outputs = {o.name: o for o in response.outputs}
    vectors = outputs["feature_vector"].as_numpy()
    assert vectors.shape == (2, len(FEATURE_NAMES))
    assert vectors[1, AMOUNT] == pytest.approx(txs[1]["tx_amount"])
    assert predictor.paths[-1] == f"/v2/models/{MODEL}/infer"
    assert transformer.metric("fraud_transformer_requests_total", protocol="grpc-v2", status="200") >= 1


def test_v1_body_without_json_content_type_is_accepted_and_garbage_is_a_400(transformer, predictor):
    url = f"{transformer.url}/v1/models/{MODEL}:predict"
    txs = transactions(1, start=400)
    form = {"content-type": "application/x-www-form-urlencoded"}  # what `curl -d` sends
    response = post(url, content=json.dumps({"instances": txs}), headers=form, timeout=10)
    assert response.status_code == 200, response.text
    assert response.json()["predictions"][0]["transaction_id"] == txs[0]["transaction_id"]
    response = post(url, content=b"instances=1", headers=form, timeout=10)
    assert response.status_code == 400
    assert "not valid JSON" in response.json()["error"]
    response = post(url, json=[1, 2], timeout=10)
    assert response.status_code == 400
    assert "must be a JSON object" in response.json()["error"]


def test_predictor_400_is_passed_through_with_its_body(transformer):
    bad = transactions(2, start=300)
    bad[1]["tx_amount"] = -5
    response = post(f"{transformer.url}/v1/models/{MODEL}:predict", json={"instances": bad}, timeout=10)
    assert response.status_code == 400
    assert response.json() == {"error": "instances[1].tx_amount: must be > 0, got -5"}
    v2 = v2_body(bad)
    response = post(f"{transformer.url}/v2/models/{MODEL}/infer", json=v2, timeout=10)
    assert response.status_code == 400
    assert response.json() == {"error": "input 'tx_amount'[0]: must be > 0"}
    assert transformer.metric("fraud_transformer_requests_total", protocol="v1", status="400") >= 1
    assert transformer.metric("fraud_transformer_predictor_errors_total", kind="http_4xx") >= 2


def test_drift_metric_rises_under_shifted_traffic(transformer):
    url = f"{transformer.url}/v1/models/{MODEL}:predict"
    transformer.wait_idle()
    before = transformer.metric("fraud_drift_windows_evaluated_total") or 0.0
    # complete the window the earlier tests started, so the next windows hold only this test's traffic
    fill = int(transformer.metric("fraud_drift_window_fill") or 0)
    if fill:
        post(url, json={"instances": transactions(100 - fill, start=5000, seed=9)}, timeout=10)
        before += 1
    for batch in range(5):  # reference-like: one window of 100
        response = post(url, json={"instances": transactions(20, start=10_000 + 20 * batch, seed=batch)}, timeout=10)
        assert response.status_code == 200
    transformer.wait_for_metric("fraud_drift_windows_evaluated_total", before + 1)
    assert transformer.metric("fraud_drift_detected") == 0
    assert transformer.metric("fraud_drift_feature_drift", feature="tx_amount_feature") == 0
    for batch in range(5):  # amounts x3: one window of 100
        txs = transactions(20, start=20_000 + 20 * batch, amount_factor=3.0, seed=100 + batch)
        assert post(url, json={"instances": txs}, timeout=10).status_code == 200
    transformer.wait_for_metric("fraud_drift_windows_evaluated_total", before + 2)
    assert transformer.metric("fraud_drift_detected") == 1
    assert transformer.metric("fraud_drift_feature_drift", feature="tx_amount_feature") == 1
    assert transformer.metric("fraud_drift_feature_p_value", feature="tx_amount_feature") < 0.001
    # the online detector was configured on the worker thread and followed the same stream
    assert transformer.metric("fraud_drift_online_ready") == 1
    assert transformer.metric("fraud_drift_online_detections_total") >= 1
    assert transformer.metric("fraud_drift_queue_dropped_vectors_total") == 0
    assert transformer.metric("fraud_drift_online_vectors_skipped_total") == 0


#: what KServe and uvicorn write per request when asked to (kserve.trace: latencies and the timing
#: middleware's wall/CPU lines; uvicorn.access; FastAPI's ORJSONResponse deprecation warning)
PER_REQUEST_LOG_MARKERS = ("kserve.trace", "uvicorn.access", "ORJSONResponse is deprecated")


def test_request_path_writes_no_log_lines(transformer):
    before = transformer.log.read_text()
    url = f"{transformer.url}/v1/models/{MODEL}:predict"
    for i in range(5):
        assert post(url, json={"instances": transactions(2, start=30_000 + 2 * i)}, timeout=10).status_code == 200
    v2 = post(f"{transformer.url}/v2/models/{MODEL}/infer", json=v2_body(transactions(2, start=1)), timeout=10)
    assert v2.status_code == 200
    new_lines = transformer.log.read_text()[len(before) :]
    assert [line for line in new_lines.splitlines() if any(m in line for m in PER_REQUEST_LOG_MARKERS)] == []


def test_predictor_down_answers_503_fast(module_dir):
    dead_port = free_port()  # nothing listens there
    down = start_transformer(
        module_dir / "bundle", dead_port, module_dir / "down.log", "--online-ert", "0",
        "--enable_latency_logging", "true", "--access-log", "true",
    )  # fmt: skip
    try:
        response = post(
            f"{down.url}/v1/models/{MODEL}:predict", json={"instances": transactions(1, start=1)}, timeout=10
        )
        assert response.status_code == 503
        # fast: the refused connection is the answer - no connect or read timeout was waited for
        assert "unreachable" in response.json()["error"]
        assert f"127.0.0.1:{dead_port}" not in response.text  # 5xx bodies name no internal address
        assert down.metric("fraud_transformer_predictor_errors_total", kind="timeout") is None
        response = post(f"{down.url}/v2/models/{MODEL}/infer", json=v2_body(transactions(1, start=1)), timeout=10)
        assert response.status_code == 503
        assert down.metric("fraud_transformer_predictor_errors_total", kind="unavailable") == 2
        assert down.metric("fraud_transformer_requests_total", protocol="v1", status="503") == 1
        # asked for, the per-request lines are back (so the test above can see them when they are there)
        log = down.log.read_text()
        assert f"predictor at 127.0.0.1:{dead_port} is unreachable" in log  # the detail goes to the log
        assert f"kserve.trace kserve.io.v1.models.{MODEL}:predict" in log
        assert "uvicorn.access" in log and f"POST /v2/models/{MODEL}/infer" in log
    finally:
        stop_process(down.process)


def test_unreadable_bundle_exits_with_a_clear_message(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "drift_transformer", "--predictor_host", "127.0.0.1:1", "--bundle", str(tmp_path)],
        cwd=PROJECT_DIR,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert f"no bundle.json in {tmp_path}" in result.stdout + result.stderr


def test_ready_only_once_the_online_detector_is_configured(module_dir, predictor):
    """From the moment the port opens: not ready (server and model) while the online detector's
    thresholds are being configured, ready afterwards; whenever ready is reported, the detector is
    configured. Once ready, batched traffic feeds the online detector at most its rate limit."""
    running = spawn_transformer(
        module_dir / "bundle",
        predictor.port,
        module_dir / "readiness.log",
        "--drift-window-size", "100",
        "--online-ert", "500",
        "--online-window-sizes", "50",
        "--online-max-vectors-per-second", "50",
    )  # fmt: skip
    model_ready_url = f"{running.url}/v2/models/{MODEL}/ready"
    observed_not_ready = []
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            assert time.monotonic() < deadline, f"not ready in time:\n{running.log.read_text()[-3000:]}"
            assert running.process.poll() is None, running.log.read_text()[-3000:]
            try:
                model_ready = httpx.get(model_ready_url, timeout=2).status_code
                server_ready = httpx.get(f"{running.url}/v2/health/ready", timeout=2).status_code
                online_ready = running.metric("fraud_drift_online_ready")  # read after the readiness answers
            except httpx.TransportError:
                time.sleep(0.05)
                continue
            assert {model_ready, server_ready} <= {200, 503}
            if 200 in (model_ready, server_ready):  # whenever ready is reported, the detector is configured
                assert online_ready == 1
            if (model_ready, server_ready) == (200, 200):
                break
            if online_ready == 0:  # read after both answers: neither may have said ready
                assert (model_ready, server_ready) == (503, 503)
                observed_not_ready.append(time.monotonic())
                if len(observed_not_ready) == 1:  # the server is up and live, but does not score yet
                    assert httpx.get(f"{running.url}/v2/health/live", timeout=2).status_code == 200
                    response = post(
                        f"{running.url}/v1/models/{MODEL}:predict",
                        json={"instances": transactions(1, start=1)},
                        timeout=10,
                    )
                    assert response.status_code == 503
            time.sleep(0.1)
        assert observed_not_ready, "the port only opened once the detector was configured: nothing was observed"
        assert "online drift detector ready" in running.log.read_text()

        started = time.monotonic()
        url = f"{running.url}/v1/models/{MODEL}:predict"
        for i in range(5):  # 500 vectors in batches of 100, well above 50 per second
            txs = transactions(100, start=40_000 + 100 * i, seed=i)
            assert post(url, json={"instances": txs}, timeout=10).status_code == 200
        running.wait_idle()
        elapsed = time.monotonic() - started
        updated = running.metric("fraud_drift_online_vectors_updated_total")
        skipped = running.metric("fraud_drift_online_vectors_skipped_total")
        assert running.metric("fraud_drift_vectors_processed_total") == 500  # the batch detector saw all
        assert running.metric("fraud_drift_windows_evaluated_total") == 5
        assert updated + skipped == 500
        assert 50 <= updated <= 50 + 50 * elapsed + 1
    finally:
        stop_process(running.process)


# --- the REST pass-through (drift_transformer/passthrough.py) against KServe's handlers -------------
def readiness_answers(transformer: Transformer) -> dict[str, bool]:
    """The transformer's readiness and liveness answers, REST (200 True, 503 False, nothing else)
    and gRPC."""
    import grpc
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
    from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub

    answers = {}
    for path in ("/v2/health/live", "/v2/health/ready", f"/v2/models/{MODEL}/ready", f"/v1/models/{MODEL}"):
        status = httpx.get(transformer.url + path, timeout=15).status_code
        assert status in (200, 503), (path, status)
        answers[path] = status == 200
    with grpc.insecure_channel(f"127.0.0.1:{transformer.grpc_port}") as channel:
        stub = GRPCInferenceServiceStub(channel)
        answers["ServerLive"] = stub.ServerLive(pb.ServerLiveRequest(), timeout=15).live
        answers["ServerReady"] = stub.ServerReady(pb.ServerReadyRequest(), timeout=15).ready
        answers["ModelReady"] = stub.ModelReady(pb.ModelReadyRequest(name=MODEL), timeout=15).ready
    return answers


class StandInGrpcPredictor:
    """A predictor's gRPC readiness (ServerReady / ModelReady of the Open Inference Protocol) on
    loopback; every other RPC answers UNIMPLEMENTED, as a server without it would."""

    def __init__(self) -> None:
        self.ready = True
        self._server = None
        self.port = 0

    def start(self) -> StandInGrpcPredictor:
        from concurrent.futures import ThreadPoolExecutor

        import grpc
        from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
        from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import (
            GRPCInferenceServiceServicer,
            add_GRPCInferenceServiceServicer_to_server,
        )

        owner = self

        class Servicer(GRPCInferenceServiceServicer):
            def ServerReady(self, request, context):
                return pb.ServerReadyResponse(ready=owner.ready)

            def ModelReady(self, request, context):
                if request.name != MODEL:
                    context.abort(grpc.StatusCode.NOT_FOUND, f"model {request.name} not found")
                return pb.ModelReadyResponse(ready=owner.ready)

        self._server = grpc.server(ThreadPoolExecutor(max_workers=2))
        add_GRPCInferenceServiceServicer_to_server(Servicer(), self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(0).wait()


@pytest.mark.parametrize("protocol", ["rest", "grpc-v2"])
def test_readiness_follows_the_predictors_with_the_health_check(module_dir, protocol):
    """With --enable_predictor_health_check every readiness answer of the transformer, REST and
    gRPC, is the predictor's, asked over the protocol the transformer calls it with (REST, or gRPC
    with `--protocol grpc-v2`): not ready while it answers not ready or cannot be reached (never a
    500), ready again when it is; liveness stays up throughout. A predictor that cannot be reached
    costs a debug line, not a logged traceback per check."""
    if protocol == "rest":
        stand_in: StandInPredictor | StandInGrpcPredictor = StandInPredictor(free_port()).start()
        extra: tuple[str, ...] = ()
    else:
        stand_in = StandInGrpcPredictor().start()
        extra = ("--protocol", "grpc-v2")
    running = start_transformer(
        module_dir / "bundle", stand_in.port, module_dir / f"health-check-{protocol}.log",
        "--online-ert", "0", "--enable_predictor_health_check", *extra,
    )  # fmt: skip
    live = ("/v2/health/live", "ServerLive")
    try:
        ready = readiness_answers(running)
        assert all(ready.values()), ready
        stand_in.ready = False  # the predictor out of rotation (e.g. its online store lost)
        answers = readiness_answers(running)
        assert all(answers[k] for k in live) and not any(v for k, v in answers.items() if k not in live), answers
        stand_in.ready = True
        assert readiness_answers(running) == ready
        stand_in.stop()  # unreachable
        for _ in range(3):
            answers = readiness_answers(running)
            assert all(answers[k] for k in live) and not any(v for k, v in answers.items() if k not in live), answers
        log = running.log.read_text()
        assert "Traceback" not in log and "Failed to get" not in log, log[-3000:]
    finally:
        stop_process(running.process)
        stand_in.stop()


@pytest.fixture(scope="module")
def kserve_path_transformer(module_dir, predictor) -> Iterator[Transformer]:
    """The same transformer with every request through KServe's handlers (httpx client, re-encoding)."""
    running = start_transformer(
        module_dir / "bundle", predictor.port, module_dir / "kserve-path.log",
        "--online-ert", "0", "--rest-fast-path", "false",
    )  # fmt: skip
    yield running
    stop_process(running.process)


def test_pass_through_returns_the_predictors_answer_byte_for_byte(transformer, predictor):
    txs = transactions(3, start=40_000)
    for url, body in [
        (f"{transformer.url}/v1/models/{MODEL}:predict", {"instances": txs}),
        (f"{transformer.url}/v2/models/{MODEL}/infer", v2_body(txs)),
    ]:
        response = post(url, json=body, headers={"x-request-id": "pass-1"}, timeout=10)
        assert response.status_code == 200, response.text
        assert response.content == predictor.answers[-1]
        assert response.headers["content-type"] == "application/json"


@pytest.mark.parametrize("protocol", ["v1", "v2"])
def test_pass_through_and_kserve_path_give_the_same_answer(transformer, kserve_path_transformer, protocol):
    txs = transactions(4, start=50_000)
    answers = []
    for running in (transformer, kserve_path_transformer):
        if protocol == "v1":
            response = post(f"{running.url}/v1/models/{MODEL}:predict", json={"instances": txs}, timeout=10)
        else:
            response = post(f"{running.url}/v2/models/{MODEL}/infer", json=v2_body(txs), timeout=10)
        assert response.status_code == 200, response.text
        answers.append(response.json())
    fast, reference = answers
    if protocol == "v1":
        assert fast == reference
    else:  # KServe re-encodes the answer: same tensors, its own envelope

        def as_tensors(answer):
            return {o["name"]: (o["datatype"], o["shape"], o["data"]) for o in answer["outputs"]}

        assert as_tensors(fast) == as_tensors(reference)
        assert fast["id"] == reference["id"] == "req-1"


def test_pass_through_times_out_with_504_and_counts_it(module_dir, predictor):
    impatient = start_transformer(
        module_dir / "bundle", predictor.port, module_dir / "impatient.log",
        "--online-ert", "0", "--predictor_request_timeout_seconds", "1",
    )  # fmt: skip
    try:
        slow = [{**transactions(1, start=1)[0], "transaction_id": "SLOW-1"}]
        response = post(f"{impatient.url}/v1/models/{MODEL}:predict", json={"instances": slow}, timeout=10)
        assert response.status_code == 504, response.text
        assert "did not answer within 1s" in response.json()["error"]  # the configured timeout ended the wait
        assert impatient.metric("fraud_transformer_predictor_errors_total", kind="timeout") == 1
        assert impatient.metric("fraud_transformer_requests_total", protocol="v1", status="504") == 1
        # the next request is answered normally (the timed-out connection is not reused)
        response = post(
            f"{impatient.url}/v1/models/{MODEL}:predict", json={"instances": transactions(1, start=2)}, timeout=10
        )
        assert response.status_code == 200, response.text
    finally:
        stop_process(impatient.process)


# --- the serving edge: tokens, disclosure, identifiers, body cap, binding, fuzzing ---------------------
def test_scoring_needs_a_token_and_the_client_token_is_not_forwarded(transformer, predictor):
    url = f"{transformer.url}/v1/models/{MODEL}:predict"
    body = {"instances": transactions(1, start=900)}
    calls = len(predictor.paths)
    missing = httpx.post(url, json=body, timeout=10)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert httpx.post(url, json=body, headers={"authorization": "Bearer wrong-token-0123456789"}).status_code == 401
    assert len(predictor.paths) == calls  # refused before anything reached the predictor
    assert post(url, json=body, headers={"authorization": f"Bearer {SCORE_TOKEN}"}, timeout=10).status_code == 200
    sent = predictor.headers[-1]
    assert "authorization" not in sent and sent["x-fraud-scopes"] == "score debug explain"
    for path in ("/v2/health/ready", "/metrics", f"/v2/models/{MODEL}"):
        assert httpx.get(f"{transformer.url}{path}", timeout=10).status_code == 200, path
    # the model and server metadata are the predictor's (the transformer has no tensors of its own)
    assert httpx.get(f"{transformer.url}/v2/models/{MODEL}", timeout=10).json() == STAND_IN_MODEL_METADATA
    assert httpx.get(f"{transformer.url}/v2", timeout=10).json() == STAND_IN_SERVER_METADATA


def test_feature_vectors_only_for_the_debug_scope_while_drift_still_sees_them(transformer):
    score_only = {"authorization": f"Bearer {SCORE_TOKEN}"}
    transformer.wait_idle()
    received = transformer.metric("fraud_drift_vectors_received_total") or 0.0
    v1 = post(f"{transformer.url}/v1/models/{MODEL}:predict", json={"instances": transactions(3, start=910)},
              headers=score_only, timeout=10)  # fmt: skip
    assert v1.status_code == 200 and all("features" not in p for p in v1.json()["predictions"])
    v2 = post(f"{transformer.url}/v2/models/{MODEL}/infer", json=v2_body(transactions(2, start=920)),
              headers=score_only, timeout=10)  # fmt: skip
    assert v2.status_code == 200 and "feature_vector" not in [o["name"] for o in v2.json()["outputs"]]
    form = {**score_only, "content-type": "application/x-www-form-urlencoded"}  # KServe's handler
    kserve = post(f"{transformer.url}/v1/models/{MODEL}:predict", content=json.dumps({"instances": transactions(
        1, start=930)}), headers=form, timeout=10)  # fmt: skip
    assert kserve.status_code == 200 and "features" not in kserve.json()["predictions"][0]
    assert transformer.wait_for_metric("fraud_drift_vectors_received_total", received + 6) >= received + 6


def test_card_numbers_and_hostile_ids_are_refused_before_forwarding(transformer, predictor):
    calls = len(predictor.paths)
    bad_v1 = [{**transactions(1, start=940)[0], "customer_id": "4111111111111111"}]
    response = post(f"{transformer.url}/v1/models/{MODEL}:predict", json={"instances": bad_v1}, timeout=10)
    assert response.status_code == 400
    assert response.json()["error"].startswith("instances[0].customer_id: looks like a card number")
    bad_v2 = v2_body(transactions(2, start=950))
    bad_v2["inputs"][2]["data"][1] = "T\u0000"
    response = post(f"{transformer.url}/v2/models/{MODEL}/infer", json=bad_v2, timeout=10)
    assert response.status_code == 400 and "input 'terminal_id'[1]: may only hold" in response.json()["error"]
    flood = {"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": ["a"]}] * 2000}
    response = post(f"{transformer.url}/v2/models/{MODEL}/infer", json=flood, timeout=10)
    assert response.status_code == 400 and "2000 input tensors" in response.json()["error"]
    assert len(predictor.paths) == calls


def test_one_body_cap_on_the_pass_through_and_the_kserve_path(transformer):
    big = json.dumps({"instances": transactions(1, start=960), "pad": "x" * (3 * 1024 * 1024)})
    for content_type in ("application/json", "application/x-www-form-urlencoded"):
        response = post(f"{transformer.url}/v1/models/{MODEL}:predict", content=big,
                        headers={"content-type": content_type}, timeout=30)  # fmt: skip
        assert response.status_code == 413, content_type
    assert transformer.process.poll() is None


def test_transformer_listens_on_loopback_only(transformer):
    def listening(port: int) -> set[str]:
        found = set()
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                address, port_hex = fields[1].rsplit(":", 1)
                if int(port_hex, 16) == port and fields[3] == "0A":
                    found.add(address)
        return found

    loopback = {"0100007F", "0000000000000000FFFF00000100007F"}  # 127.0.0.1 and its v4-mapped IPv6 form
    for port in (transformer.http_port, transformer.grpc_port):
        assert listening(port) and listening(port) <= loopback


def test_strip_helpers_leave_everything_but_the_vectors():
    from drift_transformer.transformer import strip_v1_features, strip_v2_json_features

    v1 = {"predictions": [{"transaction_id": "T1", "decision": "approve", "features": {"a": 1.0}}, "odd"]}
    assert strip_v1_features(v1) == {"predictions": [{"transaction_id": "T1", "decision": "approve"}, "odd"]}
    v2 = {"outputs": [{"name": "decision", "data": ["approve"]}, {"name": "feature_vector", "data": [1.0]}]}
    assert strip_v2_json_features(v2) == {"outputs": [{"name": "decision", "data": ["approve"]}]}


def test_malformed_token_file_stops_the_transformer_at_start(tmp_path, bundle_dir):
    (tmp_path / "tokens").write_text("0123456789abcdef0123 score,root\n")
    completed = subprocess.run(
        [sys.executable, "-m", "drift_transformer", "--predictor_host", "127.0.0.1:1", "--bundle", str(bundle_dir),
         "--token-file", str(tmp_path / "tokens")],
        cwd=PROJECT_DIR, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert completed.returncode == 2
    assert "line 1: unknown scope(s) ['root']" in completed.stderr and "Traceback" not in completed.stderr


JSON_SCALARS = (
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats(allow_nan=False)
    | st.text(max_size=60) | st.sampled_from(["4111111111111111", "TX\u00001", "\u00e9", "2026-11-29T10:00:00"])
)  # fmt: skip
JSON_VALUES = st.recursive(
    JSON_SCALARS, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=25,
)  # fmt: skip
FIELDS = st.sampled_from(["transaction_id", "customer_id", "terminal_id", "tx_amount", "tx_datetime"]) | st.text(
    max_size=12
)
BODIES = st.one_of(
    st.fixed_dictionaries({"instances": st.lists(st.dictionaries(FIELDS, JSON_VALUES, max_size=6), max_size=12)}),
    st.fixed_dictionaries(
        {"inputs": st.lists(st.fixed_dictionaries({"name": FIELDS, "datatype": st.sampled_from(["BYTES", "FP64", "X"]),
                                                   "shape": st.lists(st.integers(-2, 2**40), max_size=3),
                                                   "data": st.lists(JSON_VALUES, max_size=12)}), max_size=7)},
        optional={"id": JSON_SCALARS},
    ),
    JSON_VALUES,
).map(lambda body: json.dumps(body).encode()) | st.binary(max_size=1500)  # fmt: skip


def fuzz_transformer(transformer: Transformer, examples: int, derandomize: bool) -> None:
    def resident_kib() -> int:
        status = Path(f"/proc/{transformer.process.pid}/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1])

    before = resident_kib()

    @settings(max_examples=examples, deadline=None, derandomize=derandomize, database=None)
    @given(route=st.sampled_from([f"/v1/models/{MODEL}:predict", f"/v2/models/{MODEL}/infer"]), body=BODIES,
           json_type=st.booleans())  # fmt: skip
    def check(route, body, json_type):
        headers = {"content-type": "application/json"} if json_type else {}
        response = post(f"{transformer.url}{route}", content=body, headers=headers, timeout=30)
        assert response.status_code < 500, (response.status_code, response.text[:300], body[:300])
        assert len(response.content) < 20_000

    check()
    assert transformer.process.poll() is None
    assert resident_kib() - before < 200 * 1024


def test_v2_data_that_does_not_fill_its_shape_is_a_400(transformer):
    """Found by the long fuzz run: a body the fast path cannot parse (Infinity) falls back to KServe's
    parser, whose tensors then failed to reshape into a 500."""
    body = (
        b'{"inputs":[{"name":"a","datatype":"BYTES","shape":[],"data":[]},'
        b'{"name":"b","datatype":"FP64","shape":[0],"data":[Infinity]}]}'
    )
    response = post(
        f"{transformer.url}/v2/models/{MODEL}/infer",
        content=body,
        headers={"content-type": "application/json"},
        timeout=10,
    )
    assert response.status_code == 400, response.text
    assert "does not match shape" in response.json()["error"]


def test_fuzzed_v1_and_v2_bodies_never_get_a_5xx(transformer):
    fuzz_transformer(transformer, examples=40, derandomize=True)


@pytest.mark.slow
def test_fuzzed_v1_and_v2_bodies_never_get_a_5xx_long_run(transformer):
    fuzz_transformer(transformer, examples=1500, derandomize=False)


def test_answers_are_encoded_as_the_client_asked_binary_or_json():
    """REST `binary_data_output` / per-output `binary_data`, gRPC raw inputs: the answer the
    predictor gave in JSON is encoded for the client as the predictor itself would encode it."""
    from drift_transformer.transformer import binary_as_requested
    from kserve import InferInput, InferOutput, InferRequest, InferResponse
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
    from kserve.protocol.infer_type import RequestedOutput

    def answer() -> InferResponse:
        output = InferOutput("fraud_probability", [2], "FP64", data=[0.25, 0.5])
        return InferResponse(response_id="r1", model_name=MODEL, infer_outputs=[output], model_version="5")

    tensor = InferInput("tx_amount", [2], "FP64", data=[1.0, 2.0])
    plain = InferRequest(model_name=MODEL, infer_inputs=[tensor], request_id="r1")
    body, json_length = binary_as_requested(plain, answer()).to_rest()
    assert json_length is None and body["outputs"][0]["data"] == [0.25, 0.5] and body["id"] == "r1"

    binary = InferRequest(
        model_name=MODEL, infer_inputs=[tensor], request_id="r1", parameters={"binary_data_output": True}
    )
    raw, json_length = binary_as_requested(binary, answer()).to_rest()
    header = json.loads(raw[:json_length])
    assert header["id"] == "r1" and header["outputs"][0]["parameters"]["binary_data_size"] == 16
    assert np.frombuffer(raw[json_length:], dtype=np.float64).tolist() == [0.25, 0.5]

    per_output = InferRequest(
        model_name=MODEL,
        infer_inputs=[tensor],
        request_id="r1",
        request_outputs=[RequestedOutput("fraud_probability", parameters={"binary_data": True})],
    )
    raw, json_length = binary_as_requested(per_output, answer()).to_rest()
    assert json_length is not None and len(raw) == json_length + 16

    raw_grpc = InferRequest.from_grpc(  # what tritonclient.grpc sends: raw_input_contents
        pb.ModelInferRequest(
            model_name=MODEL,
            id="r1",
            inputs=[pb.ModelInferRequest.InferInputTensor(name="tx_amount", datatype="FP64", shape=[2])],
            raw_input_contents=[np.array([1.0, 2.0]).tobytes()],
        )
    )
    grpc_answer = binary_as_requested(raw_grpc, answer()).to_grpc()
    assert len(grpc_answer.raw_output_contents) == 1 and grpc_answer.id == "r1"
