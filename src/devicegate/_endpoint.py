"""TokenEndpoint: the ASGI app behind ``POST /gen-jwt``."""

from __future__ import annotations

import logging
from typing import Any

from starlette.types import Receive, Scope, Send

from ._asgi import send_json, send_refusal, serve_lifespan
from ._auth import Authenticator
from ._claims import ClaimError
from ._config import GateConfig
from ._errors import (
    UNREADABLE_REQUEST,
    ConfigError,
    InsufficientScope,
    InvalidRequest,
    Refusal,
    check_realm,
)
from ._json import loads_strict_json
from ._principal import CredentialKind, Principal, get_principal
from ._tokens import TokenIssuer, validate_instance_id

__all__ = ["TokenEndpoint"]

logger = logging.getLogger("devicegate")

MAX_BODY_BYTES = 4096


# Refusals of the body: not about the credential, so no RFC 6750 challenge. Built fresh each
# time (a shared instance would carry one request's traceback into the next).
def _too_large() -> Refusal:
    return Refusal(
        f"The request body is larger than {MAX_BODY_BYTES} bytes.", status_code=413, close=True
    )


def _not_object() -> Refusal:
    return Refusal("The body must be empty or a JSON object.")


def _bad_instance_id() -> Refusal:
    return Refusal(
        "instance_id must be a string of 1 to 256 printable ASCII characters without "
        "surrounding spaces."
    )


def _binding_required() -> Refusal:
    return Refusal("This server only mints device-bound tokens.")


def _unknown_member() -> Refusal:
    return Refusal("The body may hold only instance_id, sub, claims and expires_in.")


# What a body may ask for besides instance_id, and the TokenIssuer.issue option each becomes.
_BODY_OPTIONS = {"sub": "subject", "claims": "claims", "expires_in": "lifetime"}
_BODY_MEMBERS = frozenset({"instance_id", *_BODY_OPTIONS})


def _use_post() -> Refusal:
    return Refusal("Use POST.", status_code=405, headers=[(b"allow", b"POST")])


class TokenEndpoint:
    """An ASGI app that mints device tokens for callers holding the server API key.

    ``POST`` with ``X-API-Key`` and a JSON body ``{"instance_id": "<device id>"}`` mints a token
    bound to that device; ``{}`` or an empty body mints a generic token. The body may also
    hold ``sub`` (who the token is for), ``claims`` (an object of application claims) and
    ``expires_in`` (a lifetime no longer than the configured one); any other member is
    refused, and so are registered or devicegate-owned names inside ``claims``: a caller never
    chooses ``exp``, ``jti``, ``alg`` or the like. A token minted with a named server key
    records the name in ``azp``. The answer is an OAuth 2.0 token response (RFC 6749 §5.1)
    with ``Cache-Control: no-store``.

    Mounted alone, it authenticates the caller itself; behind
    :class:`~devicegate.DeviceAuthMiddleware` (at its ``token_path``) the middleware does.

    Args:
        config: needs ``api_keys`` and ``jwt_secret``.
        realm: the realm of ``WWW-Authenticate`` challenges.

    Raises:
        ConfigError: the configuration has no API key or no JWT secret.

    References:
        https://www.rfc-editor.org/rfc/rfc6749#section-5.1
    """

    def __init__(self, config: GateConfig, *, realm: str = "devicegate") -> None:
        if not config.api_keys:
            raise ConfigError("api_keys", "the token endpoint needs a server API key")
        check_realm(realm)
        self.issuer = TokenIssuer(config)
        self._config = config
        # Built on first use: behind the middleware (which authenticates itself and calls
        # mint()) it is never needed, and it holds a token cache of its own.
        self._authenticator: Authenticator | None = None
        self._realm = realm

    def __repr__(self) -> str:
        return f"<TokenEndpoint {self.issuer!r}>"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await serve_lifespan(receive, send)
            return
        try:
            if self._authenticator is None:
                self._authenticator = Authenticator(self._config)
            principal = self._authenticator.authenticate(scope)
            if principal.kind is not CredentialKind.API_KEY:
                raise InsufficientScope()
        except Refusal as refusal:
            await send_refusal(scope, send, refusal, self._realm)
            return
        except Exception as exc:  # fail closed, as the middleware does
            logger.error(
                "devicegate token endpoint could not read a request (%s)", type(exc).__name__
            )
            await send_refusal(scope, send, InvalidRequest(UNREADABLE_REQUEST), self._realm)
            return
        await self._mint(scope, receive, send, principal)

    async def mint(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer an already-authenticated request (the middleware's entry point): the caller
        is the principal in ``scope["user"]``."""
        await self._mint(scope, receive, send, get_principal(scope))

    async def _mint(
        self, scope: Scope, receive: Receive, send: Send, caller: Principal | None
    ) -> None:
        try:
            if scope["type"] != "http" or scope["method"] != "POST":
                raise _use_post()
            body = await _read_body(scope, receive)
            instance_id, options = self._parse(body)
            try:
                token = self.issuer.issue(
                    instance_id,
                    # Which named server key asked: recorded, never chosen by the body.
                    authorized_party=None if caller is None else caller.key_name,
                    **options,
                )
            except ClaimError as exc:
                # The message is devicegate's own text, naming devicegate's own member names.
                raise Refusal(f"{exc}.") from None
        except Refusal as refusal:
            await send_refusal(scope, send, refusal, self._realm)
            return
        except _Disconnected:
            return
        logger.info("devicegate minted a %s token", "bound" if instance_id else "generic")
        # RFC 6749 §5.1: token responses must not be cached (send_json adds Cache-Control).
        await send_json(scope, send, 200, token.as_response(), (b"pragma", b"no-cache"))

    def _parse(self, body: bytes) -> tuple[str | None, dict[str, Any]]:
        """``(instance_id, the issuer's other options)`` that the body asks for."""
        if not body.strip():
            data: object = {}
        else:
            try:
                data = loads_strict_json(body.decode("utf-8"))
            except (ValueError, RecursionError):
                raise _not_object() from None
        if not isinstance(data, dict):
            raise _not_object()
        if not data.keys() <= _BODY_MEMBERS:
            # Refused rather than ignored: a misspelt member ("expires") must not quietly
            # mint a token that lives longer than the caller meant.
            raise _unknown_member()
        options = {
            option: data[member] for member, option in _BODY_OPTIONS.items() if member in data
        }
        if "instance_id" not in data:
            if self.issuer.requires_binding:
                raise _binding_required()
            return None, options
        try:
            return validate_instance_id(data["instance_id"]), options
        except ValueError:
            raise _bad_instance_id() from None


class _Disconnected(Exception):
    pass


async def _read_body(scope: Scope, receive: Receive) -> bytes:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                declared = int(value)
            except ValueError:
                declared = 0
            if declared > MAX_BODY_BYTES:
                raise _too_large()
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Disconnected
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise _too_large()
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)
