"""Who is calling: the credential kind and the authenticated principal."""

from __future__ import annotations

import copy
import enum
from collections.abc import Mapping
from typing import Any, NoReturn

from starlette.authentication import AuthCredentials, BaseUser

__all__ = [
    "CredentialKind",
    "Principal",
    "credentials_for",
    "get_principal",
    "unauthenticated_credentials",
]


class CredentialKind(str, enum.Enum):
    """The three credentials devicegate understands.

    The values double as Starlette auth scopes, so ``@requires("device_token")`` works.
    """

    API_KEY = "api_key"
    """A server-to-server key, sent in the ``X-API-Key`` header."""
    MOBILE_API_KEY = "mobile_api_key"
    """The mobile SDK's key, sent raw in ``Authorization``."""
    DEVICE_TOKEN = "device_token"  # noqa: S105 - a kind name, not a secret
    """A short-lived JWT, sent as ``Authorization: Bearer <jwt>``."""

    # As enum.StrEnum (3.11+): str() and format() give the value, on every supported Python.
    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, format_spec: str) -> str:
        return format(str(self.value), format_spec)


ALL_KINDS: frozenset[CredentialKind] = frozenset(CredentialKind)

# The members as module constants, for code that runs on every request: looking a member up on
# the Enum class is a slow attribute lookup on Python 3.10 and 3.11, a module global is not.
API_KEY = CredentialKind.API_KEY
MOBILE_API_KEY = CredentialKind.MOBILE_API_KEY
DEVICE_TOKEN = CredentialKind.DEVICE_TOKEN


def _refuse(self: object, *args: object, **kwargs: object) -> NoReturn:
    raise TypeError("read-only: the claims and credentials of a request cannot be changed")


class _ReadOnlyDict(dict):  # type: ignore[type-arg]
    """A dict nobody can change: cached principals are shared by every request that presents
    the same token, so one request's app must not be able to alter what the next one sees.
    A dict subclass rather than a mappingproxy so that ``json.dumps`` still takes it."""

    __slots__ = ()
    __init__ = __setitem__ = __delitem__ = __ior__ = _refuse
    clear = pop = popitem = setdefault = update = _refuse

    def __copy__(self) -> dict[str, Any]:
        return dict(self)

    def __deepcopy__(self, memo: dict[int, Any]) -> dict[str, Any]:
        return copy.deepcopy(dict(self), memo)

    def __reduce__(self) -> tuple[type[dict[str, Any]], tuple[dict[str, Any]]]:
        return dict, (dict(self),)


class _ReadOnlyList(list):  # type: ignore[type-arg]
    """A list nobody can change; still equal to a list and taken by ``json.dumps``."""

    __slots__ = ()
    __init__ = __setitem__ = __delitem__ = __iadd__ = __imul__ = _refuse
    append = extend = insert = pop = remove = clear = sort = reverse = _refuse

    def __copy__(self) -> list[Any]:
        return list(self)

    def __deepcopy__(self, memo: dict[int, Any]) -> list[Any]:
        return copy.deepcopy(list(self), memo)

    def __reduce__(self) -> tuple[type[list[Any]], tuple[list[Any]]]:
        return list, (list(self),)


def _read_only(value: Any) -> Any:
    """``value`` with every nested dict and list made read-only."""
    # Filled through the base class: __init__ is refused too, or it could refill them later.
    if isinstance(value, dict):
        frozen_dict = _ReadOnlyDict.__new__(_ReadOnlyDict)
        dict.update(frozen_dict, value)
        # Claims are mostly strings and numbers: only containers need a call of their own.
        for key, item in value.items():
            if isinstance(item, (dict, list)):
                dict.__setitem__(frozen_dict, key, _read_only(item))
        return frozen_dict
    if isinstance(value, list):
        frozen_list = _ReadOnlyList.__new__(_ReadOnlyList)
        list.extend(frozen_list, [_read_only(item) for item in value])
        return frozen_list
    return value


_EMPTY_CLAIMS: Mapping[str, Any] = _read_only({})


class _ReadOnlyCredentials(AuthCredentials):
    """Starlette ``AuthCredentials`` whose scopes nobody can change, so that one instance per
    credential kind serves every request: an app that tried to widen its own scopes would
    otherwise widen the next request's."""

    def __init__(self, scopes: list[str]) -> None:
        object.__setattr__(self, "scopes", _read_only(scopes))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("the credentials of a request are read-only")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("the credentials of a request are read-only")


AUTHENTICATED = "authenticated"
"""The scope every admitted credential has, as Starlette's own backends give it, so that
``@requires("authenticated")`` admits any caller devicegate admitted."""

credentials_for: Mapping[CredentialKind, AuthCredentials] = {
    # The kind is a str enum equal to its value: "device_token" in scopes holds.
    kind: _ReadOnlyCredentials([AUTHENTICATED, kind])
    for kind in CredentialKind
}
"""The ``scope["auth"]`` of a request admitted with each credential kind."""

unauthenticated_credentials: AuthCredentials = _ReadOnlyCredentials([])
"""The ``scope["auth"]`` of a request admitted on a public path."""


class Principal(BaseUser):
    """An authenticated caller, immutable.

    Attributes:
        kind: which credential authenticated the request.
        instance_id: the device the token is bound to (``None`` for keys and generic tokens).
        claims: the verified JWT claims, read-only all the way down (nested objects are
            read-only dicts and lists; empty for keys).
        key_name: the name of the key that admitted a key principal, when the configuration
            names its keys (``None`` for unnamed keys and for tokens).
    """

    __slots__ = ("claims", "instance_id", "key_name", "kind")

    kind: CredentialKind
    instance_id: str | None
    claims: Mapping[str, Any]
    key_name: str | None

    def __init__(
        self,
        kind: CredentialKind,
        *,
        instance_id: str | None = None,
        claims: Mapping[str, Any] | None = None,
        key_name: str | None = None,
    ) -> None:
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "instance_id", instance_id)
        object.__setattr__(
            self,
            "claims",
            # _read_only copies a dict itself; another mapping is made a dict first.
            _EMPTY_CLAIMS
            if not claims
            else _read_only(claims if isinstance(claims, dict) else dict(claims)),
        )
        object.__setattr__(self, "key_name", key_name)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Principal):
            return NotImplemented
        return (self.kind, self.instance_id, self.key_name, dict(self.claims)) == (
            other.kind,
            other.instance_id,
            other.key_name,
            dict(other.claims),
        )

    def __hash__(self) -> int:
        return hash((self.kind, self.instance_id, self.key_name, self.claims.get("jti")))

    # Immutable, so a copy is the object itself; pickling rebuilds it through __init__, which
    # freezes the claims again. (The defaults would set attributes, which __setattr__ refuses:
    # copy.deepcopy(scope) or a task queue pickling request.user failed.)
    def __copy__(self) -> Principal:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> Principal:
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuild_principal, (self.kind, self.instance_id, dict(self.claims), self.key_name)

    def __repr__(self) -> str:
        details = f"kind={self.kind.value!r}, instance_id={self.instance_id!r}"
        if self.key_name is not None:
            details += f", key_name={self.key_name!r}"
        return f"Principal({details})"

    @property
    def subject(self) -> str | None:
        """The token's ``sub`` claim (who the app server minted it for), or ``None``."""
        subject = self.claims.get("sub")
        return subject if isinstance(subject, str) else None

    @property
    def dpop_jkt(self) -> str | None:
        """The thumbprint of the key a DPoP-bound token is bound to (its ``cnf.jkt``), or
        ``None``: every request with such a token proved possession of that key."""
        cnf = self.claims.get("cnf")
        # Nested objects of the claims are always (read-only) dicts: no ABC check needed.
        return cnf.get("jkt") if isinstance(cnf, dict) else None

    @property
    def is_authenticated(self) -> bool:
        return True

    @property
    def display_name(self) -> str:
        return self.subject or self.instance_id or self.key_name or self.kind.value

    @property
    def identity(self) -> str:
        jti = self.claims.get("jti")
        return jti if isinstance(jti, str) else self.display_name


def _rebuild_principal(
    kind: CredentialKind,
    instance_id: str | None,
    claims: Mapping[str, Any],
    key_name: str | None = None,
) -> Principal:
    return Principal(kind, instance_id=instance_id, claims=claims, key_name=key_name)


def get_principal(source: Any) -> Principal | None:
    """Return the :class:`Principal` devicegate stored for this request, or ``None``.

    Args:
        source: an ASGI scope, or any request object with a ``scope`` attribute (Starlette,
            FastAPI, Litestar and Quart requests and websockets).

    ``None`` means the request was admitted on a public path (or did not pass through
    :class:`~devicegate.DeviceAuthMiddleware` at all).
    """
    scope = source if isinstance(source, Mapping) else getattr(source, "scope", None)
    if not isinstance(scope, Mapping):
        raise TypeError("get_principal() takes an ASGI scope or a request with a .scope")
    user = scope.get("user")
    return user if isinstance(user, Principal) else None
