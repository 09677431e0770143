"""Checked by mypy, never run: the public API as users write it must type-check strictly."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Scope

from devicegate import (
    AuthError,
    ConfigError,
    CredentialKind,
    DeviceAuthMiddleware,
    GateConfig,
    IssuedToken,
    MemoryTokenCache,
    Principal,
    Refusal,
    RevocationCheck,
    RevocationList,
    Rule,
    TokenCache,
    TokenEndpoint,
    TokenIssuer,
    TokenVerifier,
    get_principal,
)

config = GateConfig(
    api_keys=["a" * 32],
    mobile_api_keys="b" * 32,
    jwt_secret="c" * 32,
    jwt_expire_seconds=300,
    device_header="x-instance-id",
    require_device_binding=True,
    issuer="https://auth.example.com",
)
from_file: GateConfig = GateConfig.from_secrets_file("secrets.json", leeway_seconds=5)
from_env: GateConfig = GateConfig.from_env({"DEVICEGATE_JWT_SECRET": "d" * 32})

rules = [
    Rule("/health", public=True),
    Rule("/mobile/*", accept={CredentialKind.DEVICE_TOKEN}),
    Rule("/admin/*", accept=["api_key"]),
]


def render(scope: Scope, error: AuthError) -> ASGIApp:
    return JSONResponse({"code": error.error}, status_code=error.status_code)


async def raw_app(scope: Scope, receive: Any, send: Any) -> None: ...


wrapped: ASGIApp = DeviceAuthMiddleware(
    raw_app, config=config, rules=rules, token_path=None, on_error=render
)
starlette_app = Starlette(
    middleware=[Middleware(DeviceAuthMiddleware, config=config, rules=rules)],
)

token: IssuedToken = TokenIssuer(config).issue(instance_id="device-1")
body: Mapping[str, Any] = token.as_response()
access_token: str = token.access_token
expires_in: int = token.expires_in
endpoint: ASGIApp = TokenEndpoint(config)


def who(request: Request) -> str | None:
    principal: Principal | None = get_principal(request)
    if principal is None:
        return None
    kind: CredentialKind = principal.kind
    claims: Mapping[str, Any] = principal.claims
    return principal.instance_id or kind.value + str(len(claims))


def config_error_field(error: ConfigError) -> str:
    return error.field


revocations = RevocationList()
with_revocations: ASGIApp = DeviceAuthMiddleware(raw_app, config=config, revocations=revocations)
own_verifier = TokenVerifier(config, cache=MemoryTokenCache(100), revocations=revocations)
with_verifier = DeviceAuthMiddleware(raw_app, config=config, verifier=own_verifier)
check: RevocationCheck = revocations
cache: TokenCache = own_verifier.cache


async def cut_off(device: str) -> None:
    await revocations.revoke_device(device, before=1_700_000_000.5)
    await revocations.revoke_token("jti")
    await revocations.revoke_subject("user-1")
    await revocations.revoke_all()


def unavailable() -> Refusal:
    return Refusal(
        "Try again shortly.", status_code=503, headers=[(b"retry-after", b"1")], close=False
    )
