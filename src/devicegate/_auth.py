"""Deciding who a request's credential belongs to. Raw headers in, a Principal or an error out.

Shared by the middleware and the token endpoint so that both apply the same rules.
"""

from __future__ import annotations

from collections.abc import Iterable

from ._config import GateConfig
from ._credentials import match_key, read_credential
from ._errors import InvalidReason, InvalidToken
from ._principal import API_KEY, DEVICE_TOKEN, CredentialKind, Principal
from ._tokens import TokenVerifier

__all__ = ["Authenticator"]


class Authenticator:
    """Checks the single credential in a request's headers against a :class:`GateConfig`."""

    __slots__ = (
        "_api_key_header",
        "_api_keys",
        "_device_header",
        "_mobile_api_keys",
        "configured_kinds",
        "verifier",
    )

    def __init__(self, config: GateConfig) -> None:
        self._api_keys = tuple(key.encode() for key in config.api_keys)
        self._mobile_api_keys = tuple(key.encode() for key in config.mobile_api_keys)
        self._api_key_header = config.api_key_header.encode("latin-1")
        self._device_header = config.device_header.encode("latin-1")
        self.verifier = TokenVerifier(config)
        kinds = set()
        if self._api_keys:
            kinds.add(CredentialKind.API_KEY)
        if self._mobile_api_keys:
            kinds.add(CredentialKind.MOBILE_API_KEY)
        if config.jwt_secrets:
            kinds.add(CredentialKind.DEVICE_TOKEN)
        self.configured_kinds = frozenset(kinds)

    def __repr__(self) -> str:
        kinds = ", ".join(sorted(kind.value for kind in self.configured_kinds))
        return f"<Authenticator kinds={{{kinds}}}>"

    def authenticate(self, headers: Iterable[tuple[bytes, bytes]]) -> Principal:
        """Return the principal for the request's one credential.

        Raises:
            MissingCredentials, InvalidRequest, InvalidToken: see :mod:`devicegate._errors`.
        """
        kind, value, device = read_credential(headers, self._api_key_header, self._device_header)
        if kind is DEVICE_TOKEN:
            return self.verifier.check(value, device)
        if kind is API_KEY:
            keys, principal = self._api_keys, _API_KEY_PRINCIPAL
        else:
            keys, principal = self._mobile_api_keys, _MOBILE_API_KEY_PRINCIPAL
        if not keys:
            raise InvalidToken(InvalidReason.NOT_CONFIGURED)
        if not match_key(value, keys):
            raise InvalidToken(InvalidReason.UNKNOWN_KEY)
        return principal


# A key principal carries no claims and is immutable, so one instance serves every request.
_API_KEY_PRINCIPAL = Principal(CredentialKind.API_KEY)
_MOBILE_API_KEY_PRINCIPAL = Principal(CredentialKind.MOBILE_API_KEY)
