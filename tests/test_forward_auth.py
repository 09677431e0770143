"""devicegate.gateway.forward_auth: the auth service nginx, Traefik, Caddy and Envoy ask.

The central property: for any request, ForwardAuth asked about it (through the proxy's headers)
decides exactly as DeviceAuthMiddleware in front of that request would. The parity table below
runs every case through both and compares status, challenge, body and identity.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import unquote

import pytest
from starlette.types import Scope

from devicegate import ConfigError, CredentialKind, DeviceAuthMiddleware, Rule
from devicegate.gateway.forward_auth import FORWARD_SECRET_HEADER, ForwardAuth
from tests.helpers import (
    DENIAL_EXTENSION,
    Keys,
    RecordingApp,
    answer,
    bearer,
    call_asgi,
    client,
    count_verifications,
    http_scope,
    make_token,
    message_types,
    no_receive,
    no_send,
)
from tests.servers.forward_auth_app import RULES

AUTH_PATH = "/_devicegate/auth"
SECRET = "proxy-secret-" + secrets.token_urlsafe(24)


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

    def authorization(token: str, scheme: str = "Bearer") -> tuple[str, str]:
        return ("authorization", f"{scheme} {token}")

    return [
        # (case, original URI as the client sent it, the client's headers)
        ("no credential", "/", []),
        ("server key", "/orders/7", [server]),
        ("mobile key", "/orders/7", [mobile]),
        ("bound token", "/orders", [authorization(bound), device_1]),
        ("bound token, lower-case scheme", "/", [authorization(bound, "bearer"), device_1]),
        ("generic token", "/", [authorization(generic)]),
        ("wrong device", "/", [authorization(bound), ("x-instance-id", "device-2")]),
        ("device case change", "/", [authorization(bound), ("x-instance-id", "DEVICE-1")]),
        ("bound token, no device header", "/", [authorization(bound)]),
        ("expired token", "/", [authorization(expired)]),
        ("wrong key", "/", [authorization(wrong_key), device_1]),
        ("tampered signature", "/", [authorization(tampered), device_1]),
        ("unknown mobile key", "/", [("authorization", "x" * 40)]),
        ("server key in Authorization", "/", [("authorization", keys.api_key)]),
        ("mobile key in x-api-key", "/", [("x-api-key", keys.mobile_api_key)]),
        ("two credentials", "/", [server, mobile]),
        ("duplicate Authorization", "/", [mobile, mobile]),
        ("unknown scheme", "/", [("authorization", "Basic dXNlcjpwYXNz")]),
        ("empty bearer", "/", [("authorization", "Bearer ")]),
        ("server key on server-only path", "/admin/users", [server]),
        ("mobile key on server-only path", "/admin/users", [mobile]),
        ("token on server-only path", "/admin/", [authorization(generic)]),
        ("server key on mobile path", "/mobile/verify", [server]),
        ("token on mobile path", "/mobile/verify", [authorization(bound), device_1]),
        ("prefix look-alike is not the rule", "/administrator", [mobile]),
        ("public path", "/health", []),
        ("public path, garbage credential", "/health", [("authorization", "Bearer !!!")]),
        # Rules cover both slash spellings: Rule("/health") matches /health/ too, and
        # Rule("/admin/*") matches the bare /admin (routers serve one as the other).
        ("public path, trailing slash is public too", "/health/", []),
        ("prefix rule covers the bare directory", "/admin", [mobile]),
        ("dot-dot segment", "/mobile/../admin/users", [server]),
        ("dot segment", "/./admin", [mobile]),
        ("double slash", "//admin/users", [mobile]),
        ("backslash", "/admin\\users", [mobile]),
        ("encoded dot-dot", "/mobile/%2e%2e/admin/users", [server]),
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
    direct = await answer(gate, http_scope(unquote(raw_path), headers, raw_path=raw_path.encode()))

    names = ("x-original-uri", "x-original-method")
    if proxy == "traefik":
        names = ("x-forwarded-uri", "x-forwarded-method")
    asked = await answer(
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
        statuses.add((await answer(forward_auth(keys), ask(uri, headers))).status)
    assert statuses == {204, 400, 401, 403}


# -- the outcomes, spelled out -------------------------------------------------------------------


async def test_pass_answers_204_with_identity(keys: Keys) -> None:
    token = make_token(keys.jwt_secret, instance_id="phone-9")
    headers = [("authorization", f"Bearer {token}"), ("x-instance-id", "phone-9")]
    answered = await answer(forward_auth(keys), ask("/mobile/verify", headers))
    assert answered.status == 204
    assert answered.body == b""
    assert answered.header("x-devicegate-kind") == "device_token"
    assert answered.header("x-devicegate-instance-id") == "phone-9"


@pytest.mark.parametrize("path", ["/health", "/health/"])
async def test_public_path_passes_without_identity(keys: Keys, path: str) -> None:
    answered = await answer(forward_auth(keys), ask(path))
    assert answered.status == 204
    assert answered.header("x-devicegate-kind") is None
    assert answered.header("x-devicegate-instance-id") is None


@pytest.mark.parametrize("path", ["/admin", "/admin/", "/admin/users"])
async def test_prefix_rule_covers_the_bare_directory(keys: Keys, path: str) -> None:
    mobile = [("authorization", keys.mobile_api_key)]
    refused = await answer(forward_auth(keys), ask(path, mobile))
    admitted = await answer(forward_auth(keys), ask(path, [("x-api-key", keys.api_key)]))
    assert refused.status == 403
    assert admitted.status == 204
    assert admitted.header("x-devicegate-kind") == "api_key"


async def test_no_credential_is_a_bare_challenge(keys: Keys) -> None:
    answered = await answer(forward_auth(keys), ask("/orders"))
    assert answered.status == 401
    assert answered.header("www-authenticate") == 'Bearer realm="devicegate"'
    assert answered.json() == {
        "error": "unauthorized",
        "error_description": "Authentication is required.",
    }


async def test_insufficient_scope_is_403_with_challenge(keys: Keys) -> None:
    answered = await answer(
        forward_auth(keys), ask("/admin/x", [("authorization", keys.mobile_api_key)])
    )
    assert answered.status == 403
    assert 'error="insufficient_scope"' in (answered.header("www-authenticate") or "")
    assert answered.json()["error"] == "insufficient_scope"


async def test_realm_is_configurable(keys: Keys) -> None:
    answered = await answer(forward_auth(keys, realm="sensecrypt"), ask("/"))
    assert answered.header("www-authenticate") == 'Bearer realm="sensecrypt"'


async def test_through_http_with_traefik_headers(keys: Keys) -> None:
    async with client(forward_auth(keys), "http://devicegate") as http:
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


NO_URI = "The proxy did not send the original URI (X-Original-URI or X-Forwarded-Uri)."
REPEATED_URI = "The original URI is given more than once."
BAD_URI = "The original URI is not an absolute path."
BAD_METHOD = "The original method is malformed or given more than once."

# The headers a proxy names the original request with, as the endpoint reads them: the rows
# answered 204 (None) are the spellings nginx and Traefik send, each one exactly once; every
# other row is a 400 invalid_request with that description, whatever credential rides along.
ORIGINAL_REQUESTS = [
    # -- Accepted: nginx's names, Traefik's names, and a URI without a method. --
    pytest.param([("x-original-uri", "/a"), ("x-original-method", "GET")], None, id="nginx"),
    pytest.param([("x-forwarded-uri", "/a"), ("x-forwarded-method", "GET")], None, id="traefik"),
    pytest.param([("x-original-uri", "/a")], None, id="uri-without-method"),
    # -- The URI: exactly one, under either name, an absolute path. --
    pytest.param([], NO_URI, id="missing"),
    pytest.param([("x-original-uri", "/a"), ("x-original-uri", "/a")], REPEATED_URI, id="repeated"),
    # Behind a proxy that sets one name, a client adds the other: never pick one.
    pytest.param(
        [("x-original-uri", "/health"), ("x-forwarded-uri", "/admin/x")], REPEATED_URI, id="both"
    ),
    pytest.param(
        [("x-forwarded-uri", "/a"), ("x-forwarded-uri", "/health")], REPEATED_URI, id="repeated-2"
    ),
    pytest.param([("x-original-uri", "admin")], BAD_URI, id="relative"),
    pytest.param([("x-original-uri", "*")], BAD_URI, id="asterisk"),
    pytest.param([("x-original-uri", "http://api.example/admin")], BAD_URI, id="absolute-form"),
    pytest.param([("x-original-uri", "")], BAD_URI, id="empty"),
    # -- The method: at most one, an RFC 9110 token. --
    pytest.param(
        [("x-original-uri", "/a"), ("x-original-method", "G ET")], BAD_METHOD, id="bad-method"
    ),
    pytest.param(
        [("x-original-uri", "/a"), ("x-original-method", "GET"), ("x-forwarded-method", "PUT")],
        BAD_METHOD,
        id="two-methods",
    ),
]


@pytest.mark.parametrize(("proxy_headers", "refusal"), ORIGINAL_REQUESTS)
async def test_the_original_request_is_read_strictly(
    keys: Keys, proxy_headers: list[tuple[str, str]], refusal: str | None
) -> None:
    scope = http_scope(AUTH_PATH, [("x-api-key", keys.api_key), *proxy_headers])
    answered = await answer(forward_auth(keys), scope)
    if refusal is None:
        assert answered.status == 204
        assert answered.body == b""
        assert answered.header("x-devicegate-kind") == "api_key"
        return
    assert answered.status == 400
    assert answered.json() == {"error": "invalid_request", "error_description": refusal}
    assert answered.header("www-authenticate") == (
        f'Bearer realm="devicegate", error="invalid_request", error_description="{refusal}"'
    )
    assert answered.header("x-devicegate-kind") is None


# As the gateway refuses them: TRACE (and IIS's TRACK) reflect the request to the client, and
# Caddy names a CONNECT's host:port target "/", which a public root rule would have let through.
@pytest.mark.parametrize("method", ["TRACE", "TRACK", "CONNECT", "connect", "Trace"])
@pytest.mark.parametrize("method_header", ["x-original-method", "x-forwarded-method"])
async def test_methods_never_forwarded_are_405(keys: Keys, method: str, method_header: str) -> None:
    public_root = forward_auth(keys, rules=[Rule("/", public=True)])
    for credentials in ([], [("x-api-key", keys.api_key)]):
        scope = http_scope(
            AUTH_PATH, [*credentials, ("x-forwarded-uri", "/"), (method_header, method)]
        )
        answered = await answer(public_root, scope)
        assert answered.status == 405
        assert answered.json()["error"] == "method_not_allowed"
        assert answered.header("allow") == "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
        assert answered.header("x-devicegate-kind") is None


@pytest.mark.parametrize(
    "override", ["x-http-method-override", "x-http-method", "x-method-override"]
)
async def test_a_method_override_naming_such_a_method_is_405(keys: Keys, override: str) -> None:
    public_root = forward_auth(keys, rules=[Rule("/", public=True)])
    for value, status in [(" trace ", 405), ("TRACK", 405), ("Connect", 405), ("DELETE", 204)]:
        scope = http_scope(
            AUTH_PATH, [(override, value), ("x-forwarded-uri", "/"), ("x-forwarded-method", "GET")]
        )
        assert (await answer(public_root, scope)).status == status


async def test_the_shared_secret_is_checked_before_the_method(keys: Keys) -> None:
    gate = forward_auth(keys, shared_secret=SECRET)
    scope = http_scope(AUTH_PATH, [("x-original-uri", "/"), ("x-original-method", "TRACE")])
    assert (await answer(gate, scope)).status == 403


@pytest.mark.parametrize(
    ("uri", "status"),
    [
        # A control character in the path is refused before any credential is looked at.
        ("/<q9marker>/%0d%0aSet-Cookie:x", 400),
        ("/<q9marker>/orders", 401),
    ],
)
async def test_descriptions_never_echo_the_request(keys: Keys, uri: str, status: int) -> None:
    evil_credential = [("authorization", "Bearer <q9marker>")]
    answered = await answer(forward_auth(keys), ask(uri, evil_credential))
    assert answered.status == status
    for text in (answered.body, *(value for _, value in answered.headers)):
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
        answered = await answer(app, ask("/orders", headers))
        assert answered.status == 403
        assert answered.json() == {
            "error": "forbidden",
            "error_description": "This endpoint answers only the configured proxy.",
        }
        assert answered.header("www-authenticate") is None
        assert answered.header("x-devicegate-kind") is None


async def test_with_the_shared_secret_the_decision_is_made(keys: Keys) -> None:
    app = forward_auth(keys, shared_secret=SECRET)
    allowed = await answer(app, ask("/orders", [("x-api-key", keys.api_key)], secret=SECRET))
    denied = await answer(app, ask("/orders", [], secret=SECRET))
    assert allowed.status == 204
    assert allowed.header("x-devicegate-kind") == "api_key"
    assert denied.status == 401


# -- other scopes, configuration -----------------------------------------------------------------


@pytest.mark.parametrize("denial_extension", [True, False])
async def test_websocket_is_refused(keys: Keys, denial_extension: bool) -> None:
    scope = {**ask("/orders", [("x-api-key", keys.api_key)]), "type": "websocket"}
    if denial_extension:
        scope["extensions"] = DENIAL_EXTENSION
    sent = await call_asgi(forward_auth(keys), scope)
    if denial_extension:
        assert sent[0]["type"] == "websocket.http.response.start"
        assert sent[0]["status"] == 400
    else:
        assert sent == [{"type": "websocket.close", "code": 1008}]


async def test_lifespan_completes(keys: Keys) -> None:
    sent = await call_asgi(forward_auth(keys), {"type": "lifespan"})
    assert message_types(sent) == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


async def test_unknown_scope_type_is_an_error(keys: Keys) -> None:
    with pytest.raises(RuntimeError, match="scope type"):
        await forward_auth(keys)({"type": "webtransport"}, no_receive, no_send)


def test_repr_hides_the_shared_secret(keys: Keys) -> None:
    app = forward_auth(keys, shared_secret=SECRET)
    text = repr(app)
    assert SECRET not in text
    assert "shared_secret=<hidden>" in text
    assert keys.api_key not in text
    assert "Rule('/health', public=True)" in text


async def test_clear_token_cache_forces_a_full_verification(keys: Keys) -> None:
    endpoint = forward_auth(keys)
    verifier = count_verifications(endpoint._gate, endpoint.config)
    token = make_token(keys.jwt_secret, instance_id="device-1")
    scope = ask("/orders", list(bearer(token, "device-1").items()))
    statuses = [(await answer(endpoint, scope)).status for _ in range(2)]
    assert verifier.full_verifications == 1  # the second answer came from the cache
    endpoint.clear_token_cache()
    assert verifier.cache_size == 0
    statuses += [(await answer(endpoint, scope)).status for _ in range(2)]
    assert statuses == [204] * 4
    assert verifier.full_verifications == 2  # verified in full once more, then cached again


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"shared_secret": "short"}, "shared_secret"),
        ({"shared_secret": "has a space in the middle, long enough"}, "shared_secret"),
        ({"shared_secret": "é" * 20}, "shared_secret"),
        ({"shared_secret": ""}, "shared_secret"),
        ({"shared_secret": "a" * 40}, "shared_secret"),  # a placeholder, as for keys
        # The placeholder of our own nginx example, copied as it is.
        ({"shared_secret": "REPLACE-WITH-THE-SHARED-SECRET"}, "shared_secret"),
        ({"realm": 'bad"realm'}, "realm"),
        ({"rules": ["/health"]}, "rules"),
    ],
)
def test_bad_configuration_is_refused(keys: Keys, options: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        ForwardAuth(keys.config(), **options)
    assert caught.value.field == field


@pytest.mark.parametrize("which", ["api_key", "mobile_api_key", "jwt_secret"])
@pytest.mark.parametrize("spelling", [str, str.swapcase], ids=["same", "other-case"])
def test_shared_secret_must_not_be_a_key(
    keys: Keys, which: str, spelling: Callable[[str], str]
) -> None:
    with pytest.raises(ConfigError) as caught:
        ForwardAuth(keys.config(), shared_secret=spelling(getattr(keys, which)))
    assert caught.value.field == "shared_secret"
    assert getattr(keys, which) not in str(caught.value)


def test_rule_accepting_an_unconfigured_kind_is_refused(keys: Keys) -> None:
    config = keys.config().replace(mobile_api_keys=(), jwt_secret=None)
    with pytest.raises(ConfigError):
        ForwardAuth(config, rules=[Rule("/m/*", accept={CredentialKind.MOBILE_API_KEY})])


# -- regressions: log flooding ------------------------------------------------------------------


async def test_requests_without_the_proxy_secret_cannot_flood_the_log(
    keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    # Anyone who reaches the endpoint can send these: one WARNING line each let a client fill
    # the disk. Logged at DEBUG, as the middleware logs its refusals.
    endpoint = ForwardAuth(keys.config(), shared_secret=SECRET)
    headers = {"x-original-uri": "/orders", "x-api-key": keys.api_key}
    with caplog.at_level("DEBUG", logger="devicegate"):
        async with client(endpoint, "http://auth") as http:
            statuses = {(await http.get(AUTH_PATH, headers=headers)).status_code for _ in range(50)}
    assert statuses == {403}
    assert [record.levelname for record in caplog.records] == ["DEBUG"] * 50


# nginx passes $request_uri on byte for byte, and the app behind it may split it otherwise than
# the decoded path judged here: "/admin#x" (a mobile key, refused on /admin/*) was judged as no
# rule's path and admitted, then routed to /admin by any app that parses URLs; "%2F" is a
# separator once decoded but part of one segment to routers that match the raw path.
@pytest.mark.parametrize(
    "uri",
    [
        "/admin#x",
        "/admin/#",
        "/admin/users#",
        "/public%2Facme/reports",
        "/public%2facme/reports",
        "/mobile%5Cx",
        "/mobile%5cx",
        "/a/b%2F..%2F..%2Fadmin?q=1",
        "/mobile%2F..%2Fadmin",
    ],
)
async def test_a_path_the_app_may_split_otherwise_is_400(keys: Keys, uri: str) -> None:
    for credential in [("authorization", keys.mobile_api_key)], [("x-api-key", keys.api_key)]:
        answered = await answer(forward_auth(keys), ask(uri, credential))
        assert answered.status == 400
        assert answered.json() == {
            "error": "invalid_request",
            "error_description": (
                "The original URI has an encoded slash or backslash, or a '#', in its path."
            ),
        }
        assert answered.header("x-devicegate-kind") is None


@pytest.mark.parametrize("uri", ["/admin?next=#x", "/admin/users?q=%2F", "/orders/%2B1/%23"])
async def test_encoded_characters_that_split_nothing_are_judged_as_usual(
    keys: Keys, uri: str
) -> None:
    # A '#' or '%2F' in the query, and other encoded characters in the path, mean the same to
    # every router: the server key passes, the mobile key is refused on /admin/*.
    server = await answer(forward_auth(keys), ask(uri, [("x-api-key", keys.api_key)]))
    assert server.status == 204
    mobile = await answer(forward_auth(keys), ask(uri, [("authorization", keys.mobile_api_key)]))
    assert mobile.status == (403 if uri.startswith("/admin") else 204)
