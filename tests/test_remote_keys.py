"""jwks_url: verifying tokens minted elsewhere, against a real local HTTP server whose JWK Set
rotates, is slow to change, fails, or is too large."""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from cryptography.hazmat.primitives.asymmetric import ed25519

from devicegate import (
    ConfigError,
    DeviceAuthMiddleware,
    GateConfig,
    InvalidReason,
    InvalidToken,
    Refusal,
    TokenVerifier,
    cli,
)
from devicegate._remote_keys import MAX_DOCUMENT_BYTES, RemoteKeySet, check_jwks_url
from devicegate.gateway._app import app_from_env
from devicegate.gateway._reload import ReloadableApp
from tests.helpers import (
    Keys,
    RecordingApp,
    b64url,
    bearer,
    claims_at,
    client,
    make_token,
    scrub_devicegate_env,
    write_secrets,
)
from tests.servers.process import answers, child_env, devicegate_command, serve, sync_client

API_KEY = "remote-keys-" + "Zq8vN3xL6pT1wR5y"


class JwksServer:
    """A JWK Set served on 127.0.0.1 by a real HTTP server; the test changes what it serves."""

    def __init__(self) -> None:
        self.body = b'{"keys": []}'
        self.status = 200
        self.hits = 0
        self.drip_seconds = 0.0  # above zero: the body goes out a byte at a time, this apart
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.hits += 1
                self.send_response(outer.status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(outer.body)))
                self.end_headers()
                if not outer.drip_seconds:
                    self.wfile.write(outer.body)
                    return
                for index in range(len(outer.body)):
                    self.wfile.write(outer.body[index : index + 1])
                    self.wfile.flush()
                    time.sleep(outer.drip_seconds)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/jwks.json"

    def serve(self, *keys: tuple[str, ed25519.Ed25519PrivateKey], **extra: Any) -> None:
        self.body = json.dumps({"keys": [jwk(kid, key) for kid, key in keys], **extra}).encode()


def jwk(kid: str, key: ed25519.Ed25519PrivateKey) -> dict[str, str]:
    from cryptography.hazmat.primitives import serialization

    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return {"kty": "OKP", "crv": "Ed25519", "x": b64url(raw), "kid": kid, "alg": "EdDSA"}


def token(kid: str, key: ed25519.Ed25519PrivateKey) -> str:
    header = b64url(json.dumps({"alg": "EdDSA", "kid": kid}).encode())
    payload = b64url(json.dumps(claims_at(now=int(time.time()))).encode())
    signing_input = f"{header}.{payload}"
    return f"{signing_input}.{b64url(key.sign(signing_input.encode()))}"


@pytest.fixture
def jwks_server() -> Iterator[JwksServer]:
    server = JwksServer()
    thread = threading.Thread(target=server.httpd.serve_forever, daemon=True)
    thread.start()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


def wait_for(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def verifier_for(remote: RemoteKeySet) -> TokenVerifier:
    return TokenVerifier(GateConfig(api_keys=API_KEY, jwks_url=remote.url), remote_keys=remote)


def outcome(verifier: TokenVerifier, value: str) -> InvalidReason | int | None:
    try:
        verifier.verify(value)
    except InvalidToken as exc:
        return exc.reason
    except Refusal as exc:
        return exc.status_code
    return None


@pytest.mark.parametrize(
    ("url", "accepted"),
    [
        ("https://issuer.example/.well-known/jwks.json", True),
        ("http://127.0.0.1:8080/jwks.json", True),
        ("http://[::1]/jwks.json", True),
        ("http://localhost/jwks.json", True),
        ("http://issuer.example/jwks.json", False),  # in the clear, off the host
        ("http://127.0.0.1.evil.example/jwks.json", False),
        ("ftp://issuer.example/jwks.json", False),
        ("file:///etc/jwks.json", False),
        ("https://user:pass@issuer.example/jwks.json", False),
        ("https:///jwks.json", False),
        ("https://issuer.example:port/", False),
    ],
)
def test_only_https_or_loopback(url: str, accepted: bool) -> None:
    if accepted:
        assert check_jwks_url("jwks_url", url) == url
        assert GateConfig(jwks_url=url).jwks_url == url
    else:
        with pytest.raises(ConfigError, match="jwks_url"):
            GateConfig(jwks_url=url)


@pytest.mark.integration
def test_a_rotating_remote_set(jwks_server: JwksServer) -> None:
    first, second = ed25519.Ed25519PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate()
    jwks_server.serve(("k1", first))
    remote = RemoteKeySet(jwks_server.url, min_refetch_seconds=0.2)
    verifier = verifier_for(remote)
    try:
        # Not fetched yet: the instance cannot tell, so it says so (503), and fetches.
        assert outcome(verifier, token("k1", first)) == 503
        wait_for(lambda: remote.kids == {"k1"})
        assert outcome(verifier, token("k1", first)) is None
        # The issuer rotates: an unknown kid is refused at once and asks for a refetch.
        jwks_server.serve(("k1", first), ("k2", second))
        assert outcome(verifier, token("k2", second)) is InvalidReason.UNKNOWN_KEY
        wait_for(lambda: "k2" in remote.kids)
        assert outcome(verifier, token("k2", second)) is None
        # A known kid signed by another key.
        assert outcome(verifier, token("k1", second)) is InvalidReason.BAD_SIGNATURE
        # The issuer retires k1.
        jwks_server.serve(("k2", second))
        time.sleep(0.3)
        outcome(verifier, token("k3", second))  # an unknown kid asks for the refetch
        wait_for(lambda: remote.kids == {"k2"})
        verifier.clear_cache()
        assert outcome(verifier, token("k1", first)) is InvalidReason.UNKNOWN_KEY
    finally:
        remote.close()


@pytest.mark.integration
def test_a_flood_of_fresh_kids_is_not_a_flood_of_fetches(jwks_server: JwksServer) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    jwks_server.serve(("k1", key))
    remote = RemoteKeySet(jwks_server.url, min_refetch_seconds=1.0)
    verifier = verifier_for(remote)
    try:
        outcome(verifier, token("k1", key))
        wait_for(lambda: remote.kids == {"k1"})
        before = jwks_server.hits
        started = time.monotonic()
        refused = [outcome(verifier, token(uuid.uuid4().hex, key)) for _ in range(500)]
        elapsed = time.monotonic() - started
        time.sleep(0.2)
        assert set(refused) == {InvalidReason.UNKNOWN_KEY}
        # At most one refetch per interval, however many unknown kids came.
        assert jwks_server.hits - before <= 1 + int(elapsed / 1.0)
    finally:
        remote.close()


@pytest.mark.integration
def test_failures_keep_the_last_good_set_for_a_bounded_time(jwks_server: JwksServer) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    jwks_server.serve(("k1", key))
    now = [0.0]
    remote = RemoteKeySet(jwks_server.url, max_stale_seconds=100, clock=lambda: now[0])
    try:
        assert remote.refresh()
        jwks_server.status = 500
        assert not remote.refresh()
        now[0] = 99.0
        assert remote.get("k1") is not None  # the last good set, still trusted
        now[0] = 101.0
        with pytest.raises(Refusal) as excinfo:
            remote.get("k1")  # too old: fail closed
        assert excinfo.value.status_code == 503
        assert ("retry-after", "10") in [(k.decode(), v.decode()) for k, v in excinfo.value.headers]
    finally:
        remote.close()


@pytest.mark.integration
@pytest.mark.parametrize(
    "body",
    [
        b"x" * (MAX_DOCUMENT_BYTES + 1),
        b'{"keys": [' + b'{"kty": "oct", "k": "c2VjcmV0", "kid": "k"},' * 3000 + b"{}]}",
        b"not json",
        b'{"keys": {}}',
        b"[]",
    ],
    ids=["huge", "huge-json", "not-json", "keys-not-a-list", "not-an-object"],
)
def test_unusable_documents_keep_the_last_good_set(jwks_server: JwksServer, body: bytes) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    jwks_server.serve(("k1", key))
    remote = RemoteKeySet(jwks_server.url)
    try:
        assert remote.refresh()
        jwks_server.body = body
        assert not remote.refresh()
        assert remote.kids == {"k1"}
    finally:
        remote.close()


@pytest.mark.integration
def test_a_server_dripping_the_document_is_cut_off_at_the_deadline(
    jwks_server: JwksServer,
) -> None:
    # Every byte comes well within the read timeout: only a deadline on the whole fetch ends it.
    key = ed25519.Ed25519PrivateKey.generate()
    jwks_server.serve(("k1", key))
    remote = RemoteKeySet(jwks_server.url, fetch_timeout_seconds=0.5)
    try:
        assert remote.refresh()
        jwks_server.serve(("k2", key))
        jwks_server.drip_seconds = 0.05  # the whole document would take several seconds
        started = time.monotonic()
        assert not remote.refresh()
        assert time.monotonic() - started < 2.0
        assert remote.kids == {"k1"}
    finally:
        remote.close()


@pytest.mark.integration
def test_only_public_signing_keys_with_a_kid_are_taken(jwks_server: JwksServer) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    good = jwk("good", key)
    jwks_server.body = json.dumps(
        {
            "keys": [
                good,
                {"kty": "oct", "k": "c2VjcmV0c2VjcmV0c2VjcmV0", "kid": "hmac"},  # never HMAC
                {**jwk("private", key), "d": "AAAA"},
                {**jwk("enc", key), "use": "enc"},
                {**jwk("twice", key)},
                {**jwk("twice", ed25519.Ed25519PrivateKey.generate())},
                {k: v for k, v in good.items() if k != "kid"},
                {**jwk("es", key), "alg": "ES256"},
            ]
        }
    ).encode()
    remote = RemoteKeySet(jwks_server.url)
    try:
        assert remote.refresh()
        assert remote.kids == {"good"}
    finally:
        remote.close()


@pytest.mark.integration
async def test_through_the_middleware(jwks_server: JwksServer) -> None:
    # Runs under asyncio and trio: the refresh is a thread, the request path never waits.
    key = ed25519.Ed25519PrivateKey.generate()
    jwks_server.serve(("k1", key))
    config = GateConfig(api_keys=API_KEY, jwks_url=jwks_server.url)
    app = RecordingApp()
    gate = DeviceAuthMiddleware(app, config=config)
    remote = gate.verifier.remote_keys
    assert remote is not None
    try:
        assert remote.refresh()
        async with client(gate) as http:
            good = await http.get("/", headers=bearer(token("k1", key)))
            forged = await http.get(
                "/", headers=bearer(token("k1", ed25519.Ed25519PrivateKey.generate()))
            )
        assert good.status_code == 200
        assert forged.status_code == 401
        assert len(app.calls) == 1
    finally:
        remote.close()


# -- devicegate serve --jwks-url -----------------------------------------------------------------


@pytest.mark.integration
def test_serve_accepts_the_tokens_of_a_remote_set(
    jwks_server: JwksServer, tmp_path: Path, keys: Keys
) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    jwks_server.serve(("app-1", key))
    secrets_file = write_secrets(tmp_path / "secrets.json", keys)
    command = devicegate_command("--secrets", str(secrets_file), "--jwks-url", jwks_server.url)
    log = tmp_path / "serve.log"
    with serve(command, log, env=child_env(), cwd=tmp_path, ready=answers("/health")) as server:
        assert f"remote keys: device tokens signed by a key of {jwks_server.url}" in (
            server.output()
        )
        with sync_client(server.url) as http:
            remote_token = token("app-1", key)
            # The first token starts the background fetch: refused (503) until the set is in.
            deadline = time.monotonic() + 10
            while (mine := http.get("/whoami", headers=bearer(remote_token))).status_code == 503:
                assert time.monotonic() < deadline, "the set was never fetched"
                time.sleep(0.05)
            forged = http.get(
                "/whoami", headers=bearer(token("app-1", ed25519.Ed25519PrivateKey.generate()))
            )
            unknown = http.get("/whoami", headers=bearer(token("app-2", key)))
            own = http.get("/whoami", headers=bearer(make_token(keys.jwt_secret)))
    assert mine.status_code == 200
    assert mine.json()["kind"] == "device_token"
    assert forged.status_code == unknown.status_code == 401
    assert own.status_code == 200  # the instance's own secret still verifies its own tokens


def test_serve_gives_the_remote_set_to_every_worker(
    jwks_server: JwksServer,
    tmp_path: Path,
    keys: Keys,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    scrub_devicegate_env(monkeypatch)
    seen: dict[str, str] = {}
    monkeypatch.setattr(uvicorn, "run", lambda *_, **__: seen.update(os.environ))
    secrets_file = write_secrets(tmp_path / "secrets.json", keys)
    argv = ["serve", "--secrets", str(secrets_file), "--workers", "2"]
    try:
        assert cli.main([*argv, "--jwks-url", jwks_server.url]) == 0
        app = app_from_env()
        assert isinstance(app, ReloadableApp)
        config = app.gate.config
    finally:
        for name in [name for name in os.environ if name.startswith("DEVICEGATE_")]:
            del os.environ[name]  # what serve --workers exported
    assert seen["DEVICEGATE_JWKS_URL"] == jwks_server.url
    assert config.jwks_url == jwks_server.url
    assert "remote keys:" in capsys.readouterr().err


@pytest.mark.integration
async def test_a_reconfiguration_keeps_the_remote_set_it_already_has(
    jwks_server: JwksServer,
) -> None:
    # A SIGHUP must not drop the last good keys: with the JWKS host down at that moment, every
    # remote token would get 503 until it came back.
    key = ed25519.Ed25519PrivateKey.generate()
    jwks_server.serve(("k1", key))
    config = GateConfig(api_keys=API_KEY, jwks_url=jwks_server.url)
    gate = DeviceAuthMiddleware(RecordingApp(), config=config)
    remote = gate.verifier.remote_keys
    assert remote is not None
    try:
        assert remote.refresh()
        jwks_server.status = 500  # the host fails from now on
        gate.reconfigure(config.replace(leeway_seconds=5))
        assert gate.verifier.remote_keys is remote
        async with client(gate) as http:
            assert (await http.get("/", headers=bearer(token("k1", key)))).status_code == 200
        other = "http://127.0.0.1:1/jwks.json"
        gate.reconfigure(config.replace(jwks_url=other))  # another set: a new one
        assert gate.verifier.remote_keys is not remote
    finally:
        remote.close()
        new = gate.verifier.remote_keys
        if new is not None:
            new.close()
