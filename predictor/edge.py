"""The predictor's front door: an ASGI middleware in front of every REST route.

For every request, before any other work:

* `POST` to a model route (`/v1/models/...`, `/v2/models/...`) needs credentials with the route's
  scope (`predictor.auth`): 401 / 403 otherwise, before the body is read. The caller's scopes are
  kept in `REQUEST_SCOPES` for the handlers (which decide what the answer discloses).
* `POST` to the model repository (`/v2/repository/...`: load / unload) is refused with 403: the
  predictor serves the one model it loaded at start.
* a `POST` with neither a Content-Type nor the binary tensor extension's
  `inference-header-content-length` header is JSON, as Triton (the Open Inference Protocol's
  reference server) reads it: the request goes on with `content-type: application/json`.
* a body larger than `max_body_bytes` is answered 413 - from its Content-Length without reading it,
  or as soon as the bytes read pass the cap - on every route, so the fast path and KServe's
  handlers behind it see at most that many bytes.

Health, readiness, metadata and `/metrics` (GET) pass untouched.
"""

from __future__ import annotations

import contextvars

import orjson

from predictor.asgi import ASGIApp, Message, Receive, Scope, Send
from predictor.auth import SCOPE_EXPLAIN, SCOPE_SCORE, AuthError, Authorizer

#: Largest request body accepted (HTTP 413 above; gRPC messages are capped to the same size).
DEFAULT_MAX_BODY_BYTES = 2 * 1024 * 1024
#: The body of every HTTP 500 answer (the exception goes to the log)
INTERNAL_ERROR = "internal error; the server log has the details"
#: The scopes of the request being handled (None outside a request the gate admitted)
REQUEST_SCOPES: contextvars.ContextVar[frozenset[str] | None] = contextvars.ContextVar(
    "fraud_request_scopes", default=None
)


def route_scope(path: str) -> str | None:
    """The scope a POST to `path` needs (None: not a model route)."""
    if path.startswith(("/v1/models/", "/v2/models/")):
        return SCOPE_EXPLAIN if path.endswith((":explain", "/explain")) else SCOPE_SCORE
    return None


#: Request headers whose presence says how the body is encoded (lower-case, as ASGI gives them)
_CONTENT_TYPE = b"content-type"
_BINARY_HEADER = b"inference-header-content-length"


def json_by_default(scope: Scope) -> Scope:
    """`scope` with `content-type: application/json` when the request names no encoding at all
    (no Content-Type, no binary tensor extension header): Triton's reading of such a body."""
    headers = scope.get("headers", ())
    if any(key in (_CONTENT_TYPE, _BINARY_HEADER) for key, _ in headers):
        return scope
    return {**scope, "headers": [*headers, (_CONTENT_TYPE, b"application/json")]}


def header_map(scope: Scope) -> dict[str, str]:
    return {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope.get("headers", ())}


class BodyTooLarge(Exception):
    pass


class RequestGate:
    """ASGI middleware: authentication, authorisation and the body cap (module docstring)."""

    def __init__(self, app: ASGIApp, authorizer: Authorizer, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self.app = app
        self.authorizer = authorizer
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        headers = header_map(scope)
        if path.startswith("/v2/repository/"):
            await send_error(send, 403, "model repository changes are disabled on this server")
            return
        needed = route_scope(path)
        scopes = None
        if needed is not None:
            try:
                scopes = self.authorizer.authorize(headers, needed)
            except AuthError as exc:
                await send_error(send, exc.http_status, exc.message)
                return
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            await send_error(send, 413, f"request body larger than {self.max_body_bytes} bytes")
            return
        try:
            body = await read_capped(receive, self.max_body_bytes)
        except BodyTooLarge:
            await send_error(send, 413, f"request body larger than {self.max_body_bytes} bytes")
            return
        token = REQUEST_SCOPES.set(scopes)
        try:
            await self.app(json_by_default(scope), replay(body, receive), send)
        finally:
            REQUEST_SCOPES.reset(token)


async def read_capped(receive: Receive, limit: int) -> bytes | None:
    """The whole body (None when the client went away first); BodyTooLarge past `limit` bytes."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def replay(body: bytes | None, receive: Receive) -> Receive:
    """A `receive` handing the downstream app the body already read, then the connection's events."""
    sent = body is None

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


async def send_error(send: Send, status: int, message: str) -> None:
    payload = orjson.dumps({"error": message})
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    if status == 413:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
