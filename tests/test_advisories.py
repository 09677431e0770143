"""One regression test per known attack on token and key verification, named after the attack.

In the spirit of PyJWT's ``tests/test_advisory.py``: each attack class of ``SECURITY.md`` that the
verification core (no ASGI) must survive has a test here asserting the exact refusal, and that
the refused token was not remembered by the verified-token cache. Header syntax attacks are in
``test_credentials.py``; paths, websockets and the token endpoint are ASGI-level tests.

References:
    https://www.rfc-editor.org/rfc/rfc8725
    https://github.com/jpadilla/pyjwt/security/advisories
    https://cheatsheetseries.owasp.org/cheatsheets/JSON_Web_Token_for_Java_Cheat_Sheet.html
"""

from __future__ import annotations

import base64
import json
import secrets
import string
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from devicegate import (
    AuthError,
    GateConfig,
    InvalidReason,
    InvalidRequest,
    InvalidToken,
    MissingCredentials,
    TokenVerifier,
)
from devicegate._auth import Authenticator
from devicegate._json import DuplicateMember, loads_strict_json
from tests.helpers import NOW, Clock, Keys, b64url, claims_at, make_token, near_misses, sign

DEVICE = "device-4c1d"
ALPHABET = string.ascii_uppercase + string.ascii_lowercase + string.digits + "-_"
HS256 = {"alg": "HS256", "typ": "JWT"}


def valid_claims(**changes: Any) -> dict[str, Any]:
    """The claims of a genuine token bound to ``DEVICE`` (a fixed ``jti``, so that the same
    changes make the same token), then ``changes``: ``None`` stays, as JSON null."""
    return claims_at(drop_none=False, **{"jti": "j", "instance_id": DEVICE, **changes})


def assemble(secret: str | bytes, header_segment: str, payload_segment: str) -> str:
    """Sign already-encoded segments as they are (to test the decoder, not the signature)."""
    signing_input = f"{header_segment}.{payload_segment}"
    return f"{signing_input}.{sign(signing_input, secret)}"


def segment(data: object) -> str:
    return b64url(json.dumps(data).encode())


def non_canonical(encoded: str) -> str:
    """The same bytes, spelled with stray bits in the last character (RFC 4648 §3.5)."""
    spare_bits = {2: 4, 3: 2}[len(encoded) % 4]
    index = ALPHABET.index(encoded[-1])
    assert index % (1 << spare_bits) == 0  # canonical to start with
    return encoded[:-1] + ALPHABET[index | 1]


def decode(encoded: str) -> bytes:
    return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))


@pytest.fixture
def secret(keys: Keys) -> str:
    return keys.jwt_secret


@pytest.fixture
def verifier(keys: Keys) -> Iterator[TokenVerifier]:
    verify = TokenVerifier(keys.config(), clock=Clock())
    yield verify
    # Whatever a test did, a refused token never made it into the cache.
    assert verify.cache_size == 0


def refused(
    verifier: TokenVerifier, token: str | bytes, device: bytes | None = DEVICE.encode()
) -> InvalidReason:
    with pytest.raises(InvalidToken) as excinfo:
        verifier.verify(token, device)
    assert verifier.cache_size == 0
    return excinfo.value.reason


def refused_twice(verifier: TokenVerifier, token: str, device: bytes | None) -> AuthError:
    """Refused on first sight and again from the cache (a genuine token is cached before its
    device is compared: the device check runs on every request)."""
    errors: list[AuthError] = []
    for _ in range(2):
        with pytest.raises(AuthError) as excinfo:
            verifier.verify(token, device)
        errors.append(excinfo.value)
    assert type(errors[0]) is type(errors[1])
    verifier.clear_cache()
    return errors[0]


def test_control_a_valid_token_is_accepted(keys: Keys, secret: str) -> None:
    # The baseline every attack below is a variation of.
    verify = TokenVerifier(keys.config(), clock=Clock())
    token = make_token(secret, valid_claims(), header=HS256)
    assert verify.verify(token, DEVICE.encode()).instance_id == DEVICE


# --- signature and algorithm ----------------------------------------------------------------

NONE_SPELLINGS = ["none", "None", "NONE", "nOnE", "NoNe", "none ", " none", "none\x00"]


@pytest.mark.parametrize("alg", NONE_SPELLINGS)
def test_alg_none_unsigned(verifier: TokenVerifier, secret: str, alg: str) -> None:
    # CVE-2015-9235 and friends: an unsigned token that declares no algorithm.
    header, payload, _ = make_token(secret, valid_claims(), header={"alg": alg}).split(".")
    assert refused(verifier, f"{header}.{payload}.") is InvalidReason.MALFORMED
    assert refused(verifier, f"{header}.{payload}") is InvalidReason.MALFORMED


@pytest.mark.parametrize("alg", NONE_SPELLINGS)
def test_alg_none_with_a_valid_hmac(verifier: TokenVerifier, secret: str, alg: str) -> None:
    # Even correctly signed, a token that names another algorithm is not ours (RFC 8725 §3.1).
    token = make_token(secret, valid_claims(), header={"alg": alg, "typ": "JWT"})
    assert refused(verifier, token) is InvalidReason.UNSUPPORTED_ALGORITHM


@pytest.mark.parametrize(
    "header",
    [
        pytest.param({"typ": "JWT"}, id="missing"),
        pytest.param({"alg": None}, id="null"),
        pytest.param({"alg": ""}, id="empty"),
        pytest.param({"alg": "hs256"}, id="lower-case"),
        pytest.param({"alg": "HS256 "}, id="trailing-space"),
        pytest.param({"alg": ["HS256"]}, id="list"),
        pytest.param({"alg": {"name": "HS256"}}, id="object"),
        pytest.param({"alg": 256}, id="number"),
    ],
)
def test_alg_missing_or_misspelled(
    verifier: TokenVerifier, secret: str, header: dict[str, Any]
) -> None:
    token = make_token(secret, valid_claims(), header=header)
    assert refused(verifier, token) is InvalidReason.UNSUPPORTED_ALGORITHM


def test_null_signature(verifier: TokenVerifier, secret: str) -> None:
    header, payload, _ = make_token(secret, valid_claims()).split(".")
    assert refused(verifier, f"{header}.{payload}.") is InvalidReason.MALFORMED
    zero = b64url(bytes(32))
    assert refused(verifier, f"{header}.{payload}.{zero}") is InvalidReason.BAD_SIGNATURE
    assert refused(verifier, f"{header}.{payload}.{'A' * 43}") is InvalidReason.BAD_SIGNATURE


@pytest.mark.parametrize("keep", [42, 41, 22, 1], ids=lambda n: f"{n}-characters")
def test_truncated_signature(verifier: TokenVerifier, secret: str, keep: int) -> None:
    # A verifier that compares only a prefix of the MAC can be forged byte by byte.
    header, payload, signature = make_token(secret, valid_claims()).split(".")
    token = f"{header}.{payload}.{signature[:keep]}"
    assert refused(verifier, token) is InvalidReason.MALFORMED


def test_extended_signature(verifier: TokenVerifier, secret: str) -> None:
    token = make_token(secret, valid_claims())
    assert refused(verifier, token + "A") is InvalidReason.MALFORMED
    assert refused(verifier, token + token.rsplit(".", 1)[1]) is InvalidReason.MALFORMED


def test_signature_from_another_token(verifier: TokenVerifier, secret: str) -> None:
    mine = make_token(secret, valid_claims(instance_id="attacker-device"))
    theirs = make_token(secret, valid_claims())
    spliced = theirs.rsplit(".", 1)[0] + "." + mine.rsplit(".", 1)[1]
    assert refused(verifier, spliced) is InvalidReason.BAD_SIGNATURE


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"instance_id": "attacker-device"}, id="instance-id"),
        pytest.param({"exp": NOW + 10**8}, id="exp"),
        pytest.param({"instance_id": None}, id="unbind"),
        pytest.param({"scope": "admin"}, id="extra-claim"),
    ],
)
def test_tampered_payload(verifier: TokenVerifier, secret: str, change: dict[str, Any]) -> None:
    header, _, signature = make_token(secret, valid_claims()).split(".")
    claims = {k: v for k, v in valid_claims(**change).items() if v is not None}
    token = f"{header}.{segment(claims)}.{signature}"
    assert refused(verifier, token, b"attacker-device") is InvalidReason.BAD_SIGNATURE


def test_tampered_header(verifier: TokenVerifier, secret: str) -> None:
    _, payload, signature = make_token(secret, valid_claims(), header=HS256).split(".")
    token = f"{segment({'alg': 'HS256', 'typ': 'JWT', 'x': 'y'})}.{payload}.{signature}"
    assert refused(verifier, token) is InvalidReason.BAD_SIGNATURE


@pytest.mark.parametrize(
    "wrong",
    [
        pytest.param(lambda k: secrets.token_urlsafe(32), id="random"),
        pytest.param(lambda k: k.jwt_secret + "x", id="suffix"),
        pytest.param(lambda k: k.jwt_secret[:-1], id="prefix"),
        pytest.param(lambda k: k.jwt_secret.swapcase(), id="case"),
        # Key separation: holders of an API key cannot mint tokens.
        pytest.param(lambda k: k.api_key, id="server-api-key"),
        pytest.param(lambda k: k.mobile_api_key, id="mobile-api-key"),
    ],
)
def test_wrong_key(verifier: TokenVerifier, keys: Keys, wrong: Any) -> None:
    token = make_token(wrong(keys), valid_claims())
    assert refused(verifier, token) is InvalidReason.BAD_SIGNATURE


@pytest.mark.parametrize("empty", ["", b""], ids=["str", "bytes"])
def test_empty_key(verifier: TokenVerifier, empty: str | bytes) -> None:
    token = make_token(empty, valid_claims())
    assert refused(verifier, token) is InvalidReason.BAD_SIGNATURE


@pytest.mark.parametrize(
    ("alg", "digest", "reason"),
    [
        # The header names another HMAC and the MAC is of that length: not even well formed.
        pytest.param("HS384", "sha384", InvalidReason.MALFORMED, id="hs384"),
        pytest.param("HS512", "sha512", InvalidReason.MALFORMED, id="hs512"),
        # The header names another HMAC over a 32-byte MAC: the header decides nothing.
        pytest.param("HS384", "sha256", InvalidReason.UNSUPPORTED_ALGORITHM, id="hs384-header"),
        pytest.param("HS512", "sha256", InvalidReason.UNSUPPORTED_ALGORITHM, id="hs512-header"),
        # The header says HS256 but the MAC is another one.
        pytest.param("HS256", "sha384", InvalidReason.MALFORMED, id="hs256-with-sha384"),
        pytest.param("HS256", "sha512", InvalidReason.MALFORMED, id="hs256-with-sha512"),
        pytest.param("HS256", "sha1", InvalidReason.MALFORMED, id="hs256-with-sha1"),
        pytest.param("HS256", "sha3_256", InvalidReason.BAD_SIGNATURE, id="hs256-with-sha3"),
        pytest.param("HS256", "blake2s", InvalidReason.BAD_SIGNATURE, id="hs256-with-blake2s"),
    ],
)
def test_other_hmac_algorithms(
    verifier: TokenVerifier, secret: str, alg: str, digest: str, reason: InvalidReason
) -> None:
    token = make_token(secret, valid_claims(), header={"alg": alg, "typ": "JWT"}, digest=digest)
    assert refused(verifier, token) is reason


@pytest.mark.parametrize(
    "alg", ["RS256", "RS512", "PS256", "ES256", "ES256K", "ES512", "EdDSA", "Ed25519", "RSA-OAEP"]
)
def test_asymmetric_algorithms(verifier: TokenVerifier, secret: str, alg: str) -> None:
    # A well-formed 32-byte MAC under an asymmetric header: refused on the header alone.
    token = make_token(secret, valid_claims(), header={"alg": alg, "typ": "JWT"})
    assert refused(verifier, token) is InvalidReason.UNSUPPORTED_ALGORITHM
    # A signature of RSA or ECDSA length is not even the right shape.
    header, payload, _ = token.split(".")
    for size in (64, 256, 512):
        forged = f"{header}.{payload}.{b64url(secrets.token_bytes(size))}"
        assert refused(verifier, forged) is InvalidReason.MALFORMED


def test_algorithm_confusion_public_key_as_hmac_secret(verifier: TokenVerifier) -> None:
    # CVE-2022-29217: HS256 "signed" with a public key the attacker can read.
    public_key = (
        "-----BEGIN PUBLIC KEY-----\n"
        "MCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=\n"
        "-----END PUBLIC KEY-----\n"
    )
    token = make_token(public_key, valid_claims(), header=HS256)
    assert refused(verifier, token) is InvalidReason.BAD_SIGNATURE


ATTACKER_KEY = b"attacker-chosen-key-0123456789abcdef"


@pytest.mark.parametrize(
    "pointer",
    [
        pytest.param({"jwk": {"kty": "oct", "k": b64url(ATTACKER_KEY)}}, id="jwk"),
        pytest.param({"jku": "https://attacker.example/jwks.json"}, id="jku"),
        pytest.param({"x5u": "https://attacker.example/cert.pem"}, id="x5u"),
        pytest.param({"x5c": [base64.b64encode(ATTACKER_KEY).decode()]}, id="x5c"),
        pytest.param({"x5t": b64url(b"thumbprint")}, id="x5t"),
        pytest.param({"x5t#S256": b64url(b"thumbprint")}, id="x5t-s256"),
    ],
)
def test_embedded_key_pointers(
    verifier: TokenVerifier, secret: str, pointer: dict[str, Any]
) -> None:
    # The attacker signs with a key they embed or point at: the header never selects a key.
    forged = make_token(ATTACKER_KEY, valid_claims(), header={**HS256, **pointer})
    assert refused(verifier, forged) is InvalidReason.BAD_SIGNATURE


@pytest.mark.parametrize(
    "pointer",
    [
        {"jwk": {"kty": "oct", "k": b64url(ATTACKER_KEY)}},
        {"jku": "https://attacker.example/jwks.json"},
        {"x5u": "https://attacker.example/cert.pem"},
    ],
    ids=["jwk", "jku", "x5u"],
)
def test_key_pointers_are_ignored_not_followed(
    keys: Keys, secret: str, pointer: dict[str, Any]
) -> None:
    # Signed with the configured secret, the same headers are harmless: they are ignored (this
    # is what makes the attacker's variant above fail with a bad signature, not a fetch).
    verify = TokenVerifier(keys.config(), clock=Clock())
    token = make_token(secret, valid_claims(), header={**HS256, **pointer})
    assert verify.verify(token, DEVICE.encode()).instance_id == DEVICE


@pytest.mark.parametrize(
    ("kid", "key"),
    [
        # Path traversal to a file with known content (empty).
        pytest.param("../../../../../../dev/null", b"", id="dev-null"),
        pytest.param("/proc/self/cwd/../../dev/null", b"", id="proc-dev-null"),
        # SQL injection that makes a key store return an attacker-chosen key.
        pytest.param("x' UNION SELECT 'attacker-key", b"attacker-key", id="sql-union"),
        pytest.param("' OR '1'='1", b"", id="sql-tautology"),
        # Command injection and URLs.
        pytest.param("key|cat /etc/passwd", b"", id="command"),
        pytest.param("https://attacker.example/key", ATTACKER_KEY, id="url"),
        pytest.param("\x00", b"", id="nul"),
        pytest.param("", b"", id="empty"),
    ],
)
def test_kid_injection(verifier: TokenVerifier, kid: str, key: bytes) -> None:
    # A kid selects a configured key by exact match or nothing: unknown, no key is tried.
    token = make_token(key, valid_claims(), header={**HS256, "kid": kid})
    assert refused(verifier, token) is InvalidReason.UNKNOWN_KEY


@pytest.mark.parametrize(
    "kid", [123, ["k1"], {"k": 1}, True, None], ids=["int", "list", "object", "bool", "null"]
)
def test_kid_that_is_not_a_string(verifier: TokenVerifier, secret: str, kid: object) -> None:
    # RFC 7515 §4.1.4: kid is a string. Other types are refused before any key is tried.
    token = make_token(secret, valid_claims(), header={**HS256, "kid": kid})
    assert refused(verifier, token) is InvalidReason.BAD_HEADER


@pytest.mark.parametrize(
    "crit",
    [["exp"], ["b64"], ["x-custom"], ["exp", "x-custom"], [], "exp", None],
    ids=["exp", "b64", "custom", "two", "empty-list", "string", "null"],
)
def test_unknown_crit(verifier: TokenVerifier, secret: str, crit: object) -> None:
    # RFC 7515 §4.1.11: extensions listed in crit must be understood; devicegate knows none.
    token = make_token(secret, valid_claims(), header={**HS256, "crit": crit, "exp": NOW})
    assert refused(verifier, token) is InvalidReason.BAD_HEADER


@pytest.mark.parametrize("b64", [False, 0, "false", None], ids=["false", "zero", "string", "null"])
def test_unencoded_payload_option(verifier: TokenVerifier, secret: str, b64: object) -> None:
    # RFC 7797: "b64": false changes what the signature covers; only the default is understood.
    token = make_token(secret, valid_claims(), header={**HS256, "b64": b64})
    assert refused(verifier, token) is InvalidReason.BAD_HEADER


@pytest.mark.parametrize(
    "typ",
    ["at+jwt", "JWE", "JOSE+JSON", "", "JWT ", 5, ["JWT"], None],
    ids=["at+jwt", "jwe", "jose-json", "empty", "trailing-space", "int", "list", "null"],
)
def test_typ_other_than_jwt(verifier: TokenVerifier, secret: str, typ: object) -> None:
    # RFC 8725 §3.11: explicit typing keeps other kinds of JWT from being used as this one.
    token = make_token(secret, valid_claims(), header={"alg": "HS256", "typ": typ})
    assert refused(verifier, token) is InvalidReason.BAD_HEADER


# --- encoding -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape",
    [
        pytest.param("", id="empty"),
        pytest.param(".", id="one-dot"),
        pytest.param("..", id="two-dots"),
        pytest.param("{h}", id="one-segment"),
        pytest.param("{h}.{p}", id="two-segments"),
        pytest.param("{h}.{p}.", id="empty-signature"),
        pytest.param("{h}.{p}.{s}.", id="trailing-dot"),
        pytest.param(".{h}.{p}.{s}", id="leading-dot"),
        pytest.param("{h}.{p}.{s}.{s}", id="four-segments"),
        pytest.param("{h}.{h}.{p}.{p}.{s}", id="five-segments-like-jwe"),
        pytest.param("{h}..{s}", id="empty-payload"),
        pytest.param(".{p}.{s}", id="empty-header"),
        pytest.param("{h}.{p}..{s}", id="double-dot"),
        pytest.param("{h}.{p}.{s}\n", id="trailing-newline"),
        pytest.param(" {h}.{p}.{s}", id="leading-space"),
        pytest.param("{h}.{p}.{s}\x00", id="trailing-nul"),
        pytest.param('{{"alg":"HS256"}}.{p}.{s}', id="raw-json-header"),
    ],
)
def test_wrong_segment_counts(verifier: TokenVerifier, secret: str, shape: str) -> None:
    h, p, s = make_token(secret, valid_claims()).split(".")
    assert refused(verifier, shape.format(h=h, p=p, s=s)) is InvalidReason.MALFORMED


@pytest.mark.parametrize("position", [0, 1, 2], ids=["header", "payload", "signature"])
@pytest.mark.parametrize("char", ["+", "/", "=", "*", " ", "\t", "\n", "%", "\\", "~", "."])
def test_non_base64url_characters(
    verifier: TokenVerifier, secret: str, position: int, char: str
) -> None:
    parts = make_token(secret, valid_claims()).split(".")
    parts[position] = parts[position][:5] + char + parts[position][5:]
    assert refused(verifier, ".".join(parts)) is InvalidReason.MALFORMED


def test_standard_base64_alphabet(verifier: TokenVerifier, secret: str) -> None:
    # "+" and "/" are standard base64, not base64url (RFC 7515 §2): refused even when signed.
    header = segment({**HS256, "kid": "??>>>?"})
    payload = segment(valid_claims(note="??>>>?"))
    assert {"-", "_"} & set(header)
    assert {"-", "_"} & set(payload)
    std = str.maketrans("-_", "+/")
    assert refused(verifier, assemble(secret, header.translate(std), payload)) is (
        InvalidReason.MALFORMED
    )
    assert refused(verifier, assemble(secret, header, payload.translate(std))) is (
        InvalidReason.MALFORMED
    )


@pytest.mark.parametrize("non_ascii", ["é", "\u2024", "\uff0e", "\u0391"])
def test_non_ascii_characters_in_a_str_token(
    verifier: TokenVerifier, secret: str, non_ascii: str
) -> None:
    token = make_token(secret, valid_claims())
    assert refused(verifier, token[:10] + non_ascii + token[10:]) is InvalidReason.MALFORMED
    assert refused(verifier, token.replace(".", non_ascii, 1)) is InvalidReason.MALFORMED


def test_non_ascii_bytes_in_a_bytes_token(verifier: TokenVerifier, secret: str) -> None:
    token = make_token(secret, valid_claims()).encode()
    for byte in (b"\x80", b"\xff", b"\xc3\xa9"):
        assert refused(verifier, token[:10] + byte + token[10:]) is InvalidReason.MALFORMED


def test_padding(verifier: TokenVerifier, secret: str) -> None:
    # RFC 7515 §2: base64url without "=" padding.
    header = segment({"alg": "HS256"})  # 22 characters: two "=" when padded
    payload = segment(valid_claims())
    pad = "=" * (-len(payload) % 4) or "===="
    assert len(header) % 4 == 2
    assert refused(verifier, assemble(secret, header + "==", payload)) is InvalidReason.MALFORMED
    assert refused(verifier, assemble(secret, header, payload + pad)) is InvalidReason.MALFORMED
    token = assemble(secret, header, payload)
    assert refused(verifier, token + "=") is InvalidReason.MALFORMED


def test_non_canonical_base64url(verifier: TokenVerifier, secret: str) -> None:
    # Stray low bits in the last character decode to the same bytes: one token, many spellings,
    # unless the decoder insists on the canonical one.
    header = segment({"alg": "HS256"})
    claims = valid_claims()
    payload = segment(claims)
    while len(payload) % 4 == 0:
        claims["pad"] = claims.get("pad", "") + "x"
        payload = segment(claims)
    odd_header, odd_payload = non_canonical(header), non_canonical(payload)
    assert decode(odd_header) == decode(header)
    assert decode(odd_payload) == decode(payload)
    assert refused(verifier, assemble(secret, odd_header, payload)) is InvalidReason.MALFORMED
    assert refused(verifier, assemble(secret, header, odd_payload)) is InvalidReason.MALFORMED
    h, p, s = assemble(secret, header, payload).split(".")
    assert decode(non_canonical(s)) == decode(s)
    assert refused(verifier, f"{h}.{p}.{non_canonical(s)}") is InvalidReason.BAD_SIGNATURE
    # The canonical spelling is accepted, so the refusals above are about the spelling alone.
    accepting = TokenVerifier(GateConfig(jwt_secret=secret), clock=Clock())
    assert accepting.verify(f"{h}.{p}.{s}", DEVICE.encode()).instance_id == DEVICE


NOT_OBJECTS = [b"[]", b'["HS256"]', b'"HS256"', b"null", b"1", b"true", b"1e400"]


@pytest.mark.parametrize("raw", NOT_OBJECTS)
def test_header_json_that_is_not_an_object(
    verifier: TokenVerifier, secret: str, raw: bytes
) -> None:
    token = make_token(secret, valid_claims(), raw_header=raw)
    assert refused(verifier, token) is InvalidReason.MALFORMED


@pytest.mark.parametrize("raw", NOT_OBJECTS)
def test_payload_json_that_is_not_an_object(
    verifier: TokenVerifier, secret: str, raw: bytes
) -> None:
    token = make_token(secret, raw_payload=raw)
    assert refused(verifier, token) is InvalidReason.MALFORMED


@pytest.mark.parametrize(
    "raw",
    [
        b"{",
        b"{'alg': 'HS256'}",
        b'{"alg": "HS256"} {}',
        b'{"alg": "HS256",}',
        b'{"alg": HS256}',
        b"",
        b" ",
    ],
    ids=["truncated", "single-quotes", "trailing-data", "trailing-comma", "bare", "empty", "space"],
)
def test_invalid_json(verifier: TokenVerifier, secret: str, raw: bytes) -> None:
    for token in (
        make_token(secret, valid_claims(), raw_header=raw),
        make_token(secret, raw_payload=raw.replace(b'"alg": "HS256"', b'"exp": 1')),
    ):
        assert refused(verifier, token) is InvalidReason.MALFORMED


@pytest.mark.parametrize(
    "text",
    ['{"a": 1}', ' {"a": 1}', '{"a": 1}\n', '\t{"a": [1, {"b": "c"}]} \r\n', "3", '"x"', "[]"],
)
def test_strict_json_reads_what_json_loads_reads(text: str) -> None:
    # With whitespace around the document or without (the parser's quick path): the same.
    assert loads_strict_json(text) == json.loads(text)


@pytest.mark.parametrize(
    "text", ['{"a": 1} {}', '{"a": 1}x', "", " ", "[1,]", '{"a": 1,}', "{", ' {"a": 1} x ']
)
def test_strict_json_refuses_what_json_loads_refuses_with_its_error(text: str) -> None:
    with pytest.raises(json.JSONDecodeError) as expected:
        json.loads(text)
    with pytest.raises(json.JSONDecodeError) as refused_here:
        loads_strict_json(text)
    assert (refused_here.value.msg, refused_here.value.pos) == (
        expected.value.msg,
        expected.value.pos,
    )


@pytest.mark.parametrize(
    ("text", "refusal"),
    [
        ('{"a": 1, "a": 1}', "duplicate member"),
        (' {"b": [{"a": 1, "a": 2}]} ', "duplicate member"),
        ("NaN", "NaN is not JSON"),
        ("[-Infinity]", "-Infinity is not JSON"),
    ],
)
def test_strict_json_refuses_duplicates_and_constants(text: str, refusal: str) -> None:
    with pytest.raises(ValueError, match=refusal) as refused_here:
        loads_strict_json(text)
    assert isinstance(refused_here.value, DuplicateMember) == ("duplicate" in refusal)


@pytest.mark.parametrize("depth", [10_000, 200_000])
def test_deeply_nested_json(verifier: TokenVerifier, secret: str, depth: int) -> None:
    nested = b"[" * depth + b"]" * depth
    header = b'{"alg": "HS256", "x": ' + nested + b"}"
    payload = b'{"exp": ' + str(NOW + 300).encode() + b', "x": ' + nested + b"}"
    assert refused(verifier, make_token(secret, raw_header=header)) is InvalidReason.MALFORMED
    assert refused(verifier, make_token(secret, raw_payload=payload)) is InvalidReason.MALFORMED
    objects = b'{"a": ' * depth + b"1" + b"}" * depth
    assert refused(verifier, make_token(secret, raw_payload=objects)) is InvalidReason.MALFORMED


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(b"\xff", id="ff"),
        pytest.param(b"\xc3\x28", id="invalid-continuation"),
        pytest.param(b"\xc0\xaf", id="overlong-slash"),
        pytest.param(b"\xed\xa0\x80", id="encoded-surrogate"),
        pytest.param(b"\xe2\x82", id="truncated-sequence"),
    ],
)
def test_non_utf8_bytes(verifier: TokenVerifier, secret: str, bad: bytes) -> None:
    header = b'{"alg": "HS256", "x": "' + bad + b'"}'
    payload = b'{"exp": ' + str(NOW + 300).encode() + b', "x": "' + bad + b'"}'
    assert refused(verifier, make_token(secret, raw_header=header)) is InvalidReason.MALFORMED
    assert refused(verifier, make_token(secret, raw_payload=payload)) is InvalidReason.MALFORMED


@pytest.mark.parametrize(
    "encode",
    [
        pytest.param(lambda text: text.encode("utf-16"), id="utf-16"),
        pytest.param(lambda text: text.encode("utf-16-le"), id="utf-16-le"),
        pytest.param(lambda text: text.encode("utf-32"), id="utf-32"),
        pytest.param(lambda text: b"\xef\xbb\xbf" + text.encode(), id="utf-8-bom"),
    ],
)
def test_json_in_other_unicode_encodings(verifier: TokenVerifier, secret: str, encode: Any) -> None:
    # RFC 7519 §7.2 step 8 and RFC 8259 §8.1: UTF-8 only. (json.loads on bytes would guess.)
    payload = encode(json.dumps(valid_claims()))
    assert refused(verifier, make_token(secret, raw_payload=payload)) is InvalidReason.MALFORMED
    header = encode(json.dumps(HS256))
    assert refused(verifier, make_token(secret, raw_header=header)) is InvalidReason.MALFORMED


@pytest.mark.parametrize(
    ("raw_header", "raw_payload"),
    [
        pytest.param(b'{"alg": "none", "alg": "HS256"}', None, id="header-alg"),
        pytest.param(b'{"alg": "HS256", "alg": "HS256"}', None, id="header-same-value"),
        pytest.param(b'{"alg": "HS256", "crit": ["x"], "crit": []}', None, id="header-crit"),
        pytest.param(
            None,
            b'{"exp": %d, "instance_id": "victim", "instance_id": "%s"}' % (NOW + 300, b"x"),
            id="payload-instance-id",
        ),
        pytest.param(None, b'{"exp": "never", "exp": %d}' % (NOW + 300), id="payload-exp"),
        pytest.param(
            None, b'{"exp": %d, "x": {"a": 1, "a": 2}}' % (NOW + 300), id="payload-nested"
        ),
        pytest.param(
            None, b'{"exp": %d, "x": [{"a": 1, "a": 1}]}' % (NOW + 300), id="payload-in-array"
        ),
    ],
)
def test_duplicate_json_members(
    verifier: TokenVerifier, secret: str, raw_header: bytes | None, raw_payload: bytes | None
) -> None:
    # Two parsers may pick different duplicates (first or last wins): refuse them all.
    token = make_token(
        secret,
        {"exp": NOW + 300},
        raw_header=raw_header,
        raw_payload=raw_payload,
    )
    assert refused(verifier, token) is InvalidReason.MALFORMED


# --- claims ---------------------------------------------------------------------------------


def test_expired(verifier: TokenVerifier, secret: str) -> None:
    token = make_token(secret, valid_claims(iat=NOW - 600, exp=NOW - 300))
    assert refused(verifier, token) is InvalidReason.EXPIRED
    token = make_token(secret, valid_claims(exp=NOW))
    assert refused(verifier, token) is InvalidReason.EXPIRED


def test_missing_exp(verifier: TokenVerifier, secret: str) -> None:
    claims = valid_claims()
    del claims["exp"]
    assert refused(verifier, make_token(secret, claims)) is InvalidReason.BAD_CLAIMS


@pytest.mark.parametrize(
    "exp",
    [
        pytest.param(str(NOW + 300), id="numeric-string"),  # PyJWT accepts this one
        pytest.param("tomorrow", id="string"),
        pytest.param("", id="empty-string"),
        pytest.param(True, id="true"),
        pytest.param(False, id="false"),
        pytest.param(None, id="null"),
        pytest.param([NOW + 300], id="list"),
        pytest.param({"exp": NOW + 300}, id="object"),
        pytest.param(1e308, id="huge-float"),
        pytest.param(253_402_300_800, id="after-year-9999"),
    ],
)
def test_exp_of_the_wrong_type(verifier: TokenVerifier, secret: str, exp: object) -> None:
    assert refused(verifier, make_token(secret, valid_claims(exp=exp))) is InvalidReason.BAD_CLAIMS


@pytest.mark.parametrize(
    ("literal", "reason"),
    [
        (b"1e400", InvalidReason.BAD_CLAIMS),  # read as infinity: no date
        (b"-1e400", InvalidReason.BAD_CLAIMS),
        (b"17e8", InvalidReason.EXPIRED),  # a number in exponent form is a number: in the past
        (b"1.7e9", InvalidReason.EXPIRED),
    ],
)
def test_exp_as_exponent_json_literal(
    verifier: TokenVerifier, secret: str, literal: bytes, reason: InvalidReason
) -> None:
    payload = b'{"exp": ' + literal + b', "instance_id": "' + DEVICE.encode() + b'"}'
    assert refused(verifier, make_token(secret, raw_payload=payload)) is reason


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity"])
@pytest.mark.parametrize("claim", ["exp", "nbf", "score"])
def test_non_json_constants_anywhere(
    verifier: TokenVerifier, secret: str, literal: bytes, claim: str
) -> None:
    # RFC 8259 §6 has no NaN or Infinity; Python's json module reads them unless told not to.
    payload = b'{"exp": %d, "%s": %s}' % (NOW + 300, claim.encode(), literal)
    if claim == "exp":
        payload = b'{"exp": ' + literal + b"}"
    assert refused(verifier, make_token(secret, raw_payload=payload)) is InvalidReason.MALFORMED


def test_instance_id_without_bytes(verifier: TokenVerifier, secret: str) -> None:
    # A lone surrogate is valid JSON text ("\ud800") but no UTF-8 byte string: never a crash.
    payload = b'{"exp": %d, "instance_id": "\\ud800"}' % (NOW + 300)
    assert refused(verifier, make_token(secret, raw_payload=payload)) is InvalidReason.BAD_CLAIMS


def test_nesting_too_deep_to_freeze(verifier: TokenVerifier, secret: str) -> None:
    # Deep enough for the JSON parser, too deep to make read-only: refused, never a crash.
    depth = 990
    payload = b'{"exp": %d, "x": ' % (NOW + 300) + b"[" * depth + b"]" * depth + b"}"
    with pytest.raises(InvalidToken) as excinfo:
        verifier.verify(make_token(secret, raw_payload=payload), DEVICE.encode())
    assert excinfo.value.reason is InvalidReason.MALFORMED


@pytest.mark.parametrize("exp", [10**18, 2**63, 2**64 + 1, 10**100, 10**1000])
def test_huge_integer_exp_does_not_crash(keys: Keys, secret: str, exp: int) -> None:
    # Beyond the year 9999 no date library follows: refused, with no overflow anywhere.
    verify = TokenVerifier(keys.config(leeway_seconds=60), clock=Clock())
    token = make_token(secret, valid_claims(exp=exp))
    assert refused(verify, token) is InvalidReason.BAD_CLAIMS
    assert verify.cache_size == 0


def test_huge_negative_exp(verifier: TokenVerifier, secret: str) -> None:
    token = make_token(secret, valid_claims(exp=-(10**100)))
    assert refused(verifier, token) is InvalidReason.EXPIRED


def test_exp_longer_than_python_parses(verifier: TokenVerifier, secret: str) -> None:
    # CPython refuses to parse integers over sys.get_int_max_str_digits() digits (CVE-2020-10735)
    # with a ValueError: it must surface as a malformed token, not an exception.
    limit = sys.get_int_max_str_digits()
    digits = (limit or 4300) + 1
    payload = b'{"exp": 1' + b"0" * (digits - 1) + b"}"
    token = make_token(secret, raw_payload=payload)
    if limit:
        assert refused(verifier, token) is InvalidReason.MALFORMED
    else:  # pragma: no cover - only when the interpreter's limit is disabled
        assert verifier.verify(token).claims["exp"] == 10 ** (digits - 1)
        verifier.clear_cache()


@pytest.mark.parametrize(
    ("claim", "reason"),
    [("nbf", InvalidReason.NOT_YET_VALID), ("iat", InvalidReason.ISSUED_IN_FUTURE)],
)
def test_future_nbf_and_iat(
    verifier: TokenVerifier, secret: str, claim: str, reason: InvalidReason
) -> None:
    token = make_token(secret, valid_claims(**{claim: NOW + 1, "exp": NOW + 600}))
    assert refused(verifier, token) is reason


@pytest.mark.parametrize(
    ("claim", "value"),
    [
        ("jti", 12345),
        ("jti", ["a"]),
        ("jti", None),
        ("sub", 42),
        ("sub", {"id": "user"}),
        ("iss", 7),
        ("iss", ["https://issuer.example"]),
    ],
)
def test_registered_string_claims_of_the_wrong_type(
    verifier: TokenVerifier, secret: str, claim: str, value: object
) -> None:
    # RFC 7519 §4.1.1, §4.1.2, §4.1.7: iss, sub and jti are strings. A later revocation list
    # keyed on jti must not meet a list or a number; other libraries refuse these too.
    token = make_token(secret, valid_claims(**{claim: value}))
    assert refused(verifier, token) is InvalidReason.BAD_CLAIMS


@pytest.mark.parametrize(
    "iss",
    [
        "https://issuer.example.evil",
        "https://issuer.exampl",
        "https://issuer.example/",
        "HTTPS://ISSUER.EXAMPLE",
    ],
)
def test_wrong_issuer_including_prefix_matches(keys: Keys, secret: str, iss: str) -> None:
    verify = TokenVerifier(keys.config(issuer="https://issuer.example"), clock=Clock())
    token = make_token(secret, valid_claims(iss=iss))
    assert refused(verify, token) is InvalidReason.WRONG_ISSUER


@pytest.mark.parametrize(
    "aud", ["mobile-api-admin", "mobile-ap", ["mobile-api-admin"], "Mobile-API", ["mobile-api", 1]]
)
def test_wrong_audience_including_prefix_matches(keys: Keys, secret: str, aud: object) -> None:
    verify = TokenVerifier(keys.config(audience="mobile-api"), clock=Clock())
    token = make_token(secret, valid_claims(aud=aud))
    assert refused(verify, token) is InvalidReason.WRONG_AUDIENCE


# --- device binding -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "device",
    [b"device-9999", DEVICE.upper().encode(), DEVICE.swapcase().encode(), DEVICE.encode() + b" "],
    ids=["another-device", "upper-case", "swapped-case", "trailing-space"],
)
def test_token_replayed_from_another_device(
    verifier: TokenVerifier, secret: str, device: bytes
) -> None:
    error = refused_twice(verifier, make_token(secret, valid_claims()), device)
    assert isinstance(error, InvalidToken)
    assert error.reason is InvalidReason.WRONG_DEVICE


def test_bound_token_without_device_header(verifier: TokenVerifier, secret: str) -> None:
    error = refused_twice(verifier, make_token(secret, valid_claims()), None)
    assert isinstance(error, InvalidRequest)
    assert error.status_code == 400


@pytest.mark.parametrize(
    ("instance_id", "device"),
    [("", b""), (12345, b"12345"), (None, b"None"), (["d"], b"d"), (True, b"true")],
    ids=["empty", "int", "null", "list", "bool"],
)
def test_instance_id_of_the_wrong_type(
    verifier: TokenVerifier, secret: str, instance_id: object, device: bytes
) -> None:
    token = make_token(secret, valid_claims(instance_id=instance_id))
    assert refused(verifier, token, device) is InvalidReason.BAD_CLAIMS


def test_generic_token_where_binding_is_required(keys: Keys, secret: str) -> None:
    verify = TokenVerifier(keys.config(require_device_binding=True), clock=Clock())
    claims = valid_claims()
    del claims["instance_id"]
    assert refused(verify, make_token(secret, claims)) is InvalidReason.UNBOUND


def test_repeated_device_header(keys: Keys, secret: str) -> None:
    authenticator = Authenticator(keys.config())
    token = make_token(secret, valid_claims(exp=2**37))
    headers = [
        (b"authorization", b"Bearer " + token.encode()),
        (b"x-instance-id", b"device-9999"),
        (b"x-instance-id", DEVICE.encode()),
    ]
    with pytest.raises(InvalidRequest):
        authenticator.authenticate({"headers": headers})


# --- API keys -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "header"), [("api_key", b"x-api-key"), ("mobile_api_key", b"authorization")]
)
def test_key_near_misses(keys: Keys, key: str, header: bytes) -> None:
    authenticator = Authenticator(keys.config())
    for candidate in near_misses(getattr(keys, key)).values():
        with pytest.raises(InvalidToken) as excinfo:
            authenticator.authenticate({"headers": [(header, candidate.encode())]})
        assert excinfo.value.reason is InvalidReason.UNKNOWN_KEY


def test_key_offered_in_the_wrong_place(keys: Keys) -> None:
    authenticator = Authenticator(keys.config())
    wrong_places: list[tuple[bytes, str]] = [
        (b"authorization", keys.api_key),  # the server key where the SDK's key goes
        (b"x-api-key", keys.mobile_api_key),  # the SDK's key where the server key goes
        (b"x-api-key", keys.jwt_secret),
        (b"authorization", keys.jwt_secret),
    ]
    for header, value in wrong_places:
        with pytest.raises(InvalidToken) as excinfo:
            authenticator.authenticate({"headers": [(header, value.encode())]})
        assert excinfo.value.reason is InvalidReason.UNKNOWN_KEY


@pytest.mark.parametrize("key", ["api_key", "mobile_api_key"])
def test_key_offered_as_a_bearer_token(keys: Keys, key: str) -> None:
    authenticator = Authenticator(keys.config())
    value = getattr(keys, key).encode()
    with pytest.raises(InvalidToken) as excinfo:
        authenticator.authenticate({"headers": [(b"authorization", b"Bearer " + value)]})
    assert excinfo.value.reason is InvalidReason.MALFORMED


def test_key_kind_not_configured(keys: Keys) -> None:
    authenticator = Authenticator(GateConfig(jwt_secret=keys.jwt_secret))
    for header, value in ((b"x-api-key", keys.api_key), (b"authorization", keys.mobile_api_key)):
        with pytest.raises(InvalidToken) as excinfo:
            authenticator.authenticate({"headers": [(header, value.encode())]})
        assert excinfo.value.reason is InvalidReason.NOT_CONFIGURED


def test_no_credential_at_all(keys: Keys) -> None:
    with pytest.raises(MissingCredentials):
        Authenticator(keys.config()).authenticate(
            {"headers": [(b"x-instance-id", DEVICE.encode())]}
        )
