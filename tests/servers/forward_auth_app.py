"""The devicegate the nginx tests run: :class:`devicegate.gateway.forward_auth.ForwardAuth` plus the
token endpoint.

Started as ``uvicorn --factory tests.servers.forward_auth_app:create_app``. Keys come from the
``DEVICEGATE_*`` environment (:meth:`devicegate.GateConfig.from_env`), the shared secret from
``DEVICEGATE_TEST_FORWARD_SECRET``. ``/_devicegate/auth`` answers forward-auth requests under
:data:`RULES` (the tests give the same rules to the middleware they compare nginx with); every
other path goes through :class:`devicegate.DeviceAuthMiddleware`, which serves ``/gen-jwt``.
"""

from __future__ import annotations

import os

from starlette.types import ASGIApp, Receive, Scope, Send

from devicegate import CredentialKind, DeviceAuthMiddleware, GateConfig, Rule
from devicegate.gateway.forward_auth import ForwardAuth

SECRET_ENV = "DEVICEGATE_TEST_FORWARD_SECRET"
FORWARD_AUTH_PATH = "/_devicegate/auth"

RULES = (
    Rule("/health", public=True),
    Rule("/admin/*", accept={CredentialKind.API_KEY}),
    Rule("/mobile/*", accept={CredentialKind.MOBILE_API_KEY, CredentialKind.DEVICE_TOKEN}),
)


async def not_found(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 404, "headers": []})
    await send({"type": "http.response.body", "body": b""})


def create_app() -> ASGIApp:
    config = GateConfig.from_env()
    forward_auth = ForwardAuth(
        config, rules=RULES, shared_secret=os.environ.get(SECRET_ENV) or None
    )
    gate = DeviceAuthMiddleware(not_found, config=config, rules=RULES)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == FORWARD_AUTH_PATH:
            await forward_auth(scope, receive, send)
        else:
            await gate(scope, receive, send)

    return app
