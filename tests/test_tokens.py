"""TokenVerifier and TokenIssuer, without ASGI: claims, time, device binding, rotation, the
verified-token cache, and interoperability with PyJWT in both directions.

Tokens are built by hand (raw HMAC, ``tests.helpers.make_token``) and time comes from an
injected clock, so every boundary is exact.
"""

from __future__ import annotations

import base64
import json
import time
from datetime import datetime, timedelta, timezone
from typing import Any, cast

import jwt
import pytest

from devicegate import (
    ConfigError,
    CredentialKind,
    GateConfig,
    InvalidReason,
    InvalidRequest,
    InvalidToken,
    TokenIssuer,
    TokenVerifier,
)
from devicegate._keys import derive_kid
from devicegate._tokens import MAX_CACHED_TOKEN_BYTES, validate_instance_id
from tests.helpers import INVALID_INSTANCE_IDS, NOW, Clock, Keys, claims_at, make_token

DEVICE = "device-7f3a"
ISSUER = "https://auth.example.com"
AUDIENCE = "mobile-api"


def verifier(config: GateConfig, clock: Clock | None = None, **options: Any) -> TokenVerifier:
    if options:
        config = config.replace(**options)
    return TokenVerifier(config, clock=clock or Clock())


def reason_of(verify: TokenVerifier, token: str, device: bytes | None = None) -> InvalidReason:
    with pytest.raises(InvalidToken) as excinfo:
        verify.verify(token, device)
    return excinfo.value.reason


# --- accepting a good token -----------------------------------------------------------------


def test_valid_bound_token(keys: Keys) -> None:
    claims = claims_at(instance_id=DEVICE, jti="j-1")
    token = make_token(keys.jwt_secret, claims)
    principal = verifier(keys.config()).verify(token, DEVICE.encode())
    assert principal.kind is CredentialKind.DEVICE_TOKEN
    assert principal.instance_id == DEVICE
    assert dict(principal.claims) == claims
    assert principal.is_authenticated
    assert principal.identity == "j-1"


def test_valid_generic_token(keys: Keys) -> None:
    token = make_token(keys.jwt_secret, claims_at())
    verify = verifier(keys.config())
    assert verify.verify(token).instance_id is None
    # A device header on a generic token changes nothing.
    assert verify.verify(token, b"any-device").instance_id is None


def test_token_as_str_or_bytes(keys: Keys) -> None:
    token = make_token(keys.jwt_secret, claims_at())
    verify = verifier(keys.config(), token_cache_size=0)
    assert verify.verify(token) == verify.verify(token.encode())


def test_principal_claims_are_read_only(keys: Keys) -> None:
    token = make_token(keys.jwt_secret, claims_at(instance_id=DEVICE))
    principal = verifier(keys.config()).verify(token, DEVICE.encode())
    with pytest.raises(TypeError):
        principal.claims["instance_id"] = "other"  # type: ignore[index]
    with pytest.raises(AttributeError):
        principal.instance_id = "other"


def test_typ_header_optional_and_case_insensitive(keys: Keys) -> None:
    verify = verifier(keys.config(), token_cache_size=0)
    for header in (
        {"alg": "HS256"},
        {"alg": "HS256", "typ": "jwt"},
        {"typ": "JWT", "alg": "HS256"},
    ):
        claims = claims_at()
        token = make_token(keys.jwt_secret, claims, header=header)
        assert dict(verify.verify(token).claims) == claims


def test_verifier_repr_hides_secrets(keys: Keys) -> None:
    verify = verifier(keys.config())
    verify.verify(make_token(keys.jwt_secret, claims_at()))
    assert keys.jwt_secret not in repr(verify)
    assert repr(verify) == "<TokenVerifier cache=<MemoryTokenCache 1/10000> revocations=None>"


def test_no_jwt_secret_configured(keys: Keys) -> None:
    verify = verifier(GateConfig(api_keys=keys.api_key))
    assert reason_of(verify, make_token(keys.jwt_secret, claims_at())) is (
        InvalidReason.NOT_CONFIGURED
    )


# --- time -----------------------------------------------------------------------------------

# (leeway, seconds after exp, accepted?) RFC 7519 §4.1.4: the current time must be *before* exp.
EXPIRY = [
    pytest.param(0, -300, True, id="just-issued"),
    pytest.param(0, -1, True, id="one-second-left"),
    pytest.param(0, -0.001, True, id="a-millisecond-left"),
    pytest.param(0, 0, False, id="at-exp"),
    pytest.param(0, 0.5, False, id="half-a-second-late"),
    pytest.param(0, 1, False, id="one-second-late"),
    pytest.param(30, 29, True, id="leeway-30-within"),
    pytest.param(30, 29.999, True, id="leeway-30-last-moment"),
    pytest.param(30, 30, False, id="leeway-30-at-end"),
    pytest.param(60, 59, True, id="leeway-60-within"),
    pytest.param(60, 61, False, id="leeway-60-past"),
]


@pytest.mark.parametrize("cache", [0, 100], ids=["no-cache", "cache"])
@pytest.mark.parametrize(("leeway", "after_exp", "accepted"), EXPIRY)
def test_expiry_boundaries(
    keys: Keys, cache: int, leeway: int, after_exp: float, accepted: bool
) -> None:
    clock = Clock(NOW)
    verify = verifier(keys.config(), clock, leeway_seconds=leeway, token_cache_size=cache)
    exp = NOW + 300
    token = make_token(keys.jwt_secret, claims_at(exp=exp))
    verify.verify(token)  # verified (and cached, when enabled) while fresh
    clock.now = exp + after_exp
    if accepted:
        assert verify.verify(token).claims["exp"] == exp
    else:
        assert reason_of(verify, token) is InvalidReason.EXPIRED


def test_expired_on_first_sight(keys: Keys) -> None:
    token = make_token(keys.jwt_secret, claims_at(iat=NOW - 600, exp=NOW - 300))
    assert reason_of(verifier(keys.config()), token) is InvalidReason.EXPIRED
    assert reason_of(verifier(keys.config(leeway_seconds=60)), token) is InvalidReason.EXPIRED


def test_expired_token_leaves_the_cache(keys: Keys) -> None:
    clock = Clock()
    verify = verifier(keys.config(), clock)
    token = make_token(keys.jwt_secret, claims_at())
    verify.verify(token)
    assert verify.cache_size == 1
    clock.now = NOW + 300
    assert reason_of(verify, token) is InvalidReason.EXPIRED
    assert verify.cache_size == 0


@pytest.mark.parametrize(
    ("claim", "reason"),
    [("nbf", InvalidReason.NOT_YET_VALID), ("iat", InvalidReason.ISSUED_IN_FUTURE)],
)
@pytest.mark.parametrize(
    ("leeway", "ahead", "accepted"),
    [
        pytest.param(0, 0, True, id="now"),
        pytest.param(0, -100, True, id="past"),
        pytest.param(0, 1, False, id="one-second-ahead"),
        pytest.param(0, 3600, False, id="an-hour-ahead"),
        pytest.param(10, 10, True, id="leeway-10-at-edge"),
        pytest.param(10, 11, False, id="leeway-10-past-edge"),
    ],
)
def test_not_before_and_issued_at(
    keys: Keys, claim: str, reason: InvalidReason, leeway: int, ahead: int, accepted: bool
) -> None:
    verify = verifier(keys.config(leeway_seconds=leeway), token_cache_size=0)
    claims = claims_at(iat=NOW - 200, exp=NOW + 3900)
    claims[claim] = NOW + ahead
    token = make_token(keys.jwt_secret, claims)
    if accepted:
        assert verify.verify(token).claims[claim] == NOW + ahead
    else:
        assert reason_of(verify, token) is reason


def test_cached_token_is_refused_before_its_start(keys: Keys) -> None:
    clock = Clock()
    verify = verifier(keys.config(), clock)
    token = make_token(keys.jwt_secret, claims_at(nbf=NOW))
    verify.verify(token)
    clock.now = NOW - 1  # the clock stepped back
    assert reason_of(verify, token) is InvalidReason.NOT_YET_VALID


# RFC 7519 §2: a NumericDate is a JSON number, whole or not. Anything else is refused, and so
# is a number no date library can represent (beyond 9999-12-31T23:59:59Z).
LAST_NUMERIC_DATE = 253_402_300_799


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
@pytest.mark.parametrize(
    "value",
    [
        pytest.param(str(NOW + 100), id="string"),
        pytest.param(True, id="true"),
        pytest.param(False, id="false"),
        pytest.param([NOW + 100], id="list"),
        pytest.param({"t": NOW}, id="object"),
        pytest.param(LAST_NUMERIC_DATE + 1, id="after-year-9999"),
        pytest.param(LAST_NUMERIC_DATE + 0.5, id="float-after-year-9999"),
        pytest.param(1e308, id="huge-float"),
    ],
)
def test_time_claims_must_be_numeric_dates(keys: Keys, claim: str, value: object) -> None:
    token = make_token(keys.jwt_secret, {**claims_at(), claim: value})
    assert reason_of(verifier(keys.config()), token) is InvalidReason.BAD_CLAIMS


@pytest.mark.parametrize(
    ("claims", "expires_before"),
    [
        # What jwt.encode({"exp": time.time() + 300}) produces: fractions of a second.
        ({"exp": NOW + 300.25, "iat": NOW - 0.5, "nbf": NOW - 0.75}, NOW + 300.25),
        ({"exp": float(NOW + 300), "iat": float(NOW)}, NOW + 300),
        ({"exp": LAST_NUMERIC_DATE}, LAST_NUMERIC_DATE),
    ],
)
def test_fractional_and_whole_numeric_dates_are_accepted(
    keys: Keys, claims: dict[str, float], expires_before: float
) -> None:
    clock = Clock(NOW)
    verify = verifier(keys.config(), clock)
    token = make_token(keys.jwt_secret, {**claims, "jti": "j"})
    assert verify.verify(token).claims["exp"] == claims["exp"]
    clock.now = expires_before - 0.01  # cached: still valid a hundredth of a second before
    assert verify.verify(token).claims["exp"] == claims["exp"]
    clock.now = expires_before
    assert reason_of(verify, token) is InvalidReason.EXPIRED


@pytest.mark.parametrize(
    "start",
    [
        pytest.param(-LAST_NUMERIC_DATE, id="as-far-back-as-year-9999-ahead"),
        pytest.param(-(10**400), id="further-back-than-a-float-holds"),
        pytest.param(-1e308, id="a-huge-negative-float"),
    ],
)
@pytest.mark.parametrize("claim", ["nbf", "iat"])
def test_a_start_in_the_far_past_is_kept_in_the_cache(keys: Keys, claim: str, start: float) -> None:
    # No lower bound is set on a NumericDate: however far back a token starts, a cache hit
    # decides it as the full verification does, until it expires.
    clock = Clock(NOW)
    verify = verifier(keys.config(), clock)
    token = make_token(keys.jwt_secret, {"exp": NOW + 300, claim: start, "jti": "j"})
    assert verify.verify(token).claims[claim] == start
    assert verify.remembers(token.encode())
    assert verify.verify(token).claims[claim] == start
    clock.now = NOW + 300
    assert reason_of(verify, token) is InvalidReason.EXPIRED


@pytest.mark.parametrize("now", [float("nan"), float("inf"), float("-inf")])
def test_a_clock_that_cannot_tell_the_time_refuses_every_token(keys: Keys, now: float) -> None:
    clock = Clock(NOW)
    verify = verifier(keys.config(), clock)
    token = make_token(keys.jwt_secret, claims_at())
    verify.verify(token)  # cached
    clock.now = now
    assert reason_of(verify, token) is InvalidReason.BAD_CLOCK
    assert reason_of(verify, make_token(keys.jwt_secret, claims_at())) is InvalidReason.BAD_CLOCK


@pytest.mark.parametrize("typ", ["JWT", "jwt", "application/jwt", "Application/JWT"])
def test_typ_may_name_the_jwt_media_type_in_full(keys: Keys, typ: str) -> None:
    token = make_token(keys.jwt_secret, claims_at(), header={"alg": "HS256", "typ": typ})
    assert verifier(keys.config(), Clock(NOW)).verify(token).claims["iat"] == NOW


@pytest.mark.parametrize(
    "typ", ["at+jwt", "application/at+jwt", "application/jwt; x=1", "JWS", "application/"]
)
def test_other_types_are_refused(keys: Keys, typ: str) -> None:
    token = make_token(keys.jwt_secret, claims_at(), header={"alg": "HS256", "typ": typ})
    assert reason_of(verifier(keys.config(), Clock(NOW)), token) is InvalidReason.BAD_HEADER


@pytest.mark.parametrize(
    "token", [None, 123, 1.5, bytearray(b"a.b.c"), memoryview(b"a.b.c"), ["a.b.c"]]
)
def test_verify_of_something_that_is_no_token(keys: Keys, token: Any) -> None:
    with pytest.raises(InvalidToken) as refused:
        verifier(keys.config()).verify(token)
    assert refused.value.reason is InvalidReason.MALFORMED


@pytest.mark.parametrize("claim", ["nbf", "iat"])
def test_null_nbf_or_iat_is_refused(keys: Keys, claim: str) -> None:
    claims = claims_at()
    claims[claim] = None
    token = make_token(keys.jwt_secret, claims)
    assert reason_of(verifier(keys.config()), token) is InvalidReason.BAD_CLAIMS


def test_missing_exp(keys: Keys) -> None:
    token = make_token(keys.jwt_secret, claims_at(exp=None))
    assert reason_of(verifier(keys.config()), token) is InvalidReason.BAD_CLAIMS


def test_iat_and_nbf_are_optional(keys: Keys) -> None:
    token = make_token(keys.jwt_secret, {"exp": NOW + 1})
    assert dict(verifier(keys.config()).verify(token).claims) == {"exp": NOW + 1}


# --- issuer and audience --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("iss", "accepted"),
    [
        pytest.param(ISSUER, True, id="exact"),
        pytest.param(ISSUER + ".evil.com", False, id="prefix-look-alike"),
        pytest.param(ISSUER + "/", False, id="trailing-slash"),
        pytest.param(ISSUER[:-1], False, id="truncated"),
        pytest.param(ISSUER.upper(), False, id="case"),
        pytest.param(" " + ISSUER, False, id="leading-space"),
        pytest.param([ISSUER], False, id="list"),
        pytest.param(None, False, id="missing"),
        pytest.param(7, False, id="int"),
        pytest.param("", False, id="empty"),
    ],
)
def test_issuer_matches_exactly(keys: Keys, iss: object, accepted: bool) -> None:
    verify = verifier(keys.config(issuer=ISSUER), token_cache_size=0)
    token = make_token(keys.jwt_secret, claims_at(iss=iss))
    if accepted:
        assert verify.verify(token).claims["iss"] == ISSUER
    else:
        assert reason_of(verify, token) is InvalidReason.WRONG_ISSUER


def test_issuer_not_configured_ignores_iss(keys: Keys) -> None:
    token = make_token(keys.jwt_secret, claims_at(iss="https://anyone.example"))
    assert verifier(keys.config()).verify(token).claims["iss"] == "https://anyone.example"


@pytest.mark.parametrize(
    ("aud", "accepted"),
    [
        pytest.param(AUDIENCE, True, id="exact"),
        pytest.param([AUDIENCE], True, id="list-of-one"),
        pytest.param(["other-api", AUDIENCE], True, id="list-containing-it"),
        pytest.param(AUDIENCE + "-admin", False, id="prefix-look-alike"),
        pytest.param(AUDIENCE[:-1], False, id="truncated"),
        pytest.param(AUDIENCE.upper(), False, id="case"),
        pytest.param([AUDIENCE + "-admin"], False, id="list-with-look-alike"),
        pytest.param(["other-api"], False, id="list-without-it"),
        pytest.param([], False, id="empty-list"),
        pytest.param([AUDIENCE, 5], False, id="list-with-non-string"),
        pytest.param([[AUDIENCE]], False, id="nested-list"),
        pytest.param({"aud": AUDIENCE}, False, id="object"),
        pytest.param(5, False, id="int"),
        pytest.param("", False, id="empty"),
        pytest.param(None, False, id="missing"),
    ],
)
def test_audience_matches_exactly(keys: Keys, aud: object, accepted: bool) -> None:
    verify = verifier(keys.config(audience=AUDIENCE), token_cache_size=0)
    token = make_token(keys.jwt_secret, claims_at(aud=aud))
    if accepted:
        assert verify.verify(token).claims["aud"] == aud
    else:
        assert reason_of(verify, token) is InvalidReason.WRONG_AUDIENCE


@pytest.mark.parametrize(
    "aud", [AUDIENCE, [AUDIENCE], [], ""], ids=["string", "list", "empty-list", "empty"]
)
def test_audience_in_token_but_none_configured(keys: Keys, aud: object) -> None:
    # RFC 7519 §4.1.3: a token that names an audience we do not claim to be is refused.
    token = make_token(keys.jwt_secret, claims_at(aud=aud))
    assert reason_of(verifier(keys.config()), token) is InvalidReason.WRONG_AUDIENCE


# --- device binding -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "device",
    [
        pytest.param(b"device-other", id="another-device"),
        pytest.param(DEVICE.upper().encode(), id="case-change"),
        pytest.param(DEVICE[:-1].encode(), id="prefix"),
        pytest.param(DEVICE.encode() + b"0", id="suffix"),
        pytest.param(DEVICE.encode() + b" ", id="trailing-space"),
        pytest.param(DEVICE.encode() + b"\x00", id="trailing-nul"),
        pytest.param(b"", id="empty-header"),
        pytest.param(b"\xff\xfe", id="non-ascii"),
    ],
)
@pytest.mark.parametrize("cache", [0, 100], ids=["no-cache", "cache"])
def test_bound_token_on_another_device(keys: Keys, device: bytes, cache: int) -> None:
    verify = verifier(keys.config(), token_cache_size=cache)
    token = make_token(keys.jwt_secret, claims_at(instance_id=DEVICE))
    assert verify.verify(token, DEVICE.encode()).instance_id == DEVICE  # warms the cache
    assert reason_of(verify, token, device) is InvalidReason.WRONG_DEVICE


@pytest.mark.parametrize("cache", [0, 100], ids=["no-cache", "cache"])
def test_bound_token_without_device_header(keys: Keys, cache: int) -> None:
    verify = verifier(keys.config(), token_cache_size=cache)
    token = make_token(keys.jwt_secret, claims_at(instance_id=DEVICE))
    for _ in range(2):  # uncached, then (when enabled) cached
        with pytest.raises(InvalidRequest) as excinfo:
            verify.verify(token, None)
        assert excinfo.value.status_code == 400
        assert str(excinfo.value) == "The token is bound to a device; send the device header."


def test_non_ascii_instance_id_binds_to_its_utf8_bytes(keys: Keys) -> None:
    token = make_token(keys.jwt_secret, claims_at(instance_id="appareil-é"))
    verify = verifier(keys.config(), token_cache_size=0)
    assert verify.verify(token, "appareil-é".encode()).instance_id == "appareil-é"
    assert reason_of(verify, token, "appareil-é".encode("latin-1")) is InvalidReason.WRONG_DEVICE


@pytest.mark.parametrize(
    ("instance_id", "device"),
    [
        pytest.param("", b"", id="empty-string"),
        pytest.param(123, b"123", id="int-no-str-coercion"),
        pytest.param(1.5, b"1.5", id="float"),
        pytest.param(True, b"True", id="bool"),
        pytest.param(["device-1"], b"device-1", id="list"),
        pytest.param({"id": "device-1"}, b"device-1", id="object"),
    ],
)
def test_instance_id_must_be_a_non_empty_string(
    keys: Keys, instance_id: object, device: bytes
) -> None:
    token = make_token(keys.jwt_secret, claims_at(instance_id=instance_id))
    assert reason_of(verifier(keys.config()), token, device) is InvalidReason.BAD_CLAIMS


def test_null_instance_id_is_refused(keys: Keys) -> None:
    claims = claims_at()
    claims["instance_id"] = None
    token = make_token(keys.jwt_secret, claims)
    assert reason_of(verifier(keys.config()), token, b"None") is InvalidReason.BAD_CLAIMS


def test_require_device_binding(keys: Keys) -> None:
    verify = verifier(keys.config(require_device_binding=True))
    generic = make_token(keys.jwt_secret, claims_at())
    assert reason_of(verify, generic) is InvalidReason.UNBOUND
    assert reason_of(verify, generic, b"device-1") is InvalidReason.UNBOUND
    bound = make_token(keys.jwt_secret, claims_at(instance_id=DEVICE))
    assert verify.verify(bound, DEVICE.encode()).instance_id == DEVICE


# --- key rotation ---------------------------------------------------------------------------


def test_rotation_every_secret_verifies(keys: Keys) -> None:
    old = "old-secret-" + "o" * 32
    older = "older-secret-" + "p" * 32
    verify = verifier(GateConfig(jwt_secret=[keys.jwt_secret, old, older]), token_cache_size=0)
    for secret in (keys.jwt_secret, old, older):
        token = make_token(secret, claims_at(jti=secret[:5]))
        assert verify.verify(token).claims["jti"] == secret[:5]
    retired = make_token("retired-secret-" + "q" * 32, claims_at())
    assert reason_of(verify, retired) is InvalidReason.BAD_SIGNATURE


def test_rotation_first_secret_signs(keys: Keys) -> None:
    old = "old-secret-" + "o" * 32
    issued = TokenIssuer(GateConfig(jwt_secret=[keys.jwt_secret, old]), clock=Clock()).issue()
    principal = verifier(GateConfig(jwt_secret=keys.jwt_secret)).verify(issued.access_token)
    assert dict(principal.claims) == dict(issued.claims)
    # The header names the key that signed: without it, no key is tried.
    only_old = verifier(GateConfig(jwt_secret=old))
    assert reason_of(only_old, issued.access_token) is InvalidReason.UNKNOWN_KEY


def test_changing_the_secret_invalidates_tokens(keys: Keys) -> None:
    token = make_token(keys.jwt_secret, claims_at())
    rotated = keys.config().replace(jwt_secret="a-brand-new-secret-" + "n" * 32)
    assert reason_of(verifier(rotated), token) is InvalidReason.BAD_SIGNATURE


# --- the verified-token cache ---------------------------------------------------------------


def test_refused_tokens_are_not_cached(keys: Keys) -> None:
    verify = verifier(keys.config())
    for token in (
        make_token("x" * 40, claims_at()),
        make_token(keys.jwt_secret, claims_at(exp="soon")),
        "not-a-token",
    ):
        with pytest.raises(InvalidToken):
            verify.verify(token)
    assert verify.cache_size == 0


def test_cache_is_bounded_and_clearable(keys: Keys) -> None:
    verify = verifier(keys.config(), token_cache_size=2)
    tokens = [make_token(keys.jwt_secret, claims_at(jti=f"j-{n}")) for n in range(3)]
    for token in tokens:
        verify.verify(token)
    assert verify.cache_size == 2
    verify.clear_cache()
    assert verify.cache_size == 0
    assert verify.verify(tokens[0]).claims["jti"] == "j-0"


def test_cache_disabled(keys: Keys) -> None:
    verify = verifier(keys.config(), token_cache_size=0)
    verify.verify(make_token(keys.jwt_secret, claims_at()))
    assert verify.cache_size == 0


def test_huge_tokens_are_not_cached(keys: Keys) -> None:
    verify = verifier(keys.config())
    token = make_token(keys.jwt_secret, claims_at(padding="p" * MAX_CACHED_TOKEN_BYTES))
    assert len(token) > MAX_CACHED_TOKEN_BYTES
    assert verify.verify(token).claims["padding"] == "p" * MAX_CACHED_TOKEN_BYTES
    assert verify.cache_size == 0


def test_a_header_seen_before_decides_nothing_alone(keys: Keys) -> None:
    # Every token's header is remembered once checked; the signature and claims of each token
    # are still checked in full, and a header that broke a rule is refused every time.
    verify = verifier(keys.config(), token_cache_size=0)
    header = {"alg": "HS256", "typ": "JWT", "kid": derive_kid(keys.jwt_secret.encode())}
    assert verify.verify(make_token(keys.jwt_secret, claims_at(), header=header))
    forged = make_token("f" * 40, claims_at(), header=header)
    expired = make_token(keys.jwt_secret, claims_at(now=NOW - 600), header=header)
    bad = {"alg": "HS256", "crit": ["exp"]}
    for _ in range(2):
        assert reason_of(verify, forged) is InvalidReason.BAD_SIGNATURE
        assert reason_of(verify, expired) is InvalidReason.EXPIRED
        assert reason_of(verify, make_token(keys.jwt_secret, header=bad)) is (
            InvalidReason.BAD_HEADER
        )


def test_a_flood_of_headers_is_remembered_within_a_bound(keys: Keys) -> None:
    verify = verifier(keys.config(), token_cache_size=0)
    for n in range(1000):
        header = {"alg": "HS256", "typ": "JWT", "x": n}  # another header every time
        assert verify.verify(make_token(keys.jwt_secret, claims_at(), header=header))
    assert len(verify._headers) <= 64


def test_cached_principal_is_the_same(keys: Keys) -> None:
    verify = verifier(keys.config())
    token = make_token(keys.jwt_secret, claims_at(instance_id=DEVICE))
    first = verify.verify(token, DEVICE.encode())
    assert verify.verify(token, DEVICE.encode()) is first


# --- issuing --------------------------------------------------------------------------------


def decode_segment(segment: str) -> Any:
    return json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))


def test_issue_generic_token(keys: Keys) -> None:
    issued = TokenIssuer(keys.config(), clock=Clock(NOW + 0.9)).issue()
    assert issued.token_type == "Bearer"
    assert issued.expires_in == 300
    assert issued.instance_id is None
    claims = dict(issued.claims)
    assert set(claims) == {"iat", "exp", "jti"}
    assert claims["iat"] == NOW  # whole seconds (RFC 7519 NumericDate, as an integer)
    assert claims["exp"] == NOW + 300
    header_segment, payload_segment, _ = issued.access_token.split(".")
    assert decode_segment(header_segment) == {
        "alg": "HS256",
        "kid": derive_kid(keys.jwt_secret.encode()),
        "typ": "JWT",
    }
    assert decode_segment(payload_segment) == claims


def test_issue_bound_token_with_issuer_and_audience(keys: Keys) -> None:
    config = keys.config(jwt_expire_seconds=60, issuer=ISSUER, audience=AUDIENCE)
    issued = TokenIssuer(config, clock=Clock()).issue(DEVICE)
    assert issued.instance_id == DEVICE
    assert issued.expires_in == 60
    assert dict(issued.claims) == {
        "iat": NOW,
        "exp": NOW + 60,
        "jti": issued.claims["jti"],
        "instance_id": DEVICE,
        "iss": ISSUER,
        "aud": AUDIENCE,
    }
    assert issued.as_response() == {
        "access_token": issued.access_token,
        "token_type": "Bearer",
        "expires_in": 60,
        "instance_id": DEVICE,
    }


def test_issued_jti_is_128_random_bits(keys: Keys) -> None:
    issuer = TokenIssuer(keys.config(), clock=Clock())
    jtis = [issuer.issue().claims["jti"] for _ in range(50)]
    assert len(set(jtis)) == 50
    for jti in jtis:
        assert isinstance(jti, str)
        assert len(base64.urlsafe_b64decode(jti + "=" * (-len(jti) % 4))) == 16


def test_issued_token_verifies_for_its_lifetime(keys: Keys) -> None:
    clock = Clock()
    config = keys.config(issuer=ISSUER, audience=AUDIENCE)
    issued = TokenIssuer(config, clock=clock).issue(DEVICE)
    verify = verifier(config, clock, token_cache_size=0)
    principal = verify.verify(issued.access_token, DEVICE.encode())
    assert principal.instance_id == DEVICE
    assert dict(principal.claims) == dict(issued.claims)
    clock.now = NOW + 299
    assert verify.verify(issued.access_token, DEVICE.encode()).instance_id == DEVICE
    clock.now = NOW + 300
    assert reason_of(verify, issued.access_token, DEVICE.encode()) is InvalidReason.EXPIRED


def test_issued_claims_are_read_only(keys: Keys) -> None:
    issued = TokenIssuer(keys.config(), clock=Clock()).issue()
    with pytest.raises(TypeError):
        issued.claims["exp"] = NOW + 10**9  # type: ignore[index]


def test_issued_token_repr_hides_the_token(keys: Keys) -> None:
    issued = TokenIssuer(keys.config(), clock=Clock()).issue(DEVICE)
    _, payload, signature = issued.access_token.split(".")
    for text in (repr(issued), str(issued)):
        assert issued.access_token not in text
        assert signature not in text
        assert payload not in text
        assert str(issued.claims["jti"]) not in text
        assert DEVICE in text  # the device id is not a secret
        assert "expires_in=300" in text


def test_issuer_repr_hides_the_secret(keys: Keys) -> None:
    issuer = TokenIssuer(keys.config(), clock=Clock())
    assert keys.jwt_secret not in repr(issuer)
    assert repr(issuer) == "<TokenIssuer lifetime=300s>"


def test_issuer_needs_a_jwt_secret(keys: Keys) -> None:
    with pytest.raises(ConfigError) as excinfo:
        TokenIssuer(GateConfig(api_keys=keys.api_key))
    assert excinfo.value.field == "jwt_secret"
    assert keys.api_key not in str(excinfo.value)


def test_issuer_requires_binding_when_configured(keys: Keys) -> None:
    issuer = TokenIssuer(keys.config(require_device_binding=True), clock=Clock())
    assert issuer.requires_binding is True
    with pytest.raises(ValueError, match="requires device binding"):
        issuer.issue()
    assert issuer.issue(DEVICE).instance_id == DEVICE
    assert TokenIssuer(keys.config()).requires_binding is False


VALID_INSTANCE_IDS = [
    "a",
    "x" * 256,
    "device 1",
    "0f8fad5b-d9cb-469f-a165-70867728950e",
    "!#$%&'()*+,-./:;<=>?@[]^_`{|}~",
]


@pytest.mark.parametrize("instance_id", VALID_INSTANCE_IDS)
def test_valid_instance_ids(keys: Keys, instance_id: str) -> None:
    assert validate_instance_id(instance_id) == instance_id
    issued = TokenIssuer(keys.config(), clock=Clock()).issue(instance_id)
    assert issued.claims["instance_id"] == instance_id
    principal = verifier(keys.config()).verify(issued.access_token, instance_id.encode())
    assert principal.instance_id == instance_id


@pytest.mark.parametrize(
    "instance_id", [*INVALID_INSTANCE_IDS, pytest.param(b"device", id="bytes")]
)
def test_invalid_instance_ids(keys: Keys, instance_id: object) -> None:
    with pytest.raises(ValueError, match="instance_id"):
        validate_instance_id(instance_id)
    with pytest.raises(ValueError, match="instance_id"):
        TokenIssuer(keys.config(), clock=Clock()).issue(cast(Any, instance_id))


# --- interoperability with PyJWT ------------------------------------------------------------


def test_pyjwt_token_verifies(keys: Keys) -> None:
    now = int(time.time())
    token = jwt.encode(
        {"iat": now, "exp": now + 300, "instance_id": DEVICE, "jti": "abc"},
        keys.jwt_secret,
        algorithm="HS256",
    )
    principal = TokenVerifier(keys.config()).verify(token, DEVICE.encode())
    assert principal.instance_id == DEVICE
    assert principal.claims["jti"] == "abc"


def test_pyjwt_token_with_datetimes_iss_aud_and_kid_verifies(keys: Keys) -> None:
    now = datetime.now(tz=timezone.utc)
    token = jwt.encode(
        {
            "iat": now,
            "nbf": now - timedelta(seconds=5),
            "exp": now + timedelta(minutes=5),
            "iss": ISSUER,
            "aud": [AUDIENCE, "other"],
            "instance_id": DEVICE,
        },
        keys.jwt_secret,
        algorithm="HS256",
        headers={"kid": "2024-rotation"},
    )
    # The kid selects the secret named so.
    config = GateConfig(
        jwt_secret={"2024-rotation": keys.jwt_secret}, issuer=ISSUER, audience=AUDIENCE
    )
    principal = TokenVerifier(config).verify(token, DEVICE.encode())
    assert principal.claims["aud"] == [AUDIENCE, "other"]
    assert principal.claims["exp"] == int((now + timedelta(minutes=5)).timestamp())


def test_pyjwt_token_with_old_rotated_secret_verifies(keys: Keys) -> None:
    old = "old-secret-" + "o" * 32
    exp = int(time.time()) + 60
    token = jwt.encode({"exp": exp}, old, algorithm="HS256")
    principal = TokenVerifier(GateConfig(jwt_secret=[keys.jwt_secret, old])).verify(token)
    assert dict(principal.claims) == {"exp": exp}


def test_pyjwt_token_with_another_secret_is_refused(keys: Keys) -> None:
    token = jwt.encode({"exp": int(time.time()) + 60}, "z" * 40, algorithm="HS256")
    with pytest.raises(InvalidToken) as excinfo:
        TokenVerifier(keys.config()).verify(token)
    assert excinfo.value.reason is InvalidReason.BAD_SIGNATURE


@pytest.mark.parametrize("instance_id", [None, DEVICE])
def test_minted_token_verifies_with_pyjwt(keys: Keys, instance_id: str | None) -> None:
    config = keys.config(issuer=ISSUER, audience=AUDIENCE)
    issued = TokenIssuer(config).issue(instance_id)
    decoded = jwt.decode(
        issued.access_token,
        keys.jwt_secret,
        algorithms=["HS256"],
        audience=AUDIENCE,
        issuer=ISSUER,
        options={"require": ["exp", "iat", "jti"]},
    )
    assert decoded == dict(issued.claims)
    assert decoded.get("instance_id") == instance_id
    assert jwt.get_unverified_header(issued.access_token) == {
        "alg": "HS256",
        "kid": derive_kid(keys.jwt_secret.encode()),
        "typ": "JWT",
    }


def test_minted_token_refused_by_pyjwt_with_another_secret(keys: Keys) -> None:
    issued = TokenIssuer(keys.config()).issue(DEVICE)
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(issued.access_token, "w" * 40, algorithms=["HS256"])


def test_device_id_may_be_given_as_str(keys: Keys) -> None:
    verifier = TokenVerifier(keys.config())
    token = make_token(keys.jwt_secret, instance_id="device-7")
    assert verifier.verify(token, "device-7").instance_id == "device-7"
    with pytest.raises(InvalidToken) as excinfo:
        verifier.verify(token, "device-e")
    assert excinfo.value.reason is InvalidReason.WRONG_DEVICE


@pytest.mark.parametrize("cache", [0, 100])
def test_a_str_device_id_is_the_header_as_frameworks_decode_it(keys: Keys, cache: int) -> None:
    # The client sends UTF-8 bytes; Starlette and Django hand views the header decoded as
    # Latin-1. verify() must decide on those bytes, exactly as the middleware does.
    sent = "appareil-é".encode()
    as_a_view_sees_it = sent.decode("latin-1")
    bound_to_sent = make_token(keys.jwt_secret, claims_at(instance_id="appareil-é"))
    # A token bound to the mojibake must not match the bytes that decode to it.
    bound_to_mojibake = make_token(keys.jwt_secret, claims_at(instance_id=as_a_view_sees_it))
    verify = verifier(keys.config(), token_cache_size=cache)
    for _ in range(2):
        assert verify.verify(bound_to_sent, as_a_view_sees_it).instance_id == "appareil-é"
        assert verify.check(bound_to_sent.encode(), sent).instance_id == "appareil-é"
        assert reason_of(verify, bound_to_mojibake, sent) is InvalidReason.WRONG_DEVICE
        with pytest.raises(InvalidToken) as excinfo:
            verify.verify(bound_to_mojibake, as_a_view_sees_it)
        assert excinfo.value.reason is InvalidReason.WRONG_DEVICE


@pytest.mark.parametrize(
    ("instance_id", "device"),
    [("appareil-\u20ac", "appareil-\u20ac"), ("dev-x", "dev-\udcff")],
    ids=["beyond-latin-1", "lone-surrogate"],
)
def test_a_str_device_id_no_header_can_carry_is_a_wrong_device(
    keys: Keys, instance_id: str, device: str
) -> None:
    # No header byte decodes to these characters, so no request could carry this device id:
    # refused as a wrong device, never an encoding error escaping the verifier.
    token = make_token(keys.jwt_secret, claims_at(instance_id=instance_id))
    with pytest.raises(InvalidToken) as excinfo:
        verifier(keys.config()).verify(token, device)
    assert excinfo.value.reason is InvalidReason.WRONG_DEVICE
