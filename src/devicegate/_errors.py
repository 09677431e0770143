"""The devicegate exception tree: one problem type for every refusal.

    DeviceGateError
    ├── ConfigError              bad configuration, raised at start-up
    └── Refusal                  any answer devicegate sends instead of the app's: status,
        │                        error code, fixed description, extra headers
        └── AuthError            a credential was refused; the answer carries an RFC 6750
            │                    challenge (401 invalid_token unless a subclass says otherwise)
            ├── MissingCredentials   401, no ``error`` attribute in WWW-Authenticate
            ├── InvalidRequest       400 invalid_request
            ├── InvalidToken         401 invalid_token (``reason`` says why, for logs and tools)
            └── InsufficientScope    403 insufficient_scope

The middleware, the token endpoint, the gateway and forward-auth raise these and render them
with one function (:func:`devicegate._asgi.send_refusal`), so a hook that raises any of them
gets a proper answer, never a 500.

Every description is fixed text chosen here or by the code that raises: nothing from a request
is ever echoed into a response header or body (RFC 6750 §3 leaves ``error_description`` to the
server; echoing input invites header injection and reflection).

References:
    https://www.rfc-editor.org/rfc/rfc6750#section-3
    https://www.rfc-editor.org/rfc/rfc6750#section-3.1
    https://www.rfc-editor.org/rfc/rfc9457 (problem details; the body here is RFC 6750's shape)
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
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
    "Refusal",
    "check_realm",
]

DEFAULT_REALM = "devicegate"


class _Keep(enum.Enum):
    KEEP = enum.auto()


KEEP = _Keep.KEEP


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
    REVOKED = "revoked"
    BAD_CLOCK = "bad_clock"
    NOT_CONFIGURED = "not_configured"
    DPOP_REQUIRED = "dpop_required"
    """A token bound to a key (``cnf.jkt``) sent as ``Bearer``, without a proof."""
    NOT_DPOP_BOUND = "not_dpop_bound"
    """A token bound to no key sent with the ``DPoP`` scheme."""


Header = tuple[bytes, bytes]


class Refusal(DeviceGateError):
    """An answer sent instead of the app's: the one problem type every part of devicegate
    raises and renders the same way.

    The class attributes are the defaults; an instance may override each one.

    Attributes:
        status_code: the HTTP status to answer with.
        error: the error code of the JSON body (and, for an :class:`AuthError`, of the
            ``WWW-Authenticate`` challenge), or ``None`` when the request carried no credential
            (RFC 6750 §3.1: the challenge then carries no ``error`` attribute).
        description: fixed, human-readable text safe to send to the client.
        headers: extra response headers (``Allow``, ``Retry-After``...), as raw byte pairs.
        close: whether the connection should be closed after the answer (a request body that
            was not read must not be parsed as the next request).
        challenge: whether the answer carries a ``WWW-Authenticate`` challenge.
        scheme: the scheme of that challenge: ``Bearer`` (RFC 6750), or ``DPoP`` (RFC 9449)
            for a request that must prove possession of a key.
        challenge_params: further parameters of the challenge (``algs`` for DPoP).
    """

    status_code: int = 400
    error: str | None = "invalid_request"
    description: str = "The request cannot be served."
    challenge: ClassVar[bool] = False
    scheme: str = "Bearer"
    challenge_params: tuple[tuple[str, str], ...] = ()

    def __init__(
        self,
        description: str | None = None,
        *,
        status_code: int | None = None,
        error: str | _Keep | None = KEEP,
        headers: Iterable[Header] = (),
        close: bool = False,
    ) -> None:
        if description is not None:
            self.description = description
        if status_code is not None:
            self.status_code = status_code
        if not isinstance(error, _Keep):
            self.error = error
        self.headers: tuple[Header, ...] = tuple(headers)
        self.close = close
        super().__init__(self.description)


def unavailable(description: str, retry_after: int) -> Refusal:
    """503 ``temporarily_unavailable`` with ``Retry-After`` (seconds): something devicegate
    must ask (a shared store, a key set) cannot answer, so the request is refused rather than
    decided blind."""
    return Refusal(
        description,
        status_code=503,
        error="temporarily_unavailable",
        headers=[(b"retry-after", str(retry_after).encode())],
    )


class AuthError(Refusal):
    """A credential was refused: the answer carries an RFC 6750 ``WWW-Authenticate`` challenge.

    Raised as is (from a hook of your own, say), it is a 401 ``invalid_token`` refusal; the
    subclasses below say more precisely what was wrong.
    """

    status_code = 401
    error: str | None = "invalid_token"
    description = "The credential is invalid, expired or not valid for this device."
    challenge = True

    # What devicegate knew of the refused credential, for the audit log only (never sent):
    # its kind once read, and for a token whose signature verified, its jti and device.
    credential_kind: str | None = None
    token_id: str | None = None
    instance_id: str | None = None


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
