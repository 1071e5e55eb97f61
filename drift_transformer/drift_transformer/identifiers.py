"""Identifier checks the transformer applies before forwarding anything to the predictor.

A copy of the rule in the core's `fraud/schema.py` (`identifier_problem`): this environment does not
import the core package. The core's `tests/test_predictor_edge.py` runs both implementations over one
table of cases (`drift_transformer/tests/identifier_cases.json`) so they cannot drift apart.

An identifier (transaction_id, customer_id, terminal_id) holds 1..64 characters from
A-Z a-z 0-9 - _ . : @ / + = and is not shaped like a card number: 13-19 digits (spaces or dashes
allowed between them) whose Luhn check digit holds. A V2 request `id` follows the same rule with
up to 128 characters. Everything else about a request is validated by the predictor.
"""

from __future__ import annotations

import re
from typing import Any

from kserve.errors import InvalidInput
from kserve.protocol.infer_type import InferRequest

ID_FIELDS = ("transaction_id", "customer_id", "terminal_id")
#: The request fields, one V2 input tensor each.
REQUEST_FIELD_COUNT = 5
MAX_ID_LENGTH = 64
MAX_REQUEST_ID_LENGTH = 128
ID_CHARACTERS = "A-Z a-z 0-9 - _ . : @ / + ="
_ID_PATTERN = re.compile(r"[A-Za-z0-9\-_.:@/+=]+")
_PAN_SEPARATORS = re.compile(r"[\- ]")
PAN_MIN_DIGITS = 13
PAN_MAX_DIGITS = 19
MAX_ECHO_CHARS = 40


def echo(value: Any) -> str:
    text = repr(value)
    if len(text) <= MAX_ECHO_CHARS:
        return text
    return f"{text[:MAX_ECHO_CHARS]}... ({len(text)} characters)"


def luhn_valid(digits: str) -> bool:
    total = 0
    for position, char in enumerate(reversed(digits)):
        digit = ord(char) - 48
        if position % 2 == 1:
            digit *= 2
            if digit > 9:
                digit -= 9
        total += digit
    return total % 10 == 0


def looks_like_card_number(value: str) -> bool:
    digits = _PAN_SEPARATORS.sub("", value)
    return (
        PAN_MIN_DIGITS <= len(digits) <= PAN_MAX_DIGITS and digits.isascii() and digits.isdigit() and luhn_valid(digits)
    )


def identifier_problem(value: Any, max_length: int = MAX_ID_LENGTH) -> str | None:
    if not isinstance(value, str):
        return f"must be a string, got {type(value).__name__}"
    if not value:
        return "must not be empty"
    if len(value) > max_length:
        return f"must be at most {max_length} characters, got {len(value)}"
    if looks_like_card_number(value):  # before the character check: a PAN is never echoed
        return "looks like a card number (PAN); send a network token or a surrogate id instead"
    if not _ID_PATTERN.fullmatch(value):
        return f"may only hold the characters {ID_CHARACTERS}, got {echo(value)}"
    return None


def _check_request_id(request_id: Any) -> None:
    if request_id is None or request_id == "":
        return
    problem = identifier_problem(request_id, MAX_REQUEST_ID_LENGTH)
    if problem is not None:
        raise InvalidInput(f"id: {problem}")


def _check_column(name: str, values: list[Any]) -> None:
    for index, value in enumerate(values):
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidInput(f"input '{name}'[{index}]: is not valid UTF-8") from None
        if isinstance(value, list):  # [n, 1] tensors sent as nested lists
            _check_column(name, value)
            continue
        problem = identifier_problem(value)
        if problem is not None:
            raise InvalidInput(f"input '{name}'[{index}]: {problem}")


def check_v1_ids(body: Any) -> None:
    """InvalidInput (400) for the first unacceptable id of a V1 `{"instances": [...]}` body; any
    other shape is left for the predictor to refuse."""
    instances = body.get("instances") if isinstance(body, dict) else None
    if not isinstance(instances, list):
        return
    for index, instance in enumerate(instances):
        if not isinstance(instance, dict):
            continue
        for name in ID_FIELDS:
            if name in instance:
                problem = identifier_problem(instance[name])
                if problem is not None:
                    raise InvalidInput(f"instances[{index}].{name}: {problem}")


def check_v2_json_ids(body: Any) -> None:
    """The same for a V2 REST JSON body: the tensor count first, the request id, the id tensors."""
    if not isinstance(body, dict):
        return
    inputs = body.get("inputs")
    if isinstance(inputs, list) and len(inputs) > REQUEST_FIELD_COUNT:
        raise InvalidInput(f"inputs: {len(inputs)} input tensors given, a request has exactly {REQUEST_FIELD_COUNT}")
    _check_request_id(body.get("id"))
    for item in inputs if isinstance(inputs, list) else ():
        if isinstance(item, dict) and item.get("name") in ID_FIELDS and isinstance(item.get("data"), list):
            _check_column(item["name"], item["data"])


def check_infer_request_ids(request: InferRequest) -> None:
    """The same for a decoded V2 request (gRPC, binary extension)."""
    if len(request.inputs) > REQUEST_FIELD_COUNT:
        raise InvalidInput(
            f"inputs: {len(request.inputs)} input tensors given, a request has exactly {REQUEST_FIELD_COUNT}"
        )
    _check_request_id(request.id)
    for tensor in request.inputs:
        if tensor.name in ID_FIELDS and tensor.datatype == "BYTES":
            try:
                values = tensor.as_numpy().reshape(-1).tolist()
            except (ValueError, TypeError):
                continue  # the predictor names the shape problem
            _check_column(tensor.name, values)
