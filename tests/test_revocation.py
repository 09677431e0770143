"""Revocation and the request pipeline's seams: a revoked token is refused on its very next
request, cached or not; what a revocation check raises is a refusal, never a pass or a 500; and
the cache and the check plug in through their protocols."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import pytest
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Scope

from devicegate import (
    AuthError,
    CachedToken,
    ConfigError,
    DeviceAuthMiddleware,
    GateConfig,
    InvalidReason,
    InvalidToken,
    Refusal,
    RevocationCheck,
    RevocationEndpoint,
    RevocationList,
    TokenCache,
    TokenVerifier,
)
from tests.helpers import (
    INVALID,
    NOW,
    Clock,
    CountingVerifier,
    Keys,
    RecordingApp,
    assert_denied,
    bad_request,
    bearer,
    claims_at,
    client,
    make_token,
)

DEVICE = "device-1"
OTHER_DEVICE = "device-2"
SUBJECT = "user-42"
UNREADABLE = "The request could not be read."


def fresh_claims(**changes: Any) -> dict[str, Any]:
    """Claims of a token minted just now (the system clock, as the middleware reads it)."""
    return claims_at(now=int(time.time()), **changes)


Revoke = Callable[[RevocationList, dict[str, Any]], Awaitable[None]]

# Each way to revoke, applied to the claims of the token that must stop working.
REVOCATIONS: dict[str, Revoke] = {
    "token": lambda revocations, claims: revocations.revoke_token(claims["jti"]),
    "device": lambda revocations, claims: revocations.revoke_device(claims["instance_id"]),
    "subject": lambda revocations, claims: revocations.revoke_subject(claims["sub"]),
    "all": lambda revocations, claims: revocations.revoke_all(),
}
# Which of a bystander token's traits each revocation reaches: a token of the same device, of
# the same subject, and of neither.
REACHES = {
    "token": (False, False, False),
    "device": (True, False, False),
    "subject": (False, True, False),
    "all": (True, True, True),
}


@pytest.mark.parametrize("how", list(REVOCATIONS))
async def test_a_revoked_token_is_refused_on_its_next_request(
    keys: Keys, app: RecordingApp, how: str
) -> None:
    revocations = RevocationList()
    gate = DeviceAuthMiddleware(app, config=keys.config(), revocations=revocations)
    # Issued a second ago: a revocation "now" covers it.
    claims = fresh_claims(instance_id=DEVICE, sub=SUBJECT, iat=int(time.time()) - 1)
    target = make_token(keys.jwt_secret, claims)
    bystanders = {
        "same device": (fresh_claims(instance_id=DEVICE, iat=claims["iat"]), DEVICE),
        "same subject": (
            fresh_claims(instance_id=OTHER_DEVICE, sub=SUBJECT, iat=claims["iat"]),
            OTHER_DEVICE,
        ),
        "unrelated": (fresh_claims(instance_id=OTHER_DEVICE, iat=claims["iat"]), OTHER_DEVICE),
    }
    tokens = {name: make_token(keys.jwt_secret, c) for name, (c, _) in bystanders.items()}
    async with client(gate) as http:
        # Admitted, and so cached, before the revocation.
        assert (await http.get("/", headers=bearer(target, DEVICE))).status_code == 200
        for name, (_, device) in bystanders.items():
            assert (await http.get("/", headers=bearer(tokens[name], device))).status_code == 200
        calls_before = len(app.calls)

        await REVOCATIONS[how](revocations, claims)

        assert_denied(await http.get("/", headers=bearer(target, DEVICE)), INVALID)
        assert_denied(await http.get("/", headers=bearer(target, DEVICE)), INVALID)  # stays
        statuses = [
            (await http.get("/", headers=bearer(tokens[name], device))).status_code
            for name, (_, device) in bystanders.items()
        ]
    assert statuses == [401 if reached else 200 for reached in REACHES[how]]
    assert len(app.calls) == calls_before + statuses.count(200)


async def test_a_token_never_seen_before_is_checked_too(keys: Keys, app: RecordingApp) -> None:
    revocations = RevocationList()
    claims = fresh_claims(instance_id=DEVICE)
    await revocations.revoke_token(claims["jti"])
    gate = DeviceAuthMiddleware(app, config=keys.config(), revocations=revocations)
    async with client(gate) as http:
        response = await http.get("/", headers=bearer(make_token(keys.jwt_secret, claims), DEVICE))
    assert_denied(response, INVALID)
    assert not app.ran


@pytest.mark.parametrize(
    ("offset", "admitted"),
    [
        (-10, False),  # issued before the cutoff
        (0, False),  # at the cutoff: "at or before" is covered
        (10, True),  # issued after the cutoff: minted after the revocation
        (None, False),  # no iat: nothing says when it was minted, so it is covered
    ],
)
@pytest.mark.parametrize("how", ["device", "subject", "all"])
async def test_before_covers_the_tokens_issued_up_to_it(
    keys: Keys, app: RecordingApp, how: str, offset: int | None, admitted: bool
) -> None:
    revocations = RevocationList()
    cutoff = int(time.time()) - 100
    claims = fresh_claims(
        instance_id=DEVICE, sub=SUBJECT, iat=None if offset is None else cutoff + offset
    )
    before_kwargs = {"before": cutoff}
    if how == "device":
        await revocations.revoke_device(DEVICE, **before_kwargs)
    elif how == "subject":
        await revocations.revoke_subject(SUBJECT, **before_kwargs)
    else:
        await revocations.revoke_all(**before_kwargs)
    gate = DeviceAuthMiddleware(app, config=keys.config(), revocations=revocations)
    async with client(gate) as http:
        response = await http.get("/", headers=bearer(make_token(keys.jwt_secret, claims), DEVICE))
    assert response.status_code == (200 if admitted else 401)
    assert app.ran is admitted


async def test_a_token_without_iat_passes_a_revocation_of_another_token(
    keys: Keys, app: RecordingApp
) -> None:
    revocations = RevocationList()
    await revocations.revoke_token("someone-else")
    await revocations.revoke_device(OTHER_DEVICE)
    gate = DeviceAuthMiddleware(app, config=keys.config(), revocations=revocations)
    token = make_token(keys.jwt_secret, fresh_claims(instance_id=DEVICE, iat=None))
    async with client(gate) as http:
        assert (await http.get("/", headers=bearer(token, DEVICE))).status_code == 200


async def test_later_cutoffs_widen_and_earlier_ones_change_nothing() -> None:
    revocations = RevocationList(clock=Clock())
    claims = {"instance_id": DEVICE, "iat": NOW - 50}
    await revocations.revoke_device(DEVICE, before=NOW - 100)
    assert not revocations.is_revoked(claims)
    await revocations.revoke_device(DEVICE, before=NOW - 10)
    assert revocations.is_revoked(claims)
    await revocations.revoke_device(DEVICE, before=NOW - 100)  # does not narrow the cutoff
    assert revocations.is_revoked(claims)
    assert len(revocations) == 1


# --- the cost on the request path: asked only when something changed --------------------------


class CountingRevocations:
    """A RevocationCheck that counts how often it is asked, revoking what is in ``revoked``."""

    def __init__(self) -> None:
        self.version = 0
        self.asked = 0
        self.revoked: set[str] = set()

    def is_revoked(self, claims: Mapping[str, Any], /) -> bool:
        self.asked += 1
        return claims.get("jti") in self.revoked


def test_a_cached_token_is_asked_about_only_when_the_version_changes(keys: Keys) -> None:
    revocations = CountingRevocations()
    assert isinstance(revocations, RevocationCheck)
    verifier = CountingVerifier(keys.config(), revocations=revocations, clock=Clock())
    claims = claims_at(instance_id=DEVICE)
    token = make_token(keys.jwt_secret, claims)
    for _ in range(5):
        verifier.verify(token, DEVICE)
    assert (verifier.full_verifications, revocations.asked) == (1, 1)
    revocations.version += 1  # something changed, but not for this token
    for _ in range(5):
        verifier.verify(token, DEVICE)
    assert (verifier.full_verifications, revocations.asked) == (1, 2)
    revocations.revoked.add(claims["jti"])
    revocations.version += 1
    with pytest.raises(InvalidToken) as refused:
        verifier.verify(token, DEVICE)
    assert refused.value.reason is InvalidReason.REVOKED
    assert verifier.cache_size == 0  # forgotten, and refused in full from now on
    with pytest.raises(InvalidToken):
        verifier.verify(token, DEVICE)
    assert verifier.full_verifications == 2


# --- what a revocation check raises ------------------------------------------------------------


class RaisingRevocations:
    version = 1

    def __init__(self, error: Exception) -> None:
        self.error = error

    def is_revoked(self, claims: Mapping[str, Any], /) -> bool:
        raise self.error


@pytest.mark.parametrize(
    ("error", "status", "body_error", "headers"),
    [
        # An AuthError of a hook's own, with nothing but a description: 401 invalid_token,
        # with the RFC 6750 challenge.
        (AuthError("Revoked by policy."), 401, "invalid_token", {}),
        # A store that cannot tell: the refusal it chose, its headers included.
        (
            Refusal(
                "Revocations cannot be confirmed; retry shortly.",
                status_code=503,
                error="temporarily_unavailable",
                headers=[(b"retry-after", b"2")],
            ),
            503,
            "temporarily_unavailable",
            {"retry-after": "2"},
        ),
        # Anything else: the request could not be read, so it is refused (fail closed).
        (RuntimeError("store exploded"), 400, "invalid_request", {}),
    ],
)
async def test_what_a_revocation_check_raises_is_a_refusal(
    keys: Keys,
    app: RecordingApp,
    error: Exception,
    status: int,
    body_error: str,
    headers: dict[str, str],
) -> None:
    gate = DeviceAuthMiddleware(app, config=keys.config(), revocations=RaisingRevocations(error))
    token = make_token(keys.jwt_secret, fresh_claims(instance_id=DEVICE))
    async with client(gate) as http:
        response = await http.get("/", headers=bearer(token, DEVICE))
        key_response = await http.get("/", headers={"x-api-key": keys.api_key})
    assert response.status_code == status
    assert response.json()["error"] == body_error
    assert "store exploded" not in response.text
    for name, value in headers.items():
        assert response.headers[name] == value
    if status == 503:
        assert "www-authenticate" not in response.headers
    elif status == 400:
        assert_denied(response, bad_request(UNREADABLE))
    else:
        assert response.json()["error_description"] == "Revoked by policy."
        assert response.headers["www-authenticate"].startswith('Bearer realm="devicegate", error=')
    # Keys are not tokens: nothing asks the revocations about them.
    assert key_response.status_code == 200
    assert len(app.calls) == 1


async def test_on_error_renders_an_auth_error_of_a_hook(keys: Keys, app: RecordingApp) -> None:
    seen: list[AuthError] = []

    def on_error(scope: Scope, error: AuthError) -> ASGIApp:
        seen.append(error)
        return PlainTextResponse("no", status_code=error.status_code)

    gate = DeviceAuthMiddleware(
        app,
        config=keys.config(),
        revocations=RaisingRevocations(AuthError()),
        on_error=on_error,
    )
    token = make_token(keys.jwt_secret, fresh_claims(instance_id=DEVICE))
    async with client(gate) as http:
        response = await http.get("/", headers=bearer(token, DEVICE))
    assert (response.status_code, response.text) == (401, "no")
    assert [type(error) for error in seen] == [AuthError]


# --- the revocation list's memory ---------------------------------------------------------------


async def test_entries_are_forgotten_once_nothing_they_cover_can_be_valid() -> None:
    clock = Clock()
    revocations = RevocationList(retention=600, clock=clock)
    await revocations.revoke_token("old")
    await revocations.revoke_device(DEVICE)
    await revocations.revoke_subject(SUBJECT, before=NOW - 300)
    await revocations.revoke_all(before=NOW - 500)
    assert len(revocations) == 4
    clock.now = NOW + 200
    # A write sweeps what expired: the cutoff for all (NOW - 500) is 700 s old.
    await revocations.revoke_token("newer")
    assert len(revocations) == 4
    assert not revocations.is_revoked({"iat": NOW - 600})
    clock.now = NOW + 601
    await revocations.revoke_token("newest")
    # "old" and the device's cutoff (NOW) are past retention now, and so is the subject's.
    assert len(revocations) == 2
    assert revocations.is_revoked({"jti": "newer"})
    assert not revocations.is_revoked({"jti": "old", "instance_id": DEVICE, "iat": NOW - 1})


async def test_every_change_moves_the_version() -> None:
    revocations = RevocationList()
    versions = [revocations.version]
    for revoke in (
        revocations.revoke_token("jti"),
        revocations.revoke_device(DEVICE),
        revocations.revoke_subject(SUBJECT),
        revocations.revoke_all(),
    ):
        await revoke
        versions.append(revocations.version)
    assert len(set(versions)) == len(versions)


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda r: r.revoke_token(""), id="empty-jti"),
        pytest.param(lambda r: r.revoke_token(None), id="jti-none"),
        pytest.param(lambda r: r.revoke_device(""), id="empty-device"),
        pytest.param(lambda r: r.revoke_subject(42), id="subject-int"),
        pytest.param(lambda r: r.revoke_all(before=float("nan")), id="before-nan"),
        pytest.param(lambda r: r.revoke_all(before=float("inf")), id="before-inf"),
        pytest.param(lambda r: r.revoke_device(DEVICE, before=True), id="before-bool"),
        pytest.param(lambda r: r.revoke_subject(SUBJECT, before="1"), id="before-str"),
    ],
)
async def test_bad_revocations_are_refused(call: Callable[[RevocationList], Any]) -> None:
    revocations = RevocationList()
    with pytest.raises(ValueError, match=r"must be"):
        await call(revocations)
    assert (len(revocations), revocations.version) == (0, 0)


@pytest.mark.parametrize("retention", [0, -1, float("nan"), float("inf"), True, "60"])
def test_retention_must_be_a_positive_number(retention: Any) -> None:
    with pytest.raises(ConfigError, match="retention"):
        RevocationList(retention=retention)


async def test_a_clock_that_cannot_tell_the_time_revokes_nothing_silently() -> None:
    revocations = RevocationList(clock=lambda: float("nan"))
    with pytest.raises(ValueError, match="clock"):
        await revocations.revoke_all()
    assert revocations.version == 0


# --- the token cache, through its protocol -----------------------------------------------------


class DictCache:
    """A TokenCache of the simplest kind: an unbounded dict that records what it is asked."""

    def __init__(self) -> None:
        self.entries: dict[bytes, CachedToken] = {}
        self.log: list[str] = []

    def get(self, token: bytes, /) -> CachedToken | None:
        self.log.append("get")
        return self.entries.get(token)

    def put(self, token: bytes, entry: CachedToken, /) -> None:
        self.log.append("put")
        self.entries[token] = entry

    def discard(self, token: bytes, /) -> None:
        self.log.append("discard")
        self.entries.pop(token, None)

    def clear(self) -> None:
        self.entries.clear()

    def __len__(self) -> int:
        return len(self.entries)


async def test_a_token_cache_of_ones_own(keys: Keys, app: RecordingApp) -> None:
    cache = DictCache()
    assert isinstance(cache, TokenCache)
    clock = Clock(time.time())
    config = keys.config()
    verifier = CountingVerifier(config, cache=cache, clock=clock)
    gate = DeviceAuthMiddleware(app, config=config, verifier=verifier)
    token = make_token(keys.jwt_secret, claims_at(now=int(clock.now), instance_id=DEVICE))
    async with client(gate) as http:
        statuses = [(await http.get("/", headers=bearer(token, DEVICE))).status_code]
        statuses.append((await http.get("/", headers=bearer(token, OTHER_DEVICE))).status_code)
        clock.now += 1000  # expired while cached: forgotten and refused in full
        statuses.append((await http.get("/", headers=bearer(token, DEVICE))).status_code)
    assert statuses == [200, 401, 401]
    assert cache.log == ["get", "put", "get", "get", "discard"]
    assert verifier.full_verifications == 2
    assert gate.verifier is verifier


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"verifier": object()}, "verifier"),
        ({"revocations": object()}, "revocations"),
        ({"verifier": "make", "revocations": RevocationList()}, "revocations"),
    ],
)
def test_middleware_refuses_a_seam_it_cannot_use(
    keys: Keys, app: RecordingApp, options: dict[str, Any], field: str
) -> None:
    config = keys.config()
    if options.get("verifier") == "make":
        options["verifier"] = TokenVerifier(config)
    with pytest.raises(ConfigError) as error:
        DeviceAuthMiddleware(app, config=config, **options)
    assert error.value.field == field


def test_verifier_refuses_a_cache_that_is_no_token_cache(keys: Keys) -> None:
    with pytest.raises(ConfigError, match="cache"):
        TokenVerifier(keys.config(), cache={})  # type: ignore[arg-type]


def test_a_verifier_without_revocations_never_asks(keys: Keys) -> None:
    verifier = TokenVerifier(GateConfig(jwt_secret=keys.jwt_secret), clock=Clock())
    assert verifier.revocations is None
    token = make_token(keys.jwt_secret, claims_at(instance_id=DEVICE))
    assert verifier.verify(token, DEVICE).instance_id == DEVICE


# --- POST /revoke --------------------------------------------------------------------------------

REVOKE_PATH = "/revoke"
RECENT = int(time.time()) - 10  # a cutoff whose revocations are still kept


async def test_revoking_over_http_refuses_the_token_on_its_next_request(
    keys: Keys, app: RecordingApp
) -> None:
    gate = DeviceAuthMiddleware(app, config=keys.config(), revocations=RevocationList())
    assert gate.revoke_path == REVOKE_PATH
    claims = fresh_claims(instance_id=DEVICE, iat=int(time.time()) - 1)
    token = make_token(keys.jwt_secret, claims)
    async with client(gate) as http:
        assert (await http.get("/", headers=bearer(token, DEVICE))).status_code == 200
        response = await http.post(
            REVOKE_PATH, headers={"x-api-key": keys.api_key}, json={"instance_id": DEVICE}
        )
        assert response.status_code == 200
        answer = response.json()
        # The cutoff that applied is said, though the body gave none: now.
        assert answer.pop("before") == pytest.approx(time.time(), abs=5)
        assert answer == {"revoked": "instance_id", "instance_id": DEVICE}
        assert response.headers["cache-control"] == "no-store"
        assert_denied(await http.get("/", headers=bearer(token, DEVICE)), INVALID)
    assert len(app.calls) == 1  # the endpoint answered itself; the app saw one request


@pytest.mark.parametrize(
    ("body", "answer"),
    [
        ({"jti": "j-1"}, {"revoked": "jti", "jti": "j-1"}),
        ({"sub": SUBJECT, "before": RECENT}, {"revoked": "sub", "sub": SUBJECT, "before": RECENT}),
        (
            {"all": True, "before": RECENT + 0.5},
            {"revoked": "all", "all": True, "before": RECENT + 0.5},
        ),
    ],
)
async def test_what_a_revocation_answers(
    keys: Keys, app: RecordingApp, body: dict[str, Any], answer: dict[str, Any]
) -> None:
    revocations = RevocationList()
    gate = DeviceAuthMiddleware(app, config=keys.config(), revocations=revocations)
    async with client(gate) as http:
        response = await http.post(REVOKE_PATH, headers={"x-api-key": keys.api_key}, json=body)
    assert (response.status_code, response.json()) == (200, answer)
    assert (len(revocations), revocations.version) == (1, 1)


BAD_VALUE = "The value to revoke must be a string of 1 to 256 printable characters."
ONE_TARGET = "The body must name exactly one of jti, instance_id, sub or all (and may add before)."


@pytest.mark.parametrize(
    ("body", "description"),
    [
        ({}, ONE_TARGET),
        ({"jti": "a", "sub": "b"}, ONE_TARGET),
        ({"jti": "a", "extra": 1}, ONE_TARGET),
        ({"before": NOW}, ONE_TARGET),
        ({"jti": ""}, "The value to revoke must be a string of 1 to 256 printable characters."),
        ({"sub": 42}, "The value to revoke must be a string of 1 to 256 printable characters."),
        (
            {"instance_id": "x" * 257},
            "The value to revoke must be a string of 1 to 256 printable characters.",
        ),
        ({"all": "yes"}, 'To revoke every token, send "all": true.'),
        ({"all": False}, 'To revoke every token, send "all": true.'),
        ({"sub": "s", "before": "now"}, "before must be a Unix time (a number)."),
        ({"sub": "s", "before": True}, "before must be a Unix time (a number)."),
        ({"jti": "j", "before": NOW}, "A jti names one token: before does not apply to it."),
    ],
)
async def test_bad_revocation_bodies_revoke_nothing(
    keys: Keys, app: RecordingApp, body: dict[str, Any], description: str
) -> None:
    revocations = RevocationList()
    gate = DeviceAuthMiddleware(app, config=keys.config(), revocations=revocations)
    async with client(gate) as http:
        response = await http.post(REVOKE_PATH, headers={"x-api-key": keys.api_key}, json=body)
    assert response.status_code == 400
    assert response.json() == {"error": "invalid_request", "error_description": description}
    assert revocations.version == 0
    assert not app.ran


@pytest.mark.parametrize("credential", ["mobile_api_key", "device_token", "none", "wrong_key"])
async def test_only_the_server_key_may_revoke(
    keys: Keys, app: RecordingApp, credential: str
) -> None:
    revocations = RevocationList()
    gate = DeviceAuthMiddleware(app, config=keys.config(), revocations=revocations)
    headers = {
        "mobile_api_key": {"authorization": keys.mobile_api_key},
        "device_token": bearer(make_token(keys.jwt_secret, fresh_claims()), None),
        "none": {},
        "wrong_key": {"x-api-key": keys.mobile_api_key},
    }[credential]
    async with client(gate) as http:
        response = await http.post(REVOKE_PATH, headers=headers, json={"all": True})
    assert response.status_code in (401, 403)
    assert response.status_code == (
        403 if credential in ("mobile_api_key", "device_token") else 401
    )
    assert revocations.version == 0
    assert not app.ran


async def test_revoke_needs_post_and_a_small_body(keys: Keys, app: RecordingApp) -> None:
    gate = DeviceAuthMiddleware(app, config=keys.config(), revocations=RevocationList())
    async with client(gate) as http:
        get = await http.get(REVOKE_PATH, headers={"x-api-key": keys.api_key})
        big = await http.post(
            REVOKE_PATH, headers={"x-api-key": keys.api_key}, content=b"{" + b" " * 5000 + b"}"
        )
    assert (get.status_code, get.headers["allow"]) == (405, "POST")
    assert big.status_code == 413
    assert not app.ran


async def test_the_revoke_path_is_an_ordinary_one_without_a_writable_store(
    keys: Keys, app: RecordingApp
) -> None:
    # A check that cannot be written to (a custom one) or no revocations at all: no endpoint.
    for options in ({}, {"revocations": CountingRevocations()}, {"revoke_path": None}):
        gate = DeviceAuthMiddleware(app, config=keys.config(), **options)
        assert gate.revoke_path is None
    async with client(gate) as http:
        response = await http.post(REVOKE_PATH, headers={"x-api-key": keys.api_key}, json={})
    assert response.status_code == 200
    assert app.ran  # the app's own route


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"revoke_path": "revoke"}, "revoke_path"),
        ({"revoke_path": "/a/../revoke"}, "revoke_path"),
        ({"revoke_path": "/gen-jwt"}, "revoke_path"),
    ],
)
def test_a_revoke_path_must_be_clean_and_its_own(
    keys: Keys, app: RecordingApp, options: dict[str, Any], field: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        DeviceAuthMiddleware(app, config=keys.config(), revocations=RevocationList(), **options)
    assert refused.value.field == field


async def test_a_standalone_revocation_endpoint(keys: Keys) -> None:
    revocations = RevocationList()
    endpoint = RevocationEndpoint(keys.config(), revocations)
    async with client(endpoint) as http:
        refused = await http.post("/", headers={"authorization": keys.mobile_api_key}, json={})
        done = await http.post("/", headers={"x-api-key": keys.api_key}, json={"jti": "j"})
    assert refused.status_code == 403
    assert done.json() == {"revoked": "jti", "jti": "j"}
    assert revocations.is_revoked({"jti": "j"})
    with pytest.raises(ConfigError, match="RevocationStore"):
        RevocationEndpoint(keys.config(), CountingRevocations())  # type: ignore[arg-type]
