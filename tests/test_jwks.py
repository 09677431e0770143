"""GET /.well-known/jwks.json: the public keys of the ring, for other services; and key
rotation end to end (add, promote, retire) through ``DeviceAuthMiddleware.reconfigure``."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from joserfc import jwt as jose_jwt
from joserfc.jwk import KeySet

from devicegate import ConfigError, DeviceAuthMiddleware, GateConfig, JwksEndpoint, TokenIssuer
from devicegate._jwks import JWKS_MAX_AGE_SECONDS
from tests.helpers import Keys, RecordingApp, bearer, client, private_pem, public_pem
from tests.servers.process import answers, serve, sync_client, uvicorn_command

JWKS_PATH = "/.well-known/jwks.json"
DEVICE = "device-9d0c"


@pytest.fixture
def asymmetric(keys: Keys) -> GateConfig:
    return keys.config(
        jwt_private_key={"ed-1": private_pem(ed25519.Ed25519PrivateKey.generate())},
        jwt_public_keys={"ec-1": public_pem(ec.generate_private_key(ec.SECP256R1()))},
    )


async def test_the_jwks_is_public_and_cacheable(asymmetric: GateConfig, keys: Keys) -> None:
    app = RecordingApp()
    gate = DeviceAuthMiddleware(app, config=asymmetric)
    assert gate.jwks_path == JWKS_PATH
    async with client(gate) as http:
        response = await http.get(JWKS_PATH)  # no credential at all
        head = await http.head(JWKS_PATH)
        post = await http.post(JWKS_PATH)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/jwk-set+json"
    assert response.headers["cache-control"] == f"public, max-age={JWKS_MAX_AGE_SECONDS}"
    document = response.json()
    assert [(k["kid"], k["alg"], k["use"], k["kty"]) for k in document["keys"]] == [
        ("ed-1", "EdDSA", "sig", "OKP"),
        ("ec-1", "ES256", "sig", "EC"),
    ]
    # Never the HMAC secret, never a private member.
    assert keys.jwt_secret not in response.text
    assert all(not {"d", "k", "p", "q"} & set(jwk) for jwk in document["keys"])
    assert head.status_code == 200
    assert head.content == b""
    assert post.status_code == 405
    assert post.headers["allow"] == "GET, HEAD"
    assert not app.ran


@pytest.mark.parametrize(
    ("options", "path", "served"),
    [
        ({}, JWKS_PATH, True),
        ({"jwks_path": "/keys"}, "/keys", True),
        ({"jwks_path": "/keys"}, JWKS_PATH, False),
        ({"jwks_path": None}, JWKS_PATH, False),
    ],
    ids=["default", "custom", "custom-moves-it", "off"],
)
async def test_where_the_jwks_is_served(
    asymmetric: GateConfig, options: dict[str, Any], path: str, served: bool
) -> None:
    app = RecordingApp()
    gate = DeviceAuthMiddleware(app, config=asymmetric, **options)
    async with client(gate) as http:
        response = await http.get(path)
    # Where it is not served, the path is an ordinary one: a credential is required.
    assert response.status_code == (200 if served else 401)
    assert not app.ran


async def test_an_hs256_gate_publishes_nothing(keys: Keys) -> None:
    gate = DeviceAuthMiddleware(RecordingApp(), config=keys.config())
    assert gate.jwks_path is None
    async with client(gate) as http:
        assert (await http.get(JWKS_PATH)).status_code == 401
    with pytest.raises(ConfigError, match="needs an EdDSA or ES256 key"):
        JwksEndpoint(keys.config())


def test_jwks_path_must_be_clean_and_distinct(asymmetric: GateConfig) -> None:
    for path, says in (("jwks.json", "absolute path"), ("/gen-jwt", "must differ")):
        with pytest.raises(ConfigError, match=says):
            DeviceAuthMiddleware(RecordingApp(), config=asymmetric, jwks_path=path)


# --- rotation, end to end -------------------------------------------------------------------


async def status_of(gate: DeviceAuthMiddleware, token: str) -> int:
    async with client(gate) as http:
        return (await http.get("/data", headers=bearer(token, DEVICE))).status_code


async def published(gate: DeviceAuthMiddleware) -> list[str]:
    async with client(gate) as http:
        return [jwk["kid"] for jwk in (await http.get(JWKS_PATH)).json()["keys"]]


async def test_rotation_add_promote_retire(keys: Keys) -> None:
    old_key, new_key = ed25519.Ed25519PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate()
    old = {"2026-06": private_pem(old_key)}
    new = {"2026-12": private_pem(new_key)}
    gate = DeviceAuthMiddleware(
        RecordingApp(), config=GateConfig(api_keys=keys.api_key, jwt_private_key=old)
    )
    by_old = TokenIssuer(gate.config).issue(DEVICE).access_token
    # Minted by another instance that already holds the new key.
    by_new = TokenIssuer(GateConfig(jwt_private_key=new)).issue(DEVICE).access_token
    assert await status_of(gate, by_old) == 200
    assert await status_of(gate, by_new) == 401

    # 1. Add: the new public key is published and verifies; the old key still signs. Wait at
    # least the JWKS max-age before step 2, so that every verifier has fetched it.
    gate.reconfigure(gate.config.replace(jwt_public_keys={"2026-12": public_pem(new_key)}))
    assert await published(gate) == ["2026-06", "2026-12"]
    assert await status_of(gate, by_old) == 200
    assert await status_of(gate, by_new) == 200
    assert jwt.get_unverified_header(TokenIssuer(gate.config).issue().access_token)["kid"] == (
        "2026-06"
    )

    # 2. Promote: the new key signs; the old one only verifies, until the tokens it signed
    # expire (jwt_expire_seconds).
    gate.reconfigure(
        gate.config.replace(jwt_private_key=new, jwt_public_keys={"2026-06": public_pem(old_key)})
    )
    assert await published(gate) == ["2026-12", "2026-06"]
    assert jwt.get_unverified_header(TokenIssuer(gate.config).issue().access_token)["kid"] == (
        "2026-12"
    )
    assert await status_of(gate, by_old) == 200
    assert await status_of(gate, by_new) == 200

    # 3. Retire: the old key is gone; its tokens stop at once, cached or not.
    gate.reconfigure(gate.config.replace(jwt_public_keys=()))
    assert await published(gate) == ["2026-12"]
    assert await status_of(gate, by_old) == 401
    assert await status_of(gate, by_new) == 200


async def test_rotation_from_hs256_to_eddsa(keys: Keys) -> None:
    gate = DeviceAuthMiddleware(RecordingApp(), config=keys.config())
    hs256 = TokenIssuer(gate.config).issue(DEVICE).access_token
    # The private key signs from now on; the secret keeps verifying what is out there.
    gate.reconfigure(
        gate.config.replace(jwt_private_key=private_pem(ed25519.Ed25519PrivateKey.generate()))
    )
    eddsa = TokenIssuer(gate.config).issue(DEVICE).access_token
    assert jwt.get_unverified_header(eddsa)["alg"] == "EdDSA"
    assert await status_of(gate, hs256) == 200
    assert await status_of(gate, eddsa) == 200
    # Then the secret goes: HS256 is no longer an algorithm of this gate.
    gate.reconfigure(gate.config.replace(jwt_secret=None))
    assert await status_of(gate, hs256) == 401
    assert await status_of(gate, eddsa) == 200


# --- independent verifiers against a real server ---------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    api_key = "jwks-test-" + "k" * 6 + "Q9vX2mL7pR4tW8zN"
    environment = {
        "DEVICEGATE_API_KEYS": api_key,
        "DEVICEGATE_JWT_PRIVATE_KEY": private_pem(ed25519.Ed25519PrivateKey.generate()),
        "DEVICEGATE_JWT_PUBLIC_KEYS": public_pem(ec.generate_private_key(ec.SECP256R1())),
    }
    log = tmp_path_factory.mktemp("jwks") / "server.log"
    command = uvicorn_command("tests.servers.app:create_app", "--factory")
    with serve(command, log, env=environment, ready=answers("/health")) as running:
        yield running.url, api_key


def mint(url: str, api_key: str) -> str:
    with sync_client(url) as http:
        response = http.post(
            "/gen-jwt", headers={"x-api-key": api_key}, json={"instance_id": DEVICE}
        )
    assert response.status_code == 200, response.text
    token: str = response.json()["access_token"]
    return token


@pytest.mark.integration
def test_pyjwt_verifies_through_the_jwks(
    server: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for variable in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.delenv(variable, raising=False)
    url, api_key = server
    token = mint(url, api_key)
    signing_key = jwt.PyJWKClient(url + JWKS_PATH, cache_keys=False).get_signing_key_from_jwt(token)
    claims = jwt.decode(token, signing_key, algorithms=["EdDSA"])
    assert claims["instance_id"] == DEVICE
    assert claims["exp"] > time.time()


@pytest.mark.integration
@pytest.mark.filterwarnings("ignore:EdDSA is deprecated")  # RFC 9864 prefers "Ed25519"
def test_joserfc_verifies_through_the_jwks(server: tuple[str, str]) -> None:
    url, api_key = server
    token = mint(url, api_key)
    with sync_client(url) as http:
        response = http.get(JWKS_PATH)
    assert response.headers["cache-control"] == f"public, max-age={JWKS_MAX_AGE_SECONDS}"
    key_set = KeySet.import_key_set(json.loads(response.text))
    decoded = jose_jwt.decode(token, key_set, algorithms=["EdDSA"])
    assert decoded.header["kid"] == key_set.keys[0].kid
    assert decoded.claims["instance_id"] == DEVICE


@pytest.mark.integration
def test_the_served_set_holds_no_private_member(server: tuple[str, str]) -> None:
    url, _ = server
    with sync_client(url) as http:
        text = http.get(JWKS_PATH).text
    assert "PRIVATE" not in text
    assert '"d"' not in text
