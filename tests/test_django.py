"""devicegate in front of Django's ASGI handler.

Django's handler runs on asyncio only (asgiref), so these tests pin the asyncio backend.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import django
import httpx
import pytest
from django.conf import settings
from django.http import HttpRequest, JsonResponse
from django.urls import path

from devicegate import DeviceAuthMiddleware, Rule, TokenIssuer
from tests.helpers import REALM_ONLY, Keys, bearer, client

# The paths the views ran for, in order (cleared for every test by the ``ran`` fixture).
RAN: list[str] = []


def whoami(request: HttpRequest) -> JsonResponse:
    RAN.append(request.path)
    user = request.scope.get("user")
    return JsonResponse(
        {
            "kind": getattr(getattr(user, "kind", None), "value", None),
            "instance_id": getattr(user, "instance_id", None),
        }
    )


def health(request: HttpRequest) -> JsonResponse:
    RAN.append(request.path)
    return JsonResponse({"status": "ok"})


urlpatterns = [path("whoami", whoami), path("health", health)]

if not settings.configured:
    settings.configure(
        DEBUG=False,
        ALLOWED_HOSTS=["testserver"],
        ROOT_URLCONF=__name__,
        SECRET_KEY="not-used-by-these-tests-" + "x" * 32,
        INSTALLED_APPS=[],
        MIDDLEWARE=[],
    )
    django.setup()

from django.core.asgi import get_asgi_application  # noqa: E402 - needs settings first

# asgiref runs Django's handler on asyncio; direct parametrisation replaces conftest's backends.
pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("anyio_backend", ["asyncio"])]


@pytest.fixture(autouse=True)
def ran() -> Iterator[list[str]]:
    RAN.clear()
    yield RAN
    RAN.clear()


def gate(keys: Keys) -> httpx.AsyncClient:
    app = DeviceAuthMiddleware(
        get_asgi_application(), config=keys.config(), rules=[Rule("/health", public=True)]
    )
    return client(app)


async def test_django_view_sees_the_device_principal(keys: Keys, ran: list[str]) -> None:
    token = TokenIssuer(keys.config()).issue(instance_id="device-7").access_token
    async with gate(keys) as http:
        response = await http.get("/whoami", headers=bearer(token, "device-7"))
    assert response.status_code == 200
    assert json.loads(response.content) == {"kind": "device_token", "instance_id": "device-7"}
    assert ran == ["/whoami"]


async def test_django_view_never_runs_without_credentials(keys: Keys, ran: list[str]) -> None:
    async with gate(keys) as http:
        response = await http.get("/whoami")
        health = await http.get("/health")
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == REALM_ONLY
    assert health.status_code == 200
    assert health.json() == {"status": "ok"}
    assert ran == ["/health"]


async def test_django_wrong_device_is_refused(keys: Keys, ran: list[str]) -> None:
    token = TokenIssuer(keys.config()).issue(instance_id="device-7").access_token
    async with gate(keys) as http:
        response = await http.get("/whoami", headers=bearer(token, "device-8"))
    assert response.status_code == 401
    assert 'error="invalid_token"' in response.headers["www-authenticate"]
    assert ran == []
