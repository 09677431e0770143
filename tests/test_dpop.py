"""DPoP (RFC 9449) through the middleware, in process and on both anyio backends: tokens minted
with ``dpop_jkt`` are accepted only with a proof of possession of that key, built here by an
independent JOSE implementation (joserfc), and every proof-level attack of RFC 9449 §11 that
applies is refused.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from joserfc import jws
from joserfc.jwk import ECKey, OctKey, OKPKey

from devicegate import DeviceAuthMiddleware, GateConfig, TokenIssuer
from devicegate._dpop import NONCE_PERIOD_SECONDS, Nonces, SharedReplayStore, nonce_key
from devicegate._principal import Principal
from tests.helpers import (
    Keys,
    RecordingApp,
    call_asgi,
    fresh_keys,
    message_types,
    write_secrets,
    ws_scope,
)
from tests.servers.process import HOST, answers, devicegate_command, serve, sync_client
from tests.servers.redis_server import RedisServer, redis_server
from tests.test_readme import BLOCKS, run_block

PUBLIC_URL = "https://api.example.com"
DEVICE = "device-dpop"
ALGORITHMS = {
    "ES256": lambda: ECKey.generate_key("P-256"),
    "EdDSA": lambda: OKPKey.generate_key("Ed25519"),
}

DeviceKey = ECKey | OKPKey


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def proof(
    key: DeviceKey,
    token: str,
    *,
    method: str = "GET",
    url: str = f"{PUBLIC_URL}/items",
    alg: str | None = None,
    header: dict[str, Any] | None = None,
    signer: Any = None,
    **claims: Any,
) -> str:
    """A DPoP proof as a device builds it, with joserfc; keyword arguments change the claims
    (None drops one) and ``header`` the protected header."""
    alg = alg or ("ES256" if isinstance(key, ECKey) else "EdDSA")
    protected = {"typ": "dpop+jwt", "alg": alg, "jwk": key.as_dict(private=False)}
    protected.update(header or {})
    body: dict[str, Any] = {
        "jti": secrets.token_urlsafe(16),
        "htm": method,
        "htu": url,
        "iat": int(time.time()),
        "ath": b64url(hashlib.sha256(token.encode()).digest()),
    }
    body.update(claims)
    body = {name: value for name, value in body.items() if value is not None}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # joserfc marks EdDSA deprecated (RFC 9864)
        return jws.serialize_compact(
            protected, json.dumps(body).encode(), signer or key, algorithms=[alg]
        )


def config(keys: Keys, **options: Any) -> GateConfig:
    return keys.config(public_url=PUBLIC_URL, **options)


def bound_token(keys: Keys, key: DeviceKey) -> str:
    issued = TokenIssuer(config(keys)).issue(DEVICE, dpop_jkt=key.thumbprint())
    assert issued.token_type == "DPoP"
    return issued.access_token


async def call(
    app: Any,
    token: str,
    proofs: list[str] | None,
    *,
    scheme: str = "DPoP",
    method: str = "GET",
    path: str = "/items",
) -> httpx.Response:
    headers = [("authorization", f"{scheme} {token}"), ("x-instance-id", DEVICE)]
    headers += [("dpop", value) for value in proofs or []]
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://internal:8000") as http:
        return await http.request(method, path, headers=headers)


def assert_dpop_refusal(response: httpx.Response, error: str = "invalid_dpop_proof") -> None:
    assert response.status_code == 401
    assert response.json()["error"] == error
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith(f'DPoP realm="devicegate", error="{error}"')
    assert challenge.endswith(', algs="ES256 EdDSA"')


@pytest.fixture(params=list(ALGORITHMS))
def key(request: pytest.FixtureRequest) -> DeviceKey:
    key: DeviceKey = ALGORITHMS[request.param]()
    return key


async def test_a_bound_token_with_a_fresh_proof_each_time_is_admitted(
    keys: Keys, key: DeviceKey
) -> None:
    app = RecordingApp()
    gate = DeviceAuthMiddleware(app, config=config(keys))
    token = bound_token(keys, key)
    for _ in range(3):  # the token is cached after the first; the proof is checked every time
        assert (await call(gate, token, [proof(key, token)])).status_code == 200
    principal = app.calls[-1]["user"]
    assert isinstance(principal, Principal)
    assert principal.dpop_jkt == key.thumbprint()
    assert principal.instance_id == DEVICE
    # What the proof check noted for the middleware stays with it.
    assert [name for name in app.calls[-1] if name.startswith("devicegate.")] == []
    # Without a proof, the cached token is refused all the same.
    assert_dpop_refusal(await call(gate, token, None))


async def test_the_token_endpoint_mints_dpop_tokens(keys: Keys, key: DeviceKey) -> None:
    gate = DeviceAuthMiddleware(RecordingApp(), config=config(keys))
    transport = httpx.ASGITransport(app=gate)
    async with httpx.AsyncClient(transport=transport, base_url="http://internal") as http:
        body = {"instance_id": DEVICE, "dpop_jkt": key.thumbprint()}
        minted = await http.post("/gen-jwt", headers={"x-api-key": keys.api_key}, json=body)
        bad = await http.post(
            "/gen-jwt",
            headers={"x-api-key": keys.api_key},
            json={"instance_id": DEVICE, "dpop_jkt": "not-a-thumbprint"},
        )
    assert minted.status_code == 200
    assert minted.json()["token_type"] == "DPoP"
    token = minted.json()["access_token"]
    assert (await call(gate, token, [proof(key, token)])).status_code == 200
    assert bad.status_code == 400
    assert bad.json()["error"] == "invalid_request"
    assert "dpop_jkt must be an RFC 7638 SHA-256 thumbprint" in bad.json()["error_description"]


# Each RFC 9449 §11 attack that applies to a resource server, as a change to a good proof.
ATTACKS: dict[str, Any] = {
    "another-method": lambda key, token: proof(key, token, method="POST"),
    "another-path": lambda key, token: proof(key, token, url=f"{PUBLIC_URL}/admin"),
    "another-host": lambda key, token: proof(key, token, url="https://evil.example/items"),
    "another-scheme": lambda key, token: proof(key, token, url="http://api.example.com/items"),
    "stale": lambda key, token: proof(key, token, iat=int(time.time()) - 120),
    "from-the-future": lambda key, token: proof(key, token, iat=int(time.time()) + 120),
    "no-iat": lambda key, token: proof(key, token, iat=None),
    "iat-a-string": lambda key, token: proof(key, token, iat=str(int(time.time()))),
    "iat-true": lambda key, token: proof(key, token, iat=True),
    "iat-beyond-any-float": lambda key, token: proof(key, token, iat=10**400),
    "iat-far-past-beyond-any-float": lambda key, token: proof(key, token, iat=-(10**400)),
    "no-jti": lambda key, token: proof(key, token, jti=None),
    "no-ath": lambda key, token: proof(key, token, ath=None),
    "ath-of-another-token": lambda key, token: proof(key, token, ath=b64url(b"\0" * 32)),
    "another-key": lambda key, token: proof(type(key).generate_key(key.curve_name), token),
    "hmac": lambda key, token: proof(
        key, token, alg="HS256", signer=OctKey.generate_key(256), header={}
    ),
    "typ-jwt": lambda key, token: proof(key, token, header={"typ": "JWT"}),
    "private-jwk": lambda key, token: proof(key, token, header={"jwk": key.as_dict(private=True)}),
    "not-a-jws": lambda key, token: "not.a.proof!",
}


@pytest.mark.parametrize("attack", list(ATTACKS))
async def test_proof_attacks_are_refused(keys: Keys, key: DeviceKey, attack: str) -> None:
    app = RecordingApp()
    gate = DeviceAuthMiddleware(app, config=config(keys))
    token = bound_token(keys, key)
    assert_dpop_refusal(await call(gate, token, [ATTACKS[attack](key, token)]))
    assert app.calls == []


async def test_alg_none_is_refused(keys: Keys, key: DeviceKey) -> None:
    token = bound_token(keys, key)
    good = proof(key, token).split(".")
    header = json.loads(base64.urlsafe_b64decode(good[0] + "=="))
    header["alg"] = "none"
    unsigned = f"{b64url(json.dumps(header).encode())}.{good[1]}."
    gate = DeviceAuthMiddleware(RecordingApp(), config=config(keys))
    assert_dpop_refusal(await call(gate, token, [unsigned]))
    assert_dpop_refusal(await call(gate, token, [f"{unsigned}{good[2]}"]))


async def test_a_replayed_proof_is_refused(keys: Keys, key: DeviceKey) -> None:
    gate = DeviceAuthMiddleware(RecordingApp(), config=config(keys))
    token = bound_token(keys, key)
    once = proof(key, token)
    assert (await call(gate, token, [once])).status_code == 200
    assert_dpop_refusal(await call(gate, token, [once]))


async def test_a_reload_forgets_no_proof(keys: Keys, key: DeviceKey) -> None:
    # A SIGHUP (reconfigure) must not reopen the window for a proof already used.
    gate = DeviceAuthMiddleware(RecordingApp(), config=config(keys))
    token = bound_token(keys, key)
    once = proof(key, token)
    assert (await call(gate, token, [once])).status_code == 200
    gate.reconfigure(config(keys, token_cache_size=100))
    assert_dpop_refusal(await call(gate, token, [once]))


async def test_one_proof_header_exactly(keys: Keys, key: DeviceKey) -> None:
    gate = DeviceAuthMiddleware(RecordingApp(), config=config(keys))
    token = bound_token(keys, key)
    assert_dpop_refusal(await call(gate, token, [proof(key, token), proof(key, token)]))
    assert_dpop_refusal(await call(gate, token, []))


async def test_the_url_is_compared_as_rfc_9449_allows(keys: Keys, key: DeviceKey) -> None:
    # Query and fragment are ignored; scheme and host case and the default port normalised.
    gate = DeviceAuthMiddleware(RecordingApp(), config=config(keys))
    token = bound_token(keys, key)
    for url in (
        f"{PUBLIC_URL}/items?page=2#top",
        "HTTPS://API.EXAMPLE.COM:443/items",
    ):
        response = await call(gate, token, [proof(key, token, url=url)], path="/items?page=2")
        assert response.status_code == 200, url


async def test_a_bound_token_sent_as_bearer_is_refused(keys: Keys, key: DeviceKey) -> None:
    gate = DeviceAuthMiddleware(RecordingApp(), config=config(keys))
    token = bound_token(keys, key)
    refused = await call(gate, token, [proof(key, token)], scheme="Bearer")
    assert_dpop_refusal(refused, "invalid_token")


async def test_an_unbound_token_sent_with_dpop_is_refused(keys: Keys, key: DeviceKey) -> None:
    gate = DeviceAuthMiddleware(RecordingApp(), config=config(keys))
    token = TokenIssuer(config(keys)).issue(DEVICE).access_token
    assert_dpop_refusal(await call(gate, token, [proof(key, token)]), "invalid_token")


async def test_without_a_public_url_no_proof_is_accepted(keys: Keys, key: DeviceKey) -> None:
    # The URL a proof is for is never guessed from the request's own Host.
    gate = DeviceAuthMiddleware(RecordingApp(), config=keys.config())
    token = bound_token(keys, key)
    url = "http://internal:8000/items"
    assert_dpop_refusal(await call(gate, token, [proof(key, token, url=url)]))


async def test_the_root_path_is_part_of_the_url(keys: Keys, key: DeviceKey) -> None:
    gate = DeviceAuthMiddleware(RecordingApp(), config=config(keys))
    token = bound_token(keys, key)
    headers = [
        ("authorization", f"DPoP {token}"),
        ("x-instance-id", DEVICE),
        ("dpop", proof(key, token, url=f"{PUBLIC_URL}/api/items")),
    ]
    transport = httpx.ASGITransport(app=gate, root_path="/api")
    async with httpx.AsyncClient(transport=transport, base_url="http://internal") as http:
        assert (await http.get("/api/items", headers=headers)).status_code == 200


async def test_a_token_bound_another_way_is_refused(keys: Keys) -> None:
    # RFC 7800 cnf other than jkt (mTLS's x5t#S256): a binding devicegate cannot check.
    from tests.helpers import bearer, make_token

    token = make_token(keys.jwt_secret, header={"alg": "HS256"}, claims=None)
    claims = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    claims["cnf"] = {"x5t#S256": b64url(b"\1" * 32)}
    bound = make_token(keys.jwt_secret, claims)
    gate = DeviceAuthMiddleware(RecordingApp(), config=config(keys))
    transport = httpx.ASGITransport(app=gate)
    async with httpx.AsyncClient(transport=transport, base_url="http://internal") as http:
        assert (await http.get("/", headers=bearer(bound))).status_code == 401


def test_public_url_and_algorithms_are_checked(keys: Keys) -> None:
    from devicegate import ConfigError

    for bad in ("api.example.com", "ftp://x", "https://x/?q=1", "https://u:p@x"):
        with pytest.raises(ConfigError, match=r"^public_url: "):
            keys.config(public_url=bad)
    with pytest.raises(ConfigError, match=r"^dpop_algorithms: "):
        keys.config(dpop_algorithms=["HS256"])
    with pytest.raises(ValueError, match="dpop_jkt"):
        TokenIssuer(keys.config()).issue(DEVICE, dpop_jkt="x" * 42)


async def test_the_readme_example(
    keys: Keys, key: DeviceKey, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    block = BLOCKS["Proof of possession: DPoP"]
    write_secrets(tmp_path / "secrets.json", keys)
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {"app": RecordingApp()}
    namespace.update(GateConfig=GateConfig, DeviceAuthMiddleware=DeviceAuthMiddleware)
    run_block(block, namespace)
    token = bound_token(keys, key)
    assert (await call(namespace["app"], token, [proof(key, token)])).status_code == 200


@pytest.mark.integration
def test_through_a_real_serve(keys: Keys, key: DeviceKey, tmp_path: Path) -> None:
    def command(port: int) -> list[str]:
        serve_port = devicegate_command("--secrets", str(secrets_file))(port)
        return [*serve_port, "--public-url", f"http://{HOST}:{port}"]

    secrets_file = write_secrets(tmp_path / "secrets.json", keys)
    with (
        serve(command, tmp_path / "serve.log", cwd=tmp_path, ready=answers("/health")) as server,
        sync_client(server.url) as http,
    ):
        minted = http.post(
            "/gen-jwt",
            headers={"x-api-key": keys.api_key},
            json={"instance_id": DEVICE, "dpop_jkt": key.thumbprint()},
        )
        assert minted.json()["token_type"] == "DPoP"
        token = minted.json()["access_token"]
        url = f"{server.url}/whoami"
        headers = {"authorization": f"DPoP {token}", "x-instance-id": DEVICE}
        once = proof(key, token, url=url)
        admitted = http.get("/whoami", headers={**headers, "dpop": once})
        replayed = http.get("/whoami", headers={**headers, "dpop": once})
        as_bearer = http.get(
            "/whoami", headers={**headers, "authorization": f"Bearer {token}", "dpop": once}
        )
    assert admitted.status_code == 200
    assert admitted.json()["instance_id"] == DEVICE
    assert_dpop_refusal(replayed)
    assert_dpop_refusal(as_bearer, "invalid_token")


async def test_a_rule_can_require_dpop_on_a_path(keys: Keys, key: DeviceKey) -> None:
    # Older apps keep Bearer elsewhere; the sensitive path takes only proven tokens (and the
    # keys its accept names).
    from devicegate import Rule

    rules = [Rule("/payments/*", accept={"device_token", "api_key"}, dpop=True)]
    gate = DeviceAuthMiddleware(RecordingApp(), config=config(keys), rules=rules)
    plain = TokenIssuer(config(keys)).issue(DEVICE).access_token
    bound = bound_token(keys, key)
    transport = httpx.ASGITransport(app=gate)
    async with httpx.AsyncClient(transport=transport, base_url="http://internal") as http:
        device = {"x-instance-id": DEVICE}
        elsewhere = await http.get("/items", headers={"authorization": f"Bearer {plain}", **device})
        refused = await http.get(
            "/payments/1", headers={"authorization": f"Bearer {plain}", **device}
        )
        key_call = await http.get("/payments/1", headers={"x-api-key": keys.api_key})
    assert elsewhere.status_code == 200
    assert_dpop_refusal(refused, "invalid_token")
    assert key_call.status_code == 200
    url = f"{PUBLIC_URL}/payments/1"
    admitted = await call(gate, bound, [proof(key, bound, url=url)], path="/payments/1")
    assert admitted.status_code == 200


def test_a_dpop_rule_must_check_device_tokens() -> None:
    from devicegate import ConfigError, Rule

    for options in ({"public": True}, {"accept": {"api_key"}}):
        with pytest.raises(ConfigError, match=r"^Rule\.dpop: "):
            Rule("/x", dpop=True, **options)
    assert repr(Rule("/x", dpop=True)).endswith(", dpop=True)")


# -- several instances: one replay store on a real redis-server ----------------------------------


@pytest.fixture
def redis(tmp_path: Path, starts_a_process: None) -> Iterator[RedisServer]:
    with redis_server(tmp_path) as running:
        yield running


async def test_a_proof_used_on_one_instance_is_refused_on_another(
    keys: Keys, key: DeviceKey, redis: RedisServer
) -> None:
    stores = [SharedReplayStore(redis.url) for _ in range(2)]
    first, second = (
        DeviceAuthMiddleware(RecordingApp(), config=config(keys), dpop_replay=store)
        for store in stores
    )
    token = bound_token(keys, key)
    try:
        once = proof(key, token)
        assert (await call(first, token, [once])).status_code == 200
        assert_dpop_refusal(await call(second, token, [once]))  # another process: still caught
        assert (await call(second, token, [proof(key, token)])).status_code == 200
        held = [str(name) for name in redis.client().keys("devicegate:dpop:*")]
        assert len(held) == 2  # hashed: no token or key material in Redis
        assert all(str(redis.client().ttl(name)) != "-1" for name in held)
        redis.stop()  # fail closed: a replay that cannot be ruled out is not admitted
        down = await call(first, token, [proof(key, token)])
        assert down.status_code == 503
        assert down.headers["retry-after"] == "1"
    finally:
        for store in stores:
            store.close()


@pytest.mark.integration
def test_two_real_instances_behind_one_url_share_their_proofs(
    keys: Keys, key: DeviceKey, redis: RedisServer, tmp_path: Path
) -> None:
    # As behind a load balancer: one public URL, two `devicegate serve --redis` instances.
    secrets_file = write_secrets(tmp_path / "secrets.json", keys)
    args = ("--secrets", str(secrets_file), "--redis", redis.url, "--public-url", PUBLIC_URL)
    with (
        serve(
            devicegate_command(*args), tmp_path / "a.log", cwd=tmp_path, ready=answers("/health")
        ) as first,
        serve(
            devicegate_command(*args), tmp_path / "b.log", cwd=tmp_path, ready=answers("/health")
        ) as second,
    ):
        token = bound_token(keys, key)
        once = proof(key, token, url=f"{PUBLIC_URL}/whoami")
        headers = {"authorization": f"DPoP {token}", "x-instance-id": DEVICE, "dpop": once}
        with sync_client(first.url) as http:
            admitted = http.get("/whoami", headers=headers)
        with sync_client(second.url) as http:
            replayed = http.get("/whoami", headers=headers)
    assert admitted.status_code == 200
    assert_dpop_refusal(replayed)


async def test_a_websocket_handshake_is_judged_the_same_way(keys: Keys, key: DeviceKey) -> None:
    # The handshake is a GET to the socket's URL: the proof names that, as for any request.
    app = RecordingApp()
    gate = DeviceAuthMiddleware(app, config=config(keys))
    token = bound_token(keys, key)
    good = proof(key, token, url=f"{PUBLIC_URL}/ws")
    base = [("authorization", f"DPoP {token}"), ("x-instance-id", DEVICE)]
    accepted = await call_asgi(gate, ws_scope("/ws", [*base, ("dpop", good)]))
    assert message_types(accepted)[0] == "websocket.accept"
    replayed = await call_asgi(gate, ws_scope("/ws", [*base, ("dpop", good)]))
    without = await call_asgi(gate, ws_scope("/ws", base))
    for refused in (replayed, without):
        assert message_types(refused) == ["websocket.close"]
        assert refused[0]["code"] == 1008
    assert len([scope for scope in app.calls if scope["type"] == "websocket"]) == 1


# -- server nonces (RFC 9449 §8) -----------------------------------------------------------------


def offered_nonce(response: httpx.Response) -> str:
    assert_dpop_refusal(response, "use_dpop_nonce")
    nonce = response.headers["dpop-nonce"]
    assert len(nonce) == 32  # base64url: the period and an HMAC of it, nothing else
    return nonce


async def test_a_server_that_wants_nonces_gives_one_and_takes_it(
    keys: Keys, key: DeviceKey
) -> None:
    app = RecordingApp()
    gate = DeviceAuthMiddleware(app, config=config(keys, dpop_nonce=True))
    token = bound_token(keys, key)
    nonce = offered_nonce(await call(gate, token, [proof(key, token)]))
    offered_nonce(await call(gate, token, [proof(key, token, nonce="A" * 32)]))
    offered_nonce(await call(gate, token, [proof(key, token, nonce=17)]))
    assert app.calls == []
    admitted = await call(gate, token, [proof(key, token, nonce=nonce)])
    assert admitted.status_code == 200
    assert "dpop-nonce" not in admitted.headers  # still the current one: nothing to offer
    # The nonce is checked after the signature: a forged proof learns nothing new.
    forged = proof(key, token, nonce=nonce).split(".")
    forged[2] = forged[2][::-1]
    assert_dpop_refusal(await call(gate, token, [".".join(forged)]))


async def test_an_aged_nonce_is_admitted_once_more_with_the_new_one_offered(
    keys: Keys, key: DeviceKey
) -> None:
    # Instances that share server keys share nonces: they derive from those keys (never from
    # the mobile API key, which ships inside apps).
    app = RecordingApp()
    gate = DeviceAuthMiddleware(app, config=config(keys, dpop_nonce=True))
    token = bound_token(keys, key)
    current = offered_nonce(await call(gate, token, [proof(key, token)]))
    key_material = nonce_key([keys.api_key, keys.jwt_secret])

    def nonce_from(seconds_ago: int) -> str:
        return Nonces(key_material, clock=lambda: time.time() - seconds_ago).current()

    assert nonce_from(0) == current
    aged = await call(gate, token, [proof(key, token, nonce=nonce_from(NONCE_PERIOD_SECONDS))])
    assert aged.status_code == 200
    assert aged.headers["dpop-nonce"] == current
    assert [name for name in app.calls[-1] if name.startswith("devicegate.")] == []
    too_old = nonce_from(2 * NONCE_PERIOD_SECONDS)
    assert offered_nonce(await call(gate, token, [proof(key, token, nonce=too_old)])) == current


async def test_instances_with_the_same_server_keys_accept_each_others_nonces(
    keys: Keys, key: DeviceKey
) -> None:
    token = bound_token(keys, key)

    def gate(**keys_: str) -> DeviceAuthMiddleware:
        given: dict[str, Any] = {"api_keys": keys.api_key, "mobile_api_keys": keys.mobile_api_key}
        given |= keys_
        settings = GateConfig(
            jwt_secret=keys.jwt_secret, public_url=PUBLIC_URL, dpop_nonce=True, **given
        )
        return DeviceAuthMiddleware(RecordingApp(), config=settings)

    first = gate()
    same = gate(mobile_api_keys=fresh_keys().mobile_api_key)
    other = gate(api_keys=fresh_keys().api_key)
    nonce = offered_nonce(await call(first, token, [proof(key, token)]))
    assert (await call(same, token, [proof(key, token, nonce=nonce)])).status_code == 200
    assert offered_nonce(await call(other, token, [proof(key, token, nonce=nonce)])) != nonce


@pytest.mark.parametrize("encoded", ["/files/a%20b", "/files/%61%20b", "/files/a b"])
async def test_a_percent_encoded_path_in_htu_matches_the_decoded_request_path(
    keys: Keys, key: DeviceKey, encoded: str
) -> None:
    gate = DeviceAuthMiddleware(RecordingApp(), config=config(keys))
    token = bound_token(keys, key)
    good = proof(key, token, url=f"{PUBLIC_URL}{encoded}")
    assert (await call(gate, token, [good], path="/files/a%20b")).status_code == 200
    other = proof(key, token, url=f"{PUBLIC_URL}/files/a%2520b")  # a literal "%20"
    assert_dpop_refusal(await call(gate, token, [other], path="/files/a%20b"))
