"""Websocket handshakes through DeviceAuthMiddleware, driven by hand with raw ASGI messages.

The decision is taken on the handshake, before ``websocket.accept``. When the server lists the
``websocket.http.response`` extension a denial is a real HTTP response (401/403/400 with the
RFC 6750 challenge); otherwise the handshake is closed with 1008 (policy violation).

References:
    https://asgi.readthedocs.io/en/latest/extensions.html#websocket-denial-response
    https://www.rfc-editor.org/rfc/rfc6455#section-7.4.1
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest
from starlette.authentication import AuthCredentials, UnauthenticatedUser
from starlette.types import ASGIApp, Message, Scope

from devicegate import (
    AuthError,
    CredentialKind,
    DeviceAuthMiddleware,
    Principal,
    Rule,
    get_principal,
)
from tests.helpers import Keys, RecordingApp, make_token

pytestmark = pytest.mark.anyio

DEVICE = "device-1"
DENIAL: dict[str, dict[str, object]] = {"websocket.http.response": {}}

RULES = (
    Rule("/ws/public", public=True),
    Rule("/ws/server", accept=[CredentialKind.API_KEY]),
)


@dataclass
class Handshake:
    """What one websocket connection exchanged with the ASGI app under test."""

    sent: list[Message] = field(default_factory=list)
    received: list[Message] = field(default_factory=list)

    @property
    def types(self) -> list[str]:
        return [message["type"] for message in self.sent]


def ws_scope(
    path: str = "/ws",
    headers: Sequence[tuple[bytes, bytes]] = (),
    *,
    extensions: dict[str, dict[str, object]] | None = None,
    root_path: str = "",
) -> Scope:
    scope: Scope = {
        "type": "websocket",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "scheme": "ws",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": root_path,
        "headers": [(b"host", b"testserver"), *headers],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
        "subprotocols": [],
        "state": {},
    }
    if extensions is not None:
        scope["extensions"] = extensions
    return scope


async def connect(asgi: ASGIApp, scope: Scope) -> Handshake:
    """Open a websocket: the client's ``websocket.connect``, then a disconnect once asked again."""
    handshake = Handshake()
    inbox: list[Message] = [{"type": "websocket.connect"}]

    async def receive() -> Message:
        message = inbox.pop(0) if inbox else {"type": "websocket.disconnect", "code": 1000}
        handshake.received.append(message)
        return message

    async def send(message: Message) -> None:
        handshake.sent.append(message)

    await asgi(scope, receive, send)
    return handshake


def credentials(keys: Keys) -> dict[str, list[tuple[bytes, bytes]]]:
    bound = make_token(keys.jwt_secret, instance_id=DEVICE)
    return {
        "none": [],
        "api_key": [(b"x-api-key", keys.api_key.encode())],
        "mobile_api_key": [(b"authorization", keys.mobile_api_key.encode())],
        "generic_token": [(b"authorization", f"Bearer {make_token(keys.jwt_secret)}".encode())],
        "bound_token": [
            (b"authorization", f"Bearer {bound}".encode()),
            (b"x-instance-id", DEVICE.encode()),
        ],
        "bound_token_other_device": [
            (b"authorization", f"Bearer {bound}".encode()),
            (b"x-instance-id", b"device-2"),
        ],
        "bound_token_no_device": [(b"authorization", f"Bearer {bound}".encode())],
        "wrong_api_key": [(b"x-api-key", b"wrong-key-0123456789")],
        "expired": [
            (
                b"authorization",
                b"Bearer " + make_token(keys.jwt_secret, {"iat": 1, "exp": 2}).encode(),
            )
        ],
        "two_credentials": [
            (b"x-api-key", keys.api_key.encode()),
            (b"authorization", keys.mobile_api_key.encode()),
        ],
        "basic": [(b"authorization", b"Basic dXNlcjpwYXNz")],
    }


# -- Admitted ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("credential", "kind", "instance_id"),
    [
        ("api_key", "api_key", None),
        ("mobile_api_key", "mobile_api_key", None),
        ("generic_token", "device_token", None),
        ("bound_token", "device_token", DEVICE),
    ],
)
@pytest.mark.parametrize("extensions", [DENIAL, {}, None], ids=["denial", "empty", "absent"])
async def test_valid_credentials_reach_the_app(
    keys: Keys,
    app: RecordingApp,
    credential: str,
    kind: str,
    instance_id: str | None,
    extensions: dict[str, dict[str, object]] | None,
) -> None:
    gate = DeviceAuthMiddleware(app, config=keys.config())
    scope = ws_scope(headers=credentials(keys)[credential], extensions=extensions)
    handshake = await connect(gate, scope)
    # The app, not the middleware, read the client's connect and accepted.
    assert handshake.received == [{"type": "websocket.connect"}]
    assert handshake.types == ["websocket.accept", "websocket.send", "websocket.close"]
    assert json.loads(handshake.sent[1]["text"]) == {
        "kind": kind,
        "instance_id": instance_id,
        "authenticated": True,
        "scopes": [kind],
    }
    (seen,) = app.calls
    assert isinstance(seen["user"], Principal)
    assert get_principal(seen) is seen["user"]
    assert seen["auth"].scopes == [kind]


async def test_forged_user_is_overwritten_on_a_websocket(keys: Keys, app: RecordingApp) -> None:
    scope = ws_scope(headers=credentials(keys)["mobile_api_key"], extensions=DENIAL)
    scope["user"] = Principal(CredentialKind.API_KEY)
    scope["auth"] = AuthCredentials(["api_key"])
    await connect(DeviceAuthMiddleware(app, config=keys.config()), scope)
    (seen,) = app.calls
    assert seen["user"].kind is CredentialKind.MOBILE_API_KEY
    assert seen["auth"].scopes == ["mobile_api_key"]


@pytest.mark.parametrize("credential", ["none", "wrong_api_key", "two_credentials", "basic"])
async def test_public_websocket_path_skips_credentials(
    keys: Keys, app: RecordingApp, credential: str
) -> None:
    gate = DeviceAuthMiddleware(app, config=keys.config(), rules=RULES)
    scope = ws_scope("/ws/public", credentials(keys)[credential], extensions=DENIAL)
    handshake = await connect(gate, scope)
    assert handshake.types == ["websocket.accept", "websocket.send", "websocket.close"]
    assert json.loads(handshake.sent[1]["text"])["authenticated"] is False
    (seen,) = app.calls
    assert isinstance(seen["user"], UnauthenticatedUser)
    assert get_principal(seen) is None


async def test_websocket_rules_use_the_route_path(keys: Keys, app: RecordingApp) -> None:
    gate = DeviceAuthMiddleware(app, config=keys.config(), rules=RULES)
    mobile = credentials(keys)["mobile_api_key"]
    mounted = ws_scope("/api/ws/server", mobile, extensions=DENIAL, root_path="/api")
    refused = await connect(gate, mounted)
    assert refused.sent[0]["status"] == 403
    public = await connect(gate, ws_scope("/api/ws/public", extensions=DENIAL, root_path="/api"))
    assert public.types[0] == "websocket.accept"
    assert len(app.calls) == 1


# -- Denied -----------------------------------------------------------------------------------

INVALID = (
    401,
    "invalid_token",
    "The credential is invalid, expired or not valid for this device.",
)
FORBIDDEN = (403, "insufficient_scope", "This credential is not accepted for this resource.")

# path, credential, status, RFC 6750 error, description
DENIALS = [
    pytest.param("/ws", "none", 401, None, "Authentication is required.", id="nothing"),
    pytest.param("/ws", "wrong_api_key", *INVALID, id="wrong-key"),
    pytest.param("/ws", "expired", *INVALID, id="expired"),
    pytest.param("/ws", "bound_token_other_device", *INVALID, id="other-device"),
    pytest.param(
        "/ws",
        "bound_token_no_device",
        400,
        "invalid_request",
        "The token is bound to a device; send the device header.",
        id="no-device-header",
    ),
    pytest.param(
        "/ws",
        "two_credentials",
        400,
        "invalid_request",
        "The request carries more than one credential.",
        id="two-credentials",
    ),
    pytest.param(
        "/ws",
        "basic",
        401,
        None,
        "Authentication is required.",
        id="basic",
    ),
    pytest.param("/ws/server", "mobile_api_key", *FORBIDDEN, id="mobile-on-server"),
    pytest.param("/ws/server", "bound_token", *FORBIDDEN, id="token-on-server"),
    pytest.param(
        "/ws/public/../server",
        "mobile_api_key",
        400,
        "invalid_request",
        "The request path has '.', '..' or empty segments, a backslash, a semicolon or a "
        "control character.",
        id="dot-segments",
    ),
]


@pytest.mark.parametrize(("path", "credential", "status", "error", "description"), DENIALS)
async def test_denial_response_when_the_server_offers_it(
    keys: Keys,
    app: RecordingApp,
    path: str,
    credential: str,
    status: int,
    error: str | None,
    description: str,
) -> None:
    gate = DeviceAuthMiddleware(app, config=keys.config(), rules=RULES)
    handshake = await connect(
        gate, ws_scope(path, credentials(keys)[credential], extensions=DENIAL)
    )
    assert handshake.types == ["websocket.http.response.start", "websocket.http.response.body"]
    start, body = handshake.sent
    assert start["status"] == status
    headers = dict(start["headers"])
    assert len(headers) == len(start["headers"])
    challenge = 'Bearer realm="devicegate"'
    if error is not None:
        challenge += f', error="{error}", error_description="{description}"'
    assert headers[b"www-authenticate"] == challenge.encode()
    assert headers[b"content-type"] == b"application/json"
    assert headers[b"content-length"] == str(len(body["body"])).encode()
    assert json.loads(body["body"]) == {
        "error": error or "unauthorized",
        "error_description": description,
    }
    assert body.get("more_body", False) is False
    assert not app.ran


@pytest.mark.parametrize(("path", "credential", "status", "error", "description"), DENIALS)
@pytest.mark.parametrize(
    "extensions",
    [{}, None, {"websocket.http.response.other": {}}],
    ids=["empty", "absent", "other-extension"],
)
async def test_close_1008_without_the_denial_extension(
    keys: Keys,
    app: RecordingApp,
    path: str,
    credential: str,
    status: int,
    error: str | None,
    description: str,
    extensions: dict[str, dict[str, object]] | None,
) -> None:
    gate = DeviceAuthMiddleware(app, config=keys.config(), rules=RULES)
    handshake = await connect(
        gate, ws_scope(path, credentials(keys)[credential], extensions=extensions)
    )
    assert handshake.sent == [{"type": "websocket.close", "code": 1008}]
    assert not app.ran


async def test_extensions_set_to_none_is_a_close_not_a_crash(keys: Keys, app: RecordingApp) -> None:
    scope = ws_scope()
    scope["extensions"] = None
    handshake = await connect(DeviceAuthMiddleware(app, config=keys.config()), scope)
    assert handshake.sent == [{"type": "websocket.close", "code": 1008}]
    assert not app.ran


async def test_on_error_is_not_used_for_websockets(keys: Keys, app: RecordingApp) -> None:
    seen: list[AuthError] = []

    def on_error(scope: Scope, error: AuthError) -> ASGIApp:
        seen.append(error)
        raise AssertionError("on_error must not render a websocket denial")

    gate = DeviceAuthMiddleware(app, config=keys.config(), on_error=on_error)
    with_denial = await connect(gate, ws_scope(extensions=DENIAL))
    without = await connect(gate, ws_scope(extensions={}))
    assert with_denial.sent[0]["status"] == 401
    assert without.sent == [{"type": "websocket.close", "code": 1008}]
    assert seen == []
    assert not app.ran


async def test_malformed_websocket_scope_is_refused(keys: Keys, app: RecordingApp) -> None:
    scope = ws_scope(extensions=DENIAL)
    del scope["headers"]
    handshake = await connect(DeviceAuthMiddleware(app, config=keys.config()), scope)
    assert handshake.sent[0]["status"] == 400
    assert json.loads(handshake.sent[1]["body"]) == {
        "error": "invalid_request",
        "error_description": "The request could not be read.",
    }
    assert not app.ran


async def test_token_path_is_not_a_websocket(keys: Keys, app: RecordingApp) -> None:
    gate = DeviceAuthMiddleware(app, config=keys.config())
    api_key = credentials(keys)["api_key"]
    with_denial = await connect(gate, ws_scope("/gen-jwt", api_key, extensions=DENIAL))
    without = await connect(gate, ws_scope("/gen-jwt", api_key, extensions={}))
    mobile = await connect(
        gate, ws_scope("/gen-jwt", credentials(keys)["mobile_api_key"], extensions=DENIAL)
    )
    assert with_denial.sent[0]["status"] == 405
    assert without.sent == [{"type": "websocket.close", "code": 1008}]
    assert mobile.sent[0]["status"] == 403
    assert not app.ran
