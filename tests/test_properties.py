"""Property-based tests of the verification core (hypothesis).

* Random header lists: reading and checking credentials raises nothing but devicegate's
  ``AuthError`` subclasses, and whatever is accepted really carried the exact credential.
* Random byte mutations of a valid token are always refused, unless they leave it identical.
* Differential: any token this verifier accepts, PyJWT accepts too, with the same claims.
* Differential: base64url decodes exactly the canonical texts the standard library would.
"""

from __future__ import annotations

import base64
import string
import time
from dataclasses import dataclass
from typing import Any

import jwt
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from devicegate import AuthError, CredentialKind, GateConfig, InvalidToken, TokenVerifier
from devicegate import _base64url as base64url
from devicegate._auth import Authenticator
from devicegate._credentials import read_credential
from tests.helpers import NOW, Clock, make_token

SECRET = "property-tests-jwt-secret-0123456789abcdef"
API_KEY = "property-tests-api-key-0123456789"
MOBILE_KEY = "property-tests-mobile-key-0123456789"
DEVICE = "device-31b7"
ISSUER = "https://issuer.example"
AUDIENCE = "mobile-api"

CONFIG = GateConfig(api_keys=API_KEY, mobile_api_keys=MOBILE_KEY, jwt_secret=SECRET)
CONFIG_WITH_ISS_AUD = CONFIG.replace(issuer=ISSUER, audience=AUDIENCE)

# Real time: the Authenticator builds its own verifier on the system clock.
_IMPORT_TIME = int(time.time())
GENERIC_TOKEN = make_token(SECRET, {"iat": _IMPORT_TIME, "exp": _IMPORT_TIME + 3600}).encode()
BOUND_TOKEN = make_token(
    SECRET, {"iat": _IMPORT_TIME, "exp": _IMPORT_TIME + 3600, "instance_id": DEVICE}
).encode()
# Fixed time, for the mutation tests.
FIXED_TOKEN = make_token(SECRET, {"iat": NOW, "exp": NOW + 300, "instance_id": DEVICE}).encode()

BASE64URL = (string.ascii_letters + string.digits + "-_").encode()

SETTINGS = settings(max_examples=300, deadline=None)


# --- random header lists --------------------------------------------------------------------

NAMES = st.one_of(
    st.sampled_from(
        [
            b"authorization",
            b"x-api-key",
            b"x-instance-id",
            b"proxy-authorization",
            b"cookie",
            b"x-api-key-2",
        ]
    ),
    st.binary(max_size=16),
)
FRAGMENTS = st.sampled_from(
    [
        b"Bearer ",
        b"bearer ",
        b"BEARER",
        b"Basic ",
        b" ",
        b"\t",
        b".",
        b"=",
        b"\x00",
        b"\xff",
        API_KEY.encode(),
        MOBILE_KEY.encode(),
        SECRET.encode(),
        GENERIC_TOKEN,
        BOUND_TOKEN,
        DEVICE.encode(),
    ]
)
VALUES = st.lists(st.one_of(FRAGMENTS, st.binary(max_size=12)), max_size=4).map(b"".join)
HEADER_LISTS = st.lists(st.tuples(NAMES, VALUES), max_size=6)

AUTHENTICATOR = Authenticator(CONFIG)


def values_of(headers: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [value for header, value in headers if header == name]


@SETTINGS
@given(HEADER_LISTS)
@example([(b"x-api-key", API_KEY.encode())])
@example([(b"authorization", MOBILE_KEY.encode()), (b"x-instance-id", b"any")])
@example([(b"authorization", b"Bearer " + GENERIC_TOKEN)])
@example([(b"x-instance-id", DEVICE.encode()), (b"authorization", b"bEaReR " + BOUND_TOKEN)])
def test_random_headers_are_refused_or_carry_the_exact_credential(
    headers: list[tuple[bytes, bytes]],
) -> None:
    try:
        kind, _, _, _ = read_credential(headers, b"x-api-key", b"x-instance-id")
    except AuthError:
        kind = None
    try:
        principal = AUTHENTICATOR.authenticate({"headers": headers})
    except AuthError:
        return
    # Accepted: the request held exactly one credential, exactly right, in the right place.
    authorization = values_of(headers, b"authorization")
    api_keys = values_of(headers, b"x-api-key")
    devices = values_of(headers, b"x-instance-id")
    assert principal.kind is kind
    assert len(devices) <= 1
    if principal.kind is CredentialKind.API_KEY:
        assert (api_keys, authorization) == ([API_KEY.encode()], [])
    elif principal.kind is CredentialKind.MOBILE_API_KEY:
        assert (api_keys, authorization) == ([], [MOBILE_KEY.encode()])
    else:
        assert api_keys == []
        assert len(authorization) == 1
        scheme, token = authorization[0].split(b" ")
        assert scheme.lower() == b"bearer"
        assert token in (GENERIC_TOKEN, BOUND_TOKEN)
        if token == BOUND_TOKEN:
            assert devices == [DEVICE.encode()]
            assert principal.instance_id == DEVICE
        else:
            assert principal.instance_id is None


# --- mutated tokens -------------------------------------------------------------------------

MUTATIONS = st.lists(
    st.tuples(
        st.sampled_from(["replace", "insert", "delete", "truncate", "swap"]),
        st.integers(min_value=0, max_value=len(FIXED_TOKEN)),
        st.one_of(st.sampled_from(list(BASE64URL + b".=+/")), st.integers(0, 255)),
    ),
    min_size=1,
    max_size=4,
)


def mutate(token: bytes, mutations: list[tuple[str, int, int]]) -> bytes:
    data = bytearray(token)
    for operation, position, byte in mutations:
        index = position % (len(data) or 1)
        if operation == "replace" and data:
            data[index] = byte
        elif operation == "insert":
            data.insert(min(position, len(data)), byte)
        elif operation == "delete" and data:
            del data[index]
        elif operation == "truncate":
            del data[min(position, len(data)) :]
        elif operation == "swap" and len(data) > 1:
            other = (index + 1) % len(data)
            data[index], data[other] = data[other], data[index]
    return bytes(data)


@settings(max_examples=600, deadline=None)
@given(MUTATIONS)
@example([("replace", 0, FIXED_TOKEN[0])])  # a mutation that changes nothing
@example([("swap", len(FIXED_TOKEN) - 2, 0)])
def test_mutated_tokens_are_refused(mutations: list[tuple[str, int, int]]) -> None:
    verifier = TokenVerifier(CONFIG, clock=Clock())
    mutated = mutate(FIXED_TOKEN, mutations)
    if mutated == FIXED_TOKEN:
        assert verifier.verify(mutated, DEVICE.encode()).instance_id == DEVICE
        return
    with pytest.raises(InvalidToken):
        verifier.verify(mutated, DEVICE.encode())
    # Also as text, when it is text.
    try:
        text = mutated.decode("ascii")
    except UnicodeDecodeError:
        return
    with pytest.raises(InvalidToken):
        verifier.verify(text, DEVICE.encode())


@SETTINGS
@given(st.one_of(st.binary(max_size=400), st.text(max_size=400)), st.none() | st.binary())
def test_arbitrary_input_raises_only_auth_errors(token: bytes | str, device: bytes | None) -> None:
    with pytest.raises(AuthError):
        TokenVerifier(CONFIG, clock=Clock()).verify(token, device)


# --- signed tokens with arbitrary claims: the differential test against PyJWT ---------------


@dataclass(frozen=True)
class Offset:
    """A time claim relative to the moment of the test, resolved just before signing."""

    seconds: int


JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
    st.text(max_size=8),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=3), st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=8,
)
# Far enough from "now" that the two verifications cannot straddle a boundary.
TIMES = st.one_of(
    st.sampled_from([-(10**9), -86400, -121, 121, 3600, 10**9]).map(Offset), JSON_VALUES
)
ABSENT = object()

# Good values for the optional claims and header fields; each example starts from a valid token
# and then overwrites up to two of them with anything (or removes them), so that both accepted
# and refused tokens are frequent.
GOOD_CLAIMS: dict[str, st.SearchStrategy[Any]] = {
    "nbf": st.sampled_from([-121, -86400]).map(Offset),
    "iat": st.sampled_from([-121, -86400]).map(Offset),
    "iss": st.just(ISSUER),
    "aud": st.sampled_from([AUDIENCE, [AUDIENCE], ["other", AUDIENCE]]),
    "instance_id": st.sampled_from([DEVICE, "x" * 256]),
    "jti": st.text(max_size=20),
    "sub": st.text(max_size=20),
}
BAD_CLAIMS: dict[str, st.SearchStrategy[Any]] = {
    "exp": TIMES,
    "nbf": TIMES,
    "iat": TIMES,
    "iss": st.sampled_from([ISSUER + "/", [ISSUER], ""]) | JSON_VALUES,
    "aud": st.sampled_from([AUDIENCE + "x", [], [AUDIENCE, 1]]) | JSON_VALUES,
    "instance_id": st.sampled_from([DEVICE.upper(), ""]) | JSON_VALUES,
    "jti": JSON_VALUES,
    "sub": JSON_VALUES,
}
GOOD_HEADERS: dict[str, st.SearchStrategy[Any]] = {
    "typ": st.sampled_from(["JWT", "jwt"]),
    "kid": st.text(max_size=10),
}
BAD_HEADERS: dict[str, st.SearchStrategy[Any]] = {
    "typ": st.sampled_from(["at+jwt", "JWT "]) | JSON_VALUES,
    "kid": JSON_VALUES,
    "cty": JSON_VALUES,
    "jku": JSON_VALUES,
    "x-custom": JSON_VALUES,
}


@st.composite
def perturbed(
    draw: st.DrawFn,
    base: dict[str, Any],
    good: dict[str, st.SearchStrategy[Any]],
    bad: dict[str, st.SearchStrategy[Any]],
) -> dict[str, Any]:
    result = dict(base)
    for name, values in good.items():
        if draw(st.booleans()):
            result[name] = draw(values)
    for name in draw(st.lists(st.sampled_from(sorted(bad)), max_size=2, unique=True)):
        result[name] = draw(st.one_of(st.just(ABSENT), bad[name]))
    return {name: value for name, value in result.items() if value is not ABSENT}


CLAIMS = perturbed({"exp": Offset(3600)}, GOOD_CLAIMS, BAD_CLAIMS)
EXTRA_CLAIMS = st.dictionaries(st.text(max_size=6), JSON_VALUES, max_size=3)
HEADERS = perturbed({"alg": "HS256"}, GOOD_HEADERS, BAD_HEADERS)


def resolve(claims: dict[str, Any], now: int) -> dict[str, Any]:
    return {
        name: now + value.seconds if isinstance(value, Offset) else value
        for name, value in claims.items()
    }


@settings(max_examples=400, deadline=None)
@given(CLAIMS, EXTRA_CLAIMS, HEADERS, st.booleans())
@example(
    {"exp": Offset(3600), "iat": Offset(-121), "instance_id": DEVICE, "jti": "j"},
    {},
    {"alg": "HS256", "typ": "JWT"},
    False,
)
@example(
    {"exp": Offset(3600), "iss": ISSUER, "aud": ["x", AUDIENCE]},
    {"scope": ["a", 1.5]},
    {"alg": "HS256", "kid": "k"},
    True,
)
def test_accepted_here_means_accepted_by_pyjwt(
    claims: dict[str, Any], extra: dict[str, Any], header: dict[str, Any], with_iss_aud: bool
) -> None:
    config = CONFIG_WITH_ISS_AUD if with_iss_aud else CONFIG
    now = int(time.time())
    payload = {**extra, **resolve(claims, now)}
    token = make_token(SECRET, payload, header=header)
    instance_id = payload.get("instance_id")
    device = instance_id.encode() if isinstance(instance_id, str) else b"no-device"
    try:
        principal = TokenVerifier(config).verify(token, device)
    except AuthError:
        return
    decoded = jwt.decode(
        token,
        SECRET,
        algorithms=["HS256"],
        audience=config.audience,
        issuer=config.issuer,
        options={"require": ["exp"]},
    )
    assert decoded == dict(principal.claims) == payload


# --- base64url: the differential test against the standard library -------------------------


def canonical_base64url(text: bytes) -> bytes | None:
    """What RFC 7515 §2 accepts, by the standard library: the URL-safe alphabet without
    padding, and the one text the decoded bytes encode back to."""
    if any(byte not in BASE64URL for byte in text) or len(text) % 4 == 1:
        return None
    raw = base64.urlsafe_b64decode(text + b"=" * (-len(text) % 4))
    return raw if base64.urlsafe_b64encode(raw).rstrip(b"=") == text else None


@SETTINGS
@given(st.one_of(st.binary(max_size=12), st.text(BASE64URL.decode() + "+/=!", max_size=12)))
@example(b"AB")  # stray low bits: "AA" is the canonical spelling
@example(b"AA==")  # padding
@example(b"-_+/")  # the standard alphabet's two characters beside the URL-safe ones
def test_base64url_decodes_exactly_the_canonical_texts(text: bytes | str) -> None:
    raw = text.encode() if isinstance(text, str) else text
    assert base64url.decode(raw) == canonical_base64url(raw)
    assert base64url.decode(raw.decode("latin-1")) == (
        canonical_base64url(raw) if raw.isascii() else None
    )


@SETTINGS
@given(st.binary(max_size=64))
def test_base64url_round_trip(raw: bytes) -> None:
    assert base64url.decode(base64url.encode(raw)) == raw
    assert base64url.decode(base64url.encode_text(raw)) == raw
