"""Shared test helpers: keys, hand-built tokens, and a raw ASGI app that records its calls."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
from starlette.types import ASGIApp, Receive, Scope, Send

from devicegate import GateConfig


@dataclass(frozen=True)
class Keys:
    api_key: str
    mobile_api_key: str
    jwt_secret: str

    def config(self, **options: Any) -> GateConfig:
        return GateConfig(
            api_keys=self.api_key,
            mobile_api_keys=self.mobile_api_key,
            jwt_secret=self.jwt_secret,
            **options,
        )


def fresh_keys() -> Keys:
    return Keys(
        api_key=secrets.token_urlsafe(32),
        mobile_api_key=secrets.token_urlsafe(32),
        jwt_secret=secrets.token_urlsafe(32),
    )


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def sign(signing_input: str, secret: str | bytes, digest: str = "sha256") -> str:
    key = secret.encode() if isinstance(secret, str) else secret
    return b64url(hmac.new(key, signing_input.encode(), getattr(hashlib, digest)).digest())


def make_token(
    secret: str | bytes,
    claims: dict[str, Any] | None = None,
    *,
    header: dict[str, Any] | None = None,
    raw_header: bytes | None = None,
    raw_payload: bytes | None = None,
    digest: str = "sha256",
    instance_id: str | None = None,
    lifetime: int = 300,
) -> str:
    """Build a compact JWS by hand (raw HMAC), so that malformed tokens can be made too.

    With no ``claims`` a valid claim set is used: ``iat`` now, ``exp`` now + ``lifetime`` and
    ``instance_id`` when given.
    """
    if claims is None:
        now = int(time.time())
        claims = {"iat": now, "exp": now + lifetime, "jti": secrets.token_hex(8)}
        if instance_id is not None:
            claims["instance_id"] = instance_id
    header_bytes = (
        raw_header
        if raw_header is not None
        else json.dumps(header if header is not None else {"alg": "HS256", "typ": "JWT"}).encode()
    )
    payload_bytes = raw_payload if raw_payload is not None else json.dumps(claims).encode()
    signing_input = f"{b64url(header_bytes)}.{b64url(payload_bytes)}"
    return f"{signing_input}.{sign(signing_input, secret, digest)}"


@dataclass
class RecordingApp:
    """A raw ASGI app answering 200 with a JSON summary of the principal it saw."""

    calls: list[Scope] = field(default_factory=list)

    @property
    def ran(self) -> bool:
        return bool(self.calls)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.calls.append(scope)
        if scope["type"] == "lifespan":
            return
        user = scope.get("user")
        body = json.dumps(
            {
                "kind": getattr(getattr(user, "kind", None), "value", None),
                "instance_id": getattr(user, "instance_id", None),
                "authenticated": bool(getattr(user, "is_authenticated", False)),
                "scopes": list(getattr(scope.get("auth"), "scopes", [])),
            }
        ).encode()
        if scope["type"] == "websocket":
            await receive()
            await send({"type": "websocket.accept"})
            await send({"type": "websocket.send", "text": body.decode()})
            await send({"type": "websocket.close", "code": 1000})
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})


def client(app: ASGIApp, base_url: str = "http://testserver") -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=base_url)
