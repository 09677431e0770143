"""The key ring: key ids, key selection, EdDSA and ES256 tokens, and the algorithm-confusion
attacks of RFC 8725 §2.1 (the key, selected by exact kid, decides the algorithm)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from joserfc import jwt as jose_jwt
from joserfc.jwk import KeySet

from devicegate import (
    ConfigError,
    DeviceAuthMiddleware,
    GateConfig,
    InvalidReason,
    InvalidToken,
    TokenIssuer,
    TokenVerifier,
)
from devicegate._keys import HmacKey, derive_kid
from tests.helpers import (
    Keys,
    b64url,
    bearer,
    claims_at,
    client,
    make_token,
    private_pem,
    public_pem,
    write_secrets,
)
from tests.servers.process import ROOT

PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey
DEVICE = "device-5e2b"
ALL_ONES = b"\xff" * 64


def ed_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def segment(data: dict[str, Any]) -> str:
    return b64url(json.dumps(data).encode())


def raw_es256(key: ec.EllipticCurvePrivateKey, signing_input: bytes) -> bytes:
    r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def signed(
    key: PrivateKey,
    header: dict[str, Any],
    claims: dict[str, Any] | None = None,
    *,
    der: bool = False,
) -> str:
    """A compact JWS signed with ``key`` by ``cryptography`` directly, header as given."""
    claims = claims_at(now=int(time.time())) if claims is None else claims
    signing_input = f"{segment(header)}.{segment(claims)}".encode()
    if isinstance(key, ed25519.Ed25519PrivateKey):
        signature = key.sign(signing_input)
    elif der:
        signature = key.sign(signing_input, ec.ECDSA(hashes.SHA256()))
    else:
        signature = raw_es256(key, signing_input)
    return f"{signing_input.decode()}.{b64url(signature)}"


def reason(verifier: TokenVerifier, token: str) -> InvalidReason:
    with pytest.raises(InvalidToken) as excinfo:
        verifier.verify(token, DEVICE)
    return excinfo.value.reason


def header_of(token: str) -> dict[str, Any]:
    part = token.split(".")[0]
    decoded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    return decoded


# --- key ids --------------------------------------------------------------------------------


def test_an_unnamed_secret_gets_a_kid_that_is_an_hmac_not_a_hash(keys: Keys) -> None:
    secret = keys.jwt_secret.encode()
    kid = derive_kid(secret)
    expected = hmac.digest(secret, b"devicegate key id v1", "sha256")[:12]
    assert kid == b64url(expected)
    assert len(kid) == 16
    # Not a (prefix of a) plain hash of the secret, which would let a guess be checked offline
    # from the kid alone, without a token.
    assert kid not in b64url(hashlib.sha256(secret).digest())
    assert derive_kid(secret) == kid  # stable across restarts and instances
    assert GateConfig(jwt_secret=keys.jwt_secret).key_ring.hmac_keys[0].kid == kid


def test_minting_names_the_first_key_and_verification_selects_by_kid(keys: Keys) -> None:
    old = "an-older-secret-" + "o" * 8 + keys.jwt_secret[:16]
    config = GateConfig(jwt_secret={"2026-12": keys.jwt_secret, "2026-06": old})
    issued = TokenIssuer(config).issue(DEVICE)
    assert header_of(issued.access_token) == {"alg": "HS256", "kid": "2026-12", "typ": "JWT"}
    assert TokenVerifier(config).verify(issued.access_token, DEVICE).instance_id == DEVICE
    # Signed with the old secret, named: selected by its kid.
    by_old = make_token(
        old, claims_at(now=int(time.time())), header={"alg": "HS256", "kid": "2026-06"}
    )
    assert TokenVerifier(config).verify(by_old).claims["exp"] > time.time()
    # The kid of one secret on a token signed by the other: that key alone is tried.
    swapped = make_token(
        old, claims_at(now=int(time.time())), header={"alg": "HS256", "kid": "2026-12"}
    )
    assert reason(TokenVerifier(config), swapped) is InvalidReason.BAD_SIGNATURE


def test_tokens_without_a_kid_try_every_secret(keys: Keys) -> None:
    # Minted before key ids existed, or by PyJWT elsewhere.
    old = "an-older-secret-" + "o" * 8 + keys.jwt_secret[:16]
    config = GateConfig(jwt_secret={"2026-12": keys.jwt_secret, "2026-06": old})
    for secret in (keys.jwt_secret, old):
        token = jwt.encode({"exp": int(time.time()) + 60}, secret, algorithm="HS256")
        assert TokenVerifier(config).verify(token).claims["exp"] > time.time()
    stranger = jwt.encode({"exp": int(time.time()) + 60}, "s" * 20 + old, algorithm="HS256")
    assert reason(TokenVerifier(config), stranger) is InvalidReason.BAD_SIGNATURE


def test_an_unknown_kid_tries_no_key(keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    tried: list[str] = []

    def spy(self: HmacKey, signing_input: bytes, signature: bytes) -> bool:
        tried.append(self.kid)
        return False

    monkeypatch.setattr(HmacKey, "verify", spy)
    verifier = TokenVerifier(keys.config())
    for kid in ["unknown", derive_kid(keys.jwt_secret.encode()).lower(), " " + "x", "*"]:
        token = make_token(keys.jwt_secret, claims_at(), header={"alg": "HS256", "kid": kid})
        assert reason(verifier, token) is InvalidReason.UNKNOWN_KEY
    assert tried == []


def test_named_secrets_in_secrets_json(tmp_path: Path, keys: Keys) -> None:
    path = write_secrets(tmp_path / "secrets.json", jwt_secret={"2026-12": keys.jwt_secret})
    config = GateConfig.from_secrets_file(path)
    assert config.jwt_secret_names == ("2026-12",)
    assert header_of(TokenIssuer(config).issue().access_token)["kid"] == "2026-12"
    # replace() keeps the names.
    assert config.replace(jwt_expire_seconds=60).jwt_secret_names == ("2026-12",)


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda k: {"jwt_secret": {"": k.jwt_secret}}, "jwt_secret"),
        (lambda k: {"jwt_secret": {"a b": k.jwt_secret}}, "jwt_secret"),
        (lambda k: {"jwt_secret": {"x" * 65: k.jwt_secret}}, "jwt_secret"),
        # A named secret and a public key under the same kid.
        (
            lambda k: {
                "jwt_secret": {"k1": k.jwt_secret},
                "jwt_public_keys": {"k1": public_pem(ed_key())},
            },
            "jwt_secret",
        ),
    ],
    ids=["empty-name", "space", "too-long", "duplicate-kid"],
)
def test_bad_key_ids(keys: Keys, build: Callable[[Keys], dict[str, Any]], field: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        GateConfig(**build(keys))
    assert excinfo.value.field == field
    assert keys.jwt_secret not in str(excinfo.value)


# --- EdDSA and ES256 --------------------------------------------------------------------------

ALGORITHMS: list[tuple[str, Callable[[], PrivateKey]]] = [("EdDSA", ed_key), ("ES256", ec_key)]


# joserfc warns that RFC 9864 deprecates the polymorphic "EdDSA" for "Ed25519"; "EdDSA" is what
# PyJWT, Envoy and Kong understand today.
@pytest.mark.filterwarnings("ignore:EdDSA is deprecated")
@pytest.mark.parametrize(("alg", "generate"), ALGORITHMS, ids=["EdDSA", "ES256"])
def test_the_key_decides_the_algorithm(alg: str, generate: Callable[[], PrivateKey]) -> None:
    key = generate()
    config = GateConfig(jwt_private_key=private_pem(key))
    issued = TokenIssuer(config).issue(DEVICE, subject="user-1")
    header = header_of(issued.access_token)
    assert header["alg"] == alg
    assert header["kid"] == config.key_ring.signing_key.kid  # type: ignore[union-attr]
    assert TokenVerifier(config).verify(issued.access_token, DEVICE).claims["sub"] == "user-1"
    # Independent verifiers agree: PyJWT and joserfc, from the public key alone.
    decoded = jwt.decode(issued.access_token, public_pem(key), algorithms=[alg])
    assert decoded == dict(issued.claims)
    jwks = KeySet.import_key_set(config.key_ring.jwks())  # type: ignore[arg-type]
    assert jose_jwt.decode(issued.access_token, jwks, algorithms=[alg]).claims == decoded


@pytest.mark.parametrize(("alg", "generate"), ALGORITHMS, ids=["EdDSA", "ES256"])
def test_pyjwt_tokens_verify_here(alg: str, generate: Callable[[], PrivateKey]) -> None:
    key = generate()
    config = GateConfig(jwt_public_keys={"theirs": public_pem(key)})
    token = jwt.encode(
        {"exp": int(time.time()) + 60, "instance_id": DEVICE}, key, alg, headers={"kid": "theirs"}
    )
    assert TokenVerifier(config).verify(token, DEVICE).instance_id == DEVICE


def test_public_keys_verify_but_cannot_mint() -> None:
    key = ed_key()
    jwk = GateConfig(jwt_private_key=private_pem(key)).key_ring.jwks()["keys"][0]
    for given in (public_pem(key), jwk, json.dumps(jwk), {"keys": [jwk]}):
        config = GateConfig(jwt_public_keys=given)
        assert [k.can_sign for k in config.key_ring.keys] == [False]
        with pytest.raises(ConfigError, match="jwt_secret: TokenIssuer needs"):
            TokenIssuer(config)
        token = signed(key, {"alg": "EdDSA", "kid": jwk["kid"]})
        assert TokenVerifier(config).verify(token).claims["exp"] > 0


def test_a_private_key_signs_instead_of_the_secrets(keys: Keys) -> None:
    # Migrating from HS256: the secret keeps verifying the tokens already out there.
    config = keys.config(jwt_private_key=private_pem(ed_key()))
    assert header_of(TokenIssuer(config).issue().access_token)["alg"] == "EdDSA"
    old = make_token(keys.jwt_secret, claims_at(now=int(time.time())))
    assert TokenVerifier(config).verify(old).claims["exp"] > time.time()


def test_secrets_json_holds_asymmetric_keys(tmp_path: Path) -> None:
    mine, theirs = ed_key(), ec_key()
    path = write_secrets(
        tmp_path / "secrets.json",
        jwt_private_key={"2027-01": private_pem(mine)},
        jwt_public_keys={"partner": public_pem(theirs)},
    )
    config = GateConfig.from_secrets_file(path)
    assert sorted(config.key_ring.by_kid) == ["2027-01", "partner"]
    assert config.replace(leeway_seconds=1).key_ring.by_kid.keys() == config.key_ring.by_kid.keys()
    assert private_pem(mine) not in repr(config)
    assert "jwt_private_key=<1 hidden>" in repr(config)


@pytest.mark.parametrize(
    ("options", "says"),
    [
        (
            {"jwt_private_key": "-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----"},
            "not a PEM",
        ),
        ({"jwt_private_key": public_pem(ed_key())}, "not a PEM private key"),
        ({"jwt_private_key": private_pem(rsa.generate_private_key(65537, 2048))}, "only Ed25519"),
        ({"jwt_private_key": private_pem(ec.generate_private_key(ec.SECP384R1()))}, "only Ed25519"),
        ({"jwt_private_key": {"a": "x", "b": "y"}}, "give one private key"),
        ({"jwt_public_keys": private_pem(ed_key())}, "this is a private key"),
        ({"jwt_public_keys": public_pem(rsa.generate_private_key(65537, 2048))}, "only Ed25519"),
        ({"jwt_public_keys": {"kty": "oct", "k": "c2VjcmV0"}}, "must be public"),
        (
            {"jwt_public_keys": {"kty": "OKP", "crv": "Ed25519", "x": "AA", "d": "AA"}},
            "must be public",
        ),
        (
            {"jwt_public_keys": {"kty": "OKP", "crv": "Ed25519", "x": "AAAA"}},
            "'x' must be 32 bytes",
        ),
        ({"jwt_public_keys": {"kty": "EC", "crv": "P-256", "x": "A" * 43, "y": "A" * 43}}, "point"),
        ({"jwt_public_keys": "{not json"}, "not a JWK"),
    ],
    ids=[
        "garbage-pem",
        "public-as-private",
        "rsa",
        "p384",
        "two-private",
        "private-as-public",
        "rsa-public",
        "oct-jwk",
        "private-jwk",
        "short-x",
        "off-curve",
        "bad-json",
    ],
)
def test_unusable_keys_stop_start_up(options: dict[str, Any], says: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        GateConfig(**options)
    assert says.lower() in str(excinfo.value).lower()
    assert "BEGIN" not in str(excinfo.value)


def test_an_jwk_alg_that_is_not_the_keys_is_refused() -> None:
    jwk = GateConfig(jwt_private_key=private_pem(ed_key())).key_ring.jwks()["keys"][0]
    with pytest.raises(ConfigError, match="EdDSA alone"):
        GateConfig(jwt_public_keys={**jwk, "alg": "ES256"})
    with pytest.raises(ConfigError, match="use 'sig'"):
        GateConfig(jwt_public_keys={**jwk, "use": "enc"})


def test_without_cryptography_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cryptography", None)
    with pytest.raises(ConfigError, match=r"devicegate\[crypto\]"):
        GateConfig(jwt_private_key=private_pem(ed_key()))


@pytest.mark.integration
def test_an_hs256_install_never_imports_cryptography(keys: Keys) -> None:
    code = f"""
import sys
from devicegate import DeviceAuthMiddleware, GateConfig, TokenIssuer, TokenVerifier
config = GateConfig(api_keys={keys.api_key!r}, jwt_secret={keys.jwt_secret!r})
token = TokenIssuer(config).issue("d").access_token
TokenVerifier(config).verify(token, "d")
DeviceAuthMiddleware(lambda *a: None, config=config)
assert "cryptography" not in sys.modules, "imported"
assert "httpx" not in sys.modules, "httpx imported"
"""
    subprocess.run(  # noqa: S603 - a fixed command line built by the test
        [sys.executable, "-c", code], check=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT / "src")}
    )


# --- algorithm confusion (RFC 8725 §2.1, §3.1) -----------------------------------------------


class Ring:
    """An EdDSA key, an ES256 key and an HMAC secret in one ring, as an attacker meets it."""

    def __init__(self, keys: Keys) -> None:
        self.ed = ed_key()
        self.ec = ec_key()
        self.config = GateConfig(
            jwt_secret={"hmac": keys.jwt_secret},
            jwt_private_key={"ed": private_pem(self.ed)},
            jwt_public_keys={"ec": public_pem(self.ec)},
        )
        self.jwks = self.config.key_ring.jwks()
        self.verifier = TokenVerifier(self.config)


@pytest.fixture
def ring(keys: Keys) -> Ring:
    return Ring(keys)


def hs256_with(key: str | bytes, header: dict[str, Any]) -> str:
    return make_token(key, claims_at(now=int(time.time())), header=header)


ATTACKER = ed_key()
ATTACKER_JWK = GateConfig(jwt_public_keys=public_pem(ATTACKER)).key_ring.jwks()["keys"][0]

CONFUSIONS: list[Any] = [
    # The public key's own text as an HMAC secret, with its kid: the kid selects an EdDSA key,
    # so HS256 is not its algorithm.
    pytest.param(
        lambda r: hs256_with(public_pem(r.ed), {"alg": "HS256", "kid": "ed"}),
        InvalidReason.UNSUPPORTED_ALGORITHM,
        id="hs256-keyed-with-public-pem",
    ),
    pytest.param(
        lambda r: hs256_with(json.dumps(r.jwks["keys"][0]), {"alg": "HS256", "kid": "ed"}),
        InvalidReason.UNSUPPORTED_ALGORITHM,
        id="hs256-keyed-with-public-jwk",
    ),
    # The same without a kid: only the HMAC secrets are tried, never a public key.
    pytest.param(
        lambda r: hs256_with(public_pem(r.ed), {"alg": "HS256"}),
        InvalidReason.BAD_SIGNATURE,
        id="hs256-keyed-with-public-pem-no-kid",
    ),
    pytest.param(
        lambda r: hs256_with(public_pem(r.ec).encode(), {"alg": "HS256", "kid": "ec"}),
        InvalidReason.UNSUPPORTED_ALGORITHM,
        id="hs256-keyed-with-ec-public-pem",
    ),
    # alg none, in any casing, with or without a kid and signature.
    *(
        pytest.param(
            lambda r, alg=alg, kid=kid: f"{segment({'alg': alg, **kid})}.{segment(claims_at())}.",
            InvalidReason.MALFORMED,
            id=f"{alg}-{'kid' if kid else 'no-kid'}-empty-signature",
        )
        for alg in ("none", "None", "NONE", "nOnE")
        for kid in ({}, {"kid": "ed"})
    ),
    *(
        pytest.param(
            lambda r, alg=alg: signed(r.ed, {"alg": alg, "kid": "ed"}),
            InvalidReason.UNSUPPORTED_ALGORITHM,
            id=f"{alg}-with-a-real-signature",
        )
        for alg in ("none", "None", "NONE", "ed25519", "eddsa", "ES256K", "RS256")
    ),
    # An ES256 token presented to the EdDSA key, and the reverse.
    pytest.param(
        lambda r: signed(r.ec, {"alg": "ES256", "kid": "ed"}),
        InvalidReason.UNSUPPORTED_ALGORITHM,
        id="es256-to-eddsa-kid",
    ),
    pytest.param(
        lambda r: signed(r.ed, {"alg": "EdDSA", "kid": "ec"}),
        InvalidReason.UNSUPPORTED_ALGORITHM,
        id="eddsa-to-es256-kid",
    ),
    pytest.param(
        lambda r: signed(r.ed, {"alg": "EdDSA", "kid": "hmac"}),
        InvalidReason.UNSUPPORTED_ALGORITHM,
        id="eddsa-to-hmac-kid",
    ),
    # Signed by another key of the right type, carrying a known kid.
    pytest.param(
        lambda r: signed(ATTACKER, {"alg": "EdDSA", "kid": "ed"}),
        InvalidReason.BAD_SIGNATURE,
        id="other-key-known-kid",
    ),
    pytest.param(
        lambda r: signed(ec_key(), {"alg": "ES256", "kid": "ec"}),
        InvalidReason.BAD_SIGNATURE,
        id="other-ec-key-known-kid",
    ),
    # Headers that point at the attacker's key: ignored; the kid decides.
    pytest.param(
        lambda r: signed(ATTACKER, {"alg": "EdDSA", "kid": "ed", "jwk": ATTACKER_JWK}),
        InvalidReason.BAD_SIGNATURE,
        id="embedded-jwk-known-kid",
    ),
    pytest.param(
        lambda r: signed(
            ATTACKER, {"alg": "EdDSA", "kid": ATTACKER_JWK["kid"], "jwk": ATTACKER_JWK}
        ),
        InvalidReason.UNKNOWN_KEY,
        id="embedded-jwk-own-kid",
    ),
    pytest.param(
        lambda r: signed(ATTACKER, {"alg": "EdDSA", "jwk": ATTACKER_JWK}),
        InvalidReason.UNKNOWN_KEY,
        id="embedded-jwk-no-kid",
    ),
    pytest.param(
        lambda r: signed(ATTACKER, {"alg": "EdDSA", "kid": "ed", "jku": "https://evil.example/k"}),
        InvalidReason.BAD_SIGNATURE,
        id="jku",
    ),
    pytest.param(
        lambda r: signed(
            ATTACKER, {"alg": "EdDSA", "kid": "ed", "x5c": [b64url(public_pem(ATTACKER).encode())]}
        ),
        InvalidReason.BAD_SIGNATURE,
        id="x5c",
    ),
    # An asymmetric token must name its key: public keys are never tried blindly.
    pytest.param(lambda r: signed(r.ed, {"alg": "EdDSA"}), InvalidReason.UNKNOWN_KEY, id="no-kid"),
    # ES256 in DER (what OpenSSL produces), not JWS's raw R||S: not even well formed.
    pytest.param(
        lambda r: signed(r.ec, {"alg": "ES256", "kid": "ec"}, der=True),
        InvalidReason.MALFORMED,
        id="es256-der",
    ),
    # Wrong lengths: one byte short or long of 64, and HS256's 32 bytes under an EdDSA kid.
    *(
        pytest.param(
            lambda r, size=size: (
                f"{segment({'alg': 'EdDSA', 'kid': 'ed'})}.{segment(claims_at())}"
                f".{b64url(bytes(size))}"
            ),
            expected,
            id=f"signature-of-{size}-bytes",
        )
        for size, expected in (
            (63, InvalidReason.MALFORMED),
            (65, InvalidReason.MALFORMED),
            (32, InvalidReason.BAD_SIGNATURE),
            (0, InvalidReason.MALFORMED),
        )
    ),
    # ES256 with r or s out of range.
    pytest.param(
        lambda r: (
            f"{segment({'alg': 'ES256', 'kid': 'ec'})}.{segment(claims_at())}.{b64url(bytes(64))}"
        ),
        InvalidReason.BAD_SIGNATURE,
        id="es256-zero",
    ),
    pytest.param(
        lambda r: (
            f"{segment({'alg': 'ES256', 'kid': 'ec'})}.{segment(claims_at())}.{b64url(ALL_ONES)}"
        ),
        InvalidReason.BAD_SIGNATURE,
        id="es256-beyond-the-order",
    ),
]


@pytest.mark.parametrize(("forge", "expected"), CONFUSIONS)
def test_algorithm_confusion(
    ring: Ring, forge: Callable[[Ring], str], expected: InvalidReason
) -> None:
    assert reason(ring.verifier, forge(ring)) is expected


def test_the_ring_accepts_what_each_key_signs(ring: Ring, keys: Keys) -> None:
    # The control for the table above: the same shapes, honestly signed, verify.
    now = int(time.time())
    for token in (
        signed(ring.ed, {"alg": "EdDSA", "kid": "ed"}, claims_at(now=now)),
        signed(ring.ec, {"alg": "ES256", "kid": "ec"}, claims_at(now=now)),
        hs256_with(keys.jwt_secret, {"alg": "HS256", "kid": "hmac"}),
        hs256_with(keys.jwt_secret, {"alg": "HS256"}),
    ):
        assert ring.verifier.verify(token).claims["exp"] > now


def test_non_canonical_signature_encodings_are_refused(ring: Ring) -> None:
    token = signed(ring.ed, {"alg": "EdDSA", "kid": "ed"}, claims_at(now=int(time.time())))
    ring.verifier.verify(token)
    # 86 characters carry 516 bits for 512: the last character's low 4 bits must be zero.
    last = token[-1]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    twin = token[:-1] + alphabet[alphabet.index(last) | 1]
    assert twin != token
    assert reason(ring.verifier, twin) is InvalidReason.BAD_SIGNATURE


def test_published_keys_are_public_only(ring: Ring, keys: Keys) -> None:
    text = json.dumps(ring.jwks)
    assert {jwk["kid"] for jwk in ring.jwks["keys"]} == {"ed", "ec"}
    for jwk in ring.jwks["keys"]:
        assert jwk["use"] == "sig"
        assert jwk["alg"] in ("EdDSA", "ES256")
        assert "d" not in jwk
        assert "k" not in jwk
    assert keys.jwt_secret not in text
    assert b64url(keys.jwt_secret.encode()) not in text


async def test_forgeries_through_the_middleware(ring: Ring, app: Any) -> None:
    gate = DeviceAuthMiddleware(app, config=ring.config)
    forged = hs256_with(public_pem(ring.ed), {"alg": "HS256", "kid": "ed"})
    async with client(gate) as http:
        response = await http.get("/", headers=bearer(forged))
    assert response.status_code == 401
    assert 'error="invalid_token"' in response.headers["www-authenticate"]
    assert not app.ran


@pytest.mark.parametrize("algorithm", ["HS256", "EdDSA", "ES256"])
def test_init_writes_the_fields_of_the_algorithm(tmp_path: Path, algorithm: str) -> None:
    from devicegate import cli

    path = tmp_path / "secrets.json"
    assert cli.main(["init", "--path", str(path), "--algorithm", algorithm]) == 0
    assert path.stat().st_mode & 0o777 == 0o600
    document = json.loads(path.read_text())
    assert ("jwt_secret" in document) is (algorithm == "HS256")
    assert ("jwt_private_key" in document) is (algorithm != "HS256")
    config = GateConfig.from_secrets_file(path)
    issued = TokenIssuer(config).issue(DEVICE)
    assert header_of(issued.access_token)["alg"] == algorithm
    assert TokenVerifier(config).verify(issued.access_token, DEVICE).instance_id == DEVICE
