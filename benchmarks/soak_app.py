"""The app the soak runs under uvicorn: a plain ASGI app behind DeviceAuthMiddleware, set up as
production would be, with a full revocation list.

Started as ``uvicorn benchmarks.soak_app:create_app --factory``; the keys come from the
``DEVICEGATE_*`` environment (:meth:`devicegate.GateConfig.from_env`). Every answer of the app
itself carries ``x-soak-app: admitted``, so that the soak can tell an admission from a refusal
without trusting devicegate's word for it. Websocket handshakes that reach the app are
accepted, then closed.

At start, the revocation list receives :data:`REVOKED_TOKENS` token ids (``rv-0`` ...) and
:data:`REVOKED_DEVICES` devices (``gone-0`` ...), so that every request pays for a list of the
size a busy deployment keeps.
"""

from __future__ import annotations

import json
import os
import time

from starlette.types import ASGIApp, Receive, Scope, Send

from devicegate import (
    CredentialKind,
    DeviceAuthMiddleware,
    GateConfig,
    RevocationList,
    Rule,
    get_principal,
)

REVOKED_TOKENS = 100_000
REVOKED_DEVICES = 1_000
CACHE_PATH = "/__soak/cache"
RULES = (
    Rule("/health", public=True),
    Rule(CACHE_PATH, public=True),
    Rule("/admin/*", accept={CredentialKind.API_KEY}),
)
MARK = (b"x-soak-app", b"admitted")


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "websocket":
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.close", "code": 1000})
        return
    more = True
    while more:  # the whole body, as an app that reads it would
        message = await receive()
        if message["type"] != "http.request":
            return
        more = message.get("more_body", False)
    principal = get_principal(scope)
    body = json.dumps(
        {
            "kind": None if principal is None else principal.kind.value,
            "instance_id": None if principal is None else principal.instance_id,
        }
    ).encode()
    headers = [
        MARK,
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def with_cache_report(gate: DeviceAuthMiddleware) -> ASGIApp:
    """``gate``, plus ``GET /__soak/cache`` (public): this worker's pid and how many verified
    tokens its cache holds, so that the soak can fill every worker's cache before it measures.
    Answered without the soak mark: it is devicegate's, not the app's."""

    async def report(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == CACHE_PATH:
            body = json.dumps({"pid": os.getpid(), "entries": gate.verifier.cache_size})
            headers = [(b"content-type", b"application/json")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": body.encode()})
            return
        await gate(scope, receive, send)

    return report


def create_app() -> ASGIApp:
    """The app factory uvicorn calls in each worker."""
    revocations = RevocationList()
    now = time.time()
    for index in range(REVOKED_TOKENS):
        revocations.record("jti", f"rv-{index}", now)
    for index in range(REVOKED_DEVICES):
        revocations.record("instance_id", f"gone-{index}", now)
    # No revocation endpoint: each worker holds its own list here, so a revocation through one
    # would not hold in the others (serve refuses it with several workers for that reason).
    config = GateConfig.from_env()
    gate = DeviceAuthMiddleware(
        app, config=config, rules=RULES, revocations=revocations, revoke_path=None
    )
    return with_cache_report(gate)
