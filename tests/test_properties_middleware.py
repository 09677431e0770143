"""Property-based tests of DeviceAuthMiddleware as a whole (hypothesis), driven as raw ASGI.

Random ``http`` and ``websocket`` scopes (random paths, mount points, methods and header lists
mixing real and broken credentials with noise) go through the middleware in front of a
recording inner app. Whatever the input:

* the middleware never raises and never answers 5xx; HTTP answers are 200, 400, 401 or 403;
* the inner app runs exactly when the answer is 200 (or the websocket was accepted);
* when it runs, ``scope["user"]`` is devicegate's own ``Principal`` (``UnauthenticatedUser`` on a
  public path), never what a client or an earlier layer put there, and the credential really
  was in the request;
* every refusal carries ``WWW-Authenticate: Bearer realm="devicegate"...`` and fixed text:
  nothing of the request's header values comes back;
* a path that reaches the app is already in normal form and has no backslash.

A spy in place of ``hmac.compare_digest`` shows, without any timing, that every configured key
is compared on every key attempt and that device ids are compared in constant time.

The built-in token endpoint is switched off (``token_path=None``) for the main property, since it
answers 200 itself without running the app; its own, weaker property is the last test.

Hypothesis runs inside the anyio pytest plugin: an ``async def`` test under ``@given`` gets a
runner of the backend under test (asyncio and trio, from conftest) for every example.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import posixpath
import random
import secrets
import string
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from starlette.authentication import AuthCredentials, UnauthenticatedUser
from starlette.types import Message, Receive, Scope, Send

import devicegate
from devicegate import (
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
)
from devicegate import _credentials as credentials_module
from devicegate import _keys as keys_module
from devicegate import _tokens as tokens_module
from devicegate._asgi import refusal_parts
from tests.helpers import make_token

pytestmark = pytest.mark.anyio

# Moderate example counts: the whole file runs in seconds on both backends. No deadline and no
# too_slow check: a busy CI machine must not turn into a flaky failure.
PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

REALM_PREFIX = b'Bearer realm="devicegate"'
DEVICE = "device-7f3a"
OTHER_DEVICE = "device-0c21"

# A pool of distinct keys, drawn from by index so that failing examples replay exactly.
KEY_POOL = tuple(secrets.token_urlsafe(32) for _ in range(8))
SECRET_POOL = tuple(secrets.token_urlsafe(40) for _ in range(2))
API_KEYS = KEY_POOL[:2]  # two server keys, as during a rotation
MOBILE_KEYS = KEY_POOL[4:5]
CONFIG = GateConfig(api_keys=API_KEYS, mobile_api_keys=MOBILE_KEYS, jwt_secret=SECRET_POOL[0])

# Valid for an hour from import: long enough for any run.
_ISSUER = TokenIssuer(CONFIG.replace(jwt_expire_seconds=3600))
BOUND_TOKEN = _ISSUER.issue(instance_id=DEVICE).access_token.encode()
OTHER_BOUND_TOKEN = _ISSUER.issue(instance_id=OTHER_DEVICE).access_token.encode()
GENERIC_TOKEN = _ISSUER.issue().access_token.encode()
VALID_TOKENS: dict[bytes, str | None] = {
    BOUND_TOKEN: DEVICE,
    OTHER_BOUND_TOKEN: OTHER_DEVICE,
    GENERIC_TOKEN: None,
}
_NOW = int(time.time())
BAD_TOKENS = (
    make_token(SECRET_POOL[0], {"iat": _NOW - 7200, "exp": _NOW - 3600}).encode(),  # expired
    make_token(SECRET_POOL[1], instance_id=DEVICE).encode(),  # a key we do not hold
    make_token(SECRET_POOL[0], {"iat": _NOW, "exp": str(_NOW + 60)}).encode(),  # exp a string
    make_token(SECRET_POOL[0], header={"alg": "none"}, instance_id=DEVICE).encode(),
    GENERIC_TOKEN[:-1] + (b"B" if GENERIC_TOKEN[-1:] != b"B" else b"C"),  # tampered signature
    BOUND_TOKEN[:-43],  # no signature
)

API_KEY_BYTES = tuple(key.encode() for key in API_KEYS)
MOBILE_KEY_BYTES = tuple(key.encode() for key in MOBILE_KEYS)


def near_misses(key: bytes) -> list[bytes]:
    """Values one step away from ``key``: they must all be refused."""
    flipped = key[:-1] + (b"A" if key[-1:] != b"A" else b"B")
    return [flipped, key[:-1], key + b"x", key.swapcase(), key + b"\x00", b" " + key]


AUTHORIZATION_VALUES = (
    *(scheme + token for scheme in (b"Bearer ", b"bearer ", b"BEARER ") for token in VALID_TOKENS),
    *(b"Bearer " + token for token in BAD_TOKENS),
    *MOBILE_KEY_BYTES,
    *(miss for key in MOBILE_KEY_BYTES for miss in near_misses(key)),
    *(b"Bearer " + key for key in MOBILE_KEY_BYTES),
    *API_KEY_BYTES,  # a server key in the wrong header
    b"Basic " + API_KEY_BYTES[0],
    b"Bearer  " + GENERIC_TOKEN,
    b"Bearer\t" + GENERIC_TOKEN,
    b"Bearer",
    b"",
)
API_KEY_VALUES = (
    *API_KEY_BYTES,
    *(miss for key in API_KEY_BYTES for miss in near_misses(key)),
    *MOBILE_KEY_BYTES,  # a mobile key in the wrong header
    GENERIC_TOKEN,
    b"",
)
DEVICE_VALUES = tuple(
    value.encode() for value in (DEVICE, OTHER_DEVICE, DEVICE.upper(), DEVICE + " ", "")
)
FRAGMENTS = (b"Bearer ", b"bearer ", b"Basic ", b" ", b"\t", b".", b"=", b"\x00", b"\xff", b"\r\n")

CREDENTIAL_NAMES = (b"authorization", b"x-api-key", b"x-instance-id")
NOISE_NAMES = st.one_of(
    st.sampled_from(
        [
            b"cookie",
            b"proxy-authorization",
            b"x-api-key-2",
            b"host",
            b"content-type",
            b"x-forwarded-for",
        ]
    ),
    st.binary(max_size=12).filter(lambda name: name not in CREDENTIAL_NAMES),
)
HEADER_NAMES = st.one_of(st.sampled_from(CREDENTIAL_NAMES), NOISE_NAMES)
KNOWN_VALUES = (*AUTHORIZATION_VALUES, *API_KEY_VALUES, *DEVICE_VALUES)
HEADER_VALUES = st.one_of(
    st.sampled_from(KNOWN_VALUES),
    st.binary(max_size=48),
    st.lists(st.sampled_from((*FRAGMENTS, *KNOWN_VALUES)), max_size=4).map(b"".join),
)

Headers = list[tuple[bytes, bytes]]


@st.composite
def plausible_headers(draw: st.DrawFn) -> Headers:
    """One credential in its own header (often a valid one), maybe a device header, some noise,
    in any order."""
    headers: Headers = draw(st.lists(st.tuples(NOISE_NAMES, HEADER_VALUES), max_size=3))
    device: bytes | None = None
    choice = draw(st.sampled_from(["api key", "mobile key", "token", "authorization", "x-api-key"]))
    if choice == "api key":
        headers.append((b"x-api-key", draw(st.sampled_from(API_KEY_BYTES))))
    elif choice == "mobile key":
        headers.append((b"authorization", draw(st.sampled_from(MOBILE_KEY_BYTES))))
    elif choice == "token":
        token = draw(st.sampled_from(sorted(VALID_TOKENS)))
        headers.append((b"authorization", b"Bearer " + token))
        bound = VALID_TOKENS[token]
        device = None if bound is None else bound.encode()
    elif choice == "authorization":
        headers.append((b"authorization", draw(st.sampled_from(AUTHORIZATION_VALUES))))
    else:
        headers.append((b"x-api-key", draw(st.sampled_from(API_KEY_VALUES))))
    if draw(st.booleans()):
        headers.append((b"x-instance-id", device or draw(st.sampled_from(DEVICE_VALUES))))
    return list(draw(st.permutations(headers)))


HEADER_LISTS = st.one_of(
    plausible_headers(),
    plausible_headers(),
    st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=6),
)

# Path segments that matter to the rules below, dot segments and their look-alikes (percent
# text is literal here: ASGI paths are already decoded), backslashes, unicode, anything.
SEGMENTS = st.one_of(
    st.sampled_from(
        [
            "health",
            "public",
            "server",
            "device",
            "admin",
            "gen-jwt",
            "",
            ".",
            "..",
            "...",
            ".health",
            "%2e",
            "%2e%2e",
            "%2F",
            "%5c",
            "a\\b",
            "\\",
            "..\\",
            "\u2025",  # two dot leader
            "\uff0e\uff0e",  # fullwidth full stops
            "h\u00e9alth",
            "*",
            "a;b",
            "a?b",
            "\x00",
        ]
    ),
    st.text(max_size=6),
)


@st.composite
def segment_paths(draw: st.DrawFn) -> str:
    path = "/" + "/".join(draw(st.lists(SEGMENTS, max_size=5)))
    return path + "/" if draw(st.booleans()) else path


@st.composite
def plain_paths(draw: st.DrawFn) -> str:
    """Clean paths around the rules, so that most requests get past the path check."""
    words = ["health", "public", "server", "device", "admin", "whoami", "gen-jwt", "x"]
    words += ["healthz", "publicx", "server-x", "devicex"]  # prefix look-alikes
    path = "/" + "/".join(draw(st.lists(st.sampled_from(words), max_size=3)))
    return path + "/" if draw(st.booleans()) and path != "/" else path


PATHS = st.one_of(
    plain_paths(),
    plain_paths(),
    segment_paths(),
    st.sampled_from(["/", "", "//", "/health", "/health/", "/server", "/device/x", "/public"]),
    st.text(max_size=16),
)
MOUNT_POINTS = st.sampled_from(["", "/api", "/api/", "/mount/v1", "/health"])
ROOT_PATHS = st.one_of(MOUNT_POINTS, MOUNT_POINTS, st.text(max_size=8))
METHODS = st.one_of(
    st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE", "get"]),
    st.text(min_size=1, max_size=8),
)

ALL_KINDS = frozenset(CredentialKind)
RULES = (
    Rule("/health", public=True),
    Rule("/public/*", public=True),
    Rule("/server/*", accept={CredentialKind.API_KEY}),
    Rule("/device/*", accept={CredentialKind.DEVICE_TOKEN}),
)


def expected_policy(route: str) -> tuple[bool, frozenset[CredentialKind]]:
    """``(public, accepted kinds)`` for a route path, written out from RULES by hand."""
    if route in ("/health", "/health/") or route == "/public" or route.startswith("/public/"):
        return True, ALL_KINDS
    if route == "/server" or route.startswith("/server/"):
        return False, frozenset({CredentialKind.API_KEY})
    if route == "/device" or route.startswith("/device/"):
        return False, frozenset({CredentialKind.DEVICE_TOKEN})
    return False, ALL_KINDS


def expected_route_path(path: str, root_path: str) -> str:
    """The path below the mount point (ASGI ``root_path``), as the app's router sees it."""
    if root_path and path.startswith(root_path):
        rest = path[len(root_path) :]
        if not rest:
            return "/"
        if rest.startswith("/"):
            return rest
    return path


def remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4, written out as the RFC states it."""
    source, output = path, ""
    while source:
        if source.startswith("../"):
            source = source[3:]
        elif source.startswith("./"):
            source = source[2:]
        elif source.startswith("/./"):
            source = "/" + source[3:]
        elif source == "/.":
            source = "/"
        elif source.startswith("/../"):
            source = "/" + source[4:]
            output = output[: output.rfind("/")] if "/" in output else ""
        elif source == "/..":
            source = "/"
            output = output[: output.rfind("/")] if "/" in output else ""
        elif source in (".", ".."):
            source = ""
        else:
            end = source.find("/", 1)
            segment = source if end == -1 else source[:end]
            output += segment
            source = source[len(segment) :]
    return output


def is_normal_path(path: str) -> bool:
    """Absolute, no backslash, no empty segment, and unchanged by dot removal and normpath.

    A single trailing slash is allowed (normpath would drop it); ``posixpath.normpath`` keeps a
    leading ``//``, hence the explicit check for empty segments.
    """
    if not path.startswith("/") or "\\" in path or "//" in path:
        return False
    stem = path[:-1] if len(path) > 1 and path.endswith("/") else path
    return posixpath.normpath(stem) == stem and remove_dot_segments(path) == path


PLAIN_CHARACTERS = frozenset(string.ascii_letters + string.digits + "-._~%/")


def is_plain_path(path: str) -> bool:
    """A normal path of unreserved characters only (RFC 3986 §2.3, plus ``%`` and ``/``).

    devicegate may refuse more than abnormal paths (it also refuses semicolons and control
    characters, which some servers strip or cut at); a plain path it must always let through.
    """
    return is_normal_path(path) and PLAIN_CHARACTERS.issuperset(path)


# --- what the server may say: every fixed text it owns ------------------------------------------


def _server_vocabulary() -> bytes:
    """Everything devicegate may send of its own accord: its source and its rendered errors.

    Hypothesis draws some values from the string constants of the code under test, so a header
    value can legitimately hold server text (``"application/json"``); such a window is not an
    echo. Any window found in the response and the request but not here is.
    """
    package = Path(devicegate.__file__).parent
    parts = [source.read_bytes() for source in sorted(package.glob("*.py"))]
    errors: list[Any] = [MissingCredentials(), InvalidRequest(), InsufficientScope()]
    errors += [InvalidToken(reason) for reason in InvalidReason]
    for module in (credentials_module, tokens_module, devicegate._middleware):
        errors += [
            InvalidRequest(value)
            for value in vars(module).values()
            if isinstance(value, str) and value.endswith(".")
        ]
    for error in errors:
        _, headers, body = refusal_parts(error)
        parts += [body, *(value for _, value in headers)]
    return b"\n".join(parts)


SERVER_TEXT = _server_vocabulary()
ECHO_WINDOW = 12


def echoed(request_values: Sequence[bytes], response_bytes: Sequence[bytes]) -> list[bytes]:
    """Windows of request header values that the response repeats and the server does not own."""
    found = []
    for value in request_values:
        for start in range(len(value) - ECHO_WINDOW + 1):
            window = value[start : start + ECHO_WINDOW]
            if any(window in part for part in response_bytes) and window not in SERVER_TEXT:
                found.append(window)
    return found


# --- driving the middleware by hand ----------------------------------------------------------

INNER_BODY = b"inner app"
FORGED_USER = Principal(CredentialKind.API_KEY)  # what a client-facing layer might smuggle in
FORGED_AUTH = AuthCredentials(["api_key", "mobile_api_key", "device_token"])


@dataclass
class Seen:
    """What the inner app saw when it ran."""

    path: str
    root_path: str
    user: object
    auth: object


@dataclass
class InnerApp:
    """A raw ASGI app with a fixed answer (so nothing it says can look like an echo)."""

    seen: list[Seen] = field(default_factory=list)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.seen.append(
            Seen(scope["path"], scope["root_path"], scope.get("user"), scope.get("auth"))
        )
        if scope["type"] == "websocket":
            assert (await receive())["type"] == "websocket.connect"
            await send({"type": "websocket.accept"})
            await send({"type": "websocket.close", "code": 1000})
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": INNER_BODY})


@dataclass(frozen=True)
class RawRequest:
    kind: str  # "http", "websocket" (no denial extension) or "websocket+denial"
    method: str
    root_path: str
    path: str
    headers: Headers
    forged: bool

    def scope(self) -> Scope:
        scope: Scope = {
            "type": "http" if self.kind == "http" else "websocket",
            "asgi": {"version": "3.0", "spec_version": "2.4"},
            "http_version": "1.1",
            "scheme": "http" if self.kind == "http" else "ws",
            "path": self.path,
            "raw_path": self.path.encode("utf-8", "surrogatepass"),
            "query_string": b"",
            "root_path": self.root_path,
            "headers": list(self.headers),
            "client": ("127.0.0.1", 50000),
            "server": ("testserver", 80),
            "state": {},
        }
        if self.kind == "http":
            scope["method"] = self.method
        else:
            scope["subprotocols"] = []
        if self.kind == "websocket+denial":
            scope["extensions"] = {"websocket.http.response": {}}
        if self.forged:
            scope["user"] = FORGED_USER
            scope["auth"] = FORGED_AUTH
        return scope


@st.composite
def raw_requests(draw: st.DrawFn) -> RawRequest:
    root_path = draw(ROOT_PATHS)
    path = draw(PATHS)
    if root_path.startswith("/") and draw(st.booleans()):
        path = root_path + path  # mounted: the rules see what is below root_path
    return RawRequest(
        kind=draw(st.sampled_from(["http", "http", "websocket", "websocket+denial"])),
        method=draw(METHODS),
        root_path=root_path,
        path=path,
        headers=draw(HEADER_LISTS),
        forged=draw(st.booleans()),
    )


async def drive(middleware: DeviceAuthMiddleware, scope: Scope) -> list[Message]:
    """Run one request through ``middleware`` and return every message it sent."""
    if scope["type"] == "http":
        inbox: list[Message] = [{"type": "http.request", "body": b""}]
        closing: Message = {"type": "http.disconnect"}
    else:
        inbox = [{"type": "websocket.connect"}]
        closing = {"type": "websocket.disconnect", "code": 1000}
    sent: list[Message] = []

    async def receive() -> Message:
        return inbox.pop(0) if inbox else closing

    async def send(message: Message) -> None:
        sent.append(dict(message))

    await middleware(scope, receive, send)
    return sent


@dataclass(frozen=True)
class Answer:
    """The outcome of one request: a status (``None`` for a bare 1008 close) and what was sent."""

    status: int | None
    headers: list[tuple[bytes, bytes]]
    body: bytes
    accepted: bool


def read_answer(sample: RawRequest, sent: list[Message]) -> Answer:
    types = [message["type"] for message in sent]
    if sample.kind == "http":
        assert types == ["http.response.start", "http.response.body"], types
        return Answer(sent[0]["status"], list(sent[0]["headers"]), sent[1]["body"], False)
    if types and types[0] == "websocket.accept":
        assert types == ["websocket.accept", "websocket.close"], types
        return Answer(None, [], b"", True)
    if sample.kind == "websocket+denial":
        assert types == ["websocket.http.response.start", "websocket.http.response.body"], types
        return Answer(sent[0]["status"], list(sent[0]["headers"]), sent[1]["body"], False)
    # No denial extension: the handshake is closed with policy violation, nothing else.
    assert sent == [{"type": "websocket.close", "code": 1008}], sent
    return Answer(None, [], b"", False)


def values_of(headers: Headers, name: bytes) -> list[bytes]:
    return [value for header, value in headers if header == name]


def valid_credential(headers: Headers) -> tuple[CredentialKind, str | None] | None:
    """The ``(kind, instance_id)`` a request's headers prove, or ``None``: written out from the
    README's credential table, independently of devicegate's parser.

    Valid means exactly one credential, exactly right, in its own header, at most one device
    header, and for a bound token the device header holding exactly its device.
    """
    authorization = values_of(headers, b"authorization")
    api_keys = values_of(headers, b"x-api-key")
    devices = values_of(headers, b"x-instance-id")
    if len(devices) > 1:
        return None
    if not authorization and len(api_keys) == 1 and api_keys[0] in API_KEY_BYTES:
        return CredentialKind.API_KEY, None
    if api_keys or len(authorization) != 1:
        return None
    if authorization[0] in MOBILE_KEY_BYTES:
        return CredentialKind.MOBILE_API_KEY, None
    scheme, _, token = authorization[0].partition(b" ")
    if scheme.lower() != b"bearer" or token not in VALID_TOKENS:
        return None
    bound = VALID_TOKENS[token]
    if bound is not None and devices != [bound.encode()]:
        return None
    return CredentialKind.DEVICE_TOKEN, bound


def running_backend() -> str:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return "trio"
    return "asyncio"


# --- the properties --------------------------------------------------------------------------


# anyio_backend is function-scoped but only names the backend: nothing is shared between examples.
@settings(
    PROPERTY,
    max_examples=400,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(raw_requests())
@example(RawRequest("http", "GET", "", "/whoami", [(b"x-api-key", API_KEY_BYTES[1])], True))
@example(RawRequest("http", "GET", "/api", "/api/health", [], True))
@example(
    RawRequest("http", "GET", "", "/health/../admin", [(b"x-api-key", API_KEY_BYTES[0])], False)
)
@example(
    RawRequest(
        "websocket+denial",
        "GET",
        "",
        "/device/x",
        [(b"x-instance-id", DEVICE.encode()), (b"authorization", b"bEaReR " + BOUND_TOKEN)],
        True,
    )
)
@example(
    RawRequest(
        "websocket", "GET", "", "/server/x", [(b"authorization", MOBILE_KEY_BYTES[0])], False
    )
)
async def test_random_requests_are_answered_safely(anyio_backend: str, sample: RawRequest) -> None:
    assert running_backend() == anyio_backend  # every example really runs on both backends
    inner = InnerApp()
    middleware = DeviceAuthMiddleware(inner, config=CONFIG, rules=RULES, token_path=None)
    scope = sample.scope()
    answer = read_answer(sample, await drive(middleware, scope))

    # The app runs exactly when the request is admitted.
    if sample.kind == "http":
        assert answer.status in (200, 400, 401, 403)
        assert len(inner.seen) == (1 if answer.status == 200 else 0)
        if answer.status == 200:
            assert answer.body == INNER_BODY
    else:
        assert (len(inner.seen) == 1) is answer.accepted
        assert answer.accepted or answer.status in (None, 400, 401, 403)
    admitted = bool(inner.seen)
    if admitted:
        user = inner.seen[0].user
        event(f"admitted: {user.kind.value if isinstance(user, Principal) else 'public'}")
    else:
        event(f"refused: {answer.status}")

    # Refusals: the RFC 6750 challenge, fixed JSON, no echo.
    if not admitted and answer.status is not None:
        challenges = values_of(answer.headers, b"www-authenticate")
        assert len(challenges) == 1
        assert challenges[0].startswith(REALM_PREFIX)
        body = json.loads(answer.body)
        assert set(body) == {"error", "error_description"}
        assert (answer.status, body["error"]) in {
            (400, "invalid_request"),
            (401, "unauthorized"),
            (401, "invalid_token"),
            (403, "insufficient_scope"),
        }
        response_bytes = [answer.body, *(value for _, value in answer.headers)]
        assert echoed([value for _, value in sample.headers], response_bytes) == []

    # The path: an abnormal one never gets through. On a plain one the rules and the
    # credential decide: a public path always, a valid credential of an accepted kind always,
    # one of another kind never (403).
    route = expected_route_path(sample.path, sample.root_path)
    public, accepted = expected_policy(route)
    credential = valid_credential(sample.headers)
    if not is_normal_path(sample.path):
        assert not admitted
        assert answer.status in (None, 400)
    elif is_plain_path(sample.path):
        if public or (credential is not None and credential[0] in accepted):
            assert admitted
        elif credential is not None:
            assert answer.status in (None, 403)

    if not admitted:
        return
    (seen,) = inner.seen
    assert (seen.path, seen.root_path) == (sample.path, sample.root_path)
    assert is_normal_path(seen.path)
    # The principal is devicegate's, never the one planted in the scope before it.
    assert seen.user is not FORGED_USER
    assert seen.auth is not FORGED_AUTH
    assert isinstance(seen.auth, AuthCredentials)
    if isinstance(seen.user, Principal):
        assert not public
        assert seen.user.kind in accepted
        assert (seen.user.kind, seen.user.instance_id) == credential
        assert seen.auth.scopes == ["authenticated", seen.user.kind.value]
    else:
        assert type(seen.user) is UnauthenticatedUser
        assert public
        assert seen.auth.scopes == []


@settings(
    PROPERTY,
    max_examples=100,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(st.lists(raw_requests(), min_size=1, max_size=6), st.randoms(use_true_random=False))
@example(
    [
        RawRequest(
            "http", "GET", "", "/api/server/x", [(b"authorization", MOBILE_KEY_BYTES[0])], False
        ),
        RawRequest(
            "http", "GET", "/api", "/api/server/x", [(b"authorization", MOBILE_KEY_BYTES[0])], False
        ),
    ],
    None,
)
async def test_a_long_lived_middleware_decides_as_a_new_one(
    samples: list[RawRequest], shuffler: random.Random | None
) -> None:
    # The middleware remembers what each path decided; a request answered by a middleware that
    # has seen many others must get exactly the answer a brand-new middleware gives it.
    sequence = samples + samples
    if shuffler is not None:
        shuffler.shuffle(sequence)
    inner = InnerApp()
    long_lived = DeviceAuthMiddleware(inner, config=CONFIG, rules=RULES, token_path=None)
    for sample in sequence:
        fresh_inner = InnerApp()
        fresh = DeviceAuthMiddleware(fresh_inner, config=CONFIG, rules=RULES, token_path=None)
        expected = read_answer(sample, await drive(fresh, sample.scope()))
        ran_before = len(inner.seen)
        answer = read_answer(sample, await drive(long_lived, sample.scope()))
        assert answer == expected
        assert len(inner.seen) - ran_before == len(fresh_inner.seen)


@PROPERTY
@given(st.one_of(segment_paths(), PATHS), ROOT_PATHS)
@example("/a/./b", "")
@example("/a/%2e%2e/b", "")
@example("/api//x", "/api")
async def test_only_normal_paths_reach_the_app(path: str, root_path: str) -> None:
    inner = InnerApp()
    rules = [Rule("/public/*", public=True)]
    middleware = DeviceAuthMiddleware(inner, config=CONFIG, rules=rules, token_path=None)
    sample = RawRequest("http", "GET", root_path, path, [(b"x-api-key", API_KEY_BYTES[0])], False)
    answer = read_answer(sample, await drive(middleware, sample.scope()))
    # A valid key everywhere: the path alone decides.
    if inner.seen:
        assert answer.status == 200
        (seen,) = inner.seen
        assert seen.path == path
        assert is_normal_path(seen.path)
        assert "\\" not in seen.path
    else:
        assert answer.status == 400
    if not is_normal_path(path):
        assert inner.seen == []
    elif is_plain_path(path):
        assert len(inner.seen) == 1


# --- constant-time comparisons, observed through a spy --------------------------------------

_REAL_COMPARE_DIGEST = hmac.compare_digest


@dataclass
class CompareSpy:
    """Stands in for ``hmac.compare_digest`` and records every comparison."""

    calls: list[tuple[bytes, bytes]] = field(default_factory=list)

    def __call__(self, a: bytes, b: bytes) -> bool:
        self.calls.append((a, b))
        return _REAL_COMPARE_DIGEST(a, b)


class _HmacWithSpy:
    """The ``hmac`` module as a devicegate module sees it, with ``compare_digest`` spied on."""

    def __init__(self, spy: CompareSpy) -> None:
        self.compare_digest = spy

    def __getattr__(self, name: str) -> Any:
        return getattr(hmac, name)


@contextmanager
def spying(spy: CompareSpy) -> Iterator[None]:
    """Route devicegate's ``compare_digest`` calls through ``spy``, however it was imported."""
    with pytest.MonkeyPatch.context() as patch:
        for module in (credentials_module, tokens_module, keys_module):
            patched = False
            if isinstance(getattr(module, "hmac", None), ModuleType):
                patch.setattr(module, "hmac", _HmacWithSpy(spy))
                patched = True
            if hasattr(module, "compare_digest"):
                patch.setattr(module, "compare_digest", spy)
                patched = True
            assert patched, f"{module.__name__} no longer uses hmac.compare_digest"
        yield


def key_attempts(keys: tuple[bytes, ...], others: tuple[bytes, ...]) -> st.SearchStrategy[bytes]:
    """Non-empty single-word values: exact keys, near misses, another kind's key, junk."""
    return st.one_of(
        st.sampled_from(keys),
        st.sampled_from([miss for key in keys for miss in near_misses(key) if b" " not in miss]),
        st.sampled_from(others),
        st.binary(min_size=1, max_size=48),
    ).filter(lambda value: b" " not in value and b"\t" not in value and value.lower() != b"bearer")


@PROPERTY
@given(
    api_count=st.integers(min_value=1, max_value=4),
    mobile_count=st.integers(min_value=1, max_value=3),
    data=st.data(),
)
async def test_every_key_is_compared_on_every_key_attempt(
    api_count: int, mobile_count: int, data: st.DataObject
) -> None:
    api_keys = tuple(key.encode() for key in KEY_POOL[:api_count])
    mobile_keys = tuple(key.encode() for key in KEY_POOL[4 : 4 + mobile_count])
    config = GateConfig(
        api_keys=[key.decode() for key in api_keys],
        mobile_api_keys=[key.decode() for key in mobile_keys],
        jwt_secret=SECRET_POOL[0],
    )
    inner = InnerApp()
    middleware = DeviceAuthMiddleware(inner, config=config, token_path=None)
    if data.draw(st.booleans(), label="server key"):
        header, keys = b"x-api-key", api_keys
        candidate = data.draw(key_attempts(api_keys, mobile_keys), label="candidate")
    else:
        header, keys = b"authorization", mobile_keys
        candidate = data.draw(key_attempts(mobile_keys, api_keys), label="candidate")
    sample = RawRequest("http", "GET", "", "/whoami", [(header, candidate)], False)

    spy = CompareSpy()
    with spying(spy):
        answer = read_answer(sample, await drive(middleware, sample.scope()))
    accepted = candidate in keys

    # One comparison per configured key of that kind, whether or not (and wherever) it matched;
    # bytes against bytes, the candidate always on the same side.
    assert len(spy.calls) == len(keys)
    assert sorted(key for _, key in spy.calls) == sorted(keys)
    assert all(offered == candidate for offered, _ in spy.calls)
    assert all(type(a) is bytes and type(b) is bytes for a, b in spy.calls)
    assert answer.status == (200 if accepted else 401)
    assert bool(inner.seen) is accepted


@PROPERTY
@given(
    secret_count=st.integers(min_value=1, max_value=2),
    device=st.one_of(
        st.sampled_from(DEVICE_VALUES),
        st.sampled_from(near_misses(DEVICE.encode())),
        st.binary(max_size=24),
    ),
)
@example(secret_count=1, device=DEVICE.encode())
async def test_device_ids_are_compared_in_constant_time(secret_count: int, device: bytes) -> None:
    config = GateConfig(api_keys=API_KEYS, jwt_secret=list(SECRET_POOL[:secret_count]))
    token = TokenIssuer(config).issue(instance_id=DEVICE).access_token.encode()
    inner = InnerApp()
    middleware = DeviceAuthMiddleware(inner, config=config, token_path=None)
    headers = [(b"authorization", b"Bearer " + token), (b"x-instance-id", device)]
    sample = RawRequest("http", "GET", "", "/whoami", headers, False)
    expected_status = 200 if device == DEVICE.encode() else 401

    # First request: the secret the kid names checks the signature, then the device id is
    # compared.
    first = CompareSpy()
    with spying(first):
        answer = read_answer(sample, await drive(middleware, sample.scope()))
    assert answer.status == expected_status
    assert len(first.calls) == 2
    assert first.calls[-1] == (DEVICE.encode(), device)

    # Second request, from the verified-token cache: the device id is still compared, alone,
    # over all of the client's bytes.
    second = CompareSpy()
    with spying(second):
        answer = read_answer(sample, await drive(middleware, sample.scope()))
    assert answer.status == expected_status
    assert second.calls == [(DEVICE.encode(), device)]
    assert len(inner.seen) == (2 if expected_status == 200 else 0)


# --- the token endpoint ----------------------------------------------------------------------


@PROPERTY
@given(
    method=METHODS,
    headers=HEADER_LISTS,
    body=st.one_of(
        st.sampled_from([b"", b"{}", b'{"instance_id": "device-1"}', b'{"exp": 1}', b"[]"]),
        st.binary(max_size=64),
    ),
)
async def test_token_path_never_reaches_the_app(method: str, headers: Headers, body: bytes) -> None:
    inner = InnerApp()
    middleware = DeviceAuthMiddleware(inner, config=CONFIG, rules=RULES)
    sample = RawRequest("http", method, "", "/gen-jwt", headers, False)
    scope = sample.scope()
    sent: list[Message] = []
    inbox: list[Message] = [{"type": "http.request", "body": body}]

    async def receive() -> Message:
        return inbox.pop(0) if inbox else {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(dict(message))

    await middleware(scope, receive, send)
    answer = read_answer(sample, sent)
    assert inner.seen == []
    assert answer.status in (200, 400, 401, 403, 405, 413)
    if answer.status == 200:
        assert method == "POST"
        assert values_of(headers, b"x-api-key") in ([key] for key in API_KEY_BYTES)
        assert values_of(headers, b"authorization") == []
        assert json.loads(answer.body)["token_type"] == "Bearer"
        return  # a fresh token: every JWT starts alike, so an echo check would be meaningless
    if answer.status in (401, 403):
        challenges = values_of(answer.headers, b"www-authenticate")
        assert len(challenges) == 1
        assert challenges[0].startswith(REALM_PREFIX)
    response_bytes = [answer.body, *(value for _, value in answer.headers)]
    assert echoed([value for _, value in headers], response_bytes) == []
