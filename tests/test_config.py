"""GateConfig: validation at construction, loading secrets.json and the environment, and
keeping secrets out of every message, repr and pickle."""

from __future__ import annotations

import copy
import inspect
import json
import os
import pickle
import random
import re
import secrets
import string
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from devicegate import ConfigError, GateConfig
from devicegate._config import (
    CREDENTIAL_VARIABLES,
    env_bool,
    env_int,
    env_list,
    env_seconds,
    env_secret,
    env_str,
    env_variable,
    read_env,
)
from tests.helpers import (
    VENDOR_API_KEY,
    VENDOR_MOBILE_API_KEY,
    Keys,
    fresh_keys,
    scrub_devicegate_env,
    write_json,
    write_secrets,
)


def secret_of(length: int) -> str:
    """A random visible-ASCII secret of exactly ``length`` bytes."""
    return secrets.token_hex(length)[:length]


def assert_error(error: ConfigError, field: str, *secret_values: str) -> None:
    """The error names ``field`` and none of ``secret_values`` leaks into it."""
    assert error.field == field
    message = str(error)
    assert message.startswith(f"{field}: ")
    assert len(message) > len(f"{field}: ") + 10  # says what to do, not just the field
    for value in secret_values:
        assert value, "an empty secret proves nothing"
        assert value not in message
        assert value not in repr(error)
        assert all(value not in str(arg) for arg in error.args)


# --- construction -------------------------------------------------------------------------


def test_defaults(keys: Keys) -> None:
    config = GateConfig(jwt_secret=keys.jwt_secret)
    assert config.api_keys == ()
    assert config.mobile_api_keys == ()
    assert config.jwt_secret == keys.jwt_secret
    assert config.jwt_secrets == (keys.jwt_secret,)
    assert config.jwt_expire_seconds == 300
    assert config.device_header == "x-instance-id"
    assert config.api_key_header == "x-api-key"
    assert config.leeway_seconds == 0
    assert config.require_device_binding is False
    assert config.issuer is None
    assert config.audience is None


def test_constructor_is_keyword_only(keys: Keys) -> None:
    with pytest.raises(TypeError):
        GateConfig(keys.api_key)  # type: ignore[call-arg]


def test_single_strings_and_sequences(keys: Keys) -> None:
    second = secret_of(40)
    config = GateConfig(
        api_keys=[keys.api_key, second],
        mobile_api_keys=keys.mobile_api_key,
        jwt_secret=(keys.jwt_secret,),
    )
    assert config.api_keys == (keys.api_key, second)
    assert config.mobile_api_keys == (keys.mobile_api_key,)
    assert config.jwt_secrets == (keys.jwt_secret,)


def test_jwt_secret_rotation_first_signs(keys: Keys) -> None:
    old = secret_of(32)
    config = GateConfig(jwt_secret=[keys.jwt_secret, old])
    assert config.jwt_secret == keys.jwt_secret
    assert config.jwt_secrets == (keys.jwt_secret, old)


def test_no_jwt_secret_means_none(keys: Keys) -> None:
    config = GateConfig(api_keys=keys.api_key)
    assert config.jwt_secret is None
    assert config.jwt_secrets == ()


def test_header_names_are_lower_cased(keys: Keys) -> None:
    config = keys.config(device_header="X-Device-ID", api_key_header="X-Server-Key")
    assert config.device_header == "x-device-id"
    assert config.api_key_header == "x-server-key"


@pytest.mark.parametrize(
    ("options", "check"),
    [
        # RFC 7518 §3.2: 32 bytes is exactly enough for HS256.
        pytest.param({"jwt_secret": secret_of(32)}, "jwt_secret", id="jwt-secret-32-bytes"),
        pytest.param({"api_keys": secret_of(16)}, "api_keys", id="api-key-16-bytes"),
        pytest.param({"mobile_api_keys": secret_of(16)}, "mobile_api_keys", id="mobile-16-bytes"),
        pytest.param({"leeway_seconds": 60}, "leeway_seconds", id="leeway-60"),
        pytest.param({"jwt_expire_seconds": 1}, "jwt_expire_seconds", id="lifetime-1"),
        pytest.param({"token_cache_size": 0}, "token_cache_size", id="cache-disabled"),
    ],
)
def test_boundary_values_are_accepted(keys: Keys, options: dict[str, Any], check: str) -> None:
    base: dict[str, Any] = {"api_keys": keys.api_key}
    config = GateConfig(**{**base, **options})
    value = getattr(config, "jwt_secrets" if check == "jwt_secret" else check)
    expected = options[check]
    assert value == ((expected,) if isinstance(expected, str) else expected)


# Each row: options built from fresh keys, the field the error must name, and the secret
# values that must not appear in the message.
Case = Callable[[Keys], tuple[dict[str, Any], str, tuple[str, ...]]]


def _short_jwt_secret(keys: Keys) -> tuple[dict[str, Any], str, tuple[str, ...]]:
    short = secret_of(31)
    return {"api_keys": keys.api_key, "jwt_secret": short}, "jwt_secret", (short, keys.api_key)


def _short_rotated_jwt_secret(keys: Keys) -> tuple[dict[str, Any], str, tuple[str, ...]]:
    short = secret_of(20)
    return {"jwt_secret": [keys.jwt_secret, short]}, "jwt_secret", (short, keys.jwt_secret)


def _short_api_key(keys: Keys) -> tuple[dict[str, Any], str, tuple[str, ...]]:
    short = secret_of(15)
    return {"api_keys": short, "jwt_secret": keys.jwt_secret}, "api_keys", (short,)


def _short_mobile_key(keys: Keys) -> tuple[dict[str, Any], str, tuple[str, ...]]:
    short = secret_of(15)
    return {"mobile_api_keys": [short]}, "mobile_api_keys", (short,)


def _api_equals_mobile(keys: Keys) -> tuple[dict[str, Any], str, tuple[str, ...]]:
    return (
        {"api_keys": keys.api_key, "mobile_api_keys": keys.api_key},
        "mobile_api_keys",
        (keys.api_key,),
    )


def _api_equals_jwt(keys: Keys) -> tuple[dict[str, Any], str, tuple[str, ...]]:
    shared = secret_of(40)
    return {"api_keys": shared, "jwt_secret": shared}, "jwt_secret", (shared,)


def _mobile_equals_jwt(keys: Keys) -> tuple[dict[str, Any], str, tuple[str, ...]]:
    shared = secret_of(40)
    return (
        {
            "api_keys": keys.api_key,
            "mobile_api_keys": shared,
            "jwt_secret": [keys.jwt_secret, shared],
        },
        "jwt_secret",
        (shared, keys.api_key, keys.jwt_secret),
    )


def _api_key_twice(keys: Keys) -> tuple[dict[str, Any], str, tuple[str, ...]]:
    return {"api_keys": [keys.api_key, keys.api_key]}, "api_keys", (keys.api_key,)


def _key_with_space(keys: Keys) -> tuple[dict[str, Any], str, tuple[str, ...]]:
    spaced = secret_of(10) + " " + secret_of(10)
    return {"mobile_api_keys": spaced}, "mobile_api_keys", (spaced,)


def _non_ascii_key(keys: Keys) -> tuple[dict[str, Any], str, tuple[str, ...]]:
    accented = secret_of(20) + "é"
    return {"api_keys": accented}, "api_keys", (accented,)


def _fixed(
    options: dict[str, Any], field: str
) -> Callable[[Keys], tuple[dict[str, Any], str, tuple[str, ...]]]:
    def build(keys: Keys) -> tuple[dict[str, Any], str, tuple[str, ...]]:
        full = {"api_keys": keys.api_key, "jwt_secret": keys.jwt_secret, **options}
        return full, field, (keys.api_key, keys.jwt_secret)

    return build


CASES: list[Any] = [
    # Key strength (RFC 7518 §3.2 for HS256; 128 bits for API keys).
    pytest.param(_short_jwt_secret, id="jwt-secret-31-bytes"),
    pytest.param(_short_rotated_jwt_secret, id="rotated-jwt-secret-too-short"),
    pytest.param(_short_api_key, id="api-key-15-bytes"),
    pytest.param(_short_mobile_key, id="mobile-key-15-bytes"),
    # Key separation: one leaked value must not open two doors.
    pytest.param(_api_equals_mobile, id="api-key-equals-mobile-key"),
    pytest.param(_api_equals_jwt, id="api-key-equals-jwt-secret"),
    pytest.param(_mobile_equals_jwt, id="mobile-key-equals-rotated-jwt-secret"),
    pytest.param(_api_key_twice, id="api-key-listed-twice"),
    # Keys travel in headers: visible ASCII only.
    pytest.param(_key_with_space, id="key-with-space"),
    pytest.param(_non_ascii_key, id="non-ascii-key"),
    # Empty keys.
    pytest.param(_fixed({"api_keys": ""}, "api_keys"), id="empty-api-key"),
    pytest.param(_fixed({"mobile_api_keys": [""]}, "mobile_api_keys"), id="empty-mobile-key"),
    pytest.param(_fixed({"jwt_secret": ""}, "jwt_secret"), id="empty-jwt-secret"),
    pytest.param(_fixed({"jwt_secret": ["", "x" * 40]}, "jwt_secret"), id="empty-rotated"),
    # The vendor's published example keys, wherever they are used.
    pytest.param(_fixed({"api_keys": VENDOR_API_KEY}, "api_keys"), id="vendor-api-key"),
    pytest.param(
        _fixed({"mobile_api_keys": VENDOR_MOBILE_API_KEY}, "mobile_api_keys"),
        id="vendor-mobile-key",
    ),
    pytest.param(
        _fixed({"mobile_api_keys": VENDOR_API_KEY}, "mobile_api_keys"),
        id="vendor-api-key-as-mobile-key",
    ),
    pytest.param(_fixed({"jwt_secret": VENDOR_MOBILE_API_KEY}, "jwt_secret"), id="vendor-as-jwt"),
    # Numbers.
    pytest.param(_fixed({"jwt_expire_seconds": 0}, "jwt_expire_seconds"), id="lifetime-0"),
    pytest.param(_fixed({"jwt_expire_seconds": -300}, "jwt_expire_seconds"), id="lifetime-neg"),
    pytest.param(_fixed({"leeway_seconds": 61}, "leeway_seconds"), id="leeway-61"),
    pytest.param(_fixed({"leeway_seconds": -1}, "leeway_seconds"), id="leeway-negative"),
    pytest.param(_fixed({"token_cache_size": -1}, "token_cache_size"), id="cache-negative"),
    # Wrong value types.
    pytest.param(_fixed({"api_keys": 12345}, "api_keys"), id="api-keys-int"),
    pytest.param(_fixed({"api_keys": b"x" * 32}, "api_keys"), id="api-keys-bytes"),
    pytest.param(_fixed({"mobile_api_keys": ["a" * 32, 7]}, "mobile_api_keys"), id="list-int"),
    pytest.param(_fixed({"jwt_secret": [b"y" * 40]}, "jwt_secret"), id="jwt-secret-bytes"),
    pytest.param(_fixed({"jwt_expire_seconds": "300"}, "jwt_expire_seconds"), id="lifetime-str"),
    pytest.param(_fixed({"jwt_expire_seconds": 300.0}, "jwt_expire_seconds"), id="lifetime-float"),
    pytest.param(_fixed({"jwt_expire_seconds": True}, "jwt_expire_seconds"), id="lifetime-bool"),
    pytest.param(_fixed({"leeway_seconds": None}, "leeway_seconds"), id="leeway-none"),
    pytest.param(_fixed({"leeway_seconds": False}, "leeway_seconds"), id="leeway-bool"),
    pytest.param(
        _fixed({"require_device_binding": "yes"}, "require_device_binding"), id="binding-str"
    ),
    pytest.param(_fixed({"require_device_binding": 1}, "require_device_binding"), id="binding-1"),
    pytest.param(_fixed({"issuer": ""}, "issuer"), id="issuer-empty"),
    pytest.param(_fixed({"issuer": 42}, "issuer"), id="issuer-int"),
    pytest.param(_fixed({"audience": ""}, "audience"), id="audience-empty"),
    pytest.param(_fixed({"audience": []}, "audience"), id="audience-empty-list"),
    pytest.param(_fixed({"audience": ["a", ""]}, "audience"), id="audience-list-with-empty"),
    pytest.param(_fixed({"issuer": ["a", 1]}, "issuer"), id="issuer-list-with-int"),
    # Header names.
    pytest.param(_fixed({"device_header": "x device"}, "device_header"), id="header-space"),
    pytest.param(_fixed({"device_header": ""}, "device_header"), id="header-empty"),
    pytest.param(_fixed({"device_header": "x-dévice"}, "device_header"), id="header-non-ascii"),
    pytest.param(_fixed({"device_header": 5}, "device_header"), id="header-int"),
    pytest.param(_fixed({"device_header": "Authorization"}, "device_header"), id="header-auth"),
    pytest.param(_fixed({"api_key_header": "cookie"}, "api_key_header"), id="header-cookie"),
    # The DPoP proof's header (RFC 9449 §4.1): a device id read from it would be the proof.
    pytest.param(_fixed({"device_header": "DPoP"}, "device_header"), id="header-dpop"),
    pytest.param(_fixed({"api_key_header": "x-instance-id"}, "device_header"), id="same-headers"),
]


@pytest.mark.parametrize("case", CASES)
def test_invalid_configuration(keys: Keys, case: Case) -> None:
    options, field, secret_values = case(keys)
    with pytest.raises(ConfigError) as excinfo:
        GateConfig(**options)
    assert_error(excinfo.value, field, *secret_values)


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({}, id="nothing"),
        pytest.param({"api_keys": (), "mobile_api_keys": [], "jwt_secret": None}, id="all-empty"),
        pytest.param({"jwt_expire_seconds": 60, "leeway_seconds": 5}, id="only-numbers"),
    ],
)
def test_no_credential_kind_configured(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigError) as excinfo:
        GateConfig(**options)
    assert_error(excinfo.value, "api_keys")
    for field in ("api_keys", "mobile_api_keys", "jwt_secret"):
        assert field in str(excinfo.value)


def test_config_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="no credential"):
        GateConfig()


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        # Published: the example keys of the SenseCrypt documentation, wherever they are used.
        ("api_keys", VENDOR_API_KEY, "SenseCrypt documentation"),
        ("jwt_secret", VENDOR_MOBILE_API_KEY, "SenseCrypt documentation"),
        # Too short, and the error says how long it must be and is (RFC 7518 §3.2 for HS256).
        ("jwt_secret", secret_of(31), r"at least 32 bytes .*this one is 31"),
        ("api_keys", secret_of(15), r"at least 16 bytes .*this one is 15"),
        # Long enough but too few distinct characters to be random.
        ("api_keys", "a" * 40, "distinct characters"),
        ("api_keys", "abc" * 6, "distinct characters"),
        ("mobile_api_keys", "ab" * 20, "distinct characters"),
        ("jwt_secret", "0123456" * 6, "distinct characters"),
        # Placeholders copied from documentation, in any case.
        ("api_keys", "replace-me-0123456789abcdef", "placeholder"),
        ("mobile_api_keys", "REPLACE-WITH-THE-MOBILE-KEY", "placeholder"),
        ("jwt_secret", "change-me-to-a-long-random-secret-value", "placeholder"),
        ("jwt_secret", "ChangeMe!ChangeMe!ChangeMe!ChangeMe!1", "placeholder"),
        ("api_keys", "example-key-Z7q9LmW2xK", "placeholder"),
        ("mobile_api_keys", "placeholder-9f8e7d6c5b4a", "placeholder"),
    ],
)
def test_weak_keys_are_refused_with_the_reason(field: str, value: str, says: str) -> None:
    options: dict[str, Any] = {field: value}
    with pytest.raises(ConfigError) as excinfo:
        GateConfig(**options)
    assert_error(excinfo.value, field, value)
    assert re.search(says, str(excinfo.value))


def test_every_field_is_a_keyword_argument(keys: Keys) -> None:
    # Written out in full so that mypy checks the argument types GateConfig declares for type
    # checkers: keys as a string, a list, a generator.
    config = GateConfig(
        api_keys=[keys.api_key],
        mobile_api_keys=keys.mobile_api_key,
        jwt_secret=(secret for secret in [keys.jwt_secret]),
        jwt_expire_seconds=60,
        device_header="x-device",
        api_key_header="x-key",
        leeway_seconds=5,
        require_device_binding=True,
        issuer="https://issuer.example",
        audience="mobile",
        token_cache_size=5,
    )
    assert set(inspect.signature(GateConfig).parameters) == {
        "api_keys",
        "mobile_api_keys",
        "jwt_secret",
        "jwt_expire_seconds",
        "device_header",
        "api_key_header",
        "leeway_seconds",
        "require_device_binding",
        "issuer",
        "audience",
        "token_cache_size",
        "jwt_private_key",
        "jwt_public_keys",
        "jwks_url",
        "public_url",
        "dpop_algorithms",
        "dpop_proof_max_age_seconds",
        "dpop_nonce",
        "mint_limit_per_key",
        "mint_limit_per_device",
        "failure_limit_per_address",
    }
    assert config.jwt_secrets == (keys.jwt_secret,)
    assert config.token_cache_size == 5


# --- secrets stay secret --------------------------------------------------------------------


def test_repr_and_str_hide_secrets(keys: Keys) -> None:
    old = secret_of(32)
    config = GateConfig(
        api_keys=keys.api_key,
        mobile_api_keys=keys.mobile_api_key,
        jwt_secret=[keys.jwt_secret, old],
        issuer="https://issuer.example",
    )
    for text in (repr(config), str(config), f"{config}", f"{config!r}"):
        for value in (keys.api_key, keys.mobile_api_key, keys.jwt_secret, old):
            assert value not in text
        assert "jwt_secret=<2 hidden>" in text
        assert "api_keys=<1 hidden>" in text
        assert "issuer='https://issuer.example'" in text


def test_pickling_is_refused(keys: Keys) -> None:
    config = keys.config()
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        with pytest.raises(TypeError, match="cannot be pickled"):
            pickle.dumps(config, protocol=protocol)


@pytest.mark.parametrize(
    "name",
    ["jwt_expire_seconds", "leeway_seconds", "issuer", "jwt_secrets", "api_keys", "jwt_secret"],
)
def test_immutable(keys: Keys, name: str) -> None:
    config = keys.config()
    before = repr(config), config.jwt_secrets, config.api_keys
    with pytest.raises(AttributeError):
        setattr(config, name, 1)
    with pytest.raises(AttributeError):
        delattr(config, name)
    assert (repr(config), config.jwt_secrets, config.api_keys) == before


def test_no_new_attributes(keys: Keys) -> None:
    config = keys.config()
    with pytest.raises(AttributeError):
        setattr(config, "extra", True)  # noqa: B010 - mypy rightly refuses the plain form
    assert not hasattr(config, "extra")


# --- a value --------------------------------------------------------------------------------


def test_equal_settings_make_equal_configurations(keys: Keys) -> None:
    old = secret_of(40)
    config = GateConfig(api_keys=keys.api_key, jwt_secret=[keys.jwt_secret, old])
    same = GateConfig(api_keys=[keys.api_key], jwt_secret=(keys.jwt_secret, old))
    assert config == same
    assert hash(config) == hash(same)
    assert config != config.replace(jwt_secret=keys.jwt_secret)  # one secret fewer
    assert config != config.replace(leeway_seconds=1)
    assert config != config.replace(jwt_secret=[old, keys.jwt_secret])  # another signs


def test_copies_are_the_same_object(keys: Keys) -> None:
    config = keys.config()
    assert copy.copy(config) is config
    assert copy.deepcopy(config) is config
    assert copy.deepcopy({"config": config})["config"] is config


# --- replace --------------------------------------------------------------------------------


def test_replace_returns_a_new_validated_copy(keys: Keys) -> None:
    config = keys.config(issuer="https://a.example")
    changed = config.replace(leeway_seconds=30, require_device_binding=True)
    assert changed is not config
    assert changed.leeway_seconds == 30
    assert changed.require_device_binding is True
    assert changed.issuer == "https://a.example"
    assert changed.api_keys == config.api_keys
    assert changed.mobile_api_keys == config.mobile_api_keys
    assert changed.jwt_secrets == config.jwt_secrets
    assert config.leeway_seconds == 0
    assert config.require_device_binding is False


def test_replace_validates_again(keys: Keys) -> None:
    config = keys.config()
    with pytest.raises(ConfigError) as excinfo:
        config.replace(leeway_seconds=61)
    assert_error(excinfo.value, "leeway_seconds", keys.api_key, keys.jwt_secret)
    with pytest.raises(ConfigError) as excinfo:
        config.replace(jwt_secret=keys.api_key)
    assert_error(excinfo.value, "jwt_secret", keys.api_key)


def test_replace_keeps_every_secret_of_a_rotation(keys: Keys) -> None:
    old = secret_of(40)
    config = GateConfig(jwt_secret=[keys.jwt_secret, old]).replace(leeway_seconds=5)
    assert config.jwt_secrets == (keys.jwt_secret, old)
    assert config.jwt_secret == keys.jwt_secret


def test_replace_can_drop_tokens(keys: Keys) -> None:
    config = keys.config().replace(jwt_secret=None)
    assert config.jwt_secret is None
    assert config.api_keys == (keys.api_key,)


def test_replace_rejects_unknown_fields(keys: Keys) -> None:
    with pytest.raises(TypeError):
        keys.config().replace(jwt_algorithm="none")


# --- secrets.json ---------------------------------------------------------------------------


def test_secrets_file_with_strings(tmp_path: Path, keys: Keys) -> None:
    path = write_secrets(
        tmp_path / "secrets.json",
        keys,
        jwt_expire_seconds=120,
        # Unrelated SenseCrypt settings are ignored.
        issuers_private_key="-----BEGIN PRIVATE KEY-----",
        database_url="postgres://",
    )
    config = GateConfig.from_secrets_file(path)
    assert config.api_keys == (keys.api_key,)
    assert config.mobile_api_keys == (keys.mobile_api_key,)
    assert config.jwt_secrets == (keys.jwt_secret,)
    assert config.jwt_expire_seconds == 120


def test_secrets_file_with_lists_for_rotation(tmp_path: Path, keys: Keys) -> None:
    old_api, old_mobile, old_jwt = secret_of(32), secret_of(32), secret_of(32)
    path = write_json(
        tmp_path / "secrets.json",
        {
            "api_key": [keys.api_key, old_api],
            "mobile_api_key": [keys.mobile_api_key, old_mobile],
            "jwt_secret": [keys.jwt_secret, old_jwt],
        },
    )
    config = GateConfig.from_secrets_file(str(path))
    assert config.api_keys == (keys.api_key, old_api)
    assert config.mobile_api_keys == (keys.mobile_api_key, old_mobile)
    assert config.jwt_secrets == (keys.jwt_secret, old_jwt)
    assert config.jwt_secret == keys.jwt_secret
    assert config.jwt_expire_seconds == 300


def test_secrets_file_null_and_missing_keys(tmp_path: Path, keys: Keys) -> None:
    path = write_json(tmp_path / "secrets.json", {"api_key": keys.api_key, "jwt_secret": None})
    config = GateConfig.from_secrets_file(path)
    assert config.api_keys == (keys.api_key,)
    assert config.mobile_api_keys == ()
    assert config.jwt_secret is None


def test_secrets_file_options_override(tmp_path: Path, keys: Keys) -> None:
    path = write_json(
        tmp_path / "secrets.json", {"jwt_secret": keys.jwt_secret, "jwt_expire_seconds": 120}
    )
    config = GateConfig.from_secrets_file(
        path, jwt_expire_seconds=60, leeway_seconds=5, issuer="https://i.example"
    )
    assert config.jwt_expire_seconds == 60
    assert config.leeway_seconds == 5
    assert config.issuer == "https://i.example"


def test_documentation_sample_file_is_refused(tmp_path: Path) -> None:
    # The file exactly as the vendor prints it: public keys, placeholder secret.
    path = write_json(
        tmp_path / "secrets.json",
        {
            "api_key": VENDOR_API_KEY,
            "mobile_api_key": VENDOR_MOBILE_API_KEY,
            "jwt_secret": "<a value only you know>",
            "jwt_expire_seconds": 300,
        },
    )
    with pytest.raises(ConfigError) as excinfo:
        GateConfig.from_secrets_file(path)
    assert_error(excinfo.value, "api_keys", VENDOR_API_KEY)


def _file(content: Callable[[Keys, Keys], str | bytes]) -> Callable[[Path, Keys, Keys], Path]:
    """A maker of a secrets.json holding ``content``, built from two sets of keys."""

    def make(directory: Path, keys: Keys, other: Keys) -> Path:
        path = directory / "secrets.json"
        data = content(keys, other)
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
        return path

    return make


def _beside_a_key(members: str) -> Callable[[Path, Keys, Keys], Path]:
    """A maker of a secrets.json with an API key and ``members``, JSON text."""
    return _file(lambda k, o: f'{{"api_key": "{k.api_key}", {members}}}')


def _json(document: Callable[[Keys], object]) -> Callable[[Path, Keys, Keys], Path]:
    return _file(lambda k, o: json.dumps(document(k)))


@pytest.mark.parametrize(
    ("make", "says"),
    [
        # Not there, or not a file that can be read as UTF-8.
        pytest.param(
            lambda d, k, o: d / "nope" / "secrets.json", "{path} does not exist", id="missing"
        ),
        pytest.param(lambda d, k, o: d, "cannot read", id="directory"),
        pytest.param(
            _file(lambda k, o: b'{"api_key": "' + k.api_key.encode() + b'\xff"}'),
            "cannot read",
            id="not-utf8",
        ),
        # Not JSON. Only the position is given: the document holds secrets.
        pytest.param(
            _file(lambda k, o: f'{{"api_key": "{k.api_key}",'), "not valid JSON", id="truncated"
        ),
        pytest.param(
            _file(lambda k, o: f'{{"api_key": "{k.api_key}"}} trailing'),
            "not valid JSON",
            id="trailing-data",
        ),
        pytest.param(
            _file(lambda k, o: f"{{'api_key': '{k.api_key}'}}"),
            "not valid JSON",
            id="single-quotes",
        ),
        pytest.param(
            _file(lambda k, o: f'{{"api_key": {k.api_key}}}'), "not valid JSON", id="unquoted"
        ),
        pytest.param(_file(lambda k, o: ""), "not valid JSON", id="empty-file"),
        # JSON, but not an object.
        pytest.param(_json(lambda k: [k.api_key, k.jwt_secret]), "JSON object", id="list"),
        pytest.param(_json(lambda k: k.jwt_secret), "JSON object", id="string"),
        pytest.param(_json(lambda k: None), "JSON object", id="null"),
        pytest.param(_json(lambda k: 42), "JSON object", id="number"),
        # Not usable: NaN, infinities, an integer of thousands of digits, nesting too deep.
        pytest.param(_beside_a_key('"jwt_expire_seconds": NaN'), "not usable JSON", id="nan"),
        pytest.param(
            _beside_a_key('"jwt_expire_seconds": -Infinity'), "not usable JSON", id="infinity"
        ),
        pytest.param(
            _beside_a_key('"jwt_expire_seconds": 1' + "0" * 5000), "not usable JSON", id="huge"
        ),
        pytest.param(
            _beside_a_key('"x": ' + "[" * 100_000 + "]" * 100_000), "not usable JSON", id="deep"
        ),
        # Over 1 MiB: refused unread.
        pytest.param(
            _beside_a_key(f'"padding": "{"x" * 1024 * 1024}"'),
            "is over 1,048,576 bytes",
            id="oversized",
        ),
        # A member named twice. An operator who adds a new jwt_secret line and leaves the old one
        # below it: Python's json keeps the last, other parsers the first. Which secret signs
        # must not depend on that.
        pytest.param(
            _file(
                lambda k, o: (
                    f'{{"api_key": "{k.api_key}", "jwt_secret": "{o.jwt_secret}", '
                    f'"jwt_secret": "{k.jwt_secret}"}}'
                )
            ),
            "names 'jwt_secret' more than once",
            id="member-twice",
        ),
        # Not one of ours: its name could be anything, a pasted secret included.
        pytest.param(
            _file(
                lambda k, o: (
                    f'{{"api_key": "{k.api_key}", "{k.jwt_secret}": 1, "{k.jwt_secret}": 2}}'
                )
            ),
            "names a member more than once",
            id="unknown-member-twice",
        ),
    ],
)
def test_unusable_secrets_files_are_one_clear_error(
    tmp_path: Path, keys: Keys, make: Callable[[Path, Keys, Keys], Path], says: str
) -> None:
    other = fresh_keys()
    path = make(tmp_path, keys, other)
    with pytest.raises(ConfigError) as excinfo:
        GateConfig.from_secrets_file(path)
    secret_values = (keys.api_key, keys.mobile_api_key, keys.jwt_secret, other.jwt_secret)
    assert_error(excinfo.value, "secrets_file", *secret_values)
    assert says.format(path=path) in str(excinfo.value)
    # The parser's message, which may quote the document, is not chained into tracebacks.
    assert excinfo.value.__cause__ is None
    assert excinfo.value.__context__ is None or excinfo.value.__suppress_context__


@pytest.mark.skipif(os.name != "posix", reason="mode bits describe writers on POSIX only")
@pytest.mark.parametrize("mode", [0o666, 0o646, 0o664, 0o620, 0o602])
def test_a_file_other_users_may_write_is_refused(tmp_path: Path, keys: Keys, mode: int) -> None:
    # Whoever can write it chooses the keys, and with the jwt_secret mints any token.
    path = write_secrets(tmp_path / "secrets.json", keys)
    path.chmod(mode)
    with pytest.raises(ConfigError) as excinfo:
        GateConfig.from_secrets_file(path)
    assert_error(excinfo.value, "secrets_file", keys.api_key, keys.jwt_secret)
    assert f"can be written by other users (mode {mode:04o})" in str(excinfo.value)
    assert f"chmod go-w {path}" in str(excinfo.value)


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o644, 0o400, 0o444])
def test_a_file_only_its_owner_may_write_is_read(tmp_path: Path, keys: Keys, mode: int) -> None:
    # 0644 and 0444 are what Kubernetes and Docker secrets mount: readable is fine.
    path = write_secrets(tmp_path / "secrets.json", keys)
    path.chmod(mode)
    assert GateConfig.from_secrets_file(path).api_keys == (keys.api_key,)


@pytest.mark.skipif(os.name != "posix", reason="owners are uids on POSIX only")
def test_another_users_file_is_refused(
    tmp_path: Path, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its owner can change its keys whatever its mode. Seen from another (non-root) user: the
    # file stays this process's, the process pretends to be someone else.
    path = write_secrets(tmp_path / "secrets.json", keys)
    owner = path.stat().st_uid
    monkeypatch.setattr(os, "geteuid", lambda: owner + 4242)
    if owner == 0:  # a file of root's is trusted by everyone, as ssh trusts it
        assert GateConfig.from_secrets_file(path).api_keys == (keys.api_key,)
        return
    with pytest.raises(ConfigError) as excinfo:
        GateConfig.from_secrets_file(path)
    assert_error(excinfo.value, "secrets_file", keys.api_key)
    assert f"belongs to another user (uid {owner})" in str(excinfo.value)


ANOTHER_UID = 4242


@pytest.fixture
def owned_by_another_user(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every file devicegate opens reads as owned by ANOTHER_UID, neither root nor this user
    (a test cannot chown unless it runs as root)."""
    real_fstat = os.fstat

    def fstat_of_another_owner(fd: int) -> os.stat_result:
        status = list(real_fstat(fd))
        status[4] = ANOTHER_UID  # st_uid
        return os.stat_result(status)

    monkeypatch.setattr(os, "fstat", fstat_of_another_owner)


@pytest.mark.skipif(os.name != "posix", reason="owners are uids on POSIX only")
@pytest.mark.usefixtures("owned_by_another_user")
def test_a_file_of_a_user_neither_root_nor_this_one_is_refused(tmp_path: Path, keys: Keys) -> None:
    path = write_secrets(tmp_path / "secrets.json", keys)
    with pytest.raises(ConfigError) as excinfo:
        GateConfig.from_secrets_file(path)
    assert "belongs to another user (uid 4242)" in str(excinfo.value)


@pytest.mark.skipif(os.name != "posix", reason="FIFOs and uids are POSIX")
@pytest.mark.usefixtures("owned_by_another_user")
def test_another_users_fifo_is_refused_before_anything_is_read(tmp_path: Path) -> None:
    # A FIFO planted by another user would feed devicegate any jwt_secret it likes.
    fifo = tmp_path / "secrets.json"
    os.mkfifo(fifo, 0o600)
    # A writer, so that opening the FIFO for reading does not wait. It goes away after a few
    # seconds: were the check no longer made before reading, the test would fail, not hang.
    writer = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
    closed = threading.Event()

    def close_writer() -> None:
        if not closed.is_set():
            closed.set()
            os.close(writer)

    timer = threading.Timer(5.0, close_writer)
    timer.start()
    try:
        with pytest.raises(ConfigError) as excinfo:
            GateConfig.from_secrets_file(fifo)
    finally:
        timer.cancel()
        timer.join()
        close_writer()
    assert "belongs to another user (uid 4242)" in str(excinfo.value)


@pytest.mark.skipif(os.name != "posix", reason="process substitution is a POSIX shell's")
def test_a_pipe_is_read_as_process_substitution_gives_it(keys: Keys) -> None:
    # --secrets <(vault read ...) keeps the secrets off disk: the path is /dev/fd/N, a pipe.
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, json.dumps({"api_key": keys.api_key}).encode())
        os.close(write_end)
        config = GateConfig.from_secrets_file(f"/dev/fd/{read_end}")
    finally:
        os.close(read_end)
    assert config.api_keys == (keys.api_key,)


def test_a_byte_order_mark_is_allowed(tmp_path: Path, keys: Keys) -> None:
    path = tmp_path / "secrets.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"api_key": keys.api_key}).encode())
    assert GateConfig.from_secrets_file(path).api_keys == (keys.api_key,)


@pytest.mark.parametrize(
    ("build", "field"),
    [
        pytest.param(lambda k: {"api_key": 12345}, "api_key", id="api-key-int"),
        # An object names its keys: each value must still be a key.
        pytest.param(lambda k: {"api_key": {"billing": 12345}}, "api_keys", id="named-key-int"),
        pytest.param(lambda k: {"api_key": {"": k.api_key}}, "api_keys", id="empty-key-name"),
        pytest.param(
            lambda k: {"jwt_secret": {"2026-12": "short"}}, "jwt_secret", id="named-weak-secret"
        ),
        pytest.param(lambda k: {"api_key": True}, "api_key", id="api-key-bool"),
        pytest.param(
            lambda k: {"mobile_api_key": [k.mobile_api_key, 5]}, "mobile_api_key", id="list-int"
        ),
        pytest.param(lambda k: {"jwt_secret": [k.jwt_secret, None]}, "jwt_secret", id="list-null"),
        pytest.param(
            lambda k: {"jwt_secret": k.jwt_secret, "jwt_expire_seconds": "300"},
            "jwt_expire_seconds",
            id="lifetime-string",
        ),
        pytest.param(
            lambda k: {"jwt_secret": k.jwt_secret, "jwt_expire_seconds": 1.5},
            "jwt_expire_seconds",
            id="lifetime-float",
        ),
        pytest.param(
            lambda k: {"jwt_secret": k.jwt_secret, "jwt_expire_seconds": None},
            "jwt_expire_seconds",
            id="lifetime-null",
        ),
        pytest.param(
            lambda k: {"jwt_secret": k.jwt_secret, "jwt_expire_seconds": 0},
            "jwt_expire_seconds",
            id="lifetime-zero",
        ),
        pytest.param(
            lambda k: {"jwt_secret": k.jwt_secret, "jwt_expire_seconds": 86_401},
            "jwt_expire_seconds",
            id="lifetime-over-a-day",
        ),
        pytest.param(
            lambda k: {"jwt_secret": k.jwt_secret, "jwt_expire_seconds": 300_000},
            "jwt_expire_seconds",
            id="lifetime-in-milliseconds",
        ),
        pytest.param(lambda k: {"jwt_secret": "short"}, "jwt_secret", id="weak-jwt-secret"),
        pytest.param(
            lambda k: {"api_key": k.api_key, "mobile_api_key": k.api_key},
            "mobile_api_keys",
            id="same-key-twice",
        ),
        pytest.param(lambda k: {"issuers_private_key": "x"}, "api_keys", id="no-credential"),
    ],
)
def test_secrets_file_with_bad_values(
    tmp_path: Path, keys: Keys, build: Callable[[Keys], dict[str, Any]], field: str
) -> None:
    path = write_json(tmp_path / "secrets.json", build(keys))
    with pytest.raises(ConfigError) as excinfo:
        GateConfig.from_secrets_file(path)
    assert_error(excinfo.value, field, keys.api_key, keys.mobile_api_key, keys.jwt_secret)


# --- the environment ------------------------------------------------------------------------


def test_from_env_reads_every_field(keys: Keys) -> None:
    old_api = secret_of(32)
    environ = {
        "DEVICEGATE_API_KEYS": f"{keys.api_key}, {old_api}",
        "DEVICEGATE_MOBILE_API_KEYS": keys.mobile_api_key,
        "DEVICEGATE_JWT_SECRET": keys.jwt_secret,
        "DEVICEGATE_JWT_EXPIRE_SECONDS": " 120 ",
        "DEVICEGATE_DEVICE_HEADER": "X-Device-ID",
        "DEVICEGATE_API_KEY_HEADER": "x-server-key",
        "DEVICEGATE_LEEWAY_SECONDS": "5",
        "DEVICEGATE_REQUIRE_DEVICE_BINDING": "true",
        "DEVICEGATE_ISSUER": "https://issuer.example",
        "DEVICEGATE_AUDIENCE": "mobile",
        "DEVICEGATE_TOKEN_CACHE_SIZE": "0",
        "DEVICEGATE_JWT_PRIVATE_KEY": "",
        "DEVICEGATE_JWT_PUBLIC_KEYS": "",
        "DEVICEGATE_JWKS_URL": "",
        "DEVICEGATE_PUBLIC_URL": "HTTPS://API.example.com:443/v1/",
        "DEVICEGATE_DPOP_ALGORITHMS": "ES256",
        "DEVICEGATE_DPOP_PROOF_MAX_AGE_SECONDS": "30",
        "DEVICEGATE_DPOP_NONCE": "true",
        "DEVICEGATE_MINT_LIMIT_PER_KEY": "600/minute",
        "DEVICEGATE_MINT_LIMIT_PER_DEVICE": " 10/minute ",
        "DEVICEGATE_FAILURE_LIMIT_PER_ADDRESS": "none",
        "DEVICEGATE_SOMETHING_ELSE": "ignored",
        "API_KEYS": "ignored-without-prefix",
    }
    # Every constructor argument is read from DEVICEGATE_ and its name in capitals.
    assert {env_variable(name) for name in inspect.signature(GateConfig).parameters} < set(environ)
    config = GateConfig.from_env(environ)
    assert config.api_keys == (keys.api_key, old_api)
    assert config.mobile_api_keys == (keys.mobile_api_key,)
    assert config.jwt_secrets == (keys.jwt_secret,)
    assert config.jwt_expire_seconds == 120
    assert config.device_header == "x-device-id"
    assert config.api_key_header == "x-server-key"
    assert config.leeway_seconds == 5
    assert config.require_device_binding is True
    assert config.issuer == "https://issuer.example"
    assert config.audience == "mobile"
    assert config.public_url == "https://api.example.com/v1"
    assert config.dpop_algorithms == ("ES256",)
    assert config.dpop_proof_max_age_seconds == 30
    assert config.dpop_nonce is True
    assert config.mint_limit_per_key == "600/minute"
    assert config.mint_limit_per_device == "10/minute"
    assert config.failure_limit_per_address is None
    assert config.token_cache_size == 0


def test_empty_variables_are_unset_and_do_not_wipe_the_file(keys: Keys, tmp_path: Path) -> None:
    path = write_json(
        tmp_path / "secrets.json", {"api_key": keys.api_key, "jwt_secret": keys.jwt_secret}
    )
    config = GateConfig.from_env(
        {
            "DEVICEGATE_SECRETS_FILE": str(path),
            "DEVICEGATE_API_KEYS": "",
            "DEVICEGATE_JWT_SECRET": "  ",
            "DEVICEGATE_JWT_EXPIRE_SECONDS": "",
        }
    )
    assert config.api_keys == (keys.api_key,)
    assert config.jwt_secrets == (keys.jwt_secret,)
    assert config.jwt_expire_seconds == 300


def test_jwt_secret_may_hold_any_characters_but_keys_may_not(keys: Keys) -> None:
    secret = "a jwt secret with spaces and \u00fcml\u00e4uts, long enough"
    assert GateConfig(jwt_secret=secret).jwt_secret == secret
    with pytest.raises(ConfigError) as info:
        GateConfig(api_keys="an api key with spaces in it")
    assert info.value.field == "api_keys"


def test_from_env_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch, keys: Keys) -> None:
    scrub_devicegate_env(monkeypatch)
    monkeypatch.setenv("DEVICEGATE_JWT_SECRET", keys.jwt_secret)
    config = GateConfig.from_env()
    assert config.jwt_secrets == (keys.jwt_secret,)
    assert config.api_keys == ()


def test_from_env_secrets_file(tmp_path: Path, keys: Keys) -> None:
    path = write_json(
        tmp_path / "secrets.json",
        {"api_key": keys.api_key, "jwt_secret": keys.jwt_secret, "jwt_expire_seconds": 120},
    )
    config = GateConfig.from_env(
        {
            "DEVICEGATE_SECRETS_FILE": str(path),
            "DEVICEGATE_JWT_EXPIRE_SECONDS": "60",
            "DEVICEGATE_REQUIRE_DEVICE_BINDING": "yes",
        }
    )
    assert config.api_keys == (keys.api_key,)
    assert config.jwt_secrets == (keys.jwt_secret,)
    # Variables override the file.
    assert config.jwt_expire_seconds == 60
    assert config.require_device_binding is True


def test_from_env_secrets_file_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as excinfo:
        GateConfig.from_env({"DEVICEGATE_SECRETS_FILE": str(tmp_path / "missing.json")})
    assert_error(excinfo.value, "secrets_file")


JWT_SECRET_WITH_A_COMMA = "first-half-of-the-secret,second-half-of-it"
JWT_SECRET_WITH_SPACES = f" {secret_of(40)} "


@pytest.mark.parametrize(
    ("variable", "raw", "attribute", "expected"),
    [
        # Booleans: the usual spellings, in any case, spaces around allowed.
        ("DEVICEGATE_REQUIRE_DEVICE_BINDING", "1", "require_device_binding", True),
        ("DEVICEGATE_REQUIRE_DEVICE_BINDING", "true", "require_device_binding", True),
        ("DEVICEGATE_REQUIRE_DEVICE_BINDING", "TRUE", "require_device_binding", True),
        ("DEVICEGATE_REQUIRE_DEVICE_BINDING", " yes ", "require_device_binding", True),
        ("DEVICEGATE_REQUIRE_DEVICE_BINDING", "On", "require_device_binding", True),
        ("DEVICEGATE_REQUIRE_DEVICE_BINDING", "0", "require_device_binding", False),
        ("DEVICEGATE_REQUIRE_DEVICE_BINDING", "false", "require_device_binding", False),
        ("DEVICEGATE_REQUIRE_DEVICE_BINDING", "No", "require_device_binding", False),
        ("DEVICEGATE_REQUIRE_DEVICE_BINDING", "off", "require_device_binding", False),
        # Integers and header names, spaces around allowed.
        ("DEVICEGATE_JWT_EXPIRE_SECONDS", " 120 ", "jwt_expire_seconds", 120),
        ("DEVICEGATE_DEVICE_HEADER", " X-Device-ID ", "device_header", "x-device-id"),
        # Key lists: comma-separated, blanks skipped, so only blanks and commas is no key.
        ("DEVICEGATE_MOBILE_API_KEYS", " , ", "mobile_api_keys", ()),
        # The JWT secret is one secret taken whole: commas and spaces are part of it.
        (
            "DEVICEGATE_JWT_SECRET",
            JWT_SECRET_WITH_A_COMMA,
            "jwt_secrets",
            (JWT_SECRET_WITH_A_COMMA,),
        ),
        ("DEVICEGATE_JWT_SECRET", JWT_SECRET_WITH_SPACES, "jwt_secrets", (JWT_SECRET_WITH_SPACES,)),
        # An empty or blank variable is unset: the default, and no file named "" is read.
        ("DEVICEGATE_REQUIRE_DEVICE_BINDING", "", "require_device_binding", False),
        ("DEVICEGATE_ISSUER", "", "issuer", None),
        ("DEVICEGATE_AUDIENCE", "  ", "audience", None),
        ("DEVICEGATE_JWT_SECRET", "  ", "jwt_secrets", ()),
        ("DEVICEGATE_SECRETS_FILE", "", "issuer", None),
        ("DEVICEGATE_SECRETS_FILE", " ", "issuer", None),
    ],
)
def test_from_env_parses(
    keys: Keys, variable: str, raw: str, attribute: str, expected: object
) -> None:
    config = GateConfig.from_env({"DEVICEGATE_API_KEYS": keys.api_key, variable: raw})
    assert getattr(config, attribute) == expected


@pytest.mark.parametrize(
    ("parse", "raw", "expected"),
    [
        # The kinds the gateway's own variables need too.
        (env_str, " /etc/devicegate/secrets.json ", "/etc/devicegate/secrets.json"),
        (env_list, "/a, /b/*,,", ("/a", "/b/*")),
        (env_seconds, "30", 30.0),
        (env_seconds, " 2.5 ", 2.5),
        (env_int, "+7", 7),
        (env_secret, " kept whole ", " kept whole "),
        # Unset and blank are the same: None, whatever the kind.
        (env_int, None, None),
        (env_int, "", None),
        (env_bool, " \t", None),
        (env_seconds, "  ", None),
    ],
)
def test_read_env(parse: Callable[[str, str], object], raw: str | None, expected: object) -> None:
    environ = {} if raw is None else {"DEVICEGATE_X": raw}
    assert read_env(environ, "DEVICEGATE_X", parse) == expected


@pytest.mark.parametrize(
    ("parse", "raw", "says"),
    [
        (env_int, "1.5", "must be an integer"),
        (env_bool, "maybe", "must be one of true/false, 1/0, yes/no, on/off"),
        (env_seconds, "soon", "must be a number of seconds, such as 30 or 2.5"),
        (env_seconds, "0", "must be a number of seconds above zero"),
        (env_seconds, "-1", "must be a number of seconds above zero"),
        (env_seconds, "inf", "must be a number of seconds above zero"),
        (env_seconds, "nan", "must be a number of seconds above zero"),
    ],
)
def test_read_env_names_the_variable(
    parse: Callable[[str, str], object], raw: str, says: str
) -> None:
    with pytest.raises(ConfigError) as excinfo:
        read_env({"DEVICEGATE_X": raw}, "DEVICEGATE_X", parse)
    assert str(excinfo.value) == f"DEVICEGATE_X: {says}"
    assert excinfo.value.field == "DEVICEGATE_X"


def test_credential_variables_are_those_of_the_keys_and_secret() -> None:
    assert CREDENTIAL_VARIABLES == (
        "DEVICEGATE_API_KEYS",
        "DEVICEGATE_MOBILE_API_KEYS",
        "DEVICEGATE_JWT_SECRET",
        "DEVICEGATE_JWT_PRIVATE_KEY",
        "DEVICEGATE_JWT_PUBLIC_KEYS",
    )


@pytest.mark.parametrize(
    ("variable", "raw"),
    [
        # Text that does not parse.
        ("DEVICEGATE_JWT_EXPIRE_SECONDS", "five"),
        ("DEVICEGATE_JWT_EXPIRE_SECONDS", "1.5"),
        ("DEVICEGATE_LEEWAY_SECONDS", "1m"),
        ("DEVICEGATE_TOKEN_CACHE_SIZE", "lots"),
        ("DEVICEGATE_REQUIRE_DEVICE_BINDING", "maybe"),
        ("DEVICEGATE_REQUIRE_DEVICE_BINDING", "2"),
        # Values that parse but that the constructor refuses.
        ("DEVICEGATE_JWT_EXPIRE_SECONDS", "0"),
        ("DEVICEGATE_LEEWAY_SECONDS", "120"),
        ("DEVICEGATE_DEVICE_HEADER", "x instance"),
        ("DEVICEGATE_API_KEY_HEADER", "x api key"),
        ("DEVICEGATE_DEVICE_HEADER", "X-API-Key"),
    ],
)
def test_from_env_bad_values_name_the_variable(keys: Keys, variable: str, raw: str) -> None:
    # The operator set a variable, not a field: the error names what they can find and fix.
    environ = {
        "DEVICEGATE_API_KEYS": keys.api_key,
        "DEVICEGATE_JWT_SECRET": keys.jwt_secret,
        variable: raw,
    }
    with pytest.raises(ConfigError) as excinfo:
        GateConfig.from_env(environ)
    assert_error(excinfo.value, variable, keys.api_key, keys.jwt_secret)
    # One error, not the field's chained under the variable's.
    assert excinfo.value.__context__ is None or excinfo.value.__suppress_context__


def test_from_env_weak_secret_not_echoed(keys: Keys) -> None:
    weak = secret_of(24)
    with pytest.raises(ConfigError) as excinfo:
        GateConfig.from_env({"DEVICEGATE_JWT_SECRET": weak})
    assert_error(excinfo.value, "DEVICEGATE_JWT_SECRET", weak)


def test_from_env_names_the_field_when_the_value_came_from_the_file(
    tmp_path: Path, keys: Keys
) -> None:
    path = write_json(tmp_path / "secrets.json", {"api_key": keys.api_key, "jwt_secret": "short"})
    environ = {"DEVICEGATE_SECRETS_FILE": str(path), "DEVICEGATE_LEEWAY_SECONDS": "5"}
    with pytest.raises(ConfigError) as excinfo:
        GateConfig.from_env(environ)
    assert_error(excinfo.value, "jwt_secret", keys.api_key)


def test_from_env_names_the_variable_that_repeats_a_key_of_the_file(
    tmp_path: Path, keys: Keys
) -> None:
    path = write_json(tmp_path / "secrets.json", {"api_key": keys.api_key})
    environ = {"DEVICEGATE_SECRETS_FILE": str(path), "DEVICEGATE_JWT_SECRET": keys.api_key + " "}
    with pytest.raises(ConfigError) as excinfo:
        GateConfig.from_env(environ)
    assert_error(excinfo.value, "DEVICEGATE_JWT_SECRET", keys.api_key)
    assert "both as api_keys and as jwt_secret" in str(excinfo.value)


def test_from_env_nothing_configured() -> None:
    environ: Mapping[str, str] = {}
    with pytest.raises(ConfigError) as excinfo:
        GateConfig.from_env(environ)
    assert_error(excinfo.value, "api_keys")


@pytest.mark.parametrize(
    ("build", "field"),
    [
        pytest.param(lambda k: {"jwt_secret": k.api_key + " "}, "jwt_secret", id="trailing-space"),
        pytest.param(lambda k: {"jwt_secret": " " + k.api_key}, "jwt_secret", id="leading-space"),
        pytest.param(lambda k: {"jwt_secret": k.api_key + "\r"}, "jwt_secret", id="crlf-env-file"),
        pytest.param(
            lambda k: {"mobile_api_keys": k.api_key.swapcase()}, "mobile_api_keys", id="case"
        ),
        pytest.param(
            lambda k: {"api_keys": [k.api_key, k.api_key.upper()]}, "api_keys", id="twice-by-case"
        ),
    ],
)
def test_keys_that_differ_only_in_case_or_spaces_are_the_same_key(
    keys: Keys, build: Callable[[Keys], dict[str, Any]], field: str
) -> None:
    # The separation rule exists so that one leaked key opens no other door: a JWT secret that
    # is the API key plus a space is that door.
    options = {"api_keys": keys.api_key, **build(keys)}
    with pytest.raises(ConfigError) as excinfo:
        GateConfig(**options)
    assert_error(excinfo.value, field, keys.api_key)
    assert "ignoring case and surrounding spaces" in str(excinfo.value)


def test_a_token_lifetime_of_a_day_is_the_longest(keys: Keys) -> None:
    assert keys.config(jwt_expire_seconds=86_400).jwt_expire_seconds == 86_400
    with pytest.raises(ConfigError, match=r"^jwt_expire_seconds: must be between 1 and 86400"):
        keys.config(jwt_expire_seconds=86_401)
    # Too long to print (str() refuses over 4,300 digits): still one clear error.
    with pytest.raises(ConfigError, match=r"got a number of over 18 digits$"):
        keys.config(jwt_expire_seconds=10**5000)


def test_random_keys_never_read_like_placeholders() -> None:
    # Seeded, so that the run is the same every time: 20,000 keys over the alphabets of
    # `devicegate init` (base64), secrets.token_urlsafe and openssl rand -hex, at the shortest
    # lengths allowed and at 43 characters. (This shows the rule does not misfire on common
    # keys; the odds of a word in a random key, about two in a billion, are worked out where
    # the words are listed.)
    chooser = random.Random(20261128)
    alphabets = [
        string.ascii_letters + string.digits + "+/",
        string.ascii_letters + string.digits + "-_",
        string.hexdigits.lower()[:16],
    ]
    for index in range(20_000):
        alphabet = alphabets[index % 3]
        key = "".join(chooser.choices(alphabet, k=16 if index % 4 < 2 else 43))
        assert GateConfig(api_keys=key).api_keys == (key,)


def test_random_hexadecimal_keys_of_the_minimum_length_always_pass() -> None:
    # 16 hex characters have few distinct ones by chance; the bar must never refuse them.
    for _ in range(2000):
        assert GateConfig(api_keys=secrets.token_hex(8)).api_keys


def test_distinct_character_bar_grows_with_length_up_to_eight() -> None:
    assert GateConfig(api_keys="abcd" * 4).api_keys  # 16 characters, 4 distinct: the bar is 4
    with pytest.raises(ConfigError):
        GateConfig(api_keys="abcdefg" * 5)  # 35 characters, 7 distinct: the bar is 8
