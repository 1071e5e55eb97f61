"""The REST scoring routes without FastAPI's per-request machinery (`--rest-fast-path`, on by default).

KServe answers `POST /v1/models/{name}:predict` and `POST /v2/models/{name}/infer` through FastAPI:
the body is validated into pydantic request models, converted to KServe's `InferRequest`, the
answer built as an `InferResponse`, turned back into pydantic models and serialised by FastAPI's
`jsonable_encoder`. For a one-transaction request that machinery costs more CPU than the feature
lookup and the model together (profile in docs/performance.md). This ASGI middleware sits in
front of KServe's app and answers exactly those two routes of this model itself:

* body read once, `orjson` parsing, the same validation functions as the KServe path
  (`predictor.codec.parse_v1` / `parse_v2_tensors`: the same 400 messages naming field and row);
* the same `FraudModel.infer_parsed` (micro-batching, feature lookup, scoring, audit trail,
  metrics) the KServe path runs through `FraudModel.__call__`;
* the answer serialised with `orjson`, field for field what KServe's handler sends
  (`tests/test_predictor_server.py` compares both paths' answers).

Everything else goes to KServe unchanged, with the body replayed: other paths and methods, a model
that is not ready, non-JSON content types, the binary tensor extension, requested outputs, tensor
parameters, and bodies that are not well-formed JSON requests (KServe's own error answers apply).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import orjson
from kserve.errors import InvalidInput, ServerNotReady

from predictor.asgi import ASGIApp, Receive, Scope, Send, plain_json, read_body, replay
from predictor.auth import SCOPE_DEBUG
from predictor.codec import (
    PROTOCOL_V1,
    PROTOCOL_V2,
    encode_v1,
    json_v2_tensors,
    parse_v1,
    parse_v2_tensors,
    v2_rest_response,
)
from predictor.edge import INTERNAL_ERROR, REQUEST_SCOPES
from predictor.idempotency import TransactionConflict

if TYPE_CHECKING:
    from predictor.model import FraudModel

logger = logging.getLogger("kserve.fraud_predictor")

#: Bodies above this size are left to KServe (its own body limit applies there).
MAX_FAST_BODY_BYTES = 8 * 1024 * 1024
_JSON_HEADERS = [(b"content-type", b"application/json")]


class FastScoringRoutes:
    """ASGI middleware: answers the model's V1 predict and V2 infer JSON requests directly."""

    def __init__(self, app: ASGIApp, model: FraudModel) -> None:
        self.app = app
        self.model = model
        self.routes = {
            f"/v1/models/{model.name}:predict": PROTOCOL_V1,
            f"/v2/models/{model.name}/infer": PROTOCOL_V2,
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        protocol = self.routes.get(scope.get("path", "")) if scope["type"] == "http" else None
        if protocol is None or scope.get("method") != "POST" or not self.model.ready or not plain_json(scope):
            await self.app(scope, receive, send)
            return
        body, complete = await read_body(receive, MAX_FAST_BODY_BYTES)
        handled = complete and await self._answer(protocol, body, send)
        if not handled:
            await self.app(scope, replay(body, complete, receive), send)

    async def _answer(self, protocol: str, body: bytes, send: Send) -> bool:
        """Answer the request; False (nothing sent) when KServe's handler should take it."""
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            return False
        model = self.model
        include_features = SCOPE_DEBUG in (REQUEST_SCOPES.get() or ())
        try:
            if protocol == PROTOCOL_V1:
                if not isinstance(payload, dict):
                    return False

                def parse():
                    return parse_v1(payload, model.settings.max_batch_size)
            else:
                tensors = json_v2_tensors(payload)
                if tensors is None:
                    return False
                request_id = payload.get("id") or None

                def parse():
                    return parse_v2_tensors(tensors, model.settings.max_batch_size, request_id)

            scored = await model.infer_parsed(protocol, parse)
        except InvalidInput as exc:
            await _send_json(send, 400, {"error": str(exc)})
            return True
        except TransactionConflict as exc:
            await _send_json(send, 409, {"error": exc.message})
            return True
        except ServerNotReady as exc:
            await _send_json(send, 503, {"error": str(exc)})
            return True
        except Exception as exc:  # details to the log only; the answer says nothing of the internals
            logger.error("Exception:", exc_info=exc)
            await _send_json(send, 500, {"error": INTERNAL_ERROR})
            return True
        if protocol == PROTOCOL_V1:
            answer = encode_v1(scored, include_features)
        else:
            answer = v2_rest_response(scored, model.name, include_features)
        await _send_json(send, 200, answer)
        return True


async def _send_json(send: Send, status: int, content: Any) -> None:
    payload = orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)
    headers = [*_JSON_HEADERS, (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
