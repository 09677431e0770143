"""The client side, for Python callers of a devicegate-protected API: ``httpx`` authentication.

:class:`DeviceTokenAuth` sends a device token with its device header, and gets a new one from
a callable of yours (your app server's login, say) when it has none, when the one it has is
about to expire, and once when the server refuses it. :class:`DPoPAuth` does the same with a
token bound to a private key it holds (P-256 or Ed25519), and signs a fresh DPoP proof (RFC
9449) for every request; a server that asks for a nonce (``use_dpop_nonce``) gets one more try.

Both work with ``httpx.Client`` and ``httpx.AsyncClient``; with the latter the callable may be
a coroutine function. Needs ``httpx`` (the ``server`` extra), and ``cryptography`` (the
``crypto`` extra) for DPoP.

    auth = DPoPAuth(fetch_token, private_key=key, device_id="device-123")
    with httpx.Client(base_url="https://api.example.com", auth=auth) as http:
        http.get("/items")
"""

from __future__ import annotations

import hashlib
import inspect
import json
import secrets
import threading
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Generator
from typing import TYPE_CHECKING, Any

import httpx

from . import _base64url as base64url
from ._errors import ConfigError
from ._keys import EcdsaKey, EdDsaKey
from ._tokens import unverified_claims

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

__all__ = ["DPoPAuth", "DeviceTokenAuth"]

TokenSource = Callable[[], str] | Callable[[], Awaitable[str]]


class DeviceTokenAuth(httpx.Auth):
    """Authenticates requests with a device token, fetched again when needed.

    Args:
        fetch_token: returns a fresh access token (a coroutine function too, for an
            ``AsyncClient``). Called when there is none yet, when the current one expires
            within ``margin_seconds``, and once more when the server answers 401.
        device_id: sent in ``device_header`` with every request (a bound token needs it).
        device_header: the header devicegate reads the device id from.
        margin_seconds: how long before its ``exp`` a token is replaced.
    """

    requires_request_body = True  # a refused request is sent again, body included
    scheme = "Bearer"

    def __init__(
        self,
        fetch_token: TokenSource,
        *,
        device_id: str | None = None,
        device_header: str = "X-Instance-ID",
        margin_seconds: float = 10.0,
    ) -> None:
        self._fetch = fetch_token
        self._device_id = device_id
        self._device_header = device_header
        self._margin = margin_seconds
        self._token: str | None = None
        self._expires_at = 0.0
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} device_id={self._device_id!r}>"  # never the token

    # -- the token ----------------------------------------------------------------------------

    def _current(self) -> str | None:
        with self._lock:
            if self._token is not None and time.time() < self._expires_at - self._margin:
                return self._token
            return None

    def _store(self, token: object) -> str:
        if not isinstance(token, str) or not token:
            raise TypeError("fetch_token must return the access token as a non-empty string")
        with self._lock:
            self._token, self._expires_at = token, _expiry_of(token)
        return token

    def _token_sync(self, *, fresh: bool = False) -> str:
        current = None if fresh else self._current()
        if current is not None:
            return current
        token = self._fetch()
        if inspect.isawaitable(token):
            if inspect.iscoroutine(token):
                token.close()  # never run: no "was never awaited" warning
            raise TypeError("fetch_token is a coroutine function: use an httpx.AsyncClient")
        return self._store(token)

    async def _token_async(self, *, fresh: bool = False) -> str:
        current = None if fresh else self._current()
        if current is not None:
            return current
        token = self._fetch()
        if inspect.isawaitable(token):
            token = await token
        return self._store(token)

    # -- the requests -------------------------------------------------------------------------

    def _authorize(self, request: httpx.Request, token: str) -> None:
        request.headers["Authorization"] = f"{self.scheme} {token}"
        if self._device_id is not None:
            request.headers[self._device_header] = self._device_id

    def _read(self, response: httpx.Response) -> None:
        """Take what an answer tells of the next requests (nothing, here)."""

    def _retry(self, response: httpx.Response) -> str | None:
        """Why to send the request once more: ``"token"`` for a refused token, or ``None``."""
        return "token" if response.status_code == 401 else None

    def sync_auth_flow(
        self, request: httpx.Request
    ) -> Generator[httpx.Request, httpx.Response, None]:
        self._authorize(request, token := self._token_sync())
        response = yield request
        self._read(response)
        why = self._retry(response)
        if why is not None:
            if why == "token":
                token = self._token_sync(fresh=True)
            self._authorize(request, token)
            self._read((yield request))

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        self._authorize(request, token := await self._token_async())
        response = yield request
        self._read(response)
        why = self._retry(response)
        if why is not None:
            if why == "token":
                token = await self._token_async(fresh=True)
            self._authorize(request, token)
            self._read((yield request))


class DPoPAuth(DeviceTokenAuth):
    """:class:`DeviceTokenAuth` for tokens bound to a key: ``Authorization: DPoP`` and a fresh
    proof signed with ``private_key`` on every request (RFC 9449 §4).

    Mint the token for :attr:`jkt`, the key's thumbprint: ``{"dpop_jkt": auth.jkt}`` in the
    ``POST /gen-jwt`` body your app server sends.

    Args:
        fetch_token: as for :class:`DeviceTokenAuth`.
        private_key: a ``cryptography`` Ed25519 or P-256 private key (on a phone, the one in
            the Keystore or Secure Enclave; here, one you keep safe).
        device_id, device_header, margin_seconds: as for :class:`DeviceTokenAuth`.

    Raises:
        ConfigError: the key is neither Ed25519 nor P-256.
    """

    scheme = "DPoP"

    def __init__(
        self,
        fetch_token: TokenSource,
        *,
        private_key: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey,
        device_id: str | None = None,
        device_header: str = "X-Instance-ID",
        margin_seconds: float = 10.0,
    ) -> None:
        super().__init__(
            fetch_token,
            device_id=device_id,
            device_header=device_header,
            margin_seconds=margin_seconds,
        )
        self._key = _signing_key(private_key)
        jwk = self._key.public_jwk()
        public = {name: value for name, value in jwk.items() if name not in ("kid", "use")}
        header = {"typ": "dpop+jwt", "alg": self._key.algorithm, "jwk": public}
        self._header = base64url.encode(json.dumps(header, separators=(",", ":")).encode())
        self._nonce: str | None = None

    @property
    def jkt(self) -> str:
        """The RFC 7638 thumbprint of the key: the ``dpop_jkt`` to mint tokens for."""
        return self._key.kid

    def proof(self, method: str, url: httpx.URL | str, token: str) -> str:
        """A DPoP proof for one request: ``method`` to ``url`` (its query and fragment are not
        part of it) with ``token``."""
        target = httpx.URL(str(url)).copy_with(query=None, fragment=None)
        claims: dict[str, Any] = {
            "jti": secrets.token_urlsafe(16),
            "htm": method,
            "htu": str(target),
            "iat": int(time.time()),
            "ath": base64url.encode_text(hashlib.sha256(token.encode()).digest()),
        }
        if self._nonce is not None:
            claims["nonce"] = self._nonce
        payload = base64url.encode(json.dumps(claims, separators=(",", ":")).encode())
        signing_input = self._header + b"." + payload
        return (signing_input + b"." + base64url.encode(self._key.sign(signing_input))).decode()

    def _authorize(self, request: httpx.Request, token: str) -> None:
        super()._authorize(request, token)
        request.headers["DPoP"] = self.proof(request.method, request.url, token)

    def _read(self, response: httpx.Response) -> None:
        # RFC 9449 §8.2: any answer may offer the nonce to sign the next proofs with.
        nonce = response.headers.get("DPoP-Nonce")
        if nonce:
            self._nonce = nonce

    def _retry(self, response: httpx.Response) -> str | None:
        # RFC 9449 §8: a server that wants a nonce says so and gives one (read above); the
        # proof is then signed again with it (the token is fine).
        challenge = response.headers.get("WWW-Authenticate", "")
        if response.headers.get("DPoP-Nonce") and 'error="use_dpop_nonce"' in challenge:
            return "nonce"
        return super()._retry(response)


def _signing_key(private_key: object) -> EdDsaKey | EcdsaKey:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    if isinstance(private_key, ed25519.Ed25519PrivateKey):
        return EdDsaKey(private_key.public_key(), private_key)
    if isinstance(private_key, ec.EllipticCurvePrivateKey) and isinstance(
        private_key.curve, ec.SECP256R1
    ):
        return EcdsaKey(private_key.public_key(), private_key)
    raise ConfigError("private_key", "must be an Ed25519 or P-256 private key (cryptography)")


def _expiry_of(token: str) -> float:
    """The token's ``exp``, read without verifying (the server verifies); ``inf`` when absent
    or unreadable, so that only the server's refusal replaces it."""
    exp = unverified_claims(token).get("exp")
    if isinstance(exp, bool) or not isinstance(exp, (int, float)):
        return float("inf")
    return float(exp)
