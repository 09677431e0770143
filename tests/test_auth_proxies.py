"""Real proxies asking a real devicegate about every request: nginx (``auth_request``) and Caddy.

nginx runs with ``docs/nginx.conf.example`` itself and Caddy with ``docs/Caddyfile.example``
(only their addresses and shared secret are replaced), so the documented configurations are the
tested ones. devicegate runs two ways: the library (``ForwardAuth`` with path rules,
``tests/servers/forward_auth_app.py``) and the command line (``devicegate serve
--forward-auth-path``). Each request's outcome through a proxy is compared with what
DeviceAuthMiddleware decides for the same request in-process.

Both proxies are required: the tests fail, never skip, when a binary is missing (``.ci/run`` and
the README's test command install Debian's ``nginx`` and ``caddy`` packages).
"""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import anyio
import httpx
import pytest
from joserfc.jwk import ECKey
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from devicegate import DeviceAuthMiddleware, Rule
from devicegate._dpop import NONCE_PERIOD_SECONDS, Nonces, nonce_key
from tests.helpers import (
    REALM_ONLY,
    Answer,
    Keys,
    RecordingApp,
    answer,
    bearer,
    fresh_keys,
    http_scope,
    make_token,
    mint,
    write_secrets,
)
from tests.servers.forward_auth_app import FORWARD_AUTH_PATH, RULES, SECRET_ENV
from tests.servers.process import (
    HOST,
    ROOT,
    Server,
    async_client,
    bound_port,
    devicegate_command,
    seen_by,
    serve,
    uvicorn_command,
)
from tests.test_dpop import proof as dpop_proof

NGINX_EXAMPLE = ROOT / "docs" / "nginx.conf.example"
CADDY_EXAMPLE = ROOT / "docs" / "Caddyfile.example"
# What the examples say, and what the tests put in its place.
DEVICEGATE_ADDRESS = "server 127.0.0.1:8000;"
API_ADDRESS = "server 127.0.0.1:9000;"
LISTEN = "listen 127.0.0.1:8080;"
SECRET_PLACEHOLDER = "REPLACE-WITH-THE-SHARED-SECRET"
CADDY_SITE = "api.example.com {"
CADDY_DEVICEGATE = "reverse_proxy 127.0.0.1:8000"
CADDY_API = "reverse_proxy 127.0.0.1:9000"
CADDY_SECRET_ENV = "DEVICEGATE_FORWARD_SECRET"
CLI_RULES = (Rule("/health", public=True),)
PROXIES = ("nginx", "caddy")
PUBLIC_URL = "https://api.example.com"


def binary(name: str) -> str:
    """The path of a proxy's binary; a missing one fails the test (it must run, never skip)."""
    found = shutil.which(name) or (
        f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None
    )
    if found is None:
        pytest.fail(
            f"{name} is not installed; install it (Debian/Ubuntu: apt-get install -y {name}). "
            "These tests must run, never skip."
        )
    return found


def nginx_site(devicegate_port: int, api_port: int, listen_port: int, secret: str) -> str:
    """docs/nginx.conf.example with the test's addresses and secret."""
    text = NGINX_EXAMPLE.read_text()
    for placeholder in (DEVICEGATE_ADDRESS, API_ADDRESS, LISTEN):
        assert text.count(placeholder) == 1, f"docs/nginx.conf.example lost {placeholder!r}"
    assert SECRET_PLACEHOLDER in text
    return (
        text.replace(DEVICEGATE_ADDRESS, f"server {HOST}:{devicegate_port};")
        .replace(API_ADDRESS, f"server {HOST}:{api_port};")
        .replace(LISTEN, f"listen {HOST}:{listen_port};")
        .replace(SECRET_PLACEHOLDER, secret)
    )


def nginx_main(directory: Path) -> str:
    """The main nginx.conf: everything nginx writes stays inside ``directory``."""
    temp = {name: directory / name for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi")}
    for path in temp.values():
        path.mkdir(exist_ok=True)
    return f"""
daemon off;
master_process off;
worker_processes 1;
pid {directory}/nginx.pid;
error_log {directory}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {directory}/access.log;
    client_body_temp_path {temp["body"]};
    proxy_temp_path {temp["proxy"]};
    fastcgi_temp_path {temp["fastcgi"]};
    uwsgi_temp_path {temp["uwsgi"]};
    scgi_temp_path {temp["scgi"]};
    include {directory}/devicegate.conf;
}}
"""


@contextlib.contextmanager
def running_nginx(
    directory: Path, *, devicegate_port: int, api_port: int, secret: str
) -> Iterator[Server]:
    nginx = binary("nginx")
    directory.mkdir(parents=True, exist_ok=True)

    def command(port: int) -> list[str]:
        site = nginx_site(devicegate_port, api_port, port, secret)
        (directory / "devicegate.conf").write_text(site)
        (directory / "nginx.conf").write_text(nginx_main(directory))
        return [
            nginx,
            "-p", str(directory),
            "-c", str(directory / "nginx.conf"),
            "-e", str(directory / "error.log"),
        ]  # fmt: skip

    with serve(command, directory / "nginx.out") as server:
        yield server


def caddy_site(devicegate_port: int, api_port: int, listen_port: int) -> str:
    """docs/Caddyfile.example with the test's addresses, served over plain HTTP, and global
    options that keep Caddy's admin endpoint off."""
    text = CADDY_EXAMPLE.read_text()
    for placeholder, count in ((CADDY_SITE, 1), (CADDY_DEVICEGATE, 2), (CADDY_API, 1)):
        assert text.count(placeholder) == count, f"docs/Caddyfile.example lost {placeholder!r}"
    assert "{env." + CADDY_SECRET_ENV + "}" in text
    site = (
        text.replace(CADDY_SITE, f"http://{HOST}:{listen_port} {{")
        .replace(CADDY_DEVICEGATE, f"reverse_proxy {HOST}:{devicegate_port}")
        .replace(CADDY_API, f"reverse_proxy {HOST}:{api_port}")
    )
    return "{\n\tadmin off\n}\n\n" + site


@contextlib.contextmanager
def running_caddy(
    directory: Path, *, devicegate_port: int, api_port: int, secret: str
) -> Iterator[Server]:
    caddy = binary("caddy")
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "Caddyfile"

    def command(port: int) -> list[str]:
        config.write_text(caddy_site(devicegate_port, api_port, port))
        return [caddy, "run", "--config", str(config), "--adapter", "caddyfile"]

    # Everything Caddy writes (its autosaved configuration, certificate storage) stays inside
    # ``directory``.
    env = {
        CADDY_SECRET_ENV: secret,
        "HOME": str(directory),
        "XDG_CONFIG_HOME": str(directory / "config"),
        "XDG_DATA_HOME": str(directory / "data"),
    }
    with serve(command, directory / "caddy.out", env=env) as server:
        yield server


def running_proxy(
    kind: str, directory: Path, *, devicegate_port: int, api_port: int, secret: str
) -> contextlib.AbstractContextManager[Server]:
    """nginx or Caddy, run with its documented configuration in ``directory``."""
    start = running_nginx if kind == "nginx" else running_caddy
    return start(directory, devicegate_port=devicegate_port, api_port=api_port, secret=secret)


@dataclass
class Stack:
    """A proxy (nginx or Caddy) in front of the echo API, asking a devicegate run with
    ``rules``."""

    kind: str
    proxy: Server
    devicegate: Server
    upstream: Server
    keys: Keys
    secret: str
    rules: Sequence[Rule]

    async def expected(self, raw_target: str, headers: Sequence[tuple[str, str]]) -> Answer:
        """What DeviceAuthMiddleware, in-process with the same rules, answers."""
        app = RecordingApp()
        gate = DeviceAuthMiddleware(
            app, config=self.keys.config(), rules=self.rules, token_path=None
        )
        raw_path = raw_target.split("?", 1)[0]
        scope = http_scope(unquote(raw_path), headers, raw_path=raw_path.encode())
        answered = await answer(gate, scope)
        assert app.ran == (answered.status == 200)
        return answered


@pytest.fixture(scope="module")
def keys_for_stack() -> Keys:
    return fresh_keys()


@pytest.fixture(scope="module")
def api(starts_a_process: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("api") / "echo.log"
    with serve(uvicorn_command("tests.servers.echo:app"), log) as server:
        yield server


@pytest.fixture(
    scope="module",
    params=[(proxy, runs) for proxy in PROXIES for runs in ("library", "cli")],
    ids=lambda param: "-".join(param),
)
def stack(
    starts_a_process: None,
    request: pytest.FixtureRequest,
    api: Server,
    keys_for_stack: Keys,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    keys = keys_for_stack
    kind, runs = request.param
    secret = secrets.token_urlsafe(32)
    directory = tmp_path_factory.mktemp(f"{kind}-{runs}")
    # DPoP proofs name the public URL (the proxy's, behind TLS), and carry server nonces.
    env = {SECRET_ENV: secret, "DEVICEGATE_PUBLIC_URL": PUBLIC_URL, "DEVICEGATE_DPOP_NONCE": "true"}
    command: Callable[[int], list[str]]
    if runs == "library":
        env.update(
            DEVICEGATE_API_KEYS=keys.api_key,
            DEVICEGATE_MOBILE_API_KEYS=keys.mobile_api_key,
            DEVICEGATE_JWT_SECRET=keys.jwt_secret,
        )
        command = uvicorn_command(
            "tests.servers.forward_auth_app:create_app", "--factory", "--lifespan", "off"
        )
        rules: Sequence[Rule] = RULES
    else:
        secrets_file = write_secrets(directory / "secrets.json", keys)

        command = devicegate_command(
            "--secrets", str(secrets_file),
            "--forward-auth-path", FORWARD_AUTH_PATH,
            "--forward-auth-secret-env", SECRET_ENV,
            "--public", "/health",
            "--log-level", "warning",
        )  # fmt: skip
        rules = CLI_RULES
    with (
        serve(command, directory / "devicegate.log", env=env) as devicegate,
        running_proxy(
            kind,
            directory / kind,
            devicegate_port=devicegate.port,
            api_port=api.port,
            secret=secret,
        ) as proxy,
    ):
        yield Stack(kind, proxy, devicegate, api, keys, secret, rules)


async def fetch(
    http: httpx.AsyncClient,
    target: str,
    headers: Sequence[tuple[str, str]] = (),
    *,
    method: str = "GET",
    content: bytes | None = None,
) -> httpx.Response:
    """Send ``target`` byte for byte (httpx would otherwise normalise dot segments)."""
    request = http.build_request(
        method, "/", headers=list(headers), content=content,
        extensions={"target": target.encode()},
    )  # fmt: skip
    return await http.send(request)


def received(response: httpx.Response) -> dict[str, list[str]]:
    """The headers the API received, from its echo."""
    assert response.status_code == 200, response.text
    headers: dict[str, list[str]] = {}
    for name, value in response.json()["headers"]:
        headers.setdefault(name, []).append(value)
    return headers


# -- nginx behaves as the middleware -------------------------------------------------------------


def _cases(keys: Keys) -> list[tuple[str, str, list[tuple[str, str]]]]:
    bound = make_token(keys.jwt_secret, instance_id="device-1")
    generic = make_token(keys.jwt_secret)
    expired = make_token(keys.jwt_secret, {"iat": 1_000_000, "exp": 1_000_300})
    server = ("x-api-key", keys.api_key)
    mobile = ("authorization", keys.mobile_api_key)
    device_1 = ("x-instance-id", "device-1")
    token = ("authorization", f"Bearer {bound}")
    return [
        ("no credential", "/orders", []),
        ("server key", "/orders/7", [server]),
        ("mobile key", "/orders/7", [mobile]),
        ("bound token, right device", "/mobile/verify", [token, device_1]),
        ("generic token", "/", [("authorization", f"Bearer {generic}")]),
        ("wrong device", "/mobile/verify", [token, ("x-instance-id", "device-2")]),
        ("bound token, no device header", "/mobile/verify", [token]),
        ("expired token", "/orders", [("authorization", f"Bearer {expired}")]),
        ("unknown mobile key", "/orders", [("authorization", "k" * 40)]),
        ("unknown scheme", "/orders", [("authorization", "Basic dXNlcjpwYXNz")]),
        ("two credentials", "/orders", [server, mobile]),
        ("server key on server-only path", "/admin/users", [server]),
        ("mobile key on server-only path", "/admin/users", [mobile]),
        ("server key on mobile path", "/mobile/verify", [server]),
        ("public path", "/health", []),
        ("public path, query", "/health?next=/admin/users", []),
        ("dot-dot segment", "/mobile/../admin/users", [server]),
        ("double slash", "//admin/users", [mobile]),
        ("encoded dot-dot", "/mobile/%2e%2e/admin/users", [server]),
        ("encoded letter meets the rule", "/adm%69n/users", [mobile]),
    ]


def _case_ids() -> list[str]:
    return [case for case, _, _ in _cases(Keys("a" * 32, "b" * 32, "c" * 32))]


@pytest.mark.parametrize("case", _case_ids())
async def test_proxy_decides_as_the_middleware(stack: Stack, case: str) -> None:
    _, target, headers = next(c for c in _cases(stack.keys) if c[0] == case)
    marker = secrets.token_hex(8)
    target += ("&" if "?" in target else "?") + f"probe={marker}"
    expected = await stack.expected(target, headers)
    async with async_client(stack.proxy.url) as http:
        response = await fetch(http, target, headers)
    if expected.status == 200:
        seen = expected.json()
        got = received(response)
        assert got.get("x-devicegate-kind", [None]) == [seen["kind"]]
        assert got.get("x-devicegate-instance-id", [None]) == [seen["instance_id"]]
        for credential in ("authorization", "x-api-key", "x-instance-id"):
            assert credential not in got
    else:
        assert response.status_code == expected.status
        assert response.headers.get("www-authenticate") == expected.header("www-authenticate")
        assert response.headers["content-type"] == "application/json"
        assert response.json() == expected.json()
        # A refused request never reaches the API.
        assert not [t for t in await seen_by(stack.upstream) if marker in t]


async def test_parity_table_covers_every_outcome(stack: Stack) -> None:
    statuses = set()
    for _, target, headers in _cases(stack.keys):
        statuses.add((await stack.expected(target, headers)).status)
    wanted = {200, 400, 401, 403} if stack.rules is RULES else {200, 400, 401}
    assert statuses == wanted


# -- the rest of the documented behaviour --------------------------------------------------------


# nginx forwards $request_uri as received, so the API may split it otherwise than devicegate's
# decoded judgement: "/admin#x" reached Express-style routers as /admin with a mobile key.
@pytest.mark.parametrize("target", ["/admin#x", "/admin/users#", "/mobile%2Fx", "/admin%5Cusers"])
async def test_a_target_the_api_may_split_otherwise_never_reaches_it(
    stack: Stack, target: str
) -> None:
    marker = secrets.token_hex(8)
    headers = [("authorization", stack.keys.mobile_api_key)]
    async with async_client(stack.proxy.url) as http:
        response = await fetch(http, f"{target}?probe={marker}", headers)
    if stack.kind == "caddy" and "#" in target:
        # Caddy passes a '#' on encoded (%23), to devicegate and to the API alike: the API
        # routes by the very path devicegate judged, '#' included.
        expected = await stack.expected(target.replace("#", "%23"), headers)
        assert response.status_code == expected.status
        if expected.status == 200:
            assert response.json()["path"] == target
        else:
            assert not [t for t in await seen_by(stack.upstream) if marker in t]
        return
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"
    assert not [t for t in await seen_by(stack.upstream) if marker in t]


async def test_minted_token_works_through_the_proxy(stack: Stack) -> None:
    async with async_client(stack.proxy.url) as http:
        token = await mint(http, stack.keys.api_key, "phone-5")
        allowed = await http.get("/mobile/verify", headers=bearer(token, "phone-5"))
        other_phone = await http.get("/mobile/verify", headers=bearer(token, "phone-6"))
        mobile_mints = await http.post(
            "/gen-jwt", headers={"authorization": stack.keys.mobile_api_key}, json={}
        )
    got = received(allowed)
    assert got["x-devicegate-kind"] == ["device_token"]
    assert got["x-devicegate-instance-id"] == ["phone-5"]
    assert other_phone.status_code == 401
    assert 'error="invalid_token"' in other_phone.headers["www-authenticate"]
    assert mobile_mints.status_code == 403
    assert mobile_mints.json()["error"] == "insufficient_scope"


async def test_client_cannot_name_another_uri(stack: Stack) -> None:
    spoofed = [
        ("x-original-uri", "/health"),
        ("x-original-method", "GET"),
        ("x-forwarded-uri", "/health"),
        ("x-forwarded-method", "GET"),
    ]
    async with async_client(stack.proxy.url) as http:
        response = await fetch(http, "/orders", spoofed)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == REALM_ONLY


async def test_dpop_proofs_are_checked_for_the_original_request(stack: Stack) -> None:
    # The proxy asks about the client's method and URI: the proof must name those, with the
    # public URL, and the server nonce devicegate hands out reaches the client.
    key = ECKey.generate_key("P-256")
    async with async_client(stack.proxy.url) as http:
        minted = await http.post(
            "/gen-jwt",
            headers={"x-api-key": stack.keys.api_key},
            json={"instance_id": "phone-7", "dpop_jkt": key.thumbprint()},
        )
        token = minted.json()["access_token"]
        headers = {"authorization": f"DPoP {token}", "x-instance-id": "phone-7"}
        url = f"{PUBLIC_URL}/mobile/verify"

        async def send(proof_: str, method: str = "GET") -> httpx.Response:
            return await http.request(method, "/mobile/verify", headers={**headers, "dpop": proof_})

        asked = await send(dpop_proof(key, token, url=url))
        nonce = asked.headers["dpop-nonce"]
        once = dpop_proof(key, token, url=url, nonce=nonce)
        admitted = await send(once)
        replayed = await send(once)
        other_url = await send(dpop_proof(key, token, url=f"{PUBLIC_URL}/mobile/x", nonce=nonce))
        other_method = await send(dpop_proof(key, token, url=url, nonce=nonce), "DELETE")
        key_material = nonce_key([stack.keys.api_key, stack.keys.jwt_secret])
        aged = Nonces(key_material, clock=lambda: time.time() - NONCE_PERIOD_SECONDS).current()
        offered = await send(dpop_proof(key, token, url=url, nonce=aged))
    assert asked.status_code == 401
    assert 'error="use_dpop_nonce"' in asked.headers["www-authenticate"]
    got = received(admitted)
    assert got["x-devicegate-instance-id"] == ["phone-7"]
    assert "dpop" not in got  # the proof stops at the proxy, as the token does
    assert "authorization" not in got
    for refused in (replayed, other_url, other_method):
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"].startswith('DPoP realm="devicegate"')
        assert refused.json()["error"] == "invalid_dpop_proof"
    assert offered.status_code == 200
    if stack.kind == "nginx":  # Caddy's example passes devicegate's headers on refusals only
        assert offered.headers["dpop-nonce"] == nonce
    assert "dpop-nonce" not in admitted.headers


async def test_client_identity_headers_never_reach_the_api(stack: Stack) -> None:
    headers = [
        ("x-api-key", stack.keys.api_key),
        ("x-devicegate-kind", "device_token"),
        ("x-devicegate-instance-id", "victim-phone"),
        ("x-devicegate-forward-secret", "guess"),
    ]
    async with async_client(stack.proxy.url) as http:
        got = received(await fetch(http, "/orders", headers))
    assert got["x-devicegate-kind"] == ["api_key"]
    assert "x-devicegate-instance-id" not in got
    assert "x-devicegate-forward-secret" not in got


async def test_client_path_and_forwarding_claims_never_reach_the_api(stack: Stack) -> None:
    # The gateway drops these; behind nginx they rode along to the API on an admitted request.
    claims = [
        ("x-original-url", "/admin/users"),
        ("x-rewrite-url", "/admin/users"),
        ("x-original-uri", "/admin/users"),
        ("x-forwarded-uri", "/admin/users"),
        ("x-forwarded-prefix", "/admin"),
        ("x-forwarded-path", "/admin"),
        ("x-forwarded-method", "DELETE"),
        ("x-forwarded-port", "443"),
        ("x-forwarded-ssl", "on"),
        ("x-forwarded-server", "evil.example"),
        ("x-forwarded-scheme", "https"),
        ("x-forwarded-protocol", "https"),
        ("x-forwarded-client-cert", "Subject=claimed"),
        ("x-original-host", "evil.example"),
        ("forwarded", "for=203.0.113.9;host=evil.example"),
        ("x-forwarded-host", "evil.example"),
        ("x-real-ip", "203.0.113.9"),
    ]
    async with async_client(stack.proxy.url) as http:
        response = await fetch(
            http, "/mobile/x", [("authorization", stack.keys.mobile_api_key), *claims]
        )
    got = received(response)
    assert got["x-devicegate-kind"] == ["mobile_api_key"]
    for name in ("x-original-url", "x-rewrite-url", "x-original-uri", "x-forwarded-uri"):
        assert name not in got
    for name in ("x-forwarded-prefix", "x-forwarded-path", "x-forwarded-method"):
        assert name not in got
    for name in ("x-forwarded-port", "x-forwarded-ssl", "x-forwarded-server", "x-original-host"):
        assert name not in got
    for name in ("x-forwarded-scheme", "x-forwarded-protocol", "x-forwarded-client-cert"):
        assert name not in got
    assert "forwarded" not in got
    # What the proxy itself saw: nginx sends the host without the port and X-Real-IP, Caddy
    # the host with the port and no X-Real-IP.
    if stack.kind == "nginx":
        assert got["x-forwarded-host"] == ["127.0.0.1"]
        assert got["x-real-ip"] == ["127.0.0.1"]
    else:
        assert got["x-forwarded-host"] == [f"127.0.0.1:{stack.proxy.port}"]
        assert "x-real-ip" not in got


async def test_api_errors_pass_through_untouched(stack: Stack) -> None:
    async with async_client(stack.proxy.url) as http:
        unauthorized = await http.get("/status/401", headers={"x-api-key": stack.keys.api_key})
        failed = await http.get("/status/500", headers={"x-api-key": stack.keys.api_key})
    # The API's own 401 and 500 are its answers, not devicegate's: the proxy must not re-ask.
    assert unauthorized.status_code == 401
    assert unauthorized.json()["path"] == "/status/401"
    assert "www-authenticate" not in unauthorized.headers
    assert failed.status_code == 500
    assert failed.json()["path"] == "/status/500"


async def test_request_bodies_reach_the_api(stack: Stack) -> None:
    payload = secrets.token_bytes(256 * 1024)
    async with async_client(stack.proxy.url) as http:
        allowed = await http.post(
            "/orders", content=payload, headers={"x-api-key": stack.keys.api_key}
        )
        refused = await http.post("/orders", content=payload)
    assert allowed.json()["body_length"] == len(payload)
    assert allowed.json()["method"] == "POST"
    assert refused.status_code == 401
    assert refused.json()["error"] == "unauthorized"


async def test_forward_auth_endpoint_is_internal(stack: Stack) -> None:
    headers = {"x-original-uri": "/orders", "x-api-key": stack.keys.api_key}
    async with async_client(stack.proxy.url) as http:
        through_proxy = await http.get(FORWARD_AUTH_PATH, headers=headers)
    async with async_client(stack.devicegate.url) as http:
        without_secret = await http.get(FORWARD_AUTH_PATH, headers=headers)
        with_secret = await http.get(
            FORWARD_AUTH_PATH, headers={**headers, "x-devicegate-forward-secret": stack.secret}
        )
    if stack.kind == "nginx":
        assert through_proxy.status_code == 404  # `internal`: clients cannot reach it
    else:
        # Caddy sends every path but /gen-jwt to the API: there, the path is the API's.
        assert received(through_proxy)["x-devicegate-kind"] == ["api_key"]
        assert through_proxy.json()["path"] == FORWARD_AUTH_PATH
    assert without_secret.status_code == 403
    assert without_secret.json()["error"] == "forbidden"
    assert with_secret.status_code == 204
    assert with_secret.headers["x-devicegate-kind"] == "api_key"


@pytest.mark.parametrize("kind", PROXIES)
async def test_devicegate_down_fails_closed(
    kind: str, api: Server, keys_for_stack: Keys, tmp_path: Path
) -> None:
    # A bound socket that never listens stands for a stopped devicegate.
    with (
        bound_port() as dead,
        running_proxy(
            kind,
            tmp_path / kind,
            devicegate_port=dead,
            api_port=api.port,
            secret=secrets.token_urlsafe(32),
        ) as proxy,
    ):
        marker = secrets.token_hex(8)
        async with async_client(proxy.url) as http:
            response = await http.get(
                f"/orders?probe={marker}", headers={"x-api-key": keys_for_stack.api_key}
            )
    assert response.status_code == 502
    assert not [t for t in await seen_by(api) if marker in t]


@pytest.mark.parametrize(
    ("fence", "example"),
    [("nginx", NGINX_EXAMPLE), ("caddyfile", CADDY_EXAMPLE)],
    ids=["nginx", "caddy"],
)
def test_deployment_guide_shows_the_tested_configuration(fence: str, example: Path) -> None:
    guide = (ROOT / "docs" / "deployment.md").read_text()
    blocks = guide.split(f"```{fence}\n")[1:]
    shown = [block.split("```", 1)[0] for block in blocks]
    assert example.read_text() in shown, f"docs/deployment.md must show docs/{example.name}"


# -- websockets and methods that are never forwarded ---------------------------------------------


def websocket_echo(stack: Stack, target: str, headers: Sequence[tuple[str, str]]) -> Any:
    """Open a websocket through the proxy: the echo API's message, or the refusal's status."""
    try:
        with connect(
            f"ws://{HOST}:{stack.proxy.port}{target}",
            additional_headers=list(headers),
            open_timeout=30,
            proxy=None,
        ) as websocket:
            return json.loads(websocket.recv(timeout=30))
    except InvalidStatus as refused:
        return refused.response.status_code


async def test_websockets_are_judged_and_forwarded(stack: Stack) -> None:
    token = make_token(stack.keys.jwt_secret, instance_id="device-1")
    marker = secrets.token_hex(8)
    admitted = await anyio.to_thread.run_sync(
        websocket_echo,
        stack,
        "/mobile/ws",
        [("authorization", f"Bearer {token}"), ("x-instance-id", "device-1")],
    )
    refused = await anyio.to_thread.run_sync(
        websocket_echo, stack, f"/mobile/ws?probe={marker}", []
    )
    assert admitted["path"] == "/mobile/ws"
    got = dict(admitted["headers"])
    assert got["x-devicegate-kind"] == "device_token"
    assert got["x-devicegate-instance-id"] == "device-1"
    assert "authorization" not in got
    assert "x-instance-id" not in got
    assert refused == 401
    assert not [t for t in await seen_by(stack.upstream) if marker in t]


@pytest.mark.parametrize(
    ("method", "target", "extra"),
    [
        # TRACE (and IIS's TRACK) reflect the request; a CONNECT's host:port target is no path
        # (Caddy names it "/"); frameworks that honour an override field would run TRACE.
        pytest.param("TRACE", "/health", [], id="trace"),
        pytest.param("TRACK", "/health", [], id="track"),
        pytest.param("CONNECT", "127.0.0.1:{port}", [], id="connect"),
        pytest.param("GET", "/health", [("x-http-method-override", "TRACE")], id="override"),
    ],
)
async def test_methods_never_forwarded_never_reach_the_api(
    stack: Stack, method: str, target: str, extra: list[tuple[str, str]]
) -> None:
    marker = secrets.token_hex(8)
    if method == "CONNECT":
        target = target.format(port=secrets.randbelow(50_000) + 10_000)
        marker = target
    else:
        target += f"?probe={marker}"
    async with async_client(stack.proxy.url) as http:
        response = await fetch(
            http, target, [("x-api-key", stack.keys.api_key), *extra], method=method
        )
    if stack.kind == "nginx" and method in ("TRACE", "CONNECT"):
        # nginx's own refusals, before it asks devicegate.
        assert response.status_code == (405 if method == "TRACE" else 400)
    else:
        assert response.status_code == 405
        assert response.json()["error"] == "method_not_allowed"
        assert response.headers["allow"] == "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
    assert not [t for t in await seen_by(stack.upstream) if marker in t]


@pytest.mark.parametrize(
    "connection",
    ["x-devicegate-instance-id", "keep-alive, X-Devicegate-Kind", "Upgrade, x-devicegate-kind"],
)
async def test_the_client_connection_field_cannot_drop_the_identity(
    stack: Stack, connection: str
) -> None:
    # A proxy drops the fields a Connection field names: the client's must not name ours.
    token = make_token(stack.keys.jwt_secret, instance_id="device-1")
    headers = [
        ("authorization", f"Bearer {token}"),
        ("x-instance-id", "device-1"),
        ("connection", connection),
        ("upgrade", "h2c"),
    ]
    async with async_client(stack.proxy.url) as http:
        got = received(await fetch(http, "/mobile/verify", headers))
    assert got["x-devicegate-kind"] == ["device_token"]
    assert got["x-devicegate-instance-id"] == ["device-1"]


@pytest.mark.parametrize(
    "upgrades",
    [
        pytest.param(["h2c"], id="h2c"),
        pytest.param(["websocket, h2c"], id="listed-after-websocket"),
        pytest.param(["TLS/1.2"], id="tls"),
        # A proxy that checked any of the values, then upgraded by the first, would pass h2c.
        pytest.param(["h2c", "websocket"], id="two-fields"),
    ],
)
async def test_no_upgrade_but_websocket_reaches_the_api(stack: Stack, upgrades: list[str]) -> None:
    # After a 101 to "Upgrade: h2c" the connection would carry HTTP/2 requests straight to the
    # API, none of them judged: the proxies pass on no upgrade but a websocket one.
    headers = [
        ("connection", "Upgrade, HTTP2-Settings"),
        *[("upgrade", upgrade) for upgrade in upgrades],
        ("http2-settings", "AAMAAABkAAQAoAAAAAIAAAAA"),
    ]
    async with async_client(stack.proxy.url) as http:
        got = received(await fetch(http, "/health", headers))
    assert "upgrade" not in got
    assert "connection" not in got


# -- regressions: look-alike header names ----------------------------------------------------------


async def test_look_alike_identity_headers_never_reach_the_api(stack: Stack) -> None:
    # CGI, WSGI and PHP read X_Devicegate_Kind and X.Devicegate.Kind as X-Devicegate-Kind.
    # nginx drops such names by default (ignore_invalid_headers on, underscores_in_headers
    # off), which docs/deployment.md relies on: keep those defaults. The Caddyfile deletes
    # them.
    headers = [
        ("x-api-key", stack.keys.api_key),
        ("x_devicegate_kind", "claimed-kind"),
        ("X.Devicegate.Instance.Id", "victim-phone"),
        ("x-devicegate_instance-id", "victim-phone"),
        ("x_api_key", "claimed-key"),
        ("x_instance_id", "victim-phone"),
    ]
    async with async_client(stack.proxy.url) as http:
        got = received(await fetch(http, "/orders", headers))
    names = {"".join(c if c.isalnum() else "-" for c in name) for name in got}
    assert got["x-devicegate-kind"] == ["api_key"]
    assert "x-devicegate-instance-id" not in names
    assert "x-instance-id" not in names
    for values in got.values():
        assert "victim-phone" not in values
        assert "claimed-kind" not in values
        assert "claimed-key" not in values
