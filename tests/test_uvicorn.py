"""devicegate behind real ASGI servers: uvicorn (asyncio, with both of its websocket protocols)
and hypercorn's trio worker.

Each server runs ``tests/servers/app.py`` in a subprocess, bound to 127.0.0.1 on a port the OS
picked, with its keys in ``DEVICEGATE_*`` environment variables. A real HTTP client (httpx) and a
real websocket client (websockets) talk to it over TCP: tokens are minted at ``/gen-jwt`` and
used, and refusals arrive as real HTTP responses, websocket handshakes included (both servers
offer the ASGI websocket denial-response extension).

These tests never skip: a missing server or client package fails them, naming what to install.
"""

from __future__ import annotations

import importlib.util
import json
import secrets
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from tests.helpers import REALM_ONLY, Keys, bearer, fresh_keys, token_of
from tests.servers.process import HOST, answers, serve, sync_client

try:
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import ClientConnection, connect
except ModuleNotFoundError as exc:  # pragma: no cover - an incomplete test environment
    raise ModuleNotFoundError(
        "tests/test_uvicorn.py needs the 'websockets' package: pip install -e '.[test]'"
    ) from exc

APP_FACTORY = "tests.servers.app:create_app"
IO_TIMEOUT = 10.0  # seconds for any one request, handshake or message
DEVICE = "device-A"
OTHER_DEVICE = "device-B"


@dataclass(frozen=True)
class ServerKind:
    module: str  # run as ``python -m <module>``; also the package that must be installed
    event_loop: str  # the loop the app reports it runs on
    options: tuple[str, ...] = ()

    def command(self, port: int) -> list[str]:
        if self.module == "uvicorn":
            return [
                *(sys.executable, "-m", "uvicorn", APP_FACTORY, "--factory"),
                *("--host", HOST, "--port", str(port), "--lifespan", "on", *self.options),
            ]
        # hypercorn evaluates the part after the colon, so the factory is called there.
        return [
            *(sys.executable, "-m", "hypercorn", *self.options),
            *("--bind", f"{HOST}:{port}", f"{APP_FACTORY}()"),
        ]


SERVERS = {
    # uvicorn picks its websockets-sansio protocol when websockets is installed.
    "uvicorn": ServerKind(module="uvicorn", event_loop="asyncio"),
    "uvicorn-wsproto": ServerKind(
        module="uvicorn", event_loop="asyncio", options=("--ws", "wsproto")
    ),
    "hypercorn-trio": ServerKind(
        module="hypercorn", event_loop="trio", options=("--worker-class", "trio")
    ),
}


@dataclass(frozen=True)
class Server:
    name: str
    base_url: str
    ws_url: str
    keys: Keys
    event_loop: str


@pytest.fixture(scope="module", params=list(SERVERS))
def server(
    starts_a_process: None,
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Server]:
    name: str = request.param
    kind = SERVERS[name]
    if importlib.util.find_spec(kind.module) is None:
        pytest.fail(
            f"the {name} server tests need the {kind.module!r} package: pip install -e '.[test]'",
            pytrace=False,
        )
    keys = fresh_keys()
    environment = {
        "DEVICEGATE_API_KEYS": keys.api_key,
        "DEVICEGATE_MOBILE_API_KEYS": keys.mobile_api_key,
        "DEVICEGATE_JWT_SECRET": keys.jwt_secret,
    }
    log = tmp_path_factory.mktemp(name) / "server.log"
    with serve(kind.command, log, env=environment, ready=answers("/health")) as running:
        ws_url = f"ws://{HOST}:{running.port}"
        yield Server(name, running.url, ws_url, keys, kind.event_loop)
    # devicegate answers every refusal itself; an exception escaping into the server is a bug.
    # (uvicorn's websockets-sansio protocol logs "ASGI callable returned without completing
    # handshake" after every correct denial response, Kludex/uvicorn#3138: that line is not ours.)
    output_text = log.read_text(errors="replace")
    assert "Traceback" not in output_text, output_text
    for key in (keys.api_key, keys.mobile_api_key, keys.jwt_secret):
        assert key not in output_text, "a secret reached the server log"


@pytest.fixture
def http(server: Server) -> Iterator[httpx.Client]:
    with sync_client(server.base_url) as client:
        yield client


def mint(http: httpx.Client, keys: Keys, instance_id: str = DEVICE) -> str:
    response = http.post(
        "/gen-jwt", headers={"x-api-key": keys.api_key}, json={"instance_id": instance_id}
    )
    return token_of(response, instance_id)


def probe() -> str:
    """A query string no other request carries, to look for in what the app saw."""
    return f"probe={secrets.token_hex(8)}"


def app_saw(http: httpx.Client, probe: str) -> bool:
    """Whether a request carrying ``probe`` reached the app behind devicegate."""
    seen: list[str] = http.get("/__seen").json()
    return any(probe in target for target in seen)


def open_websocket(server: Server, headers: dict[str, str], query: str = "") -> ClientConnection:
    return connect(
        f"{server.ws_url}/ws" + (f"?{query}" if query else ""),
        additional_headers=headers,
        open_timeout=IO_TIMEOUT,
        close_timeout=IO_TIMEOUT,
        proxy=None,
    )


# --- HTTP -------------------------------------------------------------------------------------


def test_public_path_needs_no_credential(server: Server, http: httpx.Client) -> None:
    response = http.get("/health")
    assert response.status_code == 200
    # The event loop the server ran devicegate and the app on: trio under hypercorn's worker.
    assert response.json() == {
        "status": "ok",
        "kind": None,
        "instance_id": None,
        "event_loop": server.event_loop,
    }


def test_no_credentials_is_401(http: httpx.Client) -> None:
    marker = probe()
    response = http.get(f"/whoami?{marker}")
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == REALM_ONLY
    assert response.json()["error"] == "unauthorized"
    assert not app_saw(http, marker)


def test_minted_token_admits_its_device(server: Server, http: httpx.Client) -> None:
    token = mint(http, server.keys)
    marker = probe()
    response = http.get(f"/whoami?{marker}", headers=bearer(token, DEVICE))
    assert response.status_code == 200, response.text
    assert response.json() == {
        "kind": "device_token",
        "instance_id": DEVICE,
        "event_loop": server.event_loop,
    }
    assert app_saw(http, marker)  # the control for the refusals: the app does record


def test_token_on_another_device_is_401(server: Server, http: httpx.Client) -> None:
    token = mint(http, server.keys)
    marker = probe()
    response = http.get(f"/whoami?{marker}", headers=bearer(token, OTHER_DEVICE))
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith(f'{REALM_ONLY}, error="invalid_token"')
    assert response.json()["error"] == "invalid_token"
    assert not app_saw(http, marker)


@pytest.mark.parametrize(
    ("credential", "kind"),
    [("api_key", "api_key"), ("mobile_api_key", "mobile_api_key")],
)
def test_keys_admit(server: Server, http: httpx.Client, credential: str, kind: str) -> None:
    headers = (
        {"x-api-key": server.keys.api_key}
        if credential == "api_key"
        else {"authorization": server.keys.mobile_api_key}
    )
    response = http.get("/whoami", headers=headers)
    assert response.status_code == 200, response.text
    assert response.json()["kind"] == kind


def test_token_endpoint_takes_only_the_server_key(server: Server, http: httpx.Client) -> None:
    token = mint(http, server.keys)
    marker = probe()
    by_token = http.post(f"/gen-jwt?{marker}", headers=bearer(token, DEVICE), json={})
    by_mobile_key = http.post(
        f"/gen-jwt?{marker}", headers={"authorization": server.keys.mobile_api_key}
    )
    wrong_method = http.get(f"/gen-jwt?{marker}", headers={"x-api-key": server.keys.api_key})
    assert by_token.status_code == 403
    assert by_mobile_key.status_code == 403
    assert wrong_method.status_code == 405
    assert wrong_method.headers["allow"] == "POST"
    # The token endpoint answers on its own: no request to it, minting or refused, reaches the app.
    assert not app_saw(http, marker)
    assert not app_saw(http, "/gen-jwt")


def test_dot_segments_are_400(http: httpx.Client) -> None:
    # The server decodes %2e, so the app would see /health/../whoami: refused before any rule
    # (the public /health prefix must not lend its rule to /whoami).
    marker = probe()
    request = http.build_request("GET", f"{http.base_url}/health/%2e%2e/whoami?{marker}")
    response = http.send(request)
    assert response.status_code == 400
    assert 'error="invalid_request"' in response.headers["www-authenticate"]
    assert not app_saw(http, marker)


# --- websockets -------------------------------------------------------------------------------


def test_websocket_without_credentials_is_refused_with_401(
    server: Server, http: httpx.Client
) -> None:
    marker = probe()
    with pytest.raises(InvalidStatus) as refused, open_websocket(server, {}, marker):
        pass
    response = refused.value.response
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == REALM_ONLY
    assert json.loads(response.body)["error"] == "unauthorized"
    assert not app_saw(http, marker)


def test_websocket_with_another_devices_token_is_refused_with_401(
    server: Server, http: httpx.Client
) -> None:
    token = mint(http, server.keys)
    marker = probe()
    with (
        pytest.raises(InvalidStatus) as refused,
        open_websocket(server, bearer(token, OTHER_DEVICE), marker),
    ):
        pass
    response = refused.value.response
    assert response.status_code == 401
    assert 'error="invalid_token"' in response.headers["www-authenticate"]
    assert not app_saw(http, marker)


def test_websocket_with_device_token_connects(server: Server, http: httpx.Client) -> None:
    token = mint(http, server.keys)
    marker = probe()
    with open_websocket(server, bearer(token, DEVICE), marker) as websocket:
        message = websocket.recv(timeout=IO_TIMEOUT)
    assert json.loads(message) == {
        "kind": "device_token",
        "instance_id": DEVICE,
        "event_loop": server.event_loop,
    }
    assert app_saw(http, marker)
