"""ForwardAuth: the endpoint a reverse proxy asks "may this request pass?".

nginx ``auth_request``, Traefik ``ForwardAuth``, Caddy ``forward_auth`` and Envoy ``ext_authz``
(HTTP mode) send a copy of each client request's headers to an auth service before proxying it.
This endpoint applies exactly the checks of :class:`~devicegate.DeviceAuthMiddleware` to the
URI the proxy names, and answers 204 (pass, with the caller's identity in headers) or the
middleware's own 401/403/400 (which the proxy hands to the client).

References:
    https://nginx.org/en/docs/http/ngx_http_auth_request_module.html
    https://doc.traefik.io/traefik/middlewares/http/forwardauth/
    https://caddyserver.com/docs/caddyfile/directives/forward_auth
    https://www.envoyproxy.io/docs/envoy/latest/configuration/http/http_filters/ext_authz_filter
"""

from __future__ import annotations

import hmac
import logging
import re
from collections.abc import Iterable, Sequence

from starlette.types import Receive, Scope, Send

from .._asgi import send_refusal, serve_lifespan
from .._config import MIN_API_KEY_BYTES, GateConfig, check_key, opens_a_door_of
from .._counters import Counters
from .._errors import DEFAULT_REALM, ConfigError, InvalidRequest, Refusal
from .._middleware import DeviceAuthMiddleware
from .._principal import get_principal
from .._revocation import RevocationCheck
from .._rules import Rule
from ._policy import caller_headers
from ._refusals import MethodNotAllowed
from ._request_line import (
    decode_path,
    has_ambiguous_separators,
    is_unforwarded,
    overrides_to_unforwarded,
)

__all__ = ["FORWARD_SECRET_HEADER", "ForwardAuth"]

logger = logging.getLogger("devicegate")

FORWARD_SECRET_HEADER = "x-devicegate-forward-secret"  # noqa: S105 - a header name

# Where each proxy puts the original request line: nginx by convention (set with
# proxy_set_header), Traefik and Caddy by their own documented behaviour.
_URI_HEADERS = frozenset({b"x-original-uri", b"x-forwarded-uri"})
_METHOD_HEADERS = frozenset({b"x-original-method", b"x-forwarded-method"})
_SECRET_HEADER = FORWARD_SECRET_HEADER.encode()
# RFC 9110 §9.1: a method is a token.
_METHOD = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")

_NO_URI = "The proxy did not send the original URI (X-Original-URI or X-Forwarded-Uri)."
_REPEATED_URI = "The original URI is given more than once."
_BAD_URI = "The original URI is not an absolute path."
_AMBIGUOUS_URI = "The original URI has an encoded slash or backslash, or a '#', in its path."
_BAD_METHOD = "The original method is malformed or given more than once."
_FORBIDDEN = "This endpoint answers only the configured proxy."
_METHOD_NOT_ALLOWED = "This method is not let through."


def _without_address_limit(config: GateConfig) -> GateConfig:
    # The client of a forward-auth request is the proxy itself, unless the proxy and the
    # server were set up to pass the real address on: counting failures per address could then
    # block the proxy, and every client behind it. The proxy limits by address (nginx
    # limit_req, Traefik RateLimit, Caddy rate_limit) where it knows the address for sure.
    if config.failure_limit_per_address is None:
        return config
    return config.replace(failure_limit_per_address=None)


class ForwardAuth:
    """An ASGI app that decides, for a reverse proxy, whether a client request may pass.

    The proxy sends the client's headers plus the original URI and method: ``X-Original-URI``
    and ``X-Original-Method`` (nginx, set with ``proxy_set_header``) or ``X-Forwarded-Uri`` and
    ``X-Forwarded-Method`` (Traefik, Caddy). The URI's path, percent-decoded as a server would
    decode it and without its query string, goes through the very checks of
    :class:`~devicegate.DeviceAuthMiddleware`: the dot-segment and empty-segment refusal, the
    ``rules`` (first match wins, public paths need no credential) and the credential itself.

    Answers:

    * 204 when the request may pass, with ``X-Devicegate-Kind`` and, for a device-bound token,
      ``X-Devicegate-Instance-Id`` (nothing on a public path): the proxy copies them onto the
      request it forwards.
    * the middleware's RFC 6750 response otherwise: 401 (no or bad credential), 403
      (``insufficient_scope``), 400 (malformed), each with ``WWW-Authenticate`` and a JSON body.
    * 400 when the original URI is missing, given more than once (in one header or across
      both names: an attacker could add the name the proxy does not set), or not an absolute
      path; or when the method is malformed.
    * 403 ``forbidden`` when ``shared_secret`` is set and the request does not carry it in
      ``X-Devicegate-Forward-Secret``: the credentials are then not even looked at.
    * 405 ``method_not_allowed`` (with ``Allow``) when the original method is ``TRACE``,
      ``TRACK`` or ``CONNECT``, or a method-override field (``X-HTTP-Method-Override``,
      ``X-HTTP-Method``, ``X-Method-Override``) names one, as the gateway refuses them: TRACE
      reflects the request, and a CONNECT target is no path (Caddy names it ``/``).

    The proxy must set the header it uses, overwriting any copy the client sent; every snippet
    in ``docs/deployment.md`` does. Keep the endpoint reachable only from the proxy (bind it to
    a private address) and set ``shared_secret`` as a second lock.

    Args:
        config: keys, secrets and claim rules, as for the middleware.
        rules: per-path policies, matched against the original path (first match wins).
        shared_secret: a secret the proxy must send in ``X-Devicegate-Forward-Secret``
            (at least 16 bytes of visible ASCII, different from every key in ``config``).
        realm: the ``realm`` of ``WWW-Authenticate`` challenges.
        revocations: asked whether a verified device token was revoked, as by the middleware:
            give it the store the gateway's ``/revoke`` writes to, or a revoked token would
            still pass here.
        counters: where to count the decisions (for :mod:`devicegate.metrics`), as the
            middleware's ``counters``.

    Raises:
        ConfigError: as :class:`~devicegate.DeviceAuthMiddleware` for ``rules`` and ``realm``,
            or a weak or reused ``shared_secret``.

    References:
        https://nginx.org/en/docs/http/ngx_http_auth_request_module.html
        https://doc.traefik.io/traefik/middlewares/http/forwardauth/
        https://caddyserver.com/docs/caddyfile/directives/forward_auth
        https://www.rfc-editor.org/rfc/rfc6750#section-3
    """

    def __init__(
        self,
        config: GateConfig,
        *,
        rules: Sequence[Rule] = (),
        shared_secret: str | None = None,
        realm: str = DEFAULT_REALM,
        revocations: RevocationCheck | None = None,
        counters: Counters | None = None,
    ) -> None:
        # The decision is the middleware's own, run over the original request: one code path
        # for both ways of deploying devicegate, so they cannot drift apart.
        self._config = config
        self._gate = DeviceAuthMiddleware(
            _admit,
            config=_without_address_limit(config),
            rules=rules,
            token_path=None,
            realm=realm,
            revocations=revocations,
            revoke_path=None,
            counters=counters,
        )
        self._realm = realm
        self._secret = None if shared_secret is None else _check_secret(config, shared_secret)

    def __repr__(self) -> str:
        secret = "None" if self._secret is None else "<hidden>"
        return (
            f"{type(self).__name__}(config={self.config!r}, rules={list(self.rules)!r}, "
            f"shared_secret={secret}, realm={self._realm!r})"
        )

    @property
    def config(self) -> GateConfig:
        """The configuration in force."""
        return self._config

    @property
    def rules(self) -> tuple[Rule, ...]:
        """The rules, in the order they are tried."""
        return self._gate.rules

    def clear_token_cache(self) -> None:
        """Forget every verified token, so that each is verified again in full on its next use.

        Clearing revokes nothing by itself; to change keys or secrets, :meth:`reconfigure`.
        """
        self._gate.clear_token_cache()

    def reconfigure(self, config: GateConfig) -> None:
        """Put ``config`` in force for every request that starts from now on, as
        :meth:`DeviceAuthMiddleware.reconfigure <devicegate.DeviceAuthMiddleware.reconfigure>`
        does: requests under way finish under the old one, revocations are kept.

        Raises:
            ConfigError: as the constructor (the shared secret is one of ``config``'s keys,
                say); the configuration in force then stays.
        """
        if self._secret is not None:
            # Checked before anything changes: the secret must stay distinct from every key.
            _check_secret(config, self._secret.decode("ascii"))
        self._gate.reconfigure(_without_address_limit(config))
        self._config = config

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope_type = scope["type"]
        if scope_type == "lifespan":
            await serve_lifespan(receive, send)
            return
        if scope_type != "http":
            if scope_type == "websocket":
                # Proxies ask over plain HTTP; a websocket here is a client that found the
                # endpoint.
                await send_refusal(scope, send, InvalidRequest(), self._realm)
                return
            raise RuntimeError(f"devicegate cannot answer ASGI scope type {scope_type!r}")
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        if self._secret is not None and not _has_secret(headers, self._secret):
            # DEBUG, as the middleware logs its refusals: anyone who reaches the endpoint can
            # send these, and a flood of them must not become a flood of log lines.
            logger.debug("devicegate forward-auth refused a request without the proxy secret")
            await send_refusal(scope, send, Refusal(_FORBIDDEN, status_code=403, error="forbidden"))
            return
        try:
            method, raw_path, path = _original_request(headers)
            if (method is not None and is_unforwarded(method)) or any(
                overrides_to_unforwarded(name, value) for name, value in headers
            ):
                raise MethodNotAllowed(_METHOD_NOT_ALLOWED)
        except Refusal as refusal:
            await send_refusal(scope, send, refusal, self._realm)
            return
        original: Scope = {
            "type": "http",
            "asgi": scope.get("asgi", {"version": "3.0"}),
            "http_version": scope.get("http_version", "1.1"),
            "scheme": scope.get("scheme", "http"),
            "method": method or scope.get("method", "GET"),
            "path": path,
            "raw_path": raw_path,
            "query_string": b"",
            "root_path": "",
            "headers": headers,
            "client": scope.get("client"),
            "server": scope.get("server"),
            "extensions": {},
        }
        await self._gate(original, receive, send)


async def _admit(scope: Scope, receive: Receive, send: Send) -> None:
    """Reached only when the middleware admitted the original request: answer 204."""
    headers = [(b"cache-control", b"no-store")]
    principal = get_principal(scope)
    if principal is not None:
        headers.extend(caller_headers(principal))
    await send({"type": "http.response.start", "status": 204, "headers": headers})
    await send({"type": "http.response.body", "body": b""})


def _original_request(headers: Iterable[tuple[bytes, bytes]]) -> tuple[str | None, bytes, str]:
    """Return ``(method, raw_path, path)`` of the request the proxy asks about."""
    uris: list[bytes] = []
    methods: list[bytes] = []
    for name, value in headers:
        if name in _URI_HEADERS:
            uris.append(value)
        elif name in _METHOD_HEADERS:
            methods.append(value)
    if not uris:
        raise InvalidRequest(_NO_URI)
    if len(uris) > 1:
        # Refused rather than resolved: if we preferred one name, a client could add it
        # behind a proxy that sets the other and have us judge a path it never requested.
        raise InvalidRequest(_REPEATED_URI)
    raw_path = uris[0].split(b"?", 1)[0]
    if not raw_path.startswith(b"/"):
        raise InvalidRequest(_BAD_URI)
    if has_ambiguous_separators(raw_path):
        # The proxy passes these bytes on as they are: the app behind it may split them into
        # other segments than the decoded path judged here.
        raise InvalidRequest(_AMBIGUOUS_URI)
    # Decoded as the server behind the proxy will decode it, so that "/%2e%2e/admin" meets the
    # dot-segment check and "/adm%69n" meets the rule for "/admin".
    path = decode_path(raw_path)
    method: str | None = None
    if methods:
        if len(methods) > 1 or not _METHOD.fullmatch(methods[0]):
            raise InvalidRequest(_BAD_METHOD)
        method = methods[0].decode("ascii")
    return method, raw_path, path


def _has_secret(headers: Iterable[tuple[bytes, bytes]], secret: bytes) -> bool:
    values = [value for name, value in headers if name == _SECRET_HEADER]
    # Exactly one copy, compared in constant time (hmac.compare_digest on bytes).
    return len(values) == 1 and hmac.compare_digest(values[0], secret)


def _check_secret(config: GateConfig, secret: object) -> bytes:
    field = "shared_secret"
    if not isinstance(secret, str):
        raise ConfigError(field, "must be a string of visible ASCII (it travels in a header)")
    # It travels in a header and guards the endpoint like a key: the keys' rules apply.
    check_key(field, secret, MIN_API_KEY_BYTES)
    if opens_a_door_of(config, secret):
        raise ConfigError(
            field,
            "is also used as a key or jwt_secret; every secret must be distinct so that one "
            "leak cannot open another door",
        )
    return secret.encode("ascii")
