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
from tests.helpers import (
    DENIAL_EXTENSION,
    FORBIDDEN,
    INVALID,
    MISSING,
    MISSING_DEVICE,
    SEVERAL,
    UNREADABLE,
    UNSAFE_PATH,
    Answer,
    Denied,
    Keys,
    RecordingApp,
    bad_request,
    call_asgi,
    challenge,
    make_token,
    message_types,
    ws_scope,
)

pytestmark = pytest.mark.anyio

DEVICE = "device-1"
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
        return message_types(self.sent)


async def connect(asgi: ASGIApp, scope: Scope) -> Handshake:
    """Open a websocket: the client's ``websocket.connect``, then a disconnect once asked again."""
    handshake = Handshake()
    handshake.sent = await call_asgi(asgi, scope, received=handshake.received)
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
@pytest.mark.parametrize(
    "extensions", [DENIAL_EXTENSION, {}, None], ids=["denial", "empty", "absent"]
)
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
        "scopes": ["authenticated", kind],
    }
    (seen,) = app.calls
    assert isinstance(seen["user"], Principal)
    assert get_principal(seen) is seen["user"]
    assert seen["auth"].scopes == ["authenticated", kind]


async def test_forged_user_is_overwritten_on_a_websocket(keys: Keys, app: RecordingApp) -> None:
    scope = ws_scope(headers=credentials(keys)["mobile_api_key"], extensions=DENIAL_EXTENSION)
    scope["user"] = Principal(CredentialKind.API_KEY)
    scope["auth"] = AuthCredentials(["api_key"])
    await connect(DeviceAuthMiddleware(app, config=keys.config()), scope)
    (seen,) = app.calls
    assert seen["user"].kind is CredentialKind.MOBILE_API_KEY
    assert seen["auth"].scopes == ["authenticated", "mobile_api_key"]


@pytest.mark.parametrize("credential", ["none", "wrong_api_key", "two_credentials", "basic"])
async def test_public_websocket_path_skips_credentials(
    keys: Keys, app: RecordingApp, credential: str
) -> None:
    gate = DeviceAuthMiddleware(app, config=keys.config(), rules=RULES)
    scope = ws_scope("/ws/public", credentials(keys)[credential], extensions=DENIAL_EXTENSION)
    handshake = await connect(gate, scope)
    assert handshake.types == ["websocket.accept", "websocket.send", "websocket.close"]
    assert json.loads(handshake.sent[1]["text"])["authenticated"] is False
    (seen,) = app.calls
    assert isinstance(seen["user"], UnauthenticatedUser)
    assert get_principal(seen) is None


async def test_websocket_rules_use_the_route_path(keys: Keys, app: RecordingApp) -> None:
    gate = DeviceAuthMiddleware(app, config=keys.config(), rules=RULES)
    mobile = credentials(keys)["mobile_api_key"]
    mounted = ws_scope("/api/ws/server", mobile, extensions=DENIAL_EXTENSION, root_path="/api")
    refused = await connect(gate, mounted)
    assert refused.sent[0]["status"] == 403
    public = await connect(
        gate, ws_scope("/api/ws/public", extensions=DENIAL_EXTENSION, root_path="/api")
    )
    assert public.types[0] == "websocket.accept"
    assert len(app.calls) == 1


# -- Denied -----------------------------------------------------------------------------------

# path, credential, the refusal
DENIALS = [
    pytest.param("/ws", "none", MISSING, id="nothing"),
    pytest.param("/ws", "wrong_api_key", INVALID, id="wrong-key"),
    pytest.param("/ws", "expired", INVALID, id="expired"),
    pytest.param("/ws", "bound_token_other_device", INVALID, id="other-device"),
    pytest.param(
        "/ws", "bound_token_no_device", bad_request(MISSING_DEVICE), id="no-device-header"
    ),
    pytest.param("/ws", "two_credentials", bad_request(SEVERAL), id="two-credentials"),
    pytest.param("/ws", "basic", MISSING, id="basic"),
    pytest.param("/ws/server", "mobile_api_key", FORBIDDEN, id="mobile-on-server"),
    pytest.param("/ws/server", "bound_token", FORBIDDEN, id="token-on-server"),
    pytest.param(
        "/ws/public/../server", "mobile_api_key", bad_request(UNSAFE_PATH), id="dot-segments"
    ),
]


@pytest.mark.parametrize(("path", "credential", "denied"), DENIALS)
async def test_denial_response_when_the_server_offers_it(
    keys: Keys, app: RecordingApp, path: str, credential: str, denied: Denied
) -> None:
    gate = DeviceAuthMiddleware(app, config=keys.config(), rules=RULES)
    handshake = await connect(
        gate, ws_scope(path, credentials(keys)[credential], extensions=DENIAL_EXTENSION)
    )
    assert handshake.types == ["websocket.http.response.start", "websocket.http.response.body"]
    answered = Answer.of(handshake.sent)
    assert answered.status == denied.status
    assert len(dict(answered.headers)) == len(answered.headers)
    assert answered.header("www-authenticate") == challenge(denied)
    assert answered.header("content-type") == "application/json"
    assert answered.header("content-length") == str(len(answered.body))
    assert answered.json() == {
        "error": denied.error or "unauthorized",
        "error_description": denied.description,
    }
    assert handshake.sent[-1].get("more_body", False) is False
    assert not app.ran


@pytest.mark.parametrize(("path", "credential", "denied"), DENIALS)
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
    denied: Denied,
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
    with_denial = await connect(gate, ws_scope(extensions=DENIAL_EXTENSION))
    without = await connect(gate, ws_scope(extensions={}))
    assert with_denial.sent[0]["status"] == 401
    assert without.sent == [{"type": "websocket.close", "code": 1008}]
    assert seen == []
    assert not app.ran


async def test_malformed_websocket_scope_is_refused(keys: Keys, app: RecordingApp) -> None:
    scope = ws_scope(extensions=DENIAL_EXTENSION)
    del scope["headers"]
    handshake = await connect(DeviceAuthMiddleware(app, config=keys.config()), scope)
    assert handshake.sent[0]["status"] == 400
    assert json.loads(handshake.sent[1]["body"]) == {
        "error": "invalid_request",
        "error_description": UNREADABLE,
    }
    assert not app.ran


async def test_token_path_is_not_a_websocket(keys: Keys, app: RecordingApp) -> None:
    gate = DeviceAuthMiddleware(app, config=keys.config())
    api_key = credentials(keys)["api_key"]
    with_denial = await connect(gate, ws_scope("/gen-jwt", api_key, extensions=DENIAL_EXTENSION))
    without = await connect(gate, ws_scope("/gen-jwt", api_key, extensions={}))
    mobile = await connect(
        gate, ws_scope("/gen-jwt", credentials(keys)["mobile_api_key"], extensions=DENIAL_EXTENSION)
    )
    assert with_denial.sent[0]["status"] == 405
    assert without.sent == [{"type": "websocket.close", "code": 1008}]
    assert mobile.sent[0]["status"] == 403
    assert not app.ran
