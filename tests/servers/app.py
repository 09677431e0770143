"""The app tests/test_uvicorn.py serves with uvicorn and hypercorn.

Started by a server in a subprocess as ``tests.servers.app:create_app``, it reads its keys from
``DEVICEGATE_*`` environment variables (:meth:`devicegate.GateConfig.from_env`), as a deployment
would. ``/health`` is public, ``/whoami`` and the ``/ws`` websocket answer with the caller's
principal and the event loop serving the request, ``/gen-jwt`` mints tokens. ``/__seen`` (public
too) lists the request targets that reached the app behind the middleware, so that a test can
show a refused request never did.
"""

from __future__ import annotations

import asyncio
from typing import Any

import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket

from devicegate import DeviceAuthMiddleware, GateConfig, Rule, get_principal


def event_loop() -> str:
    """Which event loop runs this request: proof that a server ran devicegate on trio."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        return "asyncio"
    trio.lowlevel.current_trio_token()  # raises RuntimeError outside trio
    return "trio"


def describe(connection: Request | WebSocket) -> dict[str, Any]:
    principal = get_principal(connection)
    return {
        "kind": None if principal is None else principal.kind.value,
        "instance_id": None if principal is None else principal.instance_id,
        "event_loop": event_loop(),
    }


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok", **describe(request)})


async def whoami(request: Request) -> JSONResponse:
    return JSONResponse(describe(request))


async def websocket_whoami(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.send_json(describe(websocket))
    await websocket.close()


SEEN_PATH = "/__seen"
SEEN: list[str] = []


def recorded(app: ASGIApp) -> ASGIApp:
    """``app``, noting the target of every request and handshake that reaches it."""

    async def recording(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and scope["path"] != SEEN_PATH:
            query = scope["query_string"].decode("latin-1")
            SEEN.append(scope["path"] + (f"?{query}" if query else ""))
        await app(scope, receive, send)

    return recording


async def seen(request: Request) -> JSONResponse:
    return JSONResponse(SEEN)


def create_app() -> ASGIApp:
    """The app factory the servers call (``--factory`` for uvicorn, ``create_app()`` for
    hypercorn)."""
    app = Starlette(
        routes=[
            Route("/health", health),
            Route("/whoami", whoami),
            WebSocketRoute("/ws", websocket_whoami),
            Route(SEEN_PATH, seen),
        ]
    )
    return DeviceAuthMiddleware(
        recorded(app),
        config=GateConfig.from_env(),
        rules=[Rule("/health", public=True), Rule(SEEN_PATH, public=True)],
    )
