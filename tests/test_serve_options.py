"""``devicegate serve`` options of the first hour: ``--rule``, endpoint paths in the command
line's own words, and the banner in each mode. In process: uvicorn's ``run`` is a recorder, and
the app ``serve`` built is driven through ``httpx.ASGITransport``."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from cryptography.hazmat.primitives.asymmetric import ed25519

from devicegate import GateConfig, cli
from devicegate.gateway._app import ServeSettings, app_from_env
from tests.helpers import (
    Keys,
    bearer,
    client,
    fresh_keys,
    make_token,
    private_pem,
    public_pem,
    scrub_devicegate_env,
    write_secrets,
)
from tests.servers.process import HOST, answers, bound_port, child_env, devicegate_command, serve

DEVICE = "device-A"
SECRET = "forward-shared-secret-0123456789"


@dataclass
class FakeRun:
    calls: list[tuple[Any, dict[str, Any]]] = field(default_factory=list)
    environ: dict[str, str] = field(default_factory=dict)

    def __call__(self, app: Any, **options: Any) -> None:
        self.calls.append((app, options))
        self.environ = dict(os.environ)

    @property
    def app(self) -> Any:
        ((app, _),) = self.calls
        return app


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    scrub_devicegate_env(monkeypatch)
    monkeypatch.chdir(tmp_path)
    yield
    for name in [name for name in os.environ if name.startswith("DEVICEGATE_")]:
        del os.environ[name]  # what serve --workers exported


@pytest.fixture
def fake_run(monkeypatch: pytest.MonkeyPatch) -> FakeRun:
    recorder = FakeRun()
    monkeypatch.setattr(uvicorn, "run", recorder)
    return recorder


@pytest.fixture
def secrets_file(tmp_path: Path, keys: Keys) -> Path:
    return write_secrets(tmp_path / "secrets.json", keys)


@pytest.fixture
def port() -> Iterator[int]:
    with bound_port(reuse_address=True) as number:
        yield number


def one_line(text: str) -> str:
    assert "Traceback" not in text
    (line,) = text.strip().splitlines()
    return line


# -- --rule --------------------------------------------------------------------------------------

RULES = ["/admin/*=api_key", "/mobile/*=mobile_api_key,device_token"]

# A path, the credential sent, and whether the rules above (and --public /open/*) admit it.
DECISIONS = [
    ("/admin/users", "api_key", True),
    ("/admin/users", "mobile_api_key", False),
    ("/admin", "device_token", False),
    ("/mobile/feed", "device_token", True),
    ("/mobile/feed", "mobile_api_key", True),
    ("/mobile/feed", "api_key", False),
    ("/elsewhere", "mobile_api_key", True),  # no rule: every kind
    ("/open/docs", "none", True),  # public first
]


def credential(keys: Keys, kind: str) -> dict[str, str]:
    return {
        "api_key": {"x-api-key": keys.api_key},
        "mobile_api_key": {"authorization": keys.mobile_api_key},
        "device_token": bearer(make_token(keys.jwt_secret, instance_id=DEVICE), DEVICE),
        "none": {},
    }[kind]


@pytest.mark.parametrize(
    "given",
    [
        pytest.param("flags", id="flags"),
        pytest.param("environment", id="environment"),
        pytest.param("workers", id="workers"),  # each worker reads them back from its env
    ],
)
async def test_rules_decide_in_the_gate_and_at_forward_auth(
    secrets_file: Path,
    keys: Keys,
    fake_run: FakeRun,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    port: int,
    given: str,
) -> None:
    monkeypatch.setenv("FORWARD_SECRET", SECRET)
    argv = ["serve", "--port", str(port), "--public", "/open/*", "--forward-auth-path"]
    argv += ["--forward-auth-secret-env", "FORWARD_SECRET"]
    if given == "environment":
        monkeypatch.setenv("DEVICEGATE_RULES", " ; ".join(RULES) + ";")
    else:
        argv += [arg for rule in RULES for arg in ("--rule", rule)]
    if given == "workers":
        argv += ["--workers", "2"]
    assert cli.main(argv) == 0
    assert f"  rules (first match wins): {', '.join(RULES)}\n" in capsys.readouterr().err
    app = app_from_env() if given == "workers" else fake_run.app
    async with client(app) as http:
        for path, kind, admitted in DECISIONS:
            direct = await http.get(path, headers=credential(keys, kind))
            asked = await http.get(
                "/_devicegate/auth",
                headers={
                    "x-original-uri": path,
                    "x-devicegate-forward-secret": SECRET,
                    **credential(keys, kind),
                },
            )
            # The demo answers 404 to paths it does not serve: admitted all the same.
            assert (direct.status_code in (200, 404)) is admitted, (path, kind, direct.text)
            assert (asked.status_code == 204) is admitted, (path, kind, asked.text)


async def test_a_dpop_rule_refuses_bearer_tokens_on_its_paths(
    secrets_file: Path,
    keys: Keys,
    fake_run: FakeRun,
    port: int,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # 'dpop' names device tokens that come with a proof; the path keeps the other kinds named.
    argv = ["serve", "--port", str(port), "--secrets", str(secrets_file), "--dpop-nonce"]
    argv += ["--public-url", "https://api.example.com", "--rule", "/pay/*=api_key,dpop"]
    assert cli.main(argv) == 0
    banner = capsys.readouterr().err
    assert "  DPoP: proofs must name https://api.example.com/..., with server nonces\n" in banner
    token = credential(keys, "device_token")
    async with client(fake_run.app) as http:
        bearer_on_pay = await http.get("/pay/1", headers=token)
        key_on_pay = await http.get("/pay/1", headers=credential(keys, "api_key"))
        bearer_elsewhere = await http.get("/whoami", headers=token)
    assert bearer_on_pay.status_code == 401
    assert bearer_on_pay.headers["www-authenticate"].startswith('DPoP realm="devicegate"')
    assert key_on_pay.status_code in (200, 404)
    assert bearer_elsewhere.status_code == 200


def test_rules_travel_to_the_workers_and_back() -> None:
    settings = ServeSettings(rules=tuple(RULES))
    assert ServeSettings.from_env(settings.to_env()).rules == tuple(RULES)


# -- refused in the user's words -----------------------------------------------------------------

KINDS = "api_key, mobile_api_key, device_token, dpop"

IN_THE_CLEAR = (
    "must be an https:// URL (or http:// on 127.0.0.1, ::1 or localhost): keys fetched in the "
    "clear could be swapped by anyone on the path"
)

# Arguments and variables refused before anything starts, and the one line that says why: named
# after the flag or the variable the user wrote, and with "none", never Python's None.
REFUSED = [
    pytest.param(
        ["--token-path", "gen-jwt"],
        {},
        "--token-path: must be an absolute path such as /gen-jwt, or none to turn it off; "
        "got 'gen-jwt'",
        id="token-path-relative",
    ),
    pytest.param(
        [],
        {"DEVICEGATE_TOKEN_PATH": "/a/../b"},
        "DEVICEGATE_TOKEN_PATH: must be an absolute path such as /gen-jwt, or none to turn it "
        "off; got '/a/../b'",
        id="token-path-variable-with-dot-segments",
    ),
    pytest.param(
        ["--revoke-path", "/x/*"],
        {},
        "--revoke-path: must be an absolute path such as /revoke, or none to turn it off; "
        "got '/x/*'",
        id="revoke-path-wildcard",
    ),
    pytest.param(
        ["--forward-auth-path", "auth"],
        {},
        "--forward-auth-path: must be an absolute path such as /_devicegate/auth; got 'auth'",
        id="forward-auth-path-relative",
    ),
    pytest.param(
        ["--token-path", "/health"],
        {},
        "--token-path: '/health' is already served; choose another",
        id="token-path-is-health",
    ),
    pytest.param(
        ["--revoke-path", "/gen-jwt/"],
        {},
        "--revoke-path: '/gen-jwt/' is already served; choose another",
        id="revoke-path-is-the-token-path",
    ),
    pytest.param(
        ["--rule", "/admin"],
        {},
        f"--rule: '/admin': expected PATH=KINDS, such as '/admin/*=api_key' (kinds: {KINDS})",
        id="rule-without-kinds",
    ),
    pytest.param(
        ["--rule", "/admin="],
        {},
        f"--rule: '/admin=': expected PATH=KINDS, such as '/admin/*=api_key' (kinds: {KINDS})",
        id="rule-with-empty-kinds",
    ),
    pytest.param(
        ["--rule", "/admin=api_key,,device_token"],
        {},
        "--rule: '/admin=api_key,,device_token': expected PATH=KINDS, such as "
        f"'/admin/*=api_key' (kinds: {KINDS})",
        id="rule-with-an-empty-kind",
    ),
    pytest.param(
        ["--rule", "/admin/*=apikey"],
        {},
        f"--rule: '/admin/*=apikey': unknown kind 'apikey'; the kinds are {KINDS}",
        id="rule-with-an-unknown-kind",
    ),
    pytest.param(
        ["--rule", "admin=api_key"],
        {},
        "--rule: 'admin=api_key': must start with '/', got 'admin'",
        id="rule-relative",
    ),
    pytest.param(
        ["--rule", "/a/*/b=api_key"],
        {},
        "--rule: '/a/*/b=api_key': '*' is allowed only as a final '/*' segment",
        id="rule-inner-wildcard",
    ),
    pytest.param(
        ["--upstream-connections", "1"],
        {},
        "--upstream-connections: must be an integer from 2 to 100000, got 1",
        id="upstream-connections-too-few",
    ),
    pytest.param(
        ["--buffer-bytes", " "],
        {"DEVICEGATE_BUFFER_BYTES": "1024"},
        "--buffer-bytes: needs a value",
        id="buffer-bytes-blank",
    ),
    pytest.param(
        ["--client-timeout", "soon"],
        {},
        "--client-timeout: must be a number of seconds, such as 30 or 2.5",
        id="client-timeout-not-a-number",
    ),
    pytest.param(
        [],
        {"DEVICEGATE_MIN_CLIENT_RATE": "-5"},
        "DEVICEGATE_MIN_CLIENT_RATE: must be an integer from 0 to 1073741824, got -5",
        id="min-client-rate-variable",
    ),
    pytest.param(
        ["--rule", "/pay/*=device_token,dpop"],
        {},
        "--rule: '/pay/*=device_token,dpop': name device_token or dpop, not both (dpop is "
        "device tokens with a proof)",
        id="rule-with-device-token-and-dpop",
    ),
    pytest.param(
        [],
        {"DEVICEGATE_RULES": "/x=api_key;/y"},
        f"DEVICEGATE_RULES: '/y': expected PATH=KINDS, such as '/admin/*=api_key' (kinds: {KINDS})",
        id="rules-variable",
    ),
    pytest.param(
        ["--public", "/docs/*", "--rule", "/docs/admin/*=api_key"],
        {},
        "--rule: '/docs/admin/*' never applies: the public path '/docs/*' covers it",
        id="rule-under-a-public-prefix",
    ),
    pytest.param(
        ["--jwks-url", "http://issuer.example/jwks.json"],
        {},
        f"--jwks-url: {IN_THE_CLEAR}",
        id="jwks-url-in-the-clear",
    ),
    pytest.param(
        [],
        {"DEVICEGATE_JWKS_URL": "ftp://issuer.example/jwks.json"},
        f"DEVICEGATE_JWKS_URL: {IN_THE_CLEAR}",
        id="jwks-url-variable",
    ),
    pytest.param(
        ["--public-url", "api.example.com"],
        {},
        "--public-url: must be the http(s) URL clients reach this server at, such as "
        "https://api.example.com, without query, fragment or credentials",
        id="public-url-flag",
    ),
    pytest.param(
        ["--mint-limit-per-device", "lots"],
        {},
        "--mint-limit-per-device: must be one limit such as '10/minute' or '600/hour', got 'lots'",
        id="mint-limit-flag",
    ),
    pytest.param(
        [],
        {"DEVICEGATE_FAILURE_LIMIT_PER_ADDRESS": "1/second;9/minute"},
        "DEVICEGATE_FAILURE_LIMIT_PER_ADDRESS: must be one limit such as '10/minute' or "
        "'600/hour', got '1/second;9/minute'",
        id="failure-limit-variable",
    ),
    pytest.param(
        ["--rule", "/health=api_key"],
        {},
        "--rule: '/health' never applies: the public path '/health' covers it",
        id="rule-on-health",
    ),
]


@pytest.mark.parametrize(("argv", "environ", "line"), REFUSED)
def test_refused_in_the_users_words(
    secrets_file: Path,
    fake_run: FakeRun,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    environ: dict[str, str],
    line: str,
) -> None:
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    assert cli.main(["serve", *argv]) == 2
    captured = capsys.readouterr()
    assert one_line(captured.err) == f"devicegate: invalid configuration: {line}"
    assert "None" not in captured.err
    assert fake_run.calls == []


async def test_a_narrower_public_path_leaves_the_rest_of_a_rule(
    secrets_file: Path, keys: Keys, fake_run: FakeRun, port: int
) -> None:
    # /docs is public, and below it the rule holds: nothing is shadowed, so nothing is refused.
    argv = ["serve", "--port", str(port), "--public", "/docs", "--rule", "/docs/*=api_key"]
    assert cli.main(argv) == 0
    async with client(fake_run.app) as http:
        open_page = await http.get("/docs")
        below = await http.get("/docs/x", headers={"authorization": keys.mobile_api_key})
    assert open_page.status_code == 404  # admitted without a credential; the demo has no /docs
    assert below.status_code == 403


# -- the banner says what runs -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "headline", "asks_forward_auth"),
    [
        (ServeSettings(), "serving the demo app on http://127.0.0.1:8000", False),
        (
            ServeSettings(forward_auth_path="/_devicegate/auth"),
            "answering forward-auth requests, and serving the demo app, on http://127.0.0.1:8000",
            True,
        ),
        (
            ServeSettings(upstream="http://10.0.0.5:9000", forward_auth_path="/auth"),
            "forwarding to http://10.0.0.5:9000 on http://127.0.0.1:8000",
            True,
        ),
    ],
    ids=["demo", "forward-auth", "gateway-and-forward-auth"],
)
def test_banner_says_what_each_mode_serves(
    keys: Keys, settings: ServeSettings, headline: str, asks_forward_auth: bool
) -> None:
    text = cli.serve_banner(settings, keys.config(), {}, host=HOST, port=8000, workers=1)
    assert text.splitlines()[0].endswith(f": {headline} (1 worker)")
    asks = [line for line in text.splitlines() if "X-Original-URI" in line]
    assert len(asks) == int(asks_forward_auth)
    if asks_forward_auth:
        assert asks[0].endswith(f" http://127.0.0.1:8000{settings.forward_auth_path}")


@pytest.mark.parametrize(
    ("signing", "endpoint_on"),
    [
        ({"jwt_secret": "from-keys"}, True),
        ({"jwt_private_key": "EdDSA"}, True),  # a key pair alone signs: the endpoint is on
        ({"jwt_public_keys": "EdDSA"}, False),  # verifies only: nothing can mint
    ],
    ids=["secret", "private-key", "public-key-only"],
)
def test_banner_says_the_token_endpoint_is_on_when_a_key_can_sign(
    keys: Keys, signing: dict[str, str], endpoint_on: bool
) -> None:
    ((field, value),) = signing.items()
    if value == "EdDSA":
        private = ed25519.Ed25519PrivateKey.generate()
        value = private_pem(private) if field == "jwt_private_key" else public_pem(private)
    else:
        value = keys.jwt_secret
    options: dict[str, Any] = {field: value}
    config = GateConfig(api_keys=keys.api_key, **options)
    text = cli.serve_banner(ServeSettings(), config, {}, host=HOST, port=8000, workers=1)
    assert ("  token endpoint: POST http://127.0.0.1:8000/gen-jwt" in text) is endpoint_on
    assert ("  token endpoint: off (needs" in text) is not endpoint_on


def test_banner_names_the_forward_auth_secret_variable_never_its_value(keys: Keys) -> None:
    settings = ServeSettings(forward_auth_path="/auth", forward_auth_secret_env="PROXY_SECRET")
    environ = {"PROXY_SECRET": SECRET}
    text = cli.serve_banner(settings, keys.config(), environ, host=HOST, port=8000, workers=1)
    assert '-H "X-Devicegate-Forward-Secret: ${PROXY_SECRET}" ' in text
    assert "with the secret from $PROXY_SECRET in your shell" in text
    assert SECRET not in text


@pytest.mark.integration
def test_real_forward_auth_banner_lines_run_as_pasted(tmp_path: Path, secrets_file: Path) -> None:
    environ = {"PROXY_SECRET": SECRET}
    command = devicegate_command("--forward-auth-path", "--forward-auth-secret-env", "PROXY_SECRET")
    with serve(
        command, tmp_path / "serve.log", cwd=tmp_path, env=environ, ready=answers("/health")
    ) as server:
        lines = [
            line.removeprefix("  ")
            for line in server.output().splitlines()
            if line.startswith(("  API_KEY=", "  TOKEN=", "  curl -sS"))
        ]
        assert len(lines) == 3
        result = subprocess.run(  # noqa: S603 - the lines serve printed, as a user pastes them
            ["bash", "-c", "set -euo pipefail\n" + "\n".join(lines)],  # noqa: S607
            capture_output=True,
            text=True,
            timeout=60,
            env=child_env(environ),
            check=True,
        )
    headers = result.stdout.lower()
    assert headers.startswith("http/1.1 204")
    assert "x-devicegate-kind: device_token" in headers
    assert "x-devicegate-instance-id: demo-device" in headers


# -- init --forward-auth-secret ------------------------------------------------------------------


async def test_init_writes_a_forward_auth_secret_that_serve_takes(
    tmp_path: Path,
    fake_run: FakeRun,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    port: int,
) -> None:
    assert cli.main(["init", "--forward-auth-secret"]) == 0
    secrets_path, env_file = tmp_path / "secrets.json", tmp_path / "forward-secret.env"
    printed = capsys.readouterr().out
    assert printed == f"{secrets_path}\n{env_file}\n"  # the paths, never the secret
    assert {path.stat().st_mode & 0o777 for path in (secrets_path, env_file)} == {0o600}
    name, _, secret = env_file.read_text().rstrip("\n").partition("=")
    assert name == "DEVICEGATE_FORWARD_SECRET"
    assert len(secret) >= 43
    assert secret.replace("-", "").replace("_", "").isalnum()  # no quoting needed anywhere

    monkeypatch.setenv(name, secret)  # what EnvironmentFile= or `set -a; . FILE` does
    argv = ["serve", "--port", str(port), "--forward-auth-path"]
    assert cli.main([*argv, "--forward-auth-secret-env", name]) == 0
    keys = json.loads(secrets_path.read_text())
    async with client(fake_run.app) as http:
        asked = {"x-original-uri": "/x", "x-api-key": keys["api_key"]}
        admitted = await http.get(
            "/_devicegate/auth", headers={**asked, "x-devicegate-forward-secret": secret}
        )
        without = await http.get("/_devicegate/auth", headers=asked)
    assert (admitted.status_code, without.status_code) == (204, 403)
    assert secret not in capsys.readouterr().err


@pytest.mark.parametrize("existing", ["secrets.json", "proxy.env"])
def test_init_writes_both_files_or_neither(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], existing: str
) -> None:
    (tmp_path / existing).write_text("kept")
    assert cli.main(["init", "--forward-auth-secret", "proxy.env"]) == 1
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"devicegate: {tmp_path / existing} already exists; refusing")
    assert sorted(path.name for path in tmp_path.iterdir()) == [existing]
    assert (tmp_path / existing).read_text() == "kept"


def test_init_refuses_one_file_for_both(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["init", "--forward-auth-secret", "secrets.json"]) == 2
    assert one_line(capsys.readouterr().err) == (
        "devicegate: --forward-auth-secret: must be another file than --path"
    )


async def test_a_rule_on_health_applies_at_forward_auth(
    secrets_file: Path,
    keys: Keys,
    fake_run: FakeRun,
    monkeypatch: pytest.MonkeyPatch,
    port: int,
) -> None:
    # /health is the gateway's own and public there; the API's /health, which the proxy asks
    # about, is the operator's to rule on.
    argv = ["serve", "--port", str(port), "--forward-auth-path", "--rule", "/health=api_key"]
    assert cli.main(argv) == 0
    async with client(fake_run.app) as http:
        gateway_health = await http.get("/health")
        asked = await http.get(
            "/_devicegate/auth",
            headers={"x-original-uri": "/health", "authorization": keys.mobile_api_key},
        )
    assert gateway_health.status_code == 200
    assert asked.status_code == 403


# -- rate limits ---------------------------------------------------------------------------------


def rate_limit_line(err: str) -> str:
    (line,) = [line.strip() for line in err.splitlines() if "rate limits:" in line]
    return line


async def test_serve_limits_minting_and_failures_by_default(
    secrets_file: Path,
    keys: Keys,
    fake_run: FakeRun,
    capsys: pytest.CaptureFixture[str],
    port: int,
) -> None:
    assert cli.main(["serve", "--port", str(port)]) == 0
    assert rate_limit_line(capsys.readouterr().err) == (
        "rate limits: minting 6000/minute per server key, 10/minute per device, 100/minute "
        "failed authentications per client address (counted in memory; 429 with Retry-After)"
    )
    async with client(fake_run.app) as http:
        answers = [
            await http.post(
                "/gen-jwt", headers={"x-api-key": keys.api_key}, json={"instance_id": DEVICE}
            )
            for _ in range(11)
        ]
    assert [answer.status_code for answer in answers] == [200] * 10 + [429]
    assert int(answers[-1].headers["retry-after"]) >= 1


@pytest.mark.parametrize("given", ["flags", "environment", "workers"])
async def test_serve_rate_limit_options(
    secrets_file: Path,
    keys: Keys,
    fake_run: FakeRun,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    port: int,
    given: str,
) -> None:
    argv = ["serve", "--port", str(port)]
    settings = {"mint-limit-per-device": "2/minute", "failure-limit-per-address": "none"}
    if given == "environment":
        for name, value in settings.items():
            monkeypatch.setenv("DEVICEGATE_" + name.upper().replace("-", "_"), value)
    else:
        argv += [arg for name, value in settings.items() for arg in (f"--{name}", value)]
    if given == "workers":
        argv += ["--workers", "2"]
    assert cli.main(argv) == 0
    line = rate_limit_line(capsys.readouterr().err)
    assert "10/minute" not in line
    assert "failed authentications" not in line
    assert "2/minute per device" in line
    if given == "workers":
        assert "counted in memory by each of the 2 workers (--redis for one limit)" in line
    app = app_from_env() if given == "workers" else fake_run.app
    async with client(app) as http:
        mints = [
            (
                await http.post(
                    "/gen-jwt", headers={"x-api-key": keys.api_key}, json={"instance_id": DEVICE}
                )
            ).status_code
            for _ in range(3)
        ]
        wrong = {"x-api-key": fresh_keys().api_key}
        failures = [(await http.get("/whoami", headers=wrong)).status_code for _ in range(120)]
    assert mints == [200, 200, 429]
    assert set(failures) == {401}  # no limit on failures: never 429
