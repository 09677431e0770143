"""devicegate.fastapi: the dependencies and the OpenAPI security schemes, through the real
middleware in front of a FastAPI app (``httpx.ASGITransport``).

The OpenAPI document is read as Swagger UI reads it, and requests are sent as Swagger UI sends
them after "Authorize": :func:`swagger_headers` follows swagger-js's ``applySecurities``
(src/execute/oas3/build-request.js), which, for every security requirement of the operation,
applies each scheme the user authorized: an ``apiKey`` in a header becomes that header, an
``http`` ``bearer`` scheme becomes ``Authorization: Bearer <value>``.

Unlike the other test modules, this one does not postpone annotations (``from __future__ import
annotations``): FastAPI reads a route's ``Annotated[Principal, Security(...)]`` at run time,
and the routes here are built inside a function, around a local ``gate`` that a postponed
annotation could not see.
"""

import importlib
import sys
from collections.abc import Mapping
from typing import Annotated, Any

import pytest
from fastapi import FastAPI, Security
from fastapi.websockets import WebSocket

from devicegate import (
    ConfigError,
    CredentialKind,
    DeviceAuthMiddleware,
    GateConfig,
    InsufficientScope,
    Principal,
    Rule,
    TokenIssuer,
)
from devicegate.fastapi import DeviceGateSecurity, RefusalException, refusal_handler
from tests.helpers import (
    FORBIDDEN,
    INVALID,
    MISSING,
    Keys,
    assert_denied,
    call_asgi,
    client,
    message_types,
    ws_scope,
)

pytestmark = pytest.mark.anyio

DEVICE = "device-1"
API_KEY, MOBILE_API_KEY, DEVICE_TOKEN = (
    CredentialKind.API_KEY,
    CredentialKind.MOBILE_API_KEY,
    CredentialKind.DEVICE_TOKEN,
)
DOCS_RULES = [
    Rule("/openapi.json", public=True),
    Rule("/docs", public=True),
    Rule("/docs/oauth2-redirect", public=True),
]


class Built:
    """A FastAPI app behind devicegate, and the routes that ran."""

    def __init__(
        self,
        config: GateConfig,
        *,
        realm: str = "devicegate",
        handler: bool = True,
        middleware: bool = True,
    ) -> None:
        gate = DeviceGateSecurity(config, realm=realm)
        self.ran: list[str] = []
        handlers: Any = {RefusalException: refusal_handler} if handler else {}
        app = FastAPI(exception_handlers=handlers)
        if middleware:
            app.add_middleware(
                DeviceAuthMiddleware,
                config=config,
                realm=realm,
                rules=[
                    *DOCS_RULES,
                    Rule("/public", public=True),
                    Rule("/welcome", optional=True),
                ],
            )
        ran = self.ran

        def answer(route: str, who: Principal | None) -> dict[str, Any]:
            ran.append(route)
            if who is None:
                return {"kind": None}
            return {"kind": who.kind, "device": who.instance_id}

        # Every kind the configuration has, then one kind per route; /public is a public path
        # whose route still demands a principal; /welcome greets whoever comes.
        @app.get("/me")
        def me(who: Annotated[Principal, Security(gate.require())]) -> dict[str, Any]:
            return answer("/me", who)

        @app.get("/device")
        def device(
            who: Annotated[Principal, Security(gate.require(DEVICE_TOKEN))],
        ) -> dict[str, Any]:
            return answer("/device", who)

        @app.get("/server")
        def server(who: Annotated[Principal, Security(gate.require(API_KEY))]) -> dict[str, Any]:
            return answer("/server", who)

        @app.get("/keys")
        def keys(
            who: Annotated[Principal, Security(gate.require(API_KEY, "mobile_api_key"))],
        ) -> dict[str, Any]:
            return answer("/keys", who)

        @app.get("/public")
        def public(who: Annotated[Principal, Security(gate.require())]) -> dict[str, Any]:
            return answer("/public", who)

        @app.get("/welcome")
        def welcome(
            who: Annotated[Principal | None, Security(gate.optional(DEVICE_TOKEN))],
        ) -> dict[str, Any]:
            return answer("/welcome", who)

        @app.get("/plain")
        def plain() -> dict[str, Any]:
            return answer("/plain", None)

        @app.websocket("/ws")
        async def ws(
            websocket: WebSocket, who: Annotated[Principal, Security(gate.require(DEVICE_TOKEN))]
        ) -> None:
            ran.append("/ws")
            await websocket.accept()
            await websocket.send_json({"kind": who.kind})
            await websocket.close()

        self.app = app


def device_token(keys: Keys) -> str:
    return TokenIssuer(keys.config()).issue(instance_id=DEVICE).access_token


def swagger_headers(
    document: Mapping[str, Any], path: str, authorized: Mapping[str, str]
) -> dict[str, str]:
    """The headers Swagger UI sends to ``GET path`` once the user authorized ``authorized``
    (scheme name -> the value typed in the "Authorize" dialog)."""
    operation = document["paths"][path]["get"]
    schemes = document.get("components", {}).get("securitySchemes", {})
    headers: dict[str, str] = {}
    for requirement in operation.get("security", document.get("security", [])):
        for name in requirement:
            if name not in authorized:
                continue
            scheme = schemes[name]
            if scheme["type"] == "apiKey" and scheme["in"] == "header":
                headers[scheme["name"]] = authorized[name]
            elif scheme["type"] == "http" and scheme["scheme"] == "bearer":
                headers["Authorization"] = f"Bearer {authorized[name]}"
            else:  # pragma: no cover - devicegate declares no other kind of scheme
                raise AssertionError(f"Swagger UI would not send {scheme!r} in a header")
    return headers


async def openapi(app: FastAPI) -> dict[str, Any]:
    async with client(app) as http:
        response = await http.get("/openapi.json")  # public: Swagger UI fetches it first
    assert response.status_code == 200, response.text
    document: dict[str, Any] = response.json()
    return document


# --- the OpenAPI document ---------------------------------------------------------------------


def api_key_scheme(header: str) -> dict[str, Any]:
    return {"type": "apiKey", "in": "header", "name": header, "description": "The server API key."}


MOBILE_SCHEME = {
    "type": "apiKey",
    "in": "header",
    "name": "Authorization",
    "description": "The mobile API key, sent raw in Authorization (no 'Bearer').",
}


def device_schemes(header: str) -> dict[str, Any]:
    return {
        "device_token": {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "JWT",
            "description": (
                "A device token (POST /gen-jwt), sent as 'Authorization: Bearer <token>'. "
                f"Give the device id in {header} (instance_id) too."
            ),
        },
        "instance_id": {
            "type": "apiKey",
            "in": "header",
            "name": header,
            "description": "The device id a device token is bound to; only with the token.",
        },
    }


@pytest.mark.parametrize(
    ("options", "schemes"),
    [
        pytest.param(
            {},
            {
                "api_key": api_key_scheme("x-api-key"),
                "mobile_api_key": MOBILE_SCHEME,
                **device_schemes("x-instance-id"),
            },
            id="default-headers",
        ),
        # The header names follow the configuration, which lower-cases them as servers do.
        pytest.param(
            {"api_key_header": "X-Server-Key", "device_header": "X-Device"},
            {
                "api_key": api_key_scheme("x-server-key"),
                "mobile_api_key": MOBILE_SCHEME,
                **device_schemes("x-device"),
            },
            id="configured-headers",
        ),
    ],
)
async def test_security_schemes_follow_the_configuration(
    keys: Keys, options: dict[str, str], schemes: dict[str, Any]
) -> None:
    document = await openapi(Built(keys.config(**options)).app)
    assert document["components"]["securitySchemes"] == schemes


async def test_only_configured_kinds_are_declared(keys: Keys) -> None:
    config = GateConfig(api_keys=keys.api_key, jwt_secret=keys.jwt_secret)
    gate = DeviceGateSecurity(config)
    app = FastAPI()
    app.add_middleware(DeviceAuthMiddleware, config=config, rules=DOCS_RULES)

    @app.get("/me")
    def me(who: Annotated[Principal, Security(gate.require())]) -> str:
        return who.kind.value  # pragma: no cover - never called

    document = await openapi(app)
    assert set(document["components"]["securitySchemes"]) == {
        "api_key",
        "device_token",
        "instance_id",
    }
    assert document["paths"]["/me"]["get"]["security"] == [
        {"api_key": []},
        {"device_token": []},
        {"instance_id": []},
    ]


ALL: list[dict[str, list[str]]] = [
    {"api_key": []},
    {"mobile_api_key": []},
    {"device_token": []},
    {"instance_id": []},
]
DEVICE_ONLY: list[dict[str, list[str]]] = [{"device_token": []}, {"instance_id": []}]

# What each route declares: the schemes of the kinds it accepts, in a fixed order; no security
# where no dependency asks for a principal.
ROUTE_SECURITY: dict[str, list[dict[str, list[str]]] | None] = {
    "/me": ALL,
    "/device": DEVICE_ONLY,
    "/server": [{"api_key": []}],
    "/keys": [{"api_key": []}, {"mobile_api_key": []}],
    "/public": ALL,
    "/welcome": DEVICE_ONLY,
    "/plain": None,
}


async def test_each_route_declares_the_schemes_it_accepts(keys: Keys) -> None:
    document = await openapi(Built(keys.config()).app)
    declared = {path: document["paths"][path]["get"].get("security") for path in document["paths"]}
    assert declared == ROUTE_SECURITY


# --- calling routes as Swagger UI does ----------------------------------------------------------

# (route, what the user authorized, status, body). "token" stands for a fresh device token and
# "api_key"/"mobile_api_key" for the configured keys. A scheme the route does not declare is not
# sent, whatever the user authorized, so the middleware answers as to no credential.
SWAGGER_CALLS: list[tuple[str, dict[str, str], int, dict[str, Any] | None]] = [
    ("/me", {"api_key": "api_key"}, 200, {"kind": "api_key", "device": None}),
    ("/me", {"mobile_api_key": "mobile_api_key"}, 200, {"kind": "mobile_api_key", "device": None}),
    (
        "/me",
        {"device_token": "token", "instance_id": DEVICE},
        200,
        {"kind": "device_token", "device": DEVICE},
    ),
    ("/me", {}, 401, None),
    (
        "/device",
        {"device_token": "token", "instance_id": DEVICE},
        200,
        {"kind": "device_token", "device": DEVICE},
    ),
    ("/device", {"api_key": "api_key"}, 401, None),  # /device does not offer the key
    ("/device", {"device_token": "token"}, 400, None),  # a bound token needs the device id
    ("/server", {"api_key": "api_key"}, 200, {"kind": "api_key", "device": None}),
    ("/server", {"device_token": "token", "instance_id": DEVICE}, 401, None),
    (
        "/keys",
        {"mobile_api_key": "mobile_api_key"},
        200,
        {"kind": "mobile_api_key", "device": None},
    ),
    # Authorizing every scheme sends every credential: the middleware refuses the mix.
    (
        "/me",
        {"api_key": "api_key", "device_token": "token", "instance_id": DEVICE},
        400,
        None,
    ),
    ("/welcome", {}, 200, {"kind": None}),
    (
        "/welcome",
        {"device_token": "token", "instance_id": DEVICE},
        200,
        {"kind": "device_token", "device": DEVICE},
    ),
]


@pytest.mark.parametrize(("path", "authorized", "status", "body"), SWAGGER_CALLS)
async def test_routes_answer_what_swagger_ui_sends(
    keys: Keys,
    path: str,
    authorized: dict[str, str],
    status: int,
    body: dict[str, Any] | None,
) -> None:
    values = {
        "api_key": keys.api_key,
        "mobile_api_key": keys.mobile_api_key,
        "token": device_token(keys),
    }
    typed = {name: values.get(value, value) for name, value in authorized.items()}
    built = Built(keys.config())
    document = await openapi(built.app)
    headers = swagger_headers(document, path, typed)
    async with client(built.app) as http:
        response = await http.get(path, headers=headers)
    assert response.status_code == status, response.text
    if body is None:
        assert built.ran == []
        assert "www-authenticate" in response.headers  # the middleware's refusal
    else:
        assert response.json() == body
        assert built.ran == [path]


async def test_swagger_ui_and_its_document_are_public(keys: Keys) -> None:
    async with client(Built(keys.config()).app) as http:
        docs = await http.get("/docs")
        redirect = await http.get("/docs/oauth2-redirect")
        document = await http.get("/openapi.json")
        redoc = await http.get("/redoc")  # not among the rules: protected like the rest
    assert docs.status_code == redirect.status_code == document.status_code == 200
    assert "/openapi.json" in docs.text
    assert "/docs/oauth2-redirect" in docs.text
    assert_denied(redoc, MISSING)


# --- refusals of the dependency -----------------------------------------------------------------

# (route, the credential sent as is, the refusal). The middleware admits the request (no rule
# restricts these paths, or the path is public or optional); the route's dependency refuses it.
DEPENDENCY_REFUSALS = [
    pytest.param("/device", "api_key", FORBIDDEN, id="device-route-server-key"),
    pytest.param("/device", "mobile_api_key", FORBIDDEN, id="device-route-mobile-key"),
    pytest.param("/server", "token", FORBIDDEN, id="server-route-token"),
    pytest.param("/server", "mobile_api_key", FORBIDDEN, id="server-route-mobile-key"),
    pytest.param("/keys", "token", FORBIDDEN, id="keys-route-token"),
    pytest.param("/welcome", "api_key", FORBIDDEN, id="optional-path-wrong-kind"),
    # A public path checks no credential, so there is no principal to hand over: whatever was
    # sent, a route that needs one asks for one.
    pytest.param("/public", None, MISSING, id="public-path-nothing"),
    pytest.param("/public", "api_key", MISSING, id="public-path-key-unchecked"),
]


def credential(keys: Keys, name: str | None) -> dict[str, str]:
    if name is None:
        return {}
    return {
        "api_key": {"x-api-key": keys.api_key},
        "mobile_api_key": {"authorization": keys.mobile_api_key},
        "token": {"authorization": f"Bearer {device_token(keys)}", "x-instance-id": DEVICE},
    }[name]


@pytest.mark.parametrize(("path", "sent", "refusal"), DEPENDENCY_REFUSALS)
async def test_dependency_refuses_in_devicegates_shape(
    keys: Keys, path: str, sent: str | None, refusal: Any
) -> None:
    built = Built(keys.config())
    async with client(built.app) as http:
        response = await http.get(path, headers=credential(keys, sent))
    assert_denied(response, refusal)  # the same bytes the middleware sends
    assert built.ran == []


async def test_refusals_use_the_configured_realm(keys: Keys) -> None:
    built = Built(keys.config(), realm="shop")
    async with client(built.app) as http:
        forbidden = await http.get("/device", headers=credential(keys, "api_key"))
        missing = await http.get("/public")
    assert_denied(forbidden, FORBIDDEN, realm="shop")
    assert_denied(missing, MISSING, realm="shop")


async def test_without_the_handler_fastapi_keeps_status_and_challenge(keys: Keys) -> None:
    built = Built(keys.config(), handler=False)
    async with client(built.app) as http:
        response = await http.get("/device", headers=credential(keys, "api_key"))
    assert response.status_code == 403
    assert response.headers.get_list("www-authenticate") == [
        'Bearer realm="devicegate", error="insufficient_scope", '
        'error_description="This credential is not accepted for this resource."'
    ]
    assert response.json() == {"detail": "This credential is not accepted for this resource."}
    assert built.ran == []


async def test_an_app_can_raise_a_refusal_itself(keys: Keys) -> None:
    app = FastAPI(exception_handlers={RefusalException: refusal_handler})
    app.add_middleware(DeviceAuthMiddleware, config=keys.config())

    @app.get("/admin")
    def admin() -> None:
        raise RefusalException(InsufficientScope())

    async with client(app) as http:
        response = await http.get("/admin", headers=credential(keys, "api_key"))
    assert_denied(response, FORBIDDEN)


async def test_the_middleware_refuses_before_any_dependency(keys: Keys) -> None:
    # The dependency never verifies: a token presented by another device stops at the middleware.
    built = Built(keys.config())
    stolen = {**credential(keys, "token"), "x-instance-id": "device-2"}
    async with client(built.app) as http:
        response = await http.get("/device", headers=stolen)
    assert_denied(response, INVALID)
    assert built.ran == []


# --- websockets ---------------------------------------------------------------------------------


async def test_websocket_of_another_kind_is_closed_1008(keys: Keys) -> None:
    built = Built(keys.config())
    sent = await call_asgi(built.app, ws_scope("/ws", credential(keys, "api_key")))
    assert message_types(sent) == ["websocket.close"]
    assert sent[0]["code"] == 1008
    assert built.ran == []


async def test_websocket_with_a_device_token_connects(keys: Keys) -> None:
    built = Built(keys.config())
    sent = await call_asgi(built.app, ws_scope("/ws", credential(keys, "token")))
    assert message_types(sent) == ["websocket.accept", "websocket.send", "websocket.close"]
    assert sent[1]["text"] == '{"kind":"device_token"}'


# --- set-up errors ------------------------------------------------------------------------------


async def test_without_the_middleware_the_route_fails_loudly(keys: Keys) -> None:
    built = Built(keys.config(), middleware=False)
    async with client(built.app) as http:
        with pytest.raises(RuntimeError, match="no DeviceAuthMiddleware"):
            await http.get("/me", headers=credential(keys, "api_key"))
    assert built.ran == []


@pytest.mark.parametrize(
    ("config", "kinds", "field"),
    [
        pytest.param("full", ("api-key",), "kinds", id="not-a-kind"),
        pytest.param("tokens-only", (MOBILE_API_KEY,), "kinds", id="kind-not-configured"),
        pytest.param("tokens-only", (API_KEY, MOBILE_API_KEY), "kinds", id="none-configured"),
    ],
)
def test_a_route_that_nothing_could_pass_stops_the_start(
    keys: Keys, config: str, kinds: tuple[Any, ...], field: str
) -> None:
    gate_config = keys.config() if config == "full" else GateConfig(jwt_secret=keys.jwt_secret)
    gate = DeviceGateSecurity(gate_config)
    for make in (gate.require, gate.optional):
        with pytest.raises(ConfigError) as raised:
            make(*kinds)
        assert raised.value.field == field


@pytest.mark.parametrize(
    ("arguments", "field"),
    [
        pytest.param({"config": "not a config"}, "config", id="config"),
        pytest.param({"realm": 'a"b'}, "realm", id="realm"),
    ],
)
def test_bad_arguments_stop_the_start(keys: Keys, arguments: dict[str, Any], field: str) -> None:
    options: dict[str, Any] = {"config": keys.config(), **arguments}
    with pytest.raises(ConfigError) as raised:
        DeviceGateSecurity(options.pop("config"), **options)
    assert raised.value.field == field


def test_the_same_kinds_give_the_same_dependency(keys: Keys) -> None:
    gate = DeviceGateSecurity(keys.config())
    # FastAPI runs a dependency once per request by identity: one route may name it twice.
    assert gate.require(API_KEY, "device_token") is gate.require(DEVICE_TOKEN, "api_key")
    assert gate.require() is gate.require(API_KEY, MOBILE_API_KEY, DEVICE_TOKEN)
    assert gate.optional() is not gate.require()
    assert repr(gate.require(DEVICE_TOKEN)) == "<devicegate.fastapi require(device_token)>"
    assert repr(gate) == (
        "DeviceGateSecurity(kinds={api_key, device_token, mobile_api_key}, realm='devicegate')"
    )


async def test_refusal_handler_handles_only_its_exception() -> None:
    with pytest.raises(TypeError, match="RefusalException"):
        await refusal_handler(None, ValueError("x"))  # type: ignore[arg-type]


def test_importing_without_fastapi_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes ``import fastapi`` fail as it does where FastAPI is missing.
    monkeypatch.setitem(sys.modules, "fastapi", None)
    monkeypatch.delitem(sys.modules, "devicegate.fastapi")
    with pytest.raises(ImportError, match=r"pip install 'devicegate\[fastapi\]'"):
        importlib.import_module("devicegate.fastapi")


def test_a_broken_fastapi_install_is_not_blamed_on_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # FastAPI is there but a part of it cannot be imported: that error, not advice to install.
    monkeypatch.setitem(sys.modules, "fastapi.security.base", None)
    monkeypatch.delitem(sys.modules, "devicegate.fastapi")
    with pytest.raises(ModuleNotFoundError) as raised:
        importlib.import_module("devicegate.fastapi")
    assert raised.value.name == "fastapi.security.base"
    assert "devicegate[fastapi]" not in str(raised.value)
