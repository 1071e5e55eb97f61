"""The predictor as KServe runs it: `python -m predictor` subprocesses on free loopback ports, a
real Feast store (SQLite online store, materialised from hand-made raw transactions), four kinds of
client (httpx JSON, KServe's gRPC client, tritonclient HTTP, tritonclient gRPC in its own process),
bad input, outages, bad bundles, training/serving skew."""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import grpc
import httpx
import numpy as np
import pandas as pd
import pytest
import tritonclient.http as triton_http
from kserve import InferenceGRPCClient
from kserve.protocol.infer_type import InferInput, InferRequest, InferResponse
from tritonclient.utils import InferenceServerException

from fraud.config import MODEL_NAME, PROJECT_ROOT, DataLayout
from fraud.features.definitions import MODEL_FEATURES, VELOCITY_FEATURES
from fraud.features.offline import EVENT_TIMESTAMP
from fraud.net import free_port
from fraud.schema import REQUEST_FIELDS
from tests.factories import (
    hand_made_raw_transactions,
    make_synthetic_bundle,
    materialised_sqlite_store,
    restamp_bundle_digests,
    write_raw_partitions,
)

PYTHON = sys.executable
FIRST_DAY = datetime(2026, 1, 1)
N_DAYS = 20
#: The day after the last raw transaction: the online store holds this day's snapshots.
SCORING_DAY = FIRST_DAY + timedelta(days=N_DAYS)
CUSTOMERS = [f"C{i:07d}" for i in range(6)]
TERMINALS = [f"T{i:07d}" for i in range(5)]
STARTUP_TIMEOUT_S = 300.0  # a loaded CI machine imports KServe, Feast and XGBoost slowly
#: Bearer tokens of the test servers (`--token-file`): scoring with the feature vectors, scoring only
DEBUG_TOKEN = "debug-token-0123456789abcdef"
SCORE_TOKEN = "score-token-0123456789abcdef"
EXPLAIN_TOKEN = "explain-token-0123456789abcdef"
TOKEN_LINES = f"{DEBUG_TOKEN} score,debug\n{SCORE_TOKEN} score\n{EXPLAIN_TOKEN} explain\n"


def bearer(token: str | None = DEBUG_TOKEN) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"} if token else {}


# --- hand-made raw data and the Feast store ------------------------------------------------------
def raw_transactions(seed: int = 3) -> pd.DataFrame:
    """A few transactions per customer and day, some fraud at the first terminal, in the raw schema."""
    return hand_made_raw_transactions(CUSTOMERS, TERMINALS, FIRST_DAY, N_DAYS, seed, amount_step=10)


def write_raw(layout: DataLayout, frame: pd.DataFrame) -> None:
    write_raw_partitions(layout, frame)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """A data directory with raw data, offline tables and a materialised Feast SQLite store."""
    root = tmp_path_factory.mktemp("predictor") / "data"
    patch = materialised_sqlite_store(root, raw_transactions())
    yield root
    patch.undo()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return make_synthetic_bundle(tmp_path_factory.mktemp("bundle") / "fraud-detector", version="3")


# --- server processes ----------------------------------------------------------------------------


@dataclass
class PredictorProcess:
    process: subprocess.Popen
    http_port: int
    grpc_port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"predictor exited with {self.process.returncode}:\n{self.log()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/v2/models/{MODEL_NAME}/ready", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        raise AssertionError(f"predictor not ready after {STARTUP_TIMEOUT_S}s:\n{self.log()[-3000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def start_predictor(
    tmp_dir: Path,
    bundle: Path | str,
    data_root: Path | None,
    *extra: str,
    env: dict | None = None,
    auth: bool = True,
    idempotency: str = "off",
) -> PredictorProcess:
    """`python -m predictor` on free ports; with `auth` it takes the TOKEN_LINES tokens (`--token-file`).
    Idempotency is off unless asked for: these tests reuse transaction ids for different content."""
    http_port, grpc_port = free_port(), free_port()
    log_path = tmp_dir / f"predictor-{http_port}.log"
    if auth:
        token_file = tmp_dir / "tokens"
        token_file.write_text(TOKEN_LINES)
        extra = ("--token-file", str(token_file), *extra)
    extra = ("--idempotency", idempotency, *extra)
    process_env = {k: v for k, v in os.environ.items() if not k.startswith("FRAUD_")}
    if data_root is not None:
        process_env["FRAUD_DATA_DIR"] = str(data_root)
    process_env.update(env or {})
    command = [
        PYTHON,
        "-m",
        "predictor",
        "--bundle",
        str(bundle),
        "--model_name",
        MODEL_NAME,
        "--http_port",
        str(http_port),
        "--grpc_port",
        str(grpc_port),
        "--enable_latency_logging",
        "false",
        *extra,
    ]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, cwd=PROJECT_ROOT, env=process_env, stdout=log, stderr=subprocess.STDOUT)
    return PredictorProcess(process, http_port, grpc_port, log_path)


@pytest.fixture(scope="module")
def server(tmp_path_factory, data_root, bundle):
    predictor = start_predictor(
        tmp_path_factory.mktemp("server"),
        bundle,
        data_root,
        "--online-store",
        "sqlite",
        "--max-batch-size",
        "16",
        "--store-timeout",
        "10",  # a loaded test machine must not turn the warm-up lookup into an outage
    )
    try:
        predictor.wait_ready()
        yield predictor
    finally:
        predictor.stop()


# --- requests ------------------------------------------------------------------------------------
def tx(
    i: int,
    customer: str = CUSTOMERS[1],
    terminal: str = TERMINALS[0],
    amount: float = 87.25,
    when: datetime | None = None,
    **overrides,
) -> dict:
    when = when or SCORING_DAY + timedelta(hours=9, minutes=i)
    body = {
        "transaction_id": f"RQ{i:04d}",
        "customer_id": customer,
        "terminal_id": terminal,
        "tx_amount": amount,
        "tx_datetime": when.isoformat() + "Z",
    }
    body.update(overrides)
    return body


def predict_v1(server: PredictorProcess, body, token: str | None = DEBUG_TOKEN) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(
        f"{server.url}/v1/models/{MODEL_NAME}:predict",
        content=content,
        headers={"content-type": "application/json", **bearer(token)},
        timeout=30,
    )


def infer_v2(server: PredictorProcess, body, token: str | None = DEBUG_TOKEN) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(
        f"{server.url}/v2/models/{MODEL_NAME}/infer",
        content=content,
        headers={"content-type": "application/json", **bearer(token)},
        timeout=30,
    )


def v2_body(rows: list[dict], epoch: bool = False) -> dict:
    def column(name):
        return [r[name] for r in rows]

    times = [int(pd.Timestamp(t).timestamp()) for t in column("tx_datetime")] if epoch else column("tx_datetime")
    return {
        "id": "v2-req",
        "inputs": [
            {"name": "transaction_id", "datatype": "BYTES", "shape": [len(rows)], "data": column("transaction_id")},
            {"name": "customer_id", "datatype": "BYTES", "shape": [len(rows), 1], "data": column("customer_id")},
            {"name": "terminal_id", "datatype": "BYTES", "shape": [len(rows)], "data": column("terminal_id")},
            {"name": "tx_amount", "datatype": "FP64", "shape": [len(rows)], "data": column("tx_amount")},
            {"name": "tx_datetime", "datatype": "INT64" if epoch else "BYTES", "shape": [len(rows)], "data": times},
        ],
    }


def triton_inputs(module, rows: list[dict]):
    arrays = {
        "transaction_id": np.array([r["transaction_id"].encode() for r in rows], dtype=np.object_),
        "customer_id": np.array([r["customer_id"].encode() for r in rows], dtype=np.object_),
        "terminal_id": np.array([r["terminal_id"].encode() for r in rows], dtype=np.object_),
        "tx_amount": np.array([r["tx_amount"] for r in rows], dtype=np.float64),
        "tx_datetime": np.array([int(pd.Timestamp(r["tx_datetime"]).timestamp()) for r in rows], dtype=np.int64),
    }
    datatypes = {"tx_amount": "FP64", "tx_datetime": "INT64"}
    inputs = []
    for name, array in arrays.items():
        tensor = module.InferInput(name, list(array.shape), datatypes.get(name, "BYTES"))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def outputs_by_name(response: dict) -> dict[str, list]:
    return {o["name"]: o["data"] for o in response["outputs"]}


# --- tests: protocols ------------------------------------------------------------------------------
def test_health_and_server_metadata(server):
    assert httpx.get(f"{server.url}/v2/health/live").status_code == 200
    assert httpx.get(f"{server.url}/v2/health/ready").json() == {"ready": True}
    assert httpx.get(f"{server.url}/v1/models/{MODEL_NAME}").json() == {"name": MODEL_NAME, "ready": True}
    assert httpx.get(f"{server.url}/v2").json()["name"]


def test_v1_single_transaction_of_a_known_card(server):
    response = predict_v1(server, {"instances": [tx(1)]})
    assert response.status_code == 200, response.text
    (prediction,) = response.json()["predictions"]
    assert prediction["transaction_id"] == "RQ0001"
    assert 0.0 <= prediction["fraud_probability"] <= 1.0
    assert prediction["decision"] in ("approve", "review", "decline")
    assert prediction["model_version"] == "3"
    assert prediction["features_missing"] is False
    assert prediction["features_stale"] is False
    assert list(prediction["features"]) == list(MODEL_FEATURES)
    assert prediction["features"]["tx_amount_feature"] == 87.25
    assert prediction["features"]["customer_nb_tx_incl_30d"] > 1.0  # history from the online store
    for code in prediction["reason_codes"]:
        assert set(code) == {"feature", "description", "contribution"} and code["contribution"] > 0


def test_v1_batch_with_cold_start_and_stale_rows(server):
    rows = [
        tx(1),
        tx(2, customer="C-never-seen", terminal="T-never-seen"),
        tx(3, when=SCORING_DAY + timedelta(days=1, hours=2)),  # the snapshot is from the day before
        tx(4, customer=CUSTOMERS[4], terminal=TERMINALS[3], amount=1500.0),
    ]
    response = predict_v1(server, {"instances": rows})
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert [p["transaction_id"] for p in predictions] == ["RQ0001", "RQ0002", "RQ0003", "RQ0004"]
    assert [p["features_missing"] for p in predictions] == [False, True, False, False]
    assert [p["features_stale"] for p in predictions] == [False, False, True, False]
    cold = predictions[1]["features"]
    assert cold["customer_nb_tx_incl_30d"] == 1.0 and cold["terminal_nb_tx_30d"] == 0.0
    single = predict_v1(server, {"instances": [rows[0]]}).json()["predictions"][0]
    assert single["fraud_probability"] == predictions[0]["fraud_probability"]


def test_v2_rest_json_tensors_match_v1(server):
    rows = [tx(5), tx(6, customer=CUSTOMERS[2], terminal=TERMINALS[4]), tx(7, customer="C-new")]
    response = infer_v2(server, v2_body(rows, epoch=True))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"] == "v2-req" and body["model_name"] == MODEL_NAME
    shapes = {o["name"]: (o["datatype"], o["shape"]) for o in body["outputs"]}
    assert shapes == {
        "transaction_id": ("BYTES", [3]),
        "fraud_probability": ("FP64", [3]),
        "decision": ("BYTES", [3]),
        "reason_codes": ("BYTES", [3]),
        "model_version": ("BYTES", [3]),
        "features_missing": ("BOOL", [3]),
        "features_stale": ("BOOL", [3]),
        "feature_vector": ("FP64", [3, len(MODEL_FEATURES)]),
    }
    out = outputs_by_name(body)
    assert out["transaction_id"] == ["RQ0005", "RQ0006", "RQ0007"]
    assert out["features_missing"] == [False, False, True]
    v1 = predict_v1(server, {"instances": rows}).json()["predictions"]
    np.testing.assert_allclose(out["fraud_probability"], [p["fraud_probability"] for p in v1], rtol=0, atol=1e-12)
    vectors = np.asarray(out["feature_vector"]).reshape(3, -1)
    np.testing.assert_allclose(vectors, [[p["features"][n] for n in MODEL_FEATURES] for p in v1], atol=1e-12)
    assert [json.loads(codes) for codes in out["reason_codes"]] == [p["reason_codes"] for p in v1]


def grpc_request(rows: list[dict]) -> InferRequest:
    """A V2 request for kserve's gRPC client (epoch-second timestamps, [n] tensors)."""
    columns = {
        "transaction_id": ("BYTES", [r["transaction_id"] for r in rows]),
        "customer_id": ("BYTES", [r["customer_id"] for r in rows]),
        "terminal_id": ("BYTES", [r["terminal_id"] for r in rows]),
        "tx_amount": ("FP64", [float(r["tx_amount"]) for r in rows]),
        "tx_datetime": ("INT64", [int(pd.Timestamp(r["tx_datetime"]).timestamp()) for r in rows]),
    }
    inputs = [InferInput(name, [len(rows)], dtype, data) for name, (dtype, data) in columns.items()]
    return InferRequest(model_name=MODEL_NAME, infer_inputs=inputs, request_id="grpc-req")


def grpc_infer(predictor: PredictorProcess, rows: list[dict], token: str | None = DEBUG_TOKEN) -> InferResponse:
    """ModelInfer over gRPC with KServe's own client (InferenceGRPCClient)."""

    async def call() -> InferResponse:
        client = InferenceGRPCClient(predictor.grpc_target, timeout=60, retries=0)  # count each call once
        try:
            return await client.infer(grpc_request(rows), headers=tuple(bearer(token).items()))
        finally:
            await client.close()

    return asyncio.run(call())


def grpc_output(response: InferResponse, name: str) -> np.ndarray:
    return response.get_output_by_name(name).as_numpy()


def test_v2_grpc_with_the_kserve_client(server):
    rows = [tx(8), tx(9, customer="C-new")]
    response = grpc_infer(server, rows)
    assert response.model_name == MODEL_NAME and response.id == "grpc-req"
    assert [v.decode() for v in grpc_output(response, "transaction_id")] == ["RQ0008", "RQ0009"]
    assert grpc_output(response, "features_missing").tolist() == [False, True]
    assert grpc_output(response, "feature_vector").shape == (2, len(MODEL_FEATURES))
    v1 = predict_v1(server, {"instances": rows}).json()["predictions"]
    np.testing.assert_allclose(
        grpc_output(response, "fraud_probability"), [p["fraud_probability"] for p in v1], atol=1e-12
    )
    assert [v.decode() for v in grpc_output(response, "decision")] == [p["decision"] for p in v1]
    with pytest.raises(grpc.RpcError) as error:
        grpc_infer(server, [tx(10, amount=-1.0)])
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input 'tx_amount'[0]: must be > 0" in error.value.details()


#: tritonclient.grpc and kserve register the same protobuf package ("inference"), so they cannot be
#: imported into one process: the independent gRPC client runs in its own interpreter.
TRITON_GRPC_CLIENT = r"""
import json, sys
import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

target, model, rows, token = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
headers = {"authorization": f"Bearer {token}"}
client = grpcclient.InferenceServerClient(target)
arrays = {
    "transaction_id": np.array([r["transaction_id"].encode() for r in rows], dtype=np.object_),
    "customer_id": np.array([r["customer_id"].encode() for r in rows], dtype=np.object_),
    "terminal_id": np.array([r["terminal_id"].encode() for r in rows], dtype=np.object_),
    "tx_amount": np.array([r["tx_amount"] for r in rows], dtype=np.float64),
    "tx_datetime": np.array([r["tx_datetime"].encode() for r in rows], dtype=np.object_),
}
inputs = []
for name, array in arrays.items():
    tensor = grpcclient.InferInput(name, [len(rows), 1], "FP64" if name == "tx_amount" else "BYTES")
    tensor.set_data_from_numpy(array.reshape(-1, 1))
    inputs.append(tensor)
out = {"live": client.is_server_live(), "ready": client.is_model_ready(model)}
result = client.infer(model, inputs, headers=headers)
out["fraud_probability"] = result.as_numpy("fraud_probability").tolist()
out["decision"] = [v.decode() for v in result.as_numpy("decision")]
out["features_missing"] = result.as_numpy("features_missing").tolist()
out["feature_vector_shape"] = list(result.as_numpy("feature_vector").shape)
metadata = client.get_model_metadata(model, as_json=True)
out["inputs"] = [i["name"] for i in metadata["inputs"]]
out["outputs"] = [(o["name"], o["datatype"], o["shape"]) for o in metadata["outputs"]]
arrays["tx_amount"][0] = -1.0
inputs[3].set_data_from_numpy(arrays["tx_amount"].reshape(-1, 1))
try:
    client.infer(model, inputs, headers=headers)
    out["bad"] = None
except InferenceServerException as exc:
    out["bad"] = [str(exc.status()), exc.message()]
print(json.dumps(out))
"""


def test_v2_grpc_with_tritonclient_in_its_own_process(server):
    rows = [tx(14), tx(15, customer=CUSTOMERS[5], terminal=TERMINALS[1]), tx(16, terminal="T-new")]
    completed = subprocess.run(
        [PYTHON, "-c", TRITON_GRPC_CLIENT, server.grpc_target, MODEL_NAME, json.dumps(rows), DEBUG_TOKEN],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result["live"] and result["ready"]
    v1 = predict_v1(server, {"instances": rows}).json()["predictions"]
    np.testing.assert_allclose(result["fraud_probability"], [p["fraud_probability"] for p in v1], atol=1e-12)
    assert result["decision"] == [p["decision"] for p in v1]
    assert result["features_missing"] == [False, False, True]
    assert result["feature_vector_shape"] == [3, len(MODEL_FEATURES)]
    assert result["inputs"] == list(REQUEST_FIELDS)
    assert ["feature_vector", "FP64", ["-1", str(len(MODEL_FEATURES))]] in result["outputs"]
    status, message = result["bad"]
    assert "INVALID_ARGUMENT" in status and "input 'tx_amount'[0]: must be > 0" in message


def test_v2_http_binary_tensors_with_tritonclient(server):
    rows = [tx(11), tx(12, terminal=TERMINALS[2])]
    client = triton_http.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    try:
        result = client.infer(MODEL_NAME, triton_inputs(triton_http, rows), headers=bearer())
        assert result.as_numpy("fraud_probability").shape == (2,)
        assert result.as_numpy("features_stale").tolist() == [False, False]
        only = client.infer(
            MODEL_NAME,
            triton_inputs(triton_http, rows),
            outputs=[triton_http.InferRequestedOutput("decision", binary_data=False)],
            headers=bearer(),
        )
        assert [o["name"] for o in only.get_response()["outputs"]] == ["decision"]
        nan_input = triton_inputs(triton_http, [tx(13)])
        nan_input[3].set_data_from_numpy(np.array([math.nan]))
        with pytest.raises(InferenceServerException) as error:
            client.infer(MODEL_NAME, nan_input, headers=bearer())
        assert error.value.status() == "400"
        assert "input 'tx_amount'[0]: must be a finite number" in error.value.message()
    finally:
        client.close()


def test_model_metadata_lists_every_input_and_output(server):
    metadata = httpx.get(f"{server.url}/v2/models/{MODEL_NAME}").json()
    assert metadata["name"] == MODEL_NAME
    assert {(i["name"], i["datatype"]) for i in metadata["inputs"]} == {
        ("transaction_id", "BYTES"),
        ("customer_id", "BYTES"),
        ("terminal_id", "BYTES"),
        ("tx_amount", "FP64"),
        ("tx_datetime", "INT64"),
    }
    outputs = {o["name"]: (o["datatype"], o["shape"]) for o in metadata["outputs"]}
    assert outputs["feature_vector"] == ("FP64", [-1, len(MODEL_FEATURES)])
    assert set(outputs) == {
        "transaction_id",
        "fraud_probability",
        "decision",
        "reason_codes",
        "model_version",
        "features_missing",
        "features_stale",
        "feature_vector",
    }


# --- tests: bad input --------------------------------------------------------------------------------
def _without(row: dict, field: str) -> dict:
    return {k: v for k, v in row.items() if k != field}


V1_BAD_REQUESTS = [
    ({"instances": [_without(tx(1), "customer_id")]}, "instances[0].customer_id: is required"),
    ({"instances": [tx(1), tx(2, channel="web")]}, "instances[1].channel: is not a field"),
    ({"instances": [tx(1, tx_amount="87.25")]}, "instances[0].tx_amount: must be a number"),
    ({"instances": [tx(1, terminal_id=17)]}, "instances[0].terminal_id"),
    ({"instances": [tx(1, tx_amount=-5)]}, "instances[0].tx_amount: must be > 0"),
    ({"instances": [tx(1, tx_amount=1e12)]}, "instances[0].tx_amount: must be <= 1000000"),
    ({"instances": [tx(1, tx_datetime="31/01/2026")]}, "instances[0].tx_datetime"),
    ({"instances": []}, "the batch is empty"),
    ({"instances": [tx(i) for i in range(17)]}, "batch of 17 transactions exceeds the maximum batch size 16"),
    ('{"instances": [{"transaction_id": "RQ1", "tx_amount": NaN}]}', "Unrecognized request format"),
    ('{"instances": [', "Unrecognized request format"),
    ({"instances": [tx(1, transaction_id="RQ\u00001")]}, "instances[0].transaction_id: may only hold the characters"),
    ({"instances": [tx(1, customer_id="C\u00e9l\u00e8ne")]}, "instances[0].customer_id: may only hold the characters"),
    ({"instances": [tx(1, terminal_id="T 1\n")]}, "instances[0].terminal_id: may only hold the characters"),
    ({"instances": [tx(1, customer_id="4111111111111111")]}, "instances[0].customer_id: looks like a card number"),
    ({"instances": [tx(1, terminal_id="5500-0000-0000-0004")]}, "instances[0].terminal_id: looks like a card number"),
    ({"instances": [tx(1, transaction_id="X" * 65)]}, "instances[0].transaction_id: must be at most 64 characters"),
]


@pytest.mark.parametrize(("body", "expected"), V1_BAD_REQUESTS)
def test_v1_bad_input_is_a_400_naming_field_and_reason(server, body, expected):
    response = predict_v1(server, body)
    assert response.status_code == 400, response.text
    assert expected in response.json()["error"]


def _v2_bad(mutate) -> dict:
    body = v2_body([tx(1), tx(2)])
    mutate(body["inputs"])
    return body


V2_BAD_REQUESTS = [
    (_v2_bad(lambda inputs: inputs[3].update(shape=[1, 2])), "input 'tx_amount': shape must be [n] or [n, 1]"),
    (_v2_bad(lambda inputs: inputs[3].update(shape=[3])), "input 'tx_amount': data does not match shape [3]"),
    (
        _v2_bad(lambda inputs: inputs[3].update(datatype="BYTES", data=["1", "2"])),
        "input 'tx_amount': datatype must be FP64",
    ),
    (_v2_bad(lambda inputs: inputs.pop(1)), "['customer_id'] missing"),
    (
        _v2_bad(lambda inputs: inputs.append({"name": "label", "datatype": "INT64", "shape": [2], "data": [0, 1]})),
        "inputs: 6 input tensors given, a request has exactly 5",
    ),
    (
        _v2_bad(lambda inputs: inputs[4].update(name="label")),
        "unknown input tensor(s) ['label']",
    ),
    (_v2_bad(lambda inputs: inputs[1].update(data=["C\u00001", "C2"])), "input 'customer_id'[0]: may only hold"),
    (
        _v2_bad(lambda inputs: inputs[1].update(data=["C1", "4111111111111111"])),
        "input 'customer_id'[1]: looks like a card",
    ),
    ({**v2_body([tx(1)]), "id": "req\u0000"}, "id: may only hold the characters"),
    (
        _v2_bad(lambda inputs: inputs[4].update(data=["2026-01-21T10:00:00", "not a time"])),
        "input 'tx_datetime'[1]: 'not a time' is not an ISO-8601 timestamp",
    ),
    ('{"inputs": [{"name": "tx_amount"', "malformed request"),
]


@pytest.mark.parametrize(("body", "expected"), V2_BAD_REQUESTS)
def test_v2_bad_input_is_a_400_naming_tensor_and_reason(server, body, expected):
    response = infer_v2(server, body)
    assert response.status_code == 400, response.text
    assert expected in response.json()["error"]


def test_server_keeps_serving_after_bad_input(server):
    for body, _ in V1_BAD_REQUESTS[:3]:
        assert predict_v1(server, body).status_code == 400
    assert predict_v1(server, {"instances": [tx(1)]}).status_code == 200
    assert server.process.poll() is None


def test_metrics_after_requests(server):
    assert predict_v1(server, {"instances": [tx(1), tx(2, customer="C-new")]}).status_code == 200
    assert predict_v1(server, {"instances": []}).status_code == 400
    text = httpx.get(f"{server.url}/metrics").text

    def value(name: str, **labels: str) -> float:
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total

    assert value("fraud_predictor_requests_total", protocol="v1", model_version="3", outcome="ok") >= 1
    assert value("fraud_predictor_requests_total", protocol="v1", outcome="invalid_input") >= 1
    assert value("fraud_predictor_request_latency_seconds_count", protocol="v1", outcome="ok") >= 1
    assert value("fraud_predictor_transactions_total", model_version="3") >= 2
    assert sum(value("fraud_predictor_decisions_total", decision=d) for d in ("approve", "review", "decline")) >= 2
    assert value("fraud_predictor_fraud_probability_count", model_version="3") >= 2
    assert value("fraud_predictor_feature_lookup_seconds_count", source="feast", outcome="ok") >= 1
    assert value("fraud_predictor_features_missing_total", model_version="3") >= 1
    assert value("fraud_predictor_errors_total", kind="invalid_input") >= 1
    assert "request_predict_seconds" in text  # KServe's own metrics share the endpoint


# --- tests: training/serving skew ---------------------------------------------------------------------
#: The card and terminals of the burst the skew test replays through the aggregator (late on the
#: scoring day: the other tests score these entities earlier, or other entities the next day).
BURST_CARD = CUSTOMERS[5]
BURST_TERMINALS = (TERMINALS[1], TERMINALS[2])
BURST_START = SCORING_DAY + timedelta(hours=22)


def replay_through_aggregator(events: pd.DataFrame) -> None:
    """Publish `events` to a stream of their own and run the velocity aggregator on the module's
    SQLite store until it has applied them all: the window states the predictor reads."""
    import uuid

    import redis
    from prometheus_client import CollectorRegistry

    from fraud.feature_store import get_feature_store
    from fraud.features.definitions import utc_epoch_ns
    from fraud.streaming.aggregator import Aggregator, AggregatorSettings
    from fraud.streaming.events import StreamSettings, TransactionPublisher
    from fraud.streaming.state import WindowStateStore

    stream = StreamSettings(prefix=f"test:predictor-skew:{uuid.uuid4().hex[:10]}", partitions=2)
    client = redis.Redis.from_url(stream.redis_url)
    try:
        TransactionPublisher(stream, client).publish(
            list(
                zip(
                    events["transaction_id"],
                    events["customer_id"],
                    events["terminal_id"],
                    events["tx_amount"].astype(float),
                    utc_epoch_ns(events["tx_datetime"]).tolist(),
                    strict=True,
                )
            )
        )
        aggregator = Aggregator(
            stream,
            WindowStateStore(get_feature_store("sqlite")),
            AggregatorSettings(consumer="skew-test", metrics_port=None, tick_s=0.05, block_ms=5),
            registry=CollectorRegistry(),
        )
        applied = 0
        for _ in range(400):
            aggregator.step()
            applied = sum(
                aggregator.metrics.events.labels(kind, outcome)._value.get()
                for kind in ("card", "terminal")
                for outcome in ("applied", "out_of_order")
            )
            if applied == 2 * len(events):
                break
        assert applied == 2 * len(events), f"the aggregator applied {applied} of {2 * len(events)} events"
        aggregator.release_all()
    finally:
        keys = list(client.scan_iter(match=f"{stream.prefix}:*", count=1000))
        if keys:
            client.delete(*keys)


def test_online_features_equal_the_training_sets(server, data_root):
    """Every model feature the predictor serves - the materialised batch views, the request-time
    features and the velocity features from the window states (the raw history and then a
    card-testing burst replayed through the stream aggregator, as the product fills them) - equals what
    the training sets compute for the same transactions: Feast's point-in-time join for the batch
    and request features, the offline velocity computation for the velocity features."""
    from fraud.feature_store import historical_features
    from fraud.features.velocity_offline import velocity_frame

    burst = pd.DataFrame(
        {
            "transaction_id": [f"BURST{k:03d}" for k in range(8)],
            "customer_id": BURST_CARD,
            "terminal_id": [BURST_TERMINALS[k % 2] for k in range(8)],
            "tx_amount": [1.0 + 0.5 * k for k in range(8)],
            "tx_datetime": [BURST_START + timedelta(minutes=3 * k) for k in range(8)],
        }
    )
    # the product's window states are the stream's: replay the raw history, then the burst
    history = pd.concat([raw_transactions()[list(burst.columns)], burst], ignore_index=True)
    replay_through_aggregator(history.sort_values(["tx_datetime", "transaction_id"], kind="stable"))

    rng = np.random.default_rng(11)
    rows = []
    # the other cards at random times of the scoring day's first six hours (the previous day's
    # evening is in their 24 h windows); the burst card only after its burst (a state holds the
    # 24 h before its newest event: the burst evicted the card's earlier history)
    others = [c for c in CUSTOMERS if c != BURST_CARD]
    for i in range(12):
        when = SCORING_DAY + timedelta(seconds=int(rng.integers(0, 6 * 3_600)))
        rows.append(
            tx(
                100 + i,
                customer=others[i % len(others)],
                terminal=TERMINALS[i % len(TERMINALS)],
                amount=round(float(rng.gamma(2.0, 40.0)) + 0.5, 2),
                when=when,
            )
        )
    for k, minutes in enumerate((10, 23, 29)):  # inside the burst and just after it
        rows.append(
            tx(
                120 + k,
                customer=BURST_CARD,
                terminal=(*BURST_TERMINALS, TERMINALS[3])[k],
                amount=450.0,
                when=BURST_START + timedelta(minutes=minutes, seconds=30),
            )
        )
    served = predict_v1(server, {"instances": rows}).json()["predictions"]
    online = pd.DataFrame([p["features"] for p in served])[list(MODEL_FEATURES)]
    assert not any(p["features_missing"] or p["features_stale"] for p in served)

    entity_df = pd.DataFrame(
        {
            "customer_id": [r["customer_id"] for r in rows],
            "terminal_id": [r["terminal_id"] for r in rows],
            EVENT_TIMESTAMP: pd.to_datetime([r["tx_datetime"] for r in rows], utc=True),
            "tx_amount": [r["tx_amount"] for r in rows],
            "tx_datetime": pd.to_datetime([r["tx_datetime"] for r in rows], utc=True),
        }
    )
    training = historical_features(entity_df, "sqlite")[list(MODEL_FEATURES)].reset_index(drop=True)
    assert (online["customer_nb_tx_incl_30d"] > 1).all()  # real history, not defaults
    batch = [name for name in MODEL_FEATURES if name not in VELOCITY_FEATURES]
    np.testing.assert_allclose(online[batch].to_numpy(), training[batch].to_numpy(), rtol=0, atol=1e-9)

    # velocity: the offline computation over the raw history and the replayed burst; the scored
    # rows are not history (a batch's requests do not see each other, online or offline)
    offline = velocity_frame(history, entity_df)[list(VELOCITY_FEATURES)]
    np.testing.assert_allclose(online[list(VELOCITY_FEATURES)].to_numpy(), offline.to_numpy(), rtol=0, atol=1e-9)
    # not the no-history defaults: the raw history's last day and the burst are counted
    assert (online["customer_nb_tx_24h"] > 0).sum() >= 6
    in_burst = online.iloc[-3:]
    assert in_burst["customer_nb_tx_10m"].tolist() == [3.0, 3.0, 1.0]
    assert in_burst["customer_nb_tx_1h"].tolist() == [4.0, 8.0, 8.0]
    assert (in_burst["customer_nb_terminals_1h"] == 2).all()
    assert (in_burst["terminal_nb_tx_1h"].iloc[:2] >= 2).all()


# --- tests: faults ---------------------------------------------------------------------------------------
def closed_port() -> int:
    return free_port()  # bound then released: nothing listens there


@pytest.fixture(scope="module")
def outage_servers(tmp_path_factory, data_root, bundle):
    """A fail-open and a fail-closed predictor whose Redis online store is a closed port (started
    together to halve the start-up wait)."""
    env = {"FRAUD_REDIS_URL": f"127.0.0.1:{closed_port()},socket_connect_timeout=1,socket_timeout=1"}
    folder = tmp_path_factory.mktemp("outage")
    servers = {
        "fail_open": start_predictor(folder, bundle, data_root, "--online-store", "redis", env=env),
        "fail_closed": start_predictor(folder, bundle, data_root, "--online-store", "redis", "--fail-closed", env=env),
    }
    try:
        for predictor in servers.values():
            predictor.wait_ready()
        yield servers
    finally:
        for predictor in servers.values():
            predictor.stop()


def test_unreachable_online_store_fails_open_with_flag_and_metric(outage_servers):
    predictor = outage_servers["fail_open"]
    response = predict_v1(predictor, {"instances": [tx(1), tx(2, customer=CUSTOMERS[3])]})
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert [p["features_missing"] for p in predictions] == [True, True]
    assert predictions[0]["features"]["customer_nb_tx_incl_30d"] == 1.0  # cold-start defaults
    assert grpc_output(grpc_infer(predictor, [tx(3)]), "features_missing").tolist() == [True]
    metrics_text = httpx.get(f"{predictor.url}/metrics").text
    assert 'fraud_predictor_degraded_requests_total{mode="fail_open"} 2.0' in metrics_text
    assert 'fraud_predictor_errors_total{kind="feature_store_unavailable"} 2.0' in metrics_text
    assert 'fraud_predictor_feature_lookup_seconds_count{outcome="unavailable",source="feast"} 2.0' in metrics_text
    assert "online feature store not reachable at start" in predictor.log()


def test_unreachable_online_store_fail_closed_answers_503(outage_servers):
    predictor = outage_servers["fail_closed"]
    response = predict_v1(predictor, {"instances": [tx(1)]})
    assert response.status_code == 503, response.text
    assert "online feature store unavailable" in response.json()["error"]
    with pytest.raises(grpc.RpcError) as error:
        grpc_infer(predictor, [tx(2)])
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    metrics_text = httpx.get(f"{predictor.url}/metrics").text
    assert 'fraud_predictor_degraded_requests_total{mode="fail_closed"} 2.0' in metrics_text
    assert re.search(
        r'fraud_predictor_requests_total\{model_version="3",outcome="unavailable",protocol="v1"\} 1\.0', metrics_text
    )
    assert (
        'fraud_predictor_requests_total{model_version="3",outcome="unavailable",protocol="grpc-v2"} 1.0' in metrics_text
    )
    assert predict_v1(predictor, {"instances": []}).status_code == 400  # still validating, still up
    assert predictor.process.poll() is None


def test_bad_bundle_never_becomes_ready_and_says_why(tmp_path, bundle):
    corrupt = tmp_path / "corrupt"
    shutil.copytree(bundle, corrupt)
    (corrupt / "model.ubj").write_bytes(b"garbage, not UBJSON")
    restamp_bundle_digests(corrupt)  # digests that match: the load itself must find the model unreadable
    cases = {  # started together: each only pays the imports, then exits
        "is not a readable XGBoost model": start_predictor(tmp_path, corrupt, None),
        "does not exist": start_predictor(tmp_path, tmp_path / "no-such-bundle", None),
    }
    try:
        for expected, predictor in cases.items():
            assert predictor.process.wait(timeout=STARTUP_TIMEOUT_S) == 1
            log = predictor.log()
            lines = [line for line in log.splitlines() if "predictor not ready: cannot load model bundle" in line]
            assert len(lines) == 1 and expected in lines[0], log
            assert "Traceback" not in log
            with pytest.raises(httpx.TransportError):
                httpx.get(f"{predictor.url}/v2/health/ready", timeout=1.0)
    finally:
        for predictor in cases.values():
            predictor.stop()


def test_concurrent_requests_get_consistent_answers(server):
    from concurrent.futures import ThreadPoolExecutor

    bodies = [{"instances": [tx(i % 4, customer=CUSTOMERS[i % 4], terminal=TERMINALS[i % 4])]} for i in range(24)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(lambda body: predict_v1(server, body), bodies))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    by_input: dict[str, set[float]] = {}
    for body, response in zip(bodies, responses, strict=True):
        (prediction,) = response.json()["predictions"]
        assert prediction["features_missing"] is False
        by_input.setdefault(json.dumps(body, sort_keys=True), set()).add(prediction["fraud_probability"])
    assert len(by_input) == 4 and all(len(scores) == 1 for scores in by_input.values())


# --- tests: the fast REST path (predictor/fast_rest.py) against KServe's own handlers ---------------
@pytest.fixture(scope="module")
def kserve_path_server(tmp_path_factory, data_root, bundle):
    """The same predictor with every REST request through KServe's FastAPI handlers."""
    predictor = start_predictor(
        tmp_path_factory.mktemp("kserve-path"),
        bundle,
        data_root,
        "--online-store",
        "sqlite",
        "--max-batch-size",
        "16",
        "--rest-fast-path",
        "false",
        "--store-timeout",
        "10",
    )
    try:
        predictor.wait_ready()
        yield predictor
    finally:
        predictor.stop()


FAST_PATH_GOOD_REQUESTS = [
    ("v1", {"instances": [tx(1)]}),
    ("v1", {"instances": [tx(1), tx(2, customer="C-new"), tx(3, terminal="T-new", amount=4999.0)]}),
    ("v2", v2_body([tx(1)])),
    ("v2", v2_body([tx(i, customer=CUSTOMERS[i % 6], amount=10.0 + 97 * i) for i in range(12)], epoch=True)),
    ("v2", {k: v for k, v in v2_body([tx(4), tx(5)]).items() if k != "id"}),
]


@pytest.mark.parametrize(("protocol", "body"), FAST_PATH_GOOD_REQUESTS)
def test_fast_path_answers_exactly_what_kserve_answers(server, kserve_path_server, protocol, body):
    send = predict_v1 if protocol == "v1" else infer_v2
    fast, reference = send(server, body), send(kserve_path_server, body)
    assert fast.status_code == reference.status_code == 200, (fast.text, reference.text)
    assert fast.json() == reference.json()
    assert fast.headers["content-type"] == "application/json"


@pytest.mark.parametrize(
    ("protocol", "body"),
    [("v1", body) for body, _ in V1_BAD_REQUESTS] + [("v2", body) for body, _ in V2_BAD_REQUESTS],
)
def test_fast_path_refuses_bad_input_exactly_as_kserve_does(server, kserve_path_server, protocol, body):
    send = predict_v1 if protocol == "v1" else infer_v2
    fast, reference = send(server, body), send(kserve_path_server, body)
    assert fast.status_code == reference.status_code == 400
    assert fast.json()["error"] == reference.json()["error"]


def test_requests_the_fast_path_does_not_take_are_answered_by_kserve(server):
    body = {**v2_body([tx(1), tx(2)]), "outputs": [{"name": "fraud_probability"}, {"name": "decision"}]}
    response = infer_v2(server, body)
    assert response.status_code == 200, response.text
    assert [o["name"] for o in response.json()["outputs"]] == ["fraud_probability", "decision"]
    # no Content-Type at all: read as JSON (Triton's rule, predictor.edge.json_by_default)
    response = httpx.post(
        f"{server.url}/v1/models/{MODEL_NAME}:predict",
        content=json.dumps({"instances": [tx(1)]}),
        headers=bearer(),
        timeout=30,
    )
    assert response.status_code == 200 and response.json()["predictions"][0]["transaction_id"] == "RQ0001"
    # other models' routes are not this model's
    assert predict_v1_to(server, "other-model", {"instances": [tx(1)]}).status_code == 404


def predict_v1_to(server: PredictorProcess, model: str, body: dict) -> httpx.Response:
    return httpx.post(
        f"{server.url}/v1/models/{model}:predict",
        content=json.dumps(body),
        headers={"content-type": "application/json", **bearer()},
        timeout=30,
    )


# --- tests: authentication and least disclosure --------------------------------------------------------
def test_scoring_needs_a_token_with_the_score_scope(server):
    no_token = predict_v1(server, {"instances": [tx(1)]}, token=None)
    assert no_token.status_code == 401 and no_token.headers["www-authenticate"] == "Bearer"
    assert infer_v2(server, v2_body([tx(1)]), token="not-a-known-token-at-all").status_code == 401
    explain_only = predict_v1(server, {"instances": [tx(1)]}, token=EXPLAIN_TOKEN)
    assert explain_only.status_code == 403 and "`score` scope" in explain_only.json()["error"]
    # KServe's own handler (no JSON content type) is behind the same gate
    kserve_path = httpx.post(f"{server.url}/v1/models/{MODEL_NAME}:predict", content=json.dumps({"instances": [tx(1)]}))
    assert kserve_path.status_code == 401
    # health, readiness, metadata and metrics stay open
    for path in ("/v2/health/live", "/v2/health/ready", f"/v2/models/{MODEL_NAME}", "/metrics"):
        assert httpx.get(f"{server.url}{path}").status_code == 200, path
    for token, code in ((None, grpc.StatusCode.UNAUTHENTICATED), (EXPLAIN_TOKEN, grpc.StatusCode.PERMISSION_DENIED)):
        with pytest.raises(grpc.RpcError) as error:
            grpc_infer(server, [tx(2)], token=token)
        assert error.value.code() == code


def test_feature_vectors_only_for_the_debug_scope(server):
    rows = [tx(1), tx(2, customer="C-new")]
    scored = predict_v1(server, {"instances": rows}, token=SCORE_TOKEN)
    assert scored.status_code == 200
    assert all("features" not in p for p in scored.json()["predictions"])
    debug = predict_v1(server, {"instances": rows}).json()["predictions"]
    assert [p["fraud_probability"] for p in scored.json()["predictions"]] == [p["fraud_probability"] for p in debug]
    assert all(list(p["features"]) == list(MODEL_FEATURES) for p in debug)
    v2 = infer_v2(server, v2_body(rows), token=SCORE_TOKEN).json()
    assert "feature_vector" not in outputs_by_name(v2) and "decision" in outputs_by_name(v2)
    kserve_v1 = httpx.post(
        f"{server.url}/v1/models/{MODEL_NAME}:predict",
        content=json.dumps({"instances": rows}),
        headers=bearer(SCORE_TOKEN),
    )
    assert kserve_v1.status_code == 200 and all("features" not in p for p in kserve_v1.json()["predictions"])
    names = [output.name for output in grpc_infer(server, rows, token=SCORE_TOKEN).outputs]
    assert "feature_vector" not in names and "fraud_probability" in names


def test_malformed_token_file_stops_the_predictor_at_start(tmp_path, bundle):
    (tmp_path / "bad-tokens").write_text("only-one-field-here-0123456789\n")
    completed = subprocess.run(
        [PYTHON, "-m", "predictor", "--bundle", str(bundle), "--token-file", str(tmp_path / "bad-tokens")],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=STARTUP_TIMEOUT_S,
        check=False,
    )
    assert completed.returncode == 2
    assert "line 1: expected `<token> <scope>" in completed.stderr and "Traceback" not in completed.stderr
