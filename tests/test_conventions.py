"""Starlette's conventions, as its users expect them: ``@requires("authenticated")`` admits every
caller devicegate admitted, and an optional path greets a signed-in caller while serving
everyone else too."""

from __future__ import annotations

from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.authentication import requires
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from devicegate import ConfigError, CredentialKind, DeviceAuthMiddleware, Rule, get_principal
from tests.helpers import (
    INVALID,
    MISSING,
    Keys,
    assert_denied,
    bearer,
    client,
    make_token,
)

DEVICE = "device-1"


@requires("authenticated")
async def members(request: Request) -> JSONResponse:
    return JSONResponse({"scopes": list(request.auth.scopes)})


async def greeting(request: Request) -> JSONResponse:
    principal = get_principal(request)
    if principal is None:
        return JSONResponse({"hello": "stranger", "authenticated": request.user.is_authenticated})
    return JSONResponse({"hello": principal.display_name, "authenticated": True})


def starlette_app(keys: Keys) -> Starlette:
    return Starlette(
        routes=[Route("/members", members), Route("/welcome", greeting)],
        middleware=[
            Middleware(
                DeviceAuthMiddleware,
                config=keys.config(),
                rules=[Rule("/welcome", optional=True)],
            )
        ],
    )


@pytest.mark.parametrize("credential", ["api_key", "mobile_api_key", "device_token"])
async def test_requires_authenticated_admits_every_kind(keys: Keys, credential: str) -> None:
    headers = {
        "api_key": {"x-api-key": keys.api_key},
        "mobile_api_key": {"authorization": keys.mobile_api_key},
        "device_token": bearer(make_token(keys.jwt_secret, instance_id=DEVICE), DEVICE),
    }[credential]
    async with client(starlette_app(keys)) as http:
        response = await http.get("/members", headers=headers)
    assert response.status_code == 200
    assert response.json() == {"scopes": ["authenticated", credential]}


# What an optional path answers: (headers, status, body when admitted).
OPTIONAL_CASES: dict[str, tuple[Any, int, dict[str, Any] | None]] = {
    # No credential at all: served, unauthenticated.
    "nothing": (lambda keys: {}, 200, {"hello": "stranger", "authenticated": False}),
    # A scheme devicegate does not speak counts as no credential (RFC 6750 §3.1).
    "other-scheme": (
        lambda keys: {"authorization": "Basic dXNlcjpwYXNz"},
        200,
        {"hello": "stranger", "authenticated": False},
    ),
    # A valid credential: its principal.
    "device-token": (
        lambda keys: bearer(make_token(keys.jwt_secret, instance_id=DEVICE, lifetime=300), DEVICE),
        200,
        {"hello": DEVICE, "authenticated": True},
    ),
    "api-key": (
        lambda keys: {"x-api-key": keys.api_key},
        200,
        {"hello": "api_key", "authenticated": True},
    ),
    # An invalid credential is refused as anywhere else: an optional path is no way to probe
    # with bad tokens, nor a place where a tampered token passes as a stranger.
    "wrong-key": (lambda keys: {"x-api-key": keys.mobile_api_key}, 401, None),
    "expired-token": (
        lambda keys: bearer(make_token(keys.jwt_secret, instance_id=DEVICE, lifetime=-10), DEVICE),
        401,
        None,
    ),
    "other-device": (
        lambda keys: bearer(make_token(keys.jwt_secret, instance_id=DEVICE), "device-2"),
        401,
        None,
    ),
}


@pytest.mark.parametrize("case", list(OPTIONAL_CASES))
async def test_an_optional_path(keys: Keys, case: str) -> None:
    make_headers, status, body = OPTIONAL_CASES[case]
    async with client(starlette_app(keys)) as http:
        response = await http.get("/welcome", headers=make_headers(keys))
    if body is None:
        assert_denied(response, INVALID)
    else:
        assert (response.status_code, response.json()) == (status, body)


async def test_optional_still_limits_the_kinds(keys: Keys) -> None:
    gate = DeviceAuthMiddleware(
        starlette_app(keys).router,
        config=keys.config(),
        rules=[Rule("/welcome", optional=True, accept={CredentialKind.DEVICE_TOKEN})],
    )
    async with client(gate) as http:
        anonymous = await http.get("/welcome")
        server = await http.get("/welcome", headers={"x-api-key": keys.api_key})
        elsewhere = await http.get("/members")
    assert anonymous.json() == {"hello": "stranger", "authenticated": False}
    assert server.status_code == 403
    assert_denied(elsewhere, MISSING)  # only the optional path is optional


def test_optional_and_public_exclude_each_other() -> None:
    with pytest.raises(ConfigError) as refused:
        Rule("/x", public=True, optional=True)
    assert refused.value.field == "Rule.optional"
    rule = Rule("/x", optional=True)
    assert rule.optional
    assert "optional=True" in repr(rule)
    assert rule != Rule("/x")
    assert rule == Rule("/x", optional=True)
