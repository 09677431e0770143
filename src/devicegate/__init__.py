"""devicegate: pure-ASGI authentication for APIs that mobile devices call.

A request is admitted with a server API key (``X-API-Key``), a mobile API key (raw in
``Authorization``) or a short-lived device token (``Authorization: Bearer <jwt>``) bound to the
device header. See :class:`DeviceAuthMiddleware`.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from ._cache import CachedToken, MemoryTokenCache, TokenCache
from ._config import ConfigError, GateConfig
from ._counters import Counters
from ._endpoint import TokenEndpoint
from ._errors import (
    AuthError,
    DeviceGateError,
    InsufficientScope,
    InvalidReason,
    InvalidRequest,
    InvalidToken,
    MissingCredentials,
    Refusal,
)
from ._jwks import JwksEndpoint
from ._middleware import DeviceAuthMiddleware
from ._principal import CredentialKind, Principal, get_principal
from ._revocation import RevocationCheck, RevocationList, RevocationStore
from ._revoke import RevocationEndpoint
from ._rules import Rule
from ._tokens import IssuedToken, TokenIssuer, TokenVerifier

try:
    __version__ = version("devicegate")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "AuthError",
    "CachedToken",
    "ConfigError",
    "Counters",
    "CredentialKind",
    "DeviceAuthMiddleware",
    "DeviceGateError",
    "GateConfig",
    "InsufficientScope",
    "InvalidReason",
    "InvalidRequest",
    "InvalidToken",
    "IssuedToken",
    "JwksEndpoint",
    "MemoryTokenCache",
    "MissingCredentials",
    "Principal",
    "Refusal",
    "RevocationCheck",
    "RevocationEndpoint",
    "RevocationList",
    "RevocationStore",
    "Rule",
    "TokenCache",
    "TokenEndpoint",
    "TokenIssuer",
    "TokenVerifier",
    "__version__",
    "get_principal",
]
