"""KServe's ModelServer, bound where it is told and with the predictor's limits and error answers.

KServe 0.21's `ModelServer.start` builds a uvicorn server on `0.0.0.0` and a gRPC server on
`[::]`, with gRPC message limits taken from its own module-level argument parsing, and answers any
unexpected exception with HTTP 500 carrying the exception's type and text. `EdgeModelServer` runs
the same two servers (one REST process; the predictor never runs several workers) with

* both servers bound to `host` (`--host`, loopback unless told otherwise; a pod passes 0.0.0.0);
* gRPC `max_receive_message_length` = the REST body cap (`--max-body-bytes`), so one message cannot
  hold more than one REST body;
* gRPC model-repository load/unload refused (PERMISSION_DENIED), as `predictor.edge` refuses them
  over REST;
* HTTP 500 answers with a generic body (the exception goes to the log); `AuthError` answered
  401/403 and `TransactionConflict` 409 on the KServe REST path;
* one readiness decision behind every readiness surface (`ReadinessDataPlane`).

Readiness: KServe answers the server's readiness (REST `GET /v2/health/ready`, gRPC `ServerReady`)
with `DataPlane.ready()` and the model's (REST `GET /v2/models/<name>/ready`, V1 `GET
/v1/models/<name>`, gRPC `ModelReady`) with `DataPlane.model_ready()`, which asks `Model.healthy()`,
i.e. whether the model is loaded. `ReadinessDataPlane` adds each model's `not_ready_reason()` (the
online store lost or emptied, the audit spool not draining: `FraudModel.not_ready_reason`) to both,
and the predictor's own `/ready` (the manifests' probe) asks the same data plane, so every surface
gives one answer. The scoring paths call `model_ready(..., disable_predictor_health_check=True)` and
keep asking only whether the model is loaded: a pod out of rotation still answers what reaches it
(the degraded mode, or the fail-closed refusal). `healthy()` itself is left alone: KServe reloads a
model whose `healthy()` is false before each request. Liveness (`/v2/health/live`, gRPC
`ServerLive`) never depends on it: a lost store is no reason to restart the pod.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from concurrent import futures
from typing import Any, Protocol, runtime_checkable

import fastapi
from fastapi.responses import JSONResponse
from grpc import HandlerCallDetails, RpcMethodHandler, StatusCode, aio, unary_unary_rpc_method_handler
from kserve import ModelServer
from kserve.constants.constants import FASTAPI_APP_IMPORT_STRING, MAX_GRPC_MESSAGE_LENGTH
from kserve.errors import (
    ModelNotFound,
    ModelNotReady,
    ServerNotReady,
    model_not_ready_handler,
    server_not_ready_handler,
)
from kserve.logging import logger
from kserve.protocol.dataplane import DataPlane
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor
from kserve.protocol.grpc.server import GRPCServer
from kserve.protocol.grpc.servicer import InferenceServicer
from kserve.protocol.rest.server import RESTServer

from predictor.auth import AuthError
from predictor.edge import INTERNAL_ERROR
from predictor.idempotency import TransactionConflict

LOOPBACK = "127.0.0.1"
_REPOSITORY_METHODS = (
    "/inference.GRPCInferenceService/RepositoryModelLoad",
    "/inference.GRPCInferenceService/RepositoryModelUnload",
)


async def generic_error_handler(_: fastapi.Request, exc: Exception) -> JSONResponse:
    logger.error("Exception:", exc_info=exc)
    return JSONResponse(status_code=500, content={"error": INTERNAL_ERROR})


async def not_ready_handler(request: fastapi.Request, exc: Exception) -> JSONResponse:
    """503 for KServe's "not ready" answers. A readiness route answering 503 is no error: the reason
    is logged once by `ReadinessDataPlane`, not with a traceback per probe. Subclasses (the
    fail-closed refusals of a scoring request) keep KServe's handling."""
    if type(exc) in (ModelNotReady, ServerNotReady):
        return JSONResponse(status_code=503, content={"error": str(exc)})
    if isinstance(exc, ModelNotReady):
        return await model_not_ready_handler(request, exc)
    return await server_not_ready_handler(request, exc)


@runtime_checkable
class ReadinessCheck(Protocol):
    def not_ready_reason(self) -> str | None:
        """Why the model should be out of rotation, or None (may block: called in a worker thread)."""


class ReadinessDataPlane(DataPlane):
    """KServe's data plane whose readiness answers (server and model, REST and gRPC) also require
    each model's `not_ready_reason()` to be None (module docstring). A change of the answer is
    logged once per model: `not ready: <reason>` (WARNING), `ready again` (INFO)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reported: dict[str, str | None] = {}

    async def not_ready_reason(self, model_name: str | None = None) -> str | None:
        """Why the server (or the model `model_name`) should be out of rotation, or None."""
        models = self.model_registry.get_models()
        if model_name is not None:
            if model_name not in models:
                raise ModelNotFound(model_name)
            models = {model_name: models[model_name]}
        if not models:
            return "no model is registered"
        for name, model in models.items():
            if not model.ready:
                reason: str | None = "model not loaded"
            elif isinstance(model, ReadinessCheck):
                reason = await asyncio.to_thread(model.not_ready_reason)
            else:
                reason = None
            self._report(name, reason)
            if reason is not None:
                return reason
        return None

    def _report(self, name: str, reason: str | None) -> None:
        before = self._reported.get(name)
        if reason == before:
            return
        self._reported[name] = reason
        if reason is not None:
            logger.warning("not ready: %s", reason)
        elif before is not None:
            logger.info("ready again: %s", name)

    async def ready(self) -> bool:
        return await self.not_ready_reason() is None and await super().ready()

    async def model_ready(self, model_name: str, disable_predictor_health_check: bool = False) -> bool:
        ready = await super().model_ready(model_name, disable_predictor_health_check)
        if not ready or disable_predictor_health_check:  # a scoring path: loaded is enough
            return ready
        return await self.not_ready_reason(model_name) is None


async def conflict_handler(_: fastapi.Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, TransactionConflict)  # noqa: S101 - narrows the type: registered for TransactionConflict only
    return JSONResponse(status_code=409, content={"error": exc.message})


async def auth_error_handler(_: fastapi.Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, AuthError)  # noqa: S101 - narrows the type: registered for AuthError only
    headers = {"www-authenticate": "Bearer"} if exc.http_status == 401 else None
    return JSONResponse(status_code=exc.http_status, content={"error": exc.message}, headers=headers)


class EdgeRESTServer(RESTServer):
    def __init__(self, *args: Any, host: str = LOOPBACK, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.config.host = host  # the uvicorn server reads it when it binds

    def _add_exception_handlers(self, app: fastapi.FastAPI) -> None:
        super()._add_exception_handlers(app)
        app.add_exception_handler(Exception, generic_error_handler)
        app.add_exception_handler(AuthError, auth_error_handler)
        app.add_exception_handler(TransactionConflict, conflict_handler)
        app.add_exception_handler(ModelNotReady, not_ready_handler)
        app.add_exception_handler(ServerNotReady, not_ready_handler)


class RepositoryChangesRefused(aio.ServerInterceptor):
    """gRPC RepositoryModelLoad / RepositoryModelUnload: PERMISSION_DENIED."""

    async def intercept_service(
        self,
        continuation: Callable[[HandlerCallDetails], Awaitable[RpcMethodHandler]],
        handler_call_details: HandlerCallDetails,
    ) -> RpcMethodHandler:
        if handler_call_details.method in _REPOSITORY_METHODS:

            async def refuse(_request: Any, context: aio.ServicerContext) -> None:
                await context.abort(StatusCode.PERMISSION_DENIED, "model repository changes are disabled")

            return unary_unary_rpc_method_handler(refuse)
        return await continuation(handler_call_details)


def grpc_listen_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class EdgeGRPCServer(GRPCServer):
    def __init__(self, *args: Any, host: str = LOOPBACK, max_receive_bytes: int = MAX_GRPC_MESSAGE_LENGTH, **kwargs):
        super().__init__(*args, **kwargs)
        self._host = host
        self._max_receive_bytes = max_receive_bytes

    async def start(self, max_workers: int) -> None:
        servicer = InferenceServicer(self._data_plane, self._model_repository_extension)
        self._server = aio.server(
            futures.ThreadPoolExecutor(max_workers=max_workers),
            interceptors=(RepositoryChangesRefused(), ExceptionToStatusInterceptor()),
            options=[
                ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_LENGTH),
                ("grpc.max_receive_message_length", self._max_receive_bytes),
            ],
        )
        grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, self._server)
        address = grpc_listen_address(self._host, self._port)
        self._server.add_insecure_port(address)
        logger.info("Starting gRPC server on %s with %d workers", address, max_workers)
        await self._server.start()
        await self._server.wait_for_termination()


class EdgeModelServer(ModelServer):
    """`ModelServer` with one REST process and a gRPC server, both bound to `host` (module docstring)."""

    def __init__(self, *args: Any, host: str = LOOPBACK, max_body_bytes: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.host = host
        self.max_body_bytes = max_body_bytes
        self.dataplane: ReadinessDataPlane = ReadinessDataPlane(model_registry=self.registered_models)

    def start(self, models: list) -> None:
        self._register_and_check_atleast_one_model_is_ready(models)
        self._rest_server = EdgeRESTServer(
            FASTAPI_APP_IMPORT_STRING,
            self.dataplane,
            self.model_repository_extension,
            self.http_port,
            host=self.host,
            access_log_format=self.access_log_format,
            workers=1,
            grace_period=self.grace_period,
            event_loop=self.event_loop,
            timeout_keep_alive=self.timeout_keep_alive,
            ssl_certfile=self.ssl_certfile,
            ssl_keyfile=self.ssl_keyfile,
        )
        self.servers.append(self._rest_server.start())
        if self.enable_grpc:
            self._grpc_server = EdgeGRPCServer(
                self.grpc_port,
                self.dataplane,
                self.model_repository_extension,
                kwargs={},
                grace_period=self.grace_period,
                host=self.host,
                max_receive_bytes=self.max_body_bytes,
            )
            self.servers.append(self._grpc_server.start(self.max_threads))
        self.setup_event_loop()
        self.register_signal_handler()
        asyncio.run(self._serve())
