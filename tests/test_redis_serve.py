"""``devicegate serve --redis``: revocations shared by real processes through a real Redis.

Three instances on one redis-server: a token revoked through one is refused by the other two,
and the time that takes is measured over a hundred revocations (the p50 and p99 are printed
with ``-s`` and attached to the test report). One instance with ``--workers 4``: a revocation
through whichever worker took it holds in all. Three instances under load while Redis hangs,
dies and comes back empty: no revoked token is ever admitted. ``/health`` reports the store,
and a Redis that is gone turns it (and every token) into a 503.
"""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import Keys, bearer, jti_of, token_of
from tests.servers.process import answers, devicegate_command, serve, sync_client
from tests.servers.redis_server import RedisServer, redis_server
from tests.test_cli import get_from_a_worker, until_two_workers_answer

pytestmark = pytest.mark.integration

ROUNDS = 100
PROPAGATION = 1.0  # the bound every revocation must meet, at p99 and here at worst
GIVE_UP = 10.0
WORKERS = 4


@pytest.fixture
def redis(tmp_path: Path, starts_a_process: None) -> Iterator[RedisServer]:
    with redis_server(tmp_path) as running:
        yield running


def environment(keys: Keys, **extra: str) -> dict[str, str]:
    return {
        "DEVICEGATE_API_KEYS": keys.api_key,
        "DEVICEGATE_MOBILE_API_KEYS": keys.mobile_api_key,
        "DEVICEGATE_JWT_SECRET": keys.jwt_secret,
        **extra,
    }


def mint(http: httpx.Client, keys: Keys, device: str) -> str:
    response = http.post(
        "/gen-jwt", headers={"x-api-key": keys.api_key}, json={"instance_id": device}
    )
    return token_of(response, device)


def revoke(http: httpx.Client, keys: Keys, body: dict[str, Any]) -> None:
    response = http.post("/revoke", headers={"x-api-key": keys.api_key}, json=body)
    assert response.status_code == 200, response.text


def test_three_instances_refuse_a_token_revoked_through_any_one(
    redis: RedisServer, keys: Keys, tmp_path: Path, record_property: Any
) -> None:
    with contextlib.ExitStack() as stack:
        servers = [
            stack.enter_context(
                serve(
                    devicegate_command("--redis", redis.url),
                    tmp_path / f"serve-{number}.log",
                    env=environment(keys),
                    ready=answers("/health"),  # 200 once its replica is in step with Redis
                )
            )
            for number in range(3)
        ]
        writer, *readers = [stack.enter_context(sync_client(server.url)) for server in servers]
        health = readers[0].get("/health").json()
        assert health["status"] == "ok"
        assert health["revocations"]["fresh"] is True
        assert "shared with every worker and instance through Redis" in servers[0].output()

        devices = [f"device-{number}" for number in range(ROUNDS)]
        tokens = [mint(writer, keys, device) for device in devices]
        for token, device in zip(tokens, devices, strict=True):
            for reader in readers:  # cached on both: a revocation must reach the cache too
                assert reader.get("/whoami", headers=bearer(token, device)).status_code == 200

        latencies = []
        for token, device in zip(tokens, devices, strict=True):
            started = time.perf_counter()
            revoke(writer, keys, {"jti": jti_of(token)})
            waiting = set(range(len(readers)))
            while waiting:
                for number in sorted(waiting):
                    answer = readers[number].get("/whoami", headers=bearer(token, device))
                    assert answer.status_code in (200, 401)
                    if answer.status_code == 401:
                        waiting.discard(number)
                assert time.perf_counter() - started < GIVE_UP, "a revocation never arrived"
            latencies.append(time.perf_counter() - started)

    cuts = statistics.quantiles(latencies, n=100)
    p50, p99 = statistics.median(latencies), cuts[98]
    record_property("revocation_propagation_p50_ms", round(p50 * 1000, 2))
    record_property("revocation_propagation_p99_ms", round(p99 * 1000, 2))
    print(
        f"\nrevocation propagation over {ROUNDS} revocations, 3 instances: "
        f"p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms"
    )
    assert p99 < PROPAGATION


def test_with_four_workers_a_revocation_through_one_holds_in_all(
    redis: RedisServer, keys: Keys, tmp_path: Path
) -> None:
    command = devicegate_command("--workers", str(WORKERS), "--redis", redis.url)
    with serve(
        command, tmp_path / "serve.log", env=environment(keys), ready=answers("/health")
    ) as server:
        assert "through Redis" in server.output()
        assert "answers 501" not in server.output()
        with sync_client(server.url) as http:
            token = mint(http, keys, "device-A")
        headers = bearer(token, "device-A")

        def admitted_by() -> int | None:
            worker, status, _ = get_from_a_worker(server, "/whoami", headers)
            assert status == 200
            return worker

        workers = until_two_workers_answer(admitted_by, WORKERS)  # cached in every one
        assert len(workers) == WORKERS

        with sync_client(server.url) as http:
            revoke(http, keys, {"instance_id": "device-A"})
        started = time.monotonic()
        refused_by: set[int] = set()
        while refused_by != workers:
            worker, status, _ = get_from_a_worker(server, "/whoami", headers)
            if time.monotonic() - started > PROPAGATION:
                assert status == 401, "a worker still admits a revoked token"
            if status == 401 and worker is not None:
                refused_by.add(worker)
            assert time.monotonic() - started < GIVE_UP
            time.sleep(0.01)


def test_health_and_every_token_answer_503_when_redis_is_gone(
    redis: RedisServer, keys: Keys, tmp_path: Path
) -> None:
    command = devicegate_command("--redis", redis.url)
    env = environment(keys, DEVICEGATE_REDIS_STALENESS="1")
    with (
        serve(command, tmp_path / "serve.log", env=env, ready=answers("/health")) as server,
        sync_client(server.url) as http,
    ):
        token = mint(http, keys, "device-A")
        assert http.get("/whoami", headers=bearer(token, "device-A")).status_code == 200
        redis.kill()
        deadline = time.monotonic() + 1.0 + 1.0
        while (health := http.get("/health")).status_code == 200:
            assert time.monotonic() < deadline, "/health never noticed"
            time.sleep(0.05)
        assert health.status_code == 503
        assert health.json()["status"] == "unavailable"
        assert health.json()["revocations"]["fresh"] is False
        refused = http.get("/whoami", headers=bearer(token, "device-A"))
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
        redis.start()
        deadline = time.monotonic() + GIVE_UP
        while http.get("/health").status_code != 200:
            assert time.monotonic() < deadline, "never recovered"
            time.sleep(0.05)
        assert http.get("/whoami", headers=bearer(token, "device-A")).status_code == 200


def test_fail_open_is_said_at_start_and_in_health(
    redis: RedisServer, keys: Keys, tmp_path: Path
) -> None:
    command = devicegate_command("--redis", redis.url, "--redis-fail-open")
    with serve(
        command, tmp_path / "serve.log", env=environment(keys), ready=answers("/health")
    ) as server:
        warnings = [line for line in server.output().splitlines() if "fail-open is on" in line]
        assert len(warnings) == 1
        with sync_client(server.url) as http:
            assert http.get("/health").json()["revocations"]["fail_open"] is True


def test_an_outage_under_load_never_admits_a_revoked_token(
    redis: RedisServer, keys: Keys, tmp_path: Path
) -> None:
    # Three instances, a load generator per instance sending valid and revoked tokens; Redis
    # hangs (SIGSTOP), is killed, and comes back empty (no persistence).
    staleness = 1.0
    env = environment(keys, DEVICEGATE_REDIS_STALENESS=str(staleness))
    command = devicegate_command("--redis", redis.url)
    with contextlib.ExitStack() as stack:
        servers = [
            stack.enter_context(
                serve(command, tmp_path / f"serve-{n}.log", env=env, ready=answers("/health"))
            )
            for n in range(3)
        ]
        with sync_client(servers[0].url) as http:
            tokens = [("valid", device, mint(http, keys, device)) for device in ("d-1", "d-2")]
            tokens += [("revoked", device, mint(http, keys, device)) for device in ("r-1", "r-2")]
            for kind, device, _ in tokens:
                if kind == "revoked":
                    revoke(http, keys, {"instance_id": device})
        for server in servers:  # every instance refuses them before the load starts
            with sync_client(server.url) as http:
                deadline = time.monotonic() + GIVE_UP
                for kind, device, token in tokens:
                    want = 200 if kind == "valid" else 401
                    while http.get("/whoami", headers=bearer(token, device)).status_code != want:
                        assert time.monotonic() < deadline
                        time.sleep(0.02)

        results: list[tuple[float, str, int]] = []
        stop = threading.Event()

        def load(url: str) -> None:
            with sync_client(url) as http:
                while not stop.is_set():
                    for kind, device, token in tokens:
                        status = http.get("/whoami", headers=bearer(token, device)).status_code
                        results.append((time.monotonic(), kind, status))

        threads = [threading.Thread(target=load, args=(s.url,)) for s in servers]
        for thread in threads:
            thread.start()
        try:
            time.sleep(0.5)
            paused_at = time.monotonic()
            redis.pause()
            time.sleep(2 * staleness + 0.5)
            redis.kill()
            time.sleep(1.0)
            redis.start()  # empty: the instances must write back what they hold
            restarted_at = time.monotonic()
            deadline = restarted_at + GIVE_UP
            for server in servers:
                with sync_client(server.url) as http:
                    while http.get("/health").status_code != 200:
                        assert time.monotonic() < deadline, "an instance never recovered"
                        time.sleep(0.05)
            recovered_at = time.monotonic()
            time.sleep(1.0)
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=GIVE_UP)

    assert {status for _, _, status in results} <= {200, 401, 503}  # never a 500
    assert [r for r in results if r[1] == "revoked" and r[2] == 200] == []
    # Within the staleness bound (and one heartbeat) of the hang, valid tokens get 503 ...
    cut_off = [r for r in results if paused_at + 2 * staleness < r[0] < restarted_at]
    assert cut_off
    assert {status for _, kind, status in cut_off if kind == "valid"} == {503}
    # ... and once every instance is back, they are admitted, and revocations still hold.
    after = [r for r in results if r[0] > recovered_at + 0.3]  # requests begun after it
    assert {status for _, kind, status in after if kind == "valid"} == {200}
    assert {status for _, kind, status in after if kind == "revoked"} == {401}
