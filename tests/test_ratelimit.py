"""Rate limits: tokens minted per server key and per device on the token endpoint, failed
authentications per client address in the middleware; in memory, and in a real redis-server
that two instances share. Every async test runs on asyncio and trio.
"""

from __future__ import annotations

import ast
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from devicegate import (
    ConfigError,
    Counters,
    DeviceAuthMiddleware,
    GateConfig,
    RevocationList,
    Rule,
)
from devicegate import _ratelimit as ratelimit
from devicegate._ratelimit import RateLimiter, address_group
from devicegate.gateway.forward_auth import ForwardAuth
from tests.helpers import (
    Keys,
    RecordingApp,
    bearer,
    claims_at,
    fresh_keys,
    make_token,
    write_secrets,
)
from tests.servers.redis_server import RedisServer, redis_server
from tests.test_readme import BLOCKS, README

DEVICE = "device-limited"


def gate(config: GateConfig, app: RecordingApp | None = None, **options: Any) -> Any:
    return DeviceAuthMiddleware(
        app or RecordingApp(), config=config, rules=[Rule("/health", public=True)], **options
    )


async def mint(
    app: Any, api_key: str, instance_id: str | None = DEVICE, address: str = "10.0.0.1"
) -> httpx.Response:
    transport = httpx.ASGITransport(app=app, client=(address, 5000))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        body = {} if instance_id is None else {"instance_id": instance_id}
        return await http.post("/gen-jwt", headers={"x-api-key": api_key}, json=body)


async def get(app: Any, headers: dict[str, str], address: str, path: str = "/") -> httpx.Response:
    transport = httpx.ASGITransport(app=app, client=(address, 5000))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        return await http.get(path, headers=headers)


def assert_limited(response: httpx.Response, *, within: int) -> None:
    assert response.status_code == 429
    assert response.json()["error"] == "slow_down"
    retry_after = int(response.headers["retry-after"])
    assert 1 <= retry_after <= within
    assert response.headers["cache-control"] == "no-store"


# -- configuration -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    ["10 per fortnight", "1/second;5/minute", "0/minute", "", "ten/minute", 10, ["1/second"]],
)
def test_a_limit_that_is_not_one_limit_is_refused_naming_the_field(
    keys: Keys, value: object
) -> None:
    for field in ("mint_limit_per_key", "mint_limit_per_device", "failure_limit_per_address"):
        with pytest.raises(ConfigError, match=f"^{field}: "):
            keys.config(**{field: value})


def test_limits_are_off_unless_set(keys: Keys) -> None:
    assert not RateLimiter(keys.config()).active
    assert RateLimiter(keys.config(mint_limit_per_device="1/minute")).active


def test_an_unknown_storage_is_refused_without_showing_it(keys: Keys) -> None:
    with pytest.raises(ConfigError) as excinfo:
        gate(
            keys.config(mint_limit_per_key="1/minute"),
            rate_limit_storage="nosuch://user:hunter2-password@host/",
        )
    assert excinfo.value.field == "rate_limit_storage"
    assert "hunter2" not in str(excinfo.value)


def test_the_repr_shows_the_storage_scheme_only(keys: Keys) -> None:
    limiter = RateLimiter(keys.config(mint_limit_per_key="1/minute"))
    assert repr(limiter) == (
        "<RateLimiter per_key=1 per 1 minute per_device=None per_address=None storage=memory>"
    )


# -- minting -------------------------------------------------------------------------------------


async def test_minting_per_device(keys: Keys) -> None:
    counters = Counters()
    app = gate(keys.config(mint_limit_per_device="3/minute"), counters=counters)
    for _ in range(3):
        assert (await mint(app, keys.api_key)).status_code == 200
    assert_limited(await mint(app, keys.api_key), within=60)
    assert counters.minted == 3  # nothing minted when refused
    # Another device has its own count; a generic token (no instance_id) is not limited by it.
    assert (await mint(app, keys.api_key, "device-other")).status_code == 200
    assert (await mint(app, keys.api_key, None)).status_code == 200


async def test_minting_per_server_key_name(keys: Keys) -> None:
    other = fresh_keys()
    config = GateConfig(
        api_keys={"app": keys.api_key, "ops": other.api_key},
        jwt_secret=keys.jwt_secret,
        mint_limit_per_key="2/minute",
    )
    app = gate(config)
    for device in ("d-1", "d-2"):
        assert (await mint(app, keys.api_key, device)).status_code == 200
    assert_limited(await mint(app, keys.api_key, "d-3"), within=60)
    assert (await mint(app, other.api_key, "d-3")).status_code == 200  # "ops" counts apart


async def test_unnamed_server_keys_share_one_count(keys: Keys) -> None:
    other = fresh_keys()
    config = GateConfig(
        api_keys=[keys.api_key, other.api_key],
        jwt_secret=keys.jwt_secret,
        mint_limit_per_key="2/minute",
    )
    app = gate(config)
    assert (await mint(app, keys.api_key, "d-1")).status_code == 200
    assert (await mint(app, other.api_key, "d-2")).status_code == 200
    assert_limited(await mint(app, keys.api_key, "d-3"), within=60)


async def test_a_malformed_mint_request_counts_nothing(keys: Keys) -> None:
    app = gate(keys.config(mint_limit_per_device="1/minute", mint_limit_per_key="1/minute"))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        bad = await http.post(
            "/gen-jwt", headers={"x-api-key": keys.api_key}, json={"instance_id": DEVICE, "x": 1}
        )
    assert bad.status_code == 400
    assert (await mint(app, keys.api_key)).status_code == 200


async def test_a_refused_mint_uses_up_nothing(keys: Keys) -> None:
    app = gate(keys.config(mint_limit_per_key="3/minute", mint_limit_per_device="1/minute"))
    assert (await mint(app, keys.api_key, "d-1")).status_code == 200
    for _ in range(5):  # over the device's limit: the key's budget is not charged for them
        assert (await mint(app, keys.api_key, "d-1")).status_code == 429
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        bad = await http.post(
            "/gen-jwt",
            headers={"x-api-key": keys.api_key},
            json={"instance_id": "d-2", "claims": {"exp": 1}},  # refused: a reserved claim
        )
    assert bad.status_code == 400
    assert (await mint(app, keys.api_key, "d-2")).status_code == 200  # d-2's one is intact
    assert (await mint(app, keys.api_key, "d-3")).status_code == 200  # the key's third
    assert_limited(await mint(app, keys.api_key, "d-4"), within=60)


async def test_a_blocked_address_still_passes_where_no_credential_is_needed(keys: Keys) -> None:
    app = DeviceAuthMiddleware(
        RecordingApp(),
        config=keys.config(failure_limit_per_address="1/minute"),
        rules=[Rule("/feed", optional=True)],
    )
    wrong = bearer(make_token(fresh_keys().jwt_secret))
    for _ in range(2):
        assert (await get(app, wrong, "10.0.0.4", "/feed")).status_code == 401
    assert (await get(app, {}, "10.0.0.4", "/feed")).status_code == 200  # optional: none sent
    assert_limited(await get(app, wrong, "10.0.0.4", "/feed"), within=60)


async def test_changing_a_limit_keeps_the_counts_and_the_blocks(keys: Keys) -> None:
    config = keys.config(mint_limit_per_device="1/minute", failure_limit_per_address="1/minute")
    app = gate(config)
    assert (await mint(app, keys.api_key)).status_code == 200
    wrong = bearer(make_token(fresh_keys().jwt_secret))
    for _ in range(2):
        await get(app, wrong, "10.0.0.8")
    app.reconfigure(config.replace(mint_limit_per_key="100/minute"))
    assert (await mint(app, keys.api_key)).status_code == 429  # the device's count is kept
    assert_limited(await get(app, bearer(make_token(keys.jwt_secret)), "10.0.0.8"), within=60)


def test_redis_urls_are_the_revocation_stores(keys: Keys) -> None:
    # The same URL serves revocations and limits; nothing connects before the first count.
    config = keys.config(mint_limit_per_device="1/minute")
    for url in ("redis://127.0.0.1:1/0", "rediss://127.0.0.1:1/0", "unix:///tmp/none.sock"):
        assert RateLimiter(config, url).storage_uri == url


async def test_reconfiguring_keeps_the_counts_unless_the_limits_change(keys: Keys) -> None:
    config = keys.config(mint_limit_per_device="1/minute")
    app = gate(config)
    assert (await mint(app, keys.api_key)).status_code == 200
    app.reconfigure(config.replace(leeway_seconds=5))  # a SIGHUP that changes something else
    assert (await mint(app, keys.api_key)).status_code == 429
    app.reconfigure(config.replace(mint_limit_per_device="2/minute"))
    assert (await mint(app, keys.api_key)).status_code == 200


# -- failed authentications per address ----------------------------------------------------------


async def test_an_address_over_its_failures_gets_429_until_its_window_passes(keys: Keys) -> None:
    app_under = RecordingApp()
    app = gate(keys.config(failure_limit_per_address="3/second"), app_under)
    wrong = bearer(make_token(fresh_keys().jwt_secret))
    known = bearer(make_token(keys.jwt_secret))
    new = bearer(make_token(keys.jwt_secret))  # another jti: another token
    assert (await get(app, known, "10.0.0.1")).status_code == 200  # verified: remembered
    for _ in range(4):  # the fourth failure is the one over the limit
        assert (await get(app, wrong, "10.0.0.1")).status_code == 401
    # Blocked: a token never verified before waits (no verification work for this address),
    # and so does anything that fails, with 429 rather than 401 ...
    limited = await get(app, new, "10.0.0.1")
    assert_limited(limited, within=1)
    assert_limited(await get(app, wrong, "10.0.0.1"), within=1)
    # ... while credentials known good need none: neighbours behind the same NAT go on.
    assert (await get(app, known, "10.0.0.1")).status_code == 200
    assert (await get(app, {"x-api-key": keys.api_key}, "10.0.0.1")).status_code == 200
    # Other addresses, and paths that need no credential, are not affected.
    assert (await get(app, new, "10.0.0.2")).status_code == 200
    assert (await get(app, {}, "10.0.0.1", "/health")).status_code == 200
    await anyio.sleep(int(limited.headers["retry-after"]) + 0.05)
    assert (await get(app, new, "10.0.0.1")).status_code == 200
    assert len(app_under.calls) == 6


async def test_admitted_requests_and_missing_credentials_never_count(keys: Keys) -> None:
    app = gate(keys.config(failure_limit_per_address="2/minute"))
    for _ in range(20):
        assert (await get(app, {"x-api-key": keys.api_key}, "10.0.0.1")).status_code == 200
        assert (await get(app, {}, "10.0.0.1")).status_code == 401  # no credential at all
    assert (await get(app, {"x-api-key": keys.api_key}, "10.0.0.1")).status_code == 200


async def test_expired_and_revoked_tokens_are_not_counted(keys: Keys) -> None:
    # The normal end of a good token: a device behind a shared address may hold on to one.
    revocations = RevocationList()
    app = gate(keys.config(failure_limit_per_address="2/minute"), revocations=revocations)
    expired = bearer(make_token(keys.jwt_secret, claims_at(now=int(time.time()) - 3600)))
    revoked_claims = claims_at(now=int(time.time()))
    revoked = bearer(make_token(keys.jwt_secret, revoked_claims))
    await revocations.revoke_token(revoked_claims["jti"])
    for _ in range(5):
        assert (await get(app, expired, "10.0.0.5")).status_code == 401
        assert (await get(app, revoked, "10.0.0.5")).status_code == 401
    assert (await get(app, {"x-api-key": keys.api_key}, "10.0.0.5")).status_code == 200


async def test_wrong_keys_count_as_failures(keys: Keys) -> None:
    app = gate(keys.config(failure_limit_per_address="2/minute"))
    wrong = {"x-api-key": fresh_keys().api_key}
    for _ in range(3):
        assert (await get(app, wrong, "10.0.0.9")).status_code == 401
    assert_limited(await get(app, wrong, "10.0.0.9"), within=60)
    assert_limited(await get(app, bearer(make_token(keys.jwt_secret)), "10.0.0.9"), within=60)


async def test_ipv6_clients_are_counted_by_their_64(keys: Keys) -> None:
    app = gate(keys.config(failure_limit_per_address="2/minute"))
    wrong = {"x-api-key": fresh_keys().api_key}
    for host in ("2001:db8:1:2::1", "2001:db8:1:2::2", "2001:db8:1:2:ffff::9"):
        assert (await get(app, wrong, host)).status_code == 401
    new = bearer(make_token(keys.jwt_secret))
    assert_limited(await get(app, new, "2001:db8:1:2::77"), within=60)
    assert (await get(app, new, "2001:db8:1:3::1")).status_code == 200  # another /64


async def test_forward_auth_never_limits_by_the_proxys_address(keys: Keys) -> None:
    # Every forward-auth request comes from the proxy: blocking it would block every client.
    config = keys.config(failure_limit_per_address="1/minute")
    endpoint = ForwardAuth(config)
    assert endpoint.config == config
    wrong = bearer(make_token(fresh_keys().jwt_secret))
    for _ in range(5):
        answer = await get(endpoint, {**wrong, "x-original-uri": "/"}, "127.0.0.1")
        assert answer.status_code == 401
    good = {"x-api-key": keys.api_key, "x-original-uri": "/"}
    assert (await get(endpoint, good, "127.0.0.1")).status_code == 204


async def test_a_flood_of_addresses_is_remembered_within_a_bound(
    keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Full of live blocks, the memory keeps them (a flood must not lift every block at once)
    # and takes new ones again as old ones run out.
    monkeypatch.setattr(ratelimit, "MAX_BLOCKED_ADDRESSES", 64)
    now = [0.0]
    limiter = RateLimiter(keys.config(failure_limit_per_address="1/minute"), clock=lambda: now[0])
    for n in range(100):
        for _ in range(2):
            await limiter.failed(f"10.1.0.{n}")
    assert len(limiter.blocked) == 64
    assert limiter.blocked_for("10.1.0.0") is not None  # the first ones are still blocked
    assert limiter.blocked_for("10.1.0.99") is None  # no room was made for the last ones
    now[0] = 3600.0  # every block has run out
    for _ in range(2):
        await limiter.failed("10.2.0.1")
    assert list(limiter.blocked) == ["10.2.0.1"]


@pytest.mark.parametrize(
    ("address", "group"),
    [
        ("192.0.2.7", "192.0.2.7"),
        # A dual-stack server gives IPv4 clients mapped into IPv6: each is still its own
        # address, not one /64 that every IPv4 client would share.
        ("::ffff:192.0.2.7", "192.0.2.7"),
        # IPv6 addresses that stand for an IPv4 client: each counted as that client, not as
        # one /64 shared by all of them (or, for 6to4, a /48 of 65,536 of them).
        ("64:ff9b::c000:207", "192.0.2.7"),  # translated, RFC 6052's well-known prefix
        ("2002:c000:207:1:2::1", "192.0.2.7"),  # 6to4
        ("2002:c000:207:ffff::1", "192.0.2.7"),
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "192.0.2.45"),  # Teredo
        ("2001:db8:1:2::77", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
        ("fe80::1%eth0", "fe80::/64"),
        ("255.255.255.255", "255.255.255.255"),  # the longest IPv4 address, taken as it is
        # Not an address (a forwarded-for value trusted from anyone): a fixed-length digest.
        ("1.2.3.4%eth0-long-name", "#25662be315b79f230b10dbbd1bae4f07"),
        ("not:an:address", "#6995bc07e4333a37239f921377e4c69e"),
        ("x" * 8000, "#2613101f22e605eb9321e43c8ff8a711"),
    ],
)
def test_failures_are_counted_by_address_group(address: str, group: str) -> None:
    assert address_group(address) == group


# -- one limit across instances: a real redis-server ---------------------------------------------


@pytest.fixture
def redis(tmp_path: Path, starts_a_process: None) -> Iterator[RedisServer]:
    with redis_server(tmp_path) as running:
        yield running


async def test_two_instances_on_one_redis_share_each_limit(keys: Keys, redis: RedisServer) -> None:
    config = keys.config(mint_limit_per_device="2/minute", failure_limit_per_address="2/minute")
    first, second = (gate(config, rate_limit_storage=redis.url) for _ in range(2))
    assert (await mint(first, keys.api_key)).status_code == 200
    assert (await mint(second, keys.api_key)).status_code == 200
    assert_limited(await mint(first, keys.api_key), within=60)
    assert_limited(await mint(second, keys.api_key), within=60)
    # Failures counted on one instance and then the other add up.
    wrong = bearer(make_token(fresh_keys().jwt_secret))
    assert (await get(first, wrong, "10.0.0.7")).status_code == 401
    assert (await get(second, wrong, "10.0.0.7")).status_code == 401
    assert (await get(second, wrong, "10.0.0.7")).status_code == 401  # over: blocked here
    new = bearer(make_token(keys.jwt_secret))
    assert_limited(await get(second, new, "10.0.0.7"), within=60)
    held = [str(key) for key in redis.client().keys("*")]
    assert any(f"mint-device/{DEVICE}" in key for key in held), held  # counted in Redis


async def test_minting_fails_closed_when_redis_is_gone(keys: Keys, redis: RedisServer) -> None:
    app = gate(keys.config(mint_limit_per_device="5/minute"), rate_limit_storage=redis.url)
    assert (await mint(app, keys.api_key)).status_code == 200
    redis.stop()
    answer = await mint(app, keys.api_key)
    assert answer.status_code == 503
    assert answer.json()["error"] == "temporarily_unavailable"
    assert answer.headers["retry-after"] == "5"
    assert "access_token" not in answer.text
    # A refusal whose failure cannot be counted is still the refusal it was.
    wrong = bearer(make_token(fresh_keys().jwt_secret))
    app.reconfigure(app.config.replace(failure_limit_per_address="1/minute"))
    assert (await get(app, wrong, "10.0.0.3")).status_code == 401
    redis.start()
    assert (await mint(app, keys.api_key)).status_code == 200


async def test_the_readme_example(
    keys: Keys, redis: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    block = BLOCKS["Rate limits"]
    code = block.code.replace("redis://redis.internal:6379/0", redis.url)
    tree = ast.parse(code, filename=f"README.md:{block.line}")
    ast.increment_lineno(tree, block.line - 1)
    write_secrets(tmp_path / "secrets.json", keys)
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {"app": RecordingApp()}
    namespace.update(GateConfig=GateConfig, DeviceAuthMiddleware=DeviceAuthMiddleware)
    exec(compile(tree, str(README), "exec"), namespace)  # noqa: S102 - our own README
    app = namespace["app"]
    answers = [(await mint(app, keys.api_key)).status_code for _ in range(11)]
    assert answers == [200] * 10 + [429]
    assert any("mint-device" in str(key) for key in redis.client().keys("*"))
