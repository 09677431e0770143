"""Verifying and issuing device tokens. Knows nothing of ASGI.

Verification is done here rather than by ``jwt.decode`` because the rules devicegate promises are
stricter than PyJWT's and are cheaper checked once, in one pass:

* the key decides the algorithm (RFC 8725 §3.1): ``kid`` selects one configured key by exact
  match (an unknown ``kid`` is refused with no key tried), and the token's ``alg`` must then be
  that key's; a token without ``kid`` is tried against the HMAC secrets alone, as before key
  ids existed. Key-pointing header fields (``jwk``, ``jku``, ``x5u``, ``x5c``) are ignored;
* strict compact serialisation: three unpadded, canonical base64url segments, UTF-8 JSON objects
  without duplicate members (RFC 7515 §3.1, §4, §5.2);
* claim types checked (an ``exp`` that is a string, a bool, NaN or an infinity is refused:
  RFC 7519 NumericDates, whole or fractional, up to the year 9999);
* an unknown ``crit`` extension is refused (RFC 7515 §4.1.11).

The signature is checked before the payload is parsed. Minting is done here too, with a header
built once per key; the test suite checks in both directions that PyJWT and this verifier agree.

References:
    https://www.rfc-editor.org/rfc/rfc8725
    https://www.rfc-editor.org/rfc/rfc7519#section-7.2
    https://www.rfc-editor.org/rfc/rfc7515#section-5.2
"""

from __future__ import annotations

import hmac
import json
import math
import re
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from . import _base64url as base64url
from ._bounded import remember
from ._cache import CachedToken, MemoryTokenCache, TokenCache
from ._claims import (
    LAST_NUMERIC_DATE,
    check_application_claims,
    check_lifetime,
    check_subject,
    is_numeric_date,
)
from ._config import GateConfig
from ._dpop import check_jkt
from ._errors import ConfigError, InvalidReason, InvalidRequest, InvalidToken
from ._json import loads_strict_json
from ._keys import ASYMMETRIC_ALGORITHMS, EDDSA, ES256, HS256, Key
from ._principal import CredentialKind, Principal
from ._remote_keys import RemoteKeySet
from ._revocation import RevocationCheck

__all__ = [
    "MAX_CACHED_TOKEN_BYTES",
    "MAX_INSTANCE_ID_LENGTH",
    "IssuedToken",
    "TokenIssuer",
    "TokenVerifier",
    "decode_json_segment",
    "unverified_claims",
    "validate_instance_id",
]

MAX_INSTANCE_ID_LENGTH = 256
MAX_CACHED_TOKEN_BYTES = 4096

# Three base64url segments without padding, the last as long as a signature of a configured
# algorithm: HS256 signs 32 bytes (43 characters), EdDSA and ES256 64 bytes (86 characters;
# RFC 7518 §3.4: ES256 is the raw R||S, so a DER signature, 70 to 72 bytes, is malformed).
_SIGNATURE_CHARACTERS = {HS256: 43, EDDSA: 86, ES256: 86}


def _compact_jws(algorithms: frozenset[str]) -> re.Pattern[bytes]:
    lengths = "|".join(
        f"[A-Za-z0-9_-]{{{size}}}"
        for size in sorted({_SIGNATURE_CHARACTERS[algorithm] for algorithm in algorithms})
    )
    return re.compile(rb"([A-Za-z0-9_-]{2,})\.([A-Za-z0-9_-]{2,})\.(" + lengths.encode() + rb")")


# The checked headers a verifier remembers, and the longest it remembers.
_MAX_REMEMBERED_HEADERS = 64
_MAX_REMEMBERED_HEADER_BYTES = 512

_MISSING_DEVICE = "The token is bound to a device; send the device header."
_JWT_TYPES = frozenset({"JWT", "APPLICATION/JWT"})

Clock = Callable[[], float]


def decode_json_segment(segment: bytes) -> Any:
    """Decode one canonical, unpadded base64url segment holding UTF-8 JSON.

    Raises:
        ValueError: not canonical base64url (one token string per token), not UTF-8, or not
            strict JSON.
    """
    raw = base64url.decode(segment)
    if raw is None:
        raise ValueError("not canonical unpadded base64url")
    return loads_strict_json(raw.decode("utf-8"))


def validate_instance_id(value: object) -> str:
    """Return ``value`` if it is a usable device id, else raise ``ValueError``.

    A device id is 1 to 256 printable ASCII characters without leading or trailing spaces: it
    must survive a round trip through an HTTP header, where servers strip surrounding
    whitespace (RFC 9110 §5.5) and non-ASCII bytes have no agreed encoding.
    """
    if not isinstance(value, str):
        raise ValueError("instance_id must be a string")
    if not 1 <= len(value) <= MAX_INSTANCE_ID_LENGTH:
        raise ValueError(f"instance_id must be 1 to {MAX_INSTANCE_ID_LENGTH} characters")
    if not (value.isascii() and value.isprintable()) or value != value.strip():
        raise ValueError("instance_id must be printable ASCII without surrounding spaces")
    return value


class TokenVerifier:
    """Verifies device tokens against a :class:`GateConfig`, remembering the good ones.

    A token that verified once is kept in a bounded cache keyed by its exact string, with its
    expiry, start of validity, bound device and ready-made :class:`Principal`. A hit still
    checks the clock, the revocations and the device header, so a cached token is refused at
    exactly the moment the full verification would refuse it. Refused tokens are never cached:
    a flood of junk cannot evict good entries.

    One verifier may serve several threads (a synchronous view calling :meth:`verify` from a
    worker thread, say): each step on the cache is a single operation, and when another
    thread's eviction or :meth:`clear_cache` falls between two of them, the call still ends as
    a full verification would end it, at worst after verifying the token again.

    Args:
        config: the configuration holding the secrets and claim rules.
        cache: where verified tokens are remembered (default: a
            :class:`~devicegate.MemoryTokenCache` of ``config.token_cache_size`` entries).
        revocations: asked whether a verified token was revoked; a revoked token is refused
            on its next request, cached or not.
        clock: returns the current Unix time; for tests.
        remote_keys: the keys of the configuration's ``jwks_url`` (default: a
            :class:`~devicegate._remote_keys.RemoteKeySet` of it, when it is set).
    """

    def __init__(
        self,
        config: GateConfig,
        *,
        cache: TokenCache | None = None,
        revocations: RevocationCheck | None = None,
        clock: Clock = time.time,
        remote_keys: RemoteKeySet | None = None,
    ) -> None:
        if cache is None:
            cache = MemoryTokenCache(config.token_cache_size)
        elif not isinstance(cache, TokenCache):
            raise ConfigError("cache", f"must be a TokenCache, got {type(cache).__name__}")
        if revocations is not None and not isinstance(revocations, RevocationCheck):
            raise ConfigError(
                "revocations", f"must be a RevocationCheck, got {type(revocations).__name__}"
            )
        ring = config.key_ring
        self._keys_by_kid = ring.by_kid
        self._hmac_keys = ring.hmac_keys
        if remote_keys is None and config.jwks_url is not None:
            remote_keys = RemoteKeySet(config.jwks_url)
        self._remote_keys = remote_keys
        self._algorithms = ring.algorithms | (
            ASYMMETRIC_ALGORITHMS if remote_keys is not None else frozenset()
        )
        self._compact_jws = _compact_jws(self._algorithms or frozenset({HS256}))
        # Header segments that passed every header rule, with their alg and kid: an issuer
        # writes the same header on every token, so a new token's header is rarely new.
        self._headers: dict[bytes, tuple[str, str | None]] = {}
        self._leeway = config.leeway_seconds
        self._issuers = frozenset(config.issuers)
        self._audiences = frozenset(config.audiences)
        self._require_binding = config.require_device_binding
        self._clock = clock
        self._cache = cache
        # Bound once: the hot path calls these without an attribute lookup each.
        self._cache_get = cache.get
        self._cache_put = cache.put
        self._revocations = revocations

    def __repr__(self) -> str:
        return f"<TokenVerifier cache={self._cache!r} revocations={self._revocations!r}>"

    @property
    def cache(self) -> TokenCache:
        """Where verified tokens are remembered."""
        return self._cache

    @property
    def revocations(self) -> RevocationCheck | None:
        """What is asked whether a verified token was revoked, or ``None``."""
        return self._revocations

    @property
    def cache_size(self) -> int:
        """How many verified tokens are remembered right now."""
        return len(self._cache)

    def clear_cache(self) -> None:
        """Forget every remembered token; the next request for each verifies it in full.

        Revocations need no clearing: a cached token is checked against them again whenever
        they change.
        """
        self._cache.clear()

    def verify(self, token: bytes | str, device_id: bytes | str | None = None) -> Principal:
        """Verify ``token`` for a request whose device header is ``device_id``.

        ``device_id`` is the header's value: its raw bytes, or the string a framework makes of
        them (Starlette's ``request.headers``, Django's ``request.headers``), which decode header
        bytes as Latin-1 and are encoded back the same way here. The comparison is always on the
        bytes the client sent, as the middleware's is.

        Returns:
            the device-token :class:`Principal`.

        Raises:
            InvalidToken: bad syntax, signature, algorithm or claims; expired; wrong device (a
                string with characters no header byte decodes to is no device's).
            InvalidRequest: the token is bound to a device and ``device_id`` is ``None``.
        """
        if isinstance(token, str):
            try:
                token = token.encode("ascii")
            except UnicodeEncodeError:
                raise InvalidToken(InvalidReason.MALFORMED) from None
        elif type(token) is not bytes:
            # None, a number, a bytearray (which could change while it is being checked):
            # no token at all.
            raise InvalidToken(InvalidReason.MALFORMED)
        if isinstance(device_id, str):
            try:
                device_id = device_id.encode("latin-1")
            except UnicodeEncodeError:
                # Not a header value, so not any device's: refused as a wrong device once the
                # token itself verified (an empty id never equals a bound one).
                device_id = b""
        elif device_id is not None and type(device_id) is not bytes:
            device_id = b""  # not a header value either
        return self.check(token, device_id)

    def remembers(self, token: bytes) -> bool:
        """Whether ``token`` verified before and is still in the cache (it may have expired
        since: :meth:`check` decides)."""
        return self._cache_get(token) is not None

    def check(self, token: bytes, device_id: bytes | None) -> Principal:
        """:meth:`verify` for raw header bytes, as the middleware has them (the hot path)."""
        entry = self._cache_get(token)
        if entry is not None:
            expires_at, valid_from, bound, principal, version = entry
            if valid_from <= self._clock() < expires_at:
                revocations = self._revocations
                if revocations is not None and version != revocations.version:
                    bound, principal = self._recheck(token, entry, revocations)
            else:
                # Expired, or the clock went back: decide afresh, so that the refusal is
                # exactly the one (and has the reason) of the full verification.
                self._cache.discard(token)
                entry = None
        if entry is None:
            entry = self._verify_uncached(token)
            if len(token) <= MAX_CACHED_TOKEN_BYTES:
                # Verified against time, claims and revocations but not yet against the
                # device: the device check below runs on every request, cached or not.
                self._cache_put(token, entry)
            bound, principal = entry.bound, entry.principal
        if bound is not None:
            if device_id is None:
                raise InvalidRequest(_MISSING_DEVICE)
            if not hmac.compare_digest(bound, device_id):
                raise _refusal_of(InvalidReason.WRONG_DEVICE, principal.claims)
        return principal

    def _recheck(
        self, token: bytes, entry: CachedToken, revocations: RevocationCheck
    ) -> tuple[bytes | None, Principal]:
        """``entry``'s binding and principal, checked against revocations that changed since
        it was cached."""
        version = revocations.version  # read first: a change while asking means asking again
        if revocations.is_revoked(entry.principal.claims):
            self._cache.discard(token)
            raise _refusal_of(InvalidReason.REVOKED, entry.principal.claims)
        self._cache_put(token, entry._replace(revocations_version=version))
        return entry.bound, entry.principal

    @property
    def remote_keys(self) -> RemoteKeySet | None:
        """The keys of the configuration's ``jwks_url``, or ``None``."""
        return self._remote_keys

    def _verify_uncached(self, token: bytes) -> CachedToken:
        if not self._algorithms:
            raise InvalidToken(InvalidReason.NOT_CONFIGURED)
        match = self._compact_jws.fullmatch(token)
        if match is None:
            raise InvalidToken(InvalidReason.MALFORMED)
        header_segment, payload_segment, signature = match.groups()
        checked = self._headers.get(header_segment)
        if checked is None:
            checked = self._check_header(header_segment)
        alg, kid = checked
        signing_input = token[: len(header_segment) + 1 + len(payload_segment)]
        if kid is not None:
            # The kid selects one configured key by exact match, or none: it is never a path,
            # a query or a URL, and an unknown one is refused before any key is tried.
            key: Key | None = self._keys_by_kid.get(kid)
            if key is None and self._remote_keys is not None:
                key = self._remote_keys.get(kid)
            if key is None:
                raise InvalidToken(InvalidReason.UNKNOWN_KEY)
            # RFC 8725 §2.1: the key fixes the algorithm. An HS256 token naming an EdDSA key's
            # kid would otherwise make the public key an HMAC secret.
            if alg != key.algorithm:
                raise InvalidToken(InvalidReason.UNSUPPORTED_ALGORITHM)
            if not key.verify(signing_input, signature):
                raise InvalidToken(InvalidReason.BAD_SIGNATURE)
        elif alg == HS256:
            # Minted before key ids, or elsewhere: each HMAC secret is tried, as it always was.
            valid = False
            for hmac_key in self._hmac_keys:
                valid |= hmac_key.verify(signing_input, signature)
            if not valid:
                raise InvalidToken(InvalidReason.BAD_SIGNATURE)
        else:
            # An asymmetric token must say which key: public keys are never tried blindly.
            raise InvalidToken(InvalidReason.UNKNOWN_KEY)

        claims = _json_object(payload_segment)
        try:
            entry = self._check_claims(claims)
        except InvalidToken as error:
            # The signature verified: the claims are the issuer's, so they may name the token.
            _name(error, claims)
            raise
        revocations = self._revocations
        if revocations is not None:
            version = revocations.version  # read first: a change while asking means asking again
            if revocations.is_revoked(entry.principal.claims):
                raise _refusal_of(InvalidReason.REVOKED, claims)
            entry = entry._replace(revocations_version=version)
        return entry

    def _check_header(self, header_segment: bytes) -> tuple[str, str | None]:
        """The ``alg`` and ``kid`` of a header that passes every header rule, remembered.

        Raises:
            InvalidToken: the header breaks a rule.
        """
        header = _json_object(header_segment)
        # RFC 8725 §3.1: the algorithms are those of our keys; the header must merely agree
        # with the key it selects (checked below). "none", "HS512", "RS256"... end here.
        alg = header.get("alg")
        if type(alg) is not str or alg not in self._algorithms:
            raise InvalidToken(InvalidReason.UNSUPPORTED_ALGORITHM)
        if "crit" in header or header.get("b64", True) is not True:
            # RFC 7515 §4.1.11: we understand no extension, so any crit is unknown; an unencoded
            # payload (RFC 7797 "b64": false) would change what the signature covers.
            raise InvalidToken(InvalidReason.BAD_HEADER)
        # RFC 7515 §4.1.4, §4.1.9: typ and kid, when present, are strings; a null is refused too
        # (PyJWT refuses a null kid, and a token accepted here must verify there).
        if "typ" in header:
            typ = header["typ"]
            # RFC 7515 §4.1.9: "application/" may be left out, and media types are compared
            # without regard to case: "JWT", "jwt" and "application/jwt" are one type.
            if not isinstance(typ, str) or typ.upper() not in _JWT_TYPES:
                raise InvalidToken(InvalidReason.BAD_HEADER)
        kid = header.get("kid")
        if "kid" in header and not isinstance(kid, str):
            raise InvalidToken(InvalidReason.BAD_HEADER)
        checked = alg, kid
        if len(header_segment) <= _MAX_REMEMBERED_HEADER_BYTES:
            remember(self._headers, header_segment, checked, _MAX_REMEMBERED_HEADERS)
        return checked

    def _check_claims(self, claims: dict[str, Any]) -> CachedToken:
        now = self._clock()
        if not is_numeric_date(now):
            # A clock that cannot tell the time cannot say that a token is still valid.
            raise InvalidToken(InvalidReason.BAD_CLOCK)
        leeway = self._leeway
        exp = claims.get("exp")
        if not is_numeric_date(exp):
            raise InvalidToken(InvalidReason.BAD_CLAIMS)
        expires_at = exp + leeway
        if now >= expires_at:
            raise InvalidToken(InvalidReason.EXPIRED)
        valid_from = float("-inf")
        for name, reason in (
            ("nbf", InvalidReason.NOT_YET_VALID),
            ("iat", InvalidReason.ISSUED_IN_FUTURE),
        ):
            if name in claims:
                value = claims[name]
                if not is_numeric_date(value):
                    raise InvalidToken(InvalidReason.BAD_CLAIMS)
                if now < value - leeway:
                    raise InvalidToken(reason)
                valid_from = max(valid_from, value - leeway)
        if self._issuers:
            iss = claims.get("iss")
            if not isinstance(iss, str) or iss not in self._issuers:
                raise InvalidToken(InvalidReason.WRONG_ISSUER)
        # RFC 7519 §4.1.3: a token meant for an audience we do not claim is refused.
        if ("aud" in claims or self._audiences) and not _audience_matches(
            claims.get("aud"), self._audiences
        ):
            raise InvalidToken(InvalidReason.WRONG_AUDIENCE)
        # RFC 7519 §4.1.1, §4.1.2, §4.1.7: iss, sub and jti are strings. PyJWT refuses other
        # types for sub and jti, and a jti is what a revocation list will be keyed on.
        for name in ("iss", "sub", "jti"):
            if name in claims and not isinstance(claims[name], str):
                raise InvalidToken(InvalidReason.BAD_CLAIMS)
        if "cnf" in claims:
            # RFC 7800: a confirmation method. Only DPoP's key thumbprint (RFC 9449 §6.1) can
            # be checked here; a token bound in another way (mTLS x5t#S256) is refused.
            cnf = claims["cnf"]
            try:
                if not isinstance(cnf, dict) or cnf.keys() != {"jkt"}:
                    raise ValueError
                check_jkt(cnf["jkt"])
            except ValueError:
                raise InvalidToken(InvalidReason.BAD_CLAIMS) from None
        bound: bytes | None = None
        if "instance_id" in claims:
            instance_id = claims["instance_id"]
            if not isinstance(instance_id, str) or not instance_id:
                raise InvalidToken(InvalidReason.BAD_CLAIMS)
            try:
                bound = instance_id.encode()
            except UnicodeEncodeError:  # a lone surrogate (JSON "\\ud800") has no bytes
                raise InvalidToken(InvalidReason.BAD_CLAIMS) from None
        elif self._require_binding:
            raise InvalidToken(InvalidReason.UNBOUND)
        try:
            principal = Principal(
                CredentialKind.DEVICE_TOKEN,
                instance_id=claims.get("instance_id"),
                claims=claims,
            )
        except RecursionError:  # nesting the JSON parser took but freezing the claims cannot
            raise InvalidToken(InvalidReason.MALFORMED) from None
        # As floats, as the clock tells the time: every cache hit compares them with it, and
        # a float compared with an int costs several times a comparison of two floats.
        return CachedToken(float(expires_at), _instant(valid_from), bound, principal, -1)


def unverified_claims(token: str) -> dict[str, Any]:
    """The payload of a compact JWS read without checking its signature, or ``{}``: for a
    token whose signature was checked already, or that only its issuer will check."""
    try:
        data = decode_json_segment(token.split(".")[1].encode("ascii"))
    except (IndexError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def _json_object(segment: bytes) -> dict[str, Any]:
    """The JSON object a token segment holds.

    Raises:
        InvalidToken: ``MALFORMED``, for anything else.
    """
    try:
        value = decode_json_segment(segment)
    except (ValueError, RecursionError):
        raise InvalidToken(InvalidReason.MALFORMED) from None
    if not isinstance(value, dict):
        raise InvalidToken(InvalidReason.MALFORMED)
    return value


def _name(error: InvalidToken, claims: Mapping[str, Any]) -> None:
    """Tell the audit log which token ``error`` refused: its ``jti`` and device, when they are
    strings. Only for claims whose signature verified."""
    jti, instance_id = claims.get("jti"), claims.get("instance_id")
    error.token_id = jti if isinstance(jti, str) else None
    error.instance_id = instance_id if isinstance(instance_id, str) else None


def _refusal_of(reason: InvalidReason, claims: Mapping[str, Any]) -> InvalidToken:
    error = InvalidToken(reason)
    _name(error, claims)
    return error


def _instant(value: float) -> float:
    """``value`` as a float, or ``-inf`` for an instant more than 253,402,300,799 seconds
    before 1970 (an int may be too large for a float): either is earlier than any time a clock
    tells."""
    return float(value) if value > -LAST_NUMERIC_DATE else -math.inf


def _audience_matches(aud: object, accepted: frozenset[str]) -> bool:
    """Whether ``aud`` (a string or a list of strings, RFC 7519 §4.1.3) names one of the
    ``accepted`` audiences exactly."""
    if isinstance(aud, str):
        return aud in accepted
    if isinstance(aud, list) and all(isinstance(item, str) for item in aud):
        return not accepted.isdisjoint(aud)
    return False


@dataclass(frozen=True)
class IssuedToken:
    """A freshly minted token, shaped like an OAuth 2.0 token response (RFC 6749 §5.1).

    Attributes:
        access_token: the compact JWT. Hidden from ``repr()``.
        token_type: ``"Bearer"``, or ``"DPoP"`` for a token bound to a key.
        expires_in: lifetime in seconds.
        instance_id: the device the token is bound to, or ``None`` for a generic token.
        claims: the claims that were signed.
    """

    access_token: str = field(repr=False)
    token_type: str
    expires_in: int
    instance_id: str | None
    claims: Mapping[str, Any] = field(repr=False)

    def as_response(self) -> dict[str, Any]:
        """The JSON body ``POST /gen-jwt`` answers with."""
        return {
            "access_token": self.access_token,
            "token_type": self.token_type,
            "expires_in": self.expires_in,
            "instance_id": self.instance_id,
        }


class TokenIssuer:
    """Mints device tokens signed with the configuration's signing key: its
    ``jwt_private_key`` (EdDSA or ES256, as the key is) when set, else its first
    ``jwt_secret`` (HS256). The header names the key's ``kid``.

    Claims: ``iat``, ``exp`` (``iat`` plus the lifetime), ``jti`` (128 random bits),
    ``instance_id`` when bound, ``sub`` and application claims when given, ``azp`` (the named
    key that asked) when given, ``iss``/``aud`` when configured. The caller never chooses the
    algorithm, the ``jti`` or any registered claim, and may only shorten the lifetime.

    Raises:
        ConfigError: the configuration has no ``jwt_secret`` and no ``jwt_private_key``.
    """

    def __init__(self, config: GateConfig, *, clock: Clock = time.time) -> None:
        key = config.key_ring.signing_key
        if key is None:
            raise ConfigError("jwt_secret", "TokenIssuer needs a jwt_secret to sign tokens")
        self._key = key
        self._sign = key.sign
        # Built once: the header is the same for every token this key signs.
        self._header = base64url.encode(
            json.dumps(
                {"alg": key.algorithm, "kid": key.kid, "typ": "JWT"}, separators=(",", ":")
            ).encode()
        )
        self._lifetime = config.jwt_expire_seconds
        self._issuer = config.issuer
        self._audience = config.audience
        self._require_binding = config.require_device_binding
        self._clock = clock

    def __repr__(self) -> str:
        return f"<TokenIssuer lifetime={self._lifetime}s>"

    @property
    def algorithm(self) -> str:
        """The algorithm of the signing key: ``HS256``, ``EdDSA`` or ``ES256``."""
        return self._key.algorithm

    @property
    def kid(self) -> str:
        """The key id of the signing key, in every token's header."""
        return self._key.kid

    @property
    def requires_binding(self) -> bool:
        """Whether every token must be bound to a device."""
        return self._require_binding

    @property
    def lifetime(self) -> int:
        """The configured lifetime of a token, in seconds: the longest a caller may ask for."""
        return self._lifetime

    def issue(
        self,
        instance_id: str | None = None,
        *,
        subject: str | None = None,
        claims: Mapping[str, Any] | None = None,
        lifetime: int | None = None,
        authorized_party: str | None = None,
        dpop_jkt: str | None = None,
    ) -> IssuedToken:
        """Mint a token, bound to ``instance_id`` when given.

        Args:
            instance_id: the device the token is bound to.
            subject: the ``sub`` claim: who the token was minted for (a user id, say).
            claims: application claims (a JSON object of at most 1,024 bytes; registered and
                devicegate-owned names such as ``exp``, ``jti``, ``instance_id`` or ``cnf`` are
                refused).
            lifetime: seconds until the token expires, at most the configured
                ``jwt_expire_seconds`` (default: that).
            authorized_party: the ``azp`` claim: the named key that asked for the token.
            dpop_jkt: the RFC 7638 SHA-256 thumbprint of the device's public key: the token
                is then bound to it (``cnf.jkt``, RFC 9449 §6.1), accepted only with a DPoP
                proof signed by that key, and its ``token_type`` is ``DPoP``.

        Raises:
            ValueError: ``instance_id`` is not 1-256 printable ASCII characters, or it is
                ``None`` while the configuration requires device binding; ``subject``,
                ``claims`` or ``lifetime`` is not acceptable (a
                :class:`~devicegate._claims.ClaimError` naming the member). A longer lifetime
                is refused, never clamped.
        """
        if instance_id is None:
            if self._require_binding:
                raise ValueError("this gateway requires device binding: pass an instance_id")
        else:
            validate_instance_id(instance_id)
        extra = {} if claims is None else check_application_claims(claims)
        if subject is not None:
            check_subject(subject)
        if authorized_party is not None:
            check_subject(authorized_party)
        if dpop_jkt is not None:
            check_jkt(dpop_jkt)
        seconds = self._lifetime if lifetime is None else check_lifetime(lifetime, self._lifetime)
        issued_at = int(self._clock())
        payload: dict[str, Any] = {
            **extra,
            "iat": issued_at,
            "exp": issued_at + seconds,
            "jti": secrets.token_urlsafe(16),
        }
        if instance_id is not None:
            payload["instance_id"] = instance_id
        if subject is not None:
            payload["sub"] = subject
        if authorized_party is not None:
            payload["azp"] = authorized_party
        if dpop_jkt is not None:
            payload["cnf"] = {"jkt": dpop_jkt}
        if self._issuer is not None:
            payload["iss"] = self._issuer
        if self._audience is not None:
            payload["aud"] = self._audience
        signing_input = (
            self._header
            + b"."
            + base64url.encode(json.dumps(payload, separators=(",", ":"), allow_nan=False).encode())
        )
        access_token = (signing_input + b"." + base64url.encode(self._sign(signing_input))).decode()
        return IssuedToken(
            access_token=access_token,
            # RFC 6750 or RFC 9449 §5 token type
            token_type="Bearer" if dpop_jkt is None else "DPoP",
            expires_in=seconds,
            instance_id=instance_id,
            claims=MappingProxyType(payload),
        )
