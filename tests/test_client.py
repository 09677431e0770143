"""devicegate.client: httpx authentication for devices, with and without DPoP, against the
middleware in process (asyncio and trio) and against a real ``devicegate serve``."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from devicegate import DeviceAuthMiddleware, RevocationList, TokenIssuer
from devicegate._tokens import unverified_claims
from devicegate.client import DeviceTokenAuth, DPoPAuth
from tests.helpers import Keys, RecordingApp, jti_of, write_secrets
from tests.servers.process import HOST, answers, devicegate_command, serve

DEVICE = "device-client"
BASE = "http://testserver"
PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey


@pytest.fixture(params=["ES256", "EdDSA"])
def private_key(request: pytest.FixtureRequest) -> PrivateKey:
    if request.param == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    return ed25519.Ed25519PrivateKey.generate()


async def test_dpop_auth_signs_every_request_and_refetches_a_refused_token(
    keys: Keys, private_key: PrivateKey
) -> None:
    revocations = RevocationList()
    config = keys.config(public_url=BASE)
    app = RecordingApp()
    gate = DeviceAuthMiddleware(app, config=config, revocations=revocations)
    issuer = TokenIssuer(config)
    minted: list[str] = []

    async def fetch_token() -> str:  # the app server's login, say
        token = issuer.issue(DEVICE, dpop_jkt=auth.jkt).access_token
        minted.append(token)
        return token

    auth = DPoPAuth(fetch_token, private_key=private_key, device_id=DEVICE)
    transport = httpx.ASGITransport(app=gate)
    async with httpx.AsyncClient(transport=transport, base_url=BASE, auth=auth) as http:
        statuses = [(await http.get("/items", params={"page": n})).status_code for n in range(3)]
        assert statuses == [200, 200, 200]
        assert len(minted) == 1  # one token, a fresh proof for each request
        proofs = {dict(call["headers"])[b"dpop"] for call in app.calls}
        assert len(proofs) == 3
        await revocations.revoke_token(jti_of(minted[0]))
        posted = await http.post("/items", json={"name": "x"})  # refused once, then a new token
    assert posted.status_code == 200
    assert len(minted) == 2
    assert minted[0] not in repr(auth)
    assert minted[1] not in repr(auth)


def test_device_token_auth_replaces_a_token_before_it_expires(keys: Keys) -> None:
    config = keys.config()
    issuer = TokenIssuer(config)
    lifetimes = iter([5, 300])  # the first token is within the margin at once
    minted: list[str] = []

    def fetch_token() -> str:
        minted.append(issuer.issue(DEVICE, lifetime=next(lifetimes)).access_token)
        return minted[-1]

    auth = DeviceTokenAuth(fetch_token, device_id=DEVICE, margin_seconds=10)
    request = httpx.Request("GET", f"{BASE}/items")
    flow = auth.sync_auth_flow(request)
    first = next(flow)
    assert first.headers["authorization"] == f"Bearer {minted[0]}"
    assert first.headers["x-instance-id"] == DEVICE
    flow = auth.sync_auth_flow(httpx.Request("GET", f"{BASE}/items"))
    assert next(flow).headers["authorization"] == f"Bearer {minted[1]}"
    assert len(minted) == 2


def test_a_coroutine_source_needs_an_async_client(keys: Keys) -> None:
    async def fetch_token() -> str:
        return "never"

    auth = DeviceTokenAuth(fetch_token)
    with pytest.raises(TypeError, match="AsyncClient"):
        next(auth.sync_auth_flow(httpx.Request("GET", BASE)))


@pytest.mark.integration
def test_dpop_auth_against_a_real_serve(
    keys: Keys, private_key: PrivateKey, tmp_path: Path
) -> None:
    secrets_file = write_secrets(tmp_path / "secrets.json", keys)

    def command(port: int) -> list[str]:
        return [
            *devicegate_command("--secrets", str(secrets_file))(port),
            *("--public-url", f"http://{HOST}:{port}", "--dpop-nonce"),
        ]

    with serve(command, tmp_path / "serve.log", cwd=tmp_path, ready=answers("/health")) as server:

        def fetch_token() -> str:  # as an app server would, with the server key
            minted = httpx.post(
                f"{server.url}/gen-jwt",
                headers={"x-api-key": keys.api_key},
                json={"instance_id": DEVICE, "dpop_jkt": auth.jkt},
                trust_env=False,
            )
            token: str = minted.json()["access_token"]
            return token

        auth = DPoPAuth(fetch_token, private_key=private_key, device_id=DEVICE)
        sent: list[str] = []  # each proof as it was sent (a retry reuses the request)
        hooks = {"request": [lambda request: sent.append(request.headers["dpop"])]}
        with httpx.Client(
            base_url=server.url, auth=auth, trust_env=False, event_hooks=hooks
        ) as http:
            answers_ = [http.get("/whoami") for _ in range(3)]
    assert [answer.status_code for answer in answers_] == [200, 200, 200]
    assert answers_[0].json()["instance_id"] == DEVICE
    # The first was asked for a server nonce and sent again with it; the others had it.
    assert len(sent) == 4
    assert ["nonce" in unverified_claims(proof) for proof in sent] == [False, True, True, True]


def test_only_ed25519_or_p256_keys() -> None:
    from devicegate import ConfigError

    with pytest.raises(ConfigError, match="private_key"):
        DPoPAuth(lambda: "t", private_key=ec.generate_private_key(ec.SECP384R1()))


async def test_dpop_auth_answers_a_nonce_request_once(keys: Keys, private_key: PrivateKey) -> None:
    # RFC 9449 §8: a server that wants a nonce answers 401 use_dpop_nonce with DPoP-Nonce;
    # the client signs the proof again with it, and keeps it for the next requests.
    config = keys.config(public_url=BASE, dpop_nonce=True)
    app = RecordingApp()
    gate = DeviceAuthMiddleware(app, config=config)
    issuer = TokenIssuer(config)

    def fetch_token() -> str:
        return issuer.issue(DEVICE, dpop_jkt=auth.jkt).access_token

    auth = DPoPAuth(fetch_token, private_key=private_key, device_id=DEVICE)
    sent: list[str] = []  # each proof as it was sent (a retry reuses the request)

    async def record(request: httpx.Request) -> None:
        sent.append(request.headers["dpop"])

    transport = httpx.ASGITransport(app=gate)
    hooks = {"request": [record]}
    async with httpx.AsyncClient(
        transport=transport, base_url=BASE, auth=auth, event_hooks=hooks
    ) as http:
        first = await http.get("/")
        second = await http.get("/")
    assert (first.status_code, second.status_code) == (200, 200)
    assert len(sent) == 3  # asked for a nonce once; the second request had it already
    nonces = [unverified_claims(proof).get("nonce") for proof in sent]
    assert nonces[0] is None
    assert nonces[1] is not None
    assert nonces[1] == nonces[2]
    assert len(app.calls) == 2
