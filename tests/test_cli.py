"""The ``devicegate`` command line.

Two layers: ``main([...])`` called in process (uvicorn's ``run`` replaced by a recorder) covers
every branch, and the real command run through ``sys.executable -m devicegate`` checks what a
user sees: exit statuses, one-line errors without tracebacks, file modes, and ``serve`` started
for real on 127.0.0.1, where the ``curl`` lines it prints are run to mint a token and call the
demo. Every server process is terminated at the end of its test (bounded waits, then a kill).
"""

from __future__ import annotations

import base64
import contextlib
import errno
import http.client
import importlib
import io
import json
import os
import re
import runpy
import shutil
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import pytest
import uvicorn
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

import devicegate
import devicegate.gateway._app
from devicegate import ConfigError, InvalidReason, TokenVerifier, cli
from devicegate._tokens import unverified_claims
from devicegate.gateway._app import ServeSettings, app_from_env
from devicegate.gateway._logging import log_config
from tests.helpers import (
    VENDOR_API_KEY,
    Keys,
    bearer,
    claims_at,
    client,
    fresh_keys,
    make_token,
    scrub_devicegate_env,
    write_json,
    write_secrets,
)
from tests.servers.process import (
    HOST,
    START_SECONDS,
    Server,
    alive,
    answers,
    bound_port,
    child_env,
    children,
    connection_owner,
    devicegate_command,
    listening_port,
    serve,
    sync_client,
)

DEVICE = "device-A"
OTHER_DEVICE = "device-B"
RUN_TIMEOUT = 60.0  # seconds for one short command
IO_TIMEOUT = 10.0  # seconds for one request
WILDCARD = "0.0.0.0"  # noqa: S104 - shown in banners, never bound by these tests


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    # Every test starts without DEVICEGATE_* variables, and ends without any that the command
    # itself exported into os.environ (``serve --workers`` does); monkeypatch then restores ours.
    scrub_devicegate_env(monkeypatch)
    monkeypatch.chdir(tmp_path)
    yield
    for name in [name for name in os.environ if name.startswith("DEVICEGATE_")]:
        del os.environ[name]


@pytest.fixture
def secrets_file(tmp_path: Path, keys: Keys) -> Path:
    return write_secrets(tmp_path / "secrets.json", keys)


@pytest.fixture
def port() -> Iterator[int]:
    """A port for in-process ``serve`` (uvicorn is a recorder there): held bound, so that no
    one else can take it, yet free to ``serve``'s own check."""
    with bound_port(reuse_address=True) as number:
        yield number


def one_line(text: str) -> str:
    """The single line of an error message; fails on tracebacks or several lines."""
    assert "Traceback" not in text
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


# -- in process: init ---------------------------------------------------------------------------


def test_init_writes_fresh_keys_with_mode_0600(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["init"]) == 0
    path = tmp_path / "secrets.json"
    assert capsys.readouterr().out == f"{path}\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    document = json.loads(path.read_text())
    assert set(document) == {"api_key", "mobile_api_key", "jwt_secret", "jwt_expire_seconds"}
    assert document["jwt_expire_seconds"] == 300
    values = [document["api_key"], document["mobile_api_key"], document["jwt_secret"]]
    assert len(set(values)) == 3
    assert all(len(base64.b64decode(value, validate=True)) == 32 for value in values)
    # The file is a valid configuration for devicegate itself.
    assert devicegate.GateConfig.from_secrets_file(path).api_keys == (document["api_key"],)


def test_init_twice_gives_different_keys(tmp_path: Path) -> None:
    assert cli.main(["init", "--path", "a.json"]) == 0
    assert cli.main(["init", "--path", "b.json"]) == 0
    assert (tmp_path / "a.json").read_text() != (tmp_path / "b.json").read_text()


def test_init_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "secrets.json"
    path.write_text("precious")
    assert cli.main(["init", "--path", str(path)]) == 1
    error = one_line(capsys.readouterr().err)
    assert error == (
        f"devicegate: {path} already exists; refusing to overwrite it (remove it first or "
        "choose another --path)"
    )
    assert path.read_text() == "precious"


def test_init_does_not_follow_a_planted_symlink(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "elsewhere.json"
    (tmp_path / "secrets.json").symlink_to(target)
    assert cli.main(["init"]) == 1
    assert "already exists" in one_line(capsys.readouterr().err)
    assert not target.exists()


def test_init_in_a_missing_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["init", "--path", "no/such/dir/secrets.json"]) == 1
    error = one_line(capsys.readouterr().err)
    assert error.startswith(f"devicegate: cannot create {tmp_path}/no/such/dir/secrets.json: ")


def test_a_failed_write_leaves_no_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_fsync(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="No space left"):
        cli.write_secrets_file(tmp_path / "secrets.json")
    assert not (tmp_path / "secrets.json").exists()


def test_init_without_fchmod(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(os, "fchmod")  # as on Windows: the mode given to os.open only
    cli.write_secrets_file(tmp_path / "secrets.json")
    assert json.loads((tmp_path / "secrets.json").read_text())["jwt_expire_seconds"] == 300


def test_python_dash_m_runs_main(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", ["devicegate", "init", "--path", "from-main.json"])
    # As on a real `python -m devicegate`: not imported yet (an earlier test may have).
    monkeypatch.delitem(sys.modules, "devicegate.__main__", raising=False)
    with pytest.raises(SystemExit) as info:
        runpy.run_module("devicegate", run_name="__main__")
    assert info.value.code == 0
    assert capsys.readouterr().out.endswith("from-main.json\n")
    # Imported rather than run, it does nothing.
    assert importlib.import_module("devicegate.__main__").main is cli.main


# -- in process: token and verify ---------------------------------------------------------------


def test_token_prints_only_a_token(
    secrets_file: Path, keys: Keys, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["token", "--secrets", str(secrets_file)]) == 0
    output = capsys.readouterr().out
    assert output.count("\n") == 1
    principal = TokenVerifier(keys.config()).verify(output.strip())
    assert principal.instance_id is None


def test_token_bound_to_a_device_from_the_default_file(
    secrets_file: Path, keys: Keys, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["token", "--instance-id", DEVICE]) == 0
    token = capsys.readouterr().out.strip()
    assert TokenVerifier(keys.config()).verify(token, DEVICE.encode()).instance_id == DEVICE


def test_token_with_keys_from_the_environment(
    keys: Keys, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DEVICEGATE_API_KEYS", keys.api_key)
    monkeypatch.setenv("DEVICEGATE_JWT_SECRET", keys.jwt_secret)
    monkeypatch.setenv("DEVICEGATE_JWT_EXPIRE_SECONDS", "60")
    assert cli.main(["token"]) == 0
    principal = TokenVerifier(keys.config()).verify(capsys.readouterr().out.strip())
    assert principal.claims["exp"] - principal.claims["iat"] == 60


def test_token_with_the_secrets_file_from_the_environment(
    tmp_path: Path, keys: Keys, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_secrets(tmp_path / "elsewhere.json", keys)
    monkeypatch.setenv("DEVICEGATE_SECRETS_FILE", str(path))
    assert cli.main(["token"]) == 0
    TokenVerifier(keys.config()).verify(capsys.readouterr().out.strip())


def test_token_without_a_jwt_secret(
    keys: Keys, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DEVICEGATE_API_KEYS", keys.api_key)
    assert cli.main(["token"]) == 2
    assert one_line(capsys.readouterr().err) == (
        "devicegate: invalid configuration: jwt_secret: TokenIssuer needs a jwt_secret to sign "
        "tokens"
    )


def test_verify_a_valid_bound_token(
    secrets_file: Path, keys: Keys, capsys: pytest.CaptureFixture[str]
) -> None:
    token = make_token(keys.jwt_secret, instance_id=DEVICE)
    assert cli.main(["verify", token, "--instance-id", DEVICE]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:3] == ["valid", "kind: device_token", f"instance_id: {DEVICE}"]
    assert re.fullmatch(r"expires: \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ \(in \d+ s\)", lines[3])


def test_verify_a_generic_token_from_stdin_as_a_header_value(
    secrets_file: Path,
    keys: Keys,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    token = make_token(keys.jwt_secret)
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"Bearer {token}\n"))
    assert cli.main(["verify", "-", "--instance-id", DEVICE]) == 0
    output = capsys.readouterr().out
    assert "instance_id: none (a generic token, accepted from any device)" in output


def past_claims(**extra: Any) -> dict[str, Any]:
    """Claims of a token that expired five minutes ago."""
    return claims_at(now=int(time.time()) - 600, **extra)


def future_claims(**extra: Any) -> dict[str, Any]:
    """Claims of a token valid for five more minutes."""
    return claims_at(now=int(time.time()), **extra)


@pytest.mark.parametrize(
    ("build", "args", "environ", "expected"),
    [
        pytest.param(
            lambda k: make_token(k.jwt_secret, past_claims(instance_id=DEVICE)),
            ["--instance-id", DEVICE],
            {},
            r"invalid: expired at \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ \(\d+ s ago\)",
            id="expired",
        ),
        pytest.param(
            lambda k: make_token(k.jwt_secret, instance_id=DEVICE),
            ["--instance-id", OTHER_DEVICE],
            {},
            f"invalid: wrong device: the token is bound to '{DEVICE}', not '{OTHER_DEVICE}'",
            id="wrong-device",
        ),
        pytest.param(
            lambda k: make_token(k.jwt_secret, instance_id=DEVICE),
            [],
            {},
            f"invalid: the token is bound to a device \\('{DEVICE}'\\): pass --instance-id",
            id="bound-without-instance-id",
        ),
        pytest.param(
            lambda k: make_token(fresh_keys().jwt_secret, instance_id=DEVICE),
            ["--instance-id", DEVICE],
            {},
            "invalid: bad signature: signed with another key, or tampered with",
            id="bad-signature",
        ),
        pytest.param(
            lambda k: "not-a-token",
            [],
            {},
            r"invalid: malformed: not a compact JWT \(three base64url segments of JSON\)",
            id="malformed",
        ),
        pytest.param(
            lambda k: "",
            [],
            {},
            "invalid: malformed: .*",
            id="empty",
        ),
        pytest.param(
            lambda k: "\u00e9" * 50,
            [],
            {},
            "invalid: malformed: .*",
            id="non-ascii",
        ),
        pytest.param(
            lambda k: make_token(k.jwt_secret, future_claims(), header={"alg": "HS384"}),
            [],
            {},
            "invalid: unsupported algorithm: not the algorithm of a configured key .*",
            id="other-algorithm",
        ),
        pytest.param(
            lambda k: make_token(
                k.jwt_secret, future_claims(), header={"alg": "HS256", "crit": ["x"]}
            ),
            [],
            {},
            r"invalid: unacceptable header .*",
            id="crit",
        ),
        pytest.param(
            lambda k: make_token(k.jwt_secret, {"exp": "9999999999"}),
            [],
            {},
            r"invalid: bad claims: 'exp' missing or not a number.*",
            id="exp-string",
        ),
        pytest.param(
            lambda k: make_token(k.jwt_secret, future_claims(nbf=int(time.time()) + 100)),
            [],
            {},
            r"invalid: not valid yet \('nbf' is in the future\)",
            id="nbf",
        ),
        pytest.param(
            lambda k: make_token(
                k.jwt_secret, {"iat": int(time.time()) + 100, "exp": int(time.time()) + 400}
            ),
            [],
            {},
            r"invalid: issued in the future .*",
            id="iat",
        ),
        pytest.param(
            lambda k: make_token(k.jwt_secret, future_claims(iss="someone-else")),
            [],
            {"DEVICEGATE_ISSUER": "us"},
            r"invalid: wrong issuer .*",
            id="issuer",
        ),
        pytest.param(
            lambda k: make_token(k.jwt_secret, future_claims(aud="someone-else")),
            [],
            {"DEVICEGATE_AUDIENCE": "us"},
            r"invalid: wrong audience .*",
            id="audience",
        ),
        pytest.param(
            lambda k: make_token(k.jwt_secret),
            [],
            {"DEVICEGATE_REQUIRE_DEVICE_BINDING": "true"},
            "invalid: not bound to a device, and this configuration requires device binding",
            id="unbound",
        ),
    ],
)
def test_verify_says_why_a_token_is_invalid(
    secrets_file: Path,
    keys: Keys,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    build: Any,
    args: list[str],
    environ: dict[str, str],
    expected: str,
) -> None:
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    assert cli.main(["verify", build(keys), *args]) == 1
    captured = capsys.readouterr()
    assert re.fullmatch(expected, one_line(captured.out)), captured.out
    assert captured.err == ""
    for secret in (keys.api_key, keys.mobile_api_key, keys.jwt_secret):
        assert secret not in captured.out


def test_verify_without_a_jwt_secret(
    keys: Keys, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DEVICEGATE_API_KEYS", keys.api_key)
    assert cli.main(["verify", make_token(keys.jwt_secret)]) == 1
    assert one_line(capsys.readouterr().out) == (
        "invalid: no key verifies tokens here (jwt_secret, jwt_private_key, jwt_public_keys or "
        "jwks_url), so no token can be valid"
    )


def test_every_invalid_reason_has_plain_words() -> None:
    assert set(cli.REASON_WORDS) == set(InvalidReason)
    assert all(cli.REASON_WORDS.values())


@pytest.mark.parametrize(
    ("timestamp", "now", "expected"),
    [
        (100, 50.0, "1970-01-01T00:01:40Z (in 50 s)"),
        (100, 150.0, "1970-01-01T00:01:40Z (50 s ago)"),
        (10**20, 0.0, str(10**20)),
        (None, 0.0, "unknown"),
        (True, 0.0, "unknown"),
        ("100", 0.0, "unknown"),
    ],
)
def test_when(timestamp: object, now: float, expected: str) -> None:
    assert cli._when(timestamp, now) == expected


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        ("abc", {}),
        ("a.!!!.c", {}),
        ("a.W10.c", {}),  # a JSON list
        ("a.eyJhIjoxfQ.c", {"a": 1}),
    ],
)
def test_unverified_claims(token: str, expected: dict[str, Any]) -> None:
    assert unverified_claims(token) == expected


# -- in process: configuration errors -----------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            None,
            "secrets_file: {path} does not exist; create one with `devicegate init --path {path}`",
        ),
        ("{", "secrets_file: {path} is not valid JSON (line 1, column 2)"),
        (
            '{"api_key": "short", "jwt_secret": "also-short"}',
            "api_keys: a key must be at least 16 bytes long (this one is 5); generate one "
            "with `devicegate init`",
        ),
        (
            json.dumps({"api_key": VENDOR_API_KEY}),
            "api_keys: this is the example key from the SenseCrypt documentation, known to "
            "everyone; generate a fresh one with `devicegate init`",
        ),
    ],
    ids=["missing", "invalid-json", "weak-key", "vendor-example-key"],
)
@pytest.mark.parametrize("command", [["token"], ["verify", "x.y.z"], ["serve"]])
def test_configuration_errors_are_one_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    content: str | None,
    message: str,
    command: list[str],
) -> None:
    monkeypatch.setattr(uvicorn, "run", pytest.fail)
    path = tmp_path / "given.json"
    if content is not None:
        path.write_text(content)
    assert cli.main([*command, "--secrets", str(path)]) == 2
    captured = capsys.readouterr()
    assert one_line(captured.err) == (
        "devicegate: invalid configuration: " + message.format(path=path)
    )
    assert captured.out == ""


def test_help_on_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ([], ["init"], ["serve"], ["token"], ["verify"]):
        with pytest.raises(SystemExit) as info:
            cli.main([*command, "--help"])
        assert info.value.code == 0
        assert "usage: devicegate" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    serve_help = capsys.readouterr().out
    for name in ("DEVICEGATE_HOST", "DEVICEGATE_PORT", "DEVICEGATE_PUBLIC", "DEVICEGATE_UPSTREAM"):
        assert name in serve_help


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"devicegate {devicegate.__version__}\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "the following arguments are required: COMMAND"),
        (["serve", "--port", "0"], "argument --port: must be an integer from 1 to 65535"),
        (["serve", "--port", "http"], "argument --port: must be an integer from 1 to 65535"),
        (["serve", "--workers", "0"], "argument --workers: must be an integer from 1 to 1024"),
        (["serve", "--log-level", "loud"], "argument --log-level: invalid choice"),
        (["verify"], "the following arguments are required: TOKEN"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_usage_errors_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


# -- in process: serve --------------------------------------------------------------------------


@dataclass
class FakeRun:
    calls: list[tuple[Any, dict[str, Any]]] = field(default_factory=list)
    environ: dict[str, str] = field(default_factory=dict)

    def __call__(self, app: Any, **options: Any) -> None:
        self.calls.append((app, options))
        self.environ = dict(os.environ)


@pytest.fixture
def fake_run(monkeypatch: pytest.MonkeyPatch) -> FakeRun:
    recorder = FakeRun()
    monkeypatch.setattr(uvicorn, "run", recorder)
    return recorder


async def test_serve_creates_secrets_and_runs_the_gate(
    tmp_path: Path, fake_run: FakeRun, capsys: pytest.CaptureFixture[str], port: int
) -> None:
    assert cli.main(["serve", "--port", str(port)]) == 0
    path = tmp_path / "secrets.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    document = json.loads(path.read_text())
    err = capsys.readouterr().err
    assert err.startswith(f"devicegate: created {path} with fresh random keys (mode 0600)\n")
    assert f"serving the demo app on http://127.0.0.1:{port} (1 worker)" in err
    assert f"  secrets: {path}\n" in err
    for secret in (document["api_key"], document["mobile_api_key"], document["jwt_secret"]):
        assert secret not in err
    ((app, options),) = fake_run.calls
    assert options == {
        "host": HOST,
        "port": port,
        "log_level": "info",
        "lifespan": "on",
        "server_header": False,
        "log_config": log_config("info", "text"),
    }
    async with client(app) as http:
        minted = await http.post(
            "/gen-jwt", headers={"x-api-key": document["api_key"]}, json={"instance_id": DEVICE}
        )
        token = minted.json()["access_token"]
        whoami = await http.get(
            "/whoami", headers={"authorization": f"Bearer {token}", "x-instance-id": DEVICE}
        )
    assert whoami.json()["instance_id"] == DEVICE


def test_serve_never_overwrites_an_existing_secrets_file(
    secrets_file: Path, fake_run: FakeRun, capsys: pytest.CaptureFixture[str], port: int
) -> None:
    before = secrets_file.read_text()
    assert cli.main(["serve", "--port", str(port)]) == 0
    assert secrets_file.read_text() == before
    assert "created" not in capsys.readouterr().err


def test_serve_cannot_create_the_secrets_file(
    fake_run: FakeRun, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def refuse(path: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(cli, "write_secrets_file", refuse)
    assert cli.main(["serve"]) == 1
    assert one_line(capsys.readouterr().err).endswith("secrets.json: Permission denied")
    assert fake_run.calls == []


def test_serve_settings_from_the_environment(
    secrets_file: Path,
    fake_run: FakeRun,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    port: int,
) -> None:
    monkeypatch.setenv("DEVICEGATE_HOST", "127.0.0.1")
    monkeypatch.setenv("DEVICEGATE_PORT", str(port))
    monkeypatch.setenv("DEVICEGATE_LOG_LEVEL", "WARNING")
    monkeypatch.setenv("DEVICEGATE_PUBLIC", "/open/*,/docs")
    monkeypatch.setenv("DEVICEGATE_TOKEN_PATH", "/mint")
    assert cli.main(["serve"]) == 0
    ((_, options),) = fake_run.calls
    assert (options["port"], options["log_level"]) == (port, "warning")
    err = capsys.readouterr().err
    assert "  public paths: /health, /open/*, /docs\n" in err
    assert f"POST http://127.0.0.1:{port}/mint" in err


def test_serve_flags_win_over_the_environment(
    secrets_file: Path,
    fake_run: FakeRun,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    port: int,
) -> None:
    monkeypatch.setenv("DEVICEGATE_PORT", "1")
    monkeypatch.setenv("DEVICEGATE_PUBLIC", "/from-env")
    monkeypatch.setenv("DEVICEGATE_TOKEN_PATH", "/mint")
    monkeypatch.setenv("DEVICEGATE_SECRETS_FILE", "/nowhere/secrets.json")
    argv = ["serve", "--port", str(port), "--public", "/a", "--public", "/b/*", "--log-level"]
    argv += ["debug", "--token-path", "none", "--secrets", str(secrets_file)]
    assert cli.main(argv) == 0
    ((_, options),) = fake_run.calls
    assert (options["port"], options["log_level"]) == (port, "debug")
    err = capsys.readouterr().err
    assert "  public paths: /health, /a, /b/*\n" in err
    assert "  token endpoint: off" in err
    assert "TOKEN=" not in err


async def test_serve_with_workers_exports_settings_for_the_factory(
    secrets_file: Path, keys: Keys, fake_run: FakeRun, capsys: pytest.CaptureFixture[str], port: int
) -> None:
    argv = ["serve", "--port", str(port), "--workers", "3", "--public", "/"]
    argv += ["--secrets", "secrets.json"]
    assert cli.main(argv) == 0
    ((app, options),) = fake_run.calls
    assert app == "devicegate.gateway._app:app_from_env"
    assert options["factory"] is True
    assert options["workers"] == 3
    assert "(3 workers)" in capsys.readouterr().err
    environ = fake_run.environ
    assert environ["DEVICEGATE_SECRETS_FILE"] == str(secrets_file)  # made absolute
    assert environ["DEVICEGATE_PUBLIC"] == "/"
    for secret in (keys.api_key, keys.mobile_api_key, keys.jwt_secret):
        assert all(secret not in value for value in environ.values())
    # What a worker process does with that environment:
    assert ServeSettings.from_env(environ).public == ("/",)
    async with client(app_from_env()) as http:
        root = await http.get("/")
        whoami = await http.get("/whoami", headers={"x-api-key": keys.api_key})
    assert root.status_code == 200
    assert whoami.json()["kind"] == "api_key"


async def test_serve_with_an_upstream_and_forward_auth(
    tmp_path: Path,
    secrets_file: Path,
    keys: Keys,
    fake_run: FakeRun,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    port: int,
) -> None:
    upstream_secrets = write_json(
        tmp_path / "upstream.json", {"api_key": "upstream-key-0123456789"}
    )
    monkeypatch.setenv("PROXY_SECRET", "proxy-shared-secret-0123456789")
    argv = ["serve", "--port", str(port), "--upstream", "http://127.0.0.1:9", "--no-upstream-check"]
    argv += ["--upstream-secrets", str(upstream_secrets), "--forward-auth-secret-env"]
    argv += ["PROXY_SECRET", "--forward-auth-path"]  # without a value: the default path
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert "forwarding to http://127.0.0.1:9 on http://127.0.0.1:" in err
    assert "/_devicegate/auth\n" in err
    for secret in ("upstream-key-0123456789", "proxy-shared-secret-0123456789"):
        assert secret not in err
    ((app, _),) = fake_run.calls
    async with client(app) as http:
        decided = await http.get(
            "/_devicegate/auth",
            headers={
                "x-original-uri": "/api",
                "x-devicegate-forward-secret": "proxy-shared-secret-0123456789",
                "x-api-key": keys.api_key,
            },
        )
        health = await http.get("/health")
    assert decided.status_code == 204
    assert decided.headers["x-devicegate-kind"] == "api_key"
    assert health.json() == {"status": "ok"}


def test_serve_with_keys_from_the_environment_needs_no_file(
    tmp_path: Path,
    keys: Keys,
    fake_run: FakeRun,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    port: int,
) -> None:
    monkeypatch.setenv("DEVICEGATE_API_KEYS", keys.api_key)
    monkeypatch.setenv("DEVICEGATE_JWT_SECRET", keys.jwt_secret)
    assert cli.main(["serve", "--port", str(port)]) == 0
    assert not (tmp_path / "secrets.json").exists()
    err = capsys.readouterr().err
    assert "  secrets: from DEVICEGATE_* environment variables\n" in err
    assert 'API_KEY="${DEVICEGATE_API_KEYS%%,*}"' in err
    assert keys.api_key not in err


BAD_UPSTREAM_TIMEOUT = "devicegate: invalid configuration: --upstream-timeout: must be a number "

# Arguments and DEVICEGATE_* variables that `devicegate` refuses before it does anything: the
# command line, the variables it adds to the environment, and the one line it prints on stderr
# (exit status 2, nothing on stdout, no server started). Each runs beside a valid secrets.json.
REFUSED_INPUT = [
    # -- token: the device a token is bound to travels in a header, so it must survive one. --
    pytest.param(
        ["token", "--instance-id", ""],
        {},
        "devicegate: --instance-id: instance_id must be 1 to 256 characters",
        id="token-empty-instance-id",
    ),
    pytest.param(
        ["token", "--instance-id", "x" * 257],
        {},
        "devicegate: --instance-id: instance_id must be 1 to 256 characters",
        id="token-long-instance-id",
    ),
    pytest.param(
        ["token", "--instance-id", " padded "],
        {},
        "devicegate: --instance-id: instance_id must be printable ASCII without surrounding spaces",
        id="token-padded-instance-id",
    ),
    pytest.param(
        ["token", "--instance-id", "caf\u00e9"],
        {},
        "devicegate: --instance-id: instance_id must be printable ASCII without surrounding spaces",
        id="token-non-ascii-instance-id",
    ),
    # -- serve: flags. --
    pytest.param(
        ["serve", "--workers", "2", "--public", "/a,b"],
        {},
        "devicegate: invalid configuration: public: '/a,b': a public path cannot contain ','",
        id="workers-and-a-comma-in-a-public-path",  # workers read it back comma-separated
    ),
    *(
        pytest.param(
            ["serve", "--upstream", "http://127.0.0.1:9", "--upstream-timeout", value],
            {},
            BAD_UPSTREAM_TIMEOUT + rest,
            id=f"upstream-timeout-{value}",
        )
        for value, rest in [
            ("soon", "of seconds, such as 30 or 2.5"),
            ("0", "of seconds above zero"),
            ("-1", "of seconds above zero"),
            ("inf", "of seconds above zero"),
            ("nan", "of seconds above zero"),
        ]
    ),
    # The same SenseCrypt file for both would give devices the upstream's own mobile key.
    pytest.param(
        [
            *("serve", "--upstream", "http://127.0.0.1:9", "--no-upstream-check"),
            *("--secrets", "secrets.json", "--upstream-secrets", "secrets.json"),
        ],
        {},
        "devicegate: invalid configuration: upstream_secrets_file: the upstream api_key is also "
        "a key or secret of this gateway; give the gateway keys of its own (devicegate init), "
        "so that devices never hold the upstream's",
        id="upstream-secrets-are-the-gateways",
    ),
    # -- serve: variables. A bad value is named, and echoed only where it cannot be a secret. --
    pytest.param(
        ["serve"],
        {"DEVICEGATE_PORT": "http"},
        "devicegate: invalid configuration: DEVICEGATE_PORT: must be an integer from 1 to "
        "65535, got 'http'",
        id="port-not-a-number",
    ),
    pytest.param(
        ["serve"],
        {"DEVICEGATE_PORT": "70000"},
        "devicegate: invalid configuration: DEVICEGATE_PORT: must be an integer from 1 to "
        "65535, got '70000'",
        id="port-too-large",
    ),
    pytest.param(
        ["serve"],
        {"DEVICEGATE_WORKERS": "0"},
        "devicegate: invalid configuration: DEVICEGATE_WORKERS: must be an integer from 1 to "
        "1024, got '0'",
        id="no-workers",
    ),
    pytest.param(
        ["serve"],
        {"DEVICEGATE_LOG_LEVEL": "loud"},
        "devicegate: invalid configuration: DEVICEGATE_LOG_LEVEL: must be one of critical, "
        "error, warning, info, debug, trace, got 'loud'",
        id="unknown-log-level",
    ),
    pytest.param(
        ["serve"],
        {"DEVICEGATE_PUBLIC": "relative"},
        "devicegate: invalid configuration: Rule.path: must start with '/', got 'relative'",
        id="relative-public-path",
    ),
    pytest.param(
        ["serve"],
        {"DEVICEGATE_UPSTREAM": "ftp://x"},
        "devicegate: invalid configuration: upstream: must be an http:// or https:// URL such "
        "as http://127.0.0.1:9000; its scheme is neither",
        id="upstream-not-http",
    ),
    pytest.param(
        ["serve"],
        {"DEVICEGATE_FORWARD_AUTH_SECRET_ENV": "UNSET_SECRET", "UNSET_SECRET": "shared"},
        "devicegate: invalid configuration: forward_auth_secret: a shared secret needs a "
        "forward-auth path",
        id="forward-auth-secret-without-a-path",
    ),
]


@pytest.mark.parametrize(("argv", "environ", "line"), REFUSED_INPUT)
def test_refused_input_is_one_line_and_exit_status_2(
    secrets_file: Path,
    keys: Keys,
    fake_run: FakeRun,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    environ: dict[str, str],
    line: str,
) -> None:
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert one_line(captured.err) == line
    for secret in (keys.api_key, keys.mobile_api_key, keys.jwt_secret):
        assert secret not in captured.err
    assert fake_run.calls == []


def test_serve_without_uvicorn(
    secrets_file: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    assert cli.main(["serve"]) == 2
    assert one_line(capsys.readouterr().err) == (
        "devicegate: serve needs uvicorn: pip install 'devicegate[server]'"
    )


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("httpx", "devicegate: --upstream needs httpx: pip install 'devicegate[server]'"),
        ("devicegate.gateway.proxy", "devicegate: cannot load devicegate.gateway.proxy: broken"),
    ],
)
def test_serve_with_an_upstream_but_a_missing_module(
    secrets_file: Path,
    fake_run: FakeRun,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    name: str,
    message: str,
) -> None:
    def build_app(*args: object, **kwargs: object) -> None:
        raise ImportError("broken", name=name)

    monkeypatch.setattr(devicegate.gateway._app, "build_app", build_app)
    assert cli.main(["serve", "--upstream", "http://127.0.0.1:9"]) == 2
    assert one_line(capsys.readouterr().err) == message
    assert fake_run.calls == []


def test_serve_on_a_port_in_use(
    secrets_file: Path, fake_run: FakeRun, capsys: pytest.CaptureFixture[str]
) -> None:
    with listening_port() as port:
        assert cli.main(["serve", "--port", str(port)]) == 1
    assert one_line(capsys.readouterr().err) == (
        f"devicegate: port {port} on 127.0.0.1 is already in use (is another server "
        "running?); choose another --port"
    )
    assert fake_run.calls == []


def test_serve_on_a_host_that_does_not_resolve(
    secrets_file: Path,
    fake_run: FakeRun,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Name resolution is replaced in process (socket.bind resolves in C, so bind is replaced
    # too): the outcome cannot depend on this machine's resolver or network.
    def unknown(host: object, *args: object, **kwargs: object) -> Any:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    def bind(self: socket.socket, address: tuple[str, int]) -> None:
        unknown(address[0])

    monkeypatch.setattr(socket, "getaddrinfo", unknown)
    monkeypatch.setattr(socket.socket, "bind", bind)
    assert cli.main(["serve", "--host", "host.invalid"]) == 1
    assert one_line(capsys.readouterr().err) == (
        "devicegate: cannot resolve --host 'host.invalid': Name or service not known"
    )
    assert fake_run.calls == []


def test_serve_on_an_address_that_is_not_ours(
    secrets_file: Path, fake_run: FakeRun, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["serve", "--host", "192.0.2.1"]) == 1  # TEST-NET-1, on no interface
    assert one_line(capsys.readouterr().err).startswith("devicegate: cannot listen on 192.0.2.1:")
    assert fake_run.calls == []


def test_serve_on_a_privileged_port(
    secrets_file: Path,
    fake_run: FakeRun,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def bind(self: socket.socket, address: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(socket.socket, "bind", bind)
    assert cli.main(["serve", "--port", "80"]) == 1
    assert one_line(capsys.readouterr().err) == (
        "devicegate: permission denied to listen on 127.0.0.1:80 (ports below 1024 need "
        "privileges); choose another --port"
    )


def test_serve_interrupted(
    secrets_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    port: int,
) -> None:
    def interrupted(app: object, **options: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(uvicorn, "run", interrupted)
    assert cli.main(["serve", "--port", str(port)]) == 130


@pytest.mark.parametrize(
    ("host", "shown"),
    [
        ("127.0.0.1", "127.0.0.1"),
        (WILDCARD, "127.0.0.1"),
        ("", "127.0.0.1"),
        ("::", "[::1]"),
        ("::1", "[::1]"),
        ("localhost", "localhost"),
    ],
)
def test_display_host(host: str, shown: str) -> None:
    assert cli._display_host(host) == shown


def banner(keys: Keys, settings: ServeSettings, **environ: str) -> str:
    return cli.serve_banner(settings, keys.config(), environ, host=WILDCARD, port=8000, workers=1)


def test_banner_for_an_upstream_with_forward_auth(keys: Keys) -> None:
    text = banner(
        keys,
        ServeSettings(
            secrets_file="/etc/dg/secrets.json",
            upstream="http://10.0.0.5:9000",
            forward_auth_path="/_devicegate/auth",
        ),
    )
    assert text.startswith(
        f"devicegate {devicegate.__version__}: forwarding to http://10.0.0.5:9000 on "
        "http://127.0.0.1:8000 (1 worker)\n"
    )
    assert "  forward-auth endpoint: http://127.0.0.1:8000/_devicegate/auth\n" in text
    assert (
        "  gateway limits: 100 upstream connections, 1000 requests at once, bodies and "
        "responses up to 262144 bytes buffered; a client has 30 s plus 1 s per 1024 bytes to "
        "send or read one\n"
    ) in text
    # The call goes through the gateway (then the endpoint is asked as the proxy would).
    assert (
        "  curl -fsS -H \"Authorization: Bearer $TOKEN\" -H 'X-Instance-ID: demo-device' "
        "http://127.0.0.1:8000/\n"
    ) in text


def test_banner_uses_the_configured_headers(keys: Keys) -> None:
    config = keys.config(device_header="X-Device", api_key_header="X-Server-Key")
    text = cli.serve_banner(
        ServeSettings(secrets_file="/s.json"), config, {}, host="::1", port=9, workers=2
    )
    assert '-H "x-server-key: $API_KEY"' in text
    assert "-H 'x-device: demo-device' http://[::1]:9/whoami" in text
    assert "(2 workers)" in text


def test_banner_without_a_token_endpoint(keys: Keys) -> None:
    only_keys = devicegate.GateConfig(api_keys=keys.api_key)
    text = cli.serve_banner(
        ServeSettings(secrets_file="/s.json"), only_keys, {}, host=HOST, port=1, workers=1
    )
    assert text.endswith(
        "  token endpoint: off (needs --token-path, an api_key, and a jwt_secret or "
        "jwt_private_key to sign with)\n"
    )


def run_shell(line: str, environ: dict[str, str] | None = None) -> str:
    """Run ``line`` with bash as a user would paste it, with ``environ`` added to a clean
    environment (no ``DEVICEGATE_*`` variables, no proxy for curl to send 127.0.0.1 to)."""
    result = subprocess.run(  # noqa: S603 - a fixed interpreter running a printed line
        ["bash", "-c", line],  # noqa: S607 - bash from PATH, as a user would paste
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        env=child_env(environ),
        check=True,
    )
    return result.stdout


@pytest.mark.integration
def test_printed_api_key_line_reads_the_file(tmp_path: Path, keys: Keys) -> None:
    odd_dir = tmp_path / "dir with 'quotes' and $dollars"
    odd_dir.mkdir()
    path = write_secrets(odd_dir / "secrets.json", keys)
    text = banner(keys, ServeSettings(secrets_file=str(path)))
    (line,) = [line for line in text.splitlines() if line.startswith("  API_KEY=")]
    assert run_shell(f'{line}; printf %s "$API_KEY"') == keys.api_key
    rotated = write_secrets(odd_dir / "rotated.json", keys, api_key=[keys.api_key, "old-key"])
    text = banner(keys, ServeSettings(secrets_file=str(rotated)))
    (line,) = [line for line in text.splitlines() if line.startswith("  API_KEY=")]
    assert run_shell(f'{line}; printf %s "$API_KEY"') == keys.api_key


@pytest.mark.integration
def test_printed_api_key_line_reads_the_environment(keys: Keys) -> None:
    text = banner(keys, ServeSettings(), DEVICEGATE_API_KEYS="k")
    (line,) = [line for line in text.splitlines() if line.startswith("  API_KEY=")]
    environ = {"DEVICEGATE_API_KEYS": f"{keys.api_key},older"}
    assert run_shell(f'{line}; printf %s "$API_KEY"', environ) == keys.api_key


# -- the real command, through subprocess -------------------------------------------------------


def run_cli(
    *args: str, cwd: Path, stdin: str | None = None, **environ: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603 - our own interpreter and module
        [sys.executable, "-m", "devicegate", *args],
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        env=child_env(environ),
        check=False,
    )


@pytest.mark.integration
@pytest.mark.parametrize(
    ("module", "never_loaded"),
    [
        # The core knows nothing of the gateway built on it.
        ("devicegate", "devicegate.gateway"),
        # The command line starts (init, token, verify, serve without --upstream) without the
        # server extra: httpx is loaded only for a reverse proxy.
        ("devicegate.cli", "httpx"),
    ],
)
def test_layers_import_one_way(tmp_path: Path, module: str, never_loaded: str) -> None:
    code = (
        f"import sys, {module}; "
        f"print(sorted(m for m in sys.modules if (m + '.').startswith('{never_loaded}.')))"
    )
    result = subprocess.run(  # noqa: S603 - our own interpreter and a fixed line
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        env=child_env({}),
        check=False,
    )
    assert (result.returncode, result.stdout) == (0, "[]\n"), result.stderr


@pytest.mark.integration
def test_real_version_and_help(tmp_path: Path) -> None:
    version = run_cli("--version", cwd=tmp_path)
    assert (version.returncode, version.stdout) == (0, f"devicegate {devicegate.__version__}\n")
    for command in ("init", "serve", "token", "verify"):
        help_ = run_cli(command, "--help", cwd=tmp_path)
        assert help_.returncode == 0
        assert help_.stdout.startswith(f"usage: devicegate {command}")


@pytest.mark.integration
def test_real_init_token_and_verify(tmp_path: Path) -> None:
    init = run_cli("init", cwd=tmp_path)
    path = tmp_path / "secrets.json"
    assert (init.returncode, init.stdout, init.stderr) == (0, f"{path}\n", "")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    document = json.loads(path.read_text())

    again = run_cli("init", cwd=tmp_path)
    assert again.returncode == 1
    assert "already exists; refusing to overwrite it" in one_line(again.stderr)
    assert json.loads(path.read_text()) == document

    token = run_cli("token", "--instance-id", DEVICE, cwd=tmp_path)
    assert token.returncode == 0
    assert re.fullmatch(r"[\w-]+\.[\w-]+\.[\w-]+\n", token.stdout)

    valid = run_cli("verify", "-", "--instance-id", DEVICE, cwd=tmp_path, stdin=token.stdout)
    assert valid.returncode == 0
    assert valid.stdout.splitlines()[:3] == [
        "valid",
        "kind: device_token",
        f"instance_id: {DEVICE}",
    ]

    wrong = run_cli("verify", token.stdout.strip(), "--instance-id", "x", cwd=tmp_path)
    assert wrong.returncode == 1
    assert one_line(wrong.stdout).startswith("invalid: wrong device")
    for key in ("api_key", "mobile_api_key", "jwt_secret"):
        for output in (init, token, valid, wrong):
            assert document[key] not in output.stdout + output.stderr


@pytest.mark.integration
@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (
            lambda k: make_token(k.jwt_secret, past_claims(instance_id=DEVICE)),
            "invalid: expired at ",
        ),
        (lambda k: make_token(k.jwt_secret, instance_id=OTHER_DEVICE), "invalid: wrong device"),
        (
            lambda k: make_token(fresh_keys().jwt_secret, instance_id=DEVICE),
            "invalid: bad signature",
        ),
        (lambda k: "e30.e30.sig", "invalid: malformed"),
    ],
    ids=["expired", "wrong-device", "bad-signature", "malformed"],
)
def test_real_verify_refusals(
    secrets_file: Path, keys: Keys, tmp_path: Path, make: Any, expected: str
) -> None:
    result = run_cli("verify", make(keys), "--instance-id", DEVICE, cwd=tmp_path)
    assert result.returncode == 1
    assert one_line(result.stdout).startswith(expected)
    assert result.stderr == ""


@pytest.mark.integration
@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "secrets.json does not exist; create one with `devicegate init --path "),
        ("{not json", "is not valid JSON (line 1, column 2)"),
        ('{"api_key": "tiny", "jwt_secret": "tiny2"}', "api_keys: a key must be at least 16 bytes"),
    ],
    ids=["missing-file", "invalid-json", "weak-key"],
)
@pytest.mark.parametrize(
    "command", [("token",), ("verify", "a.b.c"), ("serve", "--secrets", "secrets.json")]
)
def test_real_configuration_errors(
    tmp_path: Path, content: str | None, expected: str, command: tuple[str, ...]
) -> None:
    if content is not None:
        (tmp_path / "secrets.json").write_text(content)
    result = run_cli(*command, cwd=tmp_path)
    assert result.returncode == 2
    line = one_line(result.stderr)
    assert line.startswith("devicegate: invalid configuration: ")
    assert expected in line
    assert result.stdout == ""


@pytest.mark.integration
def test_real_serve_on_a_port_in_use(secrets_file: Path, tmp_path: Path) -> None:
    with listening_port() as port:
        result = run_cli("serve", "--port", str(port), "--secrets", "secrets.json", cwd=tmp_path)
    assert result.returncode == 1
    assert one_line(result.stderr) == (
        f"devicegate: port {port} on 127.0.0.1 is already in use (is another server "
        "running?); choose another --port"
    )


@contextlib.contextmanager
def running_serve(cwd: Path, *args: str) -> Iterator[Server]:
    """``devicegate serve ARGS`` for real in ``cwd``, once it answers ``/health``; stopped after,
    with every process it started."""

    command = devicegate_command(*args)
    with serve(command, cwd / "serve.log", cwd=cwd, ready=answers("/health")) as server:
        yield server


@pytest.fixture
def server(starts_a_process: None, tmp_path: Path) -> Iterator[Server]:
    with running_serve(tmp_path) as running:
        yield running


def printed(server: Server, prefix: str) -> str:
    (line,) = [line for line in server.output().splitlines() if line.startswith(f"  {prefix}")]
    return line


def test_real_serve_prints_working_instructions(server: Server, tmp_path: Path) -> None:
    path = tmp_path / "secrets.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    document = json.loads(path.read_text())
    text = server.output()
    assert f"devicegate: created {path} with fresh random keys (mode 0600)" in text
    assert f"serving the demo app on {server.url} (1 worker)" in text
    for secret in (document["api_key"], document["mobile_api_key"], document["jwt_secret"]):
        assert secret not in text

    # The API key line yields the key from the file.
    api_key = run_shell(f'{printed(server, "API_KEY=")}; printf %s "$API_KEY"')
    assert api_key == document["api_key"]
    # The mint line names the header, the body and the URL; replay it with httpx.
    mint_line = printed(server, "TOKEN=")
    header = re.search(r'-H "([\w-]+): \$API_KEY"', mint_line)
    body = re.search(r"-d '(\{[^']*\})'", mint_line)
    url = re.search(r"(http://\S+/gen-jwt)", mint_line)
    assert header
    assert body
    assert url
    assert url.group(1) == f"{server.url}/gen-jwt"
    # The call line names the device header and the demo's URL.
    call_line = printed(server, "curl ")
    device = re.search(r"-H '([\w-]+): ([\w-]+)'", call_line)
    target = re.search(r"(http://\S+)$", call_line)
    assert device
    assert target
    with sync_client(server.url) as http:
        minted = http.post(
            url.group(1),
            headers={header.group(1): api_key, "content-type": "application/json"},
            content=body.group(1),
        )
        assert minted.status_code == 200
        assert minted.headers["cache-control"] == "no-store"
        token = minted.json()["access_token"]
        response = http.get(
            target.group(1),
            headers={"authorization": f"Bearer {token}", device.group(1): device.group(2)},
        )
        anonymous = http.get(target.group(1))
    assert response.status_code == 200
    assert response.json()["kind"] == "device_token"
    assert response.json()["instance_id"] == device.group(2) == "demo-device"
    assert anonymous.status_code == 401


def test_real_serve_printed_lines_run_as_pasted(server: Server) -> None:
    # Never skipped: the test script installs curl when it is missing.
    assert shutil.which("curl"), "the printed lines call curl: install it (apt-get install curl)"
    lines = [printed(server, prefix) for prefix in ("API_KEY=", "TOKEN=", "curl ")]
    output = run_shell("set -euo pipefail\n" + "\n".join(lines))
    body = json.loads(output)
    assert (body["kind"], body["instance_id"]) == ("device_token", "demo-device")
    assert set(body["claims"]) == {"iat", "exp", "jti", "instance_id"}


def test_real_serve_websocket(server: Server, tmp_path: Path) -> None:
    document = json.loads((tmp_path / "secrets.json").read_text())
    with sync_client(server.url) as http:
        minted = http.post(
            "/gen-jwt", headers={"x-api-key": document["api_key"]}, json={"instance_id": DEVICE}
        )
    headers = bearer(minted.json()["access_token"], DEVICE)
    url = f"ws://{HOST}:{server.port}/ws"
    with connect(url, additional_headers=headers, open_timeout=IO_TIMEOUT, proxy=None) as websocket:
        message = websocket.recv(timeout=IO_TIMEOUT)
    assert json.loads(message)["instance_id"] == DEVICE
    with pytest.raises(InvalidStatus) as info:
        connect(url, open_timeout=IO_TIMEOUT, proxy=None)
    assert info.value.response.status_code == 401


@pytest.mark.integration
def test_real_serve_in_front_of_an_unreachable_upstream(
    secrets_file: Path, keys: Keys, tmp_path: Path
) -> None:
    with (
        bound_port() as dead,  # bound, never listening: the upstream is down
        running_serve(
            tmp_path, "--upstream", f"http://{HOST}:{dead}", "--no-upstream-check"
        ) as server,
        sync_client(server.url) as http,
    ):
        assert f"forwarding to http://{HOST}:{dead} on {server.url}" in server.output()
        anonymous = http.get("/api")
        admitted = http.get("/api", headers={"x-api-key": keys.api_key})
    assert anonymous.status_code == 401
    assert admitted.status_code == 502
    assert admitted.headers["content-type"] == "application/json"


def get_from_a_worker(
    server: Server, path: str, headers: dict[str, str]
) -> tuple[int | None, int, Any]:
    """``GET path`` on a connection of its own: the worker process that held the connection
    (read from /proc while it is still open), the status and the JSON body."""
    connection = http.client.HTTPConnection(HOST, server.port, timeout=IO_TIMEOUT)
    try:
        connection.connect()
        assert connection.sock is not None
        client_port: int = connection.sock.getsockname()[1]
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        body = json.loads(response.read())
        workers = children(server.process.pid)
        return connection_owner(server.port, client_port, workers), response.status, body
    finally:
        connection.close()


def until_two_workers_answer(ask: Callable[[], int | None], count: int = 2) -> set[int]:
    """Call ``ask`` (which returns the worker that answered) until ``count`` different workers
    have answered; bounded by :data:`START_SECONDS`, as the last may still be starting."""
    answered: set[int] = set()
    deadline = time.monotonic() + START_SECONDS
    while len(answered) < count and time.monotonic() < deadline:
        worker = ask()
        if worker is not None:
            answered.add(worker)
        time.sleep(0.02)
    return answered


@pytest.mark.integration
def test_real_serve_with_workers(secrets_file: Path, keys: Keys, tmp_path: Path) -> None:
    with running_serve(tmp_path, "--workers", "2", "--public", "/") as server:
        assert "(2 workers)" in server.output()
        with sync_client(server.url) as http:
            assert http.get("/").json()["kind"] is None
            minted = http.post("/gen-jwt", headers={"x-api-key": keys.api_key})
        token = minted.json()["access_token"]
        replies: list[tuple[int, Any]] = []

        def ask() -> int | None:
            worker, status, body = get_from_a_worker(server, "/whoami", bearer(token))
            replies.append((status, body["kind"]))
            return worker

        workers = until_two_workers_answer(ask)
        # Two worker processes answered (not the master), and whichever did, the token one of
        # them minted was valid: every worker has the same keys.
        assert len(workers) == 2, f"one worker answered all {len(replies)} requests"
        assert server.process.pid not in workers
        assert set(replies) == {(200, "device_token")}
    # Stopping the server stopped its workers too.
    assert not any(alive(pid) for pid in workers)


# -- regressions: untrusted token values on the operator's terminal -----------------------------

# A token's claims come from whoever signed it. An instance_id holding terminal escape
# sequences (a title change, a screen clear, a bidi override) was printed raw by `verify`.
ESCAPING_INSTANCE_ID = "\x1b]0;pwned\x07\x1b[2J\u202edevice"


@pytest.mark.parametrize(
    "instance_id",
    [ESCAPING_INSTANCE_ID, "device-A", None],
    ids=["matching", "wrong-device", "missing"],
)
def test_verify_never_prints_terminal_escapes_from_a_token(
    secrets_file: Path,
    keys: Keys,
    capsys: pytest.CaptureFixture[str],
    instance_id: str | None,
) -> None:
    token = make_token(keys.jwt_secret, instance_id=ESCAPING_INSTANCE_ID)
    argv = ["verify", token]
    if instance_id is not None:
        argv += ["--instance-id", instance_id]
    status = cli.main(argv)
    output = capsys.readouterr()
    assert status == (0 if instance_id == ESCAPING_INSTANCE_ID else 1)
    for text in (output.out, output.err):
        assert "\x1b" not in text
        assert "\x07" not in text
        assert "\u202e" not in text
    assert "\\x1b]0;pwned\\x07" in output.out


def test_verify_help_points_to_stdin(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["verify", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "devicegate verify -" in text
    assert "out of ps" in text


def test_serve_stops_when_the_upstream_is_unreachable(
    secrets_file: Path, fake_run: FakeRun, capsys: pytest.CaptureFixture[str], port: int
) -> None:
    with bound_port() as dead:  # bound, never listening: nothing accepts connections
        upstream = f"http://{HOST}:{dead}/private-0123456789/secret-path"
        assert cli.main(["serve", "--port", str(port), "--upstream", upstream]) == 1
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"devicegate: cannot reach the upstream at {HOST}:{dead} (")
    assert "--no-upstream-check" in line
    for private in ("private-0123456789", "secret-path"):
        assert private not in line
    assert fake_run.calls == []


def test_serve_checks_a_reachable_upstream_and_starts(
    secrets_file: Path, fake_run: FakeRun, port: int
) -> None:
    with listening_port() as up:
        upstream = f"http://{HOST}:{up}"
        assert cli.main(["serve", "--port", str(port), "--upstream", upstream]) == 0
    assert len(fake_run.calls) == 1


def test_serve_reports_an_unresolvable_upstream_host(
    secrets_file: Path,
    fake_run: FakeRun,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    port: int,
) -> None:
    def no_such_host(*args: object, **kwargs: object) -> NoReturn:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "create_connection", no_such_host)
    assert cli.main(["serve", "--port", str(port), "--upstream", "http://upstream.example"]) == 1
    assert one_line(capsys.readouterr().err) == (
        "devicegate: cannot resolve the upstream host 'upstream.example': "
        "Name or service not known; check --upstream"
    )
    assert fake_run.calls == []


@pytest.mark.integration
def test_real_serve_with_an_unreachable_upstream_is_one_line(tmp_path: Path, port: int) -> None:
    with bound_port() as dead:
        result = run_cli(
            "serve", "--port", str(port), "--upstream", f"http://{HOST}:{dead}", cwd=tmp_path
        )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(f"devicegate: cannot reach the upstream at {HOST}:{dead}")
    )


def test_upstream_timeout_reaches_the_workers_through_the_environment() -> None:
    settings = devicegate.gateway._app.ServeSettings(
        upstream="http://127.0.0.1:9", upstream_timeout=2.5
    )
    environ = settings.to_env()
    assert environ["DEVICEGATE_UPSTREAM_TIMEOUT"] == "2.5"
    assert devicegate.gateway._app.ServeSettings.from_env(environ) == settings
    with pytest.raises(ConfigError) as info:
        devicegate.gateway._app.ServeSettings.from_env({"DEVICEGATE_UPSTREAM_TIMEOUT": "later"})
    assert info.value.field == "DEVICEGATE_UPSTREAM_TIMEOUT"


def test_upstream_timeout_flag_wins_over_a_bad_variable(
    secrets_file: Path, fake_run: FakeRun, monkeypatch: pytest.MonkeyPatch, port: int
) -> None:
    monkeypatch.setenv("DEVICEGATE_UPSTREAM_TIMEOUT", "not-a-number")
    with listening_port() as up:
        upstream = f"http://{HOST}:{up}"
        argv = ["serve", "--port", str(port), "--upstream", upstream, "--upstream-timeout", "5"]
        assert cli.main(argv) == 0
    assert len(fake_run.calls) == 1
