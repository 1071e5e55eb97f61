"""Independent Open Inference Protocol clients against `fraud serve`'s public port (the transformer).

Each stock client runs with its default settings - tritonclient HTTP (binary tensors in and out by
default), tritonclient gRPC (in its own interpreter: it and KServe register the same protobuf
package), KServe's `InferenceRESTClient` and `InferenceGRPCClient` - and does what a new user does:
read the model metadata, build the request from it, infer, read the outputs. Also: the public
endpoint's metadata and health answers equal the predictor's, JSON without a Content-Type is
accepted, a request `id` is echoed, and the explanation routes (`:explain`, `/explain`) give the
full TreeSHAP contributions to callers with the `explain` scope only, audited as explanations.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import httpx
import numpy as np
import pytest

from fraud.bundle import MODEL_FILE
from fraud.config import MODEL_NAME
from fraud.features.definitions import FEATURE_DESCRIPTIONS, MODEL_FEATURES
from tests.test_serving_stack import STARTUP_TIMEOUT_S, Stack, alive, child_pids, cmdline, free_port, traffic
from tests.test_serving_stack import bundle as bundle
from tests.test_serving_stack import data_root as data_root

SCORE_TOKEN = "oip-score-token-0123456789abcdef"
EXPLAIN_TOKEN = "oip-explain-token-0123456789abcdef"
DEBUG_TOKEN = "oip-debug-token-0123456789abcdef"
TOKENS = f"{SCORE_TOKEN} score\n{EXPLAIN_TOKEN} score,explain\n{DEBUG_TOKEN} score,debug\n"


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


class AuthenticatedStack(Stack):
    def __init__(self, data_root: Path, bundle: Path, work: Path) -> None:
        super().__init__(data_root, bundle, work)
        self.token_file = work / "tokens"
        self.token_file.write_text(TOKENS)

    def serve_args(self) -> list[str]:
        return [*super().serve_args(), "--token-file", str(self.token_file)]

    @property
    def predictor_url(self) -> str:
        return f"http://127.0.0.1:{self.predictor_port}"

    @property
    def audit_db(self) -> Path:
        return self.data_root / "audit" / "audit.db"


#: The stack's start (Feast store, bundle, three processes) takes minutes on a loaded machine: every
#: test using it is `slow` (`make test-slow`, run by CI); the command-line test below is not.
@pytest.fixture(scope="module")
def stack(tmp_path_factory, data_root, bundle):
    running = AuthenticatedStack(data_root, bundle, tmp_path_factory.mktemp("oip"))
    result = running.fraud(
        "serve", "--detach", "--pid-file", str(running.pid_file), *running.serve_args(), timeout=STARTUP_TIMEOUT_S + 60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    yield running
    if running.pid_file.exists() and alive(running.supervisor_pid()):
        os.kill(running.supervisor_pid(), signal.SIGTERM)


def metadata_of(url: str) -> dict:
    response = httpx.get(f"{url}/v2/models/{MODEL_NAME}", timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def column(row: dict, name: str, datatype: str):
    """One request field of a transaction as the metadata's datatype asks for it."""
    value = row[name]
    if datatype == "BYTES":
        return str(value).encode()
    if datatype in ("FP64", "FP32"):
        return float(value)
    if datatype == "INT64":  # epoch seconds (`epoch_rows`)
        return int(value)
    raise AssertionError(f"unexpected datatype {datatype} in the metadata")


NUMPY_TYPES = {"BYTES": np.object_, "FP64": np.float64, "FP32": np.float32, "INT64": np.int64}


def arrays_from_metadata(metadata: dict, rows: list[dict]) -> dict[str, tuple[str, np.ndarray]]:
    return {
        item["name"]: (
            item["datatype"],
            np.array([column(r, item["name"], item["datatype"]) for r in rows], dtype=NUMPY_TYPES[item["datatype"]]),
        )
        for item in metadata["inputs"]
    }


def epoch_rows(rows: list[dict]) -> list[dict]:
    """Transactions with tx_datetime as epoch seconds (UTC), what the INT64 input tensor holds."""
    from calendar import timegm

    out = []
    for r in rows:
        when = datetime.fromisoformat(r["tx_datetime"])
        out.append({**r, "tx_datetime": timegm(when.timetuple())})
    return out


# --- conformance ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_metadata_and_health_through_the_transformer_equal_the_predictors(stack):
    for path in ("/v2", f"/v2/models/{MODEL_NAME}", f"/v2/models/{MODEL_NAME}/ready", "/v2/health/live"):
        public = httpx.get(f"{stack.url}{path}", timeout=30)
        direct = httpx.get(f"{stack.predictor_url}{path}", timeout=30)
        assert public.status_code == direct.status_code == 200, (path, public.text, direct.text)
        assert public.json() == direct.json(), path
    assert httpx.get(f"{stack.url}/v2/health/ready", timeout=30).json() == {"ready": True}
    names = [i["name"] for i in metadata_of(stack.url)["inputs"]]
    assert names == ["transaction_id", "customer_id", "terminal_id", "tx_amount", "tx_datetime"]


@pytest.mark.slow
def test_json_without_content_type_and_the_request_id_on_both_servers(stack):
    rows = traffic(2, seed=21, prefix="NOCT")
    body = {
        "id": "no-content-type-1",
        "inputs": [
            {
                "name": name,
                "datatype": "FP64" if name == "tx_amount" else "BYTES",
                "shape": [2],
                "data": [r[name] for r in rows],
            }
            for name in ("transaction_id", "customer_id", "terminal_id", "tx_amount", "tx_datetime")
        ],
    }
    raw = json.dumps(body).encode()
    for url in (stack.url, stack.predictor_url):
        response = httpx.post(
            f"{url}/v2/models/{MODEL_NAME}/infer", content=raw, headers=bearer(SCORE_TOKEN), timeout=30
        )
        assert "content-type" not in response.request.headers
        assert response.status_code == 200, (url, response.text)
        answer = response.json()
        assert answer["id"] == "no-content-type-1"
        outputs = {o["name"]: o["data"] for o in answer["outputs"]}
        assert outputs["transaction_id"] == [r["transaction_id"] for r in rows]
        v1 = httpx.post(
            f"{url}/v1/models/{MODEL_NAME}:predict",
            content=json.dumps({"instances": rows}).encode(),
            headers=bearer(SCORE_TOKEN),
            timeout=30,
        )
        assert v1.status_code == 200, (url, v1.text)


# --- stock clients, default settings --------------------------------------------------------------
@pytest.mark.slow
def test_tritonclient_http_with_default_settings(stack):
    import tritonclient.http as triton_http

    rows = traffic(3, seed=22, prefix="TRH")
    client = triton_http.InferenceServerClient(f"127.0.0.1:{stack.port}")
    try:
        headers = bearer(SCORE_TOKEN)
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL_NAME)
        metadata = client.get_model_metadata(MODEL_NAME)
        assert metadata == metadata_of(stack.predictor_url)
        inputs = []
        for name, (datatype, array) in arrays_from_metadata(metadata, epoch_rows(rows)).items():
            tensor = triton_http.InferInput(name, list(array.shape), datatype)
            tensor.set_data_from_numpy(array)  # default: binary tensor extension
            inputs.append(tensor)
        result = client.infer(MODEL_NAME, inputs, request_id="triton-http-1", headers=headers)
        response = result.get_response()
        assert response["id"] == "triton-http-1"
        assert all(o.get("parameters", {}).get("binary_data_size") for o in response["outputs"])  # binary outputs
        assert [v.decode() for v in result.as_numpy("transaction_id")] == [r["transaction_id"] for r in rows]
        probabilities = result.as_numpy("fraud_probability")
        assert probabilities.shape == (3,) and ((probabilities >= 0) & (probabilities <= 1)).all()
        assert {v.decode() for v in result.as_numpy("decision")} <= {"approve", "review", "decline"}
        assert result.as_numpy("feature_vector") is None  # no debug scope
    finally:
        client.close()


TRITON_GRPC_CLIENT = r"""
import json, sys
import numpy as np
import tritonclient.grpc as grpcclient

target, model, rows, token = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
headers = {"authorization": f"Bearer {token}"}
client = grpcclient.InferenceServerClient(target)
out = {"live": client.is_server_live(), "ready": client.is_server_ready(), "model_ready": client.is_model_ready(model)}
metadata = client.get_model_metadata(model, as_json=True)
out["metadata"] = metadata
out["server"] = client.get_server_metadata(as_json=True)
types = {"BYTES": np.object_, "FP64": np.float64, "FP32": np.float32, "INT64": np.int64}
inputs = []
for item in metadata["inputs"]:
    values = [r[item["name"]] for r in rows]
    if item["datatype"] == "BYTES":
        values = [str(v).encode() for v in values]
    array = np.array(values, dtype=types[item["datatype"]])
    tensor = grpcclient.InferInput(item["name"], list(array.shape), item["datatype"])
    tensor.set_data_from_numpy(array)
    inputs.append(tensor)
result = client.infer(model, inputs, request_id="triton-grpc-1", headers=headers)
out["id"] = result.get_response().id
out["transaction_id"] = [v.decode() for v in result.as_numpy("transaction_id")]
out["fraud_probability"] = result.as_numpy("fraud_probability").tolist()
out["decision"] = [v.decode() for v in result.as_numpy("decision")]
print(json.dumps(out))
"""


@pytest.mark.slow
def test_tritonclient_grpc_with_default_settings(stack):
    rows = epoch_rows(traffic(2, seed=23, prefix="TRG"))
    completed = subprocess.run(
        [
            sys.executable,
            "-c",
            TRITON_GRPC_CLIENT,
            f"127.0.0.1:{stack.grpc_port}",
            MODEL_NAME,
            json.dumps(rows),
            SCORE_TOKEN,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(completed.stdout)
    assert result["live"] and result["ready"] and result["model_ready"]
    rest = metadata_of(stack.predictor_url)
    assert [(i["name"], i["datatype"]) for i in result["metadata"]["inputs"]] == [
        (i["name"], i["datatype"]) for i in rest["inputs"]
    ]
    assert [o["name"] for o in result["metadata"]["outputs"]] == [o["name"] for o in rest["outputs"]]
    assert result["server"]["version"] == httpx.get(f"{stack.predictor_url}/v2", timeout=30).json()["version"]
    assert result["id"] == "triton-grpc-1"
    assert result["transaction_id"] == [r["transaction_id"] for r in rows]
    assert all(0 <= p <= 1 for p in result["fraud_probability"])
    assert set(result["decision"]) <= {"approve", "review", "decline"}


def kserve_request(metadata: dict, rows: list[dict], request_id: str):
    from kserve import InferInput, InferRequest

    inputs = []
    for name, (datatype, array) in arrays_from_metadata(metadata, epoch_rows(rows)).items():
        tensor = InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return InferRequest(model_name=MODEL_NAME, infer_inputs=inputs, request_id=request_id)


@pytest.mark.slow
def test_kserve_rest_client(stack):
    from kserve import InferenceRESTClient, RESTConfig

    rows = traffic(2, seed=24, prefix="KSR")
    metadata = metadata_of(stack.url)

    async def call():
        client = InferenceRESTClient(RESTConfig(protocol="v2", retries=0, timeout=60))
        try:
            assert await client.is_server_ready(stack.url)
            assert await client.is_model_ready(stack.url, MODEL_NAME)
            return await client.infer(
                stack.url, kserve_request(metadata, rows, "kserve-rest-1"), MODEL_NAME, headers=bearer(SCORE_TOKEN)
            )
        finally:
            await client.close()

    response = asyncio.run(call())
    assert response.id == "kserve-rest-1"
    outputs = {o.name: o.as_numpy() for o in response.outputs}
    assert [str(v) for v in outputs["transaction_id"]] == [r["transaction_id"] for r in rows]
    assert ((outputs["fraud_probability"] >= 0) & (outputs["fraud_probability"] <= 1)).all()


@pytest.mark.slow
def test_kserve_grpc_client(stack):
    from kserve import InferenceGRPCClient

    rows = traffic(2, seed=25, prefix="KSG")
    metadata = metadata_of(stack.url)

    async def call():
        client = InferenceGRPCClient(f"127.0.0.1:{stack.grpc_port}", timeout=60, retries=0)
        try:
            assert await client.is_server_ready()
            assert await client.is_model_ready(MODEL_NAME)
            return await client.infer(
                kserve_request(metadata, rows, "kserve-grpc-1"), headers=tuple(bearer(SCORE_TOKEN).items())
            )
        finally:
            await client.close()

    response = asyncio.run(call())
    assert response.id == "kserve-grpc-1"
    outputs = {o.name: o.as_numpy() for o in response.outputs}
    ids = [v.decode() if isinstance(v, bytes) else str(v) for v in outputs["transaction_id"]]
    assert ids == [r["transaction_id"] for r in rows]
    assert "feature_vector" not in outputs


# --- explanations ---------------------------------------------------------------------------------
def feature_vectors(stack, rows: list[dict]) -> np.ndarray:
    """The feature vectors the predictor computes for `rows` (debug scope, V1)."""
    response = httpx.post(
        f"{stack.url}/v1/models/{MODEL_NAME}:predict", json={"instances": rows}, headers=bearer(DEBUG_TOKEN), timeout=30
    )
    assert response.status_code == 200, response.text
    return np.array([[p["features"][name] for name in MODEL_FEATURES] for p in response.json()["predictions"]])


def pred_contribs(stack, features: np.ndarray) -> np.ndarray:
    import xgboost as xgb

    booster = xgb.Booster(model_file=str(stack.bundle / MODEL_FILE))
    return booster.predict(xgb.DMatrix(features), pred_contribs=True, validate_features=False)


@pytest.mark.slow
def test_v1_explain_gives_every_contribution_with_names_and_bias(stack):
    rows = traffic(4, seed=26, prefix="EXP")
    response = httpx.post(
        f"{stack.url}/v1/models/{MODEL_NAME}:explain",
        json={"instances": rows},
        headers=bearer(EXPLAIN_TOKEN),
        timeout=60,
    )
    assert response.status_code == 200, response.text + stack.logs()
    explanations = response.json()["explanations"]
    expected = pred_contribs(stack, feature_vectors(stack, rows))
    assert [e["transaction_id"] for e in explanations] == [r["transaction_id"] for r in rows]
    for i, explanation in enumerate(explanations):
        contributions = explanation["contributions"]
        assert [c["feature"] for c in contributions] == list(MODEL_FEATURES)
        assert [c["description"] for c in contributions] == [FEATURE_DESCRIPTIONS[n] for n in MODEL_FEATURES]
        values = np.array([c["contribution"] for c in contributions] + [explanation["bias"]])
        np.testing.assert_allclose(values, expected[i], rtol=1e-5, atol=1e-6)
        margin = values.sum()
        assert math.isclose(1 / (1 + math.exp(-margin)), explanation["fraud_probability"], rel_tol=1e-4)


@pytest.mark.slow
def test_v2_explain_equals_v1_and_echoes_the_id(stack):
    rows = traffic(3, seed=27, prefix="EXQ")
    v1 = httpx.post(
        f"{stack.url}/v1/models/{MODEL_NAME}:explain",
        json={"instances": rows},
        headers=bearer(EXPLAIN_TOKEN),
        timeout=60,
    ).json()["explanations"]
    body = {
        "id": "explain-1",
        "inputs": [
            {"name": n, "datatype": "FP64" if n == "tx_amount" else "BYTES", "shape": [3], "data": [r[n] for r in rows]}
            for n in ("transaction_id", "customer_id", "terminal_id", "tx_amount", "tx_datetime")
        ],
    }
    response = httpx.post(
        f"{stack.url}/v2/models/{MODEL_NAME}/explain", json=body, headers=bearer(EXPLAIN_TOKEN), timeout=60
    )
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["id"] == "explain-1"
    outputs = {o["name"]: o for o in answer["outputs"]}
    assert outputs["contributions"]["shape"] == [3, len(MODEL_FEATURES)]
    assert outputs["feature_names"]["data"] == list(MODEL_FEATURES)
    assert outputs["feature_descriptions"]["data"] == [FEATURE_DESCRIPTIONS[n] for n in MODEL_FEATURES]
    matrix = np.array(outputs["contributions"]["data"]).reshape(3, -1)
    for i, explanation in enumerate(v1):
        np.testing.assert_allclose(matrix[i], [c["contribution"] for c in explanation["contributions"]])
        assert math.isclose(outputs["bias"]["data"][i], explanation["bias"])


@pytest.mark.slow
def test_explanations_need_the_explain_scope_on_both_servers(stack):
    rows = traffic(1, seed=28, prefix="EXN")
    for url in (stack.url, stack.predictor_url):
        for path in (f"/v1/models/{MODEL_NAME}:explain", f"/v2/models/{MODEL_NAME}/explain"):
            refused = httpx.post(f"{url}{path}", json={"instances": rows}, headers=bearer(SCORE_TOKEN), timeout=30)
            assert refused.status_code == 403, (url, path, refused.text)
            assert "explain" in refused.json()["error"]
            assert httpx.post(f"{url}{path}", json={"instances": rows}, timeout=30).status_code == 401
    bad = httpx.post(
        f"{stack.url}/v1/models/{MODEL_NAME}:explain",
        json={"instances": [{**rows[0], "tx_amount": -1}]},
        headers=bearer(EXPLAIN_TOKEN),
        timeout=30,
    )
    assert bad.status_code == 400 and "tx_amount" in bad.json()["error"]


@pytest.mark.slow
def test_explanations_are_audited_as_explanations_not_decisions(stack):
    rows = traffic(2, seed=29, prefix="EXA")
    response = httpx.post(
        f"{stack.url}/v1/models/{MODEL_NAME}:explain",
        json={"instances": rows},
        headers=bearer(EXPLAIN_TOKEN),
        timeout=60,
    )
    assert response.status_code == 200, response.text
    ids = [r["transaction_id"] for r in rows]
    deadline = time.monotonic() + 60
    found: list = []
    while time.monotonic() < deadline:
        if stack.audit_db.exists():
            with sqlite3.connect(stack.audit_db) as db:
                marks = ",".join("?" * len(ids))
                found = db.execute(
                    f"SELECT transaction_id, contributions, bias FROM explanations WHERE transaction_id IN ({marks})",  # noqa: S608 - placeholders only
                    ids,
                ).fetchall()
                decided = db.execute(
                    f"SELECT count(*) FROM decisions WHERE transaction_id IN ({marks})",  # noqa: S608 - placeholders only
                    ids,
                ).fetchone()[0]
            if len(found) == len(ids):
                break
        time.sleep(0.5)
    assert sorted(row[0] for row in found) == sorted(ids), stack.logs()
    assert decided == 0  # an explanation is not a decision
    assert set(json.loads(found[0][1])) == set(MODEL_FEATURES)
    verify = stack.fraud("audit", "verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr


# --- the transformer calling the predictor over gRPC (`--protocol grpc-v2`) ------------------------
class GrpcUpstreamStack(AuthenticatedStack):
    def __init__(self, data_root: Path, bundle: Path, work: Path) -> None:
        super().__init__(data_root, bundle, work)
        self.predictor_grpc_port = free_port()

    def serve_args(self) -> list[str]:
        return [*super().serve_args(), "--predictor-grpc-port", str(self.predictor_grpc_port)]


@pytest.mark.slow
def test_grpc_v2_between_transformer_and_predictor_end_to_end(tmp_path_factory, data_root, bundle):
    """`fraud serve --predictor-grpc-port`: the transformer runs with `--protocol grpc-v2`; every client
    protocol still works through it, with the predictor's metadata, ids echoed, explanations served."""
    from kserve import InferenceGRPCClient

    running = GrpcUpstreamStack(data_root, bundle, tmp_path_factory.mktemp("grpc-upstream"))
    result = running.fraud(
        "serve", "--detach", "--pid-file", str(running.pid_file), *running.serve_args(), timeout=STARTUP_TIMEOUT_S + 60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    try:
        assert "--protocol grpc-v2" in " ".join(cmdline(pid) for pid in descendants(running.supervisor_pid()))
        rows = traffic(2, seed=30, prefix="UPG")
        metadata = metadata_of(running.url)
        assert metadata == metadata_of(running.predictor_url)
        assert httpx.get(f"{running.url}/v2", timeout=30).json() == httpx.get(f"{running.predictor_url}/v2").json()

        async def grpc_call():
            client = InferenceGRPCClient(f"127.0.0.1:{running.grpc_port}", timeout=60, retries=0)
            try:
                return await client.infer(
                    kserve_request(metadata, rows, "upstream-grpc-1"), headers=tuple(bearer(SCORE_TOKEN).items())
                )
            finally:
                await client.close()

        response = asyncio.run(grpc_call())
        assert response.id == "upstream-grpc-1"
        ids = [v.decode() if isinstance(v, bytes) else str(v) for v in response.outputs[0].as_numpy()]
        assert ids == [r["transaction_id"] for r in rows]
        body = {
            "id": "upstream-rest-1",
            "inputs": [
                {
                    "name": n,
                    "datatype": "FP64" if n == "tx_amount" else "BYTES",
                    "shape": [2],
                    "data": [r[n] for r in rows],
                }
                for n in ("transaction_id", "customer_id", "terminal_id", "tx_amount", "tx_datetime")
            ],
        }
        v2 = httpx.post(
            f"{running.url}/v2/models/{MODEL_NAME}/infer", json=body, headers=bearer(SCORE_TOKEN), timeout=60
        )
        assert v2.status_code == 200, v2.text + running.logs()
        assert v2.json()["id"] == "upstream-rest-1"
        v1 = httpx.post(
            f"{running.url}/v1/models/{MODEL_NAME}:predict",
            json={"instances": rows},
            headers=bearer(SCORE_TOKEN),
            timeout=60,
        )
        assert v1.status_code == 200, v1.text
        explained = httpx.post(
            f"{running.url}/v1/models/{MODEL_NAME}:explain",
            json={"instances": rows},
            headers=bearer(EXPLAIN_TOKEN),
            timeout=60,
        )
        assert explained.status_code == 200, explained.text
        assert len(explained.json()["explanations"]) == 2
        assert running.metric("fraud_transformer_predictor_seconds_count", protocol="grpc-v2") >= 1
    finally:
        stopped = running.fraud("serve", "stop", "--pid-file", str(running.pid_file))
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        children = child_pids(todo.pop())
        found += children
        todo += children
    return found


def test_fraud_serve_commands_for_a_grpc_upstream(tmp_path, monkeypatch):
    from fraud.errors import UserError
    from fraud.serving_stack import ServingStack, StackConfig

    monkeypatch.setenv("FRAUD_DATA_DIR", str(tmp_path / "data"))
    rest = ServingStack(StackConfig(bundle=tmp_path / "bundle", predictor_port=9002))
    assert rest.predictor_command()[-2:] != ["--grpc_port", "9003"]
    assert " --enable_grpc false" in " " + " ".join(rest.predictor_command())
    transformer = " ".join(rest.transformer_command())
    assert "--predictor_host 127.0.0.1:9002 --protocol v2" in transformer and "--predictor-rest-host" not in transformer
    grpc = ServingStack(StackConfig(bundle=tmp_path / "bundle", predictor_port=9002, predictor_grpc_port=9003))
    assert "--enable_grpc true --grpc_port 9003" in " ".join(grpc.predictor_command())
    transformer = " ".join(grpc.transformer_command())
    assert "--predictor_host 127.0.0.1:9003 --protocol grpc-v2 --predictor-rest-host 127.0.0.1:9002" in transformer
    with pytest.raises(UserError, match="must differ"):
        StackConfig(bundle=tmp_path / "bundle", predictor_port=9002, predictor_grpc_port=9002)
