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
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.helpers import Keys, fresh_keys

try:
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import ClientConnection, connect
except ModuleNotFoundError as exc:  # pragma: no cover - an incomplete test environment
    raise ModuleNotFoundError(
        "tests/test_uvicorn.py needs the 'websockets' package: pip install -e '.[test]'"
    ) from exc

REPO_ROOT = Path(__file__).resolve().parents[1]
APP_FACTORY = "tests.servers.app:create_app"
HOST = "127.0.0.1"
STARTUP_TIMEOUT = 30.0  # seconds for a server to answer its first request
IO_TIMEOUT = 10.0  # seconds for any one request, handshake or message
STOP_TIMEOUT = 10.0  # seconds for a server to exit after SIGTERM before it is killed
DEVICE = "device-A"
OTHER_DEVICE = "device-B"
REALM_ONLY = 'Bearer realm="devicegate"'


@dataclass(frozen=True)
class ServerKind:
    module: str  # run as ``python -m <module>``; also the package that must be installed
    event_loop: str  # the loop the app reports it runs on
    options: tuple[str, ...] = ()

    def command(self, port: int) -> list[str]:
        if self.module == "uvicorn":
            return [
                *("-m", "uvicorn", APP_FACTORY, "--factory"),
                *("--host", HOST, "--port", str(port), "--lifespan", "on", *self.options),
            ]
        # hypercorn evaluates the part after the colon, so the factory is called there.
        return [
            *("-m", "hypercorn", *self.options),
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


def free_port() -> int:
    """A port that was free a moment ago (the OS picks it; the server binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def server_environment(keys: Keys) -> dict[str, str]:
    environment = {
        name: value for name, value in os.environ.items() if not name.startswith("DEVICEGATE_")
    }
    environment.update(
        DEVICEGATE_API_KEYS=keys.api_key,
        DEVICEGATE_MOBILE_API_KEYS=keys.mobile_api_key,
        DEVICEGATE_JWT_SECRET=keys.jwt_secret,
        PYTHONUNBUFFERED="1",
    )
    return environment


def wait_until_serving(process: subprocess.Popen[bytes], base_url: str, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    with httpx.Client(base_url=base_url, trust_env=False, timeout=1.0) as http:
        while True:
            if process.poll() is not None:
                pytest.fail(
                    f"the server exited with code {process.returncode} before serving:\n"
                    f"{log.read_text(errors='replace')}",
                    pytrace=False,
                )
            try:
                if http.get("/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                pytest.fail(
                    f"the server did not answer within {STARTUP_TIMEOUT} s:\n"
                    f"{log.read_text(errors='replace')}",
                    pytrace=False,
                )
            time.sleep(0.1)


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=STOP_TIMEOUT)


@pytest.fixture(scope="module", params=list(SERVERS))
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    name: str = request.param
    kind = SERVERS[name]
    if importlib.util.find_spec(kind.module) is None:
        pytest.fail(
            f"the {name} server tests need the {kind.module!r} package: pip install -e '.[test]'",
            pytrace=False,
        )
    keys = fresh_keys()
    port = free_port()
    log = tmp_path_factory.mktemp(name) / "server.log"
    with log.open("wb") as output:
        process = subprocess.Popen(  # noqa: S603 - a fixed command line, no shell
            [sys.executable, *kind.command(port)],
            cwd=REPO_ROOT,
            env=server_environment(keys),
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        base_url = f"http://{HOST}:{port}"
        wait_until_serving(process, base_url, log)
        yield Server(name, base_url, f"ws://{HOST}:{port}", keys, kind.event_loop)
    finally:
        stop(process)
    # devicegate answers every refusal itself; an exception escaping into the server is a bug.
    # (uvicorn's websockets-sansio protocol logs "ASGI callable returned without completing
    # handshake" after every correct denial response, Kludex/uvicorn#3138: that line is not ours.)
    output_text = log.read_text(errors="replace")
    assert "Traceback" not in output_text, output_text
    for key in (keys.api_key, keys.mobile_api_key, keys.jwt_secret):
        assert key not in output_text, "a secret reached the server log"


@pytest.fixture
def http(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, trust_env=False, timeout=IO_TIMEOUT) as client:
        yield client


def mint(http: httpx.Client, keys: Keys, instance_id: str = DEVICE) -> str:
    response = http.post(
        "/gen-jwt", headers={"x-api-key": keys.api_key}, json={"instance_id": instance_id}
    )
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    assert response.json()["instance_id"] == instance_id
    token = response.json()["access_token"]
    assert isinstance(token, str)
    return token


def bearer(token: str, device: str = DEVICE) -> dict[str, str]:
    return {"authorization": f"Bearer {token}", "x-instance-id": device}


def open_websocket(server: Server, headers: dict[str, str]) -> ClientConnection:
    return connect(
        f"{server.ws_url}/ws",
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
    response = http.get("/whoami")
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == REALM_ONLY
    assert response.json()["error"] == "unauthorized"


def test_minted_token_admits_its_device(server: Server, http: httpx.Client) -> None:
    token = mint(http, server.keys)
    response = http.get("/whoami", headers=bearer(token))
    assert response.status_code == 200, response.text
    assert response.json() == {
        "kind": "device_token",
        "instance_id": DEVICE,
        "event_loop": server.event_loop,
    }


def test_token_on_another_device_is_401(server: Server, http: httpx.Client) -> None:
    token = mint(http, server.keys)
    response = http.get("/whoami", headers=bearer(token, device=OTHER_DEVICE))
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith(f'{REALM_ONLY}, error="invalid_token"')
    assert response.json()["error"] == "invalid_token"


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
    by_token = http.post("/gen-jwt", headers=bearer(token), json={})
    by_mobile_key = http.post("/gen-jwt", headers={"authorization": server.keys.mobile_api_key})
    wrong_method = http.get("/gen-jwt", headers={"x-api-key": server.keys.api_key})
    assert by_token.status_code == 403
    assert by_mobile_key.status_code == 403
    assert wrong_method.status_code == 405
    assert wrong_method.headers["allow"] == "POST"


def test_dot_segments_are_400(http: httpx.Client) -> None:
    # The server decodes %2e, so the app would see /health/../whoami: refused before any rule
    # (the public /health prefix must not lend its rule to /whoami).
    response = http.send(http.build_request("GET", f"{http.base_url}/health/%2e%2e/whoami"))
    assert response.status_code == 400
    assert 'error="invalid_request"' in response.headers["www-authenticate"]


# --- websockets -------------------------------------------------------------------------------


def test_websocket_without_credentials_is_refused_with_401(server: Server) -> None:
    with pytest.raises(InvalidStatus) as refused, open_websocket(server, {}):
        pass
    response = refused.value.response
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == REALM_ONLY
    assert json.loads(response.body)["error"] == "unauthorized"


def test_websocket_with_another_devices_token_is_refused_with_401(
    server: Server, http: httpx.Client
) -> None:
    token = mint(http, server.keys)
    with (
        pytest.raises(InvalidStatus) as refused,
        open_websocket(server, bearer(token, device=OTHER_DEVICE)),
    ):
        pass
    response = refused.value.response
    assert response.status_code == 401
    assert 'error="invalid_token"' in response.headers["www-authenticate"]


def test_websocket_with_device_token_connects(server: Server, http: httpx.Client) -> None:
    token = mint(http, server.keys)
    with open_websocket(server, bearer(token)) as websocket:
        message = websocket.recv(timeout=IO_TIMEOUT)
    assert json.loads(message) == {
        "kind": "device_token",
        "instance_id": DEVICE,
        "event_loop": server.event_loop,
    }
