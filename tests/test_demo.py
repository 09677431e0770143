"""The embedded demo app and ``build_app``, the app ``devicegate serve`` runs, in process.

The reverse proxy and the forward-auth endpoint are replaced by recording fakes installed as
``devicegate.gateway.proxy`` and ``devicegate.gateway.forward_auth``, the modules ``build_app``
imports them from: these tests check the wiring (which app answers which path, what each is
constructed with), not the proxy itself.
"""

from __future__ import annotations

import json
import re
import sys
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from devicegate import ConfigError, GateConfig, Rule
from devicegate.gateway._app import (
    ServeSettings,
    app_from_env,
    build_app,
    has_env_credentials,
    load_config,
    read_upstream_secrets,
)
from devicegate.gateway._demo import demo_app, health_app, principal_summary
from devicegate.gateway._policy import ProxyLimits
from tests.helpers import (
    DENIAL_EXTENSION,
    VENDOR_API_KEY,
    Keys,
    bearer,
    call_asgi,
    client,
    fresh_keys,
    lifespan_scope,
    make_token,
    write_json,
    write_secrets,
    ws_scope,
)

DEVICE = "device-A"

# -- fakes for the modules another part of the package provides --------------------------------


@dataclass
class FakeReverseProxy:
    upstream: str
    upstream_api_key: str | None = None
    upstream_mobile_api_key: str | None = None
    timeout: float = 30.0
    api_key_header: str = "x-api-key"
    device_header: str = "x-instance-id"
    counters: Any = None
    limits: Any = None
    scopes: list[Scope] = field(default_factory=list)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.scopes.append(scope)
        if scope["type"] == "lifespan":
            await demo_app(scope, receive, send)
            return
        body = json.dumps({"proxied": scope["path"]}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})


@dataclass
class FakeForwardAuth:
    config: GateConfig
    rules: Sequence[Rule] = ()
    shared_secret: str | None = None
    revocations: Any = None
    counters: Any = None
    scopes: list[Scope] = field(default_factory=list)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.scopes.append(scope)
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})


@dataclass
class Fakes:
    proxies: list[FakeReverseProxy] = field(default_factory=list)
    forward_auths: list[FakeForwardAuth] = field(default_factory=list)


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch) -> Fakes:
    recorded = Fakes()

    def make_proxy(upstream: str, **options: Any) -> FakeReverseProxy:
        proxy = FakeReverseProxy(upstream, **options)
        recorded.proxies.append(proxy)
        return proxy

    def make_forward_auth(config: GateConfig, **options: Any) -> FakeForwardAuth:
        endpoint = FakeForwardAuth(config, **options)
        recorded.forward_auths.append(endpoint)
        return endpoint

    proxy_module = types.ModuleType("devicegate.gateway.proxy")
    proxy_module.ReverseProxy = make_proxy  # type: ignore[attr-defined]
    forward_module = types.ModuleType("devicegate.gateway.forward_auth")
    forward_module.ForwardAuth = make_forward_auth  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "devicegate.gateway.proxy", proxy_module)
    monkeypatch.setitem(sys.modules, "devicegate.gateway.forward_auth", forward_module)
    return recorded


# -- raw ASGI drivers ---------------------------------------------------------------------------


async def run_websocket(
    app: ASGIApp, path: str, headers: Mapping[str, str] = {}, *, denial: bool = True
) -> list[Message]:
    """Drive a websocket handshake; return every message the app sent."""
    extensions = DENIAL_EXTENSION if denial else {}
    return await call_asgi(app, ws_scope(path, headers, extensions=extensions))


def secret_values(keys: Keys) -> tuple[str, ...]:
    return (keys.api_key, keys.mobile_api_key, keys.jwt_secret)


# -- the demo app alone -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "status", "body"),
    [
        ("GET", "/", 200, {"kind": None, "instance_id": None, "claims": {}}),
        ("GET", "/whoami", 200, {"kind": None, "instance_id": None, "claims": {}}),
        ("HEAD", "/whoami", 200, None),
        ("GET", "/health", 200, {"status": "ok"}),
        ("GET", "/nowhere", 404, {"error": "not_found"}),
        ("GET", "/whoami/", 404, {"error": "not_found"}),
        ("POST", "/whoami", 405, {"error": "method_not_allowed"}),
        ("DELETE", "/health", 405, {"error": "method_not_allowed"}),
    ],
)
async def test_demo_routes_without_a_principal(
    method: str, path: str, status: int, body: dict[str, Any] | None
) -> None:
    async with client(demo_app) as http:
        response = await http.request(method, path)
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert response.headers["cache-control"] == "no-store"
    if body is not None:
        assert response.json() == body
    if status == 405:
        assert response.headers["allow"] == "GET, HEAD"


async def test_demo_lifespan_completes() -> None:
    assert await call_asgi(demo_app, lifespan_scope()) == [
        {"type": "lifespan.startup.complete"},
        {"type": "lifespan.shutdown.complete"},
    ]


async def test_health_app_answers_ok_on_any_path() -> None:
    async with client(health_app) as http:
        response = await http.get("/anything")
    assert response.json() == {"status": "ok"}


async def test_demo_websocket_sends_the_principal_and_closes() -> None:
    sent = await run_websocket(demo_app, "/ws")
    assert [message["type"] for message in sent] == [
        "websocket.accept",
        "websocket.send",
        "websocket.close",
    ]
    assert json.loads(sent[1]["text"]) == {"kind": None, "instance_id": None, "claims": {}}
    assert sent[2]["code"] == 1000


async def test_demo_websocket_on_another_path_is_refused_before_accept() -> None:
    sent = await run_websocket(demo_app, "/elsewhere")
    assert sent == [{"type": "websocket.close", "code": 1000}]


def test_principal_summary_of_a_device_token(keys: Keys) -> None:
    from devicegate import TokenVerifier

    token = make_token(keys.jwt_secret, instance_id=DEVICE)
    principal = TokenVerifier(keys.config()).verify(token, DEVICE.encode())
    summary = principal_summary({"type": "http", "user": principal})
    assert summary["kind"] == "device_token"
    assert summary["instance_id"] == DEVICE
    assert summary["claims"] == dict(principal.claims)


# -- build_app: the gate around the demo --------------------------------------------------------


async def test_gate_protects_the_demo_and_health_is_public(keys: Keys) -> None:
    app = build_app(keys.config())
    async with client(app) as http:
        health = await http.get("/health")
        anonymous = await http.get("/")
        with_key = await http.get("/whoami", headers={"x-api-key": keys.api_key})
        with_mobile_key = await http.get("/", headers={"authorization": keys.mobile_api_key})
    assert health.status_code == 200
    assert health.json() == {"status": "ok"}
    assert anonymous.status_code == 401
    assert anonymous.headers["www-authenticate"] == 'Bearer realm="devicegate"'
    assert with_key.json() == {"kind": "api_key", "instance_id": None, "claims": {}}
    assert with_mobile_key.json()["kind"] == "mobile_api_key"


async def test_minted_token_calls_the_demo_and_no_secret_is_shown(keys: Keys) -> None:
    app = build_app(keys.config())
    async with client(app) as http:
        minted = await http.post(
            "/gen-jwt", headers={"x-api-key": keys.api_key}, json={"instance_id": DEVICE}
        )
        token = minted.json()["access_token"]
        response = await http.get("/whoami", headers=bearer(token, DEVICE))
        other_device = await http.get("/whoami", headers=bearer(token, "device-B"))
    assert minted.status_code == 200
    assert response.status_code == 200
    body = response.json()
    assert body["kind"] == "device_token"
    assert body["instance_id"] == DEVICE
    assert body["claims"]["instance_id"] == DEVICE
    assert set(body["claims"]) == {"iat", "exp", "jti", "instance_id"}
    for secret in secret_values(keys):
        assert secret not in response.text
    assert other_device.status_code == 401


async def test_extra_public_paths_and_the_token_path(keys: Keys) -> None:
    app = build_app(keys.config(), public=["/open/*", "/"], token_path="/mint")
    async with client(app) as http:
        open_ = await http.get("/open/anything")
        root = await http.get("/")
        whoami = await http.get("/whoami")
        minted = await http.post("/mint", headers={"x-api-key": keys.api_key})
        old_path = await http.post("/gen-jwt", headers={"x-api-key": keys.api_key})
    assert open_.status_code == 404  # reached the demo, which has no such route
    assert root.json() == {"kind": None, "instance_id": None, "claims": {}}
    assert whoami.status_code == 401
    assert minted.status_code == 200
    assert minted.json()["instance_id"] is None
    assert old_path.status_code == 404  # the demo's answer: no token endpoint there


async def test_token_endpoint_can_be_switched_off(keys: Keys) -> None:
    app = build_app(keys.config(), token_path=None)
    async with client(app) as http:
        response = await http.post("/gen-jwt", headers={"x-api-key": keys.api_key})
    assert response.status_code == 404
    assert "access_token" not in response.text


async def test_gate_websocket_needs_a_credential(keys: Keys) -> None:
    app = build_app(keys.config())
    token = make_token(keys.jwt_secret, instance_id=DEVICE)
    denied = await run_websocket(app, "/ws")
    admitted = await run_websocket(app, "/ws", bearer(token, DEVICE))
    assert denied[0] == {
        "type": "websocket.http.response.start",
        "status": 401,
        "headers": denied[0]["headers"],
    }
    assert admitted[0] == {"type": "websocket.accept"}
    summary = json.loads(admitted[1]["text"])
    assert (summary["kind"], summary["instance_id"]) == ("device_token", DEVICE)


async def test_gate_passes_lifespan_to_the_demo(keys: Keys) -> None:
    sent = await call_asgi(build_app(keys.config()), lifespan_scope())
    assert sent[-1] == {"type": "lifespan.shutdown.complete"}


@pytest.mark.parametrize("path", ["open", "/a/../b", "/a//b", "/x/*/y"])
def test_public_paths_are_validated(keys: Keys, path: str) -> None:
    with pytest.raises(ConfigError, match=r"Rule\.path"):
        build_app(keys.config(), public=[path])


# -- build_app with an upstream -----------------------------------------------------------------


async def test_upstream_gets_admitted_requests_with_its_credentials(
    keys: Keys, fakes: Fakes
) -> None:
    app = build_app(
        keys.config(),
        upstream="http://127.0.0.1:9",
        upstream_api_key="upstream-server-key",
        upstream_mobile_api_key="upstream-mobile-key",
        upstream_timeout=2.5,
        proxy_limits=ProxyLimits(connections=10),
    )
    (proxy,) = fakes.proxies
    assert proxy.upstream == "http://127.0.0.1:9"
    assert proxy.timeout == 2.5
    assert proxy.limits == ProxyLimits(connections=10)
    assert proxy.upstream_api_key == "upstream-server-key"
    assert proxy.upstream_mobile_api_key == "upstream-mobile-key"
    async with client(app) as http:
        anonymous = await http.get("/api/things")
        admitted = await http.get("/api/things", headers={"x-api-key": keys.api_key})
        health = await http.get("/health")
    assert anonymous.status_code == 401
    assert admitted.json() == {"proxied": "/api/things"}
    # The gateway answers its own health check: nothing unauthenticated reaches the upstream.
    assert health.json() == {"status": "ok"}
    assert [scope["path"] for scope in proxy.scopes] == ["/api/things"]
    assert proxy.scopes[0]["user"].kind.value == "api_key"


async def test_upstream_proxy_receives_lifespan(keys: Keys, fakes: Fakes) -> None:
    app = build_app(keys.config(), upstream="https://upstream.example")
    await call_asgi(app, lifespan_scope())
    assert [scope["type"] for scope in fakes.proxies[0].scopes] == ["lifespan"]


def test_the_proxy_strips_the_configured_credential_headers(keys: Keys, fakes: Fakes) -> None:
    build_app(
        keys.config(api_key_header="X-Server-Key", device_header="X-Device"),
        upstream="http://127.0.0.1:9",
    )
    (proxy,) = fakes.proxies
    assert (proxy.api_key_header, proxy.device_header) == ("x-server-key", "x-device")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("127.0.0.1:9000", "must be an http:// or https:// URL"),
        ("ftp://host/", "must be an http:// or https:// URL"),
        ("http://", "must be an http:// or https:// URL"),
        ("http:///path", "must be an http:// or https:// URL"),
        ("http://user:hunter2@host/", "must not carry credentials"),
    ],
)
def test_upstream_is_validated_by_the_real_proxy(keys: Keys, url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=f"^upstream: {re.escape(message)}") as info:
        build_app(keys.config(), upstream=url)
    assert "hunter2" not in str(info.value)


def test_upstream_credentials_need_an_upstream(keys: Keys) -> None:
    with pytest.raises(ConfigError, match="need an upstream"):
        build_app(keys.config(), upstream_api_key="k")
    with pytest.raises(ConfigError, match="need an upstream"):
        build_app(keys.config(), upstream_mobile_api_key="k")


# Pointing --secrets and --upstream-secrets at the same SenseCrypt file gave devices the
# upstream's own keys: they could skip the gateway and call the upstream directly.
@pytest.mark.parametrize(
    ("gate_field", "upstream_option"),
    [
        ("api_key", "upstream_api_key"),
        ("mobile_api_key", "upstream_mobile_api_key"),
        ("mobile_api_key", "upstream_api_key"),
        ("jwt_secret", "upstream_mobile_api_key"),
    ],
)
def test_the_gateway_refuses_the_upstreams_own_keys(
    keys: Keys, gate_field: str, upstream_option: str
) -> None:
    shared = {
        "api_key": keys.api_key,
        "mobile_api_key": keys.mobile_api_key,
        "jwt_secret": keys.jwt_secret,
    }[gate_field]
    upstream_keys: dict[str, str | None] = {
        "upstream_api_key": None,
        "upstream_mobile_api_key": None,
    }
    upstream_keys[upstream_option] = shared
    with pytest.raises(ConfigError, match=r"^upstream_secrets_file: the upstream ") as info:
        build_app(
            keys.config(),
            upstream="http://127.0.0.1:9",
            upstream_api_key=upstream_keys["upstream_api_key"],
            upstream_mobile_api_key=upstream_keys["upstream_mobile_api_key"],
        )
    assert shared not in str(info.value)


def test_the_gateway_refuses_the_upstreams_key_in_another_case(keys: Keys) -> None:
    with pytest.raises(ConfigError, match=r"^upstream_secrets_file: the upstream "):
        build_app(
            keys.config(), upstream="http://127.0.0.1:9", upstream_api_key=keys.api_key.swapcase()
        )


def test_the_gateway_starts_with_keys_of_its_own(keys: Keys) -> None:
    other = fresh_keys()
    app = build_app(
        keys.config(),
        upstream="http://127.0.0.1:9",
        upstream_api_key=other.api_key,
        upstream_mobile_api_key=other.mobile_api_key,
    )
    assert callable(app)


# -- build_app with a forward-auth endpoint -----------------------------------------------------


async def test_forward_auth_answers_its_path_and_the_gate_the_rest(
    keys: Keys, fakes: Fakes
) -> None:
    config = keys.config()
    app = build_app(
        config,
        public=["/open/*"],
        forward_auth_path="/_devicegate/auth",
        forward_auth_secret="proxy-shared-secret",
    )
    (endpoint,) = fakes.forward_auths
    assert endpoint.config is config
    # Only the user's public paths: /health is the gateway's own.
    assert list(endpoint.rules) == [Rule("/open/*", public=True)]
    assert endpoint.shared_secret == "proxy-shared-secret"
    async with client(app) as http:
        asked = await http.get("/_devicegate/auth")
        below = await http.get("/_devicegate/auth/x")
        health = await http.get("/health")
    assert asked.status_code == 204
    assert below.status_code == 401
    assert health.status_code == 200
    assert [scope["path"] for scope in endpoint.scopes] == ["/_devicegate/auth"]
    assert (await call_asgi(app, lifespan_scope()))[-1] == {"type": "lifespan.shutdown.complete"}
    assert endpoint.scopes[-1]["type"] == "http"


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/health", "already served"),
        ("/gen-jwt", "already served"),
        ("auth", "clean absolute path"),
        ("/a/../auth", "clean absolute path"),
        ("/auth/*", "clean absolute path"),
    ],
)
def test_forward_auth_path_is_validated(keys: Keys, fakes: Fakes, path: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_app(keys.config(), forward_auth_path=path)
    assert fakes.forward_auths == []


async def test_real_forward_auth_endpoint(keys: Keys) -> None:
    secret = "proxy-shared-secret-0123456789"
    app = build_app(
        keys.config(),
        public=["/open/*"],
        forward_auth_path="/_devicegate/auth",
        forward_auth_secret=secret,
    )
    token = make_token(keys.jwt_secret, instance_id=DEVICE)
    asked = {"x-original-uri": "/api/things?x=1", "x-devicegate-forward-secret": secret}
    async with client(app) as http:
        admitted = await http.get(
            "/_devicegate/auth",
            headers={**asked, **bearer(token, DEVICE)},
        )
        anonymous = await http.get("/_devicegate/auth", headers=asked)
        public = await http.get(
            "/_devicegate/auth", headers={**asked, "x-original-uri": "/open/page"}
        )
        health = await http.get("/_devicegate/auth", headers={**asked, "x-original-uri": "/health"})
        without_secret = await http.get(
            "/_devicegate/auth", headers={"x-original-uri": "/open/page"}
        )
    assert admitted.status_code == 204
    assert admitted.headers["x-devicegate-kind"] == "device_token"
    assert admitted.headers["x-devicegate-instance-id"] == DEVICE
    assert anonymous.status_code == 401
    assert public.status_code == 204
    assert health.status_code == 401  # /health is public on the gateway only
    assert without_secret.status_code == 403


def test_real_forward_auth_refuses_a_weak_secret(keys: Keys) -> None:
    with pytest.raises(ConfigError, match=r"^shared_secret: "):
        build_app(keys.config(), forward_auth_path="/auth", forward_auth_secret="short")


def test_forward_auth_secret_needs_a_path(keys: Keys) -> None:
    with pytest.raises(ConfigError, match=r"^forward_auth_secret: "):
        build_app(keys.config(), forward_auth_secret="s")


# -- reading the upstream's secrets.json --------------------------------------------------------


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ({"api_key": "a", "mobile_api_key": "m", "jwt_secret": "x"}, ("a", "m")),
        ({"api_key": ["a1", "a2"]}, ("a1", None)),
        ({"mobile_api_key": "m", "issuers_private_key": "..."}, (None, "m")),
        # The vendor's published example keys are the upstream's business, not ours.
        ({"api_key": VENDOR_API_KEY}, (VENDOR_API_KEY, None)),
    ],
)
def test_read_upstream_secrets(
    tmp_path: Path, document: dict[str, Any], expected: tuple[str | None, str | None]
) -> None:
    path = write_json(tmp_path / "upstream.json", document)
    assert read_upstream_secrets(path) == expected


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist"),
        ("{not json", r"is not valid JSON \(line 1, column 2\)"),
        ("[1, 2]", "must hold a JSON object"),
        ("{}", "holds neither api_key nor mobile_api_key"),
        ('{"api_key": 12}', "api_key must be a non-empty string"),
        ('{"mobile_api_key": ""}', "mobile_api_key must be a non-empty string"),
        ('{"api_key": [7]}', "api_key must be a non-empty string"),
        (b"\xff\xfe", "cannot read .*: UnicodeDecodeError"),
    ],
)
def test_read_upstream_secrets_errors(
    tmp_path: Path, content: str | bytes | None, message: str
) -> None:
    path = tmp_path / "upstream.json"
    if isinstance(content, str):
        path.write_text(content)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=f"^upstream_secrets_file: .*{message}") as info:
        read_upstream_secrets(path)
    assert info.value.__cause__ is None


@pytest.mark.parametrize(
    ("build", "what"),
    [
        # The upstream accepts every key of a rotation list, not only the one injected.
        (lambda k: {"api_key": ["upstream-own-key-0123456789", k.api_key]}, "upstream api_key"),
        (lambda k: {"mobile_api_key": [k.mobile_api_key.swapcase()]}, "upstream mobile_api_key"),
        # A shared jwt_secret: the gateway's tokens would be the upstream's too.
        (
            lambda k: {"api_key": "upstream-own-key-0123456789", "jwt_secret": k.jwt_secret},
            "upstream jwt_secret",
        ),
    ],
)
def test_upstream_secrets_sharing_any_value_with_the_gate_are_refused(
    tmp_path: Path, keys: Keys, build: Callable[[Keys], dict[str, Any]], what: str
) -> None:
    path = write_json(tmp_path / "upstream.json", build(keys))
    with pytest.raises(ConfigError, match=f"^upstream_secrets_file: the {what} is also") as info:
        read_upstream_secrets(path, keys.config())
    for secret in (keys.api_key, keys.mobile_api_key, keys.jwt_secret):
        assert secret not in str(info.value)


def test_upstream_secrets_of_their_own_are_read_with_the_gate(tmp_path: Path, keys: Keys) -> None:
    other = fresh_keys()
    document = {
        "api_key": [other.api_key, "upstream-old-key-0123456789"],
        "mobile_api_key": other.mobile_api_key,
        "jwt_secret": other.jwt_secret,
    }
    path = write_json(tmp_path / "upstream.json", document)
    assert read_upstream_secrets(path, keys.config()) == (other.api_key, other.mobile_api_key)


def test_read_upstream_secrets_of_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        read_upstream_secrets(tmp_path)


# -- settings that travel to worker processes through the environment --------------------------


def test_settings_from_an_empty_environment() -> None:
    assert ServeSettings.from_env({}) == ServeSettings()
    assert ServeSettings().token_path == "/gen-jwt"


def test_settings_from_the_environment() -> None:
    settings = ServeSettings.from_env(
        {
            "DEVICEGATE_SECRETS_FILE": " /etc/devicegate/secrets.json ",
            "DEVICEGATE_UPSTREAM": "http://127.0.0.1:9000",
            "DEVICEGATE_UPSTREAM_SECRETS_FILE": "/etc/sensecrypt/secrets.json",
            "DEVICEGATE_PUBLIC": "/a, /b/*,,",
            "DEVICEGATE_FORWARD_AUTH_PATH": "/_devicegate/auth",
            "DEVICEGATE_FORWARD_AUTH_SECRET_ENV": "PROXY_SECRET",
            "DEVICEGATE_TOKEN_PATH": "None",
        }
    )
    assert settings == ServeSettings(
        secrets_file="/etc/devicegate/secrets.json",
        upstream="http://127.0.0.1:9000",
        upstream_secrets_file="/etc/sensecrypt/secrets.json",
        public=("/a", "/b/*"),
        forward_auth_path="/_devicegate/auth",
        forward_auth_secret_env="PROXY_SECRET",
        token_path=None,
    )


@pytest.mark.parametrize(
    "settings",
    [
        ServeSettings(),
        ServeSettings(secrets_file="/s.json", public=("/a", "/b/*"), token_path="/mint"),
        ServeSettings(
            upstream="http://u",
            upstream_secrets_file="/u.json",
            forward_auth_path="/auth",
            forward_auth_secret_env="X",
            token_path=None,
        ),
    ],
)
def test_settings_round_trip_through_the_environment(settings: ServeSettings) -> None:
    assert ServeSettings.from_env(settings.to_env()) == settings


def test_settings_refuse_a_public_path_with_a_comma() -> None:
    with pytest.raises(ConfigError, match="cannot contain ','"):
        ServeSettings(public=("/a,b",)).to_env()


def test_load_config_from_a_file_with_environment_overrides(tmp_path: Path, keys: Keys) -> None:
    path = write_secrets(tmp_path / "secrets.json", keys)
    config = load_config(path, {"DEVICEGATE_DEVICE_HEADER": "X-Device"})
    assert config.api_keys == (keys.api_key,)
    assert config.device_header == "x-device"
    assert load_config(None, {"DEVICEGATE_SECRETS_FILE": str(path)}).api_keys == (keys.api_key,)
    with pytest.raises(ConfigError, match="no credential is configured"):
        load_config(None, {})


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, False),
        ({"DEVICEGATE_API_KEYS": "  "}, False),
        ({"DEVICEGATE_SECRETS_FILE": "s.json"}, False),
        ({"DEVICEGATE_API_KEYS": "k"}, True),
        ({"DEVICEGATE_MOBILE_API_KEYS": "k"}, True),
        ({"DEVICEGATE_JWT_SECRET": "k"}, True),
    ],
)
def test_has_env_credentials(environ: dict[str, str], expected: bool) -> None:
    assert has_env_credentials(environ) is expected


async def test_settings_build_reads_files_and_the_named_secret(
    tmp_path: Path, keys: Keys, fakes: Fakes
) -> None:
    upstream_file = write_json(
        tmp_path / "upstream.json", {"api_key": "up-a", "mobile_api_key": "up-m"}
    )
    settings = ServeSettings(
        secrets_file=str(write_secrets(tmp_path / "secrets.json", keys)),
        upstream="http://127.0.0.1:9",
        upstream_secrets_file=str(upstream_file),
        forward_auth_path="/auth",
        forward_auth_secret_env="PROXY_SECRET",
    )
    settings.build({"PROXY_SECRET": "shared"})
    assert (fakes.proxies[0].upstream_api_key, fakes.proxies[0].upstream_mobile_api_key) == (
        "up-a",
        "up-m",
    )
    assert fakes.forward_auths[0].shared_secret == "shared"
    for environ in ({}, {"PROXY_SECRET": ""}):
        with pytest.raises(ConfigError, match="PROXY_SECRET is not set or empty"):
            settings.build(environ)


async def test_app_from_env_builds_what_the_environment_says(
    tmp_path: Path, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_secrets(tmp_path / "secrets.json", keys)
    for name, value in ServeSettings(secrets_file=str(path), public=("/",)).to_env().items():
        monkeypatch.setenv(name, value)
    app = app_from_env()
    async with client(app) as http:
        root = await http.get("/")
        whoami = await http.get("/whoami", headers={"x-api-key": keys.api_key})
    assert root.json()["kind"] is None
    assert whoami.json()["kind"] == "api_key"


# -- regressions: the gateway's own paths ---------------------------------------------------------


async def test_health_with_a_trailing_slash_does_not_reach_the_upstream(
    keys: Keys, fakes: Fakes
) -> None:
    # Rule("/health") covers /health/ as well: public, so it must be answered here, never
    # forwarded without a credential.
    app = build_app(keys.config(), upstream="http://127.0.0.1:9")
    (proxy,) = fakes.proxies
    async with client(app) as http:
        for path in ("/health", "/health/"):
            assert (await http.get(path)).json() == {"status": "ok"}
    assert proxy.scopes == []


async def test_websocket_to_health_never_reaches_the_http_health_app(
    keys: Keys, fakes: Fakes
) -> None:
    # health_app speaks HTTP only: given a websocket scope it sent http.response.start, and the
    # server answered 500 with a traceback. The handshake goes on to the proxy, which refuses
    # it (tests/test_proxy.py checks the real one).
    app = build_app(keys.config(), upstream="http://127.0.0.1:9")
    (proxy,) = fakes.proxies
    for path in ("/health", "/health/"):
        await run_websocket(app, path)
    assert [(scope["type"], scope["path"]) for scope in proxy.scopes] == [
        ("websocket", "/health"),
        ("websocket", "/health/"),
    ]


async def test_forward_auth_path_matches_both_slash_spellings(keys: Keys, fakes: Fakes) -> None:
    app = build_app(keys.config(), forward_auth_path="/_devicegate/auth")
    (endpoint,) = fakes.forward_auths
    async with client(app) as http:
        assert (await http.get("/_devicegate/auth/")).status_code == 204
    assert [scope["path"] for scope in endpoint.scopes] == ["/_devicegate/auth/"]


@pytest.mark.parametrize("path", ["/gen-jwt", "/gen-jwt/", "/health", "/health/"])
def test_forward_auth_path_cannot_hide_a_path_the_gateway_serves(keys: Keys, path: str) -> None:
    # The switch matches both slash spellings, so "/gen-jwt/" would answer POST /gen-jwt.
    with pytest.raises(ConfigError) as info:
        build_app(keys.config(), forward_auth_path=path)
    assert info.value.field == "forward_auth_path"
