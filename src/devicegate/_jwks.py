"""``GET /.well-known/jwks.json``: the public keys of the ring, for other services to verify
devicegate's tokens with (Envoy ``jwt_authn``, Kong, any JOSE library)."""

from __future__ import annotations

from starlette.types import Receive, Scope, Send

from ._asgi import json_body, send_refusal, send_response, serve_lifespan
from ._config import GateConfig
from ._errors import ConfigError, Refusal

__all__ = ["JWKS_MAX_AGE_SECONDS", "JwksEndpoint"]

# How long caches may keep the set. Five minutes: a key must be published at least this long
# before it signs (the rotation procedure in the README says so), so the cost of a longer
# max-age is a slower rotation; the cost of a shorter one, more fetches. It matches the
# default token lifetime and the refresh interval of devicegate's own jwks_url client.
JWKS_MAX_AGE_SECONDS = 300


def _use_get() -> Refusal:
    return Refusal("Use GET.", status_code=405, headers=[(b"allow", b"GET, HEAD")])


class JwksEndpoint:
    """An ASGI app that serves the configuration's public keys as a JWK Set (RFC 7517 §5).

    Each key carries ``kid``, ``alg`` and ``use: "sig"``; HMAC secrets and private members are
    never in it. No credential is needed: the keys are public by design. The document is built
    once; a new configuration (``reconfigure``) builds a new endpoint.

    Args:
        config: a configuration with at least one EdDSA or ES256 key.

    Raises:
        ConfigError: the configuration has no public key to publish.

    References:
        https://www.rfc-editor.org/rfc/rfc7517#section-5
        https://www.rfc-editor.org/rfc/rfc8414#section-2 (``jwks_uri``)
    """

    kind = "jwks"

    def __init__(self, config: GateConfig) -> None:
        jwks = config.key_ring.jwks()
        if not jwks["keys"]:
            raise ConfigError(
                "jwt_private_key", "the JWKS endpoint needs an EdDSA or ES256 key to publish"
            )
        self._body = json_body(jwks)
        self._headers = [
            (b"content-type", b"application/jwk-set+json"),
            (b"content-length", str(len(self._body)).encode()),
            (b"cache-control", f"public, max-age={JWKS_MAX_AGE_SECONDS}".encode()),
        ]

    def __repr__(self) -> str:
        return f"<JwksEndpoint {self._body.count(b'kid')} keys>"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await serve_lifespan(receive, send)
            return
        await self.respond(scope, receive, send)

    async def respond(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer a request (the middleware's entry point)."""
        method = scope.get("method")
        if scope["type"] != "http" or method not in ("GET", "HEAD"):
            await send_refusal(scope, send, _use_get())
            return
        await send_response(
            scope, send, 200, self._headers, b"" if method == "HEAD" else self._body
        )
