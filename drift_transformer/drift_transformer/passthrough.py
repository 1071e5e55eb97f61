"""The transformer's REST scoring routes as a byte pass-through (`--rest-fast-path`, on by default).

Through KServe's handlers a request crosses the transformer as: FastAPI body validation, an
`InferRequest`, a JSON body re-encoded for the predictor (httpx, KServe's REST client), the answer
parsed into an `InferResponse` and encoded again for the client - four JSON transformations and
FastAPI's response encoder for a request the transformer does not change. This ASGI middleware sits
in front of KServe's app and, for `POST /v1/models/{name}:predict` and `POST /v2/models/{name}/infer`
with a JSON body, forwards the request body as it arrived to the same route of the predictor over
pooled keep-alive connections (aiohttp) and returns the predictor's answer - status, content type
and body - unchanged. Only after the answer is sent are its feature vectors read (one `orjson`
parse) and queued for the drift monitor (`DriftTransformer.observe_answer`).

The explanation routes (`POST /v1/models/{name}:explain`, `POST /v2/models/{name}/explain`) are
forwarded the same way whatever `--rest_fast_path` says (KServe's transformer has no V2 explain
route); the answer is passed back unchanged.

Same contract as the KServe path (`tests/test_server.py` runs both): predictor unreachable -> 503,
no connection in time -> 503, no answer in time -> 504, the predictor's error answers passed
through with status and body; the same Prometheus metrics. Everything else - gRPC, other routes,
non-JSON content types, the binary tensor extension, a transformer not yet ready (503 from KServe)
- goes to KServe's handlers, with the body replayed.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import aiohttp
import orjson
from kserve.errors import InvalidInput

from drift_transformer.asgi import ASGIApp, Message, Receive, Scope, Send, plain_json, read_body, replay
from drift_transformer.auth import SCOPE_DEBUG
from drift_transformer.edge import REQUEST_SCOPES
from drift_transformer.identifiers import check_v1_ids, check_v2_json_ids

if TYPE_CHECKING:
    from drift_transformer.transformer import DriftTransformer

logger = logging.getLogger(__name__)

#: Bodies above this size go through KServe's handlers (its own body limit applies there).
MAX_FAST_BODY_BYTES = 16 * 1024 * 1024
#: Pooled connections are not reused after this idle time: uvicorn (the predictor) closes idle
#: keep-alive connections after 5 s, and a request written on a connection being closed would fail.
KEEPALIVE_SECONDS = 4.0
#: Request headers sent on to the predictor (KServe's forwardable headers, and tracing)
#: (not the client's Authorization: the transformer calls the predictor with its own credentials)
FORWARDED_HEADERS = frozenset(
    {b"x-request-id", b"x-b3-traceid", b"x-b3-spanid", b"x-b3-sampled", b"traceparent", b"tracestate"}
)


class PassThroughRoutes:
    """ASGI middleware: the model's V1 predict and V2 infer JSON requests, forwarded as bytes."""

    def __init__(
        self,
        app: ASGIApp,
        transformer: DriftTransformer,
        predictor_base_url: str,
        connect_timeout: float = 2.0,
        request_timeout: float = 30.0,
        max_connections: int = 100,
        forward_v2: bool = True,
        forward_scoring: bool = True,
    ) -> None:
        """`forward_v2` False leaves V2 requests to KServe's handlers (the predictor is called over
        gRPC then, `--protocol grpc-v2`); `forward_scoring` False leaves every scoring request to
        them (`--rest_fast_path false`). The explanation routes are always forwarded: the
        predictor serves them over REST only."""
        from drift_transformer.transformer import PROTOCOL_V1, PROTOCOL_V2, strip_v1_features, strip_v2_json_features

        self.app = app
        self.transformer = transformer
        self.base_url = predictor_base_url.rstrip("/")
        self.host = self.base_url.split("://", 1)[-1]
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self.max_connections = max_connections
        self.protocol_v1 = PROTOCOL_V1
        self.strip = {PROTOCOL_V1: strip_v1_features, PROTOCOL_V2: strip_v2_json_features}
        self.routes: dict[str, str] = {}
        if forward_scoring:
            self.routes[f"/v1/models/{transformer.name}:predict"] = PROTOCOL_V1
        if forward_scoring and forward_v2:
            self.routes[f"/v2/models/{transformer.name}/infer"] = PROTOCOL_V2
        self.explain_routes = {
            f"/v1/models/{transformer.name}:explain": PROTOCOL_V1,
            f"/v2/models/{transformer.name}/explain": PROTOCOL_V2,
        }
        self._session: aiohttp.ClientSession | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, self._closing_on_shutdown(receive), send)
            return
        path = scope.get("path", "")
        if scope["type"] == "http" and path in self.explain_routes:
            await self._explain(scope, receive, send)
            return
        protocol = self.routes.get(path) if scope["type"] == "http" else None
        if (
            protocol is None
            or scope.get("method") != "POST"
            or not plain_json(scope)
            or not await self.transformer.healthy()
        ):
            await self.app(scope, receive, send)
            return
        body, complete = await read_body(receive, MAX_FAST_BODY_BYTES)
        if not complete or not body.lstrip().startswith(b"{"):  # not a JSON object: KServe's 400
            await self.app(scope, replay(body, complete, receive), send)
            return
        try:
            request = orjson.loads(body)
            (check_v1_ids if protocol == self.protocol_v1 else check_v2_json_ids)(request)
        except orjson.JSONDecodeError:  # KServe's own 400 for a malformed body
            await self.app(scope, replay(body, complete, receive), send)
            return
        except InvalidInput as exc:
            status, content_type, answer = _error(400, str(exc))
            await _send(send, status, content_type, answer)
            self.transformer.metrics.requests.labels(protocol=protocol, status="400").inc()
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"] if k in FORWARDED_HEADERS}
        headers.update(self.transformer.predictor_headers)
        headers["content-type"] = "application/json"
        status, content_type, answer = await self._forward(protocol, path, body, headers)
        result = None
        if status == 200:
            try:
                result = orjson.loads(answer)
            except orjson.JSONDecodeError:
                logger.error("the predictor's answer is not JSON; not passed on")
                status, content_type, answer = _error(502, "the predictor's answer could not be read")
        vectors = None
        if result is not None:
            vectors = self.transformer.answer_vectors(protocol, result)  # before the answer is stripped
            if SCOPE_DEBUG not in (REQUEST_SCOPES.get() or ()):
                answer = orjson.dumps(self.strip[protocol](result))
        await _send(send, status, content_type, answer)
        self.transformer.metrics.requests.labels(protocol=protocol, status=str(status)).inc()
        if vectors is not None:
            self.transformer.submit_vectors(*vectors)

    async def _explain(self, scope: Scope, receive: Receive, send: Send) -> None:
        """An explanation request (`:explain`, `/explain`): the body to the predictor's same route as
        it arrived, the predictor's answer back unchanged (an explanation holds no feature vector)."""
        path = scope.get("path", "")
        if scope.get("method") != "POST":
            await _send(send, *_error(405, f"{path} takes POST"))
            return
        if not await self.transformer.healthy():
            await _send(send, *_error(503, f"model {self.transformer.name} is not ready"))
            return
        body, complete = await read_body(receive, MAX_FAST_BODY_BYTES)
        if not complete:
            return  # the client went away (the body cap is enforced before, by drift_transformer.edge)
        headers = {
            k.decode("latin-1"): v.decode("latin-1")
            for k, v in scope["headers"]
            if k in FORWARDED_HEADERS or k in (b"content-type", b"inference-header-content-length")
        }
        headers.update(self.transformer.predictor_headers)
        status, content_type, answer = await self._forward(self.explain_routes[path] + "-explain", path, body, headers)
        await _send(send, status, content_type, answer)

    async def _forward(self, protocol: str, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, str, bytes]:
        """(status, content type, body) of the predictor's answer, or of the transformer's error answer."""
        metrics = self.transformer.metrics
        started = time.perf_counter()
        try:
            async with self._client().post(self.base_url + path, data=body, headers=headers) as response:
                answer = await response.read()
                status, content_type = response.status, response.headers.get("content-type", "application/json")
        except aiohttp.ConnectionTimeoutError:
            metrics.predictor_errors.labels(kind="unavailable").inc()
            return _error(503, f"predictor at {self.host} did not accept a connection in time")
        except (TimeoutError, aiohttp.ServerTimeoutError):
            metrics.predictor_errors.labels(kind="timeout").inc()
            return _error(504, f"predictor at {self.host} did not answer within {self.request_timeout:g}s")
        except (aiohttp.ClientError, OSError) as exc:
            metrics.predictor_errors.labels(kind="unavailable").inc()
            detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            logger.warning("predictor at %s is unreachable (%s)", self.host, detail)
            return _error(503, "the predictor is unreachable")
        finally:
            metrics.predictor_seconds.labels(protocol=protocol).observe(time.perf_counter() - started)
        if status >= 400:
            metrics.predictor_errors.labels(kind="http_4xx" if status < 500 else "http_5xx").inc()
            logger.debug("predictor %s answered %d: %s", self.host, status, answer[:500])
        return status, content_type, answer

    def _client(self) -> aiohttp.ClientSession:
        """One pooled session, created on first use inside the serving event loop."""
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=self.max_connections, keepalive_timeout=KEEPALIVE_SECONDS, use_dns_cache=True
            )
            timeout = aiohttp.ClientTimeout(total=self.request_timeout, sock_connect=self.connect_timeout)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=timeout, auto_decompress=False, skip_auto_headers=("User-Agent",)
            )
        return self._session

    def _closing_on_shutdown(self, receive: Receive) -> Receive:
        async def wrapped() -> Message:
            message = await receive()
            if message.get("type") == "lifespan.shutdown" and self._session is not None:
                await self._session.close()
            return message

        return wrapped


async def _send(send: Send, status: int, content_type: str, answer: bytes) -> None:
    headers = [(b"content-type", content_type.encode("latin-1")), (b"content-length", str(len(answer)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": answer})


def _error(status: int, message: str) -> tuple[int, str, bytes]:
    return status, "application/json", orjson.dumps({"error": message})
