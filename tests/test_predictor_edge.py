"""The predictor's edge: tokens and scopes, identifiers and card numbers, V2 parsing cost, truncated
echoes, generic 5xx bodies, the body cap, loopback binding and least disclosure.

Pure functions and the ASGI middlewares are exercised in-process; one `python -m predictor` without
a token file checks binding, the default (no feature vectors) answer and the caps on every path."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kserve import InferenceGRPCClient
from kserve.errors import InvalidInput
from kserve.protocol.infer_type import InferInput, InferRequest

from fraud.config import DRIFT_TRANSFORMER_DIR, MODEL_NAME
from fraud.schema import MAX_ECHO_CHARS, TransactionRequest, identifier_problem, looks_like_card_number
from predictor.auth import SCOPE_HEADER, AuthError, Authorizer, TokenFileError, read_token_file
from predictor.codec import Tensor, json_v2_tensors, parse_v2_tensors, validate_transaction
from predictor.edge import INTERNAL_ERROR, RequestGate
from predictor.fast_rest import FastScoringRoutes
from tests.test_predictor_server import (  # noqa: F401 - module fixtures shared with the server tests
    bundle,
    data_root,
    grpc_request,
    outputs_by_name,
    start_predictor,
    tx,
    v2_body,
)

IDENTIFIER_CASES = DRIFT_TRANSFORMER_DIR / "tests" / "identifier_cases.json"
DRIFT_PYTHON = DRIFT_TRANSFORMER_DIR / ".venv" / "bin" / "python"
TOKEN_A = "a" * 32
TOKEN_B = "b" * 32


# --- tokens and scopes ------------------------------------------------------------------------------
def write_tokens(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tokens"
    path.write_text(text)
    return path


def test_token_file_is_read_with_scopes_and_comments(tmp_path):
    tokens = read_token_file(write_tokens(tmp_path, f"# callers\n{TOKEN_A} score,debug\n\n{TOKEN_B} score  # batch\n"))
    assert sorted(sorted(scopes) for scopes in tokens.values()) == [["debug", "score"], ["score"]]
    assert TOKEN_A.encode() not in b"".join(tokens)  # only digests are kept


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"{TOKEN_A}\n", "line 1: expected `<token> <scope>"),
        (f"{TOKEN_A} score extra\n", "line 1: expected"),
        ("short score\n", "line 1: a token has at least 16 characters"),
        (f"{TOKEN_A} score,admin\n", "line 1: unknown scope(s) ['admin']"),
        (f"{TOKEN_A} score\n{TOKEN_A} debug\n", "line 2: the token is listed twice"),
        ("# nothing\n", "holds no token"),
        (f"{TOKEN_A}\u00e9 score\n", "line 1: a token has at least"),
    ],
)
def test_malformed_token_file_is_refused_naming_the_line(tmp_path, text, expected):
    with pytest.raises(TokenFileError, match="token file") as error:
        read_token_file(write_tokens(tmp_path, text))
    assert expected in str(error.value)


def test_missing_token_file_is_refused(tmp_path):
    with pytest.raises(TokenFileError, match="cannot read it"):
        read_token_file(tmp_path / "absent")


def test_authorizer_answers_401_403_or_the_scopes(tmp_path):
    authorizer = Authorizer.from_options(write_tokens(tmp_path, f"{TOKEN_A} score,debug\n{TOKEN_B} explain\n"), False)
    assert authorizer.authorize({"authorization": f"Bearer {TOKEN_A}"}, "score") == {"score", "debug"}
    assert authorizer.authorize({"authorization": f"bearer {TOKEN_A}"}, "debug") == {"score", "debug"}
    cases = [
        ({}, 401, "authentication required"),
        ({"authorization": "Basic dXNlcjpwYXNz"}, 401, "malformed Authorization header"),
        ({"authorization": "Bearer"}, 401, "malformed"),
        ({"authorization": f"Bearer {TOKEN_A[:-1]}x"}, 401, "unknown bearer token"),
        ({"authorization": f"Bearer {TOKEN_B}"}, 403, "lack the `score` scope"),
        ({SCOPE_HEADER: "score debug"}, 401, "authentication required"),  # the header is not trusted
    ]
    for headers, status, message in cases:
        with pytest.raises(AuthError) as error:
            authorizer.authorize(headers, "score")
        assert error.value.http_status == status and message in error.value.message, headers


def test_scope_header_is_trusted_only_when_asked():
    assert Authorizer().authorize({SCOPE_HEADER: "score debug"}, "score") == {"score", "explain"}  # auth off
    trusting = Authorizer(trust_scope_header=True)
    assert trusting.authorize({SCOPE_HEADER: "score debug"}, "score") == {"score", "debug"}
    assert trusting.authorize({SCOPE_HEADER: "score,explain bogus"}, "explain") == {"score", "explain"}
    with pytest.raises(AuthError) as error:
        trusting.authorize({SCOPE_HEADER: "explain"}, "score")
    assert error.value.http_status == 403
    with pytest.raises(AuthError) as error:
        trusting.authorize({}, "score")
    assert error.value.http_status == 401


def test_without_authentication_nobody_has_the_debug_scope():
    assert "debug" not in Authorizer().scopes({"authorization": "Bearer anything"})


# --- identifiers and card numbers ---------------------------------------------------------------------
def identifier_cases() -> list[tuple[str, bool]]:
    return [tuple(case) for case in json.loads(IDENTIFIER_CASES.read_text())["cases"]]


def test_identifier_rule_on_the_shared_table():
    wrong = [
        (value, accepted) for value, accepted in identifier_cases() if (identifier_problem(value) is None) != accepted
    ]
    assert not wrong


TRANSFORMER_JUDGE = r"""
import json, sys
from drift_transformer.identifiers import identifier_problem
cases = json.load(open(sys.argv[1]))["cases"]
print(json.dumps([identifier_problem(value) for value, _ in cases]))
"""


def test_transformer_copy_of_the_identifier_rule_agrees_with_the_core():
    if not DRIFT_PYTHON.exists():
        pytest.skip(f"{DRIFT_PYTHON} missing: run `make setup`")
    completed = subprocess.run(
        [str(DRIFT_PYTHON), "-c", TRANSFORMER_JUDGE, str(IDENTIFIER_CASES)],
        cwd=DRIFT_TRANSFORMER_DIR,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    theirs = json.loads(completed.stdout.strip().splitlines()[-1])
    ours = [identifier_problem(value) for value, _ in identifier_cases()]
    assert theirs == ours


def test_card_number_shapes():
    assert looks_like_card_number("4111111111111111") and looks_like_card_number("4111-1111-1111-1111")
    assert not looks_like_card_number("4111111111111112")  # Luhn check fails
    assert not looks_like_card_number("TX0000000001")


def test_transaction_validation_names_the_field_and_truncates_the_echo():
    base = {"transaction_id": "TX1", "customer_id": "C1", "terminal_id": "T1", "tx_amount": 1.0, "tx_datetime": 0}
    where = "instances[0].{field}"
    with pytest.raises(InvalidInput, match=r"instances\[0\]\.customer_id: looks like a card number") as error:
        validate_transaction({**base, "customer_id": "4111111111111111"}, where)
    assert "4111111111111111" not in str(error.value)  # a refused PAN is not echoed either
    with pytest.raises(InvalidInput, match=r"instances\[0\]\.tx_datetime") as error:
        validate_transaction({**base, "tx_datetime": "x" * 5_000_000}, where)
    assert len(str(error.value)) < 200 and "5000002 characters" in str(error.value)
    with pytest.raises(InvalidInput, match=r"instances\[0\]\.terminal_id: may only hold") as error:
        validate_transaction({**base, "terminal_id": "\u00e9" * 50}, where)
    assert len(str(error.value)) < MAX_ECHO_CHARS + 200
    with pytest.raises(ValueError, match="transaction_id"):
        TransactionRequest.model_validate({**base, "transaction_id": "TX\u00001"})


# --- V2 parsing cost ----------------------------------------------------------------------------------
def exploding_tensor(name: str) -> Tensor:
    def values() -> list:
        raise AssertionError("a tensor was read before the tensor count was checked")

    return Tensor(name, "BYTES", [1], values)


def test_v2_tensor_count_is_checked_before_any_tensor():
    tensors = [exploding_tensor(f"t{i}") for i in range(40_000)]
    with pytest.raises(InvalidInput, match="inputs: 40000 input tensors given, a request has exactly 5"):
        parse_v2_tensors(tensors, 16)
    body = {"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": ["a"]}] * 40_000}
    with pytest.raises(InvalidInput, match="40000 input tensors"):
        json_v2_tensors(body)


def test_duplicate_tensor_names_are_named_once():
    tensors = [exploding_tensor(name) for name in ("customer_id", "customer_id", "a", "b", "c")]
    with pytest.raises(InvalidInput, match=r"input tensor\(s\) \['customer_id'\] given more than once"):
        parse_v2_tensors(tensors, 16)


# --- ASGI middlewares in-process ----------------------------------------------------------------------
async def call_asgi(app, path: str, body: bytes, headers: dict[str, str] | None = None, chunks: int = 1):
    """Run one HTTP request through an ASGI app; (status, headers, body) of the answer and the bytes read."""
    size = -(-len(body) // chunks) or 1
    pieces = [body[start : start + size] for start in range(0, len(body), size)] or [b""]
    events = [
        {"type": "http.request", "body": piece, "more_body": i < len(pieces) - 1} for i, piece in enumerate(pieces)
    ]
    read = 0
    sent: list[dict] = []

    async def receive():
        nonlocal read
        event = events.pop(0) if events else {"type": "http.disconnect"}
        read += len(event.get("body", b""))
        return event

    async def send(message):
        sent.append(message)

    raw_headers = [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    scope = {"type": "http", "method": "POST", "path": path, "headers": raw_headers}
    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    content = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], dict(start["headers"]), content, read


class Downstream:
    """The app behind the gate: records what reached it."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    async def __call__(self, scope, receive, send) -> None:
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        self.bodies.append(b"".join(chunks))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def test_gate_refuses_credentials_before_reading_the_body(tmp_path):
    downstream = Downstream()
    gate = RequestGate(downstream, Authorizer.from_options(write_tokens(tmp_path, f"{TOKEN_A} explain\n"), False))
    path = f"/v1/models/{MODEL_NAME}:predict"
    status, headers, body, read = asyncio.run(call_asgi(gate, path, b"{}" * 10))
    assert (status, read) == (401, 0) and headers[b"www-authenticate"] == b"Bearer"
    status, _, body, read = asyncio.run(call_asgi(gate, path, b"{}", {"authorization": f"Bearer {TOKEN_A}"}))
    assert (status, read) == (403, 0) and "`score` scope" in json.loads(body)["error"]
    assert asyncio.run(call_asgi(gate, "/v2/repository/models/x/unload", b""))[0] == 403
    assert downstream.bodies == []


def test_gate_caps_the_body_on_every_route():
    downstream = Downstream()
    gate = RequestGate(downstream, Authorizer(), max_body_bytes=1024)
    big = b"x" * 5000
    for path in (f"/v1/models/{MODEL_NAME}:predict", f"/v2/models/{MODEL_NAME}/infer", "/anything"):
        status, _, _, read = asyncio.run(call_asgi(gate, path, big, {"content-length": "5000"}))
        assert (status, read) == (413, 0), path  # refused from its Content-Length, nothing read
        status, _, _, read = asyncio.run(call_asgi(gate, path, big, chunks=10))
        assert status == 413 and read <= 1024 + 500, path  # chunked: refused as soon as the cap is passed
    status, _, _, _ = asyncio.run(call_asgi(gate, "/anything", b"y" * 1024, chunks=4))
    assert status == 200 and downstream.bodies == [b"y" * 1024]


class HeaderRecorder(Downstream):
    """Downstream that also keeps the request headers it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.headers: list[dict[bytes, bytes]] = []

    async def __call__(self, scope, receive, send) -> None:
        self.headers.append(dict(scope["headers"]))
        await super().__call__(scope, receive, send)


def test_gate_reads_a_body_without_any_content_type_as_json():
    """Triton's rule: no Content-Type and no binary-extension header means JSON."""
    downstream = HeaderRecorder()
    gate = RequestGate(downstream, Authorizer())
    path = f"/v2/models/{MODEL_NAME}/infer"
    asyncio.run(call_asgi(gate, path, b"{}"))
    asyncio.run(call_asgi(gate, path, b"{}", {"content-type": "text/plain"}))
    asyncio.run(call_asgi(gate, path, b"....", {"inference-header-content-length": "2"}))
    assert downstream.headers[0][b"content-type"] == b"application/json"
    assert downstream.headers[1][b"content-type"] == b"text/plain"  # what the client said stays
    assert b"content-type" not in downstream.headers[2]  # the binary extension is not JSON


def test_explanation_routes_need_the_explain_scope(tmp_path):
    downstream = Downstream()
    tokens = write_tokens(tmp_path, f"{TOKEN_A} score\n{TOKEN_B} explain\n")
    gate = RequestGate(downstream, Authorizer.from_options(tokens, False))
    scorer, explainer = {"authorization": f"Bearer {TOKEN_A}"}, {"authorization": f"Bearer {TOKEN_B}"}
    for path in (f"/v1/models/{MODEL_NAME}:explain", f"/v2/models/{MODEL_NAME}/explain"):
        status, _, body, read = asyncio.run(call_asgi(gate, path, b"{}", scorer))
        assert (status, read) == (403, 0) and "`explain` scope" in json.loads(body)["error"], path
        assert asyncio.run(call_asgi(gate, path, b"{}", explainer))[0] == 200, path
    assert asyncio.run(call_asgi(gate, f"/v2/models/{MODEL_NAME}/infer", b"{}", explainer))[0] == 403


class ExplodingModel:
    """Enough of FraudModel for FastScoringRoutes: scoring fails with an internal error."""

    name = MODEL_NAME
    ready = True

    class settings:  # attribute access like PredictorSettings
        max_batch_size = 16

    async def infer_parsed(self, protocol, parse):
        parse()
        raise RuntimeError("connection to /var/secret/path failed: password=hunter2")


def test_fast_path_500_body_is_generic_and_the_detail_is_logged(caplog):
    routes = FastScoringRoutes(Downstream(), ExplodingModel())
    body = json.dumps({"instances": [tx(1)]}).encode()
    status, _, content, _ = asyncio.run(
        call_asgi(routes, f"/v1/models/{MODEL_NAME}:predict", body, {"content-type": "application/json"})
    )
    assert status == 500 and json.loads(content) == {"error": INTERNAL_ERROR}
    assert "hunter2" in caplog.text


# --- a real predictor without a token file ------------------------------------------------------------
CAP = 64 * 1024


@pytest.fixture(scope="module")
def open_server(tmp_path_factory, data_root, bundle):  # noqa: F811 - the imported fixtures
    predictor = start_predictor(
        tmp_path_factory.mktemp("open"),
        bundle,
        data_root,
        "--online-store",
        "sqlite",
        "--store-timeout",
        "10",
        "--max-body-bytes",
        str(CAP),
        auth=False,
        idempotency="auto",  # the SQLite profile: the in-process ledger
    )
    try:
        predictor.wait_ready()
        yield predictor
    finally:
        predictor.stop()


def listening_addresses(port: int) -> set[str]:
    """Local addresses of the TCP sockets listening on `port` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            address, port_hex = fields[1].rsplit(":", 1)
            if int(port_hex, 16) == port and fields[3] == "0A":  # LISTEN
                found.add(address)
    return found


def test_predictor_listens_on_loopback_only(open_server):
    # 127.0.0.1 in /proc/net/tcp, and as the v4-mapped ::ffff:127.0.0.1 of gRPC's dual-stack socket
    loopback = {"0100007F", "0000000000000000FFFF00000100007F"}
    for port in (open_server.http_port, open_server.grpc_port):
        assert listening_addresses(port) and listening_addresses(port) <= loopback


def post_json(server, path: str, body, **headers) -> httpx.Response:
    return httpx.post(
        f"{server.url}{path}", content=json.dumps(body), headers={"content-type": "application/json", **headers}
    )


def test_default_answer_carries_no_feature_vectors_on_any_path(open_server):
    v1 = post_json(open_server, f"/v1/models/{MODEL_NAME}:predict", {"instances": [tx(1)]})
    assert v1.status_code == 200, v1.text
    (prediction,) = v1.json()["predictions"]
    assert set(prediction) == {
        "transaction_id",
        "fraud_probability",
        "decision",
        "reason_codes",
        "model_version",
        "features_missing",
        "features_stale",
    }
    # KServe's own handler (no JSON content type): same answer
    kserve_v1 = httpx.post(
        f"{open_server.url}/v1/models/{MODEL_NAME}:predict", content=json.dumps({"instances": [tx(1)]})
    )
    assert kserve_v1.status_code == 200 and "features" not in kserve_v1.json()["predictions"][0]
    v2 = post_json(open_server, f"/v2/models/{MODEL_NAME}/infer", v2_body([tx(2), tx(3)]))
    assert v2.status_code == 200 and "feature_vector" not in outputs_by_name(v2.json())
    # a trusted-header spoof does nothing on a server that does not trust it
    spoof = post_json(open_server, f"/v2/models/{MODEL_NAME}/infer", v2_body([tx(2)]), **{SCOPE_HEADER: "debug"})
    assert "feature_vector" not in outputs_by_name(spoof.json())

    async def call():
        client = InferenceGRPCClient(open_server.grpc_target, timeout=60, retries=0)
        try:
            return await client.infer(grpc_request([tx(4)]))
        finally:
            await client.close()

    names = [output.name for output in asyncio.run(call()).outputs]
    assert "feature_vector" not in names and "decision" in names


def test_one_body_cap_on_every_path(open_server):
    rows = [tx(i, customer=f"C{i:07d}") for i in range(700)]  # ~100 kB of JSON, above the 64 kB cap
    body = json.dumps({"instances": rows})
    assert len(body) > CAP
    # the fast path, then KServe's handler (a body without Content-Type is JSON: the fast path too)
    for headers in ({"content-type": "application/json"}, {"content-type": "text/plain"}, {}):
        response = httpx.post(f"{open_server.url}/v1/models/{MODEL_NAME}:predict", content=body, headers=headers)
        assert response.status_code == 413, response.text
        assert f"larger than {CAP} bytes" in response.json()["error"]

    def chunks():
        for start in range(0, len(body), 4096):
            yield body[start : start + 4096].encode()

    response = httpx.post(
        f"{open_server.url}/v2/models/{MODEL_NAME}/infer",
        content=chunks(),
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 413
    assert open_server.process.poll() is None


def test_grpc_message_size_is_capped(open_server):
    ids = [f"TX{i:010d}" for i in range(8000)]  # ~100 kB of ids alone
    inputs = [InferInput("transaction_id", [len(ids)], "BYTES", ids)]
    request = InferRequest(model_name=MODEL_NAME, infer_inputs=inputs, request_id="big")

    async def call():
        client = InferenceGRPCClient(open_server.grpc_target, timeout=60, retries=0)
        try:
            return await client.infer(request)
        finally:
            await client.close()

    with pytest.raises(grpc.RpcError) as error:
        asyncio.run(call())
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_v2_flood_of_tensors_is_refused_with_a_short_answer(open_server):
    item = {"name": "x", "datatype": "BYTES", "shape": [1], "data": ["a"]}
    body = {"inputs": [item] * 1500}  # ~80 kB would pass no cap: a smaller cap for this flood
    small = {"inputs": [item] * 600}
    response = post_json(open_server, f"/v2/models/{MODEL_NAME}/infer", small)
    assert response.status_code == 400
    assert response.json()["error"] == "inputs: 600 input tensors given, a request has exactly 5"
    response = post_json(open_server, f"/v2/models/{MODEL_NAME}/infer", body)
    assert response.status_code == 413


def test_echoed_values_are_truncated(open_server):
    long_time = "9" * 20_000
    response = post_json(open_server, f"/v1/models/{MODEL_NAME}:predict", {"instances": [tx(1, tx_datetime=long_time)]})
    assert response.status_code == 400
    assert "instances[0].tx_datetime" in response.json()["error"] and len(response.text) < 600


def test_repository_changes_are_refused(open_server):
    response = httpx.post(f"{open_server.url}/v2/repository/models/{MODEL_NAME}/unload")
    assert response.status_code == 403
    ready = httpx.get(f"{open_server.url}/v2/models/{MODEL_NAME}/ready")
    assert ready.status_code == 200
    answer = post_json(open_server, f"/v1/models/{MODEL_NAME}:predict", {"instances": [tx(9)]})
    assert np.isfinite(answer.json()["predictions"][0]["fraud_probability"])  # the model is still served


def test_replayed_transaction_gets_its_decision_and_different_content_a_409(open_server):
    path = f"/v1/models/{MODEL_NAME}:predict"
    first = post_json(open_server, path, {"instances": [tx(60, amount=1.0)]})
    assert first.status_code == 200, first.text
    assert post_json(open_server, path, {"instances": [tx(60, amount=1.0)]}).json() == first.json()
    conflict = post_json(open_server, path, {"instances": [tx(60, amount=99_999.0)]})
    assert conflict.status_code == 409 and "'RQ0060' was already scored with different content" in conflict.text
    kserve_path = httpx.post(f"{open_server.url}{path}", content=json.dumps({"instances": [tx(60, amount=5.0)]}))
    assert kserve_path.status_code == 409
    assert post_json(open_server, path, {"instances": [tx(60, amount=1.0)]}).json() == first.json()

    async def call():
        client = InferenceGRPCClient(open_server.grpc_target, timeout=60, retries=0)
        try:
            return await client.infer(grpc_request([tx(60, amount=2.0)]))
        finally:
            await client.close()

    with pytest.raises(grpc.RpcError) as error:
        asyncio.run(call())
    assert error.value.code() == grpc.StatusCode.ALREADY_EXISTS


# --- property-based fuzzing of V1 and V2 (hypothesis) --------------------------------------------------
JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=80)
    | st.sampled_from(["4111111111111111", "TX\u00001", "\u00e9", "2026-01-21T10:00:00Z", "NaN", "-1", "x" * 300])
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=12), inner, max_size=6),
    max_leaves=30,
)
FIELD_NAMES = st.sampled_from(["transaction_id", "customer_id", "terminal_id", "tx_amount", "tx_datetime"]) | st.text(
    max_size=20
)
TRANSACTION = st.dictionaries(FIELD_NAMES, JSON_VALUES, max_size=7)
V1_BODIES = st.one_of(
    st.fixed_dictionaries({"instances": st.lists(TRANSACTION, max_size=20)}),
    st.fixed_dictionaries({"instances": JSON_VALUES}),
    st.dictionaries(st.text(max_size=12), JSON_VALUES, max_size=4),
    JSON_VALUES,
)
TENSOR = st.fixed_dictionaries(
    {
        "name": FIELD_NAMES,
        "datatype": st.sampled_from(["BYTES", "FP64", "FP32", "INT64", "BOOL"]) | st.text(max_size=8),
        "shape": st.lists(st.integers(min_value=-3, max_value=2**40), max_size=4),
        "data": st.lists(JSON_VALUES, max_size=20),
    },
    optional={"parameters": JSON_VALUES},
)
V2_BODIES = st.one_of(
    st.fixed_dictionaries({"inputs": st.lists(TENSOR, max_size=8)}, optional={"id": JSON_SCALARS}),
    st.dictionaries(st.sampled_from(["inputs", "id", "outputs", "parameters"]), JSON_VALUES, max_size=4),
)
RAW_BODIES = st.binary(max_size=2000)


def resident_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def fuzz_once(server, route: str, body: bytes, json_type: bool) -> None:
    headers = {"content-type": "application/json"} if json_type else {}
    response = httpx.post(f"{server.url}{route}", content=body, headers=headers, timeout=30)  # a hang fails here
    assert response.status_code < 500, (response.status_code, response.text[:300], body[:300])
    assert len(response.content) < 20_000  # no amplification


def fuzz_server(server, examples: int, derandomize: bool) -> None:
    routes = {"v1": f"/v1/models/{MODEL_NAME}:predict", "v2": f"/v2/models/{MODEL_NAME}/infer"}
    before = resident_kib(server.process.pid)

    @settings(max_examples=examples, deadline=None, derandomize=derandomize, database=None)
    @given(
        protocol=st.sampled_from(["v1", "v2"]),
        body=st.one_of(V1_BODIES.map(json.dumps), V2_BODIES.map(json.dumps), RAW_BODIES),
        json_type=st.booleans(),
    )
    def check(protocol, body, json_type):
        fuzz_once(server, routes[protocol], body if isinstance(body, bytes) else body.encode(), json_type)

    check()
    assert server.process.poll() is None
    assert resident_kib(server.process.pid) - before < 200 * 1024  # bounded memory


def test_fuzzed_v1_and_v2_bodies_never_get_a_5xx(open_server):
    fuzz_server(open_server, examples=40, derandomize=True)


@pytest.mark.slow
def test_fuzzed_v1_and_v2_bodies_never_get_a_5xx_long_run(open_server):
    fuzz_server(open_server, examples=1500, derandomize=False)


TRANSFORMER_TOKENS = r"""
import json, sys
from drift_transformer.auth import TokenFileError, read_token_file
out = []
for path in sys.argv[1:]:
    try:
        out.append(sorted([d.hex(), sorted(s)] for d, s in read_token_file(path).items()))
    except TokenFileError as exc:
        out.append(str(exc))
print(json.dumps(out))
"""


def test_transformer_copy_of_the_token_file_reader_agrees_with_the_predictor(tmp_path):
    if not DRIFT_PYTHON.exists():
        pytest.skip(f"{DRIFT_PYTHON} missing: run `make setup`")
    texts = [
        f"{TOKEN_A} score,debug\n{TOKEN_B} explain # x\n",
        f"{TOKEN_A} score extra\n",
        f"{TOKEN_A} admin\n",
        "short score\n",
        f"{TOKEN_A} score\n{TOKEN_A} debug\n",
        "\n# empty\n",
    ]
    paths = []
    for i, text in enumerate(texts):
        paths.append(tmp_path / f"tokens-{i}")
        paths[-1].write_text(text)
    completed = subprocess.run(
        [str(DRIFT_PYTHON), "-c", TRANSFORMER_TOKENS, *map(str, paths)],
        cwd=DRIFT_TRANSFORMER_DIR,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    ours = []
    for path in paths:
        try:
            ours.append(sorted([d.hex(), sorted(s)] for d, s in read_token_file(path).items()))
        except TokenFileError as exc:
            ours.append(str(exc))
    assert json.loads(completed.stdout.strip().splitlines()[-1]) == ours
