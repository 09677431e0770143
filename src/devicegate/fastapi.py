"""FastAPI dependencies that hand a route the :class:`~devicegate.Principal`, and the OpenAPI
security schemes that make ``/docs`` show how to call it.

:class:`~devicegate.DeviceAuthMiddleware` does the authentication, in front of FastAPI; the
dependencies made here only read what it stored (:func:`~devicegate.get_principal`), check the
credential kind a route demands, and declare the schemes in the app's OpenAPI document so that
Swagger UI's "Authorize" dialog sends the headers the middleware reads::

    gate = DeviceGateSecurity(config)  # the same GateConfig as the middleware's

    @app.get("/profile")
    def profile(device: Annotated[Principal, Security(gate.require(CredentialKind.DEVICE_TOKEN))]):
        ...

Install with the ``fastapi`` extra: ``pip install 'devicegate[fastapi]'``.

References:
    https://www.rfc-editor.org/rfc/rfc6750#section-3
    https://spec.openapis.org/oas/v3.1.0#security-scheme-object
    https://spec.openapis.org/oas/v3.1.0#security-requirement-object
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, NoReturn, cast

try:
    from fastapi import HTTPException, Security
    from fastapi.openapi.models import APIKey, APIKeyIn, HTTPBearer
    from fastapi.openapi.models import SecurityBase as SecuritySchemeModel
    from fastapi.security.base import SecurityBase
except ModuleNotFoundError as exc:
    if exc.name != "fastapi":
        raise
    raise ModuleNotFoundError(
        "devicegate.fastapi needs FastAPI, which is not installed; install the extra: "
        "pip install 'devicegate[fastapi]'",
        name=exc.name,
    ) from exc

from starlette.exceptions import WebSocketException
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response

from ._asgi import WS_POLICY_VIOLATION, refusal_parts
from ._auth import Authenticator
from ._config import GateConfig
from ._errors import (
    DEFAULT_REALM,
    ConfigError,
    InsufficientScope,
    MissingCredentials,
    Refusal,
    check_realm,
)
from ._principal import CredentialKind, Principal, get_principal

__all__ = ["DeviceGateSecurity", "RefusalException", "refusal_handler"]

# Headers that describe refusal_parts' own body: FastAPI's default handler renders another one.
_BODY_HEADERS = frozenset({b"content-type", b"content-length"})


class RefusalException(HTTPException):
    """A devicegate :class:`~devicegate.Refusal` raised inside a FastAPI app.

    With :func:`refusal_handler` installed, it is answered with the same bytes the middleware
    sends for that refusal: status, ``WWW-Authenticate`` challenge and JSON body
    ``{"error": ..., "error_description": ...}``. Without it, FastAPI's default handler still
    answers with the right status and challenge, with its own body ``{"detail": ...}``.

    Attributes:
        refusal: the refusal, with its ``status_code``, ``error`` and ``description``.
        realm: the realm of the challenge.
    """

    def __init__(self, refusal: Refusal, *, realm: str = DEFAULT_REALM) -> None:
        check_realm(realm)
        status, headers, body = refusal_parts(refusal, realm)
        super().__init__(
            status,
            detail=refusal.description,
            headers={
                name.decode("latin-1"): value.decode("latin-1")
                for name, value in headers
                if name not in _BODY_HEADERS
            },
        )
        self.refusal = refusal
        self.realm = realm
        self.response_headers = headers
        self.response_body = body


async def refusal_handler(request: Request, exc: Exception) -> Response:
    """FastAPI exception handler for :class:`RefusalException`: devicegate's own response.

    Install it with ``FastAPI(exception_handlers={RefusalException: refusal_handler})`` or
    ``app.add_exception_handler(RefusalException, refusal_handler)``.
    """
    if not isinstance(exc, RefusalException):
        raise TypeError(f"refusal_handler handles RefusalException, got {type(exc).__name__}")
    response = Response(exc.response_body, status_code=exc.status_code)
    response.raw_headers = list(exc.response_headers)
    return response


class _Scheme(SecurityBase):
    """One OpenAPI security scheme, declared for the documentation alone: the middleware has
    already read and checked the credential, so this dependency reads nothing."""

    def __init__(self, name: str, model: SecuritySchemeModel) -> None:
        self.scheme_name = name
        self.model = model

    async def __call__(self) -> None:
        return None


def _header_scheme(name: str, description: str) -> APIKey:
    # "in" is a keyword: the model takes it by its alias only.
    fields: dict[str, Any] = {"in": APIKeyIn.header, "name": name, "description": description}
    return APIKey(**fields)


class _PrincipalDependency:
    """The dependency ``require`` and ``optional`` return: the principal the middleware stored,
    if its kind is one the route accepts. Its signature names the OpenAPI schemes of those kinds
    as sub-dependencies, which is how FastAPI learns a route's security requirements."""

    def __init__(
        self,
        kinds: frozenset[CredentialKind],
        schemes: Iterable[_Scheme],
        *,
        required: bool,
        realm: str,
    ) -> None:
        self.kinds = kinds
        self.required = required
        self.realm = realm
        parameters = [
            inspect.Parameter(
                "connection", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=HTTPConnection
            ),
            *(
                inspect.Parameter(
                    f"scheme_{scheme.scheme_name}",
                    inspect.Parameter.KEYWORD_ONLY,
                    default=Security(scheme),
                    annotation=None,
                )
                for scheme in schemes
            ),
        ]
        self.__signature__ = inspect.Signature(parameters)

    def __repr__(self) -> str:
        kinds = ", ".join(sorted(kind.value for kind in self.kinds))
        verb = "require" if self.required else "optional"
        return f"<devicegate.fastapi {verb}({kinds})>"

    async def __call__(self, connection: HTTPConnection, **schemes: None) -> Principal | None:
        if "auth" not in connection.scope:
            # The middleware sets scope["auth"] on every request it admits, public ones too.
            raise RuntimeError(
                "devicegate.fastapi found no DeviceAuthMiddleware in front of this app: add it "
                "with app.add_middleware(DeviceAuthMiddleware, config=...)"
            )
        principal = get_principal(connection)
        if principal is None:
            if not self.required:
                return None
            # A public or optional path, with no credential checked: ask for one, as the
            # middleware would on a protected path (RFC 6750 §3.1: no error attribute).
            self._refuse(connection, MissingCredentials())
        elif principal.kind not in self.kinds:
            self._refuse(connection, InsufficientScope())
        return principal

    def _refuse(self, connection: HTTPConnection, refusal: Refusal) -> NoReturn:
        if connection.scope["type"] == "websocket":
            # A handshake refused by a dependency closes as the middleware's fallback does.
            raise WebSocketException(WS_POLICY_VIOLATION, reason=refusal.description)
        raise RefusalException(refusal, realm=self.realm)


class DeviceGateSecurity:
    """FastAPI dependencies and OpenAPI security schemes for an app behind devicegate.

    The schemes follow the configuration: the server API key in ``api_key_header``
    (``api_key``), the mobile API key raw in ``Authorization`` (``mobile_api_key``), the device
    token as an HTTP bearer (``device_token``) with the device id in ``device_header``
    (``instance_id``); only those of the kinds the configuration has are declared. A route
    lists the schemes of the kinds it accepts, each as an alternative (OpenAPI's list of
    security requirements); a device token needs ``device_token`` and ``instance_id`` both.

    Args:
        config: the configuration the middleware runs with (its header names and kinds).
        realm: the realm of the ``WWW-Authenticate`` challenge, as given to the middleware.

    Raises:
        ConfigError: ``config`` is not a :class:`~devicegate.GateConfig`, or ``realm`` cannot
            stand in a challenge.
    """

    def __init__(self, config: GateConfig, *, realm: str = DEFAULT_REALM) -> None:
        if not isinstance(config, GateConfig):
            raise ConfigError("config", f"must be a GateConfig, got {type(config).__name__}")
        check_realm(realm)
        self.realm = realm
        # The middleware's own answer to which kinds a configuration has.
        self.configured_kinds = Authenticator(config).configured_kinds
        device_token = _Scheme(
            "device_token",
            HTTPBearer(
                bearerFormat="JWT",
                description=(
                    "A device token (POST /gen-jwt), sent as 'Authorization: Bearer <token>'. "
                    f"Give the device id in {config.device_header} (instance_id) too."
                ),
            ),
        )
        instance_id = _Scheme(
            "instance_id",
            _header_scheme(
                config.device_header,
                "The device id a device token is bound to; only with the token.",
            ),
        )
        self._schemes: dict[CredentialKind, tuple[_Scheme, ...]] = {
            CredentialKind.API_KEY: (
                _Scheme(
                    "api_key",
                    _header_scheme(config.api_key_header, "The server API key."),
                ),
            ),
            CredentialKind.MOBILE_API_KEY: (
                _Scheme(
                    "mobile_api_key",
                    _header_scheme(
                        "Authorization",
                        "The mobile API key, sent raw in Authorization (no 'Bearer').",
                    ),
                ),
            ),
            CredentialKind.DEVICE_TOKEN: (device_token, instance_id),
        }
        self._dependencies: dict[tuple[frozenset[CredentialKind], bool], _PrincipalDependency] = {}

    def __repr__(self) -> str:
        kinds = ", ".join(sorted(kind.value for kind in self.configured_kinds))
        return f"DeviceGateSecurity(kinds={{{kinds}}}, realm={self.realm!r})"

    def require(self, *kinds: CredentialKind | str) -> Callable[..., Awaitable[Principal]]:
        """A dependency that returns the caller's :class:`~devicegate.Principal`.

        Use it as ``Security(gate.require(...))``. The request was authenticated by the
        middleware; this checks only that there is a principal and that its kind is one of
        ``kinds``.

        Args:
            kinds: the credential kinds the route accepts (default: every configured kind).

        Returns:
            The same dependency for the same kinds, so FastAPI runs it once per request.

        Raises:
            ConfigError: a kind is not a :class:`~devicegate.CredentialKind`, or none of
                ``kinds`` is configured, so that nothing could pass.

        At request time the dependency refuses with :class:`RefusalException`: 401 (with the
        ``Bearer realm`` challenge) when the middleware admitted the request without a
        credential (a public or optional path), 403 ``insufficient_scope`` for a kind the route
        does not accept. A websocket handshake is closed with code 1008 instead.
        """
        return cast("Callable[..., Awaitable[Principal]]", self._dependency(kinds, required=True))

    def optional(self, *kinds: CredentialKind | str) -> Callable[..., Awaitable[Principal | None]]:
        """As :meth:`require`, for a path the middleware serves without a credential (a
        ``Rule(..., optional=True)``): the dependency returns ``None`` when the request
        carries none, and still refuses a principal of another kind (403)."""
        return self._dependency(kinds, required=False)

    def _dependency(
        self, kinds: tuple[CredentialKind | str, ...], *, required: bool
    ) -> _PrincipalDependency:
        try:
            accepted = frozenset(CredentialKind(kind) for kind in kinds) or self.configured_kinds
        except ValueError:
            raise ConfigError("kinds", f"must be CredentialKind values, got {kinds!r}") from None
        accepted &= self.configured_kinds
        if not accepted:
            raise ConfigError(
                "kinds",
                f"{sorted(CredentialKind(kind).value for kind in kinds)} names no credential kind "
                "the configuration has, so nothing could pass; configure the key or secret it "
                "needs",
            )
        key = (accepted, required)
        dependency = self._dependencies.get(key)
        if dependency is None:
            schemes = [
                scheme
                for kind in CredentialKind  # a fixed order, for a stable OpenAPI document
                if kind in accepted
                for scheme in self._schemes[kind]
            ]
            dependency = _PrincipalDependency(
                accepted, schemes, required=required, realm=self.realm
            )
            self._dependencies[key] = dependency
        return dependency
