"""Explanations on demand: `POST /v1/models/{name}:explain` (KServe's V1 explain verb) and
`POST /v2/models/{name}/explain` (the same for Open Inference Protocol JSON tensors).

The request is exactly a scoring request (V1 `instances`, or V2 JSON input tensors), validated by
the same functions (`predictor.codec.parse_v1` / `parse_v2_tensors`: the same 400 messages). The
features are computed as for scoring (online store lookup, velocity windows) and every transaction
gets its full XGBoost TreeSHAP contributions - the computation the reason codes are taken from -
one per model feature with its human-readable name, plus the bias; bias + contributions is the
model's log-odds. Nothing is scored as a decision: no idempotency ledger, no velocity event; with
an audit trail the explanation is spooled as an explanation record (`fraud.audit`).

`predictor.edge.RequestGate` admits these routes only for callers with the `explain` scope (403
otherwise). This ASGI middleware answers them itself, whether or not the fast scoring path is on;
bodies in the binary tensor extension are refused with 415.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import orjson
from kserve.errors import InvalidInput, ServerNotReady

from predictor.asgi import ASGIApp, Receive, Scope, Send, read_body
from predictor.codec import (
    PROTOCOL_V1,
    PROTOCOL_V2,
    encode_v1_explanation,
    encode_v2_explanation,
    json_v2_tensors,
    parse_v1,
    parse_v2_tensors,
)
from predictor.edge import INTERNAL_ERROR
from predictor.fast_rest import MAX_FAST_BODY_BYTES, _send_json

if TYPE_CHECKING:
    from predictor.model import FraudModel

logger = logging.getLogger("kserve.fraud_predictor")

V2_EXPLAIN_HINT = (
    "a V2 explain request is a JSON object with 'inputs': one tensor per transaction field "
    "(name, datatype, shape, data), as for /infer"
)


def explain_routes(model_name: str) -> dict[str, str]:
    """Path -> protocol of the two explanation routes of `model_name`."""
    return {f"/v1/models/{model_name}:explain": PROTOCOL_V1, f"/v2/models/{model_name}/explain": PROTOCOL_V2}


class ExplainRoutes:
    """ASGI middleware answering the model's V1 `:explain` and V2 `/explain` (module docstring)."""

    def __init__(self, app: ASGIApp, model: FraudModel) -> None:
        self.app = app
        self.model = model
        self.routes = explain_routes(model.name)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        protocol = self.routes.get(scope.get("path", "")) if scope["type"] == "http" else None
        if protocol is None:
            await self.app(scope, receive, send)
            return
        if scope.get("method") != "POST":
            await _send_json(send, 405, {"error": f"{scope.get('path')} takes POST"})
            return
        if any(key == b"inference-header-content-length" for key, _ in scope.get("headers", ())):
            await _send_json(
                send, 415, {"error": "explain takes JSON; the binary tensor extension is not accepted on this route"}
            )
            return
        body, complete = await read_body(receive, MAX_FAST_BODY_BYTES)
        if not complete:
            return  # the client went away (the body cap is enforced before, by predictor.edge)
        status, answer = await self._answer(protocol, body)
        await _send_json(send, status, answer)

    async def _answer(self, protocol: str, body: bytes) -> tuple[int, Any]:
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            return 400, {"error": f"request body is not valid JSON: {exc}"}
        model = self.model
        max_batch = model.settings.max_batch_size
        try:
            if protocol == PROTOCOL_V1:

                def parse():
                    return parse_v1(payload, max_batch)
            else:
                tensors = json_v2_tensors(payload)
                if tensors is None:
                    raise InvalidInput(V2_EXPLAIN_HINT)
                request_id = payload.get("id") or None

                def parse():
                    return parse_v2_tensors(tensors, max_batch, request_id)

            explanation = await model.explain_parsed(protocol, parse)
        except InvalidInput as exc:
            return 400, {"error": str(exc)}
        except ServerNotReady as exc:
            return 503, {"error": str(exc)}
        except Exception as exc:  # details to the log only; the answer says nothing of the internals
            logger.error("Exception:", exc_info=exc)
            return 500, {"error": INTERNAL_ERROR}
        if protocol == PROTOCOL_V1:
            return 200, encode_v1_explanation(explanation)
        return 200, encode_v2_explanation(explanation, model.name)
