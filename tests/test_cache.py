"""What the verified-token cache could get wrong, and the proof that it does not.

The cache may only ever save work: every request it answers must end exactly as a full
verification would end it. So most tests here run the same story with the cache and without
it, or before and after a hit, and compare outcomes (status, reason, whether the app ran).
Time comes from an injected clock; nothing here measures time.

Full verifications are counted by :class:`tests.helpers.CountingVerifier`, which wraps the
private ``_verify_uncached``: that count is the only way to see, from outside, whether a request
was answered from the cache.
"""

from __future__ import annotations

import base64
import json
import random
import secrets
import sys
import threading
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.authentication import AuthCredentials
from starlette.types import Receive, Scope, Send

from devicegate import (
    AuthError,
    CredentialKind,
    DeviceAuthMiddleware,
    GateConfig,
    InvalidReason,
    InvalidRequest,
    InvalidToken,
    Principal,
    Rule,
    TokenIssuer,
    TokenVerifier,
)
from devicegate._cache import MemoryTokenCache
from devicegate._tokens import MAX_CACHED_TOKEN_BYTES
from tests.helpers import (
    NOW,
    Clock,
    CountingVerifier,
    Keys,
    RecordingApp,
    b64url,
    bearer,
    claims_at,
    client,
    make_token,
)

pytestmark = pytest.mark.anyio

DEVICE_A = "device-a"
DEVICE_B = "device-b"


def outcome(verifier: TokenVerifier, token: str, device: str | None) -> object:
    """What a verification ends in: the claims, or the error class and reason."""
    try:
        principal = verifier.verify(token, None if device is None else device.encode())
    except InvalidToken as error:
        return ("InvalidToken", error.reason)
    except AuthError as error:
        return (type(error).__name__, error.description)
    return dict(principal.claims)


def gate_with_clock(
    app: RecordingApp, config: GateConfig, clock: Clock, **options: Any
) -> tuple[DeviceAuthMiddleware, CountingVerifier]:
    """A middleware whose verifier reads ``clock`` and counts full verifications."""
    verifier = CountingVerifier(config, clock=clock)
    return DeviceAuthMiddleware(app, config=config, verifier=verifier, **options), verifier


# --- device binding ---------------------------------------------------------------------------


def test_token_cached_for_device_a_is_refused_for_device_b(keys: Keys) -> None:
    verifier = CountingVerifier(keys.config(), clock=Clock())
    token = make_token(keys.jwt_secret, claims_at(instance_id=DEVICE_A))
    assert verifier.verify(token, DEVICE_A.encode()).instance_id == DEVICE_A
    for other in (DEVICE_B, "DEVICE-A", "device-a ", "device-", DEVICE_A + "\x00"):
        with pytest.raises(InvalidToken) as excinfo:
            verifier.verify(token, other.encode())
        assert excinfo.value.reason is InvalidReason.WRONG_DEVICE
    with pytest.raises(InvalidRequest):
        verifier.verify(token, None)
    # Device A still works, still from the cache: the refusals evicted nothing.
    assert verifier.verify(token, DEVICE_A.encode()).instance_id == DEVICE_A
    assert verifier.full_verifications == 1
    assert verifier.cache_size == 1


async def test_token_cached_for_device_a_is_refused_for_device_b_through_the_middleware(
    keys: Keys, app: RecordingApp
) -> None:
    gate, verifier = gate_with_clock(app, keys.config(), Clock(NOW))
    token = make_token(keys.jwt_secret, claims_at(instance_id=DEVICE_A))
    async with client(gate) as http:
        first = await http.get("/", headers=bearer(token, DEVICE_A))
        stolen = await http.get("/", headers=bearer(token, DEVICE_B))
        no_device = await http.get("/", headers=bearer(token))
        again = await http.get("/", headers=bearer(token, DEVICE_A))
    assert first.status_code == 200
    assert stolen.status_code == 401
    assert 'error="invalid_token"' in stolen.headers["www-authenticate"]
    assert no_device.status_code == 400
    assert again.status_code == 200
    assert again.json()["instance_id"] == DEVICE_A
    assert len(app.calls) == 2  # only the two requests from device A reached the app
    assert verifier.full_verifications == 1


async def test_device_b_first_does_not_poison_the_cache(keys: Keys, app: RecordingApp) -> None:
    # A genuine token seen first with the wrong device is cached (it is genuine), but the
    # device is compared on every request, so the cache never learns "device B is fine".
    gate, verifier = gate_with_clock(app, keys.config(), Clock(NOW))
    token = make_token(keys.jwt_secret, claims_at(instance_id=DEVICE_A))
    async with client(gate) as http:
        stolen = [await http.get("/", headers=bearer(token, DEVICE_B)) for _ in range(3)]
        owner = await http.get("/", headers=bearer(token, DEVICE_A))
    assert [response.status_code for response in stolen] == [401, 401, 401]
    assert owner.status_code == 200
    assert len(app.calls) == 1
    assert verifier.full_verifications == 1


async def test_require_device_binding_holds_with_the_cache(keys: Keys, app: RecordingApp) -> None:
    config = keys.config(require_device_binding=True)
    gate, verifier = gate_with_clock(app, config, Clock(NOW))
    generic = make_token(keys.jwt_secret, claims_at())
    bound = make_token(keys.jwt_secret, claims_at(instance_id=DEVICE_A))
    async with client(gate) as http:
        generic_responses = [
            await http.get("/", headers=bearer(generic, device)) for device in (None, DEVICE_A)
        ]
        bound_responses = [await http.get("/", headers=bearer(bound, DEVICE_A)) for _ in range(2)]
    assert [response.status_code for response in generic_responses] == [401, 401]
    assert [response.status_code for response in bound_responses] == [200, 200]
    assert verifier.cache_size == 1  # only the bound token; the refused generic one is not kept
    assert verifier.full_verifications == 3


async def test_cached_token_is_refused_where_device_tokens_are_not_accepted(
    keys: Keys, app: RecordingApp
) -> None:
    rules = [Rule("/server/*", accept=[CredentialKind.API_KEY])]
    gate, _ = gate_with_clock(app, keys.config(), Clock(NOW), rules=rules)
    token = make_token(keys.jwt_secret, claims_at(instance_id=DEVICE_A))
    async with client(gate) as http:
        warm = await http.get("/items", headers=bearer(token, DEVICE_A))
        elsewhere = await http.get("/server/jobs", headers=bearer(token, DEVICE_A))
    assert warm.status_code == 200
    assert elsewhere.status_code == 403
    assert len(app.calls) == 1


async def test_cached_token_still_goes_through_header_parsing(
    keys: Keys, app: RecordingApp
) -> None:
    # The cache sits behind the parser: a known token in an ambiguous request is still refused.
    gate, _ = gate_with_clock(app, keys.config(), Clock(NOW))
    token = make_token(keys.jwt_secret, claims_at(instance_id=DEVICE_A))
    async with client(gate) as http:
        warm = await http.get("/", headers=bearer(token, DEVICE_A))
        with_api_key = await http.get(
            "/", headers={**bearer(token, DEVICE_A), "x-api-key": keys.api_key}
        )
        twice = await http.get(
            "/",
            headers=[
                ("authorization", f"Bearer {token}"),
                ("authorization", f"Bearer {token}"),
                ("x-instance-id", DEVICE_A),
            ],
        )
        two_devices = await http.get(
            "/",
            headers=[
                ("authorization", f"Bearer {token}"),
                ("x-instance-id", DEVICE_A),
                ("x-instance-id", DEVICE_B),
            ],
        )
        lowercase_scheme = await http.get(
            "/", headers={"authorization": f"bearer {token}", "x-instance-id": DEVICE_A}
        )
    assert warm.status_code == 200
    assert [with_api_key.status_code, twice.status_code, two_devices.status_code] == [400] * 3
    assert lowercase_scheme.status_code == 200
    assert len(app.calls) == 2


async def test_no_request_can_widen_the_scopes_of_the_next(keys: Keys) -> None:
    # The principal of a cached token is shared (it is immutable), and so are the credentials
    # in scope["auth"]: they are read-only, so an app that tries to add a scope for one request
    # cannot grant it to the next. An app that wants other scopes sets a new scope["auth"].
    seen: list[Scope] = []
    refusals: list[str] = []

    async def granting_app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope)
        scopes_before = list(scope["auth"].scopes)
        for widen in (
            lambda: scope["auth"].scopes.append("admin"),
            lambda: scope["auth"].scopes.__setitem__(0, "admin"),
            lambda: setattr(scope["auth"], "scopes", ["admin"]),
        ):
            try:
                widen()
            except (TypeError, AttributeError) as error:
                refusals.append(type(error).__name__)
        assert list(scope["auth"].scopes) == scopes_before
        scope["auth"] = AuthCredentials([*scopes_before, "admin"])  # replacing is the way
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    gate = DeviceAuthMiddleware(granting_app, config=keys.config())
    token = make_token(keys.jwt_secret, claims_at(instance_id=DEVICE_A, iat=None, exp=2**37))
    async with client(gate) as http:
        for _ in range(3):
            assert (await http.get("/", headers=bearer(token, DEVICE_A))).status_code == 200
        assert (await http.get("/", headers={"x-api-key": keys.api_key})).status_code == 200
    assert refusals == ["TypeError", "TypeError", "AttributeError"] * 4
    # What each app set is its own; the next request got devicegate's credentials again.
    assert [scope["auth"].scopes for scope in seen] == [
        ["authenticated", "device_token", "admin"]
    ] * 3 + [["authenticated", "api_key", "admin"]]
    assert seen[0]["user"] is seen[1]["user"]
    assert isinstance(seen[0]["user"], Principal)


# --- time -------------------------------------------------------------------------------------


@pytest.mark.parametrize("leeway", [0, 30])
def test_token_that_expires_while_cached(keys: Keys, leeway: int) -> None:
    clock = Clock(NOW)
    verifier = CountingVerifier(keys.config(leeway_seconds=leeway), clock=clock)
    exp = NOW + 300
    token = make_token(keys.jwt_secret, claims_at(exp=exp, instance_id=DEVICE_A))
    for now in (NOW, exp - 1, exp + leeway - 0.001):
        clock.now = now
        assert outcome(verifier, token, DEVICE_A) == json.loads(_payload(token))
    assert verifier.full_verifications == 1
    for now in (exp + leeway, exp + leeway + 0.5, exp + 3600):
        clock.now = now
        assert outcome(verifier, token, DEVICE_A) == ("InvalidToken", InvalidReason.EXPIRED)
        assert verifier.cache_size == 0  # an expired token leaves the cache at once


async def test_token_that_expires_while_cached_through_the_middleware(
    keys: Keys, app: RecordingApp
) -> None:
    clock = Clock(NOW)
    gate, verifier = gate_with_clock(app, keys.config(), clock)
    token = make_token(keys.jwt_secret, claims_at(exp=NOW + 300, instance_id=DEVICE_A))
    statuses = []
    async with client(gate) as http:
        for now in (NOW, NOW + 299, NOW + 299.999, NOW + 300, NOW + 301):
            clock.now = now
            statuses.append((await http.get("/", headers=bearer(token, DEVICE_A))).status_code)
    assert statuses == [200, 200, 200, 401, 401]
    assert len(app.calls) == 3
    assert verifier.cache_size == 0


@pytest.mark.parametrize(
    ("claim", "reason"),
    [("nbf", InvalidReason.NOT_YET_VALID), ("iat", InvalidReason.ISSUED_IN_FUTURE)],
)
@pytest.mark.parametrize("leeway", [0, 10])
def test_clock_going_backwards_is_checked_on_hits(
    keys: Keys, claim: str, reason: InvalidReason, leeway: int
) -> None:
    clock = Clock(NOW)
    verifier = CountingVerifier(keys.config(leeway_seconds=leeway), clock=clock)
    token = make_token(keys.jwt_secret, {**claims_at(), claim: NOW})
    assert isinstance(outcome(verifier, token, None), dict)  # cached at NOW
    clock.now = NOW - leeway  # still inside the leeway: a hit
    assert isinstance(outcome(verifier, token, None), dict)
    assert verifier.full_verifications == 1
    clock.now = NOW - leeway - 1  # the clock stepped back past the token's start
    # The same refusal, with the same reason, as a verifier that never saw the token.
    fresh = TokenVerifier(keys.config(leeway_seconds=leeway), clock=clock)
    assert outcome(verifier, token, None) == outcome(fresh, token, None) == ("InvalidToken", reason)
    clock.now = NOW  # and back again: accepted, re-verified once and cached again
    assert isinstance(outcome(verifier, token, None), dict)
    assert isinstance(outcome(verifier, token, None), dict)
    assert verifier.full_verifications == 3
    assert verifier.cache_size == 1


def _payload(token: str) -> bytes:
    segment = token.split(".")[1]
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


# --- capacity ---------------------------------------------------------------------------------


def test_the_token_held_longest_is_forgotten_first(keys: Keys) -> None:
    # First in, first out: the token held longest is the one nearest its expiry, and a hit
    # does not reorder anything.
    verifier = CountingVerifier(keys.config(token_cache_size=3), clock=Clock())
    t1, t2, t3, t4 = (make_token(keys.jwt_secret, claims_at()) for _ in range(4))
    for token in (t1, t2, t3):
        verifier.verify(token)
    verifier.verify(t1)  # a hit: t1 is still the oldest
    verifier.verify(t4)  # evicts t1
    assert verifier.full_verifications == 4
    for token in (t2, t3, t4):
        verifier.verify(token)
    assert verifier.full_verifications == 4  # all three were still cached
    verifier.verify(t1)  # gone: verified in full again, and evicts t2 (now the oldest)
    assert verifier.full_verifications == 5
    verifier.verify(t2)
    assert verifier.full_verifications == 6
    assert verifier.cache_size == 3


@pytest.mark.parametrize("size", [1, 2, 10])
def test_cache_size_is_bounded(keys: Keys, size: int) -> None:
    verifier = TokenVerifier(keys.config(token_cache_size=size), clock=Clock())
    for _ in range(3 * size + 1):
        verifier.verify(make_token(keys.jwt_secret, claims_at()))
        assert verifier.cache_size <= size
    assert verifier.cache_size == size


def token_of_length(secret: str, length: int) -> str:
    """A valid token exactly ``length`` characters long, padded with a claim.

    Unpadded base64url cannot have every length, so a few header spellings are tried.
    """
    for header in ({"alg": "HS256", "typ": "JWT"}, {"alg": "HS256"}, {"alg": "HS256", "x": 1}):
        base = claims_at(pad="")
        unpadded = len(make_token(secret, base, header=header))
        start = max(0, (length - unpadded) * 3 // 4 - 4)
        for padding in range(start, start + 12):
            token = make_token(secret, {**base, "pad": "p" * padding}, header=header)
            if len(token) == length:
                return token
    raise AssertionError(f"no token of length {length}")


@pytest.mark.parametrize(
    ("length", "cached"),
    [
        (MAX_CACHED_TOKEN_BYTES - 1, True),
        (MAX_CACHED_TOKEN_BYTES, True),
        (MAX_CACHED_TOKEN_BYTES + 1, False),
        (MAX_CACHED_TOKEN_BYTES + 2, False),
        (6000, False),
    ],
)
def test_tokens_over_4_kib_are_never_cached(keys: Keys, length: int, cached: bool) -> None:
    verifier = CountingVerifier(keys.config(), clock=Clock())
    token = token_of_length(keys.jwt_secret, length)
    assert len(token) == length
    for _ in range(3):
        assert verifier.verify(token).claims["pad"]
    assert verifier.cache_size == (1 if cached else 0)
    assert verifier.full_verifications == (1 if cached else 3)


def invalid_tokens(keys: Keys, count: int) -> Iterator[str]:
    """``count`` distinct tokens, each refused for a different kind of reason."""
    wrong_secret = secrets.token_urlsafe(32)
    for index in range(count):
        kind = index % 6
        if kind == 0:
            yield make_token(wrong_secret, claims_at())  # bad signature
        elif kind == 1:
            yield make_token(keys.jwt_secret, claims_at(iat=NOW - 900, exp=NOW - 600))  # expired
        elif kind == 2:
            yield make_token(keys.jwt_secret, claims_at(nbf=NOW + 600))  # not yet valid
        elif kind == 3:
            yield make_token(keys.jwt_secret, claims_at(exp=str(NOW + 300)))  # exp a string
        elif kind == 4:
            yield make_token(keys.jwt_secret, claims_at(), header={"alg": "HS512"})
        else:
            yield f"{b64url(b'junk')}.{b64url(secrets.token_bytes(12))}.{'A' * 43}"


def test_invalid_tokens_are_never_cached(keys: Keys) -> None:
    verifier = TokenVerifier(keys.config(require_device_binding=True), clock=Clock())
    tokens = [*invalid_tokens(keys, 12), make_token(keys.jwt_secret, claims_at())]  # + unbound
    for token in tokens:
        for _ in range(2):
            with pytest.raises(InvalidToken):
                verifier.verify(token, DEVICE_A.encode())
    assert verifier.cache_size == 0


def test_a_flood_of_invalid_tokens_evicts_nothing(keys: Keys) -> None:
    size = 50
    verifier = CountingVerifier(keys.config(token_cache_size=size), clock=Clock())
    good = [make_token(keys.jwt_secret, claims_at(instance_id=f"device-{n}")) for n in range(size)]
    for number, token in enumerate(good):
        verifier.verify(token, f"device-{number}".encode())
    assert verifier.cache_size == size
    refused = 0
    for token in invalid_tokens(keys, 40 * size):
        with pytest.raises(InvalidToken):
            verifier.verify(token, DEVICE_A.encode())
        refused += 1
    assert refused == 40 * size
    assert verifier.cache_size == size
    before = verifier.full_verifications
    for number, token in enumerate(good):
        assert verifier.verify(token, f"device-{number}".encode()).instance_id == f"device-{number}"
    assert verifier.full_verifications == before  # every good entry answered from the cache


async def test_a_flood_through_the_middleware_evicts_nothing(keys: Keys, app: RecordingApp) -> None:
    gate, verifier = gate_with_clock(app, keys.config(token_cache_size=5), Clock(NOW))
    good = [make_token(keys.jwt_secret, claims_at(instance_id=DEVICE_A)) for _ in range(5)]
    async with client(gate) as http:
        for token in good:
            assert (await http.get("/", headers=bearer(token, DEVICE_A))).status_code == 200
        for token in invalid_tokens(keys, 60):
            assert (await http.get("/", headers=bearer(token, DEVICE_A))).status_code == 401
        full = verifier.full_verifications
        for token in good:
            assert (await http.get("/", headers=bearer(token, DEVICE_A))).status_code == 200
    assert verifier.full_verifications == full
    assert len(app.calls) == 10


def test_token_cache_size_zero_disables_the_cache(keys: Keys) -> None:
    verifier = CountingVerifier(keys.config(token_cache_size=0), clock=Clock())
    token = make_token(keys.jwt_secret, claims_at(instance_id=DEVICE_A))
    for _ in range(3):
        assert verifier.verify(token, DEVICE_A.encode()).instance_id == DEVICE_A
        assert verifier.cache_size == 0
    assert verifier.full_verifications == 3
    with pytest.raises(InvalidToken):
        verifier.verify(token, DEVICE_B.encode())


async def test_token_cache_size_zero_through_the_middleware(keys: Keys, app: RecordingApp) -> None:
    gate, verifier = gate_with_clock(app, keys.config(token_cache_size=0), Clock(NOW))
    token = make_token(keys.jwt_secret, claims_at(instance_id=DEVICE_A))
    async with client(gate) as http:
        statuses = [
            (await http.get("/", headers=bearer(token, device))).status_code
            for device in (DEVICE_A, DEVICE_A, DEVICE_B, DEVICE_A)
        ]
    assert statuses == [200, 200, 401, 200]
    assert verifier.full_verifications == 4
    assert verifier.cache_size == 0


# --- clearing and rotation --------------------------------------------------------------------


def test_clear_cache_forces_a_full_verification(keys: Keys) -> None:
    verifier = CountingVerifier(keys.config(), clock=Clock())
    tokens = [make_token(keys.jwt_secret, claims_at()) for _ in range(3)]
    for token in tokens * 2:
        verifier.verify(token)
    assert verifier.full_verifications == 3
    verifier.clear_cache()
    assert verifier.cache_size == 0
    for token in tokens * 2:
        verifier.verify(token)
    assert verifier.full_verifications == 6


async def test_clear_token_cache_forces_a_full_verification(keys: Keys, app: RecordingApp) -> None:
    gate, verifier = gate_with_clock(app, keys.config(), Clock(NOW))
    token = make_token(keys.jwt_secret, claims_at(instance_id=DEVICE_A))
    async with client(gate) as http:
        for _ in range(2):
            assert (await http.get("/", headers=bearer(token, DEVICE_A))).status_code == 200
        gate.clear_token_cache()
        assert verifier.cache_size == 0
        for _ in range(2):
            assert (await http.get("/", headers=bearer(token, DEVICE_A))).status_code == 200
    assert verifier.full_verifications == 2


async def test_rotation_a_token_signed_with_a_removed_secret_is_refused(
    keys: Keys, app: RecordingApp
) -> None:
    # GateConfig is immutable, so rotating a secret means building a new configuration and a
    # new middleware, whose cache starts empty: nothing the old one remembered carries over.
    # Step 1 trusts the old secret, step 2 signs with a new one and still verifies the old
    # one (the rotation window), step 3 drops the old one.
    old, new = keys.jwt_secret, secrets.token_urlsafe(32)
    step_1 = keys.config()
    step_2 = step_1.replace(jwt_secret=[new, old])
    step_3 = step_1.replace(jwt_secret=[new])
    old_token = make_token(old, instance_id=DEVICE_A)  # valid now, by the system clock
    new_token = TokenIssuer(step_2).issue(DEVICE_A).access_token
    gates = [DeviceAuthMiddleware(app, config=config) for config in (step_1, step_2, step_3)]
    statuses: list[list[int]] = []
    for gate in gates:
        async with client(gate) as http:
            statuses.append(
                [
                    (await http.get("/", headers=bearer(token, DEVICE_A))).status_code
                    for token in (old_token, old_token, new_token)
                ]
            )
    assert statuses == [[200, 200, 401], [200, 200, 200], [401, 401, 200]]
    # A middleware that keeps its configuration keeps trusting the secrets in it: clearing its
    # cache re-verifies against that configuration (this is what rotation and revocation call
    # after changing what a verifier trusts), it does not by itself revoke anything.
    gates[1].clear_token_cache()
    async with client(gates[1]) as http:
        assert (await http.get("/", headers=bearer(old_token, DEVICE_A))).status_code == 200


# --- the cache never changes an outcome --------------------------------------------------------

TOKEN_KINDS = {
    "bound-a": claims_at(instance_id=DEVICE_A),
    "generic": claims_at(),
    "short-lived": claims_at(exp=NOW + 5, instance_id=DEVICE_A),
    "starts-later": claims_at(nbf=NOW + 20, exp=NOW + 300),
    "issued-later": claims_at(iat=NOW + 20, exp=NOW + 300, instance_id=DEVICE_B),
    "no-iat": claims_at(iat=None, exp=NOW + 60),
}
STEPS = st.lists(
    st.tuples(
        st.sampled_from(sorted(TOKEN_KINDS)),
        st.sampled_from([DEVICE_A, DEVICE_B, None]),
        st.integers(min_value=-40, max_value=320),
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(steps=STEPS, size=st.integers(min_value=1, max_value=4), leeway=st.sampled_from([0, 10]))
def test_cached_and_uncached_verification_always_agree(
    steps: list[tuple[str, str | None, int]], size: int, leeway: int
) -> None:
    # Any sequence of requests (any token, any device header, the clock jumping forwards and
    # backwards), with a small cache that evicts often, ends every request exactly as a
    # verifier without a cache ends it: same claims, or same error and reason.
    secret = "a-fixed-test-secret-for-hypothesis-runs"
    config = GateConfig(jwt_secret=secret, leeway_seconds=leeway)
    clock = Clock()
    cached = TokenVerifier(config.replace(token_cache_size=size), clock=clock)
    uncached = TokenVerifier(config.replace(token_cache_size=0), clock=clock)
    tokens = {name: make_token(secret, value) for name, value in TOKEN_KINDS.items()}
    for name, device, offset in steps:
        clock.now = NOW + offset
        assert outcome(cached, tokens[name], device) == outcome(uncached, tokens[name], device)
        assert cached.cache_size <= size


async def test_nested_claims_cannot_be_changed_by_one_request_for_the_next(keys: Keys) -> None:
    # A cached principal is shared by every request with that token: its claims must be
    # read-only all the way down, or one request's app could grant the next one a role.
    seen: list[list[str]] = []

    async def meddling_app(scope: Scope, receive: Receive, send: Send) -> None:
        claims: Any = scope["user"].claims
        seen.append(list(claims["roles"]))
        with pytest.raises(TypeError):
            claims["roles"].append("admin")
        with pytest.raises(TypeError):
            claims["profile"].update(admin=True)
        with pytest.raises(TypeError):
            claims["roles"] = ["admin"]
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send(
            {"type": "http.response.body", "body": json.dumps(scope["user"].claims).encode()}
        )

    gate = DeviceAuthMiddleware(meddling_app, config=keys.config())
    token = make_token(
        keys.jwt_secret,
        claims_at(instance_id=DEVICE_A, iat=None, exp=2**37, roles=["user"], profile={"tier": 1}),
    )
    async with client(gate) as http:
        bodies = [(await http.get("/", headers=bearer(token, DEVICE_A))).json() for _ in range(3)]
    assert seen == [["user"]] * 3
    assert all(body["roles"] == ["user"] and body["profile"] == {"tier": 1} for body in bodies)


# --- threads ------------------------------------------------------------------------------------


class _ClearedBeforeEviction(OrderedDict[bytes, Any]):
    """A cache that another thread's clear_cache() empties just before an eviction."""

    def popitem(self, last: bool = True) -> tuple[bytes, Any]:
        self.clear()
        return super().popitem(last)  # KeyError: nothing is left to evict


def test_a_cache_cleared_by_another_thread_before_an_eviction_still_answers(keys: Keys) -> None:
    cache = MemoryTokenCache(1)
    cache._entries = _ClearedBeforeEviction()
    cache.get = cache._entries.get
    verifier = CountingVerifier(keys.config(), cache=cache, clock=Clock())
    first = make_token(keys.jwt_secret, claims_at())
    second_claims = claims_at(instance_id=DEVICE_A)
    second = make_token(keys.jwt_secret, second_claims)
    verifier.verify(first)
    # Inserting the second token overfills the cache; the eviction finds it already empty.
    assert outcome(verifier, second, DEVICE_A) == second_claims
    assert outcome(verifier, second, DEVICE_B) == ("InvalidToken", InvalidReason.WRONG_DEVICE)
    assert verifier.full_verifications == 3


def test_threads_sharing_a_verifier_get_the_outcomes_of_a_full_verification(keys: Keys) -> None:
    # Eight threads share one small cache (evicting all the time, and now and then cleared)
    # while the interpreter switches threads as often as it can: every call must end as a
    # verifier without a cache ends it, and none may raise anything else.
    config = keys.config(token_cache_size=3)
    clock = Clock()
    shared = TokenVerifier(config, clock=clock)
    reference = TokenVerifier(config.replace(token_cache_size=0), clock=clock)
    tokens = [make_token(keys.jwt_secret, claims) for claims in TOKEN_KINDS.values()]
    cases = [(token, device) for token in tokens for device in (DEVICE_A, DEVICE_B, None)]
    expected = {case: outcome(reference, *case) for case in cases}
    failures: list[object] = []

    def worker(seed: int) -> None:
        chooser = random.Random(seed)
        try:
            for _ in range(400):
                if chooser.random() < 0.02:
                    shared.clear_cache()
                case = chooser.choice(cases)
                result = outcome(shared, *case)
                if result != expected[case]:
                    failures.append((case, result))
        except Exception as exc:  # reported below, not lost in the thread
            failures.append(exc)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert failures == []
    assert shared.cache_size <= 3
