"""DeviceAuthMiddleware through real ASGI plumbing: httpx.ASGITransport around a raw ASGI app.

Every row of the issue's outcome table is asserted on status, the exact ``WWW-Authenticate``
value, the JSON body and whether the wrapped app ran.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from starlette.authentication import AuthCredentials, UnauthenticatedUser
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from devicegate import (
    AuthError,
    ConfigError,
    CredentialKind,
    DeviceAuthMiddleware,
    GateConfig,
    InsufficientScope,
    InvalidReason,
    InvalidRequest,
    InvalidToken,
    MissingCredentials,
    Principal,
    Rule,
    TokenIssuer,
    get_principal,
)
from tests.helpers import (
    AUTH_REQUIRED,
    BAD_API_KEY_HEADER,
    DUPLICATE,
    DUPLICATE_DEVICE,
    FORBIDDEN,
    INVALID,
    INVALID_CREDENTIAL,
    MALFORMED,
    MISSING,
    MISSING_DEVICE,
    NEAR_MISSES,
    NOT_ACCEPTED,
    SEVERAL,
    UNREADABLE,
    Denied,
    Keys,
    RecordingApp,
    assert_denied,
    b64url,
    bad_request,
    bearer,
    call_asgi,
    client,
    http_scope,
    lifespan_scope,
    make_token,
    near_misses,
)

# Marked here, not only by conftest: anyio's plugin parametrizes the backend at collection
# time, which is the only way it composes with the parametrized tables below.
pytestmark = pytest.mark.anyio

DEVICE = "device-1"


@dataclass(frozen=True)
class Admitted:
    """The app ran and saw this principal (``kind=None``: a public path, no principal)."""

    kind: str | None
    instance_id: str | None = None


PUBLIC = Admitted(None)
API = Admitted("api_key")
MOBILE = Admitted("mobile_api_key")
TOKEN = Admitted("device_token")
BOUND = Admitted("device_token", DEVICE)


def assert_outcome(response: httpx.Response, outcome: Admitted | Denied, app: RecordingApp) -> None:
    if isinstance(outcome, Denied):
        assert_denied(response, outcome)
        assert not app.ran
        return
    assert response.status_code == 200
    assert response.json() == {
        "kind": outcome.kind,
        "instance_id": outcome.instance_id,
        "authenticated": outcome.kind is not None,
        "scopes": [] if outcome.kind is None else ["authenticated", outcome.kind],
    }
    assert len(app.calls) == 1


def encode_headers(
    headers: Sequence[tuple[str, str]], values: dict[str, str]
) -> list[tuple[bytes, bytes]]:
    # latin-1 maps each code point below 256 to one byte, so a template can hold raw bytes.
    return [
        (name.encode("latin-1"), value.format(**values).encode("latin-1"))
        for name, value in headers
    ]


@pytest.fixture
def credentials(keys: Keys) -> dict[str, str]:
    """Named credential values that the header templates below refer to."""
    now = int(time.time())
    generic = make_token(keys.jwt_secret)
    header, _, signature = generic.split(".")
    forged_claims = {"iat": now, "exp": now + 300, "instance_id": "other-device"}
    none_header = b64url(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return {
        "api_key": keys.api_key,
        "mobile_api_key": keys.mobile_api_key,
        "token": generic,
        "bound": make_token(keys.jwt_secret, instance_id=DEVICE),
        "minted": TokenIssuer(keys.config()).issue(DEVICE).access_token,
        "expired": make_token(keys.jwt_secret, {"iat": now - 600, "exp": now - 300}),
        "string_exp": make_token(keys.jwt_secret, {"iat": now, "exp": str(now + 300)}),
        "no_exp": make_token(keys.jwt_secret, {"iat": now}),
        "tampered": f"{header}.{b64url(json.dumps(forged_claims).encode())}.{signature}",
        "other_secret": make_token(secrets.token_urlsafe(32), instance_id=DEVICE),
        "alg_none": f"{none_header}.{generic.split('.')[1]}.",
        # Signed with the right key and HS256, but the header names another algorithm.
        "alg_hs512": make_token(keys.jwt_secret, header={"alg": "HS512", "typ": "JWT"}),
        "huge": "A" * 8193,
    }


RULES = (
    Rule("/health", public=True),
    Rule("/server/*", accept=[CredentialKind.API_KEY]),
    Rule("/mobile/*", accept=[CredentialKind.MOBILE_API_KEY, CredentialKind.DEVICE_TOKEN]),
)

# path, request headers (values are templates over the `credentials` fixture), outcome.
OUTCOMES = [
    # -- No credential on a protected path: 401 with a bare challenge (RFC 6750 §3.1). --
    pytest.param("/", [], MISSING, id="nothing"),
    pytest.param("/server/x", [], MISSING, id="nothing-on-a-restricted-path"),
    pytest.param("/", [("x-instance-id", DEVICE)], MISSING, id="device-header-alone"),
    pytest.param("/", [("cookie", "session={token}")], MISSING, id="token-in-a-cookie"),
    pytest.param("/?access_token={token}", [], MISSING, id="token-in-the-query-string"),
    pytest.param("/?api_key={api_key}", [], MISSING, id="key-in-the-query-string"),
    # -- A valid credential the path accepts: the app's response. --
    pytest.param("/", [("x-api-key", "{api_key}")], API, id="api-key"),
    pytest.param("/", [("authorization", "{mobile_api_key}")], MOBILE, id="mobile-key"),
    pytest.param("/", [("authorization", "Bearer {token}")], TOKEN, id="generic-token"),
    # RFC 9110 §11.1: the auth scheme is case-insensitive.
    pytest.param("/", [("authorization", "bearer {token}")], TOKEN, id="scheme-lower"),
    pytest.param("/", [("authorization", "BEARER {token}")], TOKEN, id="scheme-upper"),
    pytest.param("/", [("authorization", "bEaReR {token}")], TOKEN, id="scheme-mixed"),
    pytest.param(
        "/",
        [("authorization", "Bearer {bound}"), ("x-instance-id", DEVICE)],
        BOUND,
        id="bound-token-on-its-device",
    ),
    pytest.param(
        "/",
        [("authorization", "Bearer {minted}"), ("x-instance-id", DEVICE)],
        BOUND,
        id="minted-token-on-its-device",
    ),
    # A generic token is valid on any device; the device header does not bind it.
    pytest.param(
        "/",
        [("authorization", "Bearer {token}"), ("x-instance-id", "any-device")],
        TOKEN,
        id="generic-token-with-a-device-header",
    ),
    pytest.param("/server/x", [("x-api-key", "{api_key}")], API, id="api-key-on-server-path"),
    pytest.param(
        "/mobile/x", [("authorization", "{mobile_api_key}")], MOBILE, id="mobile-on-mobile-path"
    ),
    pytest.param(
        "/mobile/x", [("authorization", "Bearer {token}")], TOKEN, id="token-on-mobile-path"
    ),
    # -- Bad, expired, tampered or wrongly bound token; wrong key: 401 invalid_token. --
    pytest.param("/", [("authorization", "Bearer {expired}")], INVALID, id="expired"),
    pytest.param("/", [("authorization", "Bearer {tampered}")], INVALID, id="tampered"),
    pytest.param("/", [("authorization", "Bearer {other_secret}")], INVALID, id="other-secret"),
    pytest.param("/", [("authorization", "Bearer {alg_none}")], INVALID, id="alg-none"),
    pytest.param("/", [("authorization", "Bearer {alg_hs512}")], INVALID, id="alg-mismatch"),
    pytest.param("/", [("authorization", "Bearer {string_exp}")], INVALID, id="string-exp"),
    pytest.param("/", [("authorization", "Bearer {no_exp}")], INVALID, id="missing-exp"),
    pytest.param("/", [("authorization", "Bearer a.b.c")], INVALID, id="garbage-token"),
    pytest.param(
        "/",
        [("authorization", "Bearer {bound}"), ("x-instance-id", "device-2")],
        INVALID,
        id="bound-token-on-another-device",
    ),
    pytest.param(
        "/",
        [("authorization", "Bearer {bound}"), ("x-instance-id", "DEVICE-1")],
        INVALID,
        id="bound-token-device-case-changed",
    ),
    pytest.param(
        "/",
        [("authorization", "Bearer {bound}"), ("x-instance-id", "")],
        INVALID,
        id="bound-token-empty-device-header",
    ),
    pytest.param("/", [("x-api-key", "wrong-key-0123456789")], INVALID, id="wrong-api-key"),
    pytest.param("/", [("authorization", "wrong-key-0123")], INVALID, id="wrong-mobile-key"),
    # A key offered in the wrong place is not valid.
    pytest.param("/", [("authorization", "{api_key}")], INVALID, id="api-key-as-mobile-key"),
    pytest.param("/", [("x-api-key", "{mobile_api_key}")], INVALID, id="mobile-key-as-api-key"),
    pytest.param("/", [("authorization", "Bearer {api_key}")], INVALID, id="api-key-as-bearer"),
    pytest.param(
        "/", [("authorization", "Bearer {mobile_api_key}")], INVALID, id="mobile-key-as-bearer"
    ),
    pytest.param("/", [("x-api-key", "{token}")], INVALID, id="token-as-api-key"),
    pytest.param("/", [("authorization", "{token}")], INVALID, id="token-without-scheme"),
    # Non-ASCII bytes are a failed match, never an exception.
    pytest.param("/", [("authorization", "\xff\xfe\x80")], INVALID, id="non-ascii-mobile-key"),
    pytest.param("/", [("x-api-key", "cl\xc3\xa9")], INVALID, id="non-ascii-api-key"),
    pytest.param("/", [("authorization", "Bearer \xff.\xfe.\x80")], INVALID, id="non-ascii-jwt"),
    # Authentication comes before authorization: a bad key on a restricted path is a 401.
    pytest.param(
        "/server/x", [("authorization", "wrong-key-0123")], INVALID, id="wrong-key-restricted"
    ),
    # -- Malformed requests: 400 invalid_request. --
    pytest.param("/", [("authorization", "Bearer")], bad_request(MALFORMED), id="bearer-alone"),
    pytest.param("/", [("authorization", "Bearer ")], bad_request(MALFORMED), id="empty-bearer"),
    pytest.param("/", [("authorization", "")], bad_request(MALFORMED), id="empty-authorization"),
    pytest.param(
        "/", [("authorization", "Bearer  {token}")], bad_request(MALFORMED), id="two-spaces"
    ),
    pytest.param("/", [("authorization", "Bearer\t{token}")], bad_request(MALFORMED), id="tab"),
    pytest.param(
        "/", [("authorization", "Bearer {token} extra")], bad_request(MALFORMED), id="extra-part"
    ),
    pytest.param(
        "/", [("authorization", "Bearer {huge}")], bad_request(MALFORMED), id="oversized-bearer"
    ),
    pytest.param("/", [("x-api-key", "{huge}")], bad_request(BAD_API_KEY_HEADER), id="huge-key"),
    pytest.param("/", [("x-api-key", "")], bad_request(BAD_API_KEY_HEADER), id="empty-api-key"),
    pytest.param(
        # RFC 6750 §3.1: an unsupported scheme gets the bare challenge, as no credential would.
        "/",
        [("authorization", "Basic dXNlcjpwYXNz")],
        MISSING,
        id="basic",
    ),
    pytest.param("/", [("authorization", "Token {token}")], MISSING, id="token-scheme"),
    pytest.param(
        "/",
        [("authorization", "Bearer {token}"), ("authorization", "Bearer {token}")],
        bad_request(DUPLICATE),
        id="authorization-twice",
    ),
    pytest.param(
        "/",
        [("authorization", "{mobile_api_key}"), ("authorization", "Bearer {token}")],
        bad_request(DUPLICATE),
        id="authorization-twice-different",
    ),
    pytest.param(
        "/",
        [("x-api-key", "{api_key}"), ("x-api-key", "{api_key}")],
        bad_request(DUPLICATE),
        id="api-key-twice",
    ),
    pytest.param(
        "/",
        [("x-api-key", "{api_key}"), ("authorization", "{mobile_api_key}")],
        bad_request(SEVERAL),
        id="api-key-and-mobile-key",
    ),
    pytest.param(
        "/",
        [("authorization", "Bearer {token}"), ("x-api-key", "{api_key}")],
        bad_request(SEVERAL),
        id="token-and-api-key",
    ),
    pytest.param(
        "/",
        [("authorization", "Bearer {token}"), ("x-api-key", "")],
        bad_request(SEVERAL),
        id="token-and-empty-api-key",
    ),
    pytest.param(
        "/",
        [("authorization", "Bearer {bound}")],
        bad_request(MISSING_DEVICE),
        id="bound-token-without-device-header",
    ),
    pytest.param(
        "/",
        [
            ("authorization", "Bearer {bound}"),
            ("x-instance-id", DEVICE),
            ("x-instance-id", DEVICE),
        ],
        bad_request(DUPLICATE_DEVICE),
        id="device-header-twice",
    ),
    pytest.param(
        "/",
        [("x-api-key", "{api_key}"), ("x-instance-id", "a"), ("x-instance-id", "b")],
        bad_request(DUPLICATE_DEVICE),
        id="device-header-twice-with-api-key",
    ),
    pytest.param(
        "/server/x",
        [("x-api-key", "{api_key}"), ("x-api-key", "{api_key}")],
        bad_request(DUPLICATE),
        id="duplicate-on-restricted-path",
    ),
    # -- A valid credential of a kind the path does not accept: 403 insufficient_scope. --
    pytest.param(
        "/server/x", [("authorization", "{mobile_api_key}")], FORBIDDEN, id="mobile-on-server"
    ),
    pytest.param(
        "/server/x", [("authorization", "Bearer {token}")], FORBIDDEN, id="token-on-server"
    ),
    pytest.param("/mobile/x", [("x-api-key", "{api_key}")], FORBIDDEN, id="api-key-on-mobile"),
    # -- A public path: the app's response, whatever the request carries. --
    pytest.param("/health", [], PUBLIC, id="public"),
    pytest.param("/health", [("authorization", "Bearer {tampered}")], PUBLIC, id="public-bad"),
    pytest.param("/health", [("x-api-key", "{api_key}")], PUBLIC, id="public-with-api-key"),
]


@pytest.mark.parametrize(("path", "headers", "outcome"), OUTCOMES)
async def test_outcome_table(
    keys: Keys,
    credentials: dict[str, str],
    app: RecordingApp,
    path: str,
    headers: list[tuple[str, str]],
    outcome: Admitted | Denied,
) -> None:
    gate = DeviceAuthMiddleware(app, config=keys.config(), rules=RULES)
    async with client(gate) as http:
        response = await http.get(
            path.format(**credentials), headers=encode_headers(headers, credentials)
        )
    assert_outcome(response, outcome, app)


# The bytes of each refusal, written out in full (the table above checks them through
# assert_denied): the request's headers, the status, the one challenge and the exact body.
EXACT_REFUSALS = [
    pytest.param(
        {},
        401,
        'Bearer realm="devicegate"',
        b'{"error":"unauthorized","error_description":"Authentication is required."}',
        id="missing",
    ),
    pytest.param(
        {"authorization": "Bearer a.b.c"},
        401,
        'Bearer realm="devicegate", error="invalid_token", '
        'error_description="The credential is invalid, expired or not valid for this device."',
        b'{"error":"invalid_token","error_description":'
        b'"The credential is invalid, expired or not valid for this device."}',
        id="invalid-token",
    ),
    pytest.param(
        {"authorization": "Bearer "},
        400,
        'Bearer realm="devicegate", error="invalid_request", '
        'error_description="The Authorization header is malformed."',
        b'{"error":"invalid_request","error_description":"The Authorization header is malformed."}',
        id="malformed",
    ),
]


@pytest.mark.parametrize(("headers", "status", "challenge", "body"), EXACT_REFUSALS)
async def test_refusal_bytes_exactly(
    keys: Keys,
    app: RecordingApp,
    headers: dict[str, str],
    status: int,
    challenge: str,
    body: bytes,
) -> None:
    async with client(DeviceAuthMiddleware(app, config=keys.config())) as http:
        response = await http.get("/", headers=headers)
    assert response.status_code == status
    assert response.headers.get_list("www-authenticate") == [challenge]
    assert response.content == body
    assert not app.ran


async def test_custom_realm(keys: Keys, app: RecordingApp) -> None:
    gate = DeviceAuthMiddleware(app, config=keys.config(), realm="api.example")
    async with client(gate) as http:
        missing = await http.get("/")
        invalid = await http.get("/", headers={"x-api-key": "not-the-key-0123456"})
    assert_denied(missing, MISSING, realm="api.example")
    assert_denied(invalid, INVALID, realm="api.example")


@pytest.mark.parametrize("realm", ["", 'a"b', "a\\b", "caf\u00e9", "line\nbreak", 42])
def test_bad_realm_is_a_config_error(keys: Keys, app: RecordingApp, realm: Any) -> None:
    with pytest.raises(ConfigError) as info:
        DeviceAuthMiddleware(app, config=keys.config(), realm=realm)
    assert info.value.field == "realm"


def test_config_must_be_a_gate_config(app: RecordingApp) -> None:
    with pytest.raises(ConfigError, match="must be a GateConfig"):
        DeviceAuthMiddleware(app, config={"api_keys": ["x"]})  # type: ignore[arg-type]


async def test_app_response_passes_through_unchanged(keys: Keys) -> None:
    async def teapot(scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 418,
                "headers": [(b"x-app", b"yes"), (b"www-authenticate", b"Custom")],
            }
        )
        await send({"type": "http.response.body", "body": b"short and stout"})

    async with client(DeviceAuthMiddleware(teapot, config=keys.config())) as http:
        response = await http.get("/", headers={"x-api-key": keys.api_key})
    assert response.status_code == 418
    assert response.headers["x-app"] == "yes"
    assert response.headers["www-authenticate"] == "Custom"
    assert response.text == "short and stout"


async def test_request_body_reaches_the_app(keys: Keys) -> None:
    received: list[bytes] = []

    async def echo(scope: Scope, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            received.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"".join(received)})

    async with client(DeviceAuthMiddleware(echo, config=keys.config())) as http:
        response = await http.post(
            "/upload", headers={"x-api-key": keys.api_key}, content=b"payload" * 1000
        )
    assert response.status_code == 200
    assert response.content == b"payload" * 1000


# -- The principal in the scope ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "kind"),
    [
        ("api_key", CredentialKind.API_KEY),
        ("mobile_api_key", CredentialKind.MOBILE_API_KEY),
        ("bound", CredentialKind.DEVICE_TOKEN),
    ],
)
async def test_principal_is_written_into_the_scope(
    keys: Keys,
    credentials: dict[str, str],
    app: RecordingApp,
    header: str,
    kind: CredentialKind,
) -> None:
    headers = {
        "api_key": {"x-api-key": credentials["api_key"]},
        "mobile_api_key": {"authorization": credentials["mobile_api_key"]},
        "bound": bearer(credentials["bound"], DEVICE),
    }[header]
    async with client(DeviceAuthMiddleware(app, config=keys.config())) as http:
        response = await http.get("/", headers=headers)
    assert response.status_code == 200
    (scope,) = app.calls
    user = scope["user"]
    assert isinstance(user, Principal)
    assert user.kind is kind
    assert user.is_authenticated
    assert isinstance(scope["auth"], AuthCredentials)
    assert scope["auth"].scopes == ["authenticated", kind.value]
    assert get_principal(scope) is user
    assert get_principal(Request(scope)) is user
    if kind is CredentialKind.DEVICE_TOKEN:
        assert user.instance_id == DEVICE
        assert user.claims["instance_id"] == DEVICE
        assert type(user.claims["exp"]) is int
    else:
        assert user.instance_id is None
        assert dict(user.claims) == {}


class _Forger:
    """An outer layer that plants a forged user and auth before devicegate runs."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope["user"] = Principal(CredentialKind.API_KEY)
            scope["auth"] = AuthCredentials(["api_key", "admin"])
        await self.app(scope, receive, send)


async def test_forged_principal_is_overwritten(keys: Keys, app: RecordingApp) -> None:
    gate = DeviceAuthMiddleware(app, config=keys.config(), rules=[Rule("/health", public=True)])
    async with client(_Forger(gate)) as http:
        mobile = await http.get("/", headers={"authorization": keys.mobile_api_key})
        public = await http.get("/health")
        denied = await http.get("/")
    assert mobile.json() == {
        "kind": "mobile_api_key",
        "instance_id": None,
        "authenticated": True,
        "scopes": ["authenticated", "mobile_api_key"],
    }
    assert public.json() == {
        "kind": None,
        "instance_id": None,
        "authenticated": False,
        "scopes": [],
    }
    assert_denied(denied, MISSING)
    assert len(app.calls) == 2
    assert isinstance(app.calls[1]["user"], UnauthenticatedUser)
    assert get_principal(app.calls[1]) is None
    assert get_principal(Request(app.calls[1])) is None


def test_get_principal_without_devicegate() -> None:
    assert get_principal(http_scope()) is None
    assert get_principal({"type": "http", "user": "admin"}) is None
    with pytest.raises(TypeError):
        get_principal(object())


# -- Scope types ------------------------------------------------------------------------------


async def test_lifespan_passes_through(keys: Keys) -> None:
    seen: list[Scope] = []

    async def lifespan_app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope)
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return

    scope = lifespan_scope()
    sent = await call_asgi(DeviceAuthMiddleware(lifespan_app, config=keys.config()), scope)
    assert sent == [{"type": "lifespan.startup.complete"}, {"type": "lifespan.shutdown.complete"}]
    assert seen == [scope]
    assert "user" not in scope
    assert "auth" not in scope


@pytest.mark.parametrize("scope_type", ["webtransport", "HTTP", "", "lifespan.startup"])
async def test_unknown_scope_type_raises_and_never_reaches_the_app(
    keys: Keys, app: RecordingApp, scope_type: str
) -> None:
    scope = http_scope(headers=[(b"x-api-key", keys.api_key.encode())])
    scope["type"] = scope_type
    with pytest.raises(RuntimeError, match="cannot authenticate ASGI scope type"):
        await call_asgi(DeviceAuthMiddleware(app, config=keys.config()), scope)
    assert not app.ran


# -- API keys: near misses and the wrong place ------------------------------------------------


@pytest.mark.parametrize("variant", [*NEAR_MISSES, "trailing-space"])
async def test_api_key_near_misses_are_invalid(keys: Keys, app: RecordingApp, variant: str) -> None:
    candidate = {**near_misses(keys.api_key), "trailing-space": keys.api_key + " "}[variant]
    assert candidate != keys.api_key
    async with client(DeviceAuthMiddleware(app, config=keys.config())) as http:
        response = await http.get("/", headers=[(b"x-api-key", candidate.encode())])
    assert_denied(response, INVALID)
    assert not app.ran


@pytest.mark.parametrize("variant", NEAR_MISSES)
async def test_mobile_key_near_misses_are_invalid(
    keys: Keys, app: RecordingApp, variant: str
) -> None:
    candidate = near_misses(keys.mobile_api_key)[variant]
    assert candidate != keys.mobile_api_key
    async with client(DeviceAuthMiddleware(app, config=keys.config())) as http:
        response = await http.get("/", headers=[(b"authorization", candidate.encode())])
    assert_denied(response, INVALID)
    assert not app.ran


# A space in Authorization changes how the value is split: a mobile key with a space around it
# is malformed (400) or offered under an unsupported scheme (401, no error code), never compared
# as a key.
@pytest.mark.parametrize(
    ("value", "denied"),
    [
        ("{mobile_api_key} ", bad_request(MALFORMED)),
        ("{mobile_api_key} x", MISSING),
        (" {mobile_api_key}", bad_request(MALFORMED)),
        ("Bearer {mobile_api_key}", INVALID),
        ("ApiKey {mobile_api_key}", MISSING),
    ],
)
async def test_mobile_key_with_extra_parts(
    keys: Keys, app: RecordingApp, value: str, denied: Denied
) -> None:
    header = value.format(mobile_api_key=keys.mobile_api_key).encode()
    async with client(DeviceAuthMiddleware(app, config=keys.config())) as http:
        response = await http.get("/", headers=[(b"authorization", header)])
    assert_denied(response, denied)
    assert not app.ran


async def test_key_of_an_unconfigured_kind_is_invalid(app: RecordingApp) -> None:
    config = GateConfig(api_keys=secrets.token_urlsafe(32))
    async with client(DeviceAuthMiddleware(app, config=config)) as http:
        mobile = await http.get("/", headers={"authorization": secrets.token_urlsafe(32)})
        token = await http.get(
            "/", headers={"authorization": f"Bearer {make_token(secrets.token_urlsafe(32))}"}
        )
    assert_denied(mobile, INVALID)
    assert_denied(token, INVALID)
    assert not app.ran


async def test_custom_api_key_header(keys: Keys, app: RecordingApp) -> None:
    config = keys.config(api_key_header="X-Server-Key")
    async with client(DeviceAuthMiddleware(app, config=config)) as http:
        custom = await http.get("/", headers={"x-server-key": keys.api_key})
        default = await http.get("/", headers={"x-api-key": keys.api_key})
    assert custom.json()["kind"] == "api_key"
    assert_denied(default, MISSING)
    assert len(app.calls) == 1


async def test_custom_device_header(keys: Keys, app: RecordingApp) -> None:
    config = keys.config(device_header="x-device")
    token = make_token(keys.jwt_secret, instance_id=DEVICE)
    async with client(DeviceAuthMiddleware(app, config=config)) as http:
        custom = await http.get(
            "/", headers={"authorization": f"Bearer {token}", "x-device": DEVICE}
        )
        default = await http.get("/", headers=bearer(token, DEVICE))
    assert custom.json()["instance_id"] == DEVICE
    assert_denied(default, bad_request(MISSING_DEVICE))
    assert len(app.calls) == 1


async def test_require_device_binding_refuses_generic_tokens(keys: Keys, app: RecordingApp) -> None:
    config = keys.config(require_device_binding=True)
    generic = make_token(keys.jwt_secret)
    bound = make_token(keys.jwt_secret, instance_id=DEVICE)
    async with client(DeviceAuthMiddleware(app, config=config)) as http:
        refused = await http.get("/", headers=bearer(generic))
        admitted = await http.get("/", headers=bearer(bound, DEVICE))
    assert_denied(refused, INVALID)
    assert admitted.json()["instance_id"] == DEVICE
    assert len(app.calls) == 1


async def test_bound_token_cached_is_still_checked_against_the_device(
    keys: Keys, app: RecordingApp
) -> None:
    token = make_token(keys.jwt_secret, instance_id=DEVICE)
    headers = bearer(token)
    async with client(DeviceAuthMiddleware(app, config=keys.config())) as http:
        first = await http.get("/", headers={**headers, "x-instance-id": DEVICE})
        other = await http.get("/", headers={**headers, "x-instance-id": "device-2"})
        missing = await http.get("/", headers=headers)
        again = await http.get("/", headers={**headers, "x-instance-id": DEVICE})
    assert first.status_code == 200
    assert_denied(other, INVALID)
    assert_denied(missing, bad_request(MISSING_DEVICE))
    assert again.status_code == 200
    assert len(app.calls) == 2


# -- on_error ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "error_type", "status", "code", "description"),
    [
        pytest.param([], MissingCredentials, 401, None, AUTH_REQUIRED, id="missing"),
        pytest.param(
            [("x-api-key", "wrong-key-0123456789")],
            InvalidToken,
            401,
            "invalid_token",
            INVALID_CREDENTIAL,
            id="invalid",
        ),
        pytest.param(
            [("authorization", "Bearer a b")],
            InvalidRequest,
            400,
            "invalid_request",
            MALFORMED,
            id="malformed",
        ),
        pytest.param(
            [("authorization", "{mobile_api_key}")],
            InsufficientScope,
            403,
            "insufficient_scope",
            NOT_ACCEPTED,
            id="insufficient-scope",
        ),
    ],
)
async def test_on_error_renders_the_error(
    keys: Keys,
    credentials: dict[str, str],
    app: RecordingApp,
    headers: list[tuple[str, str]],
    error_type: type[AuthError],
    status: int,
    code: str | None,
    description: str,
) -> None:
    seen: list[tuple[Scope, AuthError]] = []

    def on_error(scope: Scope, error: AuthError) -> ASGIApp:
        seen.append((scope, error))
        return PlainTextResponse(
            f"custom {error.status_code} {error.error}", status_code=error.status_code
        )

    gate = DeviceAuthMiddleware(
        app,
        config=keys.config(),
        rules=[Rule("/server", accept=[CredentialKind.API_KEY])],
        on_error=on_error,
    )
    async with client(gate) as http:
        response = await http.get("/server", headers=encode_headers(headers, credentials))
    assert response.status_code == status
    assert response.text == f"custom {status} {code}"
    assert "www-authenticate" not in response.headers
    assert not app.ran
    ((scope, error),) = seen
    assert scope["path"] == "/server"
    assert type(error) is error_type
    assert error.status_code == status
    assert error.error == code
    assert error.description == description


async def test_on_error_sees_the_reason_of_an_invalid_token(
    keys: Keys, credentials: dict[str, str], app: RecordingApp
) -> None:
    reasons: list[InvalidReason] = []

    def on_error(scope: Scope, error: AuthError) -> ASGIApp:
        assert isinstance(error, InvalidToken)
        reasons.append(error.reason)
        return PlainTextResponse("no", status_code=error.status_code)

    gate = DeviceAuthMiddleware(app, config=keys.config(), on_error=on_error)
    async with client(gate) as http:
        for name in ("expired", "tampered", "other_secret", "alg_none", "alg_hs512", "string_exp"):
            response = await http.get("/", headers={"authorization": f"Bearer {credentials[name]}"})
            assert response.status_code == 401
    assert reasons == [
        InvalidReason.EXPIRED,
        InvalidReason.BAD_SIGNATURE,
        InvalidReason.BAD_SIGNATURE,
        InvalidReason.MALFORMED,
        InvalidReason.UNSUPPORTED_ALGORITHM,
        InvalidReason.BAD_CLAIMS,
    ]
    assert not app.ran


async def test_on_error_that_raises_falls_back_to_the_default_response(
    keys: Keys, app: RecordingApp, caplog: pytest.LogCaptureFixture
) -> None:
    def on_error(scope: Scope, error: AuthError) -> ASGIApp:
        raise ZeroDivisionError(keys.api_key)

    gate = DeviceAuthMiddleware(app, config=keys.config(), on_error=on_error)
    with caplog.at_level(logging.INFO, logger="devicegate"):
        async with client(gate) as http:
            missing = await http.get("/")
            invalid = await http.get("/", headers={"x-api-key": "wrong-key-0123456789"})
    assert_denied(missing, MISSING)
    assert_denied(invalid, INVALID)
    assert not app.ran
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == ["devicegate on_error handler raised ZeroDivisionError"] * 2
    assert all(keys.api_key not in r.getMessage() for r in caplog.records)


async def test_on_error_response_that_raises_before_sending_falls_back(
    keys: Keys, app: RecordingApp, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken_response(scope: Scope, receive: Receive, send: Send) -> None:
        raise ZeroDivisionError(keys.api_key)

    gate = DeviceAuthMiddleware(app, config=keys.config(), on_error=lambda s, e: broken_response)
    with caplog.at_level(logging.INFO, logger="devicegate"):
        async with client(gate) as http:
            missing = await http.get("/")
    assert_denied(missing, MISSING)
    assert not app.ran
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == ["devicegate on_error response raised ZeroDivisionError"]
    assert all(keys.api_key not in r.getMessage() for r in caplog.records)


async def test_on_error_response_that_sends_nothing_falls_back(
    keys: Keys, app: RecordingApp, caplog: pytest.LogCaptureFixture
) -> None:
    async def silent_response(scope: Scope, receive: Receive, send: Send) -> None:
        return None

    gate = DeviceAuthMiddleware(app, config=keys.config(), on_error=lambda s, e: silent_response)
    with caplog.at_level(logging.INFO, logger="devicegate"):
        async with client(gate) as http:
            missing = await http.get("/")
    assert_denied(missing, MISSING)
    assert not app.ran
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == ["devicegate on_error response sent nothing"]


def test_settings_are_read_only(keys: Keys, app: RecordingApp) -> None:
    # The keys and rules are compiled at construction: rebinding them later would change what
    # the attributes claim but not what the middleware does.
    gate = DeviceAuthMiddleware(app, config=keys.config(), rules=[Rule("/health", public=True)])
    for name, value in (("config", keys.config()), ("rules", ()), ("token_path", None)):
        with pytest.raises(AttributeError):
            setattr(gate, name, value)
    assert gate.rules == (Rule("/health", public=True),)
    assert gate.token_path == "/gen-jwt"
    assert (
        DeviceAuthMiddleware(app, config=GateConfig(jwt_secret=keys.jwt_secret)).token_path is None
    )


async def test_on_error_response_that_raises_after_starting_propagates(
    keys: Keys, app: RecordingApp
) -> None:
    # Once the status line went out nothing else can be sent: the server must see the failure.
    async def half_response(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 401, "headers": []})
        raise ZeroDivisionError

    gate = DeviceAuthMiddleware(app, config=keys.config(), on_error=lambda s, e: half_response)
    with pytest.raises(ZeroDivisionError):
        await call_asgi(gate, http_scope("/"))
    assert not app.ran


# -- The token path ---------------------------------------------------------------------------
#
# Who may mint, and that no rule opens the token path: tests/test_endpoint.py.


async def test_token_path_mints_with_the_api_key_and_never_reaches_the_app(
    keys: Keys, app: RecordingApp
) -> None:
    config = keys.config()
    async with client(DeviceAuthMiddleware(app, config=config)) as http:
        response = await http.post(
            "/gen-jwt", headers={"x-api-key": keys.api_key}, json={"instance_id": DEVICE}
        )
        token = response.json()["access_token"]
        used = await http.get("/", headers=bearer(token, DEVICE))
    assert response.status_code == 200
    assert response.json()["instance_id"] == DEVICE
    assert used.json()["instance_id"] == DEVICE
    assert len(app.calls) == 1
    assert app.calls[0]["path"] == "/"


async def test_custom_token_path(keys: Keys, app: RecordingApp) -> None:
    gate = DeviceAuthMiddleware(app, config=keys.config(), token_path="/auth/token")
    async with client(gate) as http:
        minted = await http.post("/auth/token", headers={"x-api-key": keys.api_key})
        default = await http.post("/gen-jwt", headers={"x-api-key": keys.api_key})
    assert minted.status_code == 200
    assert minted.json()["token_type"] == "Bearer"
    assert default.json()["kind"] == "api_key"
    assert [scope["path"] for scope in app.calls] == ["/gen-jwt"]


async def test_token_path_none_leaves_the_path_to_the_app(keys: Keys, app: RecordingApp) -> None:
    gate = DeviceAuthMiddleware(app, config=keys.config(), token_path=None)
    async with client(gate) as http:
        response = await http.post("/gen-jwt", headers={"authorization": keys.mobile_api_key})
    assert response.json()["kind"] == "mobile_api_key"
    assert app.ran


async def test_token_path_similar_paths_reach_the_app(keys: Keys, app: RecordingApp) -> None:
    async with client(DeviceAuthMiddleware(app, config=keys.config())) as http:
        for path in ("/gen-jwt/", "/gen-jwtx", "/gen-jwt/x", "/GEN-JWT"):
            response = await http.post(path, headers={"x-api-key": keys.api_key})
            assert response.json()["kind"] == "api_key", path
    assert [scope["path"] for scope in app.calls] == [
        "/gen-jwt/",
        "/gen-jwtx",
        "/gen-jwt/x",
        "/GEN-JWT",
    ]


@pytest.mark.parametrize(
    "config_kind",
    ["no-jwt-secret", "no-api-key"],
)
async def test_token_path_disabled_without_api_key_and_jwt_secret(
    app: RecordingApp, config_kind: str
) -> None:
    api_key = secrets.token_urlsafe(32)
    jwt_secret = secrets.token_urlsafe(32)
    mobile_key = secrets.token_urlsafe(32)
    if config_kind == "no-jwt-secret":
        config = GateConfig(api_keys=api_key, mobile_api_keys=mobile_key)
        headers = {"x-api-key": api_key}
        kind = "api_key"
    else:
        config = GateConfig(jwt_secret=jwt_secret, mobile_api_keys=mobile_key)
        headers = {"authorization": mobile_key}
        kind = "mobile_api_key"
    async with client(DeviceAuthMiddleware(app, config=config)) as http:
        response = await http.post("/gen-jwt", headers=headers, json={"instance_id": DEVICE})
        missing = await http.post("/gen-jwt")
    assert response.status_code == 200
    assert response.json()["kind"] == kind
    assert "access_token" not in response.json()
    assert_denied(missing, MISSING)
    assert len(app.calls) == 1


@pytest.mark.parametrize("token_path", ["gen-jwt", "", "/a/../gen-jwt", "//gen-jwt", "/./x"])
def test_bad_token_path_is_a_config_error(keys: Keys, app: RecordingApp, token_path: str) -> None:
    with pytest.raises(ConfigError) as info:
        DeviceAuthMiddleware(app, config=keys.config(), token_path=token_path)
    assert info.value.field == "token_path"


async def test_token_path_under_root_path(keys: Keys, app: RecordingApp) -> None:
    gate = DeviceAuthMiddleware(app, config=keys.config())
    scope = http_scope(
        "/api/gen-jwt", [(b"x-api-key", keys.api_key.encode())], method="POST", root_path="/api"
    )
    sent = await call_asgi(gate, scope)
    assert sent[0]["status"] == 200
    assert json.loads(sent[1]["body"])["token_type"] == "Bearer"
    assert not app.ran


# -- Remembered routes ------------------------------------------------------------------------

SERVER_ONLY = (Rule("/server/*", accept={CredentialKind.API_KEY}),)


async def _status(gate: ASGIApp, path: str, headers: Sequence[Any], root_path: str = "") -> int:
    sent = await call_asgi(gate, http_scope(path, headers, root_path=root_path))
    status: int = sent[0]["status"]
    return status


async def test_remembered_routes_stay_bounded_and_keep_deciding(
    keys: Keys, app: RecordingApp
) -> None:
    # The middleware remembers what each path decided. Endless distinct paths (ids in paths,
    # or a client probing) must neither grow it without bound nor blur the rules.
    gate = DeviceAuthMiddleware(app, config=keys.config(), rules=SERVER_ONLY)
    mobile = [(b"authorization", keys.mobile_api_key.encode())]
    for index in range(3000):
        assert await _status(gate, f"/items/{index}", mobile) == 200
    assert 0 < len(gate._gate.routes) <= 1024
    long_path = "/items/" + "x" * 600
    assert await _status(gate, long_path, mobile) == 200
    assert long_path not in gate._gate.routes
    for _ in range(2):  # the second time from memory
        assert await _status(gate, "/server/x", mobile) == 403
    assert await _status(gate, "/server/x", [(b"x-api-key", keys.api_key.encode())]) == 200


async def test_an_unsafe_path_is_refused_every_time(keys: Keys, app: RecordingApp) -> None:
    gate = DeviceAuthMiddleware(app, config=keys.config())
    for _ in range(3):
        assert await _status(gate, "/public/../x", [(b"x-api-key", keys.api_key.encode())]) == 400
    assert not app.ran
    assert "/public/../x" not in gate._gate.routes


async def test_the_same_path_under_another_mount_point_is_decided_again(
    keys: Keys, app: RecordingApp
) -> None:
    # "/api/server/x" is "/server/x" to an app mounted at "/api", and itself to one at "/".
    gate = DeviceAuthMiddleware(app, config=keys.config(), rules=SERVER_ONLY)
    mobile = [(b"authorization", keys.mobile_api_key.encode())]
    for _ in range(2):
        assert await _status(gate, "/api/server/x", mobile, root_path="/api") == 403
        assert await _status(gate, "/api/server/x", mobile) == 200


# -- Fail closed ------------------------------------------------------------------------------


def _without(scope: Scope, key: str) -> Scope:
    return {name: value for name, value in scope.items() if name != key}


@pytest.mark.parametrize(
    "mangle",
    [
        pytest.param(lambda scope: _without(scope, "headers"), id="headers-missing"),
        pytest.param(lambda scope: {**scope, "headers": None}, id="headers-none"),
        pytest.param(lambda scope: {**scope, "headers": [(b"x-api-key",)]}, id="header-1-tuple"),
        pytest.param(lambda scope: {**scope, "headers": [(b"a", b"b", b"c")]}, id="header-3-tuple"),
        pytest.param(lambda scope: {**scope, "headers": 42}, id="headers-int"),
        pytest.param(lambda scope: _without(scope, "path"), id="path-missing"),
        pytest.param(lambda scope: {**scope, "path": b"/"}, id="path-bytes"),
        pytest.param(lambda scope: {**scope, "path": None}, id="path-none"),
    ],
)
async def test_malformed_scope_is_refused_with_400(
    keys: Keys,
    app: RecordingApp,
    caplog: pytest.LogCaptureFixture,
    mangle: Any,
) -> None:
    scope = mangle(http_scope("/", [(b"x-api-key", keys.api_key.encode())]))
    with caplog.at_level(logging.INFO, logger="devicegate"):
        sent = await call_asgi(DeviceAuthMiddleware(app, config=keys.config()), scope)
    assert not app.ran
    assert [message["type"] for message in sent] == ["http.response.start", "http.response.body"]
    assert sent[0]["status"] == 400
    assert json.loads(sent[1]["body"]) == {
        "error": "invalid_request",
        "error_description": UNREADABLE,
    }
    assert any(
        record.levelno == logging.ERROR and "could not read" in record.getMessage()
        for record in caplog.records
    )


async def test_malformed_scope_on_error_handler_is_used(keys: Keys, app: RecordingApp) -> None:
    errors: list[AuthError] = []

    def on_error(scope: Scope, error: AuthError) -> ASGIApp:
        errors.append(error)
        return PlainTextResponse("refused", status_code=error.status_code)

    gate = DeviceAuthMiddleware(app, config=keys.config(), on_error=on_error)
    sent = await call_asgi(gate, _without(http_scope("/"), "headers"))
    assert sent[0]["status"] == 400
    assert [type(error) for error in errors] == [InvalidRequest]
    assert not app.ran


# -- Nothing echoed, nothing logged -----------------------------------------------------------

MARKER = "zq9marker"


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        ("/", [("authorization", f"Bearer {MARKER}.{MARKER}.{MARKER}")]),
        ("/", [("authorization", f"{MARKER}-0123456789abcdef")]),
        ("/", [("authorization", f"{MARKER} {MARKER}")]),
        ("/", [("authorization", f"Bearer {MARKER} x")]),
        ("/", [("x-api-key", f"{MARKER}\r\nx-injected: 1")]),
        ("/", [("x-api-key", MARKER), ("x-api-key", MARKER)]),
        ("/", [("x-api-key", MARKER), ("authorization", MARKER)]),
        (f"/{MARKER}/../x", [("x-api-key", MARKER)]),
        (f"/?{MARKER}=1", [("x-instance-id", MARKER)]),
        (f"/server/{MARKER}", [("authorization", "{mobile_api_key}")]),
        ("/", [("authorization", "Bearer {bound}"), ("x-instance-id", MARKER)]),
    ],
)
async def test_nothing_from_the_request_is_echoed(
    keys: Keys,
    credentials: dict[str, str],
    app: RecordingApp,
    path: str,
    headers: list[tuple[str, str]],
) -> None:
    gate = DeviceAuthMiddleware(app, config=keys.config(), rules=RULES)
    scope = http_scope(path.split("?")[0], encode_headers(headers, credentials))
    scope["query_string"] = path.partition("?")[2].encode()
    sent = await call_asgi(gate, scope)
    assert not app.ran
    assert sent[0]["status"] in {400, 401, 403}
    sent_bytes = b"".join(
        [name + b":" + value for name, value in sent[0]["headers"]] + [sent[1]["body"]]
    )
    assert MARKER.encode() not in sent_bytes
    assert b"\r" not in sent_bytes
    assert b"\n" not in sent_bytes
    for secret in (keys.api_key, keys.mobile_api_key, credentials["bound"]):
        assert secret.encode() not in sent_bytes


async def test_logs_never_contain_credentials(
    keys: Keys,
    credentials: dict[str, str],
    app: RecordingApp,
    caplog: pytest.LogCaptureFixture,
) -> None:
    gate = DeviceAuthMiddleware(app, config=keys.config(), rules=RULES)
    requests: list[list[tuple[str, str]]] = [
        [("x-api-key", "{api_key}")],
        [("x-api-key", "{api_key}A")],
        [("authorization", "{mobile_api_key}")],
        [("authorization", "{mobile_api_key}A")],
        [("authorization", "Bearer {token}")],
        [("authorization", "Bearer {tampered}")],
        [("authorization", "Bearer {expired}")],
        [("authorization", "Bearer {bound}"), ("x-instance-id", "device-2")],
        [("authorization", "Bearer {bound}")],
        [("x-api-key", "{api_key}"), ("authorization", "Bearer {token}")],
        [("authorization", "Basic {api_key}")],
    ]
    with caplog.at_level(logging.DEBUG):
        async with client(gate) as http:
            for headers in requests:
                await http.get("/server/x", headers=encode_headers(headers, credentials))
            await http.post("/gen-jwt", headers={"x-api-key": keys.api_key})
        await call_asgi(gate, _without(http_scope("/", [(b"x-api-key", b"x")]), "headers"))
    records = [record for record in caplog.records if record.name.startswith("devicegate")]
    # Refusals are logged (so this test looks at real log lines), with the reason only.
    assert any("refused" in record.getMessage() for record in records)
    assert any("expired" in record.getMessage() for record in records)
    secret_values = [keys.api_key, keys.mobile_api_key, keys.jwt_secret]
    secret_values += [credentials[name] for name in ("token", "tampered", "expired", "bound")]
    secret_values += [value.split(".")[2] for value in (credentials["token"],)]
    for record in records:
        text = record.getMessage() + (record.exc_text or "") + repr(record.args)
        for secret in secret_values:
            assert secret not in text
        assert record.exc_info is None


def test_repr_hides_secrets(keys: Keys, app: RecordingApp) -> None:
    gate = DeviceAuthMiddleware(app, config=keys.config(), rules=RULES)
    text = repr(gate)
    assert "DeviceAuthMiddleware(" in text
    for secret in (keys.api_key, keys.mobile_api_key, keys.jwt_secret):
        assert secret not in text
