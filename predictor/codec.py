"""Wire formats of the predictor: KServe V1 `instances` and Open Inference Protocol (V2) tensors
in, V1 `predictions` and V2 output tensors out.

Parsing validates every transaction through `fraud.schema.TransactionRequest` and raises
`kserve.errors.InvalidInput` (HTTP 400 / gRPC INVALID_ARGUMENT) naming the field, the row and the
reason. Nothing here touches the model or the feature store.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import numpy as np
import orjson
from kserve.errors import InvalidInput
from kserve.protocol.infer_type import InferInput, InferOutput, InferRequest, InferResponse
from pydantic import ValidationError

from fraud.features.definitions import MODEL_FEATURES
from fraud.schema import (
    CUSTOMER_ID,
    MAX_REQUEST_ID_LENGTH,
    REQUEST_FIELDS,
    TERMINAL_ID,
    TRANSACTION_ID,
    TX_AMOUNT,
    TX_DATETIME,
    TransactionRequest,
    echo,
    identifier_problem,
)

PROTOCOL_V1 = "v1"
#: Longest library error text quoted in a 400 answer
MAX_REASON_CHARS = 160
PROTOCOL_V2 = "v2"
PROTOCOL_GRPC_V2 = "grpc-v2"

#: Accepted datatypes of each V2 input tensor.
INPUT_DATATYPES: dict[str, tuple[str, ...]] = {
    TRANSACTION_ID: ("BYTES",),
    CUSTOMER_ID: ("BYTES",),
    TERMINAL_ID: ("BYTES",),
    TX_AMOUNT: ("FP64", "FP32"),
    TX_DATETIME: ("INT64", "BYTES"),
}

#: Output tensors of a V2 response: name -> (datatype, shape with -1 for the batch dimension).
OUTPUT_TENSORS: dict[str, tuple[str, list[int]]] = {
    "transaction_id": ("BYTES", [-1]),
    "fraud_probability": ("FP64", [-1]),
    "decision": ("BYTES", [-1]),
    "reason_codes": ("BYTES", [-1]),
    "model_version": ("BYTES", [-1]),
    "features_missing": ("BOOL", [-1]),
    "features_stale": ("BOOL", [-1]),
    "feature_vector": ("FP64", [-1, len(MODEL_FEATURES)]),
}


def input_metadata() -> list[dict[str, Any]]:
    """V2 model-metadata `inputs`: one tensor per request field, shape [n] (or [n, 1])."""
    return [{"name": name, "datatype": INPUT_DATATYPES[name][0], "shape": [-1]} for name in REQUEST_FIELDS]


def output_metadata() -> list[dict[str, Any]]:
    return [{"name": name, "datatype": dtype, "shape": list(shape)} for name, (dtype, shape) in OUTPUT_TENSORS.items()]


@dataclass(frozen=True)
class ParsedRequest:
    """A validated scoring request: its transactions and how to answer it."""

    protocol: str
    transactions: list[TransactionRequest]
    request_id: str | None = None
    infer_request: InferRequest | None = field(default=None, repr=False)
    #: when the request reached the model (UTC) and its time.perf_counter() then, for the audit trail
    received_at: datetime | None = None
    arrival: float | None = None


@dataclass(frozen=True)
class ReasonCode:
    feature: str
    description: str
    contribution: float

    def to_dict(self) -> dict[str, Any]:
        return {"feature": self.feature, "description": self.description, "contribution": self.contribution}


@dataclass(frozen=True)
class ScoredBatch:
    """The model's answer for one request, row i for transaction i."""

    request: ParsedRequest
    model_version: str
    probabilities: np.ndarray
    decisions: list[str]
    reason_codes: list[list[ReasonCode]]
    features_missing: np.ndarray
    features_stale: np.ndarray
    feature_matrix: np.ndarray  # [n, len(MODEL_FEATURES)], float64
    #: the online store was down and the rows were scored with cold-start defaults (fail-open)
    fail_open: bool = False


@dataclass(frozen=True)
class Explanation:
    """The `explain` answer for one request: the scored batch and, row i for transaction i, the
    TreeSHAP contributions in log-odds, one column per MODEL_FEATURES feature and the bias last."""

    batch: ScoredBatch
    contributions: np.ndarray  # [n, len(MODEL_FEATURES) + 1], float64
    descriptions: list[str]  # human-readable name of each MODEL_FEATURES feature

    def rows(self) -> list[dict[str, Any]]:
        """One explanation per transaction: score, decision, bias and every feature's contribution."""
        batch = self.batch
        explained = []
        for i, tx in enumerate(batch.request.transactions):
            row = self.contributions[i]
            explained.append(
                {
                    "transaction_id": tx.transaction_id,
                    "model_version": batch.model_version,
                    "fraud_probability": float(batch.probabilities[i]),
                    "decision": batch.decisions[i],
                    "bias": float(row[-1]),
                    "contributions": [
                        {"feature": name, "description": description, "contribution": float(value)}
                        for name, description, value in zip(MODEL_FEATURES, self.descriptions, row[:-1], strict=True)
                    ],
                    "features_missing": bool(batch.features_missing[i]),
                    "features_stale": bool(batch.features_stale[i]),
                }
            )
        return explained


def encode_v1_explanation(explanation: Explanation) -> dict[str, Any]:
    """`{"explanations": [...]}`, one entry per transaction (`Explanation.rows`)."""
    return {"explanations": explanation.rows()}


def encode_v2_explanation(explanation: Explanation, model_name: str) -> dict[str, Any]:
    """The V2 REST JSON answer of `/explain`: output tensors `transaction_id`, `fraud_probability`,
    `decision`, `contributions` [n, k] (log-odds, MODEL_FEATURES order), `bias` [n], and the
    feature order itself as `feature_names` [k] and `feature_descriptions` [k]."""
    batch = explanation.batch
    n, k = len(batch.request.transactions), len(MODEL_FEATURES)
    tensors: list[tuple[str, str, list[int], list[Any]]] = [
        ("transaction_id", "BYTES", [n], [tx.transaction_id for tx in batch.request.transactions]),
        ("fraud_probability", "FP64", [n], [float(p) for p in batch.probabilities]),
        ("decision", "BYTES", [n], list(batch.decisions)),
        ("contributions", "FP64", [n, k], explanation.contributions[:, :-1].reshape(-1).tolist()),
        ("bias", "FP64", [n], explanation.contributions[:, -1].tolist()),
        ("feature_names", "BYTES", [k], list(MODEL_FEATURES)),
        ("feature_descriptions", "BYTES", [k], list(explanation.descriptions)),
    ]
    return {
        "model_name": model_name,
        "model_version": batch.model_version,
        "id": batch.request.request_id or "",
        "parameters": None,
        "outputs": [
            {"name": name, "shape": shape, "datatype": datatype, "parameters": None, "data": data}
            for name, datatype, shape, data in tensors
        ],
    }


def request_protocol(body: Any) -> str:
    if isinstance(body, InferRequest):
        return PROTOCOL_GRPC_V2 if body.from_grpc else PROTOCOL_V2
    return PROTOCOL_V1


# --- validation ------------------------------------------------------------------------------
def _reason(error: Mapping[str, object]) -> str:
    kind = error.get("type", "")
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        return "is not a field of a transaction"
    message = str(error.get("msg", "is invalid"))
    return message.removeprefix("Value error, ")


def validate_transaction(values: dict[str, Any], where: str) -> TransactionRequest:
    """One transaction through the schema; `where(field)` names the field in the error."""
    try:
        return TransactionRequest.model_validate(values)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            name = ".".join(str(part) for part in error.get("loc", ())) or "transaction"
            problems.append(f"{where.format(field=name)}: {_reason(error)}")
        raise InvalidInput("; ".join(problems)) from None


def check_batch_size(count: int, max_batch_size: int, what: str) -> None:
    if count == 0:
        raise InvalidInput(f"{what}: the batch is empty; send at least one transaction")
    if count > max_batch_size:
        raise InvalidInput(f"{what}: batch of {count} transactions exceeds the maximum batch size {max_batch_size}")


def parse_v1(body: Any, max_batch_size: int) -> ParsedRequest:
    """`{"instances": [{transaction fields}, ...]}`."""
    if not isinstance(body, dict):
        raise InvalidInput("request body must be a JSON object with an 'instances' list")
    unknown = sorted(set(body) - {"instances"})
    if unknown:
        raise InvalidInput(f"unknown top-level field(s) {echo(unknown)}; a V1 request holds only 'instances'")
    if "instances" not in body:
        raise InvalidInput("instances: is required (a list of transactions)")
    instances = body["instances"]
    if not isinstance(instances, list):
        raise InvalidInput(f"instances: must be a list of transactions, got {type(instances).__name__}")
    check_batch_size(len(instances), max_batch_size, "instances")
    transactions = []
    for index, instance in enumerate(instances):
        if not isinstance(instance, dict):
            raise InvalidInput(f"instances[{index}]: must be an object with fields {list(REQUEST_FIELDS)}")
        transactions.append(validate_transaction(instance, f"instances[{index}].{{field}}"))
    return ParsedRequest(PROTOCOL_V1, transactions)


@dataclass(frozen=True)
class Tensor:
    """One V2 input tensor, however it arrived: `values()` gives its elements as a flat list of
    Python values in row-major order (bytes decoded to str) or raises InvalidInput."""

    name: str
    datatype: str
    shape: list[int]
    values: Callable[[], list[Any]]


def _check_shape(name: str, shape: list[int]) -> None:
    if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
        raise InvalidInput(f"input '{name}': shape must be [n] or [n, 1], got {echo(shape)}")


def _decode_bytes(name: str, values: list[Any]) -> list[str]:
    decoded = []
    for index, value in enumerate(values):
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidInput(f"input '{name}'[{index}]: is not valid UTF-8") from None
        decoded.append(value if isinstance(value, str) else str(value))
    return decoded


def kserve_tensor(tensor: InferInput) -> Tensor:
    """A tensor of KServe's InferRequest (REST JSON or binary extension, or gRPC)."""

    def values() -> list[Any]:
        shape = [int(d) for d in tensor.shape]
        _check_shape(tensor.name, shape)
        try:
            array = tensor.as_numpy()
        except (ValueError, TypeError) as exc:
            # shape (at most 2 dimensions) and datatype were checked before; numpy's reason may quote an
            # element (`could not convert string to float: '...'`): cut it
            reason = str(exc) if len(str(exc)) <= MAX_REASON_CHARS else f"{str(exc)[:MAX_REASON_CHARS]}..."
            raise InvalidInput(
                f"input '{tensor.name}': data does not match shape {shape} and datatype {tensor.datatype}: {reason}"
            ) from None
        flat = array.reshape(-1).tolist()
        return _decode_bytes(tensor.name, flat) if tensor.datatype == "BYTES" else flat

    return Tensor(tensor.name, tensor.datatype, [int(d) for d in tensor.shape], values)


def json_tensor(item: dict[str, Any]) -> Tensor:
    """A tensor of a V2 REST JSON body as parsed by `json_v2_tensors` (no numpy round trip)."""
    name, datatype, shape, data = item["name"], item["datatype"], item["shape"], item["data"]

    def values() -> list[Any]:
        _check_shape(name, shape)
        flat = data
        if len(shape) == 2 and all(isinstance(row, list) for row in data):  # [[a], [b]] for shape [n, 1]
            flat = [element for row in data for element in row]
        if len(flat) != shape[0] or any(isinstance(element, (list, dict)) for element in flat):
            raise InvalidInput(
                f"input '{name}': data does not match shape {echo(shape)} and datatype {datatype}: "
                f"cannot reshape array of size {len(flat)} into shape {echo(tuple(shape))}"
            )
        return _decode_bytes(name, flat) if datatype == "BYTES" else flat

    return Tensor(name, datatype, list(shape), values)


def json_v2_tensors(body: Any) -> list[Tensor] | None:
    """The input tensors of a plain V2 REST JSON request, or None when the body uses anything else
    (requested outputs, binary data, tensor parameters, a malformed structure): those requests
    are left to KServe's own V2 handler, which answers them in full."""
    if not isinstance(body, dict) or set(body) - {"id", "inputs", "parameters"}:
        return None
    if body.get("parameters") or not isinstance(body.get("id", ""), str):
        return None
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        return None
    check_tensor_count(len(inputs))
    tensors = []
    for item in inputs:
        if not isinstance(item, dict) or set(item) - {"name", "datatype", "shape", "data"} or item.get("parameters"):
            return None
        name, datatype, shape, data = item.get("name"), item.get("datatype"), item.get("shape"), item.get("data")
        if not (isinstance(name, str) and isinstance(datatype, str) and isinstance(data, list)):
            return None
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            return None
        if not shape:
            return None
        tensors.append(json_tensor(item))
    return tensors


def check_tensor_count(count: int) -> None:
    """A V2 request names each request field once: more input tensors than fields is refused before
    any tensor is looked at."""
    if count > len(REQUEST_FIELDS):
        raise InvalidInput(f"inputs: {count} input tensors given, a request has exactly {len(REQUEST_FIELDS)}")


def check_request_id(request_id: Any) -> None:
    """The V2 request `id` is echoed in the answer and logged: same character set as the ids."""
    if request_id is None or request_id == "":
        return
    problem = identifier_problem(request_id, MAX_REQUEST_ID_LENGTH)
    if problem is not None:
        raise InvalidInput(f"id: {problem}")


def parse_v2(request: InferRequest, max_batch_size: int) -> ParsedRequest:
    """One named input tensor per transaction field, each of shape [n] or [n, 1]."""
    check_tensor_count(len(request.inputs))
    check_request_id(request.id)
    parsed = parse_v2_tensors([kserve_tensor(tensor) for tensor in request.inputs], max_batch_size)
    return replace(parsed, protocol=request_protocol(request), request_id=request.id, infer_request=request)


def parse_v2_tensors(tensors: list[Tensor], max_batch_size: int, request_id: str | None = None) -> ParsedRequest:
    """Validate V2 input tensors into transactions (V2 REST protocol unless the caller says otherwise).
    Linear in the number of tensors, which is checked first."""
    check_tensor_count(len(tensors))
    check_request_id(request_id)
    names = [tensor.name for tensor in tensors]
    duplicates = sorted(name for name, count in Counter(names).items() if count > 1)
    if duplicates:
        raise InvalidInput(f"input tensor(s) {echo(duplicates)} given more than once")
    unknown = sorted(set(names) - set(REQUEST_FIELDS))
    if unknown:
        raise InvalidInput(f"unknown input tensor(s) {echo(unknown)}; expected {list(REQUEST_FIELDS)}")
    missing = [name for name in REQUEST_FIELDS if name not in names]
    if missing:
        raise InvalidInput(f"input tensor(s) {missing} missing; expected {list(REQUEST_FIELDS)}")
    columns: dict[str, list[Any]] = {}
    for tensor in tensors:
        allowed = INPUT_DATATYPES[tensor.name]
        if tensor.datatype not in allowed:
            raise InvalidInput(
                f"input '{tensor.name}': datatype must be {' or '.join(allowed)}, got {echo(tensor.datatype)}"
            )
        columns[tensor.name] = tensor.values()
    lengths = {name: len(values) for name, values in columns.items()}
    if len(set(lengths.values())) != 1:
        raise InvalidInput(f"input tensors must all hold the same number of transactions, got {lengths}")
    count = next(iter(lengths.values()))
    check_batch_size(count, max_batch_size, "inputs")
    transactions = [
        validate_transaction({name: columns[name][i] for name in REQUEST_FIELDS}, f"input '{{field}}'[{i}]")
        for i in range(count)
    ]
    return ParsedRequest(PROTOCOL_V2, transactions, request_id=request_id)


# --- encoding --------------------------------------------------------------------------------
def encode_v1(batch: ScoredBatch, include_features: bool = False) -> dict[str, Any]:
    """V1 `predictions`; the raw feature vector (`features`) only with `include_features` (the
    caller's `debug` scope): it is the card's history."""
    predictions = []
    for i, tx in enumerate(batch.request.transactions):
        prediction = {
            "transaction_id": tx.transaction_id,
            "fraud_probability": float(batch.probabilities[i]),
            "decision": batch.decisions[i],
            "reason_codes": [code.to_dict() for code in batch.reason_codes[i]],
            "model_version": batch.model_version,
            "features_missing": bool(batch.features_missing[i]),
            "features_stale": bool(batch.features_stale[i]),
        }
        if include_features:
            prediction["features"] = {
                name: float(v) for name, v in zip(MODEL_FEATURES, batch.feature_matrix[i], strict=True)
            }
        predictions.append(prediction)
    return {"predictions": predictions}


def reason_codes_json(codes: list[ReasonCode]) -> str:
    """One transaction's reason codes as the JSON text of the V2 `reason_codes` output."""
    return orjson.dumps([code.to_dict() for code in codes]).decode()


def v2_output_values(batch: ScoredBatch, include_features: bool = False) -> dict[str, np.ndarray]:
    """The V2 output tensors of a scored batch, in OUTPUT_TENSORS order; `feature_vector` only with
    `include_features` (the caller's `debug` scope)."""
    n = len(batch.request.transactions)

    def text(values):
        return np.array(values, dtype=np.object_)

    outputs = {
        "transaction_id": text([tx.transaction_id for tx in batch.request.transactions]),
        "fraud_probability": np.asarray(batch.probabilities, dtype=np.float64),
        "decision": text(batch.decisions),
        "reason_codes": text([reason_codes_json(codes) for codes in batch.reason_codes]),
        "model_version": text([batch.model_version] * n),
        "features_missing": np.asarray(batch.features_missing, dtype=np.bool_),
        "features_stale": np.asarray(batch.features_stale, dtype=np.bool_),
    }
    if include_features:
        outputs["feature_vector"] = np.ascontiguousarray(batch.feature_matrix, dtype=np.float64)
    return outputs


def v2_rest_response(batch: ScoredBatch, model_name: str, include_features: bool = False) -> dict[str, Any]:
    """The V2 REST JSON answer, field for field what KServe's own handler sends for `encode_v2`."""
    outputs = []
    for name, array in v2_output_values(batch, include_features).items():
        datatype, _ = OUTPUT_TENSORS[name]
        outputs.append(
            {
                "name": name,
                "shape": list(array.shape),
                "datatype": datatype,
                "parameters": None,
                "data": array.reshape(-1).tolist(),
            }
        )
    return {
        "model_name": model_name,
        "model_version": batch.model_version,
        "id": batch.request.request_id or "",
        "parameters": None,
        "outputs": outputs,
    }


def _output(name: str, array: np.ndarray) -> InferOutput:
    datatype, _ = OUTPUT_TENSORS[name]
    output = InferOutput(name=name, shape=list(array.shape), datatype=datatype)
    output.set_data_from_numpy(array, binary_data=False)
    return output


def encode_v2(batch: ScoredBatch, model_name: str, include_features: bool = False) -> InferResponse:
    outputs = [_output(name, array) for name, array in v2_output_values(batch, include_features).items()]
    request = batch.request.infer_request
    return InferResponse(
        response_id=(request.id if request is not None and request.id else ""),
        model_name=model_name,
        model_version=batch.model_version,
        infer_outputs=outputs,
        from_grpc=batch.request.protocol == PROTOCOL_GRPC_V2,
        use_binary_outputs=request.use_binary_outputs if request is not None else False,
        requested_outputs=request.request_outputs if request is not None else None,
    )
