"""DPoP (RFC 9449): device tokens bound to a key the device holds, proven on every request.

A token minted with ``dpop_jkt`` carries ``cnf: {"jkt": <thumbprint>}`` (RFC 9449 §6.1): the
RFC 7638 SHA-256 thumbprint of the device's public key. It is accepted only as
``Authorization: DPoP <token>`` with one ``DPoP`` header holding a proof: a JWS the device
signs for this request alone, with that key. :class:`ProofChecker` checks a proof as RFC 9449
§4.3 lists it: ``typ`` ``dpop+jwt``; an asymmetric ``alg`` of the allow-list, which must be the
key's own; a public ``jwk`` (Ed25519 or P-256); the signature; ``htm`` the request's method;
``htu`` the request's URL (scheme and host from the configured ``public_url``, never from the
request); ``iat`` within the allowed age; a ``jti`` not seen before within it; ``ath`` the hash
of the token; and, when the server asks for them, a ``nonce`` it gave out (:class:`Nonces`).
The middleware then compares the proof key's thumbprint with the token's.

References:
    https://www.rfc-editor.org/rfc/rfc9449
    https://www.rfc-editor.org/rfc/rfc7638
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

import anyio
import anyio.to_thread

from . import _base64url as base64url
from ._bounded import drop_expired, remember
from ._claims import is_numeric_date
from ._errors import AuthError, ConfigError, unavailable
from ._json import loads_strict_json
from ._keys import EDDSA, ES256, Key, jwk_key

logger = logging.getLogger("devicegate")

__all__ = [
    "DPOP_ALGORITHMS",
    "InvalidDpopProof",
    "Nonces",
    "ProofChecker",
    "ReplayCache",
    "SharedReplayStore",
    "UseDpopNonce",
    "check_jkt",
    "check_public_url",
    "normalized_url",
]

DPOP_ALGORITHMS = (ES256, EDDSA)
"""The proof algorithms devicegate can check, in the order it advertises them."""
MAX_PROOF_BYTES = 4096
MAX_JTI_LENGTH = 128
# The proof headers (one per device key) and token hashes remembered, and the longest of each
# remembered.
MAX_REMEMBERED_HEADERS = 4096
MAX_REMEMBERED_HEADER_BYTES = 1024
MAX_REMEMBERED_TOKEN_BYTES = 2048
# The replay cache holds each proof's jti until it could no longer be accepted anyway; beyond
# this many live entries, new proofs are refused (503) rather than unchecked.
MAX_REMEMBERED_PROOFS = 100_000
# A server nonce names a period of this many seconds; the nonce of the period before is still
# accepted, so one lasts between 5 and 10 minutes.
NONCE_PERIOD_SECONDS = 300

_DEFAULT_PORTS = {"http": 80, "https": 443}
_NOT_A_JWS = "The DPoP proof is not a compact JWS."


class InvalidDpopProof(AuthError):
    """The DPoP proof is missing, malformed, for another request, replayed, or signed by a key
    the token is not bound to (RFC 9449 §7.1: ``error="invalid_dpop_proof"``)."""

    error = "invalid_dpop_proof"
    description = "The DPoP proof is invalid."
    scheme = "DPoP"


class UseDpopNonce(InvalidDpopProof):
    """The proof carries no nonce, or one this server no longer accepts; the answer's
    ``DPoP-Nonce`` header gives the one to sign the next proof with (RFC 9449 §8)."""

    error = "use_dpop_nonce"
    description = "Sign the DPoP proof with the nonce in the DPoP-Nonce header."


def check_jkt(value: object, field: str = "dpop_jkt") -> str:
    """``value`` if it is a SHA-256 JWK thumbprint: 43 characters of base64url (32 bytes).

    Raises:
        ValueError: naming ``field``.
    """
    if not isinstance(value, str) or len(value) != 43 or base64url.decode(value) is None:
        raise ValueError(f"{field} must be an RFC 7638 SHA-256 thumbprint: 43 base64url characters")
    return value


def check_public_url(value: object) -> str | None:
    """``value`` normalised (no trailing slash) if it is an ``http(s)://host[:port][/prefix]``
    URL without query, fragment or credentials, or ``None``.

    Raises:
        ConfigError: for anything else.
    """
    if value is None:
        return None
    try:
        if not isinstance(value, str):
            raise ValueError
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        raise ConfigError("public_url", "must be a URL such as https://api.example.com") from None
    if (
        parts.scheme not in _DEFAULT_PORTS
        or not parts.hostname
        or parts.query
        or parts.fragment
        or parts.username is not None
    ):
        raise ConfigError(
            "public_url",
            "must be the http(s) URL clients reach this server at, such as "
            "https://api.example.com, without query, fragment or credentials",
        )
    return normalized_url(value).rstrip("/")


def normalized_url(url: str) -> str:
    """``url`` as RFC 9449 §4.3 compares ``htu``: scheme and host in lower case, no default
    port, no query or fragment, ``/`` for an empty path (RFC 3986 §6.2.2 and §6.2.3).

    Raises:
        ValueError: not an absolute http(s) URL.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = parts.hostname
    if scheme not in _DEFAULT_PORTS or not host:
        raise ValueError("not an absolute http(s) URL")
    port = parts.port
    if ":" in host:
        host = f"[{host}]"
    authority = host if port is None or port == _DEFAULT_PORTS[scheme] else f"{host}:{port}"
    return f"{scheme}://{authority}{parts.path or '/'}"


class ReplayCache:
    """The ``jti`` of every proof accepted within its lifetime, in memory (one process).

    Args:
        clock: a monotonic clock in seconds; for tests.
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._until: dict[str, float] = {}
        self._clock = clock
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._until)

    def first_use(self, key: str, seconds: float) -> bool:
        """Remember ``key`` for ``seconds``; whether it was new.

        Raises:
            Refusal: 503, the cache is full of live entries (a flood of proofs).
        """
        with self._lock:
            now = self._clock()
            until = self._until.get(key)
            if until is not None and until > now:
                return False
            if len(self._until) >= MAX_REMEMBERED_PROOFS:
                drop_expired(self._until, now)
                if len(self._until) >= MAX_REMEMBERED_PROOFS:
                    raise unavailable("Too many DPoP proofs right now; retry shortly.", 1)
            self._until[key] = now + seconds
            return True


class Nonces:
    """Server nonces for DPoP proofs (RFC 9449 §8), with nothing stored: a nonce is the number
    of a :data:`NONCE_PERIOD_SECONDS` period and an HMAC of it, so every instance that derives
    the same key (:func:`nonce_key`) gives out and accepts the same nonces.

    A proof must carry the current period's nonce or the one before. With the one before it
    is admitted, and the answer offers the current one, so that a client that reads
    ``DPoP-Nonce`` from every answer is never refused for a nonce that merely aged.

    Nonces are not secrets (anyone who asks is given one): only the key that makes them is.

    Args:
        key: the HMAC key.
        clock: the current Unix time; for tests.
    """

    def __init__(self, key: bytes, *, clock: Callable[[], float] = time.time) -> None:
        self._key = key
        self._clock = clock
        # (period, its nonce, the nonce of the period before), replaced whole when the period
        # turns, so that a thread reading it never sees half of each.
        self._state = (-1, "", "")

    def __repr__(self) -> str:
        return "<Nonces>"  # never the key

    def _make(self, period: int) -> str:
        number = period.to_bytes(8, "big")
        mac = hmac.new(self._key, b"devicegate DPoP nonce:" + number, hashlib.sha256).digest()
        return base64url.encode_text(number + mac[:16])

    def current(self) -> str:
        """The nonce to sign proofs with now."""
        period = int(self._clock() // NONCE_PERIOD_SECONDS)
        state = self._state
        if state[0] != period:
            state = self._state = (period, self._make(period), self._make(period - 1))
        return state[1]

    def check(self, nonce: object) -> str | None:
        """``None`` for the current nonce; the current one for the nonce of the period before
        (to be offered in the answer).

        Raises:
            UseDpopNonce: no nonce, or one not accepted (any more); it carries the current one.
        """
        current = self.current()
        if nonce == current:
            return None
        if nonce == self._state[2]:
            return current
        raise UseDpopNonce(headers=[(b"dpop-nonce", current.encode("ascii"))])


def nonce_key(secrets: Iterable[str]) -> bytes:
    """The key of a server's :class:`Nonces`, derived from its own secrets (server API keys,
    token secrets, the private key; never what ships in an app), so that instances sharing a
    configuration share nonces; without a secret, a random key of this process's own."""
    material = b"".join(
        len(raw).to_bytes(4, "big") + raw for raw in (secret.encode() for secret in secrets)
    )
    if not material:
        return os.urandom(32)
    return hmac.new(b"devicegate DPoP nonce key", material, hashlib.sha256).digest()


class ProofChecker:
    """Checks DPoP proofs for one server.

    Args:
        public_url: the URL clients reach this server at (``https://api.example.com``); the
            proof's ``htu`` must be it followed by the request's path.
        algorithms: the proof algorithms accepted (``ES256``, ``EdDSA``).
        max_age_seconds: how old a proof's ``iat`` may be.
        leeway_seconds: how far ahead of this clock a proof's ``iat`` may be.
        replay: where the ``jti`` of accepted proofs is remembered.
        nonces: the server nonces a proof must carry, or ``None`` for none.
        clock: the current Unix time; for tests.
    """

    def __init__(
        self,
        public_url: str,
        *,
        algorithms: tuple[str, ...] = DPOP_ALGORITHMS,
        max_age_seconds: int = 60,
        leeway_seconds: int = 0,
        replay: ReplayCache | None = None,
        nonces: Nonces | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._base = public_url.rstrip("/")
        self._decoded_base = unquote(self._base)
        self._nonces = nonces
        self._algorithms = frozenset(algorithms)
        self._max_age = max_age_seconds
        self._leeway = leeway_seconds
        self._lifetime = float(max_age_seconds + leeway_seconds)
        self._replay = ReplayCache() if replay is None else replay
        self._clock = clock
        # Proof headers that passed every header rule, with the key they hold.
        self._headers: dict[bytes, Key] = {}
        # The ath each recent token's proofs must carry: a device sends one token many times.
        self._aths: dict[bytes, str] = {}

    @property
    def proof_lifetime(self) -> float:
        """How long a proof's ``jti`` must be remembered: as long as it could be accepted."""
        return self._lifetime

    def check(
        self, proof: bytes, *, method: str, path: str, token: bytes
    ) -> tuple[str, str, str | None]:
        """The thumbprint of the key that signed ``proof``, a valid proof for this request; the
        proof's replay key (``<thumbprint>:<jti>``), seen for the first time here; and a newer
        server nonce to offer the client, or ``None``.

        Args:
            proof: the ``DPoP`` header's value.
            method: the request's method (``GET`` for a websocket handshake).
            path: the request's full path as clients see it (the root path included).
            token: the access token the proof must be for.

        Raises:
            InvalidDpopProof: the proof is not valid for this request and token
                (:class:`UseDpopNonce` when only its nonce is missing or too old).
            Refusal: 503, the replay cache is full.
        """
        if len(proof) > MAX_PROOF_BYTES:
            raise _invalid(_NOT_A_JWS)
        try:
            # Each segment's alphabet is checked where it is decoded (the header once per key).
            header_segment, payload_segment, signature = proof.split(b".")
        except ValueError:
            raise _invalid(_NOT_A_JWS) from None
        key = self._headers.get(header_segment)
        if key is None:
            key = self._check_header(header_segment)
        signing_input = proof[: len(header_segment) + 1 + len(payload_segment)]
        if not key.verify(signing_input, signature):
            raise _invalid("The DPoP proof's signature does not verify.")
        claims = _object(payload_segment)
        self._check_claims(claims, method, path, token)
        # Last of the claims: a client told to use a nonce has nothing else to fix.
        fresh = None if self._nonces is None else self._nonces.check(claims.get("nonce"))
        jkt = key.kid  # the RFC 7638 thumbprint: jwk_key names an unnamed key by it
        # One use per key and jti, for as long as the proof could be accepted at all.
        replay_key = f"{jkt}:{claims['jti']}"
        if not self._replay.first_use(replay_key, self._lifetime):
            raise replayed()
        return jkt, replay_key, fresh

    def _check_header(self, header_segment: bytes) -> Key:
        """The key of a proof header that passes every header rule, remembered: a device puts
        the same header (its key) on every proof, and building a key is the slow part."""
        header = _object(header_segment)
        if not isinstance(header.get("typ"), str) or header["typ"].lower() != "dpop+jwt":
            raise _invalid("The DPoP proof's typ must be dpop+jwt.")
        alg = header.get("alg")
        if alg not in self._algorithms:
            raise _invalid("The DPoP proof's algorithm is not accepted.")
        if "crit" in header or not isinstance(header.get("jwk"), dict):
            raise _invalid("The DPoP proof needs a public jwk and no crit.")
        try:
            key = jwk_key({name: value for name, value in header["jwk"].items() if name != "kid"})
        except ValueError:
            raise _invalid("The DPoP proof's jwk is not a public Ed25519 or P-256 key.") from None
        if key.algorithm != alg:
            raise _invalid("The DPoP proof's algorithm is not its key's.")
        if len(header_segment) <= MAX_REMEMBERED_HEADER_BYTES:
            remember(self._headers, header_segment, key, MAX_REMEMBERED_HEADERS)
        return key

    def _check_claims(
        self, claims: Mapping[str, Any], method: str, path: str, token: bytes
    ) -> None:
        jti = claims.get("jti")
        if not isinstance(jti, str) or not 1 <= len(jti) <= MAX_JTI_LENGTH:
            raise _invalid("The DPoP proof needs a jti.")
        if claims.get("htm") != method:
            raise _invalid("The DPoP proof is for another method.")
        htu = claims.get("htu")
        expected_url = self._base + path
        # The usual case, the URL as sent, without parsing; else compared once normalised,
        # percent-decoded as the request's path is (the app routes on the decoded path).
        same_url = htu == expected_url
        if not same_url and isinstance(htu, str):
            try:
                same_url = unquote(normalized_url(htu)) == self._decoded_base + path
            except ValueError:
                same_url = False
        if not same_url:
            raise _invalid("The DPoP proof is for another URL.")
        iat = claims.get("iat")
        now = self._clock()
        if not is_numeric_date(iat) or not now - self._max_age <= iat <= now + self._leeway:
            raise _invalid("The DPoP proof is too old, from the future, or has no iat.")
        expected = self._aths.get(token)
        if expected is None:
            expected = base64url.encode_text(hashlib.sha256(token).digest())
            if len(token) <= MAX_REMEMBERED_TOKEN_BYTES:
                remember(self._aths, token, expected, MAX_REMEMBERED_HEADERS)
        ath = claims.get("ath")
        if not isinstance(ath, str) or not hmac.compare_digest(ath, expected):
            raise _invalid("The DPoP proof is not for this access token (ath).")


def replayed() -> InvalidDpopProof:
    """The refusal of a proof used before."""
    return _invalid("The DPoP proof was used before.")


class SharedReplayStore:
    """The ``jti`` of accepted proofs in a Redis every instance shares, so that a proof used on
    one instance is refused on every other (``SET key NX EX``: one round trip, atomic).

    Asked after a proof passed every other check, from a few worker threads of its own (the
    client blocks), with bounded waits. A Redis that cannot answer refuses the request (503):
    a replay it might have caught is never admitted.

    Args:
        url: ``redis://``, ``rediss://`` or ``unix://`` (the ``redis`` extra).
        prefix: the key prefix.
        socket_timeout: seconds one Redis call may take.

    Raises:
        ConfigError: the URL is not one the client can use, or ``redis`` is missing.
    """

    def __init__(
        self, url: str, *, prefix: str = "devicegate:dpop:", socket_timeout: float = 1.0
    ) -> None:
        try:
            import redis
        except ImportError:
            raise ConfigError(
                "dpop_replay_url", "needs the redis package: pip install 'devicegate[redis]'"
            ) from None
        try:
            self._redis = redis.Redis.from_url(
                url, socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout
            )
        except ValueError:
            # The message may quote the URL, and with it a password.
            raise ConfigError("dpop_replay_url", "is not a Redis URL this client can use") from None
        self._prefix = prefix
        self._threads = anyio.CapacityLimiter(4)

    def __repr__(self) -> str:
        return f"<SharedReplayStore prefix={self._prefix!r}>"  # never the URL

    async def first_use(self, key: str, seconds: float) -> bool:
        """Remember ``key`` for ``seconds`` in Redis; whether no instance had it.

        Raises:
            Refusal: 503, Redis cannot answer.
        """
        name = self._prefix + hashlib.sha256(key.encode()).hexdigest()
        ttl = max(1, math.ceil(seconds))
        try:
            created = await anyio.to_thread.run_sync(
                lambda: self._redis.set(name, b"1", nx=True, ex=ttl), limiter=self._threads
            )
        except Exception as exc:
            logger.error("devicegate cannot check DPoP replays in Redis (%s)", type(exc).__name__)
            raise unavailable(
                "DPoP proofs cannot be checked right now; retry shortly.", 1
            ) from None
        return bool(created)

    def close(self) -> None:
        """Close the connections."""
        self._redis.close()


def _invalid(description: str) -> InvalidDpopProof:
    return InvalidDpopProof(description)


def _object(segment: bytes) -> dict[str, Any]:
    raw = base64url.decode(segment)
    try:
        value = None if raw is None else loads_strict_json(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        value = None
    if not isinstance(value, dict):
        raise _invalid("The DPoP proof is not a compact JWS of JSON objects.")
    return value
