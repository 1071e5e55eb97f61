"""Wire formats of the predictor: KServe V1 `instances` and Open Inference Protocol (V2) tensors
in, V1 `predictions` and V2 output tensors out.

Parsing validates every transaction through `fraud.schema.TransactionRequest` and raises
`kserve.errors.InvalidInput` (HTTP 400 / gRPC INVALID_ARGUMENT) naming the field, the row and the
reason. Nothing here touches the model or the feature store.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
from kserve.errors import InvalidInput
from kserve.protocol.infer_type import InferInput, InferOutput, InferRequest, InferResponse
from pydantic import ValidationError

from fraud.features.definitions import MODEL_FEATURES
from fraud.schema import (
    CUSTOMER_ID,
    REQUEST_FIELDS,
    TERMINAL_ID,
    TRANSACTION_ID,
    TX_AMOUNT,
    TX_DATETIME,
    TransactionRequest,
)

PROTOCOL_V1 = "v1"
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


def request_protocol(body: Any) -> str:
    if isinstance(body, InferRequest):
        return PROTOCOL_GRPC_V2 if body.from_grpc else PROTOCOL_V2
    return PROTOCOL_V1


# --- validation ------------------------------------------------------------------------------
def _reason(error: dict[str, Any]) -> str:
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
        raise InvalidInput(f"unknown top-level field(s) {unknown}; a V1 request holds only 'instances'")
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


def _tensor_values(tensor: InferInput) -> list[Any]:
    """The tensor's elements as Python values (bytes decoded to str), checked against its shape."""
    shape = [int(d) for d in tensor.shape]
    if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
        raise InvalidInput(f"input '{tensor.name}': shape must be [n] or [n, 1], got {shape}")
    try:
        array = tensor.as_numpy()
    except (ValueError, TypeError) as exc:
        raise InvalidInput(
            f"input '{tensor.name}': data does not match shape {shape} and datatype {tensor.datatype}: {exc}"
        ) from None
    values = array.reshape(-1).tolist()
    if tensor.datatype == "BYTES":
        decoded = []
        for index, value in enumerate(values):
            if isinstance(value, bytes):
                try:
                    value = value.decode("utf-8")
                except UnicodeDecodeError:
                    raise InvalidInput(f"input '{tensor.name}'[{index}]: is not valid UTF-8") from None
            decoded.append(value if isinstance(value, str) else str(value))
        values = decoded
    return values


def parse_v2(request: InferRequest, max_batch_size: int) -> ParsedRequest:
    """One named input tensor per transaction field, each of shape [n] or [n, 1]."""
    names = [tensor.name for tensor in request.inputs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise InvalidInput(f"input tensor(s) {duplicates} given more than once")
    unknown = sorted(set(names) - set(REQUEST_FIELDS))
    if unknown:
        raise InvalidInput(f"unknown input tensor(s) {unknown}; expected {list(REQUEST_FIELDS)}")
    missing = [name for name in REQUEST_FIELDS if name not in names]
    if missing:
        raise InvalidInput(f"input tensor(s) {missing} missing; expected {list(REQUEST_FIELDS)}")
    columns: dict[str, list[Any]] = {}
    for tensor in request.inputs:
        allowed = INPUT_DATATYPES[tensor.name]
        if tensor.datatype not in allowed:
            raise InvalidInput(f"input '{tensor.name}': datatype must be {' or '.join(allowed)}, got {tensor.datatype}")
        columns[tensor.name] = _tensor_values(tensor)
    lengths = {name: len(values) for name, values in columns.items()}
    if len(set(lengths.values())) != 1:
        raise InvalidInput(f"input tensors must all hold the same number of transactions, got {lengths}")
    count = next(iter(lengths.values()))
    check_batch_size(count, max_batch_size, "inputs")
    transactions = [
        validate_transaction({name: columns[name][i] for name in REQUEST_FIELDS}, f"input '{{field}}'[{i}]")
        for i in range(count)
    ]
    return ParsedRequest(request_protocol(request), transactions, request_id=request.id, infer_request=request)


# --- encoding --------------------------------------------------------------------------------
def encode_v1(batch: ScoredBatch) -> dict[str, Any]:
    predictions = []
    for i, tx in enumerate(batch.request.transactions):
        predictions.append(
            {
                "transaction_id": tx.transaction_id,
                "fraud_probability": float(batch.probabilities[i]),
                "decision": batch.decisions[i],
                "reason_codes": [code.to_dict() for code in batch.reason_codes[i]],
                "model_version": batch.model_version,
                "features_missing": bool(batch.features_missing[i]),
                "features_stale": bool(batch.features_stale[i]),
                "features": {name: float(v) for name, v in zip(MODEL_FEATURES, batch.feature_matrix[i])},
            }
        )
    return {"predictions": predictions}


def _output(name: str, array: np.ndarray) -> InferOutput:
    datatype, _ = OUTPUT_TENSORS[name]
    output = InferOutput(name=name, shape=list(array.shape), datatype=datatype)
    output.set_data_from_numpy(array, binary_data=False)
    return output


def encode_v2(batch: ScoredBatch, model_name: str) -> InferResponse:
    n = len(batch.request.transactions)
    text = lambda values: np.array(values, dtype=np.object_)
    outputs = [
        _output("transaction_id", text([tx.transaction_id for tx in batch.request.transactions])),
        _output("fraud_probability", np.asarray(batch.probabilities, dtype=np.float64)),
        _output("decision", text(batch.decisions)),
        _output(
            "reason_codes",
            text([json.dumps([code.to_dict() for code in codes]) for codes in batch.reason_codes]),
        ),
        _output("model_version", text([batch.model_version] * n)),
        _output("features_missing", np.asarray(batch.features_missing, dtype=np.bool_)),
        _output("features_stale", np.asarray(batch.features_stale, dtype=np.bool_)),
        _output("feature_vector", np.ascontiguousarray(batch.feature_matrix, dtype=np.float64)),
    ]
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
