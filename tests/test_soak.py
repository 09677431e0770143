"""The soak and fuzz campaign of ``benchmarks/soak.py`` in its short form, with real servers:
20,000 hostile requests judged by the reference model, 5,000 legitimate ones over two workers
once their token caches are full, and 1,000 through the gateway and through nginx to an
upstream that misbehaves. The full campaign is ``python -m benchmarks.soak``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from benchmarks import soak

from tests.helpers import fresh_keys

pytestmark = pytest.mark.integration


def test_the_short_campaign_holds_every_guarantee(starts_a_process: None, tmp_path: Path) -> None:
    figures = tmp_path / "soak.json"
    assert soak.main(["--short", "--json", str(figures)]) == 0
    results = json.loads(figures.read_text())
    hostile, legit = results["hostile"], results["legit"]
    assert hostile["requests"] >= 20_000
    assert hostile["server_errors"] == 0
    assert hostile["admitted_but_model_refuses"] == 0
    # Every kind of answer came back: the generator reaches past devicegate and is refused
    # for every reason, and websocket handshakes are both accepted and refused.
    assert {101, 200, 400, 401, 403} <= {int(status) for status in hostile["statuses"]}
    assert legit["errors"] == 0
    assert legit["requests"] >= 5_000
    assert legit["workers"] == 2
    assert legit["memory_flat"]
    for name in ("gateway", "nginx"):
        proxied = results[name]
        assert proxied["status_500"] == 0
        assert proxied["credentials_forwarded"] == 0
        # The upstream misbehaved in every way, and devicegate answered each: 502 and 504
        # from the gateway, 502 from nginx.
        assert set(proxied["upstream_behaviours"]) >= {"ok", "slow", "garbage", "reset"}
        assert 502 in {int(status) for status in proxied["statuses"]}


def test_the_model_refuses_what_security_md_refuses() -> None:
    # The reference model is the soak's yardstick: it must itself refuse the attacks.
    keys = fresh_keys()
    model = soak.Model(keys, revoked_before=0.0)
    minter = soak.Minter(keys)
    token = minter.token("phone-1")

    def admits(target: str, *headers: tuple[bytes, bytes], method: str = "GET") -> bool:
        return model.admits(soak.Request(method, target, list(headers)))

    device = (b"x-instance-id", b"phone-1")
    assert admits("/whoami", (b"authorization", b"Bearer " + token.encode()), device)
    assert admits("/health")
    assert admits("/admin/x", (b"x-api-key", keys.api_key.encode()))
    assert not admits("/admin/x", (b"authorization", keys.mobile_api_key.encode()))
    assert not admits("/whoami", (b"authorization", b"Bearer " + token.encode()))
    assert not admits("/a/../whoami", (b"x-api-key", keys.api_key.encode()))
    assert not admits("/whoami", (b"x-api-key", keys.api_key.encode()), (b"authorization", b"x"))
    revoked = minter.token("phone-1", jti="rv-3")
    assert not admits("/whoami", (b"authorization", b"Bearer " + revoked.encode()), device)
    none = soak.hand_made({"alg": "none"}, {"instance_id": "phone-1", "exp": 2**31}, None)
    assert not admits("/whoami", (b"authorization", b"Bearer " + none.encode()), device)
    assert not admits("/gen-jwt", (b"x-api-key", keys.api_key.encode()), method="GET")
