"""devicegate wrapped around real frameworks, driven through ASGI with ``httpx.ASGITransport``.

Every framework gets the same table of outcomes (no credential, each accepted kind, a token minted
at ``/gen-jwt`` through the same app, another device's token, a kind the path does not accept,
a public path), then the integration points particular to it: Starlette's ``@requires`` and
``Mount``, FastAPI dependencies and websockets, Quart's ``asgi_app``, Litestar's
``DefineMiddleware``.

Async backends: the raw app, Starlette, FastAPI and Litestar are built on anyio and run on
asyncio and on trio. Quart calls asyncio directly (``asyncio.ensure_future`` per request; trio
needs the separate quart-trio package), so its cases run on asyncio only.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import pytest
from fastapi import Depends, FastAPI, HTTPException
from fastapi.requests import HTTPConnection
from fastapi.websockets import WebSocket
from litestar import Litestar, Request, asgi, get
from litestar.middleware import DefineMiddleware
from quart import Quart
from quart import request as quart_request
from starlette.applications import Starlette
from starlette.authentication import requires
from starlette.middleware import Middleware
from starlette.requests import Request as StarletteRequest
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from devicegate import (
    CredentialKind,
    DeviceAuthMiddleware,
    GateConfig,
    Principal,
    Rule,
    TokenEndpoint,
    get_principal,
)
from tests.helpers import (
    DENIAL_EXTENSION,
    FORBIDDEN,
    INVALID,
    MISSING,
    REALM_ONLY,
    UNSAFE_PATH,
    Answer,
    Keys,
    assert_denied,
    bad_request,
    bearer,
    call_asgi,
    client,
    make_token,
    message_types,
    mint,
    ws_scope,
)

DEVICE = "device-A"
OTHER_DEVICE = "device-B"

# The same policy for every framework: /health is public, /device/* takes device tokens only,
# everything else takes every configured kind.
RULES = (
    Rule("/health", public=True),
    Rule("/device/*", accept=[CredentialKind.DEVICE_TOKEN]),
)
ROUTE_PATHS = ("/whoami", "/health", "/device/whoami")

# Collect async tests with the anyio marker (and so the conftest's two backends) from the start,
# so that a test's own parametrize table is kept beside the backend.
pytestmark = pytest.mark.anyio


def summary(principal: Principal | None) -> dict[str, Any]:
    """What every test app answers: who devicegate said is calling."""
    return {
        "kind": None if principal is None else principal.kind.value,
        "instance_id": None if principal is None else principal.instance_id,
        "authenticated": principal is not None and principal.is_authenticated,
    }


@dataclass
class Built:
    """A framework app behind devicegate, and the paths its handlers were called for."""

    app: ASGIApp
    calls: list[str]


# --- one builder per framework ----------------------------------------------------------------


def build_raw(config: GateConfig) -> Built:
    calls: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        calls.append(scope["path"])
        body = json.dumps(summary(get_principal(scope))).encode()
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return Built(DeviceAuthMiddleware(app, config=config, rules=RULES), calls)


def build_starlette(config: GateConfig) -> Built:
    calls: list[str] = []

    async def whoami(request: StarletteRequest) -> JSONResponse:
        calls.append(request.url.path)
        assert request.user.is_authenticated is (get_principal(request) is not None)
        return JSONResponse(summary(get_principal(request)))

    app = Starlette(
        routes=[Route(path, whoami) for path in ROUTE_PATHS],
        middleware=[Middleware(DeviceAuthMiddleware, config=config, rules=RULES)],
    )
    return Built(app, calls)


def fastapi_principal(connection: HTTPConnection) -> Principal:
    """A FastAPI dependency: the caller, for HTTP routes and websockets alike."""
    principal = get_principal(connection)
    if principal is None:  # only on a public path, where no route asks for it
        raise HTTPException(status_code=401)
    return principal


CurrentPrincipal = Annotated[Principal, Depends(fastapi_principal)]


def build_fastapi(config: GateConfig) -> Built:
    calls: list[str] = []
    app = FastAPI()

    # ``def``, not ``async def``: FastAPI runs it in a worker thread (anyio.to_thread), which
    # the trio cases exercise too.
    def whoami(request: StarletteRequest, principal: CurrentPrincipal) -> dict[str, Any]:
        calls.append(request.url.path)
        return summary(principal)

    def health(request: StarletteRequest) -> dict[str, Any]:
        calls.append(request.url.path)
        return summary(get_principal(request))

    async def websocket_whoami(websocket: WebSocket, principal: CurrentPrincipal) -> None:
        calls.append(websocket.url.path)
        await websocket.accept()
        await websocket.send_json(summary(principal))
        await websocket.close()

    app.add_api_route("/whoami", whoami)
    app.add_api_route("/device/whoami", whoami)
    app.add_api_route("/health", health)
    app.add_api_websocket_route("/ws", websocket_whoami)
    app.add_middleware(DeviceAuthMiddleware, config=config, rules=RULES)
    return Built(app, calls)


def build_quart(config: GateConfig) -> Built:
    calls: list[str] = []
    app = Quart(__name__)

    async def whoami() -> dict[str, Any]:
        calls.append(quart_request.path)
        # Quart's request proxy has the ASGI scope, so get_principal reads it like any other.
        principal = get_principal(quart_request)
        assert get_principal(quart_request.scope) is principal
        return summary(principal)

    for path in ROUTE_PATHS:
        app.route(path, endpoint=path)(whoami)
    app.asgi_app = DeviceAuthMiddleware(app.asgi_app, config=config, rules=RULES)
    return Built(app, calls)


def _litestar_handlers(calls: list[str]) -> list[Any]:
    async def whoami(request: Request) -> dict[str, Any]:
        calls.append(request.url.path)
        principal = request.scope["user"]
        # Litestar's own accessor reads the same scope key devicegate writes.
        assert request.user is principal
        return summary(principal if isinstance(principal, Principal) else None)

    return [get(path)(whoami) for path in ROUTE_PATHS]


def build_litestar_wrapped(config: GateConfig) -> Built:
    calls: list[str] = []
    # logging_config=None: Litestar would otherwise configure the root logger for the process.
    app = Litestar(route_handlers=_litestar_handlers(calls), logging_config=None)
    return Built(DeviceAuthMiddleware(app, config=config, rules=RULES), calls)


def build_litestar_middleware(config: GateConfig) -> Built:
    calls: list[str] = []
    # Litestar runs app-level middleware only on requests that matched a route, so the token
    # path needs one. The middleware answers /gen-jwt itself; this endpoint is never reached.
    token_route = asgi("/gen-jwt", copy_scope=True)(TokenEndpoint(config))
    app = Litestar(
        route_handlers=[*_litestar_handlers(calls), token_route],
        middleware=[DefineMiddleware(DeviceAuthMiddleware, config=config, rules=RULES)],
        logging_config=None,
    )
    return Built(app, calls)


BUILDERS: dict[str, Callable[[GateConfig], Built]] = {
    "raw": build_raw,
    "starlette": build_starlette,
    "fastapi": build_fastapi,
    "quart": build_quart,
    "litestar-wrapped": build_litestar_wrapped,
    "litestar-middleware": build_litestar_middleware,
}
ASYNCIO_ONLY = frozenset({"quart"})

every_framework = pytest.mark.parametrize(
    ("framework", "anyio_backend"),
    [
        pytest.param(name, backend, id=f"{name}-{backend}")
        for name in BUILDERS
        for backend in ("asyncio", "trio")
        if backend == "asyncio" or name not in ASYNCIO_ONLY
    ],
)


# --- the same outcomes on every framework -----------------------------------------------------


@every_framework
async def test_no_credentials_is_401_and_app_not_called(
    framework: str, anyio_backend: str, keys: Keys
) -> None:
    built = BUILDERS[framework](keys.config())
    async with client(built.app) as http:
        for path in ("/whoami", "/device/whoami"):
            assert_denied(await http.get(path), MISSING)
    assert built.calls == []


@every_framework
async def test_server_api_key_admits(framework: str, anyio_backend: str, keys: Keys) -> None:
    built = BUILDERS[framework](keys.config())
    async with client(built.app) as http:
        response = await http.get("/whoami", headers={"x-api-key": keys.api_key})
    assert response.status_code == 200, response.text
    assert response.json() == {"kind": "api_key", "instance_id": None, "authenticated": True}
    assert built.calls == ["/whoami"]


@every_framework
async def test_mobile_api_key_admits(framework: str, anyio_backend: str, keys: Keys) -> None:
    built = BUILDERS[framework](keys.config())
    async with client(built.app) as http:
        response = await http.get("/whoami", headers={"authorization": keys.mobile_api_key})
    assert response.status_code == 200, response.text
    assert response.json() == {
        "kind": "mobile_api_key",
        "instance_id": None,
        "authenticated": True,
    }
    assert built.calls == ["/whoami"]


@every_framework
async def test_token_minted_through_the_app_admits_its_device(
    framework: str, anyio_backend: str, keys: Keys
) -> None:
    built = BUILDERS[framework](keys.config())
    async with client(built.app) as http:
        token = await mint(http, keys.api_key, DEVICE)
        assert built.calls == []  # the token endpoint answered; the app was not involved
        for path in ("/whoami", "/device/whoami"):
            response = await http.get(path, headers=bearer(token, DEVICE))
            assert response.status_code == 200, response.text
            assert response.json() == {
                "kind": "device_token",
                "instance_id": DEVICE,
                "authenticated": True,
            }
    assert built.calls == ["/whoami", "/device/whoami"]


@every_framework
async def test_generic_token_admits(framework: str, anyio_backend: str, keys: Keys) -> None:
    built = BUILDERS[framework](keys.config())
    async with client(built.app) as http:
        token = await mint(http, keys.api_key)
        response = await http.get("/whoami", headers=bearer(token))
    assert response.status_code == 200, response.text
    assert response.json() == {"kind": "device_token", "instance_id": None, "authenticated": True}


@every_framework
async def test_token_of_another_device_is_401(
    framework: str, anyio_backend: str, keys: Keys
) -> None:
    built = BUILDERS[framework](keys.config())
    async with client(built.app) as http:
        token = await mint(http, keys.api_key, OTHER_DEVICE)
        assert_denied(await http.get("/whoami", headers=bearer(token, DEVICE)), INVALID)
        # A token signed with another secret, for the right device: refused just the same.
        forged = make_token("another-secret-of-at-least-32-bytes!", instance_id=DEVICE)
        assert_denied(await http.get("/whoami", headers=bearer(forged, DEVICE)), INVALID)
    assert built.calls == []


@every_framework
async def test_kind_the_path_does_not_accept_is_403(
    framework: str, anyio_backend: str, keys: Keys
) -> None:
    built = BUILDERS[framework](keys.config())
    async with client(built.app) as http:
        for headers in ({"x-api-key": keys.api_key}, {"authorization": keys.mobile_api_key}):
            response = await http.get("/device/whoami", headers=headers)
            assert_denied(response, FORBIDDEN)
        # A device token cannot mint tokens: /gen-jwt takes the server API key only.
        token = await mint(http, keys.api_key, DEVICE)
        response = await http.post("/gen-jwt", headers=bearer(token, DEVICE), json={})
        assert_denied(response, FORBIDDEN)
    assert built.calls == []


@every_framework
async def test_public_path_needs_no_credential(
    framework: str, anyio_backend: str, keys: Keys
) -> None:
    built = BUILDERS[framework](keys.config())
    async with client(built.app) as http:
        response = await http.get("/health")
        # On a public path nothing is checked, so even a wrong key passes unread.
        wrong_key = await http.get("/health", headers={"x-api-key": "x" * 32})
    assert response.status_code == 200, response.text
    assert response.json() == {"kind": None, "instance_id": None, "authenticated": False}
    assert wrong_key.status_code == 200
    assert built.calls == ["/health", "/health"]


@every_framework
async def test_dot_segments_never_reach_the_app(
    framework: str, anyio_backend: str, keys: Keys
) -> None:
    built = BUILDERS[framework](keys.config())
    async with client(built.app) as http:
        # httpx would normalise "/health/../whoami"; a raw path reaches the app as sent.
        request = http.build_request("GET", "http://testserver/health/%2e%2e/whoami")
        response = await http.send(request)
    if framework == "litestar-middleware":
        # Litestar routes first and runs middleware on matched routes only: no route matches.
        assert response.status_code == 404
    else:
        assert_denied(response, bad_request(UNSAFE_PATH))
    assert built.calls == []


# --- Starlette --------------------------------------------------------------------------------


def starlette_requires_app(config: GateConfig) -> Starlette:
    @requires("device_token")
    async def device_only(request: StarletteRequest) -> JSONResponse:
        return JSONResponse(summary(get_principal(request)))

    @requires("api_key")
    async def server_only(request: StarletteRequest) -> JSONResponse:
        return JSONResponse(summary(get_principal(request)))

    return Starlette(
        routes=[Route("/device-only", device_only), Route("/server-only", server_only)],
        middleware=[Middleware(DeviceAuthMiddleware, config=config)],
    )


@pytest.mark.parametrize(
    ("path", "credential", "status"),
    [
        # devicegate admits every kind here; Starlette's @requires picks by kind.
        ("/device-only", "device_token", 200),
        ("/device-only", "api_key", 403),
        ("/device-only", "mobile_api_key", 403),
        ("/server-only", "api_key", 200),
        ("/server-only", "device_token", 403),
        ("/server-only", "mobile_api_key", 403),
    ],
)
async def test_starlette_requires_sees_the_credential_kind(
    keys: Keys, path: str, credential: str, status: int
) -> None:
    async with client(starlette_requires_app(keys.config())) as http:
        headers = {
            "api_key": {"x-api-key": keys.api_key},
            "mobile_api_key": {"authorization": keys.mobile_api_key},
            "device_token": bearer(await mint(http, keys.api_key, DEVICE), DEVICE),
        }[credential]
        response = await http.get(path, headers=headers)
    assert response.status_code == status, response.text
    if status == 200:
        assert response.json()["kind"] == credential
    else:
        # Starlette's own 403, not a devicegate refusal: the credential itself was fine.
        assert "www-authenticate" not in response.headers


def starlette_mounted_app(config: GateConfig, calls: list[str]) -> Starlette:
    async def whoami(request: StarletteRequest) -> JSONResponse:
        calls.append(request.url.path)
        return JSONResponse(summary(get_principal(request)))

    async def outside(request: StarletteRequest) -> JSONResponse:
        calls.append(request.url.path)
        return JSONResponse(summary(get_principal(request)))

    api = Starlette(routes=[Route(path, whoami) for path in ROUTE_PATHS])
    # Rules and token_path are written against the mounted app's own routes.
    gated = DeviceAuthMiddleware(api, config=config, rules=RULES)
    return Starlette(routes=[Mount("/api", app=gated), Route("/outside", outside)])


async def test_starlette_mount_matches_rules_below_the_mount(keys: Keys) -> None:
    calls: list[str] = []
    async with client(starlette_mounted_app(keys.config(), calls)) as http:
        assert (await http.get("/api/health")).status_code == 200
        assert_denied(await http.get("/api/whoami"), MISSING)
        response = await http.get("/api/device/whoami", headers={"x-api-key": keys.api_key})
        assert_denied(response, FORBIDDEN)

        # /gen-jwt below the mount is the token endpoint; at the top level it is not.
        assert (await http.post("/gen-jwt", headers={"x-api-key": keys.api_key})).status_code == 404
        response = await http.post(
            "/api/gen-jwt", headers={"x-api-key": keys.api_key}, json={"instance_id": DEVICE}
        )
        assert response.status_code == 200, response.text
        token = response.json()["access_token"]
        response = await http.get("/api/device/whoami", headers=bearer(token, DEVICE))
        assert response.status_code == 200, response.text
        assert response.json()["instance_id"] == DEVICE

        # Outside the mount devicegate is not in the chain at all.
        assert (await http.get("/outside")).json()["authenticated"] is False
    assert calls == ["/api/health", "/api/device/whoami", "/outside"]


async def test_starlette_principal_overwrites_an_earlier_user(keys: Keys) -> None:
    seen: list[object] = []

    async def whoami(request: StarletteRequest) -> JSONResponse:
        seen.append(request.user)
        return JSONResponse(summary(get_principal(request)))

    inner = Starlette(
        routes=[Route("/whoami", whoami)],
        middleware=[Middleware(DeviceAuthMiddleware, config=keys.config())],
    )

    async def spoofing(scope: Any, receive: Any, send: Any) -> None:
        # An outer layer (or a confused proxy adapter) that already put a "user" in the scope.
        if scope["type"] == "http":
            scope = {**scope, "user": Principal(CredentialKind.API_KEY), "auth": None}
        await inner(scope, receive, send)

    async with client(spoofing) as http:
        assert_denied(await http.get("/whoami"), MISSING)
        response = await http.get("/whoami", headers={"authorization": keys.mobile_api_key})
    assert response.json()["kind"] == "mobile_api_key"
    assert seen == [Principal(CredentialKind.MOBILE_API_KEY)]


# --- FastAPI websockets -----------------------------------------------------------------------


async def websocket_session(
    app: ASGIApp, path: str, headers: dict[str, str], *, denial_extension: bool = True
) -> list[Message]:
    """Open a websocket to ``app`` over raw ASGI and return every message the app sent.

    The scope is what uvicorn and hypercorn send; ``denial_extension`` says whether the server
    offers the websocket denial response (both do; some servers do not).
    """
    extensions = DENIAL_EXTENSION if denial_extension else {}
    return await call_asgi(app, ws_scope(path, headers, extensions=extensions))


def websocket_denial(messages: list[Message]) -> Answer:
    """The websocket denial response (an HTTP response, sent instead of ``websocket.accept``)."""
    assert message_types(messages) == [
        "websocket.http.response.start",
        "websocket.http.response.body",
    ], messages
    return Answer.of(messages)


async def test_fastapi_websocket_denied_on_the_handshake(keys: Keys) -> None:
    built = build_fastapi(keys.config())
    async with client(built.app) as http:
        token = await mint(http, keys.api_key, OTHER_DEVICE)
    no_credential = await websocket_session(built.app, "/ws", {})
    other_device = await websocket_session(built.app, "/ws", bearer(token, DEVICE))

    # A real HTTP refusal of the upgrade, sent before any websocket.accept.
    refused = websocket_denial(no_credential)
    assert refused.status == 401
    assert refused.header("www-authenticate") == REALM_ONLY
    assert refused.json()["error"] == "unauthorized"
    refused = websocket_denial(other_device)
    assert refused.status == 401
    assert 'error="invalid_token"' in (refused.header("www-authenticate") or "")
    assert refused.json()["error"] == "invalid_token"
    assert built.calls == []


async def test_fastapi_websocket_without_denial_extension_closes_1008(keys: Keys) -> None:
    built = build_fastapi(keys.config())
    messages = await websocket_session(built.app, "/ws", {}, denial_extension=False)
    assert messages == [{"type": "websocket.close", "code": 1008}]
    assert built.calls == []


async def test_fastapi_websocket_with_device_token_connects(keys: Keys) -> None:
    built = build_fastapi(keys.config())
    async with client(built.app) as http:
        token = await mint(http, keys.api_key, DEVICE)
    messages = await websocket_session(built.app, "/ws", bearer(token, DEVICE))
    assert message_types(messages) == [
        "websocket.accept",
        "websocket.send",
        "websocket.close",
    ]
    assert json.loads(messages[1]["text"]) == {
        "kind": "device_token",
        "instance_id": DEVICE,
        "authenticated": True,
    }
    assert built.calls == ["/ws"]


# --- Litestar ---------------------------------------------------------------------------------


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_litestar_unknown_path(anyio_backend: str, keys: Keys) -> None:
    # Wrapping the Litestar app denies before routing: an unknown path is 401 like any other.
    # Litestar's DefineMiddleware runs only on matched routes, so there Litestar answers 404
    # without devicegate having seen the request. Wrap the app to hide which routes exist.
    async with client(build_litestar_wrapped(keys.config()).app) as http:
        assert_denied(await http.get("/no-such-route"), MISSING)
    async with client(build_litestar_middleware(keys.config()).app) as http:
        response = await http.get("/no-such-route")
    assert response.status_code == 404
    assert "www-authenticate" not in response.headers
