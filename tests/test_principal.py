"""Principal and CredentialKind: immutable, comparable, and read-only all the way down."""

from __future__ import annotations

import copy
import json
import pickle
from collections.abc import Callable
from typing import Any

import pytest
from starlette.authentication import BaseUser

from devicegate import CredentialKind, Principal

CLAIMS = {"jti": "j-1", "instance_id": "device-1", "roles": ["user"], "profile": {"tier": 1}}


def device_principal(**claims: Any) -> Principal:
    return Principal(
        CredentialKind.DEVICE_TOKEN, instance_id="device-1", claims={**CLAIMS, **claims}
    )


def test_kind_reads_as_its_value() -> None:
    # As enum.StrEnum does on 3.11+, on every supported Python: scopes, logs and f-strings
    # show "device_token", never "CredentialKind.DEVICE_TOKEN".
    kind = CredentialKind.DEVICE_TOKEN
    assert str(kind) == "device_token"
    assert f"{kind}|{kind:>14}" == "device_token|  device_token"
    assert kind == "device_token"
    assert json.dumps([kind]) == '["device_token"]'


def test_principal_is_a_starlette_user() -> None:
    principal = device_principal()
    assert isinstance(principal, BaseUser)
    assert principal.is_authenticated
    assert principal.display_name == "device-1"
    assert principal.identity == "j-1"
    key = Principal(CredentialKind.API_KEY)
    assert (key.display_name, key.identity, key.instance_id) == ("api_key", "api_key", None)
    assert dict(key.claims) == {}
    assert repr(principal) == "Principal(kind='device_token', instance_id='device-1')"


def test_principal_cannot_be_changed() -> None:
    principal = device_principal()
    with pytest.raises(AttributeError):
        principal.kind = CredentialKind.API_KEY
    with pytest.raises(AttributeError):
        del principal.instance_id


def test_equality_and_hash_follow_the_claims() -> None:
    assert device_principal() == device_principal()
    assert hash(device_principal()) == hash(device_principal())
    assert device_principal() != device_principal(jti="j-2")
    assert device_principal() != Principal(CredentialKind.API_KEY)
    assert device_principal() != "device-1"
    assert len({device_principal(), device_principal(), device_principal(jti="j-2")}) == 2


def test_claims_are_read_only_all_the_way_down() -> None:
    claims: Any = device_principal().claims
    refused: list[Callable[[], object]] = [
        lambda: claims.__setitem__("jti", "other"),
        lambda: claims.__init__(jti="other"),
        lambda: claims["roles"].__init__(["admin"]),
        lambda: claims.pop("jti"),
        lambda: claims.update(admin=True),
        lambda: claims.setdefault("admin", True),
        lambda: claims["roles"].append("admin"),
        lambda: claims["roles"].__setitem__(0, "admin"),
        lambda: claims["roles"].sort(),
        lambda: claims["profile"].__setitem__("tier", 2),
        lambda: claims["profile"].clear(),
    ]
    for change in refused:
        with pytest.raises(TypeError, match="read-only"):
            change()
    assert claims == CLAIMS


def test_read_only_claims_still_serialise_copy_and_pickle_as_plain_values() -> None:
    claims = device_principal().claims
    assert json.loads(json.dumps(claims)) == CLAIMS
    shallow = copy.copy(claims)
    assert type(shallow) is dict
    shallow["jti"] = "mine"  # a copy is the caller's own to change
    deep = [copy.deepcopy(claims), pickle.loads(pickle.dumps(claims))]  # noqa: S301 - our own bytes
    for plain in deep:
        assert type(plain) is dict
        assert plain == CLAIMS
        plain["roles"].append("admin")
        plain["profile"]["tier"] = 2
    roles = claims["roles"]
    for plain_list in (
        copy.copy(roles),
        copy.deepcopy(roles),
        pickle.loads(pickle.dumps(roles)),  # noqa: S301 - our own bytes
    ):
        assert type(plain_list) is list
        plain_list.append("admin")
    assert claims == CLAIMS


@pytest.mark.parametrize(
    "principal",
    [
        device_principal(),
        Principal(CredentialKind.API_KEY),
        Principal(CredentialKind.MOBILE_API_KEY),
    ],
    ids=["device-token", "api-key", "mobile-key"],
)
def test_a_principal_copies_and_pickles(principal: Principal) -> None:
    # An app that deep-copies its scope, or a task queue that pickles request.user, met
    # "Principal is immutable" from the default protocols.
    assert copy.copy(principal) is principal
    scope = {"type": "http", "user": principal}
    assert copy.deepcopy(scope)["user"] is principal
    restored = pickle.loads(pickle.dumps(principal))  # noqa: S301 - our own bytes
    assert type(restored) is Principal
    assert restored == principal
    assert restored.kind is principal.kind
    assert restored.instance_id == principal.instance_id
    # Rebuilt through __init__: as read-only as the original.
    with pytest.raises(AttributeError):
        restored.instance_id = "other"
    if restored.claims:
        with pytest.raises(TypeError):
            restored.claims["roles"].append("admin")
