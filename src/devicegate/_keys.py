"""Signing keys: the key ring, key ids, and JWK / JWKS. Knows nothing of ASGI.

Every key knows its own algorithm (RFC 8725 §2.1, §3.1): an HMAC secret is HS256, an Ed25519
key EdDSA, a P-256 key ES256. A token's header only selects a key, by exact ``kid``, and must
then name that key's algorithm; it never chooses how a key is used, so a public key can never
serve as an HMAC secret and ``none`` is never an algorithm.

Key ids:

* a named key (``{"2026-12": "..."}`` in ``secrets.json`` or ``GateConfig``) has its name;
* an unnamed HMAC secret has ``base64url(HMAC-SHA256(secret, "devicegate key id v1"))``
  truncated to 96 bits: a pseudorandom function of the secret, so it tells nothing about the
  secret that a token signed with it does not already tell (an HS256 token is itself an
  offline-guessing oracle for its secret; a secret of 32 random bytes defeats both);
* an unnamed public key has its RFC 7638 JWK thumbprint.

``cryptography`` is imported only when an asymmetric key is configured (the ``crypto`` extra).

References:
    https://www.rfc-editor.org/rfc/rfc8725#section-3.1
    https://www.rfc-editor.org/rfc/rfc7515#section-4.1.4
    https://www.rfc-editor.org/rfc/rfc7517
    https://www.rfc-editor.org/rfc/rfc7518#section-3.4 (ES256 signatures are raw R||S)
    https://www.rfc-editor.org/rfc/rfc8037 (EdDSA in JOSE)
    https://www.rfc-editor.org/rfc/rfc7638 (thumbprints)
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from ._base64url import decode as decode_b64url
from ._base64url import encode, encode_text
from ._errors import ConfigError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ec import (
        EllipticCurvePrivateKey,
        EllipticCurvePublicKey,
    )
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

__all__ = [
    "ASYMMETRIC_ALGORITHMS",
    "EcdsaKey",
    "EdDsaKey",
    "HmacKey",
    "Key",
    "KeyRing",
    "derive_kid",
    "generate_private_key_pem",
    "jwk_key",
    "load_private_key",
    "load_public_key",
]

HS256 = "HS256"
EDDSA = "EdDSA"
ES256 = "ES256"
ASYMMETRIC_ALGORITHMS = frozenset({EDDSA, ES256})
ALGORITHMS = frozenset({HS256, EDDSA, ES256})

_KID_LABEL = b"devicegate key id v1"
_KID_BYTES = 12
# JWK members that hold private key material (RFC 7518 §6.2.2, §6.3.2, §6.4; RFC 8037 §2).
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
_CRYPTO_EXTRA = "pip install 'devicegate[crypto]'"


def derive_kid(secret: bytes) -> str:
    """The key id of an unnamed HMAC secret: a truncated HMAC of a fixed label under it."""
    return encode_text(hmac.digest(secret, _KID_LABEL, "sha256")[:_KID_BYTES])


def _thumbprint(members: Mapping[str, str]) -> str:
    """RFC 7638: SHA-256 of the required members, sorted, without whitespace."""
    canonical = json.dumps(dict(sorted(members.items())), separators=(",", ":"))
    return encode_text(hashlib.sha256(canonical.encode()).digest())


class Key:
    """One key of a ring: its ``kid``, its algorithm, and what it can do.

    Attributes:
        kid: the key id that selects it.
        algorithm: the one JWS ``alg`` it is used with.
        can_sign: whether it holds what signing needs (a secret or a private key).
    """

    __slots__ = ("algorithm", "can_sign", "kid")

    kid: str
    algorithm: str
    can_sign: bool

    def __repr__(self) -> str:
        role = "signing" if self.can_sign else "verifying"
        return f"<{type(self).__name__} kid={self.kid!r} alg={self.algorithm} {role}>"

    def verify(self, signing_input: bytes, signature: bytes) -> bool:
        """Whether ``signature`` (the token's third segment, base64url) signs ``signing_input``."""
        raise NotImplementedError

    def sign(self, signing_input: bytes) -> bytes:
        """The JWS signature of ``signing_input``, as raw bytes."""
        raise NotImplementedError

    def public_jwk(self) -> dict[str, str] | None:
        """The public JWK to publish (RFC 7517), or ``None`` for a symmetric key."""
        return None


class HmacKey(Key):
    """An HS256 secret. Never published."""

    __slots__ = ("_secret",)

    def __init__(self, secret: bytes, kid: str | None = None) -> None:
        self._secret = secret
        self.kid = derive_kid(secret) if kid is None else kid
        self.algorithm = HS256
        self.can_sign = True

    def verify(self, signing_input: bytes, signature: bytes) -> bool:
        # Compared as base64url text: one encoding per signature, no decoding needed.
        expected = encode(hmac.digest(self._secret, signing_input, "sha256"))
        return hmac.compare_digest(expected, signature)

    def sign(self, signing_input: bytes) -> bytes:
        return hmac.digest(self._secret, signing_input, "sha256")


class _AsymmetricKey(Key):
    __slots__ = ("_jwk",)

    _jwk: dict[str, str]

    def public_jwk(self) -> dict[str, str]:
        return {**self._jwk, "kid": self.kid, "alg": self.algorithm, "use": "sig"}


class EdDsaKey(_AsymmetricKey):
    """An Ed25519 key: EdDSA (RFC 8037). Signatures are 64 bytes."""

    __slots__ = ("_invalid", "_private", "_public")

    def __init__(
        self,
        public: Ed25519PublicKey,
        private: Ed25519PrivateKey | None = None,
        kid: str | None = None,
    ) -> None:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization

        self._invalid = InvalidSignature
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self._jwk = {"kty": "OKP", "crv": "Ed25519", "x": encode_text(raw)}
        self._public = public
        self._private = private
        self.kid = _thumbprint(self._jwk) if kid is None else kid
        self.algorithm = EDDSA
        self.can_sign = private is not None

    def verify(self, signing_input: bytes, signature: bytes) -> bool:
        raw = decode_b64url(signature)
        if raw is None or len(raw) != 64:
            return False
        try:
            self._public.verify(raw, signing_input)
        except self._invalid:
            return False
        return True

    def sign(self, signing_input: bytes) -> bytes:
        if self._private is None:
            raise RuntimeError("this key can only verify")
        return self._private.sign(signing_input)


class EcdsaKey(_AsymmetricKey):
    """A P-256 key: ES256. JWS signatures are the raw 64-byte R||S (RFC 7518 §3.4), never the
    DER form ``cryptography`` and OpenSSL speak: converted here in both directions."""

    __slots__ = ("_algorithm", "_decode", "_encode", "_invalid", "_private", "_public")

    def __init__(
        self,
        public: EllipticCurvePublicKey,
        private: EllipticCurvePrivateKey | None = None,
        kid: str | None = None,
    ) -> None:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec, utils

        self._invalid = InvalidSignature
        self._encode = utils.encode_dss_signature
        self._decode = utils.decode_dss_signature
        numbers = public.public_numbers()
        self._jwk = {
            "kty": "EC",
            "crv": "P-256",
            "x": encode_text(numbers.x.to_bytes(32, "big")),
            "y": encode_text(numbers.y.to_bytes(32, "big")),
        }
        self._public = public
        self._private = private
        self._algorithm = ec.ECDSA(hashes.SHA256())
        self.kid = _thumbprint(self._jwk) if kid is None else kid
        self.algorithm = ES256
        self.can_sign = private is not None

    def verify(self, signing_input: bytes, signature: bytes) -> bool:
        raw = decode_b64url(signature)
        if raw is None or len(raw) != 64:
            return False
        r = int.from_bytes(raw[:32], "big")
        s = int.from_bytes(raw[32:], "big")
        try:
            self._public.verify(self._encode(r, s), signing_input, self._algorithm)
        except self._invalid:
            return False
        return True

    def sign(self, signing_input: bytes) -> bytes:
        if self._private is None:
            raise RuntimeError("this key can only verify")
        r, s = self._decode(self._private.sign(signing_input, self._algorithm))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _cryptography(field: str) -> None:
    """Raise a ConfigError naming the extra when ``cryptography`` is missing."""
    try:
        import cryptography  # noqa: F401
    except ImportError:
        raise ConfigError(
            field,
            f"EdDSA and ES256 keys need the 'cryptography' package: {_CRYPTO_EXTRA}",
        ) from None


def generate_private_key_pem(algorithm: str) -> str:
    """A fresh, unencrypted PKCS#8 PEM private key for ``algorithm`` (``EdDSA`` or ``ES256``).

    Raises:
        ConfigError: ``cryptography`` is missing, or the algorithm is neither.
    """
    _cryptography("algorithm")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    private: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey
    if algorithm == EDDSA:
        private = ed25519.Ed25519PrivateKey.generate()
    elif algorithm == ES256:
        private = ec.generate_private_key(ec.SECP256R1())
    else:
        raise ConfigError("algorithm", "must be EdDSA or ES256 for a private key")
    return private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def load_private_key(field: str, pem: str, kid: str | None = None) -> Key:
    """The signing key in PEM text ``pem`` (PKCS#8 or the traditional EC form, unencrypted).

    Raises:
        ConfigError: ``cryptography`` is missing, the text is not an unencrypted private key,
            or the key is neither Ed25519 nor P-256.
    """
    _cryptography(field)
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    try:
        private = serialization.load_pem_private_key(pem.encode(), password=None)
    except TypeError:
        raise ConfigError(field, "the private key is encrypted; give it unencrypted") from None
    except (ValueError, UnicodeEncodeError):
        raise ConfigError(
            field,
            "not a PEM private key; generate one with `devicegate init --algorithm EdDSA`",
        ) from None
    if isinstance(private, ed25519.Ed25519PrivateKey):
        return EdDsaKey(private.public_key(), private, kid)
    if isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(private.curve, ec.SECP256R1):
        return EcdsaKey(private.public_key(), private, kid)
    raise ConfigError(field, "only Ed25519 (EdDSA) and P-256 (ES256) private keys are supported")


def load_public_key(field: str, key: str | Mapping[str, Any], kid: str | None = None) -> Key:
    """The verifying key in ``key``: PEM text (SubjectPublicKeyInfo), or a JWK as a mapping or
    as JSON text.

    Raises:
        ConfigError: ``cryptography`` is missing, the text is neither, it holds private or
            symmetric key material, or the key is neither Ed25519 nor P-256.
    """
    _cryptography(field)
    if isinstance(key, str) and key.lstrip().startswith("{"):
        try:
            key = json.loads(key)
        except ValueError:
            raise ConfigError(field, "a JWK must be a JSON object") from None
    if isinstance(key, Mapping):
        try:
            return jwk_key(key, kid)
        except ValueError as exc:
            raise ConfigError(field, str(exc)) from None
    if not isinstance(key, str):
        raise ConfigError(field, "every public key must be PEM text or a JWK")
    if "PRIVATE KEY" in key:
        raise ConfigError(
            field, "this is a private key; give its public key here (never publish a private key)"
        )
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    try:
        public = serialization.load_pem_public_key(key.encode())
    except (ValueError, UnicodeEncodeError):
        raise ConfigError(
            field, "not a PEM public key (-----BEGIN PUBLIC KEY-----) or a JWK"
        ) from None
    if isinstance(public, ed25519.Ed25519PublicKey):
        return EdDsaKey(public, None, kid)
    if isinstance(public, ec.EllipticCurvePublicKey) and isinstance(public.curve, ec.SECP256R1):
        return EcdsaKey(public, None, kid)
    raise ConfigError(field, "only Ed25519 (EdDSA) and P-256 (ES256) public keys are supported")


def jwk_key(jwk: Mapping[str, Any], kid: str | None = None) -> Key:
    """The verifying key a public JWK describes (RFC 7517, RFC 8037 for ``OKP``).

    ``kid`` names it when given (and must then agree with the JWK's own ``kid``); otherwise
    the JWK's ``kid``, or its RFC 7638 thumbprint.

    Raises:
        ValueError: with a message safe to show: not an Ed25519 or P-256 public key, private or
            symmetric material, a ``use`` other than ``sig`` or an ``alg`` that is not the key's.
    """
    if not _PRIVATE_MEMBERS.isdisjoint(jwk):
        raise ValueError("a JWK here must be public: it holds private or symmetric key material")
    own_kid = jwk.get("kid")
    if own_kid is not None and not isinstance(own_kid, str):
        raise ValueError("a JWK's kid must be a string")
    if kid is not None and own_kid is not None and own_kid != kid:
        raise ValueError("the JWK's kid differs from the name it is given")
    kid = kid if kid is not None else own_kid
    if jwk.get("use", "sig") != "sig":
        raise ValueError("a JWK for verifying tokens must have use 'sig'")
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    kty, crv = jwk.get("kty"), jwk.get("crv")
    key: Key
    if kty == "OKP" and crv == "Ed25519":
        x = _member(jwk, "x", 32)
        key = EdDsaKey(ed25519.Ed25519PublicKey.from_public_bytes(x), None, kid)
    elif kty == "EC" and crv == "P-256":
        # from_encoded_point checks that the point lies on the curve (an invalid-curve
        # point must never become a key).
        point = b"\x04" + _member(jwk, "x", 32) + _member(jwk, "y", 32)
        try:
            public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
        except ValueError:
            raise ValueError("the JWK's x and y are not a point on P-256") from None
        key = EcdsaKey(public, None, kid)
    else:
        raise ValueError("only Ed25519 (OKP) and P-256 (EC) public JWKs are supported")
    if jwk.get("alg", key.algorithm) != key.algorithm:
        raise ValueError(f"a {crv} key is used with {key.algorithm} alone")
    return key


def _member(jwk: Mapping[str, Any], name: str, size: int) -> bytes:
    value = jwk.get(name)
    raw = decode_b64url(value) if isinstance(value, str) else None
    if raw is None or len(raw) != size:
        raise ValueError(f"the JWK's {name!r} must be {size} bytes of unpadded base64url")
    return raw


class KeyRing:
    """The keys a configuration signs and verifies with, looked up by exact ``kid``.

    Args:
        keys: every key; the first one that can sign signs. Key ids must be distinct.

    Raises:
        ConfigError: two keys share a ``kid``.
    """

    __slots__ = ("by_kid", "hmac_keys", "keys", "signing_key")

    def __init__(self, keys: Iterable[Key]) -> None:
        self.keys = tuple(keys)
        by_kid: dict[str, Key] = {}
        for key in self.keys:
            if key.kid in by_kid:
                raise ConfigError(
                    "jwt_secret",
                    f"two keys have the key id {key.kid!r}; every key needs its own "
                    "(a public key listed beside its own private key counts twice)",
                )
            by_kid[key.kid] = key
        self.by_kid: Mapping[str, Key] = MappingProxyType(by_kid)
        self.hmac_keys = tuple(key for key in self.keys if isinstance(key, HmacKey))
        self.signing_key = next((key for key in self.keys if key.can_sign), None)

    def __repr__(self) -> str:
        return f"<KeyRing {list(self.keys)!r}>"

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def algorithms(self) -> frozenset[str]:
        """The algorithms of the keys."""
        return frozenset(key.algorithm for key in self.keys)

    def jwks(self) -> dict[str, Any]:
        """The JWK Set (RFC 7517 §5) of the public keys: never a secret or a private member."""
        return {"keys": [jwk for key in self.keys if (jwk := key.public_jwk()) is not None]}
