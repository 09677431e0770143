"""GateConfig: every setting devicegate needs, validated once at start-up."""

from __future__ import annotations

import json
import os
import re
import stat
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ._errors import ConfigError
from ._json import DuplicateMember, loads_strict_json

__all__ = [
    "DEFAULT_UPSTREAM_TIMEOUT",
    "VISIBLE_ASCII",
    "ConfigError",
    "GateConfig",
    "check_header_name",
    "check_key",
    "opens_a_door_of",
    "read_secrets_document",
    "separation_key",
]

# RFC 7518 §3.2: an HS256 key must be at least as long as the hash output (256 bits).
MIN_JWT_SECRET_BYTES = 32
# API keys are bearer secrets too; 128 bits is the floor for anything guessable online.
MIN_API_KEY_BYTES = 16
MIN_DISTINCT_CHARACTERS = 8
MAX_LEEWAY_SECONDS = 60
# Device tokens are short-lived by design (SenseCrypt's default is 5 minutes) and nothing revokes
# one before it expires: a day is the most a typo (milliseconds for seconds) may cost.
MAX_TOKEN_LIFETIME_SECONDS = 86_400
DEFAULT_TOKEN_CACHE_SIZE = 10_000
# A SenseCrypt secrets.json is a few hundred bytes; this bounds what a wrong path can cost.
_MAX_SECRETS_FILE_BYTES = 1024 * 1024
_SECRETS_FILE_MEMBERS = frozenset({"api_key", "mobile_api_key", "jwt_secret", "jwt_expire_seconds"})
# How long the gateway waits for its upstream; here so that the command line (which must not
# need httpx to start) and the proxy share one value.
DEFAULT_UPSTREAM_TIMEOUT = 30.0

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
_RESERVED_HEADERS = frozenset({"authorization", "cookie", "host", "content-length"})

_FALSE = frozenset({"0", "false", "no", "off", ""})
_TRUE = frozenset({"1", "true", "yes", "on"})


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
        for key in (*config.api_keys, *config.mobile_api_keys, *config.jwt_secrets)
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


class GateConfig:
    """devicegate's settings. Keyword-only, immutable, validated at construction.

    Args:
        api_keys: server-to-server keys accepted in the ``X-API-Key`` header. Several keys
            allow rotation.
        mobile_api_keys: keys the mobile SDK sends raw in ``Authorization``.
        jwt_secret: the HS256 secret tokens are signed with (at least 32 bytes). A sequence
            rotates: the first signs new tokens, every one verifies.
        jwt_expire_seconds: lifetime of minted tokens (default 300, as SenseCrypt).
        device_header: the request header that carries the device id.
        api_key_header: the request header that carries the server API key.
        leeway_seconds: clock skew tolerated on ``exp``/``nbf``/``iat`` (0 to 60).
        require_device_binding: refuse tokens without ``instance_id`` and refuse to mint them.
        issuer: when set, minted tokens carry ``iss`` and verified tokens must match exactly.
        audience: when set, minted tokens carry ``aud`` and verified tokens must contain it.
        token_cache_size: how many verified tokens to remember (0 disables the cache).

    Raises:
        ConfigError: naming the field and the fix, for weak, empty, duplicated or published
            secrets, out-of-range numbers, bad header names, or no credential kind at all.

    Secrets never appear in ``repr()`` or ``str()`` of this object.
    """

    __slots__ = (
        "_api_keys",
        "_jwt_secrets",
        "_mobile_api_keys",
        "api_key_header",
        "audience",
        "device_header",
        "issuer",
        "jwt_expire_seconds",
        "leeway_seconds",
        "require_device_binding",
        "token_cache_size",
    )

    _api_keys: tuple[str, ...]
    _mobile_api_keys: tuple[str, ...]
    _jwt_secrets: tuple[str, ...]
    jwt_expire_seconds: int
    device_header: str
    api_key_header: str
    leeway_seconds: int
    require_device_binding: bool
    issuer: str | None
    audience: str | None
    token_cache_size: int

    def __init__(
        self,
        *,
        api_keys: str | Iterable[str] = (),
        mobile_api_keys: str | Iterable[str] = (),
        jwt_secret: str | Iterable[str] | None = None,
        jwt_expire_seconds: int = 300,
        device_header: str = "x-instance-id",
        api_key_header: str = "x-api-key",
        leeway_seconds: int = 0,
        require_device_binding: bool = False,
        issuer: str | None = None,
        audience: str | None = None,
        token_cache_size: int = DEFAULT_TOKEN_CACHE_SIZE,
    ) -> None:
        api = _as_tuple("api_keys", api_keys)
        mobile = _as_tuple("mobile_api_keys", mobile_api_keys)
        secrets = _as_tuple("jwt_secret", jwt_secret)
        for key in api:
            check_key("api_keys", key, MIN_API_KEY_BYTES)
        for key in mobile:
            check_key("mobile_api_keys", key, MIN_API_KEY_BYTES)
        for key in secrets:
            # The JWT secret never travels, so any characters will do; keys are header values.
            check_key("jwt_secret", key, MIN_JWT_SECRET_BYTES, header_value=False)
        if not (api or mobile or secrets):
            raise ConfigError(
                "api_keys",
                "no credential is configured: set at least one of api_keys, mobile_api_keys "
                "or jwt_secret (or load a secrets.json with GateConfig.from_secrets_file)",
            )
        seen: dict[str, str] = {}
        for field, keys in (
            ("api_keys", api),
            ("mobile_api_keys", mobile),
            ("jwt_secret", secrets),
        ):
            for key in keys:
                same = separation_key(key)
                if same in seen:
                    other = seen[same]
                    where = "twice" if other == field else f"both as {other} and as {field}"
                    raise ConfigError(
                        field,
                        f"the same value is used {where} (ignoring case and surrounding "
                        "spaces); every key and secret must be distinct so that one leak "
                        "cannot open another door",
                    )
                seen[same] = field
        set_ = object.__setattr__
        set_(self, "_api_keys", api)
        set_(self, "_mobile_api_keys", mobile)
        set_(self, "_jwt_secrets", secrets)
        set_(
            self,
            "jwt_expire_seconds",
            _check_int(
                "jwt_expire_seconds", jwt_expire_seconds, low=1, high=MAX_TOKEN_LIFETIME_SECONDS
            ),
        )
        set_(
            self,
            "leeway_seconds",
            _check_int("leeway_seconds", leeway_seconds, low=0, high=MAX_LEEWAY_SECONDS),
        )
        set_(self, "token_cache_size", _check_int("token_cache_size", token_cache_size, low=0))
        device = check_header_name("device_header", device_header)
        api_header = check_header_name("api_key_header", api_key_header)
        if device == api_header:
            raise ConfigError("device_header", "must differ from api_key_header")
        set_(self, "device_header", device)
        set_(self, "api_key_header", api_header)
        if not isinstance(require_device_binding, bool):
            raise ConfigError("require_device_binding", "must be True or False")
        set_(self, "require_device_binding", require_device_binding)
        for field, value in (("issuer", issuer), ("audience", audience)):
            if value is not None and (not isinstance(value, str) or not value):
                raise ConfigError(field, "must be a non-empty string or None")
        set_(self, "issuer", issuer)
        set_(self, "audience", audience)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("GateConfig is immutable; build a new one")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("GateConfig is immutable; build a new one")

    # Secrets are reachable only through these read-only properties. They are not fields in
    # the repr.

    @property
    def api_keys(self) -> tuple[str, ...]:
        """Accepted server-to-server keys."""
        return self._api_keys

    @property
    def mobile_api_keys(self) -> tuple[str, ...]:
        """Accepted mobile SDK keys."""
        return self._mobile_api_keys

    @property
    def jwt_secrets(self) -> tuple[str, ...]:
        """Every secret that verifies tokens; the first one signs."""
        return self._jwt_secrets

    @property
    def jwt_secret(self) -> str | None:
        """The secret that signs new tokens, or ``None`` when tokens are not configured."""
        return self._jwt_secrets[0] if self._jwt_secrets else None

    def __repr__(self) -> str:
        return (
            f"GateConfig(api_keys=<{len(self._api_keys)} hidden>, "
            f"mobile_api_keys=<{len(self._mobile_api_keys)} hidden>, "
            f"jwt_secret=<{len(self._jwt_secrets)} hidden>, "
            f"jwt_expire_seconds={self.jwt_expire_seconds}, "
            f"device_header={self.device_header!r}, api_key_header={self.api_key_header!r}, "
            f"leeway_seconds={self.leeway_seconds}, "
            f"require_device_binding={self.require_device_binding}, "
            f"issuer={self.issuer!r}, audience={self.audience!r}, "
            f"token_cache_size={self.token_cache_size})"
        )

    __str__ = __repr__

    def __reduce__(self) -> Any:
        # Pickling would write secrets to wherever the pickle goes; refuse it explicitly.
        raise TypeError("GateConfig holds secrets and cannot be pickled")

    def __copy__(self) -> GateConfig:
        return self  # immutable: a copy is the same value

    def __deepcopy__(self, memo: dict[int, Any]) -> GateConfig:
        return self

    def replace(self, **changes: Any) -> GateConfig:
        """Return a copy with some fields changed (validated again)."""
        options = self._options()
        options.update(changes)
        return GateConfig(**options)

    def _options(self) -> dict[str, Any]:
        return {
            "api_keys": self._api_keys,
            "mobile_api_keys": self._mobile_api_keys,
            "jwt_secret": self._jwt_secrets or None,
            "jwt_expire_seconds": self.jwt_expire_seconds,
            "device_header": self.device_header,
            "api_key_header": self.api_key_header,
            "leeway_seconds": self.leeway_seconds,
            "require_device_binding": self.require_device_binding,
            "issuer": self.issuer,
            "audience": self.audience,
            "token_cache_size": self.token_cache_size,
        }

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

        ``DEVICEGATE_SECRETS_FILE`` loads a ``secrets.json`` first; ``DEVICEGATE_API_KEYS`` and
        ``DEVICEGATE_MOBILE_API_KEYS`` (comma-separated), ``DEVICEGATE_JWT_SECRET`` (one secret,
        taken whole) and ``DEVICEGATE_<FIELD>`` for every other field
        override it. An empty variable counts as unset.

        Raises:
            ConfigError: as the constructor, or for a value that does not parse.
        """
        env = os.environ if environ is None else environ
        options: dict[str, Any] = {}
        secrets_file = env.get("DEVICEGATE_SECRETS_FILE")
        for name, parse in _ENV_FIELDS.items():
            raw = env.get(f"DEVICEGATE_{name.upper()}")
            # An empty variable is unset (a blank line in an env file must not wipe the file's
            # keys).
            if raw is not None and raw.strip():
                options[name] = parse(name, raw)
        if secrets_file:
            return cls.from_secrets_file(secrets_file, **options)
        return cls(**options)


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
    for file_key, field in (
        ("api_key", "api_keys"),
        ("mobile_api_key", "mobile_api_keys"),
        ("jwt_secret", "jwt_secret"),
    ):
        value = data.get(file_key)
        if value is None:
            continue
        if not isinstance(value, (str, list)):
            raise ConfigError(file_key, "must be a string or a list of strings in secrets.json")
        options[field] = _as_tuple(file_key, value)
    if "jwt_expire_seconds" in data:
        options["jwt_expire_seconds"] = data["jwt_expire_seconds"]
    return options


def _env_list(name: str, raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def _env_int(name: str, raw: str) -> int:
    try:
        return int(raw.strip())
    except ValueError:
        raise ConfigError(name, "must be an integer in the environment") from None


def _env_bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(name, "must be one of true/false, 1/0, yes/no, on/off")


def _env_str(name: str, raw: str) -> str | None:
    return raw.strip() or None


def _env_secret(name: str, raw: str) -> str:
    return raw


def _env_header(name: str, raw: str) -> str:
    return raw.strip()


_ENV_FIELDS = {
    "api_keys": _env_list,
    "mobile_api_keys": _env_list,
    # One secret, taken whole: a secret may contain a comma or spaces. Rotate through a
    # secrets file.
    "jwt_secret": _env_secret,
    "jwt_expire_seconds": _env_int,
    "device_header": _env_header,
    "api_key_header": _env_header,
    "leeway_seconds": _env_int,
    "require_device_binding": _env_bool,
    "issuer": _env_str,
    "audience": _env_str,
    "token_cache_size": _env_int,
}
