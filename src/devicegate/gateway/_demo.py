"""The demo app ``devicegate serve`` protects when no upstream is given.

A raw ASGI app that answers with the caller's principal, so that a newcomer can see what the
middleware admitted and why. It reads only what the middleware put into the scope: its output
holds the credential kind, the device id and the verified claims, never a key or a secret.

    GET /, GET /whoami   {"kind": ..., "instance_id": ..., "claims": {...}}
    GET /health          {"status": "ok"}  (public in ``devicegate serve``)
    websocket /ws        sends the principal as one JSON text message, then closes
"""

from __future__ import annotations

from typing import Any

from starlette.types import Receive, Scope, Send

from .._asgi import json_body, send_json, serve_lifespan
from .._principal import get_principal
from .._rules import route_path

__all__ = ["HEALTH_PATH", "WEBSOCKET_PATH", "demo_app", "health_app", "principal_summary"]

HEALTH_PATH = "/health"
WEBSOCKET_PATH = "/ws"
_WHOAMI_PATHS = frozenset({"/", "/whoami"})
_READ_METHODS = frozenset({"GET", "HEAD"})
# RFC 6455 §7.4.1: normal closure once the principal has been sent.
_WS_NORMAL_CLOSURE = 1000


def principal_summary(scope: Scope) -> dict[str, Any]:
    """What the demo shows about the caller: kind, device id and claims (all ``None``/empty on
    a public path)."""
    principal = get_principal(scope)
    if principal is None:
        return {"kind": None, "instance_id": None, "claims": {}}
    return {
        "kind": principal.kind.value,
        "instance_id": principal.instance_id,
        "claims": dict(principal.claims),
    }


async def health_app(scope: Scope, receive: Receive, send: Send) -> None:
    """Answer ``{"status": "ok"}``: the gateway itself is up."""
    await send_json(scope, send, 200, {"status": "ok"})


async def demo_app(scope: Scope, receive: Receive, send: Send) -> None:
    """The embedded demo: echoes the principal :class:`~devicegate.DeviceAuthMiddleware` set."""
    if scope["type"] == "lifespan":
        await serve_lifespan(receive, send)
        return
    path = route_path(scope)
    if scope["type"] == "websocket":
        await receive()  # websocket.connect
        if path != WEBSOCKET_PATH:
            # Closing before accept makes the server refuse the handshake (403).
            await send({"type": "websocket.close", "code": _WS_NORMAL_CLOSURE})
            return
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.send", "text": json_body(principal_summary(scope)).decode()})
        await send({"type": "websocket.close", "code": _WS_NORMAL_CLOSURE})
        return
    if path != HEALTH_PATH and path not in _WHOAMI_PATHS:
        await send_json(scope, send, 404, {"error": "not_found"})
        return
    if scope["method"] not in _READ_METHODS:
        await send_json(scope, send, 405, {"error": "method_not_allowed"}, (b"allow", b"GET, HEAD"))
        return
    if path == HEALTH_PATH:
        await health_app(scope, receive, send)
        return
    await send_json(scope, send, 200, principal_summary(scope))
