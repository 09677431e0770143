"""TokenEndpoint, mounted alone and served by DeviceAuthMiddleware at its token path."""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Sequence
from typing import Any

import httpx
import jwt
import pytest
from starlette.applications import Starlette
from starlette.routing import Route
from starlette.types import ASGIApp, Message

from devicegate import (
    ConfigError,
    CredentialKind,
    DeviceAuthMiddleware,
    GateConfig,
    InvalidReason,
    InvalidToken,
    Rule,
    TokenEndpoint,
    TokenVerifier,
)
from devicegate._keys import derive_kid
from tests.helpers import (
    DUPLICATE,
    FORBIDDEN,
    INVALID,
    INVALID_INSTANCE_IDS,
    MISSING,
    SEVERAL,
    UNREADABLE,
    Denied,
    Keys,
    RecordingApp,
    assert_denied,
    bad_request,
    bearer,
    call_asgi,
    client,
    http_scope,
    lifespan_scope,
    make_token,
    message_types,
    ws_scope,
)

pytestmark = pytest.mark.anyio

DEVICE = "device-1"
PATH = "/gen-jwt"
MAX_BODY = 4096

NOT_OBJECT = {
    "error": "invalid_request",
    "error_description": "The body must be empty or a JSON object.",
}
BAD_INSTANCE_ID = {
    "error": "invalid_request",
    "error_description": (
        "instance_id must be a string of 1 to 256 printable ASCII characters without "
        "surrounding spaces."
    ),
}
UNKNOWN_MEMBER = {
    "error": "invalid_request",
    "error_description": (
        "The body may hold only instance_id, sub, claims, expires_in and dpop_jkt."
    ),
}
BINDING_REQUIRED = {
    "error": "invalid_request",
    "error_description": "This server only mints device-bound tokens.",
}
TOO_LARGE = {
    "error": "invalid_request",
    "error_description": "The request body is larger than 4096 bytes.",
}
USE_POST = {"error": "invalid_request", "error_description": "Use POST."}


# Rules that try to open the token path to everyone, or to the mobile key and device tokens:
# they cannot, the token path takes the server API key and nothing else.
OPENING_RULES = (
    Rule(PATH, public=True),
    Rule("/*", accept=[CredentialKind.MOBILE_API_KEY, CredentialKind.DEVICE_TOKEN]),
)


@pytest.fixture(params=["standalone", "middleware", "middleware-with-opening-rules"])
def mount(request: pytest.FixtureRequest) -> str:
    """Where the endpoint runs: mounted alone, or at the middleware's token path (with no
    rules, or with :data:`OPENING_RULES`)."""
    return str(request.param)


def build(mount: str, config: GateConfig, app: RecordingApp) -> ASGIApp:
    if mount == "standalone":
        return TokenEndpoint(config)
    rules = OPENING_RULES if mount == "middleware-with-opening-rules" else ()
    return DeviceAuthMiddleware(app, config=config, rules=rules)


async def mint(
    endpoint: ASGIApp,
    api_key: str,
    *,
    content: bytes | None = None,
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    all_headers = {"x-api-key": api_key, **(headers or {})}
    async with client(endpoint) as http:
        if content is not None:
            return await http.post(PATH, headers=all_headers, content=content)
        if body is not None:
            return await http.post(PATH, headers=all_headers, json=body)
        return await http.post(PATH, headers=all_headers)


def assert_token_response(
    response: httpx.Response, instance_id: str | None, expires_in: int = 300
) -> str:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    # RFC 6749 §5.1: token responses must not be cached.
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["pragma"] == "no-cache"
    assert response.headers["content-length"] == str(len(response.content))
    body = response.json()
    assert set(body) == {"access_token", "token_type", "expires_in", "instance_id"}
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == expires_in
    assert body["instance_id"] == instance_id
    token: str = body["access_token"]
    return token


def assert_refused(response: httpx.Response, status: int, body: dict[str, str]) -> None:
    assert response.status_code == status
    assert response.json() == body
    assert response.headers["content-type"] == "application/json"
    assert response.headers["cache-control"] == "no-store"
    assert "access_token" not in response.text


# -- Minting ----------------------------------------------------------------------------------


async def test_bound_token(keys: Keys, app: RecordingApp, mount: str) -> None:
    config = keys.config()
    response = await mint(build(mount, config, app), keys.api_key, body={"instance_id": DEVICE})
    token = assert_token_response(response, DEVICE)
    assert not app.ran

    header = jwt.get_unverified_header(token)
    assert header == {"alg": "HS256", "kid": derive_kid(keys.jwt_secret.encode()), "typ": "JWT"}
    claims = jwt.decode(token, keys.jwt_secret, algorithms=["HS256"])
    assert set(claims) == {"iat", "exp", "jti", "instance_id"}
    assert claims["instance_id"] == DEVICE
    assert claims["exp"] - claims["iat"] == 300
    assert isinstance(claims["jti"], str)
    assert len(claims["jti"]) >= 22  # 128 random bits, base64url

    verifier = TokenVerifier(config)
    principal = verifier.verify(token, DEVICE.encode())
    assert principal.kind is CredentialKind.DEVICE_TOKEN
    assert principal.instance_id == DEVICE
    with pytest.raises(InvalidToken) as info:
        verifier.verify(token, b"device-2")
    assert info.value.reason is InvalidReason.WRONG_DEVICE


async def test_minted_token_opens_the_app_on_its_device_only(keys: Keys, app: RecordingApp) -> None:
    gate = DeviceAuthMiddleware(app, config=keys.config())
    async with client(gate) as http:
        minted = await http.post(
            PATH, headers={"x-api-key": keys.api_key}, json={"instance_id": DEVICE}
        )
        token = assert_token_response(minted, DEVICE)
        own = await http.get("/", headers=bearer(token, DEVICE))
        other = await http.get("/", headers=bearer(token, "device-2"))
    assert own.json()["instance_id"] == DEVICE
    assert other.status_code == 401
    assert len(app.calls) == 1


@pytest.mark.parametrize("content", [b"", b"{}", b" {} ", b"{}\n"])
async def test_generic_token(keys: Keys, app: RecordingApp, mount: str, content: bytes) -> None:
    config = keys.config()
    response = await mint(build(mount, config, app), keys.api_key, content=content)
    token = assert_token_response(response, None)
    claims = jwt.decode(token, keys.jwt_secret, algorithms=["HS256"])
    assert set(claims) == {"iat", "exp", "jti"}
    # A generic token is valid on any device, or with no device header at all.
    verifier = TokenVerifier(config)
    assert verifier.verify(token).instance_id is None
    assert verifier.verify(token, b"any-device").instance_id is None


async def test_no_body_at_all_mints_a_generic_token(keys: Keys) -> None:
    response = await mint(TokenEndpoint(keys.config()), keys.api_key)
    assert_token_response(response, None)


async def test_lifetime_issuer_and_audience_come_from_the_configuration(keys: Keys) -> None:
    config = keys.config(jwt_expire_seconds=120, issuer="https://gate", audience="api")
    response = await mint(TokenEndpoint(config), keys.api_key, body={"instance_id": DEVICE})
    assert response.status_code == 200
    assert response.json()["expires_in"] == 120
    claims = jwt.decode(
        response.json()["access_token"],
        keys.jwt_secret,
        algorithms=["HS256"],
        audience="api",
        issuer="https://gate",
    )
    assert claims["exp"] - claims["iat"] == 120
    assert claims["iss"] == "https://gate"
    assert claims["aud"] == "api"


async def test_every_token_has_its_own_jti(keys: Keys) -> None:
    endpoint = TokenEndpoint(keys.config())
    tokens = [
        (await mint(endpoint, keys.api_key, body={"instance_id": DEVICE})).json()["access_token"]
        for _ in range(5)
    ]
    jtis = {jwt.decode(t, keys.jwt_secret, algorithms=["HS256"])["jti"] for t in tokens}
    assert len(jtis) == 5


@pytest.mark.parametrize("instance_id", ["a", "A" * 256, "a b", "~!@#$%^&*()_+{}|:<>?", "0"])
async def test_instance_id_edge_values_are_accepted(keys: Keys, instance_id: str) -> None:
    response = await mint(
        TokenEndpoint(keys.config()), keys.api_key, body={"instance_id": instance_id}
    )
    token = assert_token_response(response, instance_id)
    assert jwt.decode(token, keys.jwt_secret, algorithms=["HS256"])["instance_id"] == instance_id


async def test_require_device_binding(keys: Keys, app: RecordingApp, mount: str) -> None:
    endpoint = build(mount, keys.config(require_device_binding=True), app)
    for content in (b"", b"{}", b'{"sub": "user-1"}'):
        response = await mint(endpoint, keys.api_key, content=content)
        assert_refused(response, 400, BINDING_REQUIRED)
    bound = await mint(endpoint, keys.api_key, body={"instance_id": DEVICE})
    assert_token_response(bound, DEVICE)
    assert not app.ran


# -- Methods ----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"])
async def test_other_methods_are_405(
    keys: Keys, app: RecordingApp, mount: str, method: str
) -> None:
    async with client(build(mount, keys.config(), app)) as http:
        response = await http.request(
            method, PATH, headers={"x-api-key": keys.api_key}, content=b'{"instance_id":"d"}'
        )
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"
    assert response.json() == USE_POST
    assert response.headers["cache-control"] == "no-store"
    assert not app.ran


async def test_head_is_405(keys: Keys, app: RecordingApp, mount: str) -> None:
    async with client(build(mount, keys.config(), app)) as http:
        response = await http.head(PATH, headers={"x-api-key": keys.api_key})
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"
    assert not app.ran


async def test_other_methods_without_the_api_key_are_refused_first(
    keys: Keys, app: RecordingApp, mount: str
) -> None:
    async with client(build(mount, keys.config(), app)) as http:
        response = await http.get(PATH, headers={"authorization": keys.mobile_api_key})
    assert response.status_code == 403
    assert "allow" not in response.headers
    assert not app.ran


# -- Bad bodies -------------------------------------------------------------------------------

NOT_AN_OBJECT = [
    pytest.param(b"not json", id="not-json"),
    pytest.param(b"[]", id="array"),
    pytest.param(b'[{"instance_id": "d"}]', id="array-of-object"),
    pytest.param(b'"device-1"', id="string"),
    pytest.param(b"42", id="number"),
    pytest.param(b"null", id="null"),
    pytest.param(b"true", id="true"),
    pytest.param(b"NaN", id="nan"),
    pytest.param(b"{", id="truncated"),
    pytest.param(b'{"instance_id": "d"} x', id="trailing-garbage"),
    pytest.param(b'{"instance_id": "d"}{}', id="two-objects"),
    pytest.param(b"{'instance_id': 'd'}", id="single-quotes"),
    pytest.param(b'{"instance_id": "d",}', id="trailing-comma"),
    pytest.param(b"\xef\xbb\xbf{}", id="utf8-bom"),
    pytest.param(b'{"instance_id": "\xff"}', id="not-utf8"),
    pytest.param('{"instance_id": "d"}'.encode("utf-16"), id="utf16"),
    pytest.param(b"\x00", id="nul"),
    pytest.param(b"[" * 4000, id="deeply-nested-array"),
    pytest.param(b'{"a":' + b"[" * 4000, id="object-holding-deep-nesting"),
    # RFC 7159 leaves duplicate names to the parser: refused, so that no other reader of the
    # same body can pick a different instance_id.
    pytest.param(b'{"instance_id": "a", "instance_id": "b"}', id="duplicate-instance-id"),
    pytest.param(b'{"instance_id": "a", "x": 1, "x": 2}', id="duplicate-other-member"),
]


@pytest.mark.parametrize("content", NOT_AN_OBJECT)
async def test_body_that_is_not_a_json_object_is_400(
    keys: Keys, app: RecordingApp, mount: str, content: bytes
) -> None:
    response = await mint(build(mount, keys.config(), app), keys.api_key, content=content)
    assert_refused(response, 400, NOT_OBJECT)
    assert not app.ran


@pytest.mark.parametrize("instance_id", [*INVALID_INSTANCE_IDS, pytest.param(None, id="null")])
async def test_bad_instance_id_is_400(
    keys: Keys, app: RecordingApp, mount: str, instance_id: object
) -> None:
    response = await mint(
        build(mount, keys.config(), app), keys.api_key, body={"instance_id": instance_id}
    )
    assert_refused(response, 400, BAD_INSTANCE_ID)
    assert not app.ran


# -- Body size --------------------------------------------------------------------------------


def padded(size: int) -> bytes:
    body = json.dumps({"instance_id": DEVICE}).encode()
    return body + b" " * (size - len(body))


async def test_body_of_exactly_4_kib_is_accepted(keys: Keys) -> None:
    response = await mint(TokenEndpoint(keys.config()), keys.api_key, content=padded(MAX_BODY))
    assert_token_response(response, DEVICE)


async def test_body_over_4_kib_by_content_length_is_413(
    keys: Keys, app: RecordingApp, mount: str
) -> None:
    content = padded(MAX_BODY + 1)
    response = await mint(build(mount, keys.config(), app), keys.api_key, content=content)
    assert_refused(response, 413, TOO_LARGE)
    assert not app.ran


class ChunkedBody(httpx.AsyncByteStream):
    """A request body sent in chunks without Content-Length.

    A plain iterator rather than an async generator: the endpoint stops reading at the limit,
    and an unfinished async generator would be finalised later with a ResourceWarning.
    """

    def __init__(self, chunks: Sequence[bytes]) -> None:
        self._chunks = list(chunks)

    def __aiter__(self) -> ChunkedBody:
        return self

    async def __anext__(self) -> bytes:
        if not self._chunks:
            raise StopAsyncIteration
        return self._chunks.pop(0)


def chunked_request(api_key: str, chunks: Sequence[bytes]) -> httpx.Request:
    return httpx.Request(
        "POST",
        f"http://testserver{PATH}",
        headers={"x-api-key": api_key, "transfer-encoding": "chunked"},
        stream=ChunkedBody(chunks),
    )


async def test_body_over_4_kib_in_streamed_chunks_is_413(
    keys: Keys, app: RecordingApp, mount: str
) -> None:
    chunks = [b'{"instance_id": "device-1", "pad": "', *[b"x" * 1024] * 5, b'"}']
    async with client(build(mount, keys.config(), app)) as http:
        response = await http.send(chunked_request(keys.api_key, chunks))
    assert "content-length" not in response.request.headers
    assert_refused(response, 413, TOO_LARGE)
    assert not app.ran


async def test_small_body_in_streamed_chunks_is_accepted(keys: Keys) -> None:
    chunks = [b'{"instance', b'_id": "dev', b"ice-1", b'"}']
    async with client(TokenEndpoint(keys.config())) as http:
        response = await http.send(chunked_request(keys.api_key, chunks))
    assert_token_response(response, DEVICE)


def as_chunks(body: bytes, size: int) -> list[Message]:
    parts = [body[i : i + size] for i in range(0, len(body), size)] or [b""]
    return [
        {"type": "http.request", "body": part, "more_body": i < len(parts) - 1}
        for i, part in enumerate(parts)
    ]


@pytest.mark.parametrize("declared", [b"10", b"0", b"-1", b"abc", b""])
async def test_body_larger_than_its_content_length_is_413(
    keys: Keys, app: RecordingApp, mount: str, declared: bytes
) -> None:
    # A server that does not enforce Content-Length: the endpoint counts what it receives.
    headers = [(b"x-api-key", keys.api_key.encode()), (b"content-length", declared)]
    scope = http_scope(PATH, headers, method="POST")
    sent = await call_asgi(build(mount, keys.config(), app), scope, as_chunks(padded(5000), 700))
    assert sent[0]["status"] == 413
    assert json.loads(sent[1]["body"]) == TOO_LARGE
    assert not app.ran


async def test_unparsable_content_length_with_a_small_body_is_fine(keys: Keys) -> None:
    headers = [(b"x-api-key", keys.api_key.encode()), (b"content-length", b"abc")]
    body = json.dumps({"instance_id": DEVICE}).encode()
    sent = await call_asgi(
        TokenEndpoint(keys.config()), http_scope(PATH, headers, method="POST"), as_chunks(body, 5)
    )
    assert sent[0]["status"] == 200
    assert json.loads(sent[1]["body"])["instance_id"] == DEVICE


@pytest.mark.parametrize(
    "received",
    [
        pytest.param([{"type": "http.disconnect"}], id="before-any-body"),
        pytest.param(
            [
                {"type": "http.request", "body": b'{"instance', "more_body": True},
                {"type": "http.disconnect"},
            ],
            id="mid-body",
        ),
        pytest.param(
            [
                {"type": "http.request", "body": b"", "more_body": True},
                {"type": "http.request", "body": b"{", "more_body": True},
                {"type": "http.disconnect"},
            ],
            id="after-empty-chunk",
        ),
    ],
)
async def test_client_disconnect_sends_nothing(
    keys: Keys, app: RecordingApp, mount: str, received: list[Message]
) -> None:
    scope = http_scope(PATH, [(b"x-api-key", keys.api_key.encode())], method="POST")
    sent = await call_asgi(build(mount, keys.config(), app), scope, received)
    assert sent == []
    assert not app.ran


# -- Claims the client tries to choose --------------------------------------------------------


# Each member a caller might try to choose what the server alone decides: refused outright (an
# unknown member is never silently ignored), so nothing is minted.
CHOSEN_MEMBERS = {
    "exp": 9_999_999_999,
    "iat": 0,
    "nbf": 0,
    "alg": "none",
    "typ": "none",
    "kid": "../../dev/null",
    "jku": "https://evil.example/jwks.json",
    "iss": "evil",
    "aud": "evil",
    "jti": "chosen",
    "scope": "admin",
    "token_type": "mac",
    "header": {"alg": "none"},
}


@pytest.mark.parametrize(("member", "value"), list(CHOSEN_MEMBERS.items()))
async def test_client_cannot_choose_claims_or_header(keys: Keys, member: str, value: Any) -> None:
    attempt = {"instance_id": DEVICE, member: value}
    response = await mint(TokenEndpoint(keys.config()), keys.api_key, body=attempt)
    assert_refused(response, 400, UNKNOWN_MEMBER)


async def test_what_a_client_may_choose_stays_within_bounds(keys: Keys) -> None:
    attempt = {"instance_id": DEVICE, "sub": "admin", "expires_in": 30, "claims": {"x": 1}}
    response = await mint(TokenEndpoint(keys.config()), keys.api_key, body=attempt)
    token = assert_token_response(response, DEVICE, expires_in=30)
    assert jwt.get_unverified_header(token) == {
        "alg": "HS256",
        "kid": derive_kid(keys.jwt_secret.encode()),
        "typ": "JWT",
    }
    claims = jwt.decode(token, keys.jwt_secret, algorithms=["HS256"])
    assert set(claims) == {"iat", "exp", "jti", "instance_id", "sub", "x"}
    assert claims["exp"] - claims["iat"] == 30


# -- Credentials ------------------------------------------------------------------------------


REFUSED_CREDENTIALS = [
    # headers (templates), the refusal
    pytest.param([], MISSING, id="nothing"),
    pytest.param([("authorization", "{mobile_api_key}")], FORBIDDEN, id="mobile-key"),
    pytest.param([("authorization", "Bearer {token}")], FORBIDDEN, id="generic-device-token"),
    pytest.param(
        [("authorization", "Bearer {bound}"), ("x-instance-id", DEVICE)],
        FORBIDDEN,
        id="bound-device-token",
    ),
    pytest.param([("x-api-key", "{mobile_api_key}")], INVALID, id="mobile-key-as-api-key"),
    pytest.param([("authorization", "{api_key}")], INVALID, id="api-key-in-authorization"),
    pytest.param([("x-api-key", "{api_key}x")], INVALID, id="api-key-near-miss"),
    pytest.param([("authorization", "Bearer {expired}")], INVALID, id="expired-token"),
    pytest.param(
        [("x-api-key", "{api_key}"), ("authorization", "Bearer {token}")],
        bad_request(SEVERAL),
        id="api-key-and-token",
    ),
    pytest.param(
        [("x-api-key", "{api_key}"), ("x-api-key", "{api_key}")],
        bad_request(DUPLICATE),
        id="api-key-twice",
    ),
]


@pytest.mark.parametrize(("headers", "denied"), REFUSED_CREDENTIALS)
async def test_only_the_server_api_key_can_mint(
    keys: Keys, app: RecordingApp, mount: str, headers: list[tuple[str, str]], denied: Denied
) -> None:
    values = {
        "api_key": keys.api_key,
        "mobile_api_key": keys.mobile_api_key,
        "token": make_token(keys.jwt_secret),
        "bound": make_token(keys.jwt_secret, instance_id=DEVICE),
        "expired": make_token(keys.jwt_secret, lifetime=-1),
    }
    raw = [(name.encode(), value.format(**values).encode()) for name, value in headers]
    async with client(build(mount, keys.config(), app)) as http:
        response = await http.post(PATH, headers=raw, json={"instance_id": DEVICE})
    assert_denied(response, denied)
    assert "access_token" not in response.text
    assert not app.ran


def test_endpoint_needs_an_api_key_and_a_jwt_secret() -> None:
    with pytest.raises(ConfigError) as no_key:
        TokenEndpoint(GateConfig(jwt_secret=secrets.token_urlsafe(32)))
    assert no_key.value.field == "api_keys"
    with pytest.raises(ConfigError) as no_secret:
        TokenEndpoint(GateConfig(api_keys=secrets.token_urlsafe(32)))
    assert no_secret.value.field == "jwt_secret"


@pytest.mark.parametrize("realm", ["", 'say "hi"', "back\\slash", "caf\u00e9", "tab\there"])
def test_endpoint_refuses_a_realm_that_cannot_be_quoted(keys: Keys, realm: str) -> None:
    with pytest.raises(ConfigError) as info:
        TokenEndpoint(keys.config(), realm=realm)
    assert info.value.field == "realm"


async def test_standalone_endpoint_fails_closed_on_a_malformed_scope(keys: Keys) -> None:
    scope = http_scope(PATH, method="POST")
    del scope["headers"]
    sent = await call_asgi(TokenEndpoint(keys.config()), scope)
    assert sent[0]["status"] == 400
    assert json.loads(sent[1]["body"]) == {
        "error": "invalid_request",
        "error_description": UNREADABLE,
    }


def test_repr_hides_secrets(keys: Keys) -> None:
    text = repr(TokenEndpoint(keys.config()))
    for secret in (keys.api_key, keys.mobile_api_key, keys.jwt_secret):
        assert secret not in text


async def test_logs_never_contain_the_token(keys: Keys, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        response = await mint(
            TokenEndpoint(keys.config()), keys.api_key, body={"instance_id": DEVICE}
        )
    token = response.json()["access_token"]
    records = [record for record in caplog.records if record.name.startswith("devicegate")]
    # One audit line, naming the token by its jti and its device, never by itself.
    assert [record.name for record in records] == ["devicegate.audit"]
    jti = TokenVerifier(keys.config()).verify(token, DEVICE).claims["jti"]
    assert records[0].getMessage() == (
        f"devicegate minted a token: jti={jti!r} instance_id={DEVICE!r} expires_in=300"
    )
    for record in records:
        text = record.getMessage() + repr(record.args) + repr(record.__dict__)
        for secret in (token, keys.api_key, keys.jwt_secret):
            assert secret not in text


# -- Mounted alone ----------------------------------------------------------------------------


async def test_lifespan_is_handled_when_mounted_alone(keys: Keys) -> None:
    sent = await call_asgi(TokenEndpoint(keys.config()), lifespan_scope())
    assert sent == [{"type": "lifespan.startup.complete"}, {"type": "lifespan.shutdown.complete"}]


async def test_mounted_as_a_starlette_route(keys: Keys) -> None:
    routes = Starlette(routes=[Route(PATH, TokenEndpoint(keys.config()))])
    async with client(routes) as http:
        minted = await http.post(
            PATH, headers={"x-api-key": keys.api_key}, json={"instance_id": DEVICE}
        )
        refused = await http.post(PATH, headers={"authorization": keys.mobile_api_key})
    assert_token_response(minted, DEVICE)
    assert refused.status_code == 403


@pytest.mark.parametrize("extensions", [{"websocket.http.response": {}}, {}])
async def test_websocket_handshake_is_refused(
    keys: Keys, app: RecordingApp, mount: str, extensions: dict[str, Any]
) -> None:
    scope = ws_scope(PATH, [(b"x-api-key", keys.api_key.encode())], extensions=extensions)
    sent = await call_asgi(build(mount, keys.config(), app), scope)
    if extensions:
        assert message_types(sent) == [
            "websocket.http.response.start",
            "websocket.http.response.body",
        ]
        assert sent[0]["status"] == 405
    else:
        assert sent == [{"type": "websocket.close", "code": 1008}]
    assert not app.ran


async def test_behind_the_middleware_the_endpoint_builds_no_authenticator_of_its_own(
    keys: Keys,
) -> None:
    # The middleware authenticates and calls mint(): a second verifier and cache would be waste.
    gate = DeviceAuthMiddleware(RecordingApp(), config=keys.config())
    async with client(gate) as http:
        response = await http.post("/gen-jwt", headers={"x-api-key": keys.api_key}, json={})
    assert response.status_code == 200
    endpoint = gate._gate.server_key_routes[PATH].endpoint
    assert isinstance(endpoint, TokenEndpoint)
    assert endpoint._authenticator is None
