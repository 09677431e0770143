"""What a token says and which key asked for it: subjects, application claims, shorter lifetimes,
named keys, several accepted issuers and audiences, and the secrets a token may be signed with.

Tested where a user meets them: ``TokenIssuer.issue`` in Python, ``POST /gen-jwt`` over HTTP,
and the principal an app sees behind the middleware.
"""

from __future__ import annotations

import base64
import json
import secrets
from pathlib import Path
from typing import Any

import jwt
import pytest

from devicegate import (
    ConfigError,
    CredentialKind,
    DeviceAuthMiddleware,
    GateConfig,
    InvalidReason,
    InvalidToken,
    Principal,
    TokenIssuer,
    TokenVerifier,
    get_principal,
)
from devicegate._claims import MAX_CLAIMS_BYTES, RESERVED_CLAIMS, ClaimError
from tests.helpers import (
    NOW,
    TOKEN_PATH,
    Clock,
    Keys,
    RecordingApp,
    bad_request,
    bearer,
    claims_at,
    client,
    make_token,
    write_secrets,
)

DEVICE = "device-1"


def decoded(token: str, secret: str | bytes) -> dict[str, Any]:
    """The claims of ``token``, verified by PyJWT (an independent reader)."""
    claims: dict[str, Any] = jwt.decode(
        token, secret, algorithms=["HS256"], options={"verify_exp": False, "verify_aud": False}
    )
    return claims


# --- TokenIssuer.issue ---------------------------------------------------------------------------


def test_a_token_can_say_who_and_carry_application_claims(keys: Keys) -> None:
    issuer = TokenIssuer(keys.config(), clock=Clock())
    token = issuer.issue(
        DEVICE,
        subject="user-42",
        claims={"roles": ["reader"], "tier": 2, "beta": True, "profile": {"lang": None}},
        lifetime=60,
    )
    claims = decoded(token.access_token, keys.jwt_secret)
    assert claims["sub"] == "user-42"
    assert claims["roles"] == ["reader"]
    assert claims["profile"] == {"lang": None}
    assert claims["exp"] - claims["iat"] == 60 == token.expires_in
    assert "azp" not in claims
    principal = TokenVerifier(keys.config(), clock=Clock()).verify(token.access_token, DEVICE)
    assert principal.subject == "user-42"
    assert principal.display_name == "user-42"
    assert principal.key_name is None


@pytest.mark.parametrize("name", sorted(RESERVED_CLAIMS))
def test_reserved_claims_cannot_be_set(keys: Keys, name: str) -> None:
    with pytest.raises(ClaimError) as refused:
        TokenIssuer(keys.config()).issue(DEVICE, claims={name: "x"})
    assert refused.value.member == name
    assert repr(name) in str(refused.value)


@pytest.mark.parametrize(
    ("options", "member"),
    [
        ({"lifetime": 301}, "expires_in"),  # longer than configured: refused, never clamped
        ({"lifetime": 0}, "expires_in"),
        ({"lifetime": -5}, "expires_in"),
        ({"lifetime": 10.5}, "expires_in"),
        ({"lifetime": True}, "expires_in"),
        ({"subject": ""}, "sub"),
        ({"subject": 42}, "sub"),
        ({"subject": "x" * 257}, "sub"),
        ({"subject": "line\nbreak"}, "sub"),
        ({"claims": []}, "claims"),
        ({"claims": "roles"}, "claims"),
        ({"claims": {"score": float("nan")}}, "claims"),
        ({"claims": {"score": float("inf")}}, "claims"),
        ({"claims": {"when": object()}}, "claims"),
        ({"claims": {"blob": b"bytes"}}, "claims"),
        ({"claims": {"nested": {1: "x"}}}, "claims"),
        ({"claims": {"big": "x" * MAX_CLAIMS_BYTES}}, "claims"),
        ({"claims": {"huge": 10**5000}}, "claims"),
        ({"claims": {"deep": json.loads("[" * 10 + "]" * 10)}}, "claims"),
    ],
)
def test_what_a_token_cannot_carry(keys: Keys, options: dict[str, Any], member: str) -> None:
    with pytest.raises(ValueError, match=member) as refused:
        TokenIssuer(keys.config()).issue(DEVICE, **options)
    assert isinstance(refused.value, ClaimError)
    assert refused.value.member == member


def test_claims_up_to_the_limit_are_fine(keys: Keys) -> None:
    # {"a":"..."} is 8 bytes of punctuation and name around the value.
    claims = {"a": "x" * (MAX_CLAIMS_BYTES - 8)}
    token = TokenIssuer(keys.config()).issue(claims=claims)
    assert decoded(token.access_token, keys.jwt_secret)["a"] == claims["a"]


def test_claims_are_copied_not_kept(keys: Keys) -> None:
    claims: dict[str, Any] = {"roles": ["reader"]}
    token = TokenIssuer(keys.config()).issue(claims=claims)
    claims["roles"].append("admin")
    assert decoded(token.access_token, keys.jwt_secret)["roles"] == ["reader"]


# --- POST /gen-jwt ------------------------------------------------------------------------------


async def test_the_endpoint_mints_what_the_body_asks_for(keys: Keys, app: RecordingApp) -> None:
    gate = DeviceAuthMiddleware(app, config=keys.config())
    body = {"instance_id": DEVICE, "sub": "user-42", "claims": {"plan": "pro"}, "expires_in": 30}
    async with client(gate) as http:
        response = await http.post(TOKEN_PATH, headers={"x-api-key": keys.api_key}, json=body)
        assert response.status_code == 200, response.text
        answer = response.json()
        assert (answer["expires_in"], answer["instance_id"]) == (30, DEVICE)
        token = answer["access_token"]
        seen = await http.get("/", headers=bearer(token, DEVICE))
    assert seen.status_code == 200
    claims = decoded(token, keys.jwt_secret)
    assert (claims["sub"], claims["plan"], claims["exp"] - claims["iat"]) == ("user-42", "pro", 30)
    principal = get_principal(app.calls[-1])
    assert principal is not None
    assert principal.subject == "user-42"


BAD_BODIES = [
    # (body, the description the client gets back)
    (
        {"instance_id": DEVICE, "exp": 2**31},
        "only instance_id, sub, claims, expires_in and dpop_jkt",
    ),
    ({"expires": 10}, "only instance_id, sub, claims, expires_in and dpop_jkt"),
    ({"expires_in": 3600}, "expires_in must be from 1 to 300 seconds"),
    ({"expires_in": "30"}, "expires_in must be a whole number of seconds"),
    ({"sub": 7}, "sub must be a string of 1 to 256 printable characters"),
    ({"claims": {"exp": 1}}, "the claim 'exp' is set by the server alone"),
    ({"claims": {"instance_id": "other"}}, "the claim 'instance_id' is set by the server alone"),
    ({"claims": {"cnf": {"jkt": "x"}}}, "the claim 'cnf' is set by the server alone"),
    ({"claims": {"azp": "billing"}}, "the claim 'azp' is set by the server alone"),
    ({"claims": ["x"]}, "claims must be a JSON object"),
    ({"claims": {"x": "y" * 2000}}, "claims must take at most 1024 bytes as compact JSON"),
]


@pytest.mark.parametrize(("body", "description"), BAD_BODIES)
async def test_the_endpoint_refuses_what_it_cannot_mint(
    keys: Keys, app: RecordingApp, body: dict[str, Any], description: str
) -> None:
    gate = DeviceAuthMiddleware(app, config=keys.config())
    async with client(gate) as http:
        response = await http.post(TOKEN_PATH, headers={"x-api-key": keys.api_key}, json=body)
    assert response.status_code == 400
    answer = response.json()
    assert answer["error"] == "invalid_request"
    assert description in answer["error_description"]
    assert response.headers["cache-control"] == "no-store"
    assert "access_token" not in response.text


async def test_an_unknown_member_is_never_echoed(keys: Keys, app: RecordingApp) -> None:
    gate = DeviceAuthMiddleware(app, config=keys.config())
    async with client(gate) as http:
        response = await http.post(
            TOKEN_PATH, headers={"x-api-key": keys.api_key}, json={"<evil-member>": 1}
        )
    assert response.status_code == 400
    assert "evil" not in response.text
    assert bad_request(response.json()["error_description"]).status == 400


# --- named keys ----------------------------------------------------------------------------------


def named_keys() -> dict[str, str]:
    return {"billing": secrets.token_urlsafe(32), "reports": secrets.token_urlsafe(32)}


async def test_named_keys_say_which_key_admitted(keys: Keys, app: RecordingApp) -> None:
    servers, phones = named_keys(), {"ios": secrets.token_urlsafe(32)}
    config = GateConfig(api_keys=servers, mobile_api_keys=phones, jwt_secret=keys.jwt_secret)
    assert config.api_keys == tuple(servers.values())
    assert config.api_key_names == ("billing", "reports")
    gate = DeviceAuthMiddleware(app, config=config)
    async with client(gate) as http:
        for key in servers.values():
            assert (await http.get("/", headers={"x-api-key": key})).status_code == 200
        assert (await http.get("/", headers={"authorization": phones["ios"]})).status_code == 200
        minted = await http.post(
            TOKEN_PATH, headers={"x-api-key": servers["reports"]}, json={"instance_id": DEVICE}
        )
    principals = [get_principal(scope) for scope in app.calls]
    assert [(p.kind, p.key_name) for p in principals if p is not None] == [
        (CredentialKind.API_KEY, "billing"),
        (CredentialKind.API_KEY, "reports"),
        (CredentialKind.MOBILE_API_KEY, "ios"),
    ]
    assert "key_name='billing'" in repr(principals[0])
    # The token records which named key asked for it, in azp; the key itself is nowhere.
    token = minted.json()["access_token"]
    assert decoded(token, keys.jwt_secret)["azp"] == "reports"
    assert servers["reports"] not in token


async def test_unnamed_keys_name_nothing(keys: Keys, app: RecordingApp) -> None:
    gate = DeviceAuthMiddleware(app, config=keys.config())
    async with client(gate) as http:
        await http.get("/", headers={"x-api-key": keys.api_key})
        minted = await http.post(TOKEN_PATH, headers={"x-api-key": keys.api_key}, json={})
    principal = get_principal(app.calls[0])
    assert principal is not None
    assert principal.key_name is None
    assert "azp" not in decoded(minted.json()["access_token"], keys.jwt_secret)


def test_named_keys_from_a_secrets_file(tmp_path: Path, keys: Keys) -> None:
    servers = named_keys()
    path = write_secrets(tmp_path / "secrets.json", keys, api_key=servers)
    config = GateConfig.from_secrets_file(path)
    assert dict(zip(config.api_key_names, config.api_keys, strict=True)) == servers
    assert config.mobile_api_key_names == (None,)
    # replace() keeps the names.
    assert config.replace(leeway_seconds=5).api_key_names == ("billing", "reports")


@pytest.mark.parametrize(
    "names",
    [
        pytest.param({"": "k"}, id="empty-name"),
        pytest.param({"two words": "k"}, id="space"),
        pytest.param({"x" * 65: "k"}, id="too-long"),
        pytest.param({"caf\u00e9": "k"}, id="non-ascii"),
    ],
)
def test_key_names_are_short_visible_ascii(keys: Keys, names: dict[str, str]) -> None:
    named = {name: secrets.token_urlsafe(32) for name in names}
    with pytest.raises(ConfigError) as refused:
        GateConfig(api_keys=named, jwt_secret=keys.jwt_secret)
    assert refused.value.field == "api_keys"
    assert not any(key in str(refused.value) for key in named.values())


def test_a_named_key_is_still_checked_and_separated(keys: Keys) -> None:
    with pytest.raises(ConfigError, match="at least 16 bytes"):
        GateConfig(api_keys={"weak": "short"})
    with pytest.raises(ConfigError, match="both as api_keys and as mobile_api_keys"):
        GateConfig(api_keys={"a": keys.api_key}, mobile_api_keys={"b": keys.api_key})


# --- issuers and audiences ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"iss": "https://a.example", "aud": "mobile"}, None),
        ({"iss": "https://b.example", "aud": ["web", "mobile"]}, None),
        ({"iss": "https://c.example", "aud": "mobile"}, InvalidReason.WRONG_ISSUER),
        ({"iss": "https://a.example", "aud": "web"}, InvalidReason.WRONG_AUDIENCE),
        ({"iss": "https://a.example/", "aud": "mobile"}, InvalidReason.WRONG_ISSUER),
        ({"iss": ["https://a.example"], "aud": "mobile"}, InvalidReason.WRONG_ISSUER),
    ],
)
def test_several_issuers_and_audiences_may_be_accepted(
    keys: Keys, claims: dict[str, Any], reason: InvalidReason | None
) -> None:
    config = keys.config(
        issuer=["https://a.example", "https://b.example"], audience=["mobile", "tablet"]
    )
    assert (config.issuer, config.audience) == ("https://a.example", "mobile")
    assert config.issuers == ("https://a.example", "https://b.example")
    token = make_token(keys.jwt_secret, claims_at(**claims))
    verifier = TokenVerifier(config, clock=Clock())
    if reason is None:
        assert verifier.verify(token).claims["iss"] == claims["iss"]
    else:
        with pytest.raises(InvalidToken) as refused:
            verifier.verify(token)
        assert refused.value.reason is reason
    minted = decoded(TokenIssuer(config).issue().access_token, keys.jwt_secret.encode())
    assert (minted["iss"], minted["aud"]) == ("https://a.example", "mobile")


def test_issuers_from_the_environment(keys: Keys) -> None:
    config = GateConfig.from_env(
        {
            "DEVICEGATE_JWT_SECRET": keys.jwt_secret,
            "DEVICEGATE_ISSUER": "https://a.example, https://b.example",
            "DEVICEGATE_AUDIENCE": "mobile",
        }
    )
    assert config.issuers == ("https://a.example", "https://b.example")
    assert config.audiences == ("mobile",)


# --- what a jwt_secret may be --------------------------------------------------------------------

PUBLIC_KEYS = [
    "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=\n"
    "-----END PUBLIC KEY-----\n",
    "-----BEGIN RSA PUBLIC KEY-----\nMIIBCgKCAQEA+xGZ/wcz9ugFpP07Nspo6U17l0YhFiFpxxU4pTk3L\n",
    "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIUQk2ZPZ8vdF3rXb6r8vVt7p1q2bIwCgYIK\n",
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHh0c2VjcmV0a2V5c2hvdWxkbm90YmVoZXJl user@host",
    "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQDx7Lm9cYv2 user@host",
    "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTY user@host",
    "  -----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=\n",
]


@pytest.mark.parametrize("public_key", PUBLIC_KEYS)
def test_a_public_key_is_no_jwt_secret(public_key: str) -> None:
    # PyJWT advisory GHSA-ffqj-6fqr-9h24: whoever holds the public key could sign HS256 tokens.
    with pytest.raises(ConfigError) as refused:
        GateConfig(jwt_secret=public_key)
    assert refused.value.field == "jwt_secret"
    assert "public key" in str(refused.value)
    assert public_key.strip()[20:40] not in str(refused.value)


def test_a_base64url_secret_stands_for_its_bytes(keys: Keys) -> None:
    raw = secrets.token_bytes(32) + b"\x00\xff"  # any bytes, not only text
    encoded = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
    config = GateConfig(api_keys=keys.api_key, jwt_secret=f"base64url:{encoded}")
    # Minted with the bytes, so another library given the same JWK "k" verifies it...
    token = TokenIssuer(config).issue(DEVICE).access_token
    assert decoded(token, raw)["instance_id"] == DEVICE
    # ...and a token another library signed with those bytes verifies here.
    foreign = jwt.encode({"exp": NOW + 300, "jti": "j"}, raw, algorithm="HS256")
    assert TokenVerifier(config, clock=Clock()).verify(foreign).claims["jti"] == "j"
    with pytest.raises(InvalidToken):
        TokenVerifier(config, clock=Clock()).verify(
            jwt.encode({"exp": NOW + 300}, encoded, algorithm="HS256")  # the text is not the key
        )


@pytest.mark.parametrize(
    ("secret", "message"),
    [
        ("base64url:" + "A" * 20, "at least 32 bytes"),
        ("base64url:" + "abc+def/" * 8, "unpadded base64url"),
        ("base64url:" + secrets.token_urlsafe(32) + "=", "unpadded base64url"),
        ("base64url:" + "A" * 43, "distinct characters"),  # 32 zero bytes: not random
        ("base64url:" + "B" * 43, "unpadded base64url"),  # stray low bits: not canonical
    ],
)
def test_a_base64url_secret_must_be_canonical_and_long(secret: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as refused:
        GateConfig(jwt_secret=secret)
    assert refused.value.field == "jwt_secret"


def test_principals_with_the_same_claims_but_other_key_names_differ() -> None:
    first = Principal(CredentialKind.API_KEY, key_name="billing")
    assert first != Principal(CredentialKind.API_KEY, key_name="reports")
    assert first == Principal(CredentialKind.API_KEY, key_name="billing")
    assert first.subject is None
    assert first.display_name == "billing"
