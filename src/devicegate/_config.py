"""GateConfig: every setting devicegate needs, validated once at start-up."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import stat
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from . import _base64url as base64url
from ._dpop import DPOP_ALGORITHMS, check_public_url
from ._errors import ConfigError
from ._json import DuplicateMember, loads_strict_json
from ._keys import HmacKey, Key, KeyRing, load_private_key, load_public_key
from ._ratelimit import check_limit
from ._remote_keys import check_jwks_url

__all__ = [
    "CREDENTIAL_VARIABLES",
    "VISIBLE_ASCII",
    "ConfigError",
    "GateConfig",
    "check_header_name",
    "check_key",
    "env_bool",
    "env_int",
    "env_list",
    "env_public_keys",
    "env_seconds",
    "env_secret",
    "env_str",
    "env_variable",
    "opens_a_door_of",
    "read_env",
    "read_secrets_document",
    "secret_bytes",
    "separation_key",
]

_T = TypeVar("_T")

# RFC 7518 §3.2: an HS256 key must be at least as long as the hash output (256 bits).
MIN_JWT_SECRET_BYTES = 32
# API keys are bearer secrets too; 128 bits is the floor for anything guessable online.
MIN_API_KEY_BYTES = 16
MIN_DISTINCT_CHARACTERS = 8
MAX_LEEWAY_SECONDS = 60
MAX_KEY_NAME_LENGTH = 64
# A secret written as base64url:<value> (a JWK's "k", say) stands for the bytes it encodes.
BASE64URL_PREFIX = "base64url:"
# What a public key pasted where an HMAC secret belongs starts with (PEM, OpenSSH): used as an
# HS256 secret it would let anyone who has the public key mint tokens (PyJWT advisory
# GHSA-ffqj-6fqr-9h24, RFC 8725 §2.1).
_PUBLIC_KEY_PREFIXES = (
    "-----BEGIN",
    "ssh-rsa ",
    "ssh-dss ",
    "ssh-ed25519 ",
    "ssh-ed448 ",
    "ecdsa-sha2-",
    "sk-ssh-ed25519",
    "sk-ecdsa-sha2-",
)
# Device tokens are short-lived by design (SenseCrypt's default is 5 minutes) and nothing revokes
# one before it expires: a day is the most a typo (milliseconds for seconds) may cost.
MAX_TOKEN_LIFETIME_SECONDS = 86_400
DEFAULT_TOKEN_CACHE_SIZE = 10_000
# A SenseCrypt secrets.json is a few hundred bytes; this bounds what a wrong path can cost.
_MAX_SECRETS_FILE_BYTES = 1024 * 1024

# The key values printed in the SenseCrypt documentation: public, so never a secret.
VENDOR_EXAMPLE_KEYS = frozenset(
    {
        "wfMIgreFfMxDXySTU/MqNaFPJBIZcc40BQ62uQMwwd0=",
        "S+ILGn9HOYKvgbt6MbqwJHknYajIeVn/bJJBjyLffFQ=",
    }
)

# Words of placeholders copied from documentation ("REPLACE-WITH-THE-SHARED-SECRET" in ours).
# Seven letters or more: in a random base64 key of 43 characters, where a letter matches one of
# 64 characters in two, they appear about twice in a billion keys.
_PLACEHOLDER_WORDS = ("replace", "changeme", "change-me", "change_me", "example", "placeholder")
# RFC 9110 §5.1 field-name token.
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9a-z]+")
# Keys travel as header values; whitespace would make ``Authorization: <key>`` ambiguous with
# ``Authorization: <scheme> <token>``, so keys are visible ASCII only (RFC 9110 §5.5 VCHAR).
VISIBLE_ASCII = re.compile(r"[\x21-\x7e]+")
_RESERVED_HEADERS = frozenset({"authorization", "cookie", "host", "content-length", "dpop"})

_FALSE = frozenset({"0", "false", "no", "off"})
_TRUE = frozenset({"1", "true", "yes", "on"})


def _named_keys(field: str, value: object) -> tuple[tuple[str, ...], tuple[str | None, ...]]:
    """``(keys, names)`` of a keys argument: a string, an iterable of strings, or a mapping of
    names to keys (``{"billing": "...", "reports": "..."}``), whose names say which key
    admitted a request."""
    if isinstance(value, Mapping):
        names = tuple(value)
        for name in names:
            if (
                not isinstance(name, str)
                or not 1 <= len(name) <= MAX_KEY_NAME_LENGTH
                or not VISIBLE_ASCII.fullmatch(name)
            ):
                raise ConfigError(
                    field,
                    f"key names must be 1 to {MAX_KEY_NAME_LENGTH} visible ASCII characters",
                )
        return _as_tuple(field, tuple(value.values())), names
    keys = _as_tuple(field, value)
    return keys, (None,) * len(keys)


def _private_key(value: object) -> tuple[str | None, str | None]:
    """``(pem, name)`` of a ``jwt_private_key`` argument: PEM text or ``{name: pem}``."""
    field = "jwt_private_key"
    if value is None:
        return None, None
    if isinstance(value, Mapping):
        if len(value) != 1:
            raise ConfigError(
                field,
                "give one private key (as {key id: PEM}); the public keys of others go in "
                "jwt_public_keys",
            )
        (pem,), (name,) = _named_keys(field, value)
        return pem, name
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(field, "must be PEM text, a mapping of one key id to PEM text, or None")
    return value, None


def _public_keys(value: object) -> tuple[tuple[str, ...], tuple[str | None, ...]]:
    """``(keys, names)`` of a ``jwt_public_keys`` argument, every key as text: PEM, or a JWK's
    canonical JSON. A JWK Set (a mapping or JSON text with ``keys``) stands for its keys."""
    field = "jwt_public_keys"
    if isinstance(value, str) and value.lstrip().startswith("{"):
        try:
            value = json.loads(value)
        except ValueError:
            raise ConfigError(field, "the JSON text is not a JWK or a JWK Set") from None
    if isinstance(value, Mapping):
        if isinstance(value.get("keys"), list):
            value = value["keys"]  # a JWK Set
        elif "kty" in value:
            value = [value]  # one JWK
        else:
            named = {name: _key_text(field, key) for name, key in value.items()}
            return _named_keys(field, named)
    if value is None or isinstance(value, str):
        return _as_tuple(field, value), (None,) * len(_as_tuple(field, value))
    if isinstance(value, (bytes, bytearray)) or not isinstance(value, Iterable):
        raise ConfigError(field, "must be a key, a list of keys or a mapping of key ids to keys")
    keys = tuple(_key_text(field, key) for key in value)
    return keys, (None,) * len(keys)


def _key_text(field: str, key: object) -> str:
    if isinstance(key, str):
        return key
    if isinstance(key, Mapping):
        return json.dumps(dict(key), sort_keys=True, separators=(",", ":"))
    raise ConfigError(field, f"every key must be PEM text or a JWK, got {type(key).__name__}")


def _as_tuple(field: str, value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (bytes, bytearray)) or not isinstance(value, Iterable):
        raise ConfigError(field, "must be a string or a list of strings")
    items = tuple(value)
    for item in items:
        if not isinstance(item, str):
            raise ConfigError(field, f"every key must be a string, got {type(item).__name__}")
    return items


def check_key(field: str, key: str, min_bytes: int, *, header_value: bool = True) -> None:
    """Refuse an empty, published, too short or placeholder key for ``field``; one that will
    travel as a header value (``header_value``) must also be visible ASCII."""
    if not key:
        raise ConfigError(field, "an empty key is not allowed; generate one with `devicegate init`")
    if key.strip() in VENDOR_EXAMPLE_KEYS:
        raise ConfigError(
            field,
            "this is the example key from the SenseCrypt documentation, known to everyone; "
            "generate a fresh one with `devicegate init`",
        )
    if header_value and not VISIBLE_ASCII.fullmatch(key):
        raise ConfigError(
            field, "keys must be visible ASCII without spaces (they travel in HTTP headers)"
        )
    if len(key.encode()) < min_bytes:
        raise ConfigError(
            field,
            f"a key must be at least {min_bytes} bytes long (this one is {len(key.encode())}); "
            "generate one with `devicegate init`",
        )
    # Length alone lets "aaaa..." through. The bar is one distinct character per four, up to
    # eight: a random key, even a hexadecimal one of 16 characters, clears it with overwhelming
    # odds, so this catches placeholders without ever refusing a real key by bad luck.
    required = min(MIN_DISTINCT_CHARACTERS, len(key) // 4)
    if len(set(key)) < required:
        raise ConfigError(
            field,
            f"this key uses fewer than {required} distinct characters, so it is not random; "
            "generate one with `devicegate init`",
        )
    folded = key.casefold()
    if any(word in folded for word in _PLACEHOLDER_WORDS):
        raise ConfigError(
            field,
            "this key reads like a placeholder (it says 'replace', 'change me', 'example' or "
            "'placeholder'); generate one with `devicegate init`",
        )


def _check_jwt_secret(secret: str) -> None:
    field = "jwt_secret"
    if secret.lstrip().startswith(_PUBLIC_KEY_PREFIXES):
        raise ConfigError(
            field,
            "this is a public key, not a secret: whoever has the public key could sign tokens "
            "with it (RFC 8725 §2.1); use a random secret from `devicegate init`",
        )
    if secret.startswith(BASE64URL_PREFIX):
        raw = secret_bytes(secret)
        if len(raw) < MIN_JWT_SECRET_BYTES:
            raise ConfigError(
                field,
                f"a base64url secret must decode to at least {MIN_JWT_SECRET_BYTES} bytes "
                f"(this one is {len(raw)})",
            )
        # The encoded text is what is checked for randomness: the bytes are arbitrary.
        check_key(field, secret[len(BASE64URL_PREFIX) :], 1, header_value=False)
        return
    # The JWT secret never travels, so any characters will do; keys are header values.
    check_key(field, secret, MIN_JWT_SECRET_BYTES, header_value=False)


def secret_bytes(secret: str) -> bytes:
    """The HMAC key a ``jwt_secret`` stands for: its UTF-8 bytes, or for
    ``base64url:<value>`` the bytes the unpadded, canonical base64url ``value`` encodes.

    Raises:
        ConfigError: the base64url text is not canonical unpadded base64url.
    """
    if not secret.startswith(BASE64URL_PREFIX):
        return secret.encode()
    raw = base64url.decode(secret[len(BASE64URL_PREFIX) :])
    if raw is None:
        raise ConfigError(
            "jwt_secret",
            "the text after 'base64url:' must be unpadded base64url (A-Z a-z 0-9 - _)",
        )
    return raw


def _keys_argument(
    keys: tuple[str, ...], names: tuple[str | None, ...]
) -> tuple[str, ...] | dict[str, str]:
    """The argument that gives ``keys`` again, with their ``names`` when they have them."""
    if names and names[0] is not None:
        return {name: key for name, key in zip(names, keys, strict=True) if name is not None}
    return keys


def separation_key(key: str) -> str:
    """What two keys must not share: the same key with other surrounding spaces or in another
    case is the same door (a leaked API key would give away a JWT secret that is that key
    with a trailing space, or a mobile key that is it in lower case)."""
    return key.strip().casefold()


def opens_a_door_of(config: GateConfig, value: str) -> bool:
    """Whether ``value`` is one of ``config``'s keys or its JWT secret, as
    :func:`separation_key` compares them: a secret of something else must never be."""
    same = separation_key(value)
    return any(
        separation_key(key) == same
        for key in (
            *config.api_keys,
            *config.mobile_api_keys,
            *config.jwt_secrets,
            *filter(None, [config.jwt_private_key]),
        )
    )


def _check_int(field: str, value: object, *, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(field, f"must be an integer, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        # str() of an int of over 4,300 digits raises; nobody needs to read one back anyway.
        shown = str(value) if abs(value) < 10**18 else "a number of over 18 digits"
        raise ConfigError(field, f"must be {bound}, got {shown}")
    return value


def check_header_name(field: str, value: object) -> str:
    """Return ``value`` lower-cased if it is a usable header name for ``field``."""
    if not isinstance(value, str) or not _HEADER_NAME.fullmatch(value.lower()):
        raise ConfigError(field, "must be a valid HTTP header name, such as 'x-instance-id'")
    name = value.lower()
    if name in _RESERVED_HEADERS:
        raise ConfigError(field, f"{name!r} is reserved; choose a dedicated header")
    return name


# --- the environment --------------------------------------------------------------------------
# One parser for every DEVICEGATE_* variable, GateConfig's and the gateway's: each ``env_*``
# function turns a variable's text into a value or raises a ConfigError naming the variable.


def env_str(variable: str, raw: str) -> str:
    """Text without surrounding spaces (a header name, an issuer, a path)."""
    return raw.strip()


def env_secret(variable: str, raw: str) -> str:
    """A secret, taken whole: it may contain commas and spaces."""
    return raw


def env_list(variable: str, raw: str) -> tuple[str, ...]:
    """Comma-separated values; blanks between commas are skipped."""
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def env_public_keys(variable: str, raw: str) -> str | tuple[str, ...]:
    """Public keys: PEM blocks one after the other, or JSON text (a JWK or a JWK Set)."""
    text = raw.strip()
    if text.startswith("{"):
        return text
    blocks = tuple(_PEM_BLOCK.findall(text))
    return blocks or text  # not PEM: the constructor says what is wrong


_PEM_BLOCK = re.compile(r"-----BEGIN [A-Z ]+-----.+?-----END [A-Z ]+-----", re.DOTALL)


def env_int(variable: str, raw: str) -> int:
    """A decimal integer."""
    try:
        return int(raw.strip())
    except ValueError:
        raise ConfigError(variable, "must be an integer") from None


def env_bool(variable: str, raw: str) -> bool:
    """One of true/false, 1/0, yes/no, on/off, in any case."""
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(variable, "must be one of true/false, 1/0, yes/no, on/off")


def env_limit(variable: str, raw: str) -> str | None:
    """A rate limit such as ``10/minute``; ``none`` for no limit."""
    value = raw.strip()
    return None if value.lower() == "none" else value


def env_seconds(variable: str, raw: str) -> float:
    """A duration in seconds: a finite number above zero."""
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(variable, "must be a number of seconds, such as 30 or 2.5") from None
    if not 0 < value < float("inf"):
        raise ConfigError(variable, "must be a number of seconds above zero")
    return value


def read_env(
    environ: Mapping[str, str], variable: str, parse: Callable[[str, str], _T]
) -> _T | None:
    """``variable`` in ``environ`` read by ``parse`` (one of the ``env_*`` functions), or
    ``None`` when it is unset.

    An empty or blank variable counts as unset: a blank line in an env file must not wipe the
    keys of a secrets file, nor turn a setting off.

    Raises:
        ConfigError: named after ``variable``, when the text does not parse.
    """
    raw = environ.get(variable)
    if raw is None or not raw.strip():
        return None
    return parse(variable, raw)


def env_variable(name: str) -> str:
    """The variable that sets the :class:`GateConfig` field ``name``."""
    return f"DEVICEGATE_{name.upper()}"


# --- GateConfig -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    """Where a :class:`GateConfig` field comes from outside Python."""

    env: Callable[[str, str], object]  # the parser of its DEVICEGATE_<FIELD> variable
    file_member: str | None  # its name in a SenseCrypt secrets.json, if it has one
    secret: bool  # a key or secret: counted, never shown; a list or a string in secrets.json


_SOURCE = "devicegate"


def _from(
    env: Callable[[str, str], object], *, file_member: str | None = None, secret: bool = False
) -> dict[str, _Source]:
    return {_SOURCE: _Source(env, file_member, secret)}


@dataclass(frozen=True, kw_only=True)
class GateConfig:
    """devicegate's settings. Keyword-only, immutable, validated at construction.

    Each field is declared once below, with how ``from_env`` and ``from_secrets_file`` read
    it. Keys may be given as one string or an iterable of strings and are stored as tuples;
    header names are stored lower-cased.

    Raises:
        ConfigError: naming the field and the fix, for weak, empty, duplicated or published
            secrets, out-of-range numbers, bad header names, or no credential kind at all.

    Secrets never appear in ``repr()`` or ``str()`` of this object, and it refuses to be
    pickled. Two configurations with the same settings are equal.

    Warning:
        Change a configuration with :meth:`replace`, not :func:`dataclasses.replace`: that
        passes ``jwt_secret`` back, the signing secret alone, and drops the others of a
        rotation.
    """

    api_keys: tuple[str, ...] = field(
        default=(), repr=False, metadata=_from(env_list, file_member="api_key", secret=True)
    )
    """Server-to-server keys accepted in the ``X-API-Key`` header; several allow rotation. As
    an argument: a string, an iterable of strings, or a mapping of names to keys."""

    api_key_names: tuple[str | None, ...] = field(init=False, repr=False, compare=False)
    """The name of each of :attr:`api_keys`, in the same order (``None`` when unnamed)."""

    mobile_api_keys: tuple[str, ...] = field(
        default=(),
        repr=False,
        metadata=_from(env_list, file_member="mobile_api_key", secret=True),
    )
    """Keys the mobile SDK sends raw in ``Authorization``; given as :attr:`api_keys` are."""

    mobile_api_key_names: tuple[str | None, ...] = field(init=False, repr=False, compare=False)
    """The name of each of :attr:`mobile_api_keys`, in the same order."""

    # The environment holds one secret, taken whole (a secret may contain a comma); rotate
    # through a secrets file. As an argument: a string, an iterable of them, a mapping of key
    # ids to secrets, or None.
    jwt_secret: str | None = field(
        default=None,
        repr=False,
        compare=False,  # the first of jwt_secrets, which is compared
        metadata=_from(env_secret, file_member="jwt_secret", secret=True),
    )
    """The HS256 secret that signs new tokens (at least 32 bytes), or ``None`` when tokens are
    not configured. Given several, the first signs (unless ``jwt_private_key`` is set) and
    every one verifies. Given as a mapping (``{"2026-12": "..."}``), each name is the key id
    (``kid``) of its secret; an unnamed secret gets a key id derived from it (see
    :mod:`devicegate._keys`). A secret written ``base64url:<value>`` stands for the bytes it
    encodes (see :func:`secret_bytes`)."""

    jwt_secrets: tuple[str, ...] = field(init=False, repr=False)
    """Every secret that verifies tokens; the first one signs."""

    jwt_secret_names: tuple[str | None, ...] = field(init=False, repr=False, compare=False)
    """The key id given to each of :attr:`jwt_secrets`, in the same order (``None``: derived)."""

    jwt_private_key: str | None = field(
        default=None,
        repr=False,
        metadata=_from(env_secret, file_member="jwt_private_key", secret=True),
    )
    """An Ed25519 or P-256 private key (unencrypted PEM) that signs new tokens with EdDSA or
    ES256: the key decides the algorithm. It signs instead of ``jwt_secret``, which then only
    verifies. As an argument: PEM text, or a mapping of one key id to PEM text. Needs the
    ``crypto`` extra."""

    jwt_private_key_name: str | None = field(init=False, repr=False, compare=False)
    """The key id given to :attr:`jwt_private_key` (``None``: its RFC 7638 thumbprint)."""

    jwt_public_keys: tuple[str, ...] = field(
        default=(),
        repr=False,
        metadata=_from(env_public_keys, file_member="jwt_public_keys", secret=True),
    )
    """Ed25519 or P-256 public keys that verify tokens but cannot sign: PEM text or JWKs (a
    mapping or JSON text; a JWK Set is read as its keys). As an argument: one key, an iterable
    of them, or a mapping of key ids to keys. Needs the ``crypto`` extra."""

    jwt_public_key_names: tuple[str | None, ...] = field(init=False, repr=False, compare=False)
    """The key id given to each of :attr:`jwt_public_keys` (``None``: the JWK's ``kid`` or
    the key's thumbprint)."""

    jwks_url: str | None = field(default=None, metadata=_from(env_str, file_member="jwks_url"))
    """A JWK Set (``https://``, or ``http://`` on a loopback address) whose keys also verify
    tokens: tokens minted by another service. Fetched and refreshed by the verifier."""

    key_ring: KeyRing = field(init=False, repr=False, compare=False)
    """Every configured key by key id: the private key, the secrets, the public keys."""

    jwt_expire_seconds: int = field(
        default=300, metadata=_from(env_int, file_member="jwt_expire_seconds")
    )
    """Lifetime of minted tokens (default 300, as SenseCrypt; at most a day)."""

    device_header: str = field(default="x-instance-id", metadata=_from(env_str))
    """The request header that carries the device id."""

    api_key_header: str = field(default="x-api-key", metadata=_from(env_str))
    """The request header that carries the server API key."""

    leeway_seconds: int = field(default=0, metadata=_from(env_int))
    """Clock skew tolerated on ``exp``/``nbf``/``iat`` (0 to 60)."""

    require_device_binding: bool = field(default=False, metadata=_from(env_bool))
    """Refuse tokens without ``instance_id`` and refuse to mint them."""

    issuer: str | None = field(default=None, compare=False, metadata=_from(env_list))
    """When set, minted tokens carry ``iss`` and verified tokens must match it exactly. As an
    argument: a string or a list of the accepted values, the first of which is minted."""

    issuers: tuple[str, ...] = field(init=False)
    """Every accepted ``iss``; empty when ``issuer`` is not set."""

    audience: str | None = field(default=None, compare=False, metadata=_from(env_list))
    """When set, minted tokens carry ``aud`` and verified tokens must contain it. As an
    argument: a string or a list of accepted values, the first of which is minted."""

    audiences: tuple[str, ...] = field(init=False)
    """Every accepted ``aud``; empty when ``audience`` is not set."""

    token_cache_size: int = field(default=DEFAULT_TOKEN_CACHE_SIZE, metadata=_from(env_int))
    """How many verified tokens to remember (0 disables the cache)."""

    public_url: str | None = field(default=None, metadata=_from(env_str))
    """The URL clients reach this server at (``https://api.example.com``, a path prefix
    allowed): a DPoP proof's ``htu`` must be it followed by the request's path. Taken from
    here, never from the request's own ``Host``. Without it, DPoP requests are refused."""

    dpop_algorithms: tuple[str, ...] = field(default=("ES256", "EdDSA"), metadata=_from(env_list))
    """The algorithms a DPoP proof may be signed with (``ES256``, ``EdDSA``)."""

    dpop_proof_max_age_seconds: int = field(default=60, metadata=_from(env_int))
    """How old a DPoP proof's ``iat`` may be (5 to 300 seconds; ``leeway_seconds`` ahead)."""

    dpop_nonce: bool = field(default=False, metadata=_from(env_bool))
    """Require a server nonce in every DPoP proof (RFC 9449 §8): a proof without one, or with
    one over 5 to 10 minutes old, is refused with ``use_dpop_nonce`` and a ``DPoP-Nonce``
    header to sign the next one with, and a newer nonce is offered on admitted answers. A
    device then cannot sign proofs ahead of time for later use. Nonces are derived from the
    server API keys and token keys, so instances sharing them share nonces."""

    mint_limit_per_key: str | None = field(default=None, metadata=_from(env_limit))
    """At most this many tokens minted through the token endpoint with each server API key,
    in the ``limits`` notation (``"600/minute"``); keys without a name share one count.
    ``None``: no limit. Needs the ``ratelimit`` extra."""

    mint_limit_per_device: str | None = field(default=None, metadata=_from(env_limit))
    """At most this many tokens minted for each ``instance_id`` (``"10/minute"``), or
    ``None``."""

    failure_limit_per_address: str | None = field(default=None, metadata=_from(env_limit))
    """At most this many failed authentications from each client address, an IPv6 client by
    its /64 (``"100/minute"``): a key or token that does not verify here (a wrong or retired
    key, a bad signature, an unknown key id, a token bound to another device), not an expired
    or revoked one. Past it, the address is admitted only with credentials that need no new
    verification (keys, tokens already verified) and gets 429 for anything else until the
    window lets it in again. ``None``: no limit."""

    if TYPE_CHECKING:
        # What the generated __init__ accepts, which __post_init__ then normalises: dataclass
        # fields have no converters, so type checkers learn the wider argument types here.
        def __init__(
            self,
            *,
            api_keys: str | Iterable[str] | Mapping[str, str] = ...,
            mobile_api_keys: str | Iterable[str] | Mapping[str, str] = ...,
            jwt_secret: str | Iterable[str] | Mapping[str, str] | None = ...,
            jwt_private_key: str | Mapping[str, str] | None = ...,
            jwt_public_keys: str
            | Mapping[str, Any]
            | Iterable[str | Mapping[str, Any]]
            | Mapping[str, str | Mapping[str, Any]] = ...,
            jwks_url: str | None = ...,
            jwt_expire_seconds: int = ...,
            device_header: str = ...,
            api_key_header: str = ...,
            leeway_seconds: int = ...,
            require_device_binding: bool = ...,
            issuer: str | Iterable[str] | None = ...,
            audience: str | Iterable[str] | None = ...,
            token_cache_size: int = ...,
            public_url: str | None = ...,
            dpop_algorithms: str | Iterable[str] = ...,
            dpop_proof_max_age_seconds: int = ...,
            dpop_nonce: bool = ...,
            mint_limit_per_key: str | None = ...,
            mint_limit_per_device: str | None = ...,
            failure_limit_per_address: str | None = ...,
        ) -> None: ...

    def __post_init__(self) -> None:
        # The fields hold the arguments as given; store them normalised. A frozen dataclass
        # leaves object.__setattr__ as the only way, and only here.
        set_ = object.__setattr__
        api, api_names = _named_keys("api_keys", self.api_keys)
        mobile, mobile_names = _named_keys("mobile_api_keys", self.mobile_api_keys)
        secrets, secret_names = _named_keys("jwt_secret", self.jwt_secret)
        private, private_name = _private_key(self.jwt_private_key)
        public, public_names = _public_keys(self.jwt_public_keys)
        jwks_url = self.jwks_url
        if jwks_url is not None:
            check_jwks_url("jwks_url", jwks_url)
        for key in api:
            check_key("api_keys", key, MIN_API_KEY_BYTES)
        for key in mobile:
            check_key("mobile_api_keys", key, MIN_API_KEY_BYTES)
        for key in secrets:
            _check_jwt_secret(key)
        if not (api or mobile or secrets or private or public or jwks_url):
            raise ConfigError(
                "api_keys",
                "no credential is configured: set at least one of api_keys, mobile_api_keys, "
                "jwt_secret, jwt_private_key, jwt_public_keys or jwks_url (or load a "
                "secrets.json with GateConfig.from_secrets_file)",
            )
        seen: dict[str, str] = {}
        for name, keys in (("api_keys", api), ("mobile_api_keys", mobile), ("jwt_secret", secrets)):
            for key in keys:
                same = separation_key(key)
                if same in seen:
                    other = seen[same]
                    where = "twice" if other == name else f"both as {other} and as {name}"
                    raise ConfigError(
                        name,
                        f"the same value is used {where} (ignoring case and surrounding "
                        "spaces); every key and secret must be distinct so that one leak "
                        "cannot open another door",
                    )
                seen[same] = name
        set_(self, "api_keys", api)
        set_(self, "api_key_names", api_names)
        set_(self, "mobile_api_keys", mobile)
        set_(self, "mobile_api_key_names", mobile_names)
        set_(self, "jwt_secret", secrets[0] if secrets else None)
        set_(self, "jwt_secrets", secrets)
        set_(self, "jwt_secret_names", secret_names)
        set_(self, "jwt_private_key", private)
        set_(self, "jwt_private_key_name", private_name)
        set_(self, "jwt_public_keys", public)
        set_(self, "jwt_public_key_names", public_names)
        # The ring is built once, here: a key that does not load stops the process at start-up.
        ring: list[Key] = []
        if private is not None:
            ring.append(load_private_key("jwt_private_key", private, private_name))
        ring.extend(
            HmacKey(secret_bytes(secret), name)
            for secret, name in zip(secrets, secret_names, strict=True)
        )
        ring.extend(
            load_public_key("jwt_public_keys", key, name)
            for key, name in zip(public, public_names, strict=True)
        )
        set_(self, "key_ring", KeyRing(ring))
        _check_int(
            "jwt_expire_seconds", self.jwt_expire_seconds, low=1, high=MAX_TOKEN_LIFETIME_SECONDS
        )
        _check_int("leeway_seconds", self.leeway_seconds, low=0, high=MAX_LEEWAY_SECONDS)
        _check_int("token_cache_size", self.token_cache_size, low=0)
        set_(self, "public_url", check_public_url(self.public_url))
        given: object = self.dpop_algorithms
        algorithms = (given,) if isinstance(given, str) else tuple(given)  # type: ignore[arg-type]
        if not algorithms or not set(algorithms) <= set(DPOP_ALGORITHMS):
            raise ConfigError(
                "dpop_algorithms", f"must be one or more of {', '.join(DPOP_ALGORITHMS)}"
            )
        set_(self, "dpop_algorithms", algorithms)
        _check_int("dpop_proof_max_age_seconds", self.dpop_proof_max_age_seconds, low=5, high=300)
        for name in ("mint_limit_per_key", "mint_limit_per_device", "failure_limit_per_address"):
            check_limit(name, getattr(self, name))
        device = check_header_name("device_header", self.device_header)
        api_header = check_header_name("api_key_header", self.api_key_header)
        if device == api_header:
            raise ConfigError("device_header", "must differ from api_key_header")
        set_(self, "device_header", device)
        set_(self, "api_key_header", api_header)
        for name in ("require_device_binding", "dpop_nonce"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(name, "must be True or False")
        for name, plural in (("issuer", "issuers"), ("audience", "audiences")):
            values = _as_tuple(name, getattr(self, name))
            if any(not value for value in values) or (
                getattr(self, name) is not None and not values
            ):
                raise ConfigError(name, "must be a non-empty string, a list of them, or None")
            set_(self, name, values[0] if values else None)
            set_(self, plural, values)

    def __repr__(self) -> str:
        shown = []
        for item in fields(self):
            source = item.metadata.get(_SOURCE)
            if source is None:
                continue  # jwt_secrets: counted as jwt_secret
            value = getattr(self, item.name)
            if source.secret:
                if item.name == "jwt_secret":
                    count = len(self.jwt_secrets)
                elif item.name == "jwt_private_key":
                    count = 0 if value is None else 1
                else:
                    count = len(value)
                shown.append(f"{item.name}=<{count} hidden>")
            else:
                shown.append(f"{item.name}={value!r}")
        return f"GateConfig({', '.join(shown)})"

    def __reduce__(self) -> Any:
        # Pickling would write secrets to wherever the pickle goes; refuse it explicitly.
        raise TypeError("GateConfig holds secrets and cannot be pickled")

    def __copy__(self) -> GateConfig:
        return self  # immutable: a copy is the same value

    def __deepcopy__(self, memo: dict[int, Any]) -> GateConfig:
        return self

    def replace(self, **changes: Any) -> GateConfig:
        """Return a copy with some fields changed (validated again). Every JWT secret of a
        rotation is kept unless ``jwt_secret`` is among ``changes``.

        Raises:
            ConfigError: as the constructor.
            TypeError: a name in ``changes`` is not a constructor argument.
        """
        kept = {
            "api_keys": _keys_argument(self.api_keys, self.api_key_names),
            "mobile_api_keys": _keys_argument(self.mobile_api_keys, self.mobile_api_key_names),
            "jwt_secret": _keys_argument(self.jwt_secrets, self.jwt_secret_names),
            "jwt_private_key": (
                self.jwt_private_key
                if self.jwt_private_key_name is None or self.jwt_private_key is None
                else {self.jwt_private_key_name: self.jwt_private_key}
            ),
            "jwt_public_keys": _keys_argument(self.jwt_public_keys, self.jwt_public_key_names),
            "issuer": self.issuers or None,
            "audience": self.audiences or None,
        }
        return dataclasses.replace(self, **{**kept, **changes})

    @classmethod
    def from_secrets_file(cls, path: str | os.PathLike[str], **options: Any) -> GateConfig:
        """Load a SenseCrypt ``secrets.json``.

        Reads ``api_key``, ``mobile_api_key``, ``jwt_secret`` (each a string or a list of strings
        for rotation) and ``jwt_expire_seconds``; other keys in the file are ignored. Keyword
        ``options`` set the remaining :class:`GateConfig` fields and override the file.

        Raises:
            ConfigError: the file is missing, unreadable, not JSON, not an object, or holds
                values of the wrong type or strength.
        """
        file = Path(path)
        data = read_secrets_document(
            file, "secrets_file", f"; create one with `devicegate init --path {file}`"
        )
        return cls(**{**_from_secrets_mapping(data), **options})

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> GateConfig:
        """Build a configuration from ``DEVICEGATE_*`` environment variables.

        ``DEVICEGATE_SECRETS_FILE`` loads a ``secrets.json`` first; ``DEVICEGATE_<FIELD>`` for
        every field overrides it: ``DEVICEGATE_API_KEYS`` and ``DEVICEGATE_MOBILE_API_KEYS``
        comma-separated, ``DEVICEGATE_JWT_SECRET`` one secret taken whole. An empty variable
        counts as unset.

        Raises:
            ConfigError: as the constructor, or for a value that does not parse; named after
                the variable when the value came from one (``DEVICEGATE_LEEWAY_SECONDS: must
                be between 0 and 60, got 120``).
        """
        env = os.environ if environ is None else environ
        options: dict[str, Any] = {}
        variables: dict[str, str] = {}
        for name, source in _SOURCES.items():
            variable = env_variable(name)
            value = read_env(env, variable, source.env)
            if value is not None:
                options[name] = value
                variables[name] = variable
        secrets_file = read_env(env, "DEVICEGATE_SECRETS_FILE", env_str)
        try:
            if secrets_file is not None:
                return cls.from_secrets_file(secrets_file, **options)
            return cls(**options)
        except ConfigError as exc:
            if exc.field not in variables:
                raise
            # The operator set a variable, not a field: name what they can find and fix.
            message = str(exc).removeprefix(f"{exc.field}: ")
            raise ConfigError(variables[exc.field], message) from None


# Derived from the fields: how each is read, the variables that hold credentials (any of them
# means "configured by the environment"), and the members a secrets.json may hold.
_SOURCES: dict[str, _Source] = {
    item.name: item.metadata[_SOURCE] for item in fields(GateConfig) if _SOURCE in item.metadata
}
CREDENTIAL_VARIABLES = tuple(
    env_variable(name) for name, source in _SOURCES.items() if source.secret
)
_SECRETS_FILE_MEMBERS = frozenset(
    source.file_member for source in _SOURCES.values() if source.file_member is not None
)


def read_secrets_document(
    path: str | os.PathLike[str], field: str, missing_hint: str = ""
) -> dict[str, Any]:
    """The JSON object in a ``secrets.json``; errors name ``field`` and never its content.

    Raises:
        ConfigError: the file is missing (the message ends with ``missing_hint``), another
            user's or writable by other users, unreadable (a directory, say), over 1 MiB, not
            strict JSON (only the position is given: the document holds secrets), or not an
            object.
    """
    file = Path(path)
    try:
        with file.open("rb") as stream:
            _check_file(field, file, os.fstat(stream.fileno()))
            raw = stream.read(_MAX_SECRETS_FILE_BYTES + 1)
        # A byte-order mark, which some Windows editors write, is allowed (RFC 8259 §8.1).
        text = raw.decode("utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(field, f"{file} does not exist{missing_hint}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(field, f"cannot read {file}: {type(exc).__name__}") from None
    if len(raw) > _MAX_SECRETS_FILE_BYTES:
        raise ConfigError(field, f"{file} is over {_MAX_SECRETS_FILE_BYTES:,} bytes")
    try:
        data = loads_strict_json(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            field, f"{file} is not valid JSON (line {exc.lineno}, column {exc.colno})"
        ) from None
    except DuplicateMember as exc:
        # The value the operator meant and the one that applies could differ (most parsers
        # keep the last, some the first). Known member names are not secret; others might be.
        name = repr(exc.name) if exc.name in _SECRETS_FILE_MEMBERS else "a member"
        raise ConfigError(field, f"{file} names {name} more than once") from None
    except (ValueError, RecursionError):
        # NaN or Infinity, an integer of thousands of digits, nesting too deep to parse.
        raise ConfigError(field, f"{file} holds a value that is not usable JSON") from None
    if not isinstance(data, dict):
        raise ConfigError(field, f"{file} must hold a JSON object")
    return data


def _check_file(field: str, file: Path, status: os.stat_result) -> None:
    """Refuse a file that another user could change.

    Whoever can write the file chooses the keys (and a ``jwt_secret`` mints any token), so, as
    ssh treats ``authorized_keys``: it must belong to this user or to root and be writable by
    its owner alone. That holds for pipes too (a FIFO planted by another user is refused; the
    pipe of ``--secrets <(vault read ...)`` is the caller's, mode 0600). Not on Windows, where
    neither uids nor these mode bits say who may write.
    """
    if sys.platform != "win32":
        if status.st_uid not in (0, os.geteuid()):
            raise ConfigError(
                field,
                f"{file} belongs to another user (uid {status.st_uid}), who could change its "
                "keys; give it to the user devicegate runs as (chown)",
            )
        if status.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            mode = stat.S_IMODE(status.st_mode)
            raise ConfigError(
                field,
                f"{file} can be written by other users (mode {mode:04o}), who could then "
                f"choose its keys; run: chmod go-w {file}",
            )


def _from_secrets_mapping(data: Mapping[str, Any]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for name, source in _SOURCES.items():
        member = source.file_member
        if member is None or member not in data:
            continue
        value = data[member]
        if not source.secret:
            options[name] = value  # checked by the constructor, as any argument
        elif value is not None:  # a null key is no key
            if isinstance(value, dict) or name in ("jwt_private_key", "jwt_public_keys"):
                # Names of keys, a JWK, a JWK Set: checked by the constructor.
                options[name] = value
            elif not isinstance(value, (str, list)):
                raise ConfigError(
                    member,
                    "must be a string, a list of strings or an object of named keys in "
                    "secrets.json",
                )
            else:
                options[name] = _as_tuple(member, value)
    return options
