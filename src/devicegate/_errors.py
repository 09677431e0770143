"""The devicegate exception tree and its RFC 6750 rendering.

    DeviceGateError
    ├── ConfigError              bad configuration, raised at start-up
    └── AuthError                a request is refused (carries status and RFC 6750 code)
        ├── MissingCredentials   401, no ``error`` attribute in WWW-Authenticate
        ├── InvalidRequest       400 invalid_request
        ├── InvalidToken         401 invalid_token (``reason`` says why, for logs and tools)
        └── InsufficientScope    403 insufficient_scope

Every description is fixed text chosen here: nothing from a request is ever echoed into a
response header or body (RFC 6750 §3 leaves ``error_description`` to the server; echoing input
invites header injection and reflection).

References:
    https://www.rfc-editor.org/rfc/rfc6750#section-3
    https://www.rfc-editor.org/rfc/rfc6750#section-3.1
"""

from __future__ import annotations

import enum
from typing import ClassVar

__all__ = [
    "UNREADABLE_REQUEST",
    "AuthError",
    "ConfigError",
    "DeviceGateError",
    "InsufficientScope",
    "InvalidReason",
    "InvalidRequest",
    "InvalidToken",
    "MissingCredentials",
    "check_realm",
]

DEFAULT_REALM = "devicegate"


class DeviceGateError(Exception):
    """Base class of every exception devicegate raises."""


class ConfigError(DeviceGateError, ValueError):
    """The configuration is unusable; the message names the field and the fix.

    Raised at construction time so that a misconfigured gateway never starts. The message never
    contains a secret value.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class InvalidReason(str, enum.Enum):
    """Why a credential was refused. Shown to operators (logs, ``devicegate verify``), never to
    clients: the HTTP response carries only the fixed RFC 6750 description."""

    MALFORMED = "malformed"
    BAD_HEADER = "bad_header"
    UNSUPPORTED_ALGORITHM = "unsupported_algorithm"
    BAD_SIGNATURE = "bad_signature"
    BAD_CLAIMS = "bad_claims"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    ISSUED_IN_FUTURE = "issued_in_future"
    WRONG_ISSUER = "wrong_issuer"
    WRONG_AUDIENCE = "wrong_audience"
    WRONG_DEVICE = "wrong_device"
    UNBOUND = "unbound"
    UNKNOWN_KEY = "unknown_key"
    NOT_CONFIGURED = "not_configured"


class AuthError(DeviceGateError):
    """A request was refused.

    Attributes:
        status_code: the HTTP status to answer with.
        error: the RFC 6750 error code, or ``None`` when the request carried no credential
            (RFC 6750 §3.1: the challenge then carries no ``error`` attribute).
        description: fixed, human-readable text safe to send to the client.
    """

    status_code: ClassVar[int]
    error: ClassVar[str | None]
    description: ClassVar[str]

    def __init__(self, description: str | None = None) -> None:
        if description is not None:
            self.description = description  # type: ignore[misc]
        super().__init__(self.description)


class MissingCredentials(AuthError):
    """The request carried no credential at all."""

    status_code = 401
    error = None
    description = "Authentication is required."


UNREADABLE_REQUEST = "The request could not be read."
"""The description of a refusal for a request that could not be read at all (fail closed)."""


class InvalidRequest(AuthError):
    """The request is malformed: duplicate or ambiguous credentials, a bad header."""

    status_code = 400
    error = "invalid_request"
    description = "The request is malformed."


class InvalidToken(AuthError):
    """The credential is wrong, expired, tampered with or bound to another device.

    Attributes:
        reason: an :class:`InvalidReason` for operators; never sent to the client.
    """

    status_code = 401
    error = "invalid_token"
    description = "The credential is invalid, expired or not valid for this device."

    def __init__(self, reason: InvalidReason) -> None:
        super().__init__()
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.description} (reason: {self.reason.value})"


class InsufficientScope(AuthError):
    """A valid credential of a kind this path does not accept."""

    status_code = 403
    error = "insufficient_scope"
    description = "This credential is not accepted for this resource."


def check_realm(realm: object) -> None:
    """Raise :class:`ConfigError` unless ``realm`` can stand inside a quoted challenge."""
    if not (
        isinstance(realm, str)
        and realm
        and realm.isascii()
        and realm.isprintable()
        and '"' not in realm
        and "\\" not in realm
    ):
        raise ConfigError("realm", "must be printable ASCII without quotes or backslashes")
