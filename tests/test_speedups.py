"""The compiled fast path (devicegate._speedups) against the Python path it speeds up.

``Authenticator.admit(headers)`` must return either ``None`` ("decide in full") or exactly the
principal ``Authenticator.authenticate(headers)`` returns at that moment; it must never admit
what the Python path refuses. The rest of the suite runs every in-process test on both paths
(conftest); this module checks the fast path itself: that it agrees on random requests, that it
really admits the common requests (so the speed is real), that it hands every unusual shape to
the full path, and that it leaks no references.
"""

from __future__ import annotations

import contextlib
import gc
import os
import subprocess
import sys
import weakref
from collections import OrderedDict
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devicegate import AuthError, CredentialKind, GateConfig, Principal, TokenVerifier, _auth
from devicegate._auth import Authenticator
from devicegate._credentials import MAX_CREDENTIAL_BYTES
from tests.helpers import NOW, Clock, claims_at, make_token, near_misses

API_KEYS = ("server-key-one-0123456789abcdef", "server-key-two-0123456789abcdef")
MOBILE_KEYS = ("mobile-key-0123456789abcdefghij",)
SECRET = "a-jwt-secret-of-32-bytes-or-more-0123"
DEVICE = "device-7f3a"
OTHER_DEVICE = "device-0c21"
CONFIG = GateConfig(api_keys=list(API_KEYS), mobile_api_keys=list(MOBILE_KEYS), jwt_secret=SECRET)

# Tokens the cache is filled with, by what they are: their validity runs from NOW - 60
# (nbf and iat) to NOW + 300 (exp), widened by the configured leeway.


def _cached_claims(**changes: Any) -> dict[str, Any]:
    return claims_at(now=NOW - 60, lifetime=360, nbf=NOW - 60, **changes)


TOKENS = {
    "bound": make_token(SECRET, _cached_claims(instance_id=DEVICE)),
    "unbound": make_token(SECRET, _cached_claims()),
    "other-device": make_token(SECRET, _cached_claims(instance_id=OTHER_DEVICE)),
}
# Never verified: the fast path must leave these to the full path.
UNCACHED = {
    "fresh": make_token(SECRET, claims_at(instance_id=DEVICE)),
    "forged": make_token("another-secret-0123456789abcdef", claims_at(instance_id=DEVICE)),
}
LEEWAY = CONFIG.leeway_seconds
# Instants around the edges of the cached tokens' validity.
INSTANTS = [
    NOW - 60 - LEEWAY - 1,
    NOW - 60 - LEEWAY,
    NOW,
    NOW + 300 + LEEWAY - 1,
    NOW + 300 + LEEWAY,
    NOW + 10**6,
]

pytestmark = pytest.mark.skipif(
    _auth.EXTENSIONS_DISABLED, reason="DEVICEGATE_NO_EXTENSIONS turns the compiled fast path off"
)


def compiled_authenticator(
    config: GateConfig = CONFIG, clock: Clock | None = None
) -> Authenticator:
    """An authenticator with the compiled fast path and its cache filled with TOKENS."""
    assert _auth.FastPath is not None, "devicegate._speedups is not built"
    authenticator = Authenticator(config)
    authenticator.verifier = TokenVerifier(config, clock=clock or Clock())
    for token in TOKENS.values():
        # other-device is verified and cached, then refused for DEVICE.
        with contextlib.suppress(AuthError):
            authenticator.verifier.verify(token, DEVICE)
    assert authenticator.verifier.cache_size == len(TOKENS)
    return authenticator


def full_outcome(authenticator: Authenticator, headers: Any) -> Principal | str:
    try:
        return authenticator.authenticate(headers)
    except AuthError as error:
        return type(error).__name__


def agree(authenticator: Authenticator, headers: Any) -> Principal | None:
    """Run both paths; the fast one must be None or the very principal of the full one."""
    admitted = authenticator.admit(headers)
    expected = full_outcome(authenticator, headers)
    if admitted is not None:
        assert isinstance(expected, Principal), (headers, expected)
        assert admitted is expected
    return admitted


def bearer(token: str, device: str | None = DEVICE) -> list[tuple[bytes, bytes]]:
    headers = [(b"authorization", b"Bearer " + token.encode())]
    if device is not None:
        headers.append((b"x-instance-id", device.encode()))
    return headers


# --- the common requests are admitted by the fast path itself ---------------------------------


@pytest.mark.parametrize("key", API_KEYS)
def test_a_server_key_is_admitted_by_the_fast_path(key: str) -> None:
    authenticator = compiled_authenticator()
    principal = agree(authenticator, [(b"host", b"h"), (b"x-api-key", key.encode())])
    assert principal is not None
    assert principal.kind == "api_key"


def test_a_mobile_key_is_admitted_by_the_fast_path() -> None:
    authenticator = compiled_authenticator()
    principal = agree(authenticator, [(b"authorization", MOBILE_KEYS[0].encode())])
    assert principal is not None
    assert principal.kind == "mobile_api_key"


@pytest.mark.parametrize(("name", "device"), [("bound", DEVICE), ("unbound", None)])
def test_a_cached_token_is_admitted_by_the_fast_path(name: str, device: str | None) -> None:
    authenticator = compiled_authenticator()
    principal = agree(authenticator, bearer(TOKENS[name], device))
    assert principal is not None
    assert principal.kind == "device_token"
    assert principal.instance_id == device


def test_a_hit_keeps_the_token_most_recently_used() -> None:
    authenticator = compiled_authenticator()
    cache = authenticator.verifier._cache
    assert next(iter(cache)) == TOKENS["bound"].encode()
    assert authenticator.admit(bearer(TOKENS["bound"])) is not None
    assert next(reversed(cache)) == TOKENS["bound"].encode()


# --- everything else is left to the full path --------------------------------------------------

LEFT_TO_THE_FULL_PATH: dict[str, Any] = {
    "no credential": [(b"host", b"h")],
    "unknown server key": [(b"x-api-key", b"nope")],
    "empty server key": [(b"x-api-key", b"")],
    "server key and Authorization": [
        (b"x-api-key", API_KEYS[0].encode()),
        (b"authorization", MOBILE_KEYS[0].encode()),
    ],
    "two server keys": [(b"x-api-key", API_KEYS[0].encode())] * 2,
    "two Authorization fields": [(b"authorization", MOBILE_KEYS[0].encode())] * 2,
    "two device fields": [*bearer(TOKENS["bound"]), (b"x-instance-id", DEVICE.encode())],
    "unknown mobile key": [(b"authorization", b"nope")],
    "bare Bearer": [(b"authorization", b"Bearer")],
    "bare bearer, another case": [(b"authorization", b"bEaReR")],
    "Bearer and a space": [(b"authorization", b"Bearer ")],
    "lower-case scheme": [(b"authorization", b"bearer " + TOKENS["unbound"].encode())],
    "two spaces": [(b"authorization", b"Bearer  " + TOKENS["unbound"].encode())],
    "a tab": [(b"authorization", b"Bearer\t" + TOKENS["unbound"].encode())],
    "a trailing space": [(b"authorization", b"Bearer " + TOKENS["unbound"].encode() + b" ")],
    "an oversized value": [(b"authorization", b"a" * (MAX_CREDENTIAL_BYTES + 1))],
    "an oversized key": [(b"x-api-key", b"a" * (MAX_CREDENTIAL_BYTES + 1))],
    "a token never verified": bearer(UNCACHED["fresh"]),
    "a forged token": bearer(UNCACHED["forged"]),
    "a bound token without its device": bearer(TOKENS["bound"], None),
    "a bound token for another device": bearer(TOKENS["bound"], OTHER_DEVICE),
    "a device id with a suffix": bearer(TOKENS["bound"], DEVICE + "x"),
    "an empty device id": bearer(TOKENS["bound"], ""),
    "a tuple of headers": tuple(bearer(TOKENS["bound"])),
    "lists for pairs": [list(pair) for pair in bearer(TOKENS["bound"])],
    "a bytearray name": [(bytearray(b"authorization"), MOBILE_KEYS[0].encode())],
    "a bytearray value": [(b"authorization", bytearray(MOBILE_KEYS[0].encode()))],
    "a str name": [("authorization", MOBILE_KEYS[0].encode())],
    "a triple": [(b"authorization", MOBILE_KEYS[0].encode(), b"")],
    "a bytes subclass value": [(b"x-api-key", type("B", (bytes,), {})(API_KEYS[0].encode()))],
    "a generator": (pair for pair in bearer(TOKENS["bound"])),
    "not headers at all": None,
}


@pytest.mark.parametrize("headers", LEFT_TO_THE_FULL_PATH.values(), ids=LEFT_TO_THE_FULL_PATH)
def test_anything_else_is_left_to_the_full_path(headers: Any) -> None:
    authenticator = compiled_authenticator()
    assert authenticator.admit(headers) is None


@pytest.mark.parametrize("word", [b"Bearer", b"bearer", b"bEaReR", b"BEARER"])
def test_a_bare_scheme_is_never_compared_with_the_mobile_keys(word: bytes) -> None:
    from devicegate import _speedups

    authenticator = compiled_authenticator()
    before = _speedups._comparisons()
    assert authenticator.admit([(b"authorization", word)]) is None
    assert _speedups._comparisons() == before


@pytest.mark.parametrize("name", list(near_misses(API_KEYS[0])))
def test_a_near_miss_of_a_key_is_left_to_the_full_path(name: str) -> None:
    authenticator = compiled_authenticator()
    server = near_misses(API_KEYS[0])[name].encode()
    mobile = near_misses(MOBILE_KEYS[0])[name].encode()
    assert agree(authenticator, [(b"x-api-key", server)]) is None
    assert agree(authenticator, [(b"authorization", mobile)]) is None


@pytest.mark.parametrize("instant", INSTANTS)
def test_a_cached_token_is_admitted_exactly_while_the_full_path_admits_it(instant: int) -> None:
    clock = Clock()
    authenticator = compiled_authenticator(clock=clock)
    clock.now = instant
    inside = NOW - 60 - LEEWAY <= instant < NOW + 300 + LEEWAY
    admitted = agree(authenticator, bearer(TOKENS["bound"]))
    assert (admitted is not None) is inside


def test_a_key_kind_that_is_not_configured_is_left_to_the_full_path() -> None:
    config = GateConfig(jwt_secret=SECRET)
    authenticator = Authenticator(config)
    assert authenticator.admit([(b"x-api-key", API_KEYS[0].encode())]) is None
    assert authenticator.admit([(b"authorization", MOBILE_KEYS[0].encode())]) is None


def test_custom_header_names_are_read() -> None:
    config = CONFIG.replace(api_key_header="x-server-key", device_header="x-device")
    authenticator = compiled_authenticator(config)
    assert agree(authenticator, [(b"x-server-key", API_KEYS[1].encode())]) is not None
    assert authenticator.admit([(b"x-api-key", API_KEYS[1].encode())]) is None
    assert agree(authenticator, [*bearer(TOKENS["bound"], None), (b"x-device", DEVICE.encode())])
    assert authenticator.admit(bearer(TOKENS["bound"])) is None


# --- the verifier and its cache are read on every call -----------------------------------------


def test_a_replaced_verifier_is_the_one_consulted() -> None:
    authenticator = compiled_authenticator()
    assert authenticator.admit(bearer(TOKENS["bound"])) is not None
    authenticator.verifier = TokenVerifier(CONFIG, clock=Clock())
    assert authenticator.admit(bearer(TOKENS["bound"])) is None


def test_a_cleared_cache_admits_nothing_more() -> None:
    authenticator = compiled_authenticator()
    authenticator.verifier.clear_cache()
    assert authenticator.admit(bearer(TOKENS["bound"])) is None


def test_a_cache_of_another_type_is_left_to_the_full_path() -> None:
    class Cache(OrderedDict[bytes, Any]):
        pass

    authenticator = compiled_authenticator()
    verifier = authenticator.verifier
    verifier._cache = Cache(verifier._cache)
    assert authenticator.admit(bearer(TOKENS["bound"])) is None
    assert isinstance(full_outcome(authenticator, bearer(TOKENS["bound"])), Principal)


def test_a_clock_that_raises_leaves_the_decision_to_the_full_path() -> None:
    def broken() -> float:
        raise RuntimeError("no clock")

    authenticator = compiled_authenticator()
    authenticator.verifier._clock = broken
    assert authenticator.admit(bearer(TOKENS["bound"])) is None
    with pytest.raises(RuntimeError, match="no clock"):
        authenticator.authenticate(bearer(TOKENS["bound"]))


def test_an_entry_evicted_while_the_clock_is_read_is_left_to_the_full_path() -> None:
    # The clock runs Python code, as another thread might between two steps: the entry and
    # the headers it came with must stay alive, and the move that follows finds nothing.
    authenticator = compiled_authenticator()
    verifier = authenticator.verifier
    headers = bearer(TOKENS["bound"])

    def clearing_clock() -> float:
        verifier._cache.clear()
        headers.clear()
        gc.collect()
        return float(NOW)

    verifier._clock = clearing_clock
    assert authenticator.admit(headers) is None


def test_the_device_header_stays_alive_while_the_clock_runs() -> None:
    # The clock drops the headers list and fills the freed memory with other bytes: the device
    # id the fast path read must still be the one the client sent, as for the full path.
    authenticator = compiled_authenticator()
    verifier = authenticator.verifier
    headers = bearer(TOKENS["bound"])
    filler: list[bytes] = []

    def clearing_clock() -> float:
        headers.clear()
        gc.collect()
        filler.extend(bytes(len(DEVICE)) for _ in range(10_000))
        return float(NOW)

    verifier._clock = clearing_clock
    principal = authenticator.admit(headers)
    assert principal is not None
    assert principal.instance_id == DEVICE


def test_an_interrupt_in_the_clock_is_not_swallowed() -> None:
    def interrupted() -> float:
        raise KeyboardInterrupt

    authenticator = compiled_authenticator()
    authenticator.verifier._clock = interrupted
    with pytest.raises(KeyboardInterrupt):
        authenticator.admit(bearer(TOKENS["bound"]))


def test_a_fast_path_never_initialised_admits_nothing() -> None:
    assert _auth.FastPath is not None
    fast = _auth.FastPath.__new__(_auth.FastPath)
    assert fast.verifier is None
    assert fast.admit([(b"x-api-key", API_KEYS[0].encode())]) is None
    assert fast.admit(bearer(TOKENS["bound"])) is None


def test_the_verifier_can_be_unset_but_not_deleted() -> None:
    authenticator = compiled_authenticator()
    fast = authenticator.admit.__self__  # type: ignore[attr-defined]
    assert fast.verifier is authenticator.verifier
    fast.verifier = None
    assert authenticator.admit(bearer(TOKENS["bound"])) is None
    with pytest.raises(AttributeError):
        del fast.verifier


# --- subclasses are always asked ------------------------------------------------------------


class _Revoking(TokenVerifier):
    """A verifier with a deny-list: its check() refuses what TokenVerifier.check admits."""

    def check(self, token: bytes, device_id: bytes | None) -> Principal:
        principal = super().check(token, device_id)
        if principal.instance_id == DEVICE:
            raise AuthError("revoked")
        return principal


def test_a_verifier_whose_check_is_overridden_decides_every_token() -> None:
    authenticator = compiled_authenticator()
    revoking = _Revoking(CONFIG, clock=Clock())
    revoking.verify(TOKENS["unbound"])
    revoking._cache.update(authenticator.verifier._cache)  # the bound token cached too
    authenticator.verifier = revoking
    assert authenticator.admit(bearer(TOKENS["bound"])) is None
    assert full_outcome(authenticator, bearer(TOKENS["bound"])) == "AuthError"
    assert authenticator.admit(bearer(TOKENS["unbound"], None)) is None
    # Keys do not go through the verifier: they are still admitted on the fast path.
    assert authenticator.admit([(b"x-api-key", API_KEYS[0].encode())]) is not None
    # Back to a plain verifier, the fast path admits cached tokens again.
    authenticator.verifier = TokenVerifier(CONFIG, clock=Clock())
    authenticator.verifier.verify(TOKENS["unbound"])
    assert authenticator.admit(bearer(TOKENS["unbound"], None)) is not None


def _deny(token: bytes, device_id: bytes | None) -> Principal:
    raise AuthError("revoked")


def test_a_check_patched_on_the_verifier_decides_every_token() -> None:
    authenticator = compiled_authenticator()
    verifier = authenticator.verifier
    verifier.check = _deny  # type: ignore[method-assign]
    assert authenticator.admit(bearer(TOKENS["bound"])) is None
    assert full_outcome(authenticator, bearer(TOKENS["bound"])) == "AuthError"
    del verifier.check
    assert authenticator.admit(bearer(TOKENS["bound"])) is not None


def test_a_check_patched_on_the_class_later_decides_every_token(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    authenticator = compiled_authenticator()
    monkeypatch.setattr(TokenVerifier, "check", lambda self, token, device_id: _deny(token, None))
    assert authenticator.admit(bearer(TOKENS["bound"])) is None
    assert full_outcome(authenticator, bearer(TOKENS["bound"])) == "AuthError"


def test_any_verifier_can_be_put_in() -> None:
    class DuckVerifier:
        def __getattr__(self, name: str) -> Any:
            if name == "check":
                return _deny
            raise AttributeError(name)

    authenticator = compiled_authenticator()
    authenticator.verifier = DuckVerifier()  # type: ignore[assignment]
    assert authenticator.admit(bearer(TOKENS["bound"])) is None
    assert full_outcome(authenticator, bearer(TOKENS["bound"])) == "AuthError"


def test_a_verifier_that_only_counts_its_verifications_keeps_the_fast_path() -> None:
    class Counting(TokenVerifier):
        def _verify_uncached(self, token: bytes) -> Any:
            return super()._verify_uncached(token)

    authenticator = compiled_authenticator()
    authenticator.verifier = Counting(CONFIG, clock=Clock())
    authenticator.verifier.verify(TOKENS["bound"], DEVICE)
    assert authenticator.admit(bearer(TOKENS["bound"])) is not None


class _Strict(Authenticator):
    __slots__ = ()

    def authenticate(self, headers: Any) -> Principal:
        raise AuthError("nobody")


class _NoKeys(Authenticator):
    """Changes what authenticate() sees without overriding it."""

    __slots__ = ()

    def __init__(self, config: GateConfig) -> None:
        super().__init__(config)
        self._api_keys = ()


@pytest.mark.parametrize("subclass", [_Strict, _NoKeys])
def test_a_subclass_of_authenticator_decides_everything(subclass: type[Authenticator]) -> None:
    authenticator = subclass(CONFIG)
    assert authenticator.admit == authenticator.authenticate
    with pytest.raises(AuthError):
        authenticator.admit([(b"x-api-key", API_KEYS[0].encode())])


def test_an_authenticator_is_freed_without_the_cycle_collector() -> None:
    authenticator = compiled_authenticator()
    verifier = weakref.ref(authenticator.verifier)
    gc.disable()
    try:
        del authenticator
        assert verifier() is None
    finally:
        gc.enable()


# --- agreement on random requests ----------------------------------------------------------------

_VALUES = st.sampled_from(
    [
        *(key.encode() for key in API_KEYS + MOBILE_KEYS),
        *(b"Bearer " + token.encode() for token in (*TOKENS.values(), *UNCACHED.values())),
        b"bearer " + TOKENS["unbound"].encode(),
        b"Bearer  " + TOKENS["unbound"].encode(),
        b"Basic dXNlcjpwYXNz",
        b"Bearer",
        b"BEARER",
        b"Bearer ",
        b"",
        DEVICE.encode(),
        OTHER_DEVICE.encode(),
        API_KEYS[0].encode()[:-1],
        MOBILE_KEYS[0].encode() + b"\t",
    ]
)
_NAMES = st.sampled_from(
    [b"authorization", b"x-api-key", b"x-instance-id", b"Authorization", b"host", b"x-other"]
)
_HEADER_LISTS = st.lists(st.tuples(_NAMES, st.one_of(_VALUES, st.binary(max_size=16))), max_size=5)


@settings(max_examples=400, deadline=None)
@given(headers=_HEADER_LISTS, instant=st.sampled_from(INSTANTS))
def test_the_fast_path_never_admits_what_the_full_path_refuses(
    headers: list[tuple[bytes, bytes]], instant: int
) -> None:
    clock = Clock()
    authenticator = compiled_authenticator(clock=clock)
    clock.now = instant
    agree(authenticator, headers)


# --- no leaks, no secrets, and the switch -------------------------------------------------------


def test_admitting_and_declining_leak_no_references() -> None:
    authenticator = compiled_authenticator()
    requests = [
        [(b"x-api-key", API_KEYS[0].encode())],
        [(b"authorization", MOBILE_KEYS[0].encode())],
        bearer(TOKENS["bound"]),
        bearer(TOKENS["bound"], OTHER_DEVICE),
        bearer(UNCACHED["fresh"]),
        [(b"x-api-key", b"nope")],
    ]
    verifier = authenticator.verifier
    entry = verifier._cache[TOKENS["bound"].encode()]
    clock = verifier._clock
    assert isinstance(clock, Clock)
    clock.now = float(NOW)  # one object, returned by every call
    watched = [
        authenticator,
        authenticator.admit.__self__,  # type: ignore[attr-defined]
        verifier,
        verifier._cache,
        clock,
        clock.now,
        entry,
        entry.principal,
        *(value for request in requests for _, value in request),
    ]
    for request in requests:  # warm up: first calls may intern or cache
        authenticator.admit(request)
    gc.collect()
    before = [sys.getrefcount(item) for item in watched]
    for _ in range(1000):
        for request in requests:
            authenticator.admit(request)
    gc.collect()
    assert [sys.getrefcount(item) for item in watched] == before


def test_the_fast_path_shows_no_key_in_its_repr() -> None:
    fast = compiled_authenticator().admit.__self__  # type: ignore[attr-defined]
    assert repr(fast) == "<devicegate._speedups.FastPath>"
    for key in API_KEYS + MOBILE_KEYS:
        assert key not in repr(fast)


def test_the_fast_path_refuses_arguments_of_the_wrong_types() -> None:
    assert _auth.FastPath is not None
    principal = Principal(CredentialKind.API_KEY)
    check = TokenVerifier.check
    good: list[Any] = [check, b"x-api-key", b"x-instance-id", (b"key",), (), principal, principal]
    assert _auth.FastPath(*good).admit([(b"x-api-key", b"key")]) is principal
    for position, wrong in [
        (0, print),
        (1, "x-api-key"),
        (2, bytearray(b"x")),
        (3, [b"key"]),
        (4, ("key",)),
    ]:
        arguments = list(good)
        arguments[position] = wrong
        with pytest.raises(TypeError, match="must be"):
            _auth.FastPath(*arguments)


def test_the_compiled_limit_is_the_python_limit() -> None:
    from devicegate import _speedups

    assert _speedups.MAX_CREDENTIAL_BYTES == MAX_CREDENTIAL_BYTES


def test_an_authenticator_without_the_fast_path_decides_everything_in_full(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_auth, "FastPath", None)
    authenticator = Authenticator(CONFIG)
    assert authenticator.admit == authenticator.authenticate
    with pytest.raises(AuthError):
        authenticator.admit([(b"x-api-key", b"nope")])


@pytest.mark.parametrize("switched_off", [False, True])
def test_devicegate_no_extensions_switches_the_fast_path_off(switched_off: bool) -> None:
    env = {k: v for k, v in os.environ.items() if k != "DEVICEGATE_NO_EXTENSIONS"}
    if switched_off:
        env["DEVICEGATE_NO_EXTENSIONS"] = "1"
    code = "from devicegate._auth import compiled_fast_path; print(compiled_fast_path())"
    result = subprocess.run(  # noqa: S603 - this Python, a fixed program
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == str(not switched_off)
