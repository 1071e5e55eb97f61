"""The InferenceService transformer: forwards scoring requests to the predictor and feeds the
feature vectors of its answers to the drift monitor.

KServe's transformer pattern: a `kserve.Model` whose `predict` calls the predictor named by
`--predictor_host` (`kserve.PredictorConfig`), and whose `postprocess` sees the predictor's answer
before it goes back to the client. Here

* requests are forwarded in the protocol they arrived in: a V1 REST body (`{"instances": ...}`) to
  the predictor's V1 `:predict`, a V2 request (REST or gRPC from the client) to the predictor's V2
  `/infer` (or V2 gRPC with `--protocol grpc-v2`). The predictor is a KServe model server and
  serves both. Connections are pooled and reused; connect and request time-outs are bounded.
* predictor unreachable -> 503 (gRPC UNAVAILABLE) at once, time-out -> 504 (DEADLINE_EXCEEDED),
  and an HTTP error answer of the predictor (e.g. 400 for an invalid transaction) is passed to the
  client with its status and body unchanged.
* readiness: the model (`/v2/models/{name}/ready`, `/v1/models/{name}`, gRPC ModelReady) and the
  server (`/v2/health/ready`, gRPC ServerReady; `ModelReadyDataPlane`) report ready only once the
  drift monitor is fully configured — its online detector's thresholds take seconds of bootstrap
  after start; until then scoring requests are answered 503 (KServe's "model not ready") and
  liveness stays up — and, with `--enable_predictor_health_check` (the manifests pass it), only
  while the predictor reports ready too.
* `postprocess` takes the feature vectors (V1 `predictions[i]["features"]`, V2 output
  `feature_vector`), submits them to the drift monitor's bounded queue without waiting, and
  returns the response unchanged.

Metrics are registered in prometheus_client's default registry, which KServe's model server
exposes on `/metrics` of the HTTP port.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable
from typing import Any

import grpc
import httpx
import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from grpc_interceptor.exceptions import GrpcException
from kserve import Model
from kserve.errors import InvalidInput, ModelNotFound, ModelNotReady, ServerNotReady
from kserve.inference_client import InferenceRESTClient, RESTConfig
from kserve.model import InferenceVerb, append_forwardable_headers
from kserve.protocol.dataplane import DataPlane
from kserve.protocol.infer_type import InferRequest, InferResponse
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram

from drift_transformer.auth import SCOPE_DEBUG, SCOPE_EXPLAIN, SCOPE_HEADER, SCOPE_SCORE, Authorizer
from drift_transformer.drift import DriftMonitor
from drift_transformer.edge import REQUEST_SCOPES
from drift_transformer.identifiers import check_infer_request_ids, check_v1_ids

logger = logging.getLogger(__name__)

PROTOCOL_V1 = "v1"
PROTOCOL_V2 = "v2"
PROTOCOL_GRPC_V2 = "grpc-v2"
FEATURE_VECTOR_OUTPUT = "feature_vector"
#: while the predictor's server metadata is unknown, readiness checks ask for it at most this often
METADATA_RETRY_S = 5.0
#: Scopes the transformer asks of the predictor: it needs the feature vectors for the drift monitor,
#: and removes them from the answer of a client without the `debug` scope.
#: Explanations are forwarded too (the client's own `explain` scope was checked here first).
PREDICTOR_SCOPES = f"{SCOPE_SCORE} {SCOPE_DEBUG} {SCOPE_EXPLAIN}"


def predictor_credentials(token: str | None) -> dict[str, str]:
    """Headers of every call to the predictor: the transformer's own credentials, never the client's.

    `x-fraud-scopes` is honoured by a predictor started with `--trust-scope-header` (in a pod, where
    only the transformer may reach it); a bearer token by a predictor with a `--token-file` listing it."""
    headers = {SCOPE_HEADER: PREDICTOR_SCOPES}
    if token:
        headers["authorization"] = f"Bearer {token}"
    return headers


def client_may_debug() -> bool:
    return SCOPE_DEBUG in (REQUEST_SCOPES.get() or ())


def strip_v1_features(result: Any) -> Any:
    """A V1 answer without the `features` of each prediction."""
    predictions = result.get("predictions") if isinstance(result, dict) else None
    if isinstance(predictions, list):
        for prediction in predictions:
            if isinstance(prediction, dict):
                prediction.pop("features", None)
    return result


def strip_v2_json_features(result: Any) -> Any:
    """A V2 REST JSON answer without the `feature_vector` output."""
    outputs = result.get("outputs") if isinstance(result, dict) else None
    if isinstance(outputs, list):
        result["outputs"] = [o for o in outputs if not (isinstance(o, dict) and o.get("name") == FEATURE_VECTOR_OUTPUT)]
    return result


_HTTP_TO_GRPC_STATUS: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.ALREADY_EXISTS,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    501: grpc.StatusCode.UNIMPLEMENTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
_GRPC_TO_HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


class PredictorError(GrpcException):
    """The predictor could not answer; carries both the HTTP status and the gRPC status to return."""

    def __init__(self, http_status: int, message: str, body: bytes | None = None, content_type: str | None = None):
        super().__init__(details=message, status_code=_HTTP_TO_GRPC_STATUS.get(http_status, grpc.StatusCode.INTERNAL))
        self.http_status = http_status
        self.message = message
        self.body = body
        self.content_type = content_type

    def __str__(self) -> str:
        return self.message


class PredictorUnavailable(PredictorError):
    """No connection to the predictor (refused, reset, DNS): HTTP 503 / gRPC UNAVAILABLE."""

    def __init__(self, message: str):
        super().__init__(503, message)


class PredictorTimeout(PredictorError):
    """The predictor did not answer within the time-out: HTTP 504 / gRPC DEADLINE_EXCEEDED."""

    def __init__(self, message: str):
        super().__init__(504, message)


async def predictor_error_handler(_: Request, exc: Exception) -> Response:
    """REST answer for a PredictorError: the predictor's own body if it sent one, else {"error": ...}."""
    assert isinstance(exc, PredictorError)  # noqa: S101 - narrows the type: registered for PredictorError only
    if exc.body is not None:
        return Response(
            content=exc.body, status_code=exc.http_status, media_type=exc.content_type or "application/json"
        )
    return JSONResponse(status_code=exc.http_status, content={"error": exc.message})


async def malformed_request_handler(_: Request, exc: Exception) -> JSONResponse:
    """A V2 body FastAPI cannot validate: 400 naming where and why, as the predictor answers it -
    never FastAPI's 422 echoing the whole input (which also fails with a 500 on a non-finite number)."""
    assert isinstance(exc, RequestValidationError)  # noqa: S101 - narrows the type: registered for RequestValidationError only
    problems = []
    for error in exc.errors()[:5]:
        where = ".".join(str(part) for part in error.get("loc", ()))
        problems.append(f"{where}: {error.get('msg', 'invalid')}")
    return JSONResponse(status_code=400, content={"error": "malformed request: " + "; ".join(problems)[:500]})


def install_exception_handlers(app: FastAPI) -> None:
    """Map PredictorError to its HTTP status on KServe's FastAPI app (otherwise it would be a 500),
    and a body FastAPI cannot validate to a 400."""
    app.add_exception_handler(PredictorError, predictor_error_handler)
    app.add_exception_handler(RequestValidationError, malformed_request_handler)


class NotReadyAnswerFilter(logging.Filter):
    """Drops KServe's ERROR record with traceback for each 503 "not ready" answer.

    While the drift monitor is configured every readiness probe (and any early request) is answered
    503 by design; KServe's exception handlers would log each one as an error with a full traceback.
    The answer itself is unchanged; the monitor logs once when it is ready.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, (ModelNotReady, ServerNotReady))


class TransformerMetrics:
    def __init__(self, registry: CollectorRegistry | None = REGISTRY) -> None:
        self.requests = Counter(
            "fraud_transformer_requests",
            "scoring requests answered by the transformer, by client protocol and status",
            ["protocol", "status"],
            registry=registry,
        )
        self.predictor_errors = Counter(
            "fraud_transformer_predictor_errors",
            "failed calls to the predictor, by kind (unavailable, timeout, http_4xx, http_5xx, grpc)",
            ["kind"],
            registry=registry,
        )
        self.predictor_seconds = Histogram(
            "fraud_transformer_predictor_seconds",
            "latency of the predictor call, by protocol",
            ["protocol"],
            registry=registry,
        )
        self.vectors_missing = Counter(
            "fraud_transformer_feature_vectors_missing",
            "predictor answers (rows) that carried no usable feature vector",
            registry=registry,
        )


class ModelReadyDataPlane(DataPlane):
    """KServe's data plane whose readiness answers are the transformer's own AND the predictor's.

    * server readiness (`/v2/health/ready`, gRPC `ServerReady`): every registered model ready (the
      Open Inference Protocol's definition; KServe's `DataPlane.ready()` does not check them) and,
      with `--enable_predictor_health_check`, the predictor's server readiness;
    * model readiness (`/v2/models/{name}/ready`, `/v1/models/{name}`, gRPC `ModelReady`): the
      model's own (`DriftTransformer.healthy()`: the drift monitor configured) and, with the health
      check, the predictor's model readiness. KServe's `model_ready()` answers with the predictor's
      alone when the check is on, so a transformer still configuring its monitor would say ready.

    The predictor is asked over the protocol the transformer calls it with (REST, or gRPC with
    `--protocol grpc-v2`: ServerReady / ModelReady on the transformer's own stub, since KServe's
    gRPC client logs a traceback for every failed check). A predictor that answers not ready
    (HTTP 503), is unreachable or errs makes the answer false (HTTP 503 / gRPC ready=false), never
    a 500, with one debug line. The scoring paths
    (`disable_predictor_health_check=True`) ask only whether the transformer's model is ready.

    Metadata is the predictor's, REST and gRPC alike: the model's (`GET /v2/models/{name}`, gRPC
    ModelMetadata) is asked of the predictor on every call (the transformer has no tensors of its
    own; clients build their requests from it), the server's (`GET /v2`, gRPC ServerMetadata) as
    last read from the predictor (read when the transformer turns ready and with every model
    metadata call; this server's own until then).
    """

    async def model_metadata(self, model_name: str) -> dict:
        model = await self.get_model(model_name)
        if isinstance(model, DriftTransformer):
            return await model.predictor_model_metadata()
        return await super().model_metadata(model_name)

    def metadata(self) -> dict:
        for model in self.model_registry.get_models().values():
            if isinstance(model, DriftTransformer) and model.predictor_server_metadata is not None:
                return dict(model.predictor_server_metadata)
        return super().metadata()

    async def ready(self) -> bool:
        models = self.model_registry.get_models()
        if not models:
            return False
        for model in models.values():
            if not await model.healthy():
                return False
        return await self._predictor_says(self._grpc_ready(None) if self._over_grpc() else super().ready(), "server")

    async def model_ready(self, model_name: str, disable_predictor_health_check: bool = False) -> bool:
        if self.model_registry.get_model(model_name) is None:
            raise ModelNotFound(model_name)
        if not await self.model_registry.is_model_ready(model_name):
            return False
        if disable_predictor_health_check:
            return True
        answer = self._grpc_ready(model_name) if self._over_grpc() else super().model_ready(model_name)
        return await self._predictor_says(answer, f"model {model_name}")

    def _over_grpc(self) -> bool:
        config = self.predictor_config
        return bool(config and config.predictor_health_check and config.predictor_protocol == PROTOCOL_GRPC_V2)

    async def _grpc_ready(self, model_name: str | None) -> bool:
        """The predictor's ServerReady (`model_name` None) or ModelReady answer over gRPC."""
        from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb

        client = self.grpc_client
        stub, timeout = client._client_stub, client._timeout
        if model_name is None:
            return bool((await stub.ServerReady(pb.ServerReadyRequest(), timeout=timeout)).ready)
        return bool((await stub.ModelReady(pb.ModelReadyRequest(name=model_name), timeout=timeout)).ready)

    @staticmethod
    async def _predictor_says(answer: Awaitable[bool], what: str) -> bool:
        """KServe's answer (the predictor's, with the health check on); False when asking failed."""
        try:
            return bool(await answer)
        except (httpx.HTTPError, grpc.RpcError, OSError) as exc:
            logger.debug("predictor %s readiness: not ready (%s)", what, exc)
            return False


def client_protocol(payload: Any) -> str:
    if isinstance(payload, InferRequest):
        return PROTOCOL_GRPC_V2 if payload.from_grpc else PROTOCOL_V2
    return PROTOCOL_V1


def status_of(exc: BaseException) -> int:
    if isinstance(exc, PredictorError):
        return exc.http_status
    if isinstance(exc, InvalidInput):
        return 400
    return 500


def v1_feature_vectors(result: dict[str, Any], feature_names: tuple[str, ...]) -> tuple[np.ndarray, int]:
    """Feature vectors of a V1 answer, in `feature_names` order; also the number of unusable rows."""
    predictions = result.get("predictions") if isinstance(result, dict) else None
    if not isinstance(predictions, list):
        return np.empty((0, len(feature_names))), 0
    rows: list[list[float]] = []
    unusable = 0
    for prediction in predictions:
        features = prediction.get("features") if isinstance(prediction, dict) else None
        if not isinstance(features, dict):
            unusable += 1
            continue
        try:
            rows.append([float(features[name]) for name in feature_names])
        except (KeyError, TypeError, ValueError):
            unusable += 1
    return np.asarray(rows, dtype=np.float64).reshape(-1, len(feature_names)), unusable


def v2_feature_vectors(result: InferResponse, n_features: int) -> tuple[np.ndarray, int]:
    """The `feature_vector` output of a V2 answer as [n, n_features]; also the number of unusable rows."""
    for output in result.outputs:
        if output.name == FEATURE_VECTOR_OUTPUT:
            array = np.asarray(output.as_numpy(), dtype=np.float64)
            if array.size % n_features:
                return np.empty((0, n_features)), max(1, array.size // n_features)
            return array.reshape(-1, n_features), 0
    rows = int(result.outputs[0].shape[0]) if result.outputs and result.outputs[0].shape else 0
    return np.empty((0, n_features)), rows


def v2_json_feature_vectors(result: Any, n_features: int) -> tuple[np.ndarray, int]:
    """The `feature_vector` output of a V2 REST JSON answer (a parsed dict) as [n, n_features]; also
    the number of unusable rows."""
    outputs = result.get("outputs") if isinstance(result, dict) else None
    if not isinstance(outputs, list):
        return np.empty((0, n_features)), 0
    for output in outputs:
        if isinstance(output, dict) and output.get("name") == FEATURE_VECTOR_OUTPUT:
            try:
                array = np.asarray(output.get("data"), dtype=np.float64).reshape(-1)
            except (TypeError, ValueError):
                array = np.empty(0)
            if not array.size or array.size % n_features:
                return np.empty((0, n_features)), max(1, array.size // n_features)
            return array.reshape(-1, n_features), 0
    first = outputs[0] if outputs and isinstance(outputs[0], dict) else {}
    shape = first.get("shape") or [0]
    return np.empty((0, n_features)), int(shape[0]) if isinstance(shape[0], int) else 0


def v2_json_body(request: InferRequest) -> dict[str, Any]:
    """A V2 request as plain JSON tensors.

    Requests that arrived over gRPC (or with the binary tensor extension) would otherwise be sent on
    in the binary extension, which not every V2 server parses (KServe 0.21's model server answers
    400 to it); JSON is the protocol's baseline every server accepts.
    """
    inputs = []
    for tensor in request.inputs:
        try:
            array = tensor.as_numpy()
        except (ValueError, TypeError):  # data that does not fill the declared shape or datatype
            raise InvalidInput(
                f"input '{tensor.name[:40]}': data does not match shape {list(tensor.shape)[:8]} "
                f"and datatype {tensor.datatype[:16]!r}"
            ) from None
        values = array.reshape(-1).tolist()
        if tensor.datatype == "BYTES":
            try:
                values = [v.decode("utf-8") if isinstance(v, bytes) else v for v in values]
            except UnicodeDecodeError:
                raise InvalidInput(f"input '{tensor.name}': BYTES elements must be UTF-8 text") from None
        item: dict[str, Any] = {
            "name": tensor.name,
            "shape": list(tensor.shape),
            "datatype": tensor.datatype,
            "data": values,
        }
        parameters = {k: v for k, v in (tensor.parameters or {}).items() if k != "binary_data_size"}
        if parameters:
            item["parameters"] = _plain_parameters(parameters)
        inputs.append(item)
    body: dict[str, Any] = {"inputs": inputs}
    if request.id:
        body["id"] = request.id
    parameters = {
        k: v for k, v in (request.parameters or {}).items() if k not in ("binary_data_output", "binary_data_size")
    }
    if parameters:
        body["parameters"] = _plain_parameters(parameters)
    if request.request_outputs:
        body["outputs"] = [{"name": output.name} for output in request.request_outputs]
    return body


def binary_as_requested(request: InferRequest, result: InferResponse) -> InferResponse:
    """The predictor's answer, encoded for the client as it asked, as the predictor (and Triton)
    would answer it: over REST the binary tensor extension's `binary_data_output` / per-output
    `binary_data`; over gRPC `raw_output_contents` when the inputs came as `raw_input_contents`
    (what tritonclient sends). The predictor itself is asked for JSON (`v2_json_body`)."""
    requested = None if request.from_grpc else request.request_outputs
    if not request.use_binary_outputs and not requested:
        return result
    return InferResponse(
        response_id=result.id,
        model_name=result.model_name,
        model_version=result.model_version,
        infer_outputs=result.outputs,
        parameters=result.parameters,
        use_binary_outputs=request.use_binary_outputs,
        requested_outputs=requested,
    )


def _plain_parameters(parameters: dict[str, Any]) -> dict[str, Any]:
    """gRPC InferParameter messages -> JSON values."""
    plain = {}
    for key, value in parameters.items():
        if hasattr(value, "WhichOneof"):
            field = value.WhichOneof("parameter_choice")
            value = getattr(value, field) if field else None
        plain[key] = value
    return plain


class DriftTransformer(Model):
    """Forwards to the predictor; hands the answers' feature vectors to the drift monitor."""

    def __init__(
        self,
        name: str,
        monitor: DriftMonitor,
        predictor_protocol: str = PROTOCOL_V2,
        connect_timeout: float = 2.0,
        request_timeout: float = 30.0,
        max_connections: int = 100,
        metrics: TransformerMetrics | None = None,
        authorizer: Authorizer | None = None,
        predictor_token: str | None = None,
        predictor_rest_url: str | None = None,
    ) -> None:
        """`predictor_rest_url`: the predictor's REST base URL for V1 requests and explanations when
        V2 requests go to it over gRPC (None: the URL of `--predictor_host`)."""
        super().__init__(name)
        self.predictor_rest_url = predictor_rest_url
        #: who may call the transformer (gRPC here; REST in drift_transformer.edge.RequestGate)
        self.authorizer = authorizer or Authorizer()
        #: headers of every call to the predictor (the client's Authorization is never sent on)
        self.predictor_headers = predictor_credentials(predictor_token)
        if predictor_protocol not in (PROTOCOL_V1, PROTOCOL_V2, PROTOCOL_GRPC_V2):
            raise ValueError(f"predictor protocol must be v1, v2 or grpc-v2, got {predictor_protocol!r}")
        self.monitor = monitor
        #: protocol of the calls for V2 requests (REST "v2" or "grpc-v2"); V1 requests always use V1 REST
        self.v2_protocol = PROTOCOL_GRPC_V2 if predictor_protocol == PROTOCOL_GRPC_V2 else PROTOCOL_V2
        self.timeout = httpx.Timeout(request_timeout, connect=connect_timeout)
        self.limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self.metrics = metrics or TransformerMetrics()
        self._rest_clients: dict[str, InferenceRESTClient] = {}
        self._metadata_client: httpx.AsyncClient | None = None
        #: the predictor's server metadata as last read (None: not read yet)
        self.predictor_server_metadata: dict[str, Any] | None = None
        self._metadata_attempted_at = -METADATA_RETRY_S

    # --- lifecycle ------------------------------------------------------------------------------
    def load(self) -> bool:
        """Start the drift worker, which first configures the online detector (seconds of bootstrap).

        `self.ready` (KServe's "loaded": the model can be registered with the model server) is set at
        once so the server comes up and answers liveness probes and /metrics; readiness is
        `healthy()`, which KServe's model and server readiness endpoints ask, and it turns true only
        when the monitor is configured.
        """
        self.monitor.start()
        self.ready = True
        return self.ready

    async def healthy(self) -> bool:
        """Ready: loaded, and the drift monitor fully configured (online thresholds computed)."""
        ready = self.ready and self.monitor.configured
        if ready and self.predictor_server_metadata is None:
            now = time.monotonic()
            if now - self._metadata_attempted_at >= METADATA_RETRY_S:
                self._metadata_attempted_at = now
                try:  # best effort: the server metadata is this server's own until the predictor answers
                    await self.predictor_model_metadata()
                except PredictorError as exc:
                    logger.debug("predictor metadata not read yet: %s", exc)
        return ready

    # --- metadata -------------------------------------------------------------------------------
    async def predictor_model_metadata(self) -> dict[str, Any]:
        """The predictor's model metadata (and, kept for `/v2`, its server metadata); PredictorError
        (503/504/the predictor's status) when it cannot be read."""
        config = self.predictor_config
        if config is None or not config.predictor_host:
            raise PredictorUnavailable("the transformer has no --predictor_host configured")
        if self.v2_protocol == PROTOCOL_GRPC_V2:
            server, model = await self._grpc_metadata()
        else:
            server, model = await self._rest_metadata(config.predictor_base_url)
        self.predictor_server_metadata = server
        return model

    async def _rest_metadata(self, base_url: str) -> tuple[dict[str, Any], dict[str, Any]]:
        client = self._metadata_client
        if client is None:
            client = self._metadata_client = httpx.AsyncClient(timeout=self.timeout, headers=self.predictor_headers)
        answers = []
        for path in ("/v2", f"/v2/models/{self.name}"):
            try:
                response = await client.get(base_url.rstrip("/") + path)
            except httpx.TimeoutException:
                raise PredictorTimeout(f"predictor did not answer {path} within {self.timeout.read:g}s") from None
            except httpx.TransportError:
                raise PredictorUnavailable("the predictor is unreachable") from None
            if response.status_code != 200:
                raise PredictorError(
                    response.status_code,
                    f"predictor answered {response.status_code} to {path}",
                    body=response.content,
                    content_type=response.headers.get("content-type"),
                )
            try:
                answer = response.json()
            except ValueError:
                answer = None
            if not isinstance(answer, dict):
                raise PredictorError(502, f"the predictor's answer to {path} is not a JSON object")
            answers.append(answer)
        return answers[0], answers[1]

    async def _grpc_metadata(self) -> tuple[dict[str, Any], dict[str, Any]]:
        from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb

        stub = self._grpc_client._client_stub
        metadata = tuple(self.predictor_headers.items())
        try:
            server = await stub.ServerMetadata(pb.ServerMetadataRequest(), metadata=metadata, timeout=self.timeout.read)
            model = await stub.ModelMetadata(
                pb.ModelMetadataRequest(name=self.name), metadata=metadata, timeout=self.timeout.read
            )
        except grpc.aio.AioRpcError as exc:
            http_status = _GRPC_TO_HTTP_STATUS.get(exc.code(), 500)
            raise PredictorError(http_status, f"predictor answered gRPC {exc.code().name}: {exc.details()}") from None

        def tensors(items) -> list[dict[str, Any]]:
            return [{"name": t.name, "datatype": t.datatype, "shape": [int(d) for d in t.shape]} for t in items]

        return (
            {"name": server.name, "version": server.version, "extensions": list(server.extensions)},
            {
                "name": model.name,
                "versions": list(model.versions) or None,
                "platform": model.platform,
                "inputs": tensors(model.inputs),
                "outputs": tensors(model.outputs),
            },
        )

    def stop(self) -> None:
        self.monitor.stop()
        super().stop()

    # --- forwarding -----------------------------------------------------------------------------
    async def preprocess(self, payload: Any, headers: dict[str, str] | None = None) -> dict | InferRequest:
        """Accept a V1 body KServe left undecoded (sent without a JSON content type); reject non-objects."""
        if isinstance(payload, (bytes, bytearray, memoryview, str)):
            try:
                payload = orjson.loads(payload)
            except orjson.JSONDecodeError as exc:
                raise InvalidInput(f"request body is not valid JSON: {exc}") from None
        if not isinstance(payload, (dict, InferRequest)):
            raise InvalidInput(
                f'request body must be a JSON object (V1: {{"instances": [...]}}), got {type(payload).__name__}'
            )
        if isinstance(payload, InferRequest):
            check_infer_request_ids(payload)
        else:
            check_v1_ids(payload)
        return payload

    def _rest_client(self, protocol: str) -> InferenceRESTClient:
        """One pooled client per REST protocol, created on first use inside the serving event loop."""
        client = self._rest_clients.get(protocol)
        if client is None:
            transport = httpx.AsyncHTTPTransport(retries=0, limits=self.limits)
            client = InferenceRESTClient(
                RESTConfig(transport=transport, protocol=protocol, retries=0, timeout=self.timeout)
            )
            self._rest_clients[protocol] = client
        return client

    async def __call__(
        self, body: Any, headers: dict[str, str] | None = None, verb: InferenceVerb = InferenceVerb.PREDICT
    ):
        protocol = client_protocol(body)
        try:
            if REQUEST_SCOPES.get() is None:  # gRPC (REST requests were admitted by drift_transformer.edge)
                REQUEST_SCOPES.set(self.authorizer.authorize(headers or {}, SCOPE_SCORE))
            result = await super().__call__(body, headers, verb)
        except Exception as exc:  # a cancelled request (client gone) is not an answer and is not counted
            self.metrics.requests.labels(protocol=protocol, status=str(status_of(exc))).inc()
            raise
        self.metrics.requests.labels(protocol=protocol, status="200").inc()
        return result

    async def predict(
        self,
        payload: dict | InferRequest,
        headers: dict[str, str] | None = None,
        response_headers: dict[str, str] | None = None,
    ) -> dict | InferResponse:
        config = self.predictor_config
        if config is None or not config.predictor_host:
            raise PredictorUnavailable("the transformer has no --predictor_host configured")
        protocol = self.v2_protocol if isinstance(payload, InferRequest) else PROTOCOL_V1
        started = time.perf_counter()
        try:
            if protocol == PROTOCOL_GRPC_V2:
                result = await self._grpc_forward(payload, headers)
            else:
                result = await self._rest_forward(protocol, payload, headers, response_headers)
            if isinstance(payload, InferRequest) and isinstance(result, InferResponse):
                result = binary_as_requested(payload, result)
            return result
        finally:
            self.metrics.predictor_seconds.labels(protocol=protocol).observe(time.perf_counter() - started)

    async def _rest_forward(
        self,
        protocol: str,
        payload: dict | InferRequest,
        headers: dict[str, str] | None,
        response_headers: dict[str, str] | None,
    ) -> dict | InferResponse:
        config = self.predictor_config
        host = config.predictor_host
        client_headers = {k: v for k, v in (headers or {}).items() if k.lower() != "authorization"}
        forward_headers = append_forwardable_headers(client_headers, {"Content-Type": "application/json"})
        forward_headers.update(self.predictor_headers)
        data = v2_json_body(payload) if isinstance(payload, InferRequest) else payload
        try:
            return await self._rest_client(protocol).infer(
                self.predictor_rest_url or config.predictor_base_url,
                data=data,
                model_name=self.name,
                headers=forward_headers,
                response_headers=response_headers,
            )
        except httpx.HTTPStatusError as exc:
            response = exc.response
            kind = "http_4xx" if response.status_code < 500 else "http_5xx"
            self.metrics.predictor_errors.labels(kind=kind).inc()
            logger.debug("predictor %s answered %d: %s", host, response.status_code, response.text[:500])
            raise PredictorError(
                response.status_code,
                f"predictor answered {response.status_code}: {response.text[:500]}",
                body=response.content,
                content_type=response.headers.get("content-type"),
            ) from None
        except httpx.TimeoutException as exc:
            if isinstance(exc, httpx.ConnectTimeout):
                self.metrics.predictor_errors.labels(kind="unavailable").inc()
                raise PredictorUnavailable(f"predictor at {host} did not accept a connection in time") from None
            self.metrics.predictor_errors.labels(kind="timeout").inc()
            raise PredictorTimeout(f"predictor at {host} did not answer within {self.timeout.read:g}s") from None
        except httpx.TransportError as exc:
            self.metrics.predictor_errors.labels(kind="unavailable").inc()
            logger.warning("predictor at %s is unreachable (%s: %s)", host, type(exc).__name__, exc)
            raise PredictorUnavailable("the predictor is unreachable") from None

    async def _grpc_forward(self, payload: InferRequest, headers: dict[str, str] | None) -> InferResponse:
        host = self.predictor_config.predictor_host
        metadata = [("request_type", "grpc_v2"), ("response_type", "grpc_v2")]
        metadata += [(k, v) for k, v in (headers or {}).items() if k.lower() in ("x-request-id", "x-b3-traceid")]
        metadata += list(self.predictor_headers.items())
        try:
            return await self._grpc_client.infer(infer_request=payload, headers=tuple(metadata))
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            http_status = _GRPC_TO_HTTP_STATUS.get(code, 500)
            kind = "unavailable" if code == grpc.StatusCode.UNAVAILABLE else "grpc"
            self.metrics.predictor_errors.labels(kind=kind).inc()
            logger.warning("predictor at %s answered gRPC %s: %s", host, code.name, exc.details())
            details = exc.details() if http_status < 500 else "see the transformer log"
            message = f"predictor answered gRPC {code.name}: {details}"
            if http_status == 503:
                raise PredictorUnavailable(message) from None
            raise PredictorError(http_status, message) from None

    # --- drift ------------------------------------------------------------------------------------
    async def postprocess(
        self,
        result: dict | InferResponse,
        headers: dict[str, str] | None = None,
        response_headers: dict[str, str] | None = None,
    ) -> dict | InferResponse:
        """Queue the answer's feature vectors for drift detection; return the answer, without the
        feature vectors unless the client has the `debug` scope."""
        names = self.monitor.reference.feature_names
        try:
            if isinstance(result, InferResponse):
                vectors, unusable = v2_feature_vectors(result, len(names))
            else:
                vectors, unusable = v1_feature_vectors(result, names)
        except Exception:  # never fail a scored request because of monitoring
            logger.exception("could not read feature vectors from the predictor's answer")
            self.metrics.vectors_missing.inc()
            vectors, unusable = None, 0
        if vectors is not None:
            self._submit(vectors, unusable)
        if not client_may_debug():
            if isinstance(result, InferResponse):
                result.outputs = [output for output in result.outputs if output.name != FEATURE_VECTOR_OUTPUT]
            else:
                strip_v1_features(result)
        return result

    def answer_vectors(self, protocol: str, result: Any) -> tuple[np.ndarray, int] | None:
        """The feature vectors (and unusable rows) of a predictor answer (parsed JSON) the REST
        pass-through forwarded (`drift_transformer.passthrough`); None when they cannot be read."""
        names = self.monitor.reference.feature_names
        try:
            if protocol == PROTOCOL_V1:
                return v1_feature_vectors(result, names)
            return v2_json_feature_vectors(result, len(names))
        except Exception:  # never let monitoring disturb serving
            logger.exception("could not read feature vectors from the predictor's answer")
            self.metrics.vectors_missing.inc()
            return None

    def submit_vectors(self, vectors: np.ndarray, unusable: int) -> None:
        self._submit(vectors, unusable)

    def _submit(self, vectors: np.ndarray, unusable: int) -> None:
        if unusable:
            self.metrics.vectors_missing.inc(unusable)
        if len(vectors):
            self.monitor.submit(vectors)
