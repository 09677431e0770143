"""devicegate.forward_auth.ForwardAuth: the auth service nginx, Traefik, Caddy and Envoy ask.

The central property: for any request, ForwardAuth asked about it (through the proxy's headers)
decides exactly as DeviceAuthMiddleware in front of that request would. The parity table below
runs every case through both and compares status, challenge, body and identity.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import httpx
import pytest
from starlette.types import ASGIApp, Message, Scope

from devicegate import ConfigError, CredentialKind, DeviceAuthMiddleware, Rule
from devicegate.forward_auth import FORWARD_SECRET_HEADER, ForwardAuth
from tests.helpers import Keys, RecordingApp, make_token
from tests.servers.forward_auth_app import RULES

AUTH_PATH = "/_devicegate/auth"
SECRET = "proxy-secret-" + secrets.token_urlsafe(24)


@dataclass
class Answer:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: str) -> str | None:
        values = [v.decode() for n, v in self.headers if n == name.encode()]
        assert len(values) <= 1
        return values[0] if values else None

    def json(self) -> Any:
        return json.loads(self.body)


async def call(app: ASGIApp, scope: Scope) -> Answer:
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    assert sent[0]["type"] == "http.response.start"
    body = b"".join(message.get("body", b"") for message in sent[1:])
    return Answer(sent[0]["status"], list(sent[0]["headers"]), body)


def http_scope(
    path: str, headers: Sequence[tuple[str, str]], *, raw_path: bytes | None = None
) -> Scope:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": raw_path if raw_path is not None else path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(name.lower().encode(), value.encode("latin-1")) for name, value in headers],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
    }


def ask(
    uri: str,
    headers: Sequence[tuple[str, str]] = (),
    *,
    uri_header: str = "x-original-uri",
    method_header: str = "x-original-method",
    secret: str | None = None,
) -> Scope:
    """The request a proxy sends to the forward-auth endpoint about ``uri``."""
    extra = [(uri_header, uri), (method_header, "GET")]
    if secret is not None:
        extra.append((FORWARD_SECRET_HEADER, secret))
    return http_scope(AUTH_PATH, [*headers, *extra])


def forward_auth(keys: Keys, **options: Any) -> ForwardAuth:
    options.setdefault("rules", RULES)
    return ForwardAuth(keys.config(), **options)


# -- parity with the middleware ----------------------------------------------------------------


def _cases(keys: Keys) -> list[tuple[str, str, list[tuple[str, str]]]]:
    bound = make_token(keys.jwt_secret, instance_id="device-1")
    generic = make_token(keys.jwt_secret)
    now = int(time.time())
    expired = make_token(keys.jwt_secret, {"iat": now - 600, "exp": now - 300})
    wrong_key = make_token(secrets.token_urlsafe(32), instance_id="device-1")
    tampered = bound[:-2] + ("AA" if not bound.endswith("AA") else "BB")
    server = ("x-api-key", keys.api_key)
    mobile = ("authorization", keys.mobile_api_key)
    device_1 = ("x-instance-id", "device-1")

    def bearer(token: str, scheme: str = "Bearer") -> tuple[str, str]:
        return ("authorization", f"{scheme} {token}")

    return [
        # (case, original URI as the client sent it, the client's headers)
        ("no credential", "/", []),
        ("server key", "/orders/7", [server]),
        ("mobile key", "/orders/7", [mobile]),
        ("bound token", "/orders", [bearer(bound), device_1]),
        ("bound token, lower-case scheme", "/", [bearer(bound, "bearer"), device_1]),
        ("generic token", "/", [bearer(generic)]),
        ("wrong device", "/", [bearer(bound), ("x-instance-id", "device-2")]),
        ("device case change", "/", [bearer(bound), ("x-instance-id", "DEVICE-1")]),
        ("bound token, no device header", "/", [bearer(bound)]),
        ("expired token", "/", [bearer(expired)]),
        ("wrong key", "/", [bearer(wrong_key), device_1]),
        ("tampered signature", "/", [bearer(tampered), device_1]),
        ("unknown mobile key", "/", [("authorization", "x" * 40)]),
        ("server key in Authorization", "/", [("authorization", keys.api_key)]),
        ("mobile key in x-api-key", "/", [("x-api-key", keys.mobile_api_key)]),
        ("two credentials", "/", [server, mobile]),
        ("duplicate Authorization", "/", [mobile, mobile]),
        ("unknown scheme", "/", [("authorization", "Basic dXNlcjpwYXNz")]),
        ("empty bearer", "/", [("authorization", "Bearer ")]),
        ("server key on server-only path", "/admin/users", [server]),
        ("mobile key on server-only path", "/admin/users", [mobile]),
        ("token on server-only path", "/admin/", [bearer(generic)]),
        ("server key on mobile path", "/mobile/verify", [server]),
        ("token on mobile path", "/mobile/verify", [bearer(bound), device_1]),
        ("prefix look-alike is not the rule", "/administrator", [mobile]),
        ("public path", "/health", []),
        ("public path, garbage credential", "/health", [("authorization", "Bearer !!!")]),
        ("public path, trailing slash is not public", "/health/", []),
        ("dot-dot segment", "/mobile/../admin/users", [server]),
        ("dot segment", "/./admin", [mobile]),
        ("double slash", "//admin/users", [mobile]),
        ("backslash", "/admin\\users", [mobile]),
        ("encoded dot-dot", "/mobile/%2e%2e/admin/users", [server]),
        ("encoded slash dot-dot", "/mobile%2F..%2Fadmin", [server]),
        ("encoded letter meets the rule", "/adm%69n/users", [mobile]),
        ("encoded public path", "/%68ealth", []),
        ("query is not the path", "/health?next=/admin", []),
        ("query cannot make a path public", "/admin/users?/health", [mobile]),
    ]


def _case_ids() -> list[str]:
    keys = Keys("a" * 32, "b" * 32, "c" * 32)
    return [case for case, _, _ in _cases(keys)]


@pytest.mark.parametrize("case", _case_ids())
@pytest.mark.parametrize("proxy", ["nginx", "traefik"])
async def test_forward_auth_decides_as_the_middleware(keys: Keys, case: str, proxy: str) -> None:
    _, uri, headers = next(c for c in _cases(keys) if c[0] == case)
    raw_path = uri.split("?", 1)[0]

    app = RecordingApp()
    gate = DeviceAuthMiddleware(app, config=keys.config(), rules=RULES, token_path=None)
    direct = await call(gate, http_scope(unquote(raw_path), headers, raw_path=raw_path.encode()))

    names = ("x-original-uri", "x-original-method")
    if proxy == "traefik":
        names = ("x-forwarded-uri", "x-forwarded-method")
    asked = await call(
        forward_auth(keys), ask(uri, headers, uri_header=names[0], method_header=names[1])
    )

    if direct.status == 200:
        seen = json.loads(direct.body)
        assert asked.status == 204
        assert asked.body == b""
        assert asked.header("x-devicegate-kind") == seen["kind"]
        assert asked.header("x-devicegate-instance-id") == seen["instance_id"]
        assert asked.header("cache-control") == "no-store"
        assert asked.header("www-authenticate") is None
    else:
        assert not app.ran
        assert direct.status in (400, 401, 403)
        assert asked.status == direct.status
        assert asked.header("www-authenticate") == direct.header("www-authenticate")
        assert asked.json() == direct.json()
        assert asked.header("x-devicegate-kind") is None


async def test_parity_table_covers_every_outcome(keys: Keys) -> None:
    statuses = set()
    for _, uri, headers in _cases(keys):
        statuses.add((await call(forward_auth(keys), ask(uri, headers))).status)
    assert statuses == {204, 400, 401, 403}


# -- the outcomes, spelled out -------------------------------------------------------------------


async def test_pass_answers_204_with_identity(keys: Keys) -> None:
    token = make_token(keys.jwt_secret, instance_id="phone-9")
    headers = [("authorization", f"Bearer {token}"), ("x-instance-id", "phone-9")]
    answer = await call(forward_auth(keys), ask("/mobile/verify", headers))
    assert answer.status == 204
    assert answer.body == b""
    assert answer.header("x-devicegate-kind") == "device_token"
    assert answer.header("x-devicegate-instance-id") == "phone-9"


async def test_public_path_passes_without_identity(keys: Keys) -> None:
    answer = await call(forward_auth(keys), ask("/health"))
    assert answer.status == 204
    assert answer.header("x-devicegate-kind") is None
    assert answer.header("x-devicegate-instance-id") is None


async def test_no_credential_is_a_bare_challenge(keys: Keys) -> None:
    answer = await call(forward_auth(keys), ask("/orders"))
    assert answer.status == 401
    assert answer.header("www-authenticate") == 'Bearer realm="devicegate"'
    assert answer.json() == {
        "error": "unauthorized",
        "error_description": "Authentication is required.",
    }


async def test_insufficient_scope_is_403_with_challenge(keys: Keys) -> None:
    answer = await call(
        forward_auth(keys), ask("/admin/x", [("authorization", keys.mobile_api_key)])
    )
    assert answer.status == 403
    assert 'error="insufficient_scope"' in (answer.header("www-authenticate") or "")
    assert answer.json()["error"] == "insufficient_scope"


async def test_realm_is_configurable(keys: Keys) -> None:
    answer = await call(forward_auth(keys, realm="sensecrypt"), ask("/"))
    assert answer.header("www-authenticate") == 'Bearer realm="sensecrypt"'


async def test_through_http_with_traefik_headers(keys: Keys) -> None:
    transport = httpx.ASGITransport(app=forward_auth(keys))
    async with httpx.AsyncClient(transport=transport, base_url="http://devicegate") as http:
        allowed = await http.get(
            AUTH_PATH,
            headers={
                "x-forwarded-method": "DELETE",
                "x-forwarded-uri": "/admin/users/7?force=1",
                "x-forwarded-proto": "https",
                "x-forwarded-host": "api.example",
                "x-api-key": keys.api_key,
            },
        )
        denied = await http.get(
            AUTH_PATH,
            headers={"x-forwarded-method": "GET", "x-forwarded-uri": "/admin/users"},
        )
    assert allowed.status_code == 204
    assert allowed.headers["x-devicegate-kind"] == "api_key"
    assert denied.status_code == 401
    assert denied.headers["www-authenticate"] == 'Bearer realm="devicegate"'


# -- the original request, read strictly ---------------------------------------------------------


@pytest.mark.parametrize(
    "proxy_headers",
    [
        pytest.param([], id="missing"),
        pytest.param([("x-original-uri", "/a"), ("x-original-uri", "/a")], id="repeated"),
        # Behind a proxy that sets one name, a client adds the other: never pick one.
        pytest.param([("x-original-uri", "/health"), ("x-forwarded-uri", "/admin/x")], id="both"),
        pytest.param([("x-forwarded-uri", "/a"), ("x-forwarded-uri", "/health")], id="repeated-2"),
        pytest.param([("x-original-uri", "admin")], id="relative"),
        pytest.param([("x-original-uri", "*")], id="asterisk"),
        pytest.param([("x-original-uri", "http://api.example/admin")], id="absolute-form"),
        pytest.param([("x-original-uri", "")], id="empty"),
        pytest.param([("x-original-uri", "/a"), ("x-original-method", "G ET")], id="bad-method"),
        pytest.param(
            [("x-original-uri", "/a"), ("x-original-method", "GET"), ("x-forwarded-method", "PUT")],
            id="two-methods",
        ),
    ],
)
async def test_bad_original_request_is_400(
    keys: Keys, proxy_headers: list[tuple[str, str]]
) -> None:
    scope = http_scope(AUTH_PATH, [("x-api-key", keys.api_key), *proxy_headers])
    answer = await call(forward_auth(keys), scope)
    assert answer.status == 400
    assert answer.json()["error"] == "invalid_request"
    assert 'error="invalid_request"' in (answer.header("www-authenticate") or "")
    assert answer.header("x-devicegate-kind") is None


async def test_method_is_optional(keys: Keys) -> None:
    scope = http_scope(AUTH_PATH, [("x-api-key", keys.api_key), ("x-original-uri", "/a")])
    assert (await call(forward_auth(keys), scope)).status == 204


async def test_descriptions_never_echo_the_request(keys: Keys) -> None:
    evil = "/<q9marker>/%0d%0aSet-Cookie:x"
    answer = await call(forward_auth(keys), ask(evil, [("authorization", "Bearer <q9marker>")]))
    assert answer.status == 401
    for text in (answer.body, *(value for _, value in answer.headers)):
        assert b"q9marker" not in text
        assert b"Set-Cookie" not in text


# -- the shared secret ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sent",
    [
        pytest.param([], id="missing"),
        pytest.param(["wrong-" + secrets.token_urlsafe(24)], id="wrong"),
        pytest.param([SECRET[:-1]], id="prefix"),
        pytest.param([SECRET + "x"], id="longer"),
        pytest.param([SECRET.upper()], id="case"),
        pytest.param([SECRET, SECRET], id="repeated"),
        pytest.param([SECRET, "other"], id="repeated-mixed"),
        pytest.param(["é" + SECRET], id="non-ascii"),
    ],
)
async def test_without_the_shared_secret_credentials_are_not_looked_at(
    keys: Keys, sent: list[str]
) -> None:
    # A malformed credential would be a 400 and a good one a 204: both become 403, so the
    # endpoint tells a stranger nothing about credentials.
    app = forward_auth(keys, shared_secret=SECRET)
    for credential in ([("authorization", "Bearer ")], [("x-api-key", keys.api_key)]):
        headers = [*credential, *((FORWARD_SECRET_HEADER, value) for value in sent)]
        answer = await call(app, ask("/orders", headers))
        assert answer.status == 403
        assert answer.json() == {
            "error": "forbidden",
            "error_description": "This endpoint answers only the configured proxy.",
        }
        assert answer.header("www-authenticate") is None
        assert answer.header("x-devicegate-kind") is None


async def test_with_the_shared_secret_the_decision_is_made(keys: Keys) -> None:
    app = forward_auth(keys, shared_secret=SECRET)
    allowed = await call(app, ask("/orders", [("x-api-key", keys.api_key)], secret=SECRET))
    denied = await call(app, ask("/orders", [], secret=SECRET))
    assert allowed.status == 204
    assert allowed.header("x-devicegate-kind") == "api_key"
    assert denied.status == 401


# -- other scopes, configuration -----------------------------------------------------------------


@pytest.mark.parametrize("denial_extension", [True, False])
async def test_websocket_is_refused(keys: Keys, denial_extension: bool) -> None:
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "websocket.connect"}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {**ask("/orders", [("x-api-key", keys.api_key)]), "type": "websocket"}
    if denial_extension:
        scope["extensions"] = {"websocket.http.response": {}}
    await forward_auth(keys)(scope, receive, send)
    if denial_extension:
        assert sent[0]["type"] == "websocket.http.response.start"
        assert sent[0]["status"] == 400
    else:
        assert sent == [{"type": "websocket.close", "code": 1008}]


async def test_lifespan_completes(keys: Keys) -> None:
    incoming = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[Message] = []

    async def receive() -> Message:
        return incoming.pop(0)

    async def send(message: Message) -> None:
        sent.append(message)

    await forward_auth(keys)({"type": "lifespan"}, receive, send)
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


async def test_unknown_scope_type_is_an_error(keys: Keys) -> None:
    async def receive() -> Message:
        raise AssertionError

    async def send(message: Message) -> None:
        raise AssertionError

    with pytest.raises(RuntimeError, match="scope type"):
        await forward_auth(keys)({"type": "webtransport"}, receive, send)


def test_repr_hides_the_shared_secret(keys: Keys) -> None:
    app = forward_auth(keys, shared_secret=SECRET)
    text = repr(app)
    assert SECRET not in text
    assert "shared_secret=<hidden>" in text
    assert keys.api_key not in text
    assert "Rule('/health', public=True)" in text


def test_clear_token_cache(keys: Keys) -> None:
    forward_auth(keys).clear_token_cache()


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"shared_secret": "short"}, "shared_secret"),
        ({"shared_secret": "has a space in the middle, long enough"}, "shared_secret"),
        ({"shared_secret": "é" * 20}, "shared_secret"),
        ({"shared_secret": ""}, "shared_secret"),
        ({"realm": 'bad"realm'}, "realm"),
        ({"rules": ["/health"]}, "rules"),
    ],
)
def test_bad_configuration_is_refused(keys: Keys, options: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        ForwardAuth(keys.config(), **options)
    assert caught.value.field == field


@pytest.mark.parametrize("which", ["api_key", "mobile_api_key", "jwt_secret"])
def test_shared_secret_must_not_be_a_key(keys: Keys, which: str) -> None:
    with pytest.raises(ConfigError) as caught:
        ForwardAuth(keys.config(), shared_secret=getattr(keys, which))
    assert caught.value.field == "shared_secret"
    assert getattr(keys, which) not in str(caught.value)


def test_rule_accepting_an_unconfigured_kind_is_refused(keys: Keys) -> None:
    config = keys.config().replace(mobile_api_keys=(), jwt_secret=None)
    with pytest.raises(ConfigError):
        ForwardAuth(config, rules=[Rule("/m/*", accept={CredentialKind.MOBILE_API_KEY})])
