"""What a caller may put into a token it has minted: a subject, application claims, a shorter
lifetime. Everything else is the server's to set.

Shared by :class:`~devicegate.TokenIssuer` (Python callers) and the token endpoint (HTTP
callers), so that both refuse the same things with the same words. Also what a NumericDate is,
for the token verifier and the DPoP proof check alike.

References:
    https://www.rfc-editor.org/rfc/rfc7519#section-4.1 (registered claims)
    https://www.rfc-editor.org/rfc/rfc7800#section-3 (cnf)
    https://www.rfc-editor.org/rfc/rfc8725#section-3.11 (do not let callers choose what is checked)
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any, TypeGuard

__all__ = [
    "LAST_NUMERIC_DATE",
    "MAX_CLAIMS_BYTES",
    "MAX_SUBJECT_LENGTH",
    "RESERVED_CLAIMS",
    "ClaimError",
    "check_application_claims",
    "check_lifetime",
    "check_subject",
    "is_numeric_date",
]

# 9999-12-31T23:59:59Z: no date library (nor PyJWT's datetime conversion) goes beyond it.
LAST_NUMERIC_DATE = 253_402_300_799


def is_numeric_date(value: object) -> TypeGuard[float]:
    """Whether ``value`` is an RFC 7519 §2 NumericDate devicegate accepts: a JSON number, whole
    or not, finite and not beyond the year 9999. A bool (an int to Python), a string or a null
    is not one: no library-specific coercion applies."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return value <= LAST_NUMERIC_DATE
    return isinstance(value, float) and math.isfinite(value) and value <= LAST_NUMERIC_DATE


# Registered claims (RFC 7519 §4.1), the ones devicegate sets or checks itself (instance_id,
# azp, cnf), and JOSE header names, which would only confuse a reader of the payload.
RESERVED_CLAIMS = frozenset(
    {
        "iss",
        "sub",
        "aud",
        "exp",
        "nbf",
        "iat",
        "jti",
        "instance_id",
        "azp",
        "cnf",
        "alg",
        "typ",
        "cty",
        "kid",
        "jwk",
        "jku",
        "x5u",
        "x5c",
        "x5t",
        "x5t#S256",
        "crit",
    }
)
# Application claims travel in every request's Authorization header, so they stay small: a token
# is cached only up to 4 KiB, and proxies commonly refuse headers past 8 KiB.
MAX_CLAIMS_BYTES = 1024
MAX_CLAIMS_DEPTH = 8
MAX_SUBJECT_LENGTH = 256


class ClaimError(ValueError):
    """A caller asked for something a token cannot carry.

    Attributes:
        member: which member of the request is wrong (``sub``, ``claims``, ``expires_in``, or
            the reserved claim name). Always one of devicegate's own names, never the caller's
            text, so it is safe to show.
    """

    def __init__(self, member: str, message: str) -> None:
        super().__init__(message)
        self.member = member


def check_subject(subject: object) -> str:
    """Return ``subject`` if it can be a token's ``sub``: 1 to 256 printable characters."""
    if (
        not isinstance(subject, str)
        or not 1 <= len(subject) <= MAX_SUBJECT_LENGTH
        or not subject.isprintable()
    ):
        raise ClaimError(
            "sub", f"sub must be a string of 1 to {MAX_SUBJECT_LENGTH} printable characters"
        )
    return subject


def check_application_claims(claims: object) -> dict[str, Any]:
    """Return a copy of ``claims`` if every member may go into a token.

    A JSON object of strings, finite numbers, booleans, nulls, and lists and objects of those,
    at most 8 levels deep and 1,024 bytes as compact JSON, none of whose top-level names is
    reserved.
    """
    if not isinstance(claims, Mapping):
        raise ClaimError("claims", "claims must be a JSON object")
    for name in claims:
        if not isinstance(name, str):
            raise ClaimError("claims", "names in claims must be strings")
        if name in RESERVED_CLAIMS:
            # The name is one of ours (it matched the fixed set), so it may be shown.
            reserved = next(item for item in RESERVED_CLAIMS if item == name)
            raise ClaimError(reserved, f"the claim {reserved!r} is set by the server alone")
    copied = {name: _json_value(value, 1) for name, value in claims.items()}
    try:
        size = len(json.dumps(copied, separators=(",", ":")).encode())
    except ValueError:  # an integer of more digits than Python writes out
        size = MAX_CLAIMS_BYTES + 1
    if size > MAX_CLAIMS_BYTES:
        raise ClaimError(
            "claims", f"claims must take at most {MAX_CLAIMS_BYTES} bytes as compact JSON"
        )
    return copied


def check_lifetime(lifetime: object, configured: int) -> int:
    """Return ``lifetime`` if it is a whole number of seconds from 1 to ``configured``: a
    caller may shorten a token's life, never lengthen it."""
    if isinstance(lifetime, bool) or not isinstance(lifetime, int):
        raise ClaimError("expires_in", "expires_in must be a whole number of seconds")
    if not 1 <= lifetime <= configured:
        raise ClaimError(
            "expires_in",
            f"expires_in must be from 1 to {configured} seconds (the configured lifetime)",
        )
    return lifetime


def _json_value(value: object, depth: int) -> Any:
    if depth > MAX_CLAIMS_DEPTH:
        raise ClaimError("claims", f"claims may nest at most {MAX_CLAIMS_DEPTH} levels deep")
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ClaimError("claims", "claims must be JSON: no NaN or infinity")
        return value
    if isinstance(value, (list, tuple)):
        return [_json_value(item, depth + 1) for item in value]
    if isinstance(value, Mapping):
        if not all(isinstance(name, str) for name in value):
            raise ClaimError("claims", "names in claims must be strings")
        return {name: _json_value(item, depth + 1) for name, item in value.items()}
    raise ClaimError("claims", "claims must hold only JSON values")
