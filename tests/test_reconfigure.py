"""DeviceAuthMiddleware.reconfigure: new keys and secrets for new requests, without a restart."""

from __future__ import annotations

import anyio
import pytest
from starlette.types import Receive, Scope, Send

from devicegate import (
    ConfigError,
    CredentialKind,
    DeviceAuthMiddleware,
    GateConfig,
    RevocationList,
    Rule,
    TokenVerifier,
)
from tests.helpers import (
    INVALID,
    TOKEN_PATH,
    Keys,
    RecordingApp,
    assert_denied,
    bearer,
    client,
    fresh_keys,
    mint,
)

DEVICE = "device-1"


async def test_new_keys_and_secrets_take_effect_for_the_next_request(
    keys: Keys, app: RecordingApp
) -> None:
    revocations = RevocationList()
    gate = DeviceAuthMiddleware(app, config=keys.config(), revocations=revocations)
    new = fresh_keys()
    async with client(gate) as http:
        old_token = await mint(http, keys.api_key, DEVICE)
        assert (await http.get("/", headers=bearer(old_token, DEVICE))).status_code == 200

        # Rotation: the new secret signs, the old one still verifies; the old API key goes.
        gate.reconfigure(
            GateConfig(
                api_keys=new.api_key,
                mobile_api_keys=keys.mobile_api_key,
                jwt_secret=[new.jwt_secret, keys.jwt_secret],
            )
        )
        assert gate.verifier.revocations is revocations  # kept
        assert_denied(await http.get("/", headers={"x-api-key": keys.api_key}), INVALID)
        assert (await http.get("/", headers={"x-api-key": new.api_key})).status_code == 200
        assert (await http.get("/", headers=bearer(old_token, DEVICE))).status_code == 200
        new_token = await mint(http, new.api_key, DEVICE)
        assert (await http.get("/", headers=bearer(new_token, DEVICE))).status_code == 200

        # Retirement: a token signed with the removed secret stops at once, cached or not.
        gate.reconfigure(GateConfig(api_keys=new.api_key, jwt_secret=new.jwt_secret))
        assert_denied(await http.get("/", headers=bearer(old_token, DEVICE)), INVALID)
        assert (await http.get("/", headers=bearer(new_token, DEVICE))).status_code == 200
        # The mobile key went with the new configuration.
        assert_denied(await http.get("/", headers={"authorization": keys.mobile_api_key}), INVALID)
    assert gate.config.api_keys == (new.api_key,)


async def test_a_configuration_that_does_not_fit_changes_nothing(
    keys: Keys, app: RecordingApp
) -> None:
    rules = [Rule("/mobile/*", accept={CredentialKind.MOBILE_API_KEY})]
    gate = DeviceAuthMiddleware(app, config=keys.config(), rules=rules)
    without_mobile = GateConfig(api_keys=fresh_keys().api_key, jwt_secret=keys.jwt_secret)
    with pytest.raises(ConfigError) as refused:
        gate.reconfigure(without_mobile)
    assert refused.value.field == "rules"
    with pytest.raises(ConfigError):
        gate.reconfigure("secrets.json")  # type: ignore[arg-type]
    async with client(gate) as http:
        response = await http.get("/mobile/x", headers={"authorization": keys.mobile_api_key})
        assert response.status_code == 200
        assert (await http.get("/", headers={"x-api-key": keys.api_key})).status_code == 200


async def test_a_request_under_way_finishes_under_the_configuration_it_started_with(
    keys: Keys,
) -> None:
    started, release = anyio.Event(), anyio.Event()

    async def slow_app(scope: Scope, receive: Receive, send: Send) -> None:
        started.set()
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})

    gate = DeviceAuthMiddleware(slow_app, config=keys.config())
    statuses: list[int] = []
    async with client(gate) as http:

        async def slow_request() -> None:
            response = await http.get("/", headers={"x-api-key": keys.api_key})
            statuses.append(response.status_code)

        async with anyio.create_task_group() as group:
            group.start_soon(slow_request)
            await started.wait()
            gate.reconfigure(GateConfig(api_keys=fresh_keys().api_key))
            release.set()
        # The next request with the old key is judged by the new configuration.
        refused = await http.get("/", headers={"x-api-key": keys.api_key})
    assert statuses == [200]
    assert refused.status_code == 401


async def test_the_token_endpoint_follows_the_configuration(keys: Keys, app: RecordingApp) -> None:
    gate = DeviceAuthMiddleware(app, config=GateConfig(api_keys=keys.api_key))
    async with client(gate) as http:
        # No JWT secret, no token endpoint: the path is an ordinary one, for the app.
        assert (await http.post(TOKEN_PATH, headers={"x-api-key": keys.api_key})).status_code == 200
        assert [gate.token_path] == [None]
        gate.reconfigure(keys.config())
        assert gate.token_path == TOKEN_PATH
        token = await mint(http, keys.api_key, DEVICE)
    assert TokenVerifier(keys.config()).verify(token, DEVICE).instance_id == DEVICE


async def test_a_verifier_of_ones_own(keys: Keys, app: RecordingApp) -> None:
    gate = DeviceAuthMiddleware(app, config=keys.config())
    config = keys.config(token_cache_size=0)
    verifier = TokenVerifier(config)
    gate.reconfigure(config, verifier=verifier)
    assert gate.verifier is verifier
    assert gate.config is config
