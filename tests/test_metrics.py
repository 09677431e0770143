"""Prometheus metrics: what the middleware counts, scraped and read back with the client
library's own parser."""

from __future__ import annotations

import httpx
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from devicegate import Counters, DeviceAuthMiddleware, RevocationList, Rule
from devicegate.gateway.proxy import ReverseProxy
from devicegate.metrics import DevicegateCollector
from tests.helpers import Keys, RecordingApp, bearer, client, make_token

DEVICE = "device-1"


def scrape(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape, by name and sorted labels, parsed as Prometheus would."""
    text = generate_latest(registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_requests_tokens_and_revocations_are_counted(keys: Keys, app: RecordingApp) -> None:
    counters = Counters()
    gate = DeviceAuthMiddleware(
        app,
        config=keys.config(),
        rules=[Rule("/health", public=True)],
        revocations=RevocationList(),
        counters=counters,
    )
    registry = CollectorRegistry()
    registry.register(DevicegateCollector(counters, middleware=gate))
    server = {"x-api-key": keys.api_key}
    token = make_token(keys.jwt_secret, instance_id=DEVICE)
    async with client(gate) as http:
        for _ in range(3):
            await http.get("/secret-path-1", headers=bearer(token, DEVICE))
        await http.get("/x", headers=bearer(token, "device-2"))  # wrong device
        await http.get("/x", headers={"authorization": keys.mobile_api_key})
        await http.get("/x")  # no credential
        await http.get("/health")  # public
        await http.post("/gen-jwt", headers=server, json={"instance_id": DEVICE})
        await http.post("/revoke", headers=server, json={"jti": "j-1"})
        await http.post("/revoke", headers=server, json={"all": True})
    samples = scrape(registry)

    def requests(kind: str, outcome: str) -> float:
        return samples[("devicegate_requests_total", (("kind", kind), ("outcome", outcome)))]

    assert requests("device_token", "admitted") == 3
    assert requests("device_token", "wrong_device") == 1
    assert requests("mobile_api_key", "admitted") == 1
    assert requests("none", "no_credential") == 1
    assert requests("none", "admitted") == 1
    assert requests("api_key", "admitted") == 3  # the mint and the two revocations
    assert samples[("devicegate_tokens_minted_total", ())] == 1
    assert samples[("devicegate_revocations_total", (("target", "jti"),))] == 1
    assert samples[("devicegate_revocations_total", (("target", "all"),))] == 1
    assert samples[("devicegate_token_cache_entries", ())] == 1
    assert samples[("devicegate_revocations_entries", ())] == 2  # the jti and "all"
    assert not any(name == "devicegate_revocations_fresh" for name, _ in samples)  # no store
    # Bounded labels: nothing from the requests, nothing secret.
    text = generate_latest(registry).decode()
    for value in ("secret-path-1", DEVICE, token, keys.api_key, keys.mobile_api_key):
        assert value not in text


async def test_without_counters_nothing_is_counted(keys: Keys, app: RecordingApp) -> None:
    counters = Counters()
    gate = DeviceAuthMiddleware(app, config=keys.config())
    async with client(gate) as http:
        await http.get("/", headers={"x-api-key": keys.api_key})
    registry = CollectorRegistry()
    registry.register(DevicegateCollector(counters))
    samples = scrape(registry)
    assert samples[("devicegate_tokens_minted_total", ())] == 0
    assert not any(name == "devicegate_requests_total" for name, _ in samples)
    assert "admitted=0" in repr(counters)


async def test_the_gateway_counts_its_upstream_exchanges(keys: Keys) -> None:
    # The upstream stands in through httpx's own test transport: what is under test is what
    # the gateway counts for each way an exchange can end.
    def upstream(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/slow":
            raise httpx.ReadTimeout("slow", request=request)
        if request.url.path == "/down":
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(200, json={"ok": True})

    counters = Counters()
    pool = httpx.AsyncClient(transport=httpx.MockTransport(upstream))
    proxy = ReverseProxy("http://upstream.internal", client=pool, counters=counters)
    gate = DeviceAuthMiddleware(proxy, config=keys.config(), counters=counters)
    registry = CollectorRegistry()
    registry.register(DevicegateCollector(counters))
    server = {"x-api-key": keys.api_key}
    async with client(gate) as http:
        statuses = [
            (await http.get(path, headers=server)).status_code
            for path in ("/a", "/b", "/slow", "/down")
        ]
    await pool.aclose()
    assert statuses == [200, 200, 504, 502]
    samples = scrape(registry)

    def exchanges(outcome: str) -> float:
        return samples[("devicegate_upstream_exchanges_total", (("outcome", outcome),))]

    assert (exchanges("answered"), exchanges("timeout"), exchanges("failed")) == (2, 1, 1)
    assert samples[("devicegate_upstream_latency_seconds_count", ())] == 2
    assert samples[("devicegate_upstream_latency_seconds_bucket", (("le", "+Inf"),))] == 2
    assert samples[("devicegate_upstream_latency_seconds_sum", ())] >= 0
