"""The README's Python examples, run as written and held to what the README says about them.

Every ```python block of README.md is extracted and executed. The quick starts (Starlette,
FastAPI, Quart) run in a temporary directory holding a ``secrets.json`` with fresh keys, with the
same keys in ``DEVICEGATE_*`` for ``GateConfig.from_env()``; the ``app`` each one builds is then
driven through ``httpx.ASGITransport`` against the README's promise: "Every example below
protects all routes, makes ``/health`` public and serves ``POST /gen-jwt``". The other blocks
are continuations (they use ``app`` and ``config`` from the reader's own code): they run with
those names provided, and what they build is checked against the text around them.

A failure here means the README is wrong (or devicegate no longer does what it says): fix the
README, not this file. Quart calls asyncio directly, so its quick start runs on asyncio only.
"""

from __future__ import annotations

import ast
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import prometheus_client
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from starlette.types import ASGIApp

import devicegate
from devicegate import (
    CredentialKind,
    DeviceAuthMiddleware,
    GateConfig,
    IssuedToken,
    TokenIssuer,
    TokenVerifier,
)
from tests.helpers import Keys, RecordingApp, client, fresh_keys
from tests.test_fastapi import swagger_headers

README = Path(__file__).resolve().parent.parent / "README.md"
DEVICE = "device-123"  # the device id the README's own examples use
REALM_ONLY = 'Bearer realm="devicegate"'

pytestmark = pytest.mark.anyio


@dataclass(frozen=True)
class Block:
    """One ```python block of the README, under the nearest heading above it."""

    heading: str
    line: int  # 1-based line of the first line of code
    code: str


def python_blocks(text: str) -> list[Block]:
    blocks: list[Block] = []
    heading = ""
    fence: str | None = None  # the info string of the open fence, if any
    start = 0
    lines: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if fence is None:
            if line.startswith("```"):
                fence, start, lines = line[3:].strip(), number + 1, []
            elif line.startswith("#"):
                heading = line.lstrip("#").strip()
        elif line.startswith("```"):
            if fence == "python":
                blocks.append(Block(heading, start, "\n".join(lines) + "\n"))
            fence = None
        else:
            lines.append(line)
    assert fence is None, "README.md has an unclosed code fence"
    return blocks


BLOCKS = {block.heading: block for block in python_blocks(README.read_text(encoding="utf-8"))}


def run_block(block: Block, namespace: dict[str, Any]) -> Any:
    """Execute ``block`` in ``namespace``; return the value of a final bare expression, if any."""
    tree = ast.parse(block.code, filename=f"README.md:{block.line}")
    ast.increment_lineno(tree, block.line - 1)  # tracebacks point at the README's own lines
    last: ast.expr | None = None
    final = tree.body[-1] if tree.body else None
    if isinstance(final, ast.Expr):
        tree.body.pop()
        last = final.value
    # The README's code is the code under test here; it is this repository's own text.
    exec(compile(tree, str(README), "exec"), namespace)  # noqa: S102
    if last is None:
        return None
    return eval(compile(ast.Expression(last), str(README), "eval"), namespace)  # noqa: S307


def test_every_python_block_is_covered_here() -> None:
    # A new example in the README needs a test below; a renamed heading needs this list changed.
    # "Revoking across instances: Redis" and "Rate limits" need a redis-server:
    # tests/test_redis.py and tests/test_ratelimit.py run them.
    assert sorted(BLOCKS) == sorted(
        [
            *QUICK_STARTS,
            "Rules",
            FASTAPI_SECTION,
            "Minting tokens",
            "Revoking",
            "Revoking across instances: Redis",
            "Rate limits",
            "Proof of possession: DPoP",  # tests/test_dpop.py runs it
            "Metrics",
        ]
    )
    assert len(python_blocks(README.read_text(encoding="utf-8"))) == len(BLOCKS)


# --- quick starts --------------------------------------------------------------------------


@dataclass(frozen=True)
class QuickStart:
    """What one quick start serves: its protected route and what that answers a device."""

    route: str
    device_answer: dict[str, Any]


QUICK_STARTS = {
    "Starlette": QuickStart("/profile", {"device": DEVICE}),
    "FastAPI": QuickStart("/me", {"kind": "device_token", "device": DEVICE}),
    "Quart": QuickStart("/me", {"kind": "device_token", "device": DEVICE}),
}
ASYNCIO_ONLY = frozenset({"Quart"})

every_quick_start = pytest.mark.parametrize(
    ("heading", "anyio_backend"),
    [
        pytest.param(heading, backend, id=f"{heading}-{backend}")
        for heading in QUICK_STARTS
        for backend in ("asyncio", "trio")
        if backend == "asyncio" or heading not in ASYNCIO_ONLY
    ],
)


@pytest.fixture
def keys_on_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Keys:
    """A fresh ``secrets.json`` in the working directory and the same keys in the environment."""
    keys = fresh_keys()
    document = {
        "api_key": keys.api_key,
        "mobile_api_key": keys.mobile_api_key,
        "jwt_secret": keys.jwt_secret,
        "jwt_expire_seconds": 300,
    }
    (tmp_path / "secrets.json").write_text(json.dumps(document), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith("DEVICEGATE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("DEVICEGATE_API_KEYS", keys.api_key)
    monkeypatch.setenv("DEVICEGATE_MOBILE_API_KEYS", keys.mobile_api_key)
    monkeypatch.setenv("DEVICEGATE_JWT_SECRET", keys.jwt_secret)
    return keys


def quick_start_app(heading: str) -> ASGIApp:
    block = BLOCKS[heading]
    namespace: dict[str, Any] = {"__name__": f"readme_{heading.lower()}"}
    run_block(block, namespace)
    assert "app" in namespace, f"README {heading} quick start (line {block.line}) defines no app"
    return cast(ASGIApp, namespace["app"])


def device_headers(keys: Keys, token: str | None = None) -> dict[str, str]:
    if token is None:
        token = TokenIssuer(keys.config()).issue(instance_id=DEVICE).access_token
    return {"authorization": f"Bearer {token}", "x-instance-id": DEVICE}


@every_quick_start
async def test_quick_start_makes_health_public(
    heading: str, anyio_backend: str, keys_on_disk: Keys
) -> None:
    async with client(quick_start_app(heading)) as http:
        response = await http.get("/health")
        slash = await http.get("/health/")
    assert response.status_code == 200, (
        f"README {heading} quick start (line {BLOCKS[heading].line}): GET /health without a "
        f"credential answered {response.status_code} "
        f"(WWW-Authenticate: {response.headers.get('www-authenticate')!r}), but the README "
        "says every quick start makes /health public"
    )
    assert response.json() == {"status": "ok"}
    # A rule covers both spellings; whatever the router answers, devicegate let it through.
    assert "www-authenticate" not in slash.headers


@every_quick_start
async def test_quick_start_protects_every_route(
    heading: str, anyio_backend: str, keys_on_disk: Keys
) -> None:
    spec = QUICK_STARTS[heading]
    async with client(quick_start_app(heading)) as http:
        for path in (spec.route, "/no-such-route", "/health/x", "/"):
            response = await http.get(path)
            assert response.status_code == 401, (heading, path, response.text)
            assert response.headers["www-authenticate"] == REALM_ONLY
        wrong_key = await http.get(spec.route, headers={"x-api-key": "0" * 43})
        assert wrong_key.status_code == 401
        assert 'error="invalid_token"' in wrong_key.headers["www-authenticate"]
        other_device = await http.get(
            spec.route, headers={**device_headers(keys_on_disk), "x-instance-id": "device-999"}
        )
        assert other_device.status_code == 401


@every_quick_start
async def test_quick_start_answers_a_device_token(
    heading: str, anyio_backend: str, keys_on_disk: Keys
) -> None:
    spec = QUICK_STARTS[heading]
    async with client(quick_start_app(heading)) as http:
        response = await http.get(spec.route, headers=device_headers(keys_on_disk))
    assert response.status_code == 200, response.text
    assert response.json() == spec.device_answer


@every_quick_start
async def test_quick_start_serves_the_token_endpoint(
    heading: str, anyio_backend: str, keys_on_disk: Keys
) -> None:
    spec = QUICK_STARTS[heading]
    async with client(quick_start_app(heading)) as http:
        minted = await http.post(
            "/gen-jwt", headers={"x-api-key": keys_on_disk.api_key}, json={"instance_id": DEVICE}
        )
        assert minted.status_code == 200, minted.text
        assert minted.headers["cache-control"] == "no-store"
        body = minted.json()
        assert set(body) == {"access_token", "token_type", "expires_in", "instance_id"}
        assert (body["token_type"], body["expires_in"], body["instance_id"]) == (
            "Bearer",
            300,
            DEVICE,
        )
        response = await http.get(
            spec.route, headers=device_headers(keys_on_disk, body["access_token"])
        )
        assert response.status_code == 200, response.text
        assert response.json() == spec.device_answer

        # "a mobile key or a device token cannot mint new tokens"; only POST.
        by_device = await http.post("/gen-jwt", headers=device_headers(keys_on_disk), json={})
        assert by_device.status_code == 403
        by_get = await http.get("/gen-jwt", headers={"x-api-key": keys_on_disk.api_key})
        assert by_get.status_code == 405


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_starlette_quick_start_requires_works_as_is(
    anyio_backend: str, keys_on_disk: Keys
) -> None:
    # "so Starlette's @requires("device_token") works as is": another kind is let in by
    # devicegate (no rule restricts /profile) and refused by the decorator.
    async with client(quick_start_app("Starlette")) as http:
        response = await http.get("/profile", headers={"x-api-key": keys_on_disk.api_key})
    assert response.status_code == 403
    assert "www-authenticate" not in response.headers  # Starlette's refusal, not devicegate's


@pytest.mark.parametrize(
    ("heading", "anyio_backend"),
    [
        pytest.param("FastAPI", "asyncio", id="FastAPI-asyncio"),
        pytest.param("FastAPI", "trio", id="FastAPI-trio"),
        pytest.param("Quart", "asyncio", id="Quart-asyncio"),
    ],
)
async def test_quick_start_reports_the_key_kinds(
    heading: str, anyio_backend: str, keys_on_disk: Keys
) -> None:
    route = QUICK_STARTS[heading].route
    async with client(quick_start_app(heading)) as http:
        server = await http.get(route, headers={"x-api-key": keys_on_disk.api_key})
        mobile = await http.get(route, headers={"authorization": keys_on_disk.mobile_api_key})
    assert server.json() == {"kind": "api_key", "device": None}
    assert mobile.json() == {"kind": "mobile_api_key", "device": None}


# --- FastAPI dependencies and /docs ----------------------------------------------------------

FASTAPI_SECTION = "FastAPI dependencies and /docs"


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_fastapi_section_example(anyio_backend: str, keys_on_disk: Keys) -> None:
    app = quick_start_app(FASTAPI_SECTION)
    api_key = {"x-api-key": keys_on_disk.api_key}
    async with client(app) as http:
        # "make its page, its document and its OAuth2 redirect page public; everything else
        # stays protected (/redoc too)".
        for path in ("/docs", "/docs/oauth2-redirect", "/openapi.json"):
            assert (await http.get(path)).status_code == 200, path
        for path in ("/redoc", "/me", "/profile", "/reports", "/"):
            response = await http.get(path)
            assert response.status_code == 401, path
            assert response.headers["www-authenticate"] == REALM_ONLY
        document = (await http.get("/openapi.json")).json()

        # The four schemes, each route listing those of the kinds it accepts.
        assert set(document["components"]["securitySchemes"]) == {
            "api_key",
            "mobile_api_key",
            "device_token",
            "instance_id",
        }
        security = {path: document["paths"][path]["get"]["security"] for path in document["paths"]}
        every: list[dict[str, list[str]]] = [
            {"api_key": []},
            {"mobile_api_key": []},
            {"device_token": []},
            {"instance_id": []},
        ]
        assert security == {
            "/me": every,
            "/profile": [{"device_token": []}, {"instance_id": []}],
            "/reports": [{"api_key": []}],
            "/welcome": every,
        }

        # What Swagger UI sends once a device token and its instance_id are authorized.
        token = TokenIssuer(keys_on_disk.config()).issue(instance_id=DEVICE).access_token
        device = swagger_headers(
            document, "/profile", {"device_token": token, "instance_id": DEVICE}
        )
        profile = await http.get("/profile", headers=device)
        assert profile.status_code == 200, profile.text
        assert profile.json() == {"device": DEVICE, "user": None}

        # "a key is refused here with 403", "so is a device token here": in devicegate's shape.
        for path, headers in (("/profile", api_key), ("/reports", device)):
            refused = await http.get(path, headers=headers)
            assert refused.status_code == 403, path
            assert refused.json() == {
                "error": "insufficient_scope",
                "error_description": "This credential is not accepted for this resource.",
            }
            assert 'error="insufficient_scope"' in refused.headers["www-authenticate"]
        reports = await http.get("/reports", headers=api_key)
        assert reports.json() == {"key": None}

        me = await http.get("/me", headers={"authorization": keys_on_disk.mobile_api_key})
        assert me.json() == {"kind": "mobile_api_key", "device": None}
        stranger = await http.get("/welcome")
        assert stranger.json() == {"hello": "stranger"}
        welcomed = await http.get("/welcome", headers=device)
        assert welcomed.json() == {"hello": DEVICE}


# --- the other blocks ----------------------------------------------------------------------


def devicegate_names() -> dict[str, Any]:
    """What a reader's module has imported by the time it reaches a continuation block."""
    return {name: getattr(devicegate, name) for name in devicegate.__all__}


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_rules_example(anyio_backend: str, keys: Keys) -> None:
    app = RecordingApp()
    config = keys.config()
    namespace = {**devicegate_names(), "app": app, "config": config}
    middleware = run_block(BLOCKS["Rules"], namespace)
    assert isinstance(middleware, DeviceAuthMiddleware)
    assert middleware.token_path == "/gen-jwt"

    api_key = {"x-api-key": keys.api_key}
    device = device_headers(keys)
    mobile = {"authorization": keys.mobile_api_key}
    expected = [
        ("/health", {}, 200),  # no credential needed
        ("/mobile/profile", device, 200),  # phones only
        ("/mobile", device, 200),
        ("/mobile/profile", api_key, 403),
        ("/mobile/profile", mobile, 403),
        ("/mobilex", mobile, 200),  # not below /mobile: no rule, every kind
        ("/admin/users", api_key, 200),  # servers only
        ("/admin/users", device, 403),
        ("/admin/", mobile, 403),
        ("/elsewhere", mobile, 200),  # no match: every configured kind
        ("/elsewhere", {}, 401),
    ]
    async with client(middleware) as http:
        for path, headers, status in expected:
            response = await http.get(path, headers=headers)
            assert response.status_code == status, (path, headers, response.text)
        minted = await http.post("/gen-jwt", headers=api_key, json={})
    assert minted.status_code == 200
    assert minted.json()["instance_id"] is None  # "{} ... mints a generic token"
    called = [scope["path"] for scope in app.calls]
    assert called == [path for path, _, status in expected if status == 200]


def test_minting_example(keys: Keys) -> None:
    config = keys.config()
    namespace: dict[str, Any] = {"config": config}
    value = run_block(BLOCKS["Minting tokens"], namespace)
    token = namespace["token"]
    assert isinstance(namespace["issuer"], TokenIssuer)
    assert isinstance(token, IssuedToken)
    assert value == (token.access_token, token.expires_in)
    assert token.expires_in == 60 < config.jwt_expire_seconds
    assert token.instance_id == DEVICE
    assert token.as_response() == {
        "access_token": token.access_token,
        "token_type": "Bearer",
        "expires_in": 60,
        "instance_id": DEVICE,
    }
    # "Tokens are HS256 JWTs with iat, exp, jti (128 random bits), instance_id when bound, sub,
    # application claims [...] when given".
    principal = TokenVerifier(config).verify(token.access_token, DEVICE)
    assert principal.kind is CredentialKind.DEVICE_TOKEN
    assert principal.instance_id == DEVICE
    assert principal.subject == "user-42"
    assert principal.claims["plan"] == "pro"
    assert principal.claims["exp"] - principal.claims["iat"] == 60
    assert {"iat", "exp", "jti", "instance_id", "sub"} <= set(principal.claims)


async def test_revoking_example(keys: Keys) -> None:
    config = keys.config()
    issuer = TokenIssuer(config)
    tokens = {
        "jti": issuer.issue(instance_id="device-9"),
        "device": issuer.issue(instance_id=DEVICE),
        "subject": issuer.issue(instance_id="device-8", subject="user-42"),
        "untouched": issuer.issue(instance_id="device-7"),
    }
    inner = RecordingApp()
    namespace: dict[str, Any] = {
        "app": inner,
        "config": config,
        "jti": tokens["jti"].claims["jti"],
        "cutoff": 1_000_000_000.0,  # long ago: the tokens above are newer
    }
    # The block awaits at top level, as in a notebook or an async function of the reader's.
    block = BLOCKS["Revoking"]
    tree = ast.parse(block.code, filename=f"README.md:{block.line}")
    ast.increment_lineno(tree, block.line - 1)
    code = compile(tree, str(README), "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    pending = eval(code, namespace)  # noqa: S307 - this repository's own README
    if pending is not None:
        await pending
    gate = namespace["app"]
    assert isinstance(gate, DeviceAuthMiddleware)
    assert gate.verifier.revocations is namespace["revocations"]
    assert gate.revoke_path == "/revoke"
    devices = {"jti": "device-9", "device": DEVICE, "subject": "device-8", "untouched": "device-7"}
    async with client(gate) as http:
        statuses = {
            name: (
                await http.get(
                    "/",
                    headers={
                        "authorization": f"Bearer {token.access_token}",
                        "x-instance-id": devices[name],
                    },
                )
            ).status_code
            for name, token in tokens.items()
        }
    assert statuses == {"jti": 401, "device": 401, "subject": 401, "untouched": 200}


def test_quick_start_configurations_load_as_the_readme_says(keys_on_disk: Keys) -> None:
    # The two loaders the quick starts use read the same keys from the file and the environment.
    from_file = GateConfig.from_secrets_file("secrets.json")
    from_env = GateConfig.from_env()
    for config in (from_file, from_env):
        assert config.api_keys == (keys_on_disk.api_key,)
        assert config.mobile_api_keys == (keys_on_disk.mobile_api_key,)
        assert config.jwt_secret == keys_on_disk.jwt_secret


async def test_metrics_example(keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    # The block registers with prometheus_client's global REGISTRY: here, with a fresh one.
    registry = CollectorRegistry()
    monkeypatch.setattr(prometheus_client, "REGISTRY", registry)
    inner = RecordingApp()
    namespace: dict[str, Any] = {"app": inner, "config": keys.config()}
    run_block(BLOCKS["Metrics"], namespace)
    gate = namespace["app"]
    assert isinstance(gate, DeviceAuthMiddleware)
    async with client(gate) as http:
        assert (await http.get("/", headers={"x-api-key": keys.api_key})).status_code == 200
    text = generate_latest(registry).decode()
    assert 'devicegate_requests_total{kind="api_key",outcome="admitted"} 1.0' in text
    assert "devicegate_token_cache_entries 0.0" in text
