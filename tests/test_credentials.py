"""Reading the one credential of a request out of raw ASGI header lists, and comparing keys.

No verification happens here: ``read_credential`` only decides which kind of credential a
request carries and refuses every ambiguity; ``match_key`` compares in constant time.
"""

from __future__ import annotations

import pytest

from devicegate import CredentialKind, InvalidRequest, MissingCredentials
from devicegate._credentials import MAX_CREDENTIAL_BYTES, match_key, read_credential
from tests.helpers import BAD_API_KEY_HEADER, DUPLICATE, DUPLICATE_DEVICE, MALFORMED, SEVERAL

API_KEY_HEADER = b"x-api-key"
DEVICE_HEADER = b"x-instance-id"

TOKEN = b"eyJhbGciOiJIUzI1NiJ9.eyJleHAiOjF9.c2lnbmF0dXJlLW9mLWV4YWN0bHktdGhpcnR5LXR3by1i"
MOBILE_KEY = b"S3cr3t-Mobile-Key-0123456789abcdef"
API_KEY = b"S3cr3t-Server-Key-0123456789abcdef"

Headers = list[tuple[bytes, bytes]]


@pytest.mark.parametrize(
    ("headers", "kind", "value", "device"),
    [
        # The three credentials, each from where it belongs.
        pytest.param(
            [(b"authorization", b"Bearer " + TOKEN)],
            CredentialKind.DEVICE_TOKEN,
            TOKEN,
            None,
            id="bearer-token",
        ),
        pytest.param(
            [(b"authorization", MOBILE_KEY)],
            CredentialKind.MOBILE_API_KEY,
            MOBILE_KEY,
            None,
            id="raw-mobile-key-as-the-sdk-sends-it",
        ),
        pytest.param(
            [(b"x-api-key", API_KEY)],
            CredentialKind.API_KEY,
            API_KEY,
            None,
            id="server-api-key",
        ),
        # RFC 9110 §11.1: the auth scheme is case-insensitive.
        pytest.param(
            [(b"authorization", b"bearer " + TOKEN)],
            CredentialKind.DEVICE_TOKEN,
            TOKEN,
            None,
            id="bearer-lower-case",
        ),
        pytest.param(
            [(b"authorization", b"BEARER " + TOKEN)],
            CredentialKind.DEVICE_TOKEN,
            TOKEN,
            None,
            id="bearer-upper-case",
        ),
        pytest.param(
            [(b"authorization", b"bEaReR " + TOKEN)],
            CredentialKind.DEVICE_TOKEN,
            TOKEN,
            None,
            id="bearer-mixed-case",
        ),
        # The device header travels alongside any credential and is returned untouched.
        pytest.param(
            [(b"x-instance-id", b"device-1"), (b"authorization", b"Bearer " + TOKEN)],
            CredentialKind.DEVICE_TOKEN,
            TOKEN,
            b"device-1",
            id="token-with-device-before",
        ),
        pytest.param(
            [(b"authorization", b"Bearer " + TOKEN), (b"x-instance-id", b"Device-1")],
            CredentialKind.DEVICE_TOKEN,
            TOKEN,
            b"Device-1",
            id="token-with-device-after-case-kept",
        ),
        pytest.param(
            [(b"x-api-key", API_KEY), (b"x-instance-id", b"device-1")],
            CredentialKind.API_KEY,
            API_KEY,
            b"device-1",
            id="api-key-with-device",
        ),
        pytest.param(
            [(b"authorization", b"Bearer " + TOKEN), (b"x-instance-id", b"")],
            CredentialKind.DEVICE_TOKEN,
            TOKEN,
            b"",
            id="empty-device-header-is-present",
        ),
        # Unrelated headers, including look-alike names, are ignored.
        pytest.param(
            [
                (b"host", b"example.com"),
                (b"proxy-authorization", b"Basic Zm9vOmJhcg=="),
                (b"x-api-key-old", b"something"),
                (b"x-instance-id-2", b"other-device"),
                (b"authorization", b"Bearer " + TOKEN),
                (b"cookie", b"x-api-key=" + API_KEY),
            ],
            CredentialKind.DEVICE_TOKEN,
            TOKEN,
            None,
            id="unrelated-and-look-alike-headers",
        ),
        # Single words in Authorization are mobile keys; whether they match is match_key's call.
        pytest.param(
            [(b"authorization", b"Basic")],
            CredentialKind.MOBILE_API_KEY,
            b"Basic",
            None,
            id="lone-other-scheme-word-is-a-key-candidate",
        ),
        pytest.param(
            [(b"authorization", b"Bearer," + TOKEN)],
            CredentialKind.MOBILE_API_KEY,
            b"Bearer," + TOKEN,
            None,
            id="no-space-after-bearer",
        ),
        # Non-ASCII bytes are passed on as bytes, never decoded (so never an exception).
        pytest.param(
            [(b"authorization", b"k\xc3\xa9y-\xff\x80")],
            CredentialKind.MOBILE_API_KEY,
            b"k\xc3\xa9y-\xff\x80",
            None,
            id="non-ascii-mobile-key",
        ),
        pytest.param(
            [(b"x-api-key", b"\xff\xfe\x00")],
            CredentialKind.API_KEY,
            b"\xff\xfe\x00",
            None,
            id="non-ascii-api-key",
        ),
        pytest.param(
            [(b"authorization", b"Bearer \xff\xfe")],
            CredentialKind.DEVICE_TOKEN,
            b"\xff\xfe",
            None,
            id="non-ascii-token",
        ),
        # The size cap is inclusive.
        pytest.param(
            [(b"authorization", b"Bearer " + b"a" * (MAX_CREDENTIAL_BYTES - 7))],
            CredentialKind.DEVICE_TOKEN,
            b"a" * (MAX_CREDENTIAL_BYTES - 7),
            None,
            id="authorization-at-size-cap",
        ),
        pytest.param(
            [(b"x-api-key", b"k" * MAX_CREDENTIAL_BYTES)],
            CredentialKind.API_KEY,
            b"k" * MAX_CREDENTIAL_BYTES,
            None,
            id="api-key-at-size-cap",
        ),
    ],
)
def test_read_credential(
    headers: Headers, kind: CredentialKind, value: bytes, device: bytes | None
) -> None:
    assert read_credential(headers, API_KEY_HEADER, DEVICE_HEADER) == (kind, value, device, False)


@pytest.mark.parametrize("scheme", [b"DPoP", b"dpop", b"DPOP"])
def test_the_dpop_scheme_is_read_as_a_token_with_proof(scheme: bytes) -> None:
    # RFC 9449 §7.1: the DPoP scheme, case-insensitive as every scheme (RFC 9110 §11.1).
    headers = [(b"authorization", scheme + b" " + TOKEN), (b"x-instance-id", b"d-1")]
    assert read_credential(headers, API_KEY_HEADER, DEVICE_HEADER) == (
        CredentialKind.DEVICE_TOKEN,
        TOKEN,
        b"d-1",
        True,
    )


@pytest.mark.parametrize(
    ("headers", "error", "description"),
    [
        # No credential at all: 401 without an error code (RFC 6750 §3.1).
        pytest.param([], MissingCredentials, None, id="no-headers"),
        pytest.param(
            [(b"x-instance-id", b"device-1")], MissingCredentials, None, id="only-device-header"
        ),
        pytest.param(
            [(b"proxy-authorization", b"Bearer " + TOKEN), (b"cookie", b"token=" + TOKEN)],
            MissingCredentials,
            None,
            id="credentials-only-in-other-headers",
        ),
        # Authorization syntax: RFC 6750 §2.1, "Bearer" 1*SP b64token, one space, one token.
        pytest.param([(b"authorization", b"")], InvalidRequest, MALFORMED, id="empty"),
        pytest.param([(b"authorization", b"Bearer")], InvalidRequest, MALFORMED, id="bare-bearer"),
        pytest.param(
            [(b"authorization", b"bEARER")], InvalidRequest, MALFORMED, id="bare-bearer-mixed-case"
        ),
        pytest.param(
            [(b"authorization", b"Bearer ")], InvalidRequest, MALFORMED, id="empty-bearer"
        ),
        pytest.param(
            [(b"authorization", b"Bearer  " + TOKEN)],
            InvalidRequest,
            MALFORMED,
            id="two-spaces",
        ),
        pytest.param(
            [(b"authorization", b"Bearer " + TOKEN + b" ")],
            InvalidRequest,
            MALFORMED,
            id="trailing-space",
        ),
        pytest.param(
            [(b"authorization", b"Bearer " + TOKEN + b" extra")],
            InvalidRequest,
            MALFORMED,
            id="extra-part",
        ),
        pytest.param(
            [(b"authorization", b"Bearer " + TOKEN + b" Bearer " + TOKEN)],
            InvalidRequest,
            MALFORMED,
            id="two-tokens-in-one-header",
        ),
        pytest.param(
            [(b"authorization", b"Bearer\t" + TOKEN)], InvalidRequest, MALFORMED, id="tab"
        ),
        pytest.param(
            [(b"authorization", b"Bearer " + TOKEN + b"\t")],
            InvalidRequest,
            MALFORMED,
            id="trailing-tab",
        ),
        pytest.param(
            [(b"authorization", MOBILE_KEY + b"\t")], InvalidRequest, MALFORMED, id="key-tab"
        ),
        pytest.param(
            [(b"authorization", b"Bearer " + b"a" * (MAX_CREDENTIAL_BYTES - 6))],
            InvalidRequest,
            MALFORMED,
            id="oversized-authorization",
        ),
        pytest.param(
            [(b"authorization", b"k" * (MAX_CREDENTIAL_BYTES + 1))],
            InvalidRequest,
            MALFORMED,
            id="oversized-mobile-key",
        ),
        pytest.param(
            [(b"authorization", b"x" * 1_000_000)],
            InvalidRequest,
            MALFORMED,
            id="megabyte-authorization",
        ),
        # Schemes other than Bearer (RFC 6750 is the only one spoken here): RFC 6750 §3.1 treats
        # an unsupported method like no credential at all (401 without an error code).
        pytest.param(
            [(b"authorization", b"Basic dXNlcjpwYXNz")],
            MissingCredentials,
            None,
            id="basic",
        ),
        pytest.param(
            [(b"authorization", b"Token " + TOKEN)],
            MissingCredentials,
            None,
            id="token",
        ),
        pytest.param(
            [(b"authorization", b"Bearer-" + TOKEN + b" x")],
            MissingCredentials,
            None,
            id="bearer-look-alike",
        ),
        pytest.param(
            [(b"authorization", b" Bearer " + TOKEN)],
            InvalidRequest,
            MALFORMED,
            id="leading-space",
        ),
        pytest.param(
            [(b"authorization", b"B\xc3\xa9arer " + TOKEN)],
            MissingCredentials,
            None,
            id="non-ascii-scheme",
        ),
        # Duplicates are refused, never merged (a proxy may merge them differently).
        pytest.param(
            [(b"authorization", b"Bearer " + TOKEN), (b"authorization", b"Bearer " + TOKEN)],
            InvalidRequest,
            DUPLICATE,
            id="duplicate-authorization-identical",
        ),
        pytest.param(
            [(b"authorization", MOBILE_KEY), (b"authorization", b"Bearer " + TOKEN)],
            InvalidRequest,
            DUPLICATE,
            id="duplicate-authorization-different",
        ),
        pytest.param(
            [(b"authorization", b""), (b"authorization", MOBILE_KEY)],
            InvalidRequest,
            DUPLICATE,
            id="duplicate-authorization-first-empty",
        ),
        pytest.param(
            [(b"x-api-key", API_KEY), (b"x-api-key", API_KEY)],
            InvalidRequest,
            DUPLICATE,
            id="duplicate-api-key",
        ),
        pytest.param(
            [
                (b"authorization", b"Bearer " + TOKEN),
                (b"x-instance-id", b"device-1"),
                (b"x-instance-id", b"device-2"),
            ],
            InvalidRequest,
            DUPLICATE_DEVICE,
            id="duplicate-device-header",
        ),
        pytest.param(
            [
                (b"x-api-key", API_KEY),
                (b"x-instance-id", b"device-1"),
                (b"x-instance-id", b"device-1"),
            ],
            InvalidRequest,
            DUPLICATE_DEVICE,
            id="duplicate-device-header-with-api-key",
        ),
        # Exactly one credential per request.
        pytest.param(
            [(b"x-api-key", API_KEY), (b"authorization", b"Bearer " + TOKEN)],
            InvalidRequest,
            SEVERAL,
            id="api-key-and-token",
        ),
        pytest.param(
            [(b"authorization", MOBILE_KEY), (b"x-api-key", API_KEY)],
            InvalidRequest,
            SEVERAL,
            id="mobile-key-and-api-key",
        ),
        pytest.param(
            [(b"authorization", b"Basic"), (b"x-api-key", API_KEY)],
            InvalidRequest,
            SEVERAL,
            id="any-authorization-and-api-key",
        ),
        # The API key header.
        pytest.param([(b"x-api-key", b"")], InvalidRequest, BAD_API_KEY_HEADER, id="empty-key"),
        pytest.param(
            [(b"x-api-key", b"k" * (MAX_CREDENTIAL_BYTES + 1))],
            InvalidRequest,
            BAD_API_KEY_HEADER,
            id="oversized-api-key",
        ),
    ],
)
def test_read_credential_refuses(
    headers: Headers, error: type[Exception], description: str | None
) -> None:
    with pytest.raises(error) as excinfo:
        read_credential(headers, API_KEY_HEADER, DEVICE_HEADER)
    if description is not None:
        assert str(excinfo.value) == description
        assert isinstance(excinfo.value, InvalidRequest)
        assert excinfo.value.description == description
    assert excinfo.value.__class__ is error


def test_read_credential_description_never_echoes_the_request() -> None:
    secret_looking = b"Bearer " + TOKEN + b" attacker-controlled-text"
    with pytest.raises(InvalidRequest) as excinfo:
        read_credential([(b"authorization", secret_looking)], API_KEY_HEADER, DEVICE_HEADER)
    assert "attacker" not in str(excinfo.value)
    assert TOKEN.decode() not in str(excinfo.value)


def test_read_credential_uses_configured_header_names() -> None:
    headers = [(b"x-server-key", API_KEY), (b"x-device", b"d-1"), (b"x-instance-id", b"d-2")]
    assert read_credential(headers, b"x-server-key", b"x-device") == (
        CredentialKind.API_KEY,
        API_KEY,
        b"d-1",
        False,
    )
    # Under other names, the default headers are ordinary headers.
    with pytest.raises(MissingCredentials):
        read_credential([(b"x-api-key", API_KEY)], b"x-server-key", b"x-device")


def test_read_credential_accepts_any_iterable() -> None:
    headers = iter([(b"authorization", b"Bearer " + TOKEN)])
    assert read_credential(headers, API_KEY_HEADER, DEVICE_HEADER)[0] is (
        CredentialKind.DEVICE_TOKEN
    )


KEYS = (b"first-key-0123456789abcdef", b"second-key-0123456789abcdef")


@pytest.mark.parametrize(
    ("candidate", "matches"),
    [
        pytest.param(KEYS[0], True, id="first-key"),
        pytest.param(KEYS[1], True, id="second-key-rotation"),
        pytest.param(b"first-key-0123456789abcdeF", False, id="last-character-case"),
        pytest.param(b"First-key-0123456789abcdef", False, id="first-character-case"),
        pytest.param(b"first-key-0123456789abcdeg", False, id="one-character-off"),
        pytest.param(b"first-key-0123456789abcde", False, id="prefix"),
        pytest.param(b"first-key-0123456789abcdef0", False, id="suffix"),
        pytest.param(b"first-key-0123456789abcdef\x00", False, id="trailing-nul"),
        pytest.param(b" first-key-0123456789abcdef", False, id="leading-space"),
        pytest.param(KEYS[0] + KEYS[1], False, id="both-keys-concatenated"),
        pytest.param(b"", False, id="empty"),
        pytest.param(b"first-key-0123456789abcd\xc3\xa9", False, id="non-ascii-same-length"),
        pytest.param(b"\xff" * 26, False, id="non-ascii"),
    ],
)
def test_match_key(candidate: bytes, matches: bool) -> None:
    index = match_key(candidate, KEYS)
    assert (index >= 0) is matches
    if matches:
        assert KEYS[index] == candidate  # the index of the key that matched


def test_match_key_without_keys() -> None:
    assert match_key(KEYS[0], ()) == -1
    assert match_key(b"", ()) == -1
