"""devicegate.redis against a real redis-server: revocations every instance sees within a second,
a full resync after any disconnection, a Redis restarted empty re-seeded by the instances that
remember, and fail closed (503 with Retry-After) when Redis is hung or gone.

Each test starts its own redis-server (:mod:`tests.servers.redis_server`, no persistence) and
runs on asyncio and trio. The stores use a staleness of one second so that outages are
noticed quickly; every bound asserted below is derived from it.
"""

from __future__ import annotations

import ast
import json
import logging
import math
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import anyio
import pytest

from devicegate import ConfigError, DeviceAuthMiddleware, Refusal, RevocationList
from devicegate.gateway._app import ServeSettings
from devicegate.redis import NOT_SHARED, UNAVAILABLE, RedisRevocationList
from tests.helpers import Keys, RecordingApp, bearer, claims_at, client, make_token
from tests.servers.process import child_env
from tests.servers.redis_server import RedisServer, redis_server
from tests.test_readme import BLOCKS, README

STALENESS = 1.0
SOCKET_TIMEOUT = 0.25
# A revocation reaches every instance within this (the bound, at p99).
PROPAGATION = 1.0
# Time for a store to reconnect and resync once Redis is back: backoff is at most 2 s.
RECOVERY = 10.0
THREAD_NAME = "devicegate-redis-revocations"
KEY = "devicegate:revocations"
EPOCH_KEY = "devicegate:revocations:epoch"
CHANNEL = "devicegate:revocations"
DEVICE = "device-1"
SUBJECT = "user-42"

Revoke = Callable[[RedisRevocationList, dict[str, Any]], Awaitable[None]]

REVOCATIONS: dict[str, Revoke] = {
    "token": lambda store, claims: store.revoke_token(claims["jti"]),
    "device": lambda store, claims: store.revoke_device(claims["instance_id"]),
    "subject": lambda store, claims: store.revoke_subject(claims["sub"]),
    "all": lambda store, claims: store.revoke_all(),
}


def fresh_claims(**changes: Any) -> dict[str, Any]:
    """Claims of a token minted a second ago: before any revocation the test makes next (an
    ``iat`` of now, truncated to the second, may fall after one made a moment later)."""
    return claims_at(now=int(time.time()) - 1, **{"instance_id": DEVICE, "sub": SUBJECT, **changes})


async def eventually(condition: Callable[[], bool], *, within: float) -> float:
    """Wait until ``condition()`` holds; return how long that took, fail after ``within``."""
    started = time.monotonic()
    with anyio.move_on_after(within):
        # Polled: what changes is another thread's or another process's state.
        while not condition():  # noqa: ASYNC110
            await anyio.sleep(0.002)
    elapsed = time.monotonic() - started
    assert condition(), f"not within {within} s"
    return elapsed


@pytest.fixture
def server(tmp_path: Path, starts_a_process: None) -> Iterator[RedisServer]:
    with redis_server(tmp_path) as running:
        yield running


StoreFactory = Callable[..., RedisRevocationList]


@pytest.fixture
def stores(server: RedisServer) -> Iterator[StoreFactory]:
    """Makes stores on ``server``; every one is closed after the test, and its thread gone."""
    made: list[RedisRevocationList] = []

    def make(**options: Any) -> RedisRevocationList:
        options.setdefault("staleness", STALENESS)
        options.setdefault("socket_timeout", SOCKET_TIMEOUT)
        store = RedisRevocationList(server.url, **options)
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()
    assert not [thread for thread in threading.enumerate() if thread.name == THREAD_NAME]


async def fresh(*stores: RedisRevocationList) -> None:
    with anyio.fail_after(RECOVERY):
        for store in stores:
            await store.wait_fresh()


def held_in_redis(server: RedisServer) -> dict[str, float]:
    with server.client() as redis:
        return {
            member.decode(): score for member, score in redis.zrange(KEY, 0, -1, withscores=True)
        }


# -- propagation --------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("how", list(REVOCATIONS))
async def test_a_revocation_reaches_every_other_instance_within_a_second(
    stores: StoreFactory, how: str
) -> None:
    writer, reader = stores(), stores()
    await fresh(writer, reader)
    claims = fresh_claims()
    bystander = claims_at(now=int(time.time()), instance_id="device-2", sub="user-2")
    version = reader.version
    assert not reader.is_revoked(claims)

    await REVOCATIONS[how](writer, claims)

    assert writer.is_revoked(claims)  # at once, where it was made
    await eventually(lambda: reader.is_revoked(claims), within=PROPAGATION)
    assert reader.version != version  # cached tokens are asked again
    assert reader.is_revoked(bystander) is (how == "all")


@pytest.mark.integration
async def test_a_cached_token_revoked_on_another_instance_is_refused(
    stores: StoreFactory, keys: Keys, app: RecordingApp
) -> None:
    here, there = stores(), stores()
    await fresh(here, there)
    gate = DeviceAuthMiddleware(app, config=keys.config(), revocations=here)
    claims = fresh_claims()
    headers = bearer(make_token(keys.jwt_secret, claims), DEVICE)
    async with client(gate) as http:
        assert (await http.get("/", headers=headers)).status_code == 200  # now cached
        await there.revoke_token(claims["jti"])

        async def refused() -> bool:
            return (await http.get("/", headers=headers)).status_code == 401

        with anyio.fail_after(PROPAGATION):
            while not await refused():  # noqa: ASYNC110 - polling a server
                await anyio.sleep(0.005)


@pytest.mark.integration
async def test_a_tool_writing_the_documented_way_reaches_every_instance(
    stores: StoreFactory, server: RedisServer
) -> None:
    store = stores()
    await fresh(store)
    cutoff = time.time()
    entry = f"instance_id:{DEVICE}"
    with server.client() as redis:
        redis.zadd(KEY, {entry: cutoff})
        redis.publish(CHANNEL, json.dumps({"entry": entry, "cutoff": cutoff}))
    await eventually(lambda: store.is_revoked(fresh_claims(iat=int(cutoff))), within=PROPAGATION)
    assert not store.is_revoked(fresh_claims(iat=math.ceil(cutoff) + 1))  # minted afterwards


@pytest.mark.integration
async def test_redis_holds_an_entry_only_as_long_as_it_can_matter(
    stores: StoreFactory, server: RedisServer
) -> None:
    store = stores(retention=600)
    await fresh(store)
    await store.revoke_device("long-gone", before=time.time() - 601)  # past retention already
    await store.revoke_device(DEVICE)
    assert list(held_in_redis(server)) == [f"instance_id:{DEVICE}"]
    with server.client() as redis:
        assert 590 <= redis.ttl(KEY) <= 601
    assert len(store) == 1


@pytest.mark.integration
async def test_unreadable_entries_and_messages_are_ignored(
    stores: StoreFactory, server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    with server.client() as redis:
        redis.zadd(KEY, {"nonsense:x": 1.0e12, "jti:": 1.0e12, b"\xff\xfe": 1.0e12})
    store = stores()
    await fresh(store)
    with server.client() as redis:
        for junk in (b"not json", b"[]", b'{"entry": "jti:x"}', b'{"entry": 1, "cutoff": 1}'):
            redis.publish(CHANNEL, junk)
        redis.publish(CHANNEL, json.dumps({"entry": "jti:real", "cutoff": time.time()}))
    await eventually(lambda: store.is_revoked({"jti": "real"}), within=PROPAGATION)
    assert len(store) == 1
    assert store.fresh
    assert "unreadable" in caplog.text


# -- resync and re-seeding ----------------------------------------------------------------------


@pytest.mark.integration
async def test_a_reconnection_resyncs_what_was_missed_while_cut_off(
    stores: StoreFactory, server: RedisServer
) -> None:
    store = stores()
    await fresh(store)
    claims = fresh_claims()
    # Written without a message: only a full resync can bring it (a message published while
    # the subscriber was cut off is lost the same way).
    with server.client() as redis:
        redis.zadd(KEY, {f"jti:{claims['jti']}": time.time()})
    await anyio.sleep(3 * STALENESS / 4)
    assert not store.is_revoked(claims)
    with server.client() as redis:
        assert redis.client_kill_filter(_type="pubsub") >= 1
    await eventually(lambda: store.is_revoked(claims), within=RECOVERY)


@pytest.mark.integration
@pytest.mark.parametrize("how", ["restarted-empty", "flushed"])
async def test_a_redis_that_lost_its_data_is_reseeded(
    stores: StoreFactory, server: RedisServer, how: str
) -> None:
    first, second = stores(), stores()
    await fresh(first, second)
    claims = fresh_claims()
    await first.revoke_device(DEVICE)
    await first.revoke_token("one-token")
    await eventually(lambda: second.is_revoked(claims), within=PROPAGATION)
    held = held_in_redis(server)
    if how == "flushed":
        with server.client() as redis:
            redis.flushall()
    else:
        server.restart()
    assert first.is_revoked(claims)
    assert second.is_revoked(claims)

    await eventually(lambda: held_in_redis(server) == held, within=RECOVERY)
    newcomer = stores()
    await fresh(newcomer)
    assert newcomer.is_revoked(claims)
    assert newcomer.is_revoked({"jti": "one-token"})


@pytest.mark.integration
async def test_a_revocation_made_while_redis_is_down_is_shared_when_it_returns(
    stores: StoreFactory, server: RedisServer, keys: Keys, app: RecordingApp
) -> None:
    here, there = stores(), stores()
    await fresh(here, there)
    gate = DeviceAuthMiddleware(app, config=keys.config(), revocations=here)
    server.kill()
    async with client(gate) as http:
        response = await http.post(
            "/revoke", headers={"x-api-key": keys.api_key}, json={"instance_id": DEVICE}
        )
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert response.json() == {
        "error": "temporarily_unavailable",
        "error_description": NOT_SHARED,
    }
    claims = fresh_claims()
    assert here.is_revoked(claims)  # it holds here, at once
    with pytest.raises(Refusal):
        await there.revoke_subject(SUBJECT)
    server.start()
    await eventually(lambda: there.is_revoked(claims), within=RECOVERY)
    await eventually(lambda: here.is_revoked(fresh_claims(instance_id="x")), within=RECOVERY)


# -- fail closed ---------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("outage", ["paused", "killed"])
async def test_an_unreachable_redis_is_refused_with_503_within_the_staleness_bound(
    stores: StoreFactory, server: RedisServer, keys: Keys, app: RecordingApp, outage: str
) -> None:
    store = stores()
    await fresh(store)
    gate = DeviceAuthMiddleware(app, config=keys.config(), revocations=store)
    good = bearer(make_token(keys.jwt_secret, fresh_claims()), DEVICE)
    revoked_claims = fresh_claims(instance_id="stolen")
    revoked = bearer(make_token(keys.jwt_secret, revoked_claims), "stolen")
    async with client(gate) as http:
        assert (await http.get("/", headers=good)).status_code == 200  # cached
        assert (await http.get("/", headers=revoked)).status_code == 200
        await store.revoke_device("stolen")
        assert (await http.get("/", headers=revoked)).status_code == 401

        cut_off = time.monotonic()
        server.pause() if outage == "paused" else server.kill()
        while True:
            response = await http.get("/", headers=good)
            assert (await http.get("/", headers=revoked)).status_code == 401
            if response.status_code == 503:
                break
            assert response.status_code == 200
            assert time.monotonic() - cut_off <= STALENESS + 0.5, "still admitting"
            await anyio.sleep(0.02)
        assert response.headers["retry-after"] == "1"
        assert response.json() == {
            "error": "temporarily_unavailable",
            "error_description": UNAVAILABLE,
        }
        unseen = bearer(make_token(keys.jwt_secret, fresh_claims()), DEVICE)
        assert (await http.get("/", headers=unseen)).status_code == 503
        state = store.state
        assert (state.fresh, state.fail_open) == (False, False)
        calls = len(app.calls)

        server.resume() if outage == "paused" else server.start()
        with anyio.fail_after(RECOVERY):
            while (await http.get("/", headers=good)).status_code != 200:  # noqa: ASYNC110
                await anyio.sleep(0.05)
        assert (await http.get("/", headers=unseen)).status_code == 200
        assert (await http.get("/", headers=revoked)).status_code == 401
    assert len(app.calls) == calls + 2  # nothing reached the app while refusing
    assert store.state.fresh


@pytest.mark.integration
async def test_fail_open_admits_during_an_outage_and_says_so(
    stores: StoreFactory,
    server: RedisServer,
    keys: Keys,
    app: RecordingApp,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="devicegate.redis")
    store = stores(fail_open=True)
    await fresh(store)
    revoked = bearer(make_token(keys.jwt_secret, fresh_claims(instance_id="stolen")), "stolen")
    await store.revoke_device("stolen")
    gate = DeviceAuthMiddleware(app, config=keys.config(), revocations=store)
    server.kill()
    await eventually(lambda: not store.fresh, within=STALENESS + 0.5)
    good = bearer(make_token(keys.jwt_secret, fresh_claims()), DEVICE)
    async with client(gate) as http:
        assert (await http.get("/", headers=good)).status_code == 200
        assert (await http.get("/", headers=revoked)).status_code == 401  # what it knows, holds
    assert store.state.as_dict()["fresh"] is False
    assert store.state.fail_open
    assert "fail_open" in caplog.text


@pytest.mark.integration
async def test_the_readme_example(server: RedisServer, keys: Keys, app: RecordingApp) -> None:
    block = BLOCKS["Revoking across instances: Redis"]
    code = block.code.replace("redis://redis.internal:6379/0", server.url)
    tree = ast.parse(code, filename=f"README.md:{block.line}")
    ast.increment_lineno(tree, block.line - 1)
    compiled = compile(tree, str(README), "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    namespace: dict[str, Any] = {"app": app, "config": keys.config()}
    namespace.update(DeviceAuthMiddleware=DeviceAuthMiddleware)
    pending = eval(compiled, namespace)  # noqa: S307 - this repository's own README
    if pending is not None:
        await pending
    assert namespace["app"].verifier.revocations is namespace["revocations"]
    assert list(held_in_redis(server)) == ["instance_id:device-123"]
    assert not [thread for thread in threading.enumerate() if thread.name == THREAD_NAME]


# -- the object itself ---------------------------------------------------------------------------


@pytest.mark.integration
async def test_a_closed_store_stops_its_thread_and_refuses(server: RedisServer) -> None:
    async with RedisRevocationList(
        server.url, staleness=STALENESS, socket_timeout=SOCKET_TIMEOUT
    ) as store:
        await fresh(store)
        assert "fresh" in repr(store)
        assert server.url not in repr(store)
    assert not [thread for thread in threading.enumerate() if thread.name == THREAD_NAME]
    with pytest.raises(Refusal) as refusal:
        store.is_revoked(fresh_claims())
    assert refusal.value.status_code == 503


def test_a_password_in_the_url_is_never_logged_or_shown(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    # Nothing listens on port 1: the store reconnects with backoff and logs nothing secret.
    with RedisRevocationList(
        "redis://:hunter2-secret@127.0.0.1:1/0", staleness=STALENESS, socket_timeout=0.1
    ) as store:
        time.sleep(0.3)
        assert "hunter2" not in repr(store)
    assert "hunter2" not in caplog.text


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"url": "http://127.0.0.1:6379"}, "url"),
        ({"url": "redis://127.0.0.1:notaport"}, "url"),
        ({"staleness": 0}, "staleness"),
        ({"staleness": math.inf}, "staleness"),
        ({"socket_timeout": 0}, "socket_timeout"),
        ({"staleness": 1.0, "socket_timeout": 0.6}, "socket_timeout"),
        ({"fail_open": "yes"}, "fail_open"),
        ({"prefix": " devicegate"}, "prefix"),
        ({"retention": 0}, "retention"),
    ],
)
def test_bad_options_are_refused_at_start_up(options: dict[str, Any], field: str) -> None:
    url = options.pop("url", "redis://127.0.0.1:6379")
    with pytest.raises(ConfigError, match=f"^{field}:"):
        RedisRevocationList(url, **options)
    assert not [thread for thread in threading.enumerate() if thread.name == THREAD_NAME]


@pytest.mark.integration
def test_without_the_extra_the_import_error_names_it() -> None:
    line = "import sys; sys.modules['redis'] = None; import devicegate.redis"
    result = subprocess.run(  # noqa: S603 - our own interpreter and a fixed line
        [sys.executable, "-c", line], capture_output=True, text=True, env=child_env(), check=False
    )
    assert result.returncode == 1
    assert "pip install 'devicegate[redis]'" in result.stderr


@pytest.mark.integration
def test_the_core_never_imports_redis() -> None:
    line = "import sys, devicegate, devicegate.gateway; print('redis' in sys.modules)"
    result = subprocess.run(  # noqa: S603 - our own interpreter and a fixed line
        [sys.executable, "-c", line], capture_output=True, text=True, env=child_env(), check=True
    )
    assert result.stdout.strip() == "False"


# -- the replica a store keeps: RevocationList.record and entries --------------------------------


def test_record_adds_only_what_changes_the_answers() -> None:
    replica = RevocationList(retention=600)
    now = time.time()
    assert replica.record("instance_id", DEVICE, now)
    assert not replica.record("instance_id", DEVICE, now - 1)  # covered already
    assert replica.record("instance_id", DEVICE, now + 1)
    assert replica.record("jti", "j", now)
    assert not replica.record("jti", "j", now)  # the echo of one's own write
    assert replica.record("all", None, now)
    assert not replica.record("sub", SUBJECT, now - 601)  # past retention
    assert replica.version == 4
    assert sorted(replica.entries(), key=str) == sorted(
        [("instance_id", DEVICE, now + 1), ("jti", "j", now), ("all", None, now)], key=str
    )


@pytest.mark.parametrize(
    ("kind", "name", "cutoff"),
    [
        ("nonsense", "x", 1.0),
        ("all", "x", 1.0),
        ("jti", None, 1.0),
        ("sub", "", 1.0),
        ("sub", "s", math.nan),
        ("sub", "s", True),
    ],
)
def test_record_refuses_what_is_not_an_entry(kind: Any, name: Any, cutoff: Any) -> None:
    replica = RevocationList()
    with pytest.raises(ValueError, match="must"):
        replica.record(kind, name, cutoff)
    assert (len(replica), replica.version) == (0, 0)


# -- metrics --------------------------------------------------------------------------------------


@pytest.mark.integration
async def test_metrics_say_how_fresh_the_replica_is(stores: StoreFactory, keys: Keys) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from devicegate import Counters, DeviceAuthMiddleware
    from devicegate.metrics import DevicegateCollector

    store = stores()
    await fresh(store)
    await store.revoke_token("j-1")
    gate = DeviceAuthMiddleware(RecordingApp(), config=keys.config(), revocations=store)
    registry = CollectorRegistry()
    registry.register(DevicegateCollector(Counters(), middleware=gate))
    text = generate_latest(registry).decode()
    assert "devicegate_revocations_fresh 1.0" in text
    assert "devicegate_revocations_entries 1.0" in text
    assert "devicegate_revocations_last_sync_timestamp_seconds " in text
    assert store.key not in text  # no key names, no URL


@pytest.mark.integration
async def test_serve_closes_its_store_before_the_server_is_told_it_is_done(
    server: RedisServer, keys: Keys
) -> None:
    app = ServeSettings(redis_url=server.url).build({}, keys.config())
    store = app.gate.verifier.revocations
    assert isinstance(store, RedisRevocationList)
    await fresh(store)
    threads = sum(thread.name == THREAD_NAME for thread in threading.enumerate())
    incoming = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    seen: list[tuple[str, bool, int]] = []

    async def receive() -> dict[str, Any]:
        return incoming.pop(0)

    async def send(message: MutableMapping[str, Any]) -> None:
        alive = sum(thread.name == THREAD_NAME for thread in threading.enumerate())
        seen.append((message["type"], store.fresh, alive))

    await app({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
    assert seen == [
        ("lifespan.startup.complete", True, threads),
        ("lifespan.shutdown.complete", False, threads - 1),
    ]
