"""The audit trail on ``devicegate.audit``: one line per refusal, per token minted and per
revocation, saying why, and never a key, a token or a secret."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from devicegate import CredentialKind, DeviceAuthMiddleware, RevocationList, Rule, TokenVerifier
from tests.helpers import Keys, RecordingApp, bearer, client, http_scope, make_token
from tests.helpers import answer as call_app

DEVICE = "device-1"


def audit_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name == "devicegate.audit"]


# Each refusal: the request's headers and path, then what its audit line must say.
REFUSALS: dict[str, tuple[Any, str, dict[str, Any]]] = {
    "no-credential": (
        lambda keys: {},
        "/orders",
        {"reason": "no_credential", "status": 401, "kind": None, "path": "/orders"},
    ),
    "wrong-key": (
        lambda keys: {"x-api-key": keys.mobile_api_key},
        "/orders",
        {"reason": "unknown_key", "status": 401, "kind": "api_key"},
    ),
    "malformed": (
        lambda keys: {"authorization": "Bearer a b"},
        "/orders",
        {"reason": "invalid_request", "status": 400, "kind": None},
    ),
    "expired-token": (
        lambda keys: bearer(make_token(keys.jwt_secret, instance_id=DEVICE, lifetime=-5), DEVICE),
        "/orders",
        {"reason": "expired", "status": 401, "kind": "device_token"},
    ),
    "kind-not-accepted": (
        lambda keys: {"authorization": keys.mobile_api_key},
        "/admin/users",
        {"reason": "insufficient_scope", "status": 403, "kind": "mobile_api_key"},
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
async def test_one_line_per_refusal_says_why(
    keys: Keys, app: RecordingApp, caplog: pytest.LogCaptureFixture, case: str
) -> None:
    make_headers, path, expected = REFUSALS[case]
    gate = DeviceAuthMiddleware(
        app, config=keys.config(), rules=[Rule("/admin/*", accept={CredentialKind.API_KEY})]
    )
    headers = make_headers(keys)
    with caplog.at_level(logging.INFO, logger="devicegate.audit"):
        async with client(gate) as http:
            response = await http.get(path, headers=headers)
    assert response.status_code == expected["status"]
    (record,) = audit_lines(caplog)
    assert record.levelno == logging.INFO
    facts = record.devicegate  # type: ignore[attr-defined]
    assert facts["event"] == "refused"
    for name, value in expected.items():
        assert facts[name] == value, name
    assert facts["method"] == "GET"
    assert facts["client"] == "127.0.0.1"
    message = record.getMessage()
    assert message.startswith("devicegate refused a request: ")
    assert f"reason={expected['reason']}" in message
    assert f"status={expected['status']}" in message
    # No credential and no secret; the device id, which is not one, may be named.
    for value in [*headers.values(), keys.api_key, keys.mobile_api_key, keys.jwt_secret]:
        if value == DEVICE:
            continue
        assert value not in message
        assert value not in repr(facts)


async def test_a_path_cannot_write_a_line_of_its_own(
    keys: Keys, app: RecordingApp, caplog: pytest.LogCaptureFixture
) -> None:
    gate = DeviceAuthMiddleware(app, config=keys.config())
    scope = http_scope("/orders\n2026-01-01 INFO devicegate admitted everything")
    with caplog.at_level(logging.INFO, logger="devicegate.audit"):
        answered = await call_app(gate, scope)
    assert answered.status == 400
    (record,) = audit_lines(caplog)
    assert "\n" not in record.getMessage()  # shown as repr: the newline is escaped


async def test_mints_and_revocations_are_one_line_each(
    keys: Keys, app: RecordingApp, caplog: pytest.LogCaptureFixture
) -> None:
    gate = DeviceAuthMiddleware(app, config=keys.config(), revocations=RevocationList())
    server = {"x-api-key": keys.api_key}
    with caplog.at_level(logging.INFO, logger="devicegate.audit"):
        async with client(gate) as http:
            minted = await http.post("/gen-jwt", headers=server, json={"instance_id": DEVICE})
            await http.post("/revoke", headers=server, json={"instance_id": DEVICE})
    token = minted.json()["access_token"]
    events = [record.devicegate for record in audit_lines(caplog)]  # type: ignore[attr-defined]
    assert [event["event"] for event in events] == ["minted", "revoked"]
    assert events[0]["instance_id"] == DEVICE
    assert events[0]["expires_in"] == 300
    assert events[1] == {"event": "revoked", "by": "instance_id", "key": None}
    for record in audit_lines(caplog):
        assert token not in record.getMessage()
        assert keys.api_key not in record.getMessage()


async def test_nothing_is_written_when_the_audit_logger_is_off(
    keys: Keys, app: RecordingApp, caplog: pytest.LogCaptureFixture
) -> None:
    gate = DeviceAuthMiddleware(app, config=keys.config())
    with caplog.at_level(logging.WARNING, logger="devicegate.audit"):
        async with client(gate) as http:
            assert (await http.get("/")).status_code == 401
    assert audit_lines(caplog) == []


@pytest.mark.parametrize(
    ("how", "reason"),
    [("other-device", "wrong_device"), ("expired", "expired"), ("revoked", "revoked")],
)
async def test_a_refused_token_is_named_by_its_jti_and_device(
    keys: Keys, app: RecordingApp, caplog: pytest.LogCaptureFixture, how: str, reason: str
) -> None:
    revocations = RevocationList()
    gate = DeviceAuthMiddleware(app, config=keys.config(), revocations=revocations)
    lifetime = -5 if how == "expired" else 300
    token = make_token(keys.jwt_secret, instance_id=DEVICE, lifetime=lifetime)
    jti = TokenVerifier(keys.config(leeway_seconds=60)).verify(token, DEVICE).claims["jti"]
    if how == "revoked":
        await revocations.revoke_token(jti)
    device = "device-2" if how == "other-device" else DEVICE
    with caplog.at_level(logging.INFO, logger="devicegate.audit"):
        async with client(gate) as http:
            assert (await http.get("/", headers=bearer(token, device))).status_code == 401
    (record,) = audit_lines(caplog)
    facts = record.devicegate  # type: ignore[attr-defined]
    assert (facts["reason"], facts["jti"], facts["instance_id"]) == (reason, jti, DEVICE)
    assert f"jti={jti!r}" in record.getMessage()
    assert token not in record.getMessage()


async def test_a_forged_token_names_nothing(
    keys: Keys, app: RecordingApp, caplog: pytest.LogCaptureFixture
) -> None:
    # Signed with another secret: its claims are whatever the client wrote, never logged.
    token = make_token("another-secret-" * 4, instance_id="planted-device")
    gate = DeviceAuthMiddleware(app, config=keys.config())
    with caplog.at_level(logging.INFO, logger="devicegate.audit"):
        async with client(gate) as http:
            assert (await http.get("/", headers=bearer(token, "planted-device"))).status_code == 401
    (record,) = audit_lines(caplog)
    assert record.devicegate["reason"] == "bad_signature"  # type: ignore[attr-defined]
    assert "planted" not in record.getMessage()
