"""DeviceAuthMiddleware: the pure-ASGI gate in front of an application."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from starlette.authentication import UnauthenticatedUser
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ._asgi import send_refusal
from ._audit import log_refusal, refusal_reason
from ._auth import DPOP_NONCE, DPOP_REPLAY_KEY, Authenticator
from ._bounded import remember
from ._config import GateConfig
from ._counters import Counters
from ._dpop import ReplayCache, SharedReplayStore
from ._endpoint import ServerKeyEndpoint, TokenEndpoint
from ._errors import (
    DEFAULT_REALM,
    UNREADABLE_REQUEST,
    AuthError,
    ConfigError,
    InsufficientScope,
    InvalidRequest,
    MissingCredentials,
    Refusal,
    check_realm,
)
from ._jwks import JwksEndpoint
from ._principal import (
    DEVICE_TOKEN,
    CredentialKind,
    Principal,
    credentials_for,
    unauthenticated_credentials,
)
from ._ratelimit import RateLimiter, blocked_refusal, counts_as_failure
from ._revocation import RevocationCheck, RevocationStore
from ._revoke import RevocationEndpoint
from ._rules import Rule, RuleTable, has_unsafe_segments, strip_root_path
from ._tokens import TokenVerifier

__all__ = ["DeviceAuthMiddleware", "ErrorHandler"]

logger = logging.getLogger("devicegate")

ErrorHandler = Callable[[Scope, AuthError], ASGIApp]
"""``on_error(scope, error)`` returns the ASGI app that sends the error response for a refused
credential. Other refusals (a store that cannot answer, say) use the built-in response."""

# What the built-in endpoints (minting, revoking) accept: the server API key alone.
_SERVER_KEY_ONLY = frozenset({CredentialKind.API_KEY})
# Paths whose decision is remembered, and the longest remembered path. Bounded so that a
# client sending endless distinct paths costs at most about half a megabyte.
_ROUTE_CACHE_SIZE = 1024
_MAX_CACHED_PATH = 512
_UNSAFE_PATH = (
    "The request path has '.', '..' or empty segments, a backslash, a semicolon or a "
    "non-printable character."
)


class _Endpoint(Protocol):
    """A built-in endpoint: answers a request the middleware has authenticated (or, for a
    public one, let through)."""

    async def respond(self, scope: Scope, receive: Receive, send: Send) -> None: ...


@dataclass(frozen=True, slots=True)
class _Route:
    """What a request path decides before any credential is read.

    Slotted rather than a named tuple: every request reads a few of its fields, and a slot is
    the cheapest attribute there is to read.
    """

    accepted: frozenset[CredentialKind]
    public: bool
    endpoint: _Endpoint | None
    optional: bool = False
    dpop: bool = False


class DeviceAuthMiddleware:
    """Admit a request only with a valid API key, mobile API key or device-bound token.

    Every ``http`` and ``websocket`` scope is authenticated before the wrapped app sees it;
    only ``lifespan`` passes through untouched. A request is either handed to the app with
    ``scope["user"]`` set to a :class:`~devicegate.Principal` (and ``scope["auth"]`` to
    read-only Starlette ``AuthCredentials`` holding the credential kind), or answered here with
    an RFC 6750 error and never reaches the app. Websockets are decided on the handshake, before
    ``websocket.accept``.

    Args:
        app: the ASGI app to protect.
        config: keys, secrets and claim rules.
        rules: per-path policies; the first match wins, and with no match every configured
            credential kind is accepted.
        token_path: the route path served by a built-in :class:`~devicegate.TokenEndpoint`
            (server API key only), or ``None``. Active when the configuration has both an API key
            and a JWT secret.
        on_error: ``on_error(scope, error)`` returns an ASGI app that renders ``error`` (HTTP
            only; websocket handshakes always use the built-in denial).
        realm: the ``realm`` of ``WWW-Authenticate`` challenges.
        revocations: asked whether a verified device token was revoked (a
            :class:`~devicegate.RevocationList`, or a shared store); a revoked token is
            refused on its very next request, cached or not.
        verifier: the device-token verifier, for a token cache or clock of your own, or a
            subclass (default: ``TokenVerifier(config, revocations=revocations)``). It must be
            built from the same ``config``; give ``revocations`` to it, not here.
        revoke_path: the route path served by a built-in
            :class:`~devicegate.RevocationEndpoint` (server API key only), or ``None``. Active
            when the configuration has an API key and the revocations can be written to (a
            :class:`~devicegate.RevocationList`, or a shared store).
        counters: where to count what is admitted, refused, minted and revoked (for
            :mod:`devicegate.metrics`); ``None`` counts nothing.
        jwks_path: the route path served by a built-in :class:`~devicegate.JwksEndpoint`
            (public: no credential needed), or ``None``. Active when the configuration has an
            EdDSA or ES256 key to publish.
        rate_limit_storage: where the configuration's rate limits (``mint_limit_per_key``,
            ``mint_limit_per_device``, ``failure_limit_per_address``) are counted: a
            ``limits`` storage URI, ``memory://`` (the default) or a Redis every instance
            shares, ``redis://host:port/db``.
        dpop_replay: a :class:`~devicegate._dpop.SharedReplayStore` every instance shares, so
            that a DPoP proof used on one is refused on all (default: each process remembers
            the proofs it saw).

    Raises:
        ConfigError: a rule is not a :class:`~devicegate.Rule`, ``token_path`` or
            ``revoke_path`` is not a clean absolute path (or they are the same), a rule
            accepts only kinds the configuration does not have, or both ``verifier`` and
            ``revocations`` are given.

    References:
        https://www.rfc-editor.org/rfc/rfc6750#section-3
        https://www.rfc-editor.org/rfc/rfc8725
        https://asgi.readthedocs.io/en/latest/extensions.html#websocket-denial-response
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        config: GateConfig,
        rules: Iterable[Rule] = (),
        token_path: str | None = "/gen-jwt",  # noqa: S107 - a path, not a secret
        on_error: ErrorHandler | None = None,
        realm: str = DEFAULT_REALM,
        revocations: RevocationCheck | None = None,
        verifier: TokenVerifier | None = None,
        revoke_path: str | None = "/revoke",
        counters: Counters | None = None,
        jwks_path: str | None = "/.well-known/jwks.json",
        rate_limit_storage: str | None = None,
        dpop_replay: SharedReplayStore | None = None,
    ) -> None:
        if not isinstance(config, GateConfig):
            raise ConfigError("config", f"must be a GateConfig, got {type(config).__name__}")
        if verifier is None:
            verifier = TokenVerifier(config, revocations=revocations)
        elif not isinstance(verifier, TokenVerifier):
            raise ConfigError("verifier", f"must be a TokenVerifier, got {type(verifier).__name__}")
        elif revocations is not None:
            raise ConfigError(
                "revocations", "give the revocations to the verifier you pass, not to both"
            )
        self.app = app
        rules = tuple(rules)
        for rule in rules:
            if not isinstance(rule, Rule):
                raise ConfigError("rules", f"every rule must be a Rule, got {rule!r}")
        for field, path, example in (
            ("token_path", token_path, "/gen-jwt"),
            ("revoke_path", revoke_path, "/revoke"),
            ("jwks_path", jwks_path, "/.well-known/jwks.json"),
        ):
            if path is not None and (not isinstance(path, str) or has_unsafe_segments(path)):
                raise ConfigError(field, f"must be an absolute path such as {example!r} or None")
        if token_path is not None and token_path == revoke_path:
            raise ConfigError("revoke_path", "must differ from token_path")
        if jwks_path is not None and jwks_path in (token_path, revoke_path):
            raise ConfigError("jwks_path", "must differ from token_path and revoke_path")
        check_realm(realm)
        self._rules = rules
        self._paths = (token_path, revoke_path, jwks_path)
        self._on_error = on_error
        self._realm = realm
        self._counters = counters
        self._rate_limit_storage = rate_limit_storage
        self._dpop_replay = dpop_replay
        limiter = RateLimiter(config, rate_limit_storage)
        # Accepted DPoP proofs, remembered across reconfigurations: a reload forgets none.
        self._dpop_seen = ReplayCache()
        # Everything that follows from the configuration, compiled once and swapped whole by
        # reconfigure(): a request reads it once, so it never sees half of each.
        self._gate = _Gate(
            config, verifier, rules, self._paths, realm, counters, limiter, self._dpop_seen
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(app={self.app!r}, config={self.config!r}, "
            f"rules={list(self.rules)!r}, token_path={self.token_path!r})"
        )

    @property
    def config(self) -> GateConfig:
        """The configuration in force."""
        return self._gate.config

    @property
    def rules(self) -> tuple[Rule, ...]:
        """The rules, in the order they are tried."""
        return self._rules

    @property
    def verifier(self) -> TokenVerifier:
        """The device-token verifier in force: its cache, its revocations."""
        return self._gate.authenticator.verifier

    @property
    def token_path(self) -> str | None:
        """The route path of the built-in token endpoint, or ``None``."""
        return self._gate.token_path

    @property
    def revoke_path(self) -> str | None:
        """The route path of the built-in revocation endpoint, or ``None``."""
        return self._gate.revoke_path

    @property
    def jwks_path(self) -> str | None:
        """The route path of the built-in JWKS endpoint, or ``None``."""
        return self._gate.jwks_path

    def clear_token_cache(self) -> None:
        """Forget every verified token, so that each is verified again in full on its next use.

        Clearing revokes nothing by itself (revoke through ``revocations``); to change keys or
        secrets, :meth:`reconfigure`.
        """
        self._gate.authenticator.verifier.clear_cache()

    def reconfigure(self, config: GateConfig, *, verifier: TokenVerifier | None = None) -> None:
        """Put ``config`` in force for every request that starts from now on: new keys and
        secrets, without a restart. Requests already under way finish under the old one.

        Everything is built and checked before anything changes: when ``config`` does not fit
        (a rule would accept no configured kind, say) this raises and the configuration in
        force stays. Verified tokens are forgotten, so that a token signed with a secret that
        is gone stops working at once; the revocations are kept.

        Args:
            config: the new configuration.
            verifier: the verifier to use from now on, for a token cache or clock of your own
                (default: a new ``TokenVerifier(config)`` with the revocations in force).

        Raises:
            ConfigError: as the constructor.
        """
        if not isinstance(config, GateConfig):
            raise ConfigError("config", f"must be a GateConfig, got {type(config).__name__}")
        before = self._gate
        if verifier is None:
            old = before.authenticator.verifier
            # The same remote key set keeps its last good keys (and its thread).
            remote = old.remote_keys if before.config.jwks_url == config.jwks_url else None
            verifier = TokenVerifier(config, revocations=old.revocations, remote_keys=remote)
        # The same storage keeps its counts and blocked addresses.
        limiter = before.limiter.reconfigured(config, self._rate_limit_storage)
        self._gate = _Gate(
            config,
            verifier,
            self._rules,
            self._paths,
            self._realm,
            self._counters,
            limiter,
            self._dpop_seen,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope_type = scope["type"]
        if scope_type != "http" and scope_type != "websocket":
            if scope_type == "lifespan":
                await self.app(scope, receive, send)
                return
            # Deny by default: a scope type we do not know is not passed on unauthenticated.
            raise RuntimeError(f"devicegate cannot authenticate ASGI scope type {scope_type!r}")

        principal: Principal | None
        gate = self._gate
        try:
            path = scope["path"]
            root_path = scope.get("root_path")
            # Keyed by the path alone in the usual case (no mount point); a str never equals
            # a tuple, so the two kinds of key cannot collide.
            key = (root_path, path) if root_path else path
            routes = gate.routes
            route = routes.get(key)
            if route is None:
                route = gate.route(path, root_path)  # raises for an unsafe path: not kept
                if len(path) <= _MAX_CACHED_PATH:
                    # Full when paths carry ids: start over (no LRU bookkeeping per request).
                    remember(routes, key, route, _ROUTE_CACHE_SIZE)
            if route.public:
                principal = None
            else:
                # An address over its limit of failed authentications (one truth test of an
                # empty dict otherwise) is admitted only with a credential known good already.
                blocked = gate.blocked and _blocked_for(gate, scope)
                try:
                    if blocked:
                        principal = gate.authenticator.authenticate_known(scope)
                    else:
                        principal = gate.authenticator.authenticate(scope)
                except MissingCredentials:
                    if not route.optional:
                        raise
                    principal = None  # no credential at all, where none is needed
                except Refusal:
                    if blocked:
                        raise blocked_refusal(blocked) from None
                    raise
                else:
                    if principal.kind not in route.accepted:
                        refused = InsufficientScope()
                        refused.credential_kind = principal.kind.value
                        raise refused
                    if route.dpop and principal.kind is DEVICE_TOKEN and principal.dpop_jkt is None:
                        raise gate.authenticator.dpop_required()
                    if gate.proofs and DPOP_REPLAY_KEY in scope:
                        # The proof check's notes, for here alone: the app never sees them.
                        replay_key = scope.pop(DPOP_REPLAY_KEY)
                        nonce = scope.pop(DPOP_NONCE, None)
                        if self._dpop_replay is not None:
                            await _check_shared_replay(self._dpop_replay, replay_key, gate)
                        if nonce is not None:
                            send = _offering_nonce(send, nonce)
        except Refusal as error:
            await self._deny(scope, receive, send, error)
            return
        except Exception as exc:  # fail closed: a surprise is a refusal, never a pass
            logger.error("devicegate refused a request it could not read (%s)", type(exc).__name__)
            await self._deny(scope, receive, send, InvalidRequest(UNREADABLE_REQUEST))
            return

        counters = self._counters
        if counters is not None:
            counters.admitted["none" if principal is None else principal.kind] += 1
        # The principal comes from us alone: overwrite whatever an earlier layer put there.
        # The credentials are shared and read-only: no app can widen the next request's scopes.
        if principal is None:
            scope["user"] = UnauthenticatedUser()
            scope["auth"] = unauthenticated_credentials
        else:
            scope["user"] = principal
            scope["auth"] = credentials_for[principal.kind]
        if route.endpoint is not None:
            await route.endpoint.respond(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _deny(self, scope: Scope, receive: Receive, send: Send, error: Refusal) -> None:
        log_refusal(scope, error)
        limiter = self._gate.limiter
        if limiter.per_address is not None and counts_as_failure(error):
            client = scope.get("client")
            if client:
                await limiter.failed(client[0])
        if self._counters is not None:
            kind = (error.credential_kind if isinstance(error, AuthError) else None) or "none"
            self._counters.refused[kind, refusal_reason(error)] += 1
        if self._on_error is not None and scope["type"] == "http" and isinstance(error, AuthError):
            try:
                responder = self._on_error(scope, error)
            except Exception as exc:
                logger.error("devicegate on_error handler raised %s", type(exc).__name__)
            else:
                started = False

                async def send_tracked(message: Message) -> None:
                    nonlocal started
                    started = True
                    await send(message)

                try:
                    await responder(scope, receive, send_tracked)
                except Exception as exc:
                    # Before anything was sent we can still answer properly; after, the
                    # server must see the failure.
                    if started:
                        raise
                    logger.error("devicegate on_error response raised %s", type(exc).__name__)
                else:
                    if started:
                        return
                    logger.error("devicegate on_error response sent nothing")
        await send_refusal(scope, send, error, self._realm)


async def _check_shared_replay(store: SharedReplayStore, replay_key: str, gate: _Gate) -> None:
    """Refuse a DPoP proof another instance has accepted already."""
    if not await store.first_use(replay_key, gate.authenticator.dpop_proof_lifetime):
        raise gate.authenticator.replayed_proof()


def _offering_nonce(send: Send, nonce: str) -> Send:
    """``send`` adding a ``DPoP-Nonce`` header to the answer (RFC 9449 §8.2): the client's
    nonce has aged and this one replaces it."""
    header = (b"dpop-nonce", nonce.encode("ascii"))

    async def offering(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), header]}
        await send(message)

    return offering


def _blocked_for(gate: _Gate, scope: Scope) -> float | None:
    client = scope.get("client")
    return gate.limiter.blocked_for(client[0]) if client else None


class _Gate:
    """What a middleware decides requests with, compiled from one configuration.

    Raises:
        ConfigError: a rule accepts only kinds the configuration does not have.
    """

    __slots__ = (
        "authenticator",
        "blocked",
        "config",
        "jwks_path",
        "limiter",
        "proofs",
        "revoke_path",
        "routes",
        "rule_table",
        "server_key_routes",
        "token_path",
    )

    def __init__(
        self,
        config: GateConfig,
        verifier: TokenVerifier,
        rules: tuple[Rule, ...],
        paths: tuple[str | None, str | None, str | None],
        realm: str,
        counters: Counters | None,
        limiter: RateLimiter,
        dpop_seen: ReplayCache,
    ) -> None:
        token_path, revoke_path, jwks_path = paths
        self.config = config
        self.limiter = limiter
        # The limiter's own dict: empty (and so one truth test a request) unless an address
        # is over its limit.
        self.blocked = limiter.blocked
        self.authenticator = Authenticator(config, verifier=verifier, replay=dpop_seen)
        # Whether DPoP proofs are checked at all: if not, nothing follows a proof check.
        self.proofs = self.authenticator.takes_proofs
        configured = self.authenticator.configured_kinds
        for rule in rules:
            if not rule.public and not rule.accept & configured:
                raise ConfigError(
                    "rules",
                    f"{rule!r} accepts no credential kind that the configuration has, so "
                    "nothing could pass; configure the key or secret it needs",
                )
        # Each built-in endpoint is served where it can work; otherwise its path is None and
        # an ordinary one, under the rules.
        self.token_path = self.revoke_path = self.jwks_path = None
        self.server_key_routes: dict[str, _Route] = {}
        if token_path is not None and config.api_keys and config.key_ring.signing_key:
            self.token_path = token_path
            endpoint: ServerKeyEndpoint = TokenEndpoint(
                config, realm=realm, counters=counters, limiter=limiter
            )
            self.server_key_routes[token_path] = _Route(_SERVER_KEY_ONLY, False, endpoint)
        revocations = verifier.revocations
        if revoke_path is not None and config.api_keys and isinstance(revocations, RevocationStore):
            self.revoke_path = revoke_path
            endpoint = RevocationEndpoint(config, revocations, realm=realm, counters=counters)
            self.server_key_routes[revoke_path] = _Route(_SERVER_KEY_ONLY, False, endpoint)
        if jwks_path is not None and config.key_ring.jwks()["keys"]:
            # Public keys are public by design: other services fetch them without a credential.
            self.jwks_path = jwks_path
            self.server_key_routes[jwks_path] = _Route(frozenset(), True, JwksEndpoint(config))
        # Every decision a path can get, built once: the remembered routes share them.
        self.rule_table = RuleTable(
            (
                (rule, _Route(rule.accept, rule.public, None, rule.optional, rule.dpop))
                for rule in rules
            ),
            default=_Route(configured, False, None),
        )
        # path, or (root_path, path) under a mount point -> its _Route. The rules are fixed,
        # so a path's route never changes; remembering it spares the path checks and the
        # walk through the rules on every request.
        self.routes: dict[str | tuple[str, str], _Route] = {}

    def route(self, path: str, root_path: str | None) -> _Route:
        """What the request's path accepts; refuses a path that could mean another one."""
        if has_unsafe_segments(path):
            raise InvalidRequest(_UNSAFE_PATH)
        if root_path:
            path = strip_root_path(path, root_path)
        return self.server_key_routes.get(path) or self.rule_table.lookup(path)
