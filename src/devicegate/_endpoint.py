"""The small ASGI apps that only a server API key may call: ``POST /gen-jwt`` here, and the
shape they share (POST only, a small JSON object in, a JSON object out, no caching)."""

from __future__ import annotations

import logging
from typing import Any

from starlette.types import Receive, Scope, Send

from ._asgi import send_json, send_refusal, serve_lifespan
from ._audit import log_mint
from ._auth import Authenticator
from ._claims import ClaimError
from ._config import GateConfig
from ._counters import Counters
from ._dpop import check_jkt
from ._errors import (
    DEFAULT_REALM,
    UNREADABLE_REQUEST,
    ConfigError,
    InsufficientScope,
    InvalidRequest,
    Refusal,
    check_realm,
)
from ._json import loads_strict_json
from ._principal import CredentialKind, Principal, get_principal
from ._ratelimit import RateLimiter
from ._tokens import TokenIssuer, validate_instance_id

__all__ = ["ServerKeyEndpoint", "TokenEndpoint"]

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
    return Refusal("The body may hold only instance_id, sub, claims, expires_in and dpop_jkt.")


# What a body may ask for besides instance_id, and the TokenIssuer.issue option each becomes.
_BODY_OPTIONS = {
    "sub": "subject",
    "claims": "claims",
    "expires_in": "lifetime",
    "dpop_jkt": "dpop_jkt",
}
_BODY_MEMBERS = frozenset({"instance_id", *_BODY_OPTIONS})


def _use_post() -> Refusal:
    return Refusal("Use POST.", status_code=405, headers=[(b"allow", b"POST")])


class ServerKeyEndpoint:
    """An ASGI app that answers ``POST`` requests made with the server API key, taking a JSON
    object of at most 4 KiB (or an empty body) and answering a JSON object that no cache keeps.

    Mounted alone, it authenticates the caller itself; behind
    :class:`~devicegate.DeviceAuthMiddleware` the middleware does and calls :meth:`respond`.
    Subclasses say what to do in :meth:`answer`.

    Raises:
        ConfigError: the configuration has no server API key.
    """

    kind = "admin"
    """What the endpoint is, for error messages and logs."""

    def __init__(
        self, config: GateConfig, *, realm: str = DEFAULT_REALM, counters: Counters | None = None
    ) -> None:
        if not config.api_keys:
            raise ConfigError("api_keys", f"the {self.kind} endpoint needs a server API key")
        check_realm(realm)
        self._config = config
        self._counters = counters
        # Built on first use: behind the middleware (which authenticates itself and calls
        # respond()) it is never needed, and it holds a token cache of its own.
        self._authenticator: Authenticator | None = None
        self._realm = realm

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
                "devicegate %s endpoint could not read a request (%s)",
                self.kind,
                type(exc).__name__,
            )
            await send_refusal(scope, send, InvalidRequest(UNREADABLE_REQUEST), self._realm)
            return
        await self._respond(scope, receive, send, principal)

    async def respond(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer an already-authenticated request (the middleware's entry point): the caller
        is the principal in ``scope["user"]``."""
        await self._respond(scope, receive, send, get_principal(scope))

    async def _respond(
        self, scope: Scope, receive: Receive, send: Send, caller: Principal | None
    ) -> None:
        try:
            if scope["type"] != "http" or scope["method"] != "POST":
                raise _use_post()
            body = await _read_body(scope, receive)
            payload = await self.answer(_json_object(body), caller)
        except Refusal as refusal:
            await send_refusal(scope, send, refusal, self._realm)
            return
        except _Disconnected:
            return
        # RFC 6749 §5.1: token responses must not be cached (send_json adds Cache-Control);
        # nor must anything else these endpoints answer.
        await send_json(scope, send, 200, payload, (b"pragma", b"no-cache"))

    async def answer(self, data: dict[str, Any], caller: Principal | None) -> dict[str, Any]:
        """The JSON answer to a request whose body is ``data`` (``{}`` for an empty body).

        Raises:
            Refusal: the request cannot be served; its description is sent.
        """
        raise NotImplementedError


class TokenEndpoint(ServerKeyEndpoint):
    """An ASGI app that mints device tokens for callers holding the server API key.

    ``POST`` with ``X-API-Key`` and a JSON body ``{"instance_id": "<device id>"}`` mints a token
    bound to that device; ``{}`` or an empty body mints a generic token. The body may also
    hold ``sub`` (who the token is for), ``claims`` (an object of application claims),
    ``expires_in`` (a lifetime no longer than the configured one) and ``dpop_jkt`` (the
    thumbprint of the device's key: a DPoP-bound token, ``token_type`` ``DPoP``); any other
    member is refused, and so are registered or devicegate-owned names inside ``claims``: a
    caller never chooses ``exp``, ``jti``, ``alg`` or the like. A token minted with a named
    server key records the name in ``azp``. The answer is an OAuth 2.0 token response (RFC
    6749 §5.1) with ``Cache-Control: no-store``.

    Mounted alone, it authenticates the caller itself; behind
    :class:`~devicegate.DeviceAuthMiddleware` (at its ``token_path``) the middleware does.

    Args:
        config: needs ``api_keys`` and a key that signs; its ``mint_limit_per_key`` and
            ``mint_limit_per_device`` are enforced (429 with ``Retry-After``).
        realm: the realm of ``WWW-Authenticate`` challenges.
        limiter: where those limits are counted (default: in memory, for this endpoint).

    Raises:
        ConfigError: the configuration has no API key or no JWT secret.

    References:
        https://www.rfc-editor.org/rfc/rfc6749#section-5.1
    """

    kind = "token"

    def __init__(
        self,
        config: GateConfig,
        *,
        realm: str = DEFAULT_REALM,
        counters: Counters | None = None,
        limiter: RateLimiter | None = None,
    ) -> None:
        super().__init__(config, realm=realm, counters=counters)
        self.issuer = TokenIssuer(config)
        if limiter is None:
            limiter = RateLimiter(config)
        self._limiter = limiter if limiter.active else None

    def __repr__(self) -> str:
        return f"<TokenEndpoint {self.issuer!r}>"

    async def mint(self, scope: Scope, receive: Receive, send: Send) -> None:
        """:meth:`respond`, by the name this endpoint has always had."""
        await self.respond(scope, receive, send)

    async def answer(self, data: dict[str, Any], caller: Principal | None) -> dict[str, Any]:
        if not data.keys() <= _BODY_MEMBERS:
            # Refused rather than ignored: a misspelt member ("expires") must not quietly
            # mint a token that lives longer than the caller meant.
            raise _unknown_member()
        options = {
            option: data[member] for member, option in _BODY_OPTIONS.items() if member in data
        }
        instance_id: str | None = None
        if "instance_id" in data:
            try:
                instance_id = validate_instance_id(data["instance_id"])
            except ValueError:
                raise _bad_instance_id() from None
        elif self.issuer.requires_binding:
            raise _binding_required()
        if "dpop_jkt" in data:
            try:
                check_jkt(data["dpop_jkt"])
            except ValueError as exc:
                raise Refusal(f"{exc}.") from None
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
        if self._limiter is not None:
            # Counted once the request is known to be good (a refused one uses up nothing);
            # over a limit, the token just made is dropped unseen.
            await self._limiter.check_mint(None if caller is None else caller.key_name, instance_id)
        if self._counters is not None:
            self._counters.minted += 1
        log_mint(
            token.claims["jti"],
            instance_id,
            None if caller is None else caller.key_name,
            token.expires_in,
        )
        return token.as_response()


class _Disconnected(Exception):
    pass


def _json_object(body: bytes) -> dict[str, Any]:
    """The JSON object in ``body`` (``{}`` when it is empty)."""
    if not body.strip():
        return {}
    try:
        data = loads_strict_json(body.decode("utf-8"))
    except (ValueError, RecursionError):
        raise _not_object() from None
    if not isinstance(data, dict):
        raise _not_object()
    return data


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
