"""Sending small responses straight over ASGI, for HTTP and for websocket handshakes.

References:
    https://asgi.readthedocs.io/en/latest/specs/www.html#http-response-start-send-event
    https://asgi.readthedocs.io/en/latest/extensions.html#websocket-denial-response
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from starlette.types import Receive, Scope, Send

from ._errors import DEFAULT_REALM, Refusal

__all__ = [
    "json_body",
    "refusal_parts",
    "send_json",
    "send_refusal",
    "send_response",
    "serve_lifespan",
]

# The websocket close code for "policy violation" (RFC 6455 §7.4.1).
WS_POLICY_VIOLATION = 1008


def json_body(payload: Any) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


def json_response_parts(
    payload: object, *extra_headers: tuple[bytes, bytes]
) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """``(headers, body)`` of a JSON response that no cache keeps."""
    body = json_body(payload)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
        *extra_headers,
    ]
    return headers, body


def refusal_parts(
    refusal: Refusal, realm: str = DEFAULT_REALM
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Return ``(status, headers, body)`` of the response for ``refusal``.

    The body is JSON ``{"error": ..., "error_description": ...}``; with no credential at all the
    body says ``"unauthorized"`` while the challenge carries no ``error`` attribute. An
    :class:`~devicegate.AuthError` carries a ``WWW-Authenticate`` challenge (RFC 6750 §3: it
    belongs on 401 and, for insufficient_scope, 403; a 400 may carry it too, and always sending
    it tells clients the scheme).
    """
    extra = list(refusal.headers)
    if refusal.challenge:
        challenge = f'{refusal.scheme} realm="{realm}"'
        if refusal.error is not None:
            challenge += f', error="{refusal.error}", error_description="{refusal.description}"'
        for name, value in refusal.challenge_params:
            challenge += f', {name}="{value}"'
        extra.append((b"www-authenticate", challenge.encode()))
    if refusal.close:
        # The client may still be sending a body we will not read: end the connection after
        # the answer rather than parse the rest as a next request.
        extra.append((b"connection", b"close"))
    headers, body = json_response_parts(
        {"error": refusal.error or "unauthorized", "error_description": refusal.description},
        *extra,
    )
    return refusal.status_code, headers, body


async def send_response(
    scope: Scope,
    send: Send,
    status: int,
    headers: Iterable[tuple[bytes, bytes]],
    body: bytes,
) -> None:
    """Send a complete response; on a websocket, as a denial response or a 1008 close."""
    if scope["type"] == "websocket":
        if "websocket.http.response" in (scope.get("extensions") or {}):
            await send(
                {
                    "type": "websocket.http.response.start",
                    "status": status,
                    "headers": list(headers),
                }
            )
            await send({"type": "websocket.http.response.body", "body": body})
        else:
            await send({"type": "websocket.close", "code": WS_POLICY_VIOLATION})
        return
    await send({"type": "http.response.start", "status": status, "headers": list(headers)})
    await send({"type": "http.response.body", "body": body})


async def send_refusal(
    scope: Scope, send: Send, refusal: Refusal, realm: str = DEFAULT_REALM
) -> None:
    """Send the response for ``refusal``: the one way every part of devicegate answers no."""
    status, headers, body = refusal_parts(refusal, realm)
    await send_response(scope, send, status, headers, body)


async def send_json(
    scope: Scope, send: Send, status: int, payload: object, *extra_headers: tuple[bytes, bytes]
) -> None:
    """Send ``payload`` as a JSON response that no cache keeps."""
    headers, body = json_response_parts(payload, *extra_headers)
    await send_response(scope, send, status, headers, body)


async def serve_lifespan(
    receive: Receive,
    send: Send,
    *,
    startup: Callable[[], Awaitable[None]] | None = None,
    shutdown: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Answer the ASGI lifespan protocol, awaiting ``startup`` and ``shutdown`` when given."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            if startup is not None:
                await startup()
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            if shutdown is not None:
                await shutdown()
            await send({"type": "lifespan.shutdown.complete"})
            return
