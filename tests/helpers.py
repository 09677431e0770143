"""Shared test helpers: keys, claims and hand-built tokens, the fixed texts devicegate answers
with, raw ASGI scopes and drivers, and a raw ASGI app that records its calls.

Real server processes are in :mod:`tests.servers.process`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import httpx
import pytest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from devicegate import DeviceAuthMiddleware, GateConfig, TokenVerifier
from devicegate._cache import CachedToken
from devicegate._config import VENDOR_EXAMPLE_KEYS

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    AnyPrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

# -- keys ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Keys:
    api_key: str
    mobile_api_key: str
    jwt_secret: str

    def config(self, **options: Any) -> GateConfig:
        return GateConfig(
            api_keys=self.api_key,
            mobile_api_keys=self.mobile_api_key,
            jwt_secret=self.jwt_secret,
            **options,
        )


def fresh_keys() -> Keys:
    return Keys(
        api_key=secrets.token_urlsafe(32),
        mobile_api_key=secrets.token_urlsafe(32),
        jwt_secret=secrets.token_urlsafe(32),
    )


# The two key values printed in the SenseCrypt documentation (../shared/SENSECRYPT.md), from the
# set devicegate refuses: the mobile_api_key ("S+IL...") sorts before the api_key ("wfMI...").
VENDOR_MOBILE_API_KEY, VENDOR_API_KEY = sorted(VENDOR_EXAMPLE_KEYS)


def near_misses(key: str) -> dict[str, str]:
    """Values one small step away from ``key``, by name: what a comparison of a prefix, of a
    length or without case would let through."""
    other_last = "B" if key[-1] == "A" else "A"
    other_first = "B" if key[0] == "A" else "A"
    return {
        "one-char-off": key[:-1] + other_last,
        "first-char-off": other_first + key[1:],
        "prefix": key[:-1],
        "suffix": key + "A",
        "doubled": key + key,
        "case": key.swapcase(),
        "trailing-nul": key + "\x00",
        "leading-nul": "\x00" + key,
    }


NEAR_MISSES = tuple(near_misses("any-key"))  # the names, for parametrize


# Device ids devicegate refuses to put in a token: one must be 1 to 256 printable ASCII
# characters without surrounding spaces, to survive a round trip through an HTTP header.
INVALID_INSTANCE_IDS = [
    pytest.param("", id="empty"),
    pytest.param("x" * 257, id="257-characters"),
    pytest.param(" device", id="leading-space"),
    pytest.param("device ", id="trailing-space"),
    pytest.param(" ", id="only-space"),
    pytest.param("dev\tice", id="tab"),
    pytest.param("dev\nice", id="newline"),
    pytest.param("dev\r\nX-Injected: 1", id="header-injection"),
    pytest.param("dev\x00ice", id="nul"),
    pytest.param("dev\x7fice", id="delete"),
    pytest.param("appareil-\u00e9", id="non-ascii"),
    pytest.param("\u200bdevice", id="zero-width-space"),
    pytest.param("\uff44evice", id="fullwidth"),
    pytest.param(123, id="int"),
    pytest.param(1.5, id="float"),
    pytest.param(True, id="bool"),
    pytest.param([], id="empty-list"),
    pytest.param(["device"], id="list"),
    pytest.param({"id": "device"}, id="object"),
]


def write_json(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def write_secrets(path: Path, keys: Keys | None = None, **values: Any) -> Path:
    """Write a ``secrets.json`` in the SenseCrypt layout with mode 0600: the three ``keys`` when
    given, then ``values`` (which may replace them)."""
    document: dict[str, Any] = {}
    if keys is not None:
        document = {
            "api_key": keys.api_key,
            "mobile_api_key": keys.mobile_api_key,
            "jwt_secret": keys.jwt_secret,
        }
    write_json(path, {**document, **values})
    path.chmod(0o600)
    return path


def scrub_devicegate_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unset every ``DEVICEGATE_*`` variable for the test (monkeypatch restores them after)."""
    for name in [name for name in os.environ if name.startswith("DEVICEGATE_")]:
        monkeypatch.delenv(name)


def private_pem(key: AnyPrivateKey) -> str:
    """``key`` as unencrypted PKCS#8 PEM, as ``jwt_private_key`` takes it."""
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def public_pem(key: AnyPrivateKey) -> str:
    """The public half of ``key`` as SubjectPublicKeyInfo PEM, as ``jwt_public_keys`` takes it."""
    from cryptography.hazmat.primitives import serialization

    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


# -- time, claims and tokens ---------------------------------------------------------------------

NOW = 1_700_000_000  # the time of every test that injects a clock


class Clock:
    """A settable clock for :class:`~devicegate.TokenVerifier` and
    :class:`~devicegate.TokenIssuer` (their ``clock`` argument)."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def claims_at(
    *, now: int = NOW, lifetime: int = 300, drop_none: bool = True, **changes: Any
) -> dict[str, Any]:
    """A valid claim set issued at ``now`` (``iat``, ``exp`` ``lifetime`` seconds later and a
    random ``jti``), with ``changes`` applied.

    A change to ``None`` removes that claim; with ``drop_none=False`` it stays, as JSON null.
    """
    claims: dict[str, Any] = {
        "iat": now,
        "exp": now + lifetime,
        "jti": secrets.token_hex(8),
        **changes,
    }
    if drop_none:
        return {name: value for name, value in claims.items() if value is not None}
    return claims


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def sign(signing_input: str, secret: str | bytes, digest: str = "sha256") -> str:
    key = secret.encode() if isinstance(secret, str) else secret
    return b64url(hmac.new(key, signing_input.encode(), getattr(hashlib, digest)).digest())


def jti_of(token: str) -> str:
    """The ``jti`` of a token, read without verifying it."""
    payload = token.split(".")[1]
    jti: str = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["jti"]
    return jti


def make_token(
    secret: str | bytes,
    claims: dict[str, Any] | None = None,
    *,
    header: dict[str, Any] | None = None,
    raw_header: bytes | None = None,
    raw_payload: bytes | None = None,
    digest: str = "sha256",
    instance_id: str | None = None,
    lifetime: int = 300,
) -> str:
    """Build a compact JWS by hand (raw HMAC), so that malformed tokens can be made too.

    With no ``claims`` a valid claim set is used: ``iat`` now (the system clock), ``exp`` now +
    ``lifetime`` and ``instance_id`` when given.
    """
    if claims is None:
        claims = claims_at(now=int(time.time()), lifetime=lifetime, instance_id=instance_id)
    header_bytes = (
        raw_header
        if raw_header is not None
        else json.dumps(header if header is not None else {"alg": "HS256", "typ": "JWT"}).encode()
    )
    payload_bytes = raw_payload if raw_payload is not None else json.dumps(claims).encode()
    signing_input = f"{b64url(header_bytes)}.{b64url(payload_bytes)}"
    return f"{signing_input}.{sign(signing_input, secret, digest)}"


class CountingVerifier(TokenVerifier):
    """A TokenVerifier that counts its full verifications (signature, claims, everything): from
    outside, the only way to see whether a token was answered from the verified-token cache."""

    full_verifications = 0

    def _verify_uncached(self, token: bytes) -> CachedToken:
        self.full_verifications += 1
        return super()._verify_uncached(token)


def count_verifications(
    gate: DeviceAuthMiddleware, config: GateConfig, clock: Clock | None = None
) -> CountingVerifier:
    """Put a :class:`CountingVerifier` (reading ``clock`` when given) into an existing ``gate``,
    for a gate built by something else (forward-auth). Where the test builds the middleware
    itself, pass ``verifier=`` instead.
    """
    verifier = CountingVerifier(config) if clock is None else CountingVerifier(config, clock=clock)
    gate.reconfigure(config, verifier=verifier)
    return verifier


# -- what a client sends and what devicegate answers ---------------------------------------------

TOKEN_PATH = "/gen-jwt"
REALM_ONLY = 'Bearer realm="devicegate"'
# The fixed descriptions devicegate answers with. Written out here, not imported: the tests are
# the specification of what a client sees.
AUTH_REQUIRED = "Authentication is required."
INVALID_CREDENTIAL = "The credential is invalid, expired or not valid for this device."
NOT_ACCEPTED = "This credential is not accepted for this resource."
DUPLICATE = "The request carries a credential header more than once."
SEVERAL = "The request carries more than one credential."
MALFORMED = "The Authorization header is malformed."
BAD_API_KEY_HEADER = "The API key header is malformed."
DUPLICATE_DEVICE = "The request carries the device header more than once."
MISSING_DEVICE = "The token is bound to a device; send the device header."
UNREADABLE = "The request could not be read."
UNSAFE_PATH = (
    "The request path has '.', '..' or empty segments, a backslash, a semicolon or a "
    "non-printable character."
)


@dataclass(frozen=True)
class Denied:
    """A refusal devicegate answers itself (the app never runs)."""

    status: int
    error: str | None  # the RFC 6750 error code; None when no credential was offered
    description: str


MISSING = Denied(401, None, AUTH_REQUIRED)
INVALID = Denied(401, "invalid_token", INVALID_CREDENTIAL)
FORBIDDEN = Denied(403, "insufficient_scope", NOT_ACCEPTED)


def bad_request(description: str) -> Denied:
    return Denied(400, "invalid_request", description)


def challenge(denied: Denied, realm: str = "devicegate") -> str:
    """The RFC 6750 §3 challenge: no ``error`` attribute when no credential was sent."""
    if denied.error is None:
        return f'Bearer realm="{realm}"'
    return (
        f'Bearer realm="{realm}", error="{denied.error}", error_description="{denied.description}"'
    )


def assert_denied(response: httpx.Response, denied: Denied, realm: str = "devicegate") -> None:
    """``response`` is exactly devicegate's refusal ``denied``: status, one challenge, the JSON
    body and its headers."""
    assert response.status_code == denied.status, response.text
    assert response.headers.get_list("www-authenticate") == [challenge(denied, realm)]
    assert response.json() == {
        "error": denied.error or "unauthorized",
        "error_description": denied.description,
    }
    assert response.headers["content-type"] == "application/json"
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["content-length"] == str(len(response.content))


def bearer(token: str, device: str | None = None) -> dict[str, str]:
    """The headers of a request with ``token``, from ``device`` when given."""
    headers = {"authorization": f"Bearer {token}"}
    if device is not None:
        headers["x-instance-id"] = device
    return headers


def token_of(response: httpx.Response, instance_id: str | None) -> str:
    """The access token of a successful token response (RFC 6749 §5.1) for ``instance_id``."""
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["token_type"] == "Bearer"
    assert body["instance_id"] == instance_id
    token = body["access_token"]
    assert isinstance(token, str)
    return token


async def mint(http: httpx.AsyncClient, api_key: str, instance_id: str | None = None) -> str:
    """Mint a token at ``/gen-jwt`` over HTTP with the server API key."""
    body = {} if instance_id is None else {"instance_id": instance_id}
    response = await http.post(TOKEN_PATH, headers={"x-api-key": api_key}, json=body)
    return token_of(response, instance_id)


# -- raw ASGI ------------------------------------------------------------------------------------

# Bounds every raw ASGI call: reaching it is a hang, a failure, never a measurement.
HANG_GUARD_SECONDS = 60
DENIAL_EXTENSION: dict[str, dict[str, object]] = {"websocket.http.response": {}}
HeaderPairs = Sequence[tuple[bytes, bytes]] | Sequence[tuple[str, str]] | Mapping[str, str]


def raw_headers(headers: HeaderPairs) -> list[tuple[bytes, bytes]]:
    """Headers as ASGI carries them. Text is encoded as latin-1 (each code point below 256 is one
    byte, so a str can spell any byte) and text names are lower-cased."""
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    return [
        (
            name if isinstance(name, bytes) else name.lower().encode("latin-1"),
            value if isinstance(value, bytes) else value.encode("latin-1"),
        )
        for name, value in pairs
    ]


def http_scope(
    path: str = "/",
    headers: HeaderPairs = (),
    *,
    method: str = "GET",
    query: bytes = b"",
    root_path: str = "",
    **extra: Any,
) -> Scope:
    """An ``http`` scope as uvicorn sends it; ``extra`` sets or replaces any other key."""
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query,
        "root_path": root_path,
        "headers": raw_headers(headers),
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
        "state": {},
        **extra,
    }


def ws_scope(
    path: str = "/ws",
    headers: HeaderPairs = (),
    *,
    extensions: dict[str, dict[str, object]] | None = None,
    root_path: str = "",
) -> Scope:
    """A ``websocket`` handshake scope; ``extensions=None`` leaves the key out, as some servers
    do (:data:`DENIAL_EXTENSION` offers the websocket denial response)."""
    scope = http_scope(path, [(b"host", b"testserver"), *raw_headers(headers)], root_path=root_path)
    del scope["method"]
    scope.update(type="websocket", scheme="ws", subprotocols=[])
    if extensions is not None:
        scope["extensions"] = extensions
    return scope


def lifespan_scope() -> Scope:
    return {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}


def _opening(scope_type: str) -> list[Message]:
    """What a client sends first on a connection of ``scope_type``."""
    if scope_type == "http":
        return [{"type": "http.request", "body": b""}]
    if scope_type == "websocket":
        return [{"type": "websocket.connect"}]
    if scope_type == "lifespan":
        return [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    return []


async def call_asgi(
    app: ASGIApp,
    scope: Scope,
    messages: Sequence[Message] | None = None,
    *,
    received: list[Message] | None = None,
) -> list[Message]:
    """Drive ``app`` by hand, as a server would, and return every message it sent.

    ``receive()`` hands out ``messages`` in order (by default what a client sends first: an empty
    request body, a websocket connect, or lifespan startup then shutdown), then the disconnect of
    an ``http`` or ``websocket`` connection for ever; on any other scope it fails once they are
    used up. ``received``, when given, collects every message ``receive()`` handed out.
    """
    scope_type = scope["type"]
    inbox = list(_opening(scope_type) if messages is None else messages)
    sent: list[Message] = []

    async def receive() -> Message:
        if inbox:
            message = inbox.pop(0)
        elif scope_type == "http":
            message = {"type": "http.disconnect"}
        elif scope_type == "websocket":
            message = {"type": "websocket.disconnect", "code": 1000}
        else:
            raise AssertionError(f"receive() called again on a {scope_type!r} scope")
        if received is not None:
            received.append(message)
        return message

    async def send(message: Message) -> None:
        sent.append(dict(message))

    with anyio.fail_after(HANG_GUARD_SECONDS):
        await app(scope, receive, send)
    return sent


def message_types(sent: Sequence[Message]) -> list[str]:
    return [message["type"] for message in sent]


async def no_receive() -> Message:
    raise AssertionError("the app must not call receive()")


async def no_send(message: Message) -> None:
    raise AssertionError(f"the app must not send {message!r}")


@dataclass(frozen=True)
class Answer:
    """An HTTP response (or websocket denial response) as an ASGI app sent it."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    @classmethod
    def of(cls, sent: Sequence[Message]) -> Answer:
        start, *rest = sent
        assert start["type"] in ("http.response.start", "websocket.http.response.start"), sent
        body = b"".join(message.get("body", b"") for message in rest)
        return cls(start["status"], list(start["headers"]), body)

    def header(self, name: str) -> str | None:
        """The value of header ``name``, ``None`` when absent (a repeated header fails)."""
        values = [value.decode("latin-1") for key, value in self.headers if key == name.encode()]
        assert len(values) <= 1, f"{name} sent {len(values)} times"
        return values[0] if values else None

    def json(self) -> Any:
        return json.loads(self.body)


async def answer(app: ASGIApp, scope: Scope) -> Answer:
    """Call ``app`` with ``scope`` and an empty request body; what it answered."""
    return Answer.of(await call_asgi(app, scope))


@dataclass
class RecordingApp:
    """A raw ASGI app answering 200 with a JSON summary of the principal it saw."""

    calls: list[Scope] = field(default_factory=list)

    @property
    def ran(self) -> bool:
        return bool(self.calls)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.calls.append(scope)
        if scope["type"] == "lifespan":
            return
        user = scope.get("user")
        body = json.dumps(
            {
                "kind": getattr(getattr(user, "kind", None), "value", None),
                "instance_id": getattr(user, "instance_id", None),
                "authenticated": bool(getattr(user, "is_authenticated", False)),
                "scopes": list(getattr(scope.get("auth"), "scopes", [])),
            }
        ).encode()
        if scope["type"] == "websocket":
            await receive()
            await send({"type": "websocket.accept"})
            await send({"type": "websocket.send", "text": body.decode()})
            await send({"type": "websocket.close", "code": 1000})
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})


def client(app: ASGIApp, base_url: str = "http://testserver") -> httpx.AsyncClient:
    """An HTTP client for ``app`` in process (httpx.ASGITransport)."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=base_url)
