"""Reading the one credential of a request out of raw ASGI headers. No verification here.

Headers are read as the raw ``(name, value)`` byte pairs of ``scope["headers"]``; ASGI servers
lower-case names (ASGI HTTP spec, "headers"). Every ambiguity is refused rather than resolved:
two ``Authorization`` headers might be merged differently by a proxy and by us, and a request
with both an API key and a token leaves it unclear which one the app would trust.

References:
    https://www.rfc-editor.org/rfc/rfc6750#section-2.1
    https://www.rfc-editor.org/rfc/rfc9110#section-11.6.2
    https://asgi.readthedocs.io/en/latest/specs/www.html#http-connection-scope
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from ._errors import InvalidRequest, MissingCredentials
from ._principal import API_KEY, DEVICE_TOKEN, MOBILE_API_KEY, CredentialKind

__all__ = ["MAX_CREDENTIAL_BYTES", "match_key", "read_credential"]

# Far above a real token (a few hundred bytes) yet small enough that parsing stays cheap.
MAX_CREDENTIAL_BYTES = 8192

_AUTHORIZATION = b"authorization"
_BEARER = b"bearer"
_DPOP = b"dpop"
_BEARER_AS_SENT = b"Bearer"
# Single bytes tested as ints: ``b"\t" in value`` first tries the needle as an int, fails, and
# clears a TypeError, which costs several times the search itself.
_TAB = ord("\t")
_SPACE = ord(" ")

# Fixed descriptions; a fresh exception is raised each time (a shared instance would carry one
# request's traceback into the next).
_DUPLICATE = "The request carries a credential header more than once."
_SEVERAL = "The request carries more than one credential."
_MALFORMED = "The Authorization header is malformed."
_BAD_API_KEY_HEADER = "The API key header is malformed."
_DUPLICATE_DEVICE = "The request carries the device header more than once."


def read_credential(
    headers: Iterable[tuple[bytes, bytes]],
    api_key_header: bytes,
    device_header: bytes,
) -> tuple[CredentialKind, bytes, bytes | None, bool]:
    """Return ``(kind, value, device_id, dpop)`` for the single credential in ``headers``.

    ``value`` is the raw API key, the raw mobile key, or the token. ``device_id`` is the
    device header's value, or ``None`` when absent. ``dpop`` says the token came with the
    ``DPoP`` scheme (RFC 9449 §7.1) rather than ``Bearer``.

    Raises:
        MissingCredentials: no credential header at all.
        InvalidRequest: duplicated headers, two credentials, an unknown scheme, an empty or
            oversized value, whitespace where none belongs.
    """
    authorization: bytes | None = None
    api_key: bytes | None = None
    device: bytes | None = None
    # In the order a device's request needs them: most requests carry a token and its device.
    for name, value in headers:
        if name == _AUTHORIZATION:
            if authorization is not None:
                raise InvalidRequest(_DUPLICATE)
            authorization = value
        elif name == device_header:
            if device is not None:
                raise InvalidRequest(_DUPLICATE_DEVICE)
            device = value
        elif name == api_key_header:
            if api_key is not None:
                raise InvalidRequest(_DUPLICATE)
            api_key = value

    if api_key is not None:
        if authorization is not None:
            raise InvalidRequest(_SEVERAL)
        if not api_key or len(api_key) > MAX_CREDENTIAL_BYTES:
            raise InvalidRequest(_BAD_API_KEY_HEADER)
        return API_KEY, api_key, device, False
    if authorization is None:
        raise MissingCredentials()
    if not authorization or len(authorization) > MAX_CREDENTIAL_BYTES or _TAB in authorization:
        raise InvalidRequest(_MALFORMED)
    scheme, space, token = authorization.partition(b" ")
    if not space:
        # A single word: the raw mobile key as the SenseCrypt SDK sends it, unless it is a
        # scheme with nothing after it ("Bearer").
        if len(authorization) == len(_BEARER) and authorization.lower() == _BEARER:
            raise InvalidRequest(_MALFORMED)
        return MOBILE_API_KEY, authorization, device, False
    # RFC 6750 §2.1: credentials = "Bearer" 1*SP b64token; the scheme is case-insensitive
    # (RFC 9110 §11.1). We accept exactly one space and one token.
    if not scheme or not token or _SPACE in token:
        raise InvalidRequest(_MALFORMED)
    if scheme == _BEARER_AS_SENT:
        return DEVICE_TOKEN, token, device, False  # the spelling every client sends
    scheme = scheme.lower()
    if scheme == _DPOP:
        return DEVICE_TOKEN, token, device, True
    if scheme != _BEARER:
        # RFC 6750 §3.1: a client that "attempted using an unsupported authentication method"
        # gets the bare challenge (401, no error code), as if it had sent nothing.
        raise MissingCredentials()
    return DEVICE_TOKEN, token, device, False


def match_key(candidate: bytes, keys: tuple[bytes, ...]) -> int:
    """The index of the key in ``keys`` that ``candidate`` equals, or -1, in time independent
    of where they differ.

    Every key is compared (no early exit), so timing does not reveal which key matched.
    """
    found = -1
    for index, key in enumerate(keys):
        if hmac.compare_digest(candidate, key):
            found = index
    return found
