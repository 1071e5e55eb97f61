"""ASGI plumbing shared by the REST middlewares (the auth gate, the fast scoring routes): the
ASGI callable types, the content-type check, reading a body once and replaying it downstream.

The drift transformer's environment carries the same module (`drift_transformer/asgi.py`);
`tests/test_environment_copies.py` keeps the two identical.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def plain_json(scope: Scope) -> bool:
    """A JSON body without the binary tensor extension (header `inference-header-content-length`)."""
    content_type = b""
    for key, value in scope.get("headers", ()):
        if key == b"inference-header-content-length":
            return False
        if key == b"content-type":
            content_type = value
    return content_type.split(b";")[0].strip().lower() == b"application/json"


async def read_body(receive: Receive, limit: int) -> tuple[bytes, bool]:
    """The request body; `complete` is False when it was cut short (disconnect) or passed `limit` bytes."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks), False
        chunk = message.get("body", b"")
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            return b"".join(chunks), False
        if not message.get("more_body", False):
            return b"".join(chunks), True


def replay(body: bytes, complete: bool, receive: Receive) -> Receive:
    """A `receive` that first hands the downstream app what was already read."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": not complete}
        return await receive()

    return replayed
