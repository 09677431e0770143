"""Deciding who a request's credential belongs to. Raw headers in, a Principal or an error out.

Shared by the middleware and the token endpoint so that both apply the same rules.

The common admissions (a known key, a cached token for its device) have a compiled fast path,
:mod:`devicegate._speedups`, built when the package is installed with a C compiler. It only
ever admits what :meth:`Authenticator.authenticate` admits, with the same principal, and hands
everything else to it, refusals included. A non-empty ``DEVICEGATE_NO_EXTENSIONS`` in the
environment turns it off.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable
from typing import Any

from ._config import GateConfig
from ._credentials import match_key, read_credential
from ._errors import InvalidReason, InvalidToken
from ._principal import API_KEY, DEVICE_TOKEN, CredentialKind, Principal
from ._tokens import TokenVerifier

__all__ = ["Authenticator", "compiled_fast_path"]

EXTENSIONS_DISABLED = bool(os.environ.get("DEVICEGATE_NO_EXTENSIONS"))
"""Whether the environment turns the compiled fast path off (any non-empty value does)."""

FastPath: Any = None
# Not even imported when switched off, nor where the interpreter runs without the GIL: the
# extension relies on it, and importing it there would turn the GIL back on, with a warning.
if not EXTENSIONS_DISABLED and getattr(sys, "_is_gil_enabled", lambda: True)():
    try:
        from ._speedups import FastPath
    except ImportError:  # pragma: no cover - no compiler at install time, or not CPython
        FastPath = None


Admit = Callable[[Iterable[tuple[bytes, bytes]]], Principal | None]
"""``admit(headers)``: a principal, or ``None`` to decide in full."""


def compiled_fast_path() -> bool:
    """Whether authenticators built now use the compiled fast path."""
    return FastPath is not None


class Authenticator:
    """Checks the single credential in a request's headers against a :class:`GateConfig`.

    :attr:`admit` is the fast way in; :meth:`authenticate` decides everything. The compiled
    fast path mirrors the code here and in :meth:`TokenVerifier.check`, so it steps aside for a
    subclass of this class, and for cached tokens whenever ``verifier.check`` is another method
    (a subclass's, or a patch).
    """

    __slots__ = (
        "_api_key_header",
        "_api_keys",
        "_device_header",
        "_fast",
        "_mobile_api_keys",
        "_verifier",
        "configured_kinds",
    )

    def __init__(self, config: GateConfig) -> None:
        self._api_keys = tuple(key.encode() for key in config.api_keys)
        self._mobile_api_keys = tuple(key.encode() for key in config.mobile_api_keys)
        self._api_key_header = config.api_key_header.encode("latin-1")
        self._device_header = config.device_header.encode("latin-1")
        self._fast: Any = None
        if FastPath is not None and type(self) is Authenticator:
            self._fast = FastPath(
                TokenVerifier.check,
                self._api_key_header,
                self._device_header,
                self._api_keys,
                self._mobile_api_keys,
                _API_KEY_PRINCIPAL,
                _MOBILE_API_KEY_PRINCIPAL,
            )
        self.verifier = TokenVerifier(config)
        kinds = set()
        if self._api_keys:
            kinds.add(CredentialKind.API_KEY)
        if self._mobile_api_keys:
            kinds.add(CredentialKind.MOBILE_API_KEY)
        if config.jwt_secrets:
            kinds.add(CredentialKind.DEVICE_TOKEN)
        self.configured_kinds = frozenset(kinds)

    @property
    def verifier(self) -> TokenVerifier:
        """The verifier of device tokens; may be replaced (the fast path follows it)."""
        return self._verifier

    @verifier.setter
    def verifier(self, verifier: TokenVerifier) -> None:
        self._verifier = verifier
        if self._fast is not None:
            self._fast.verifier = verifier

    @property
    def admit(self) -> Admit:
        """``admit(headers)``: the principal of a request the fast path can admit, or ``None``
        when :meth:`authenticate` must decide (and refuse, if it refuses). Without the compiled
        module this is :meth:`authenticate` itself, which never returns ``None``.

        The function stays valid when :attr:`verifier` is replaced, so a caller may keep it.
        """
        if self._fast is None:
            return self.authenticate
        admit: Admit = self._fast.admit
        return admit

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
