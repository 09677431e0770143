"""A token's life on the command line: minted with a subject, claims and a lifetime
(``devicegate token``), revoked on a running server (``devicegate revoke``), and keys rotated
under a running server without a restart (SIGHUP).

In-process tests drive ``cli.main`` and the app ``serve`` builds; the ``integration`` tests
start real ``devicegate serve`` processes (and, as an upstream, the echo server).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from starlette.types import Message

from devicegate import ConfigError, GateConfig, RevocationList, TokenIssuer, cli
from devicegate._revocation import RevocationState
from devicegate.gateway._app import ReloadableApp, ServeSettings, build_app
from devicegate.gateway._policy import ProxyLimits
from devicegate.gateway._reload import can_receive_hangup
from tests.helpers import (
    Keys,
    bearer,
    client,
    fresh_keys,
    jti_of,
    lifespan_scope,
    private_pem,
    public_pem,
    scrub_devicegate_env,
    write_secrets,
)
from tests.servers.process import (
    HOST,
    IO_SECONDS,
    START_SECONDS,
    Server,
    answers,
    bound_port,
    child_env,
    devicegate_command,
    seen_by,
    serve,
    sync_client,
    uvicorn_command,
)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    scrub_devicegate_env(monkeypatch)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def secrets_file(tmp_path: Path, keys: Keys) -> Path:
    return write_secrets(tmp_path / "secrets.json", keys)


def one_line(text: str) -> str:
    """The single line of an error message; fails on tracebacks or several lines."""
    assert "Traceback" not in text
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


def decoded(token: str, keys: Keys) -> dict[str, Any]:
    """The claims of ``token``, its signature checked by PyJWT with the configured secret."""
    claims: dict[str, Any] = jwt.decode(token, keys.jwt_secret, algorithms=["HS256"])
    return claims


# -- devicegate token: subject, claims, lifetime ------------------------------------------------


def test_token_carries_subject_claims_and_lifetime(
    secrets_file: Path, keys: Keys, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["token", "--instance-id", "phone-1", "--sub", "alice", "--lifetime", "60"]
    argv += ["--claim", 'roles=["reader"]', "--claim", "tier=2", "--claim", 'team="blue"']
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    claims = decoded(out.strip(), keys)
    assert out.count("\n") == 1
    assert claims["sub"] == "alice"
    assert claims["instance_id"] == "phone-1"
    assert (claims["roles"], claims["tier"], claims["team"]) == (["reader"], 2, "blue")
    assert claims["exp"] - claims["iat"] == 60


def test_token_lifetime_defaults_to_the_configured_one(
    tmp_path: Path, keys: Keys, capsys: pytest.CaptureFixture[str]
) -> None:
    write_secrets(tmp_path / "secrets.json", keys, jwt_expire_seconds=120)
    assert cli.main(["token"]) == 0
    claims = decoded(capsys.readouterr().out.strip(), keys)
    assert claims["exp"] - claims["iat"] == 120
    assert "sub" not in claims


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        # The value is JSON: a bare word is not a string.
        (["--claim", "team=blue"], "--claim team: the value is not JSON"),
        (["--claim", "roles=[reader"], "--claim roles: the value is not JSON"),
        (["--claim", "ratio=NaN"], "--claim ratio: the value is not JSON"),
        (["--claim", "tier"], "--claim tier: expected NAME=JSON"),
        (["--claim", "=2"], "--claim: expected NAME=JSON"),
        (["--claim", "a=1", "--claim", "a=2"], "--claim a: given more than once"),
        # Names the server alone sets; where a flag sets it, the line says which.
        (["--claim", "exp=9999999999"], "--claim exp: the claim 'exp' is set by the server"),
        (["--claim", 'sub="bob"'], "--claim sub: the claim 'sub' is set by the server"),
        (["--claim", "jti=1"], "--claim jti: the claim 'jti' is set by the server"),
        (["--claim", 'cnf={"jkt":"x"}'], "--claim cnf: the claim 'cnf' is set by the server"),
        (["--claim", 'instance_id="d"'], "--claim instance_id: the claim 'instance_id' is set"),
        (["--claim", f"big={json.dumps('x' * 2000)}"], "--claim: claims must take at most"),
        # Longer than configured is refused, never clamped; so is nothing at all.
        (["--lifetime", "301"], "--lifetime: must be from 1 to 300 seconds"),
        (["--lifetime", "0"], "--lifetime: must be from 1 to 300 seconds"),
        (["--sub", ""], "--sub: sub must be a string of 1 to 256 printable characters"),
    ],
)
def test_token_refuses_bad_options_in_one_line(
    secrets_file: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert cli.main(["token", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert one_line(captured.err).startswith(f"devicegate: {message}")


def test_token_hints_the_flag_for_a_reserved_claim(
    secrets_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["token", "--claim", "exp=1"]) == 2
    assert one_line(capsys.readouterr().err).endswith("; use --lifetime")


# -- devicegate revoke: usage errors and an unreachable server -----------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--jti", "j", "--before", "5"], "--before applies to --device, --sub and --all"),
        (["--all", "--url", "ftp://host"], "--url: must be the server's http:// or https:// URL"),
        (["--all", "--url", "http://"], "--url: must be the server's http:// or https:// URL"),
        (["--all", "--url", "http://host:99999"], "--url: not a valid URL"),
        (["--all", "--revoke-path", "none"], "the revocation endpoint is off"),
        (["--all", "--revoke-path", "/a/../b"], "--revoke-path: must be an absolute path"),
    ],
)
def test_revoke_usage_errors(
    secrets_file: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert cli.main(["revoke", *argv]) == 2
    assert one_line(capsys.readouterr().err).startswith(f"devicegate: {message}")


def test_revoke_never_echoes_a_url_with_credentials(
    secrets_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["revoke", "--all", "--url", "http://user:hunter2hunter2@host"]) == 2
    line = one_line(capsys.readouterr().err)
    assert "without credentials" in line
    assert "hunter2" not in line


@pytest.mark.parametrize(
    "argv",
    [
        [],  # no target
        ["--jti", "a", "--sub", "b"],  # two targets
        ["--all", "--before", "yesterday"],
        ["--all", "--before", "nan"],
    ],
)
def test_revoke_takes_exactly_one_target(
    secrets_file: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["revoke", *argv])
    assert info.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


def test_revoke_needs_the_server_api_key(
    tmp_path: Path, keys: Keys, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "mobile.json"
    path.write_text(json.dumps({"mobile_api_key": keys.mobile_api_key}))
    path.chmod(0o600)
    assert cli.main(["revoke", "--all", "--secrets", str(path)]) == 2
    assert "revoke needs the server API key" in one_line(capsys.readouterr().err)


def test_revoke_reports_an_unreachable_server(
    secrets_file: Path, keys: Keys, capsys: pytest.CaptureFixture[str]
) -> None:
    with bound_port() as dead:
        assert cli.main(["revoke", "--all", "--url", f"http://{HOST}:{dead}"]) == 1
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"devicegate: cannot reach the server at {HOST}:{dead} (")
    assert keys.api_key not in line


def test_revoke_finds_the_server_where_serve_listens(
    secrets_file: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The same DEVICEGATE_HOST/DEVICEGATE_PORT as serve's; DEVICEGATE_URL wins over them.
    with bound_port() as dead:
        monkeypatch.setenv("DEVICEGATE_PORT", str(dead))
        assert cli.main(["revoke", "--all"]) == 1
        assert f"at 127.0.0.1:{dead} (" in capsys.readouterr().err
        monkeypatch.setenv("DEVICEGATE_URL", f"http://localhost:{dead}/")
        assert cli.main(["revoke", "--all"]) == 1
        assert f"at localhost:{dead} (" in capsys.readouterr().err


# -- the app serve builds: revocation and reconfiguration, in process ----------------------------


async def test_build_app_revokes_in_one_process_for_gate_and_forward_auth(keys: Keys) -> None:
    app = build_app(keys.config(), forward_auth_path="/_devicegate/auth")
    server_key = {"x-api-key": keys.api_key}
    async with client(app) as http:
        minted = await http.post("/gen-jwt", headers=server_key, json={"instance_id": "d1"})
        token = minted.json()["access_token"]
        asked = {**bearer(token, "d1"), "x-original-uri": "/api"}
        assert (await http.get("/whoami", headers=bearer(token, "d1"))).status_code == 200
        assert (await http.get("/_devicegate/auth", headers=asked)).status_code == 204
        revoked = await http.post("/revoke", headers=server_key, json={"instance_id": "d1"})
        answer = revoked.json()
        assert isinstance(answer.pop("before"), float)  # the cutoff that applied: now
        assert answer == {"revoked": "instance_id", "instance_id": "d1"}
        # Refused by the gate and by the forward-auth endpoint alike.
        assert (await http.get("/whoami", headers=bearer(token, "d1"))).status_code == 401
        assert (await http.get("/_devicegate/auth", headers=asked)).status_code == 401


@pytest.mark.parametrize(
    ("headers", "status", "error"),
    [
        ({}, 401, "unauthorized"),
        ({"x-api-key": "mobile"}, 403, "insufficient_scope"),  # the mobile key, set below
        ({"x-api-key": "server"}, 501, "revocation_off"),
    ],
)
async def test_build_app_with_workers_refuses_revocation(
    keys: Keys, headers: dict[str, str], status: int, error: str
) -> None:
    values = {"server": keys.api_key, "mobile": keys.mobile_api_key}
    if headers.get("x-api-key") == "mobile":
        headers = {"authorization": keys.mobile_api_key}
    elif headers:
        headers = {"x-api-key": values["server"]}
    app = build_app(keys.config(), workers=2)
    async with client(app) as http:
        for path in ("/revoke", "/revoke/"):
            answer = await http.post(path, headers=headers, json={"all": True})
            assert answer.status_code == status
            assert answer.json()["error"] == error
    assert app.gate.revoke_path is None


class _ReportingStore(RevocationList):
    """A revocation store that reports a state, as a shared one does (any, not only Redis)."""

    def __init__(self) -> None:
        super().__init__()
        self.state = RevocationState(fresh=True, last_sync=1.5, entries=0, fail_open=False)


async def test_health_reports_the_state_of_any_store_that_reports_one(keys: Keys) -> None:
    store = _ReportingStore()
    app = build_app(keys.config(), revocations=store)
    async with client(app) as http:
        answer = await http.get("/health")
        assert (answer.status_code, answer.json()) == (
            200,
            {
                "status": "ok",
                "revocations": {"fresh": True, "last_sync": 1.5, "entries": 0, "fail_open": False},
            },
        )
        # Cut off and failing closed: a load balancer must stop sending it traffic.
        store.state = dataclasses.replace(store.state, fresh=False)
        answer = await http.get("/health")
        assert (answer.status_code, answer.json()["status"]) == (503, "unavailable")
        store.state = dataclasses.replace(store.state, fail_open=True)
        answer = await http.get("/health")
        assert (answer.status_code, answer.json()["status"]) == (200, "degraded")
    # A list in memory reports nothing: /health is the plain one.
    async with client(build_app(keys.config(), revocations=RevocationList())) as http:
        answer = await http.get("/health")
        assert answer.status_code == 200
        assert "revocations" not in answer.json()


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"revoke_path": "/health"}, "revoke_path"),
        ({"revoke_path": "/gen-jwt"}, "revoke_path"),
        ({"revoke_path": "/r/*"}, "revoke_path"),
        ({"forward_auth_path": "/revoke"}, "forward_auth_path"),
    ],
)
def test_build_app_refuses_a_revoke_path_already_served(
    keys: Keys, options: dict[str, Any], field: str
) -> None:
    with pytest.raises(ConfigError) as info:
        build_app(keys.config(), **options)
    assert info.value.field == field


def test_revoke_path_and_workers_reach_the_worker_processes() -> None:
    settings = ServeSettings(revoke_path="/admin/revoke", workers=3)
    assert ServeSettings.from_env(settings.to_env()) == settings
    off = ServeSettings(revoke_path=None)
    assert off.to_env()["DEVICEGATE_REVOKE_PATH"] == "none"
    assert ServeSettings.from_env(off.to_env()).revoke_path is None


def replace_file(path: Path, document: str | None) -> None:
    """Write ``document`` over ``path``, or remove it for ``None``."""
    if document is None:
        path.unlink()
    else:
        path.write_text(document)


def built(secrets_file: Path, **options: Any) -> ReloadableApp:
    return ServeSettings(secrets_file=str(secrets_file), **options).build({})


async def test_reload_puts_new_keys_in_force_and_keeps_revocations(
    secrets_file: Path, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    app = built(secrets_file, forward_auth_path="/_devicegate/auth")
    new = fresh_keys()
    async with client(app) as http:
        revoked = await http.post("/revoke", headers={"x-api-key": keys.api_key}, json={"sub": "a"})
        assert revoked.status_code == 200
        write_secrets(secrets_file, new)
        with caplog.at_level(logging.INFO, logger="devicegate"):
            assert await app.reload() is True
        assert [record.getMessage() for record in caplog.records] == [
            f"devicegate: reloaded {secrets_file}: new keys and secrets apply to new requests"
        ]
        for key, status in ((keys.api_key, 401), (new.api_key, 200)):
            assert (await http.get("/whoami", headers={"x-api-key": key})).status_code == status
            asked = {"x-api-key": key, "x-original-uri": "/api"}
            expected = 204 if status == 200 else 401
            assert (await http.get("/_devicegate/auth", headers=asked)).status_code == expected
        # The revocation made before the reload still holds under the new secret.
        minted = await http.post("/gen-jwt", headers={"x-api-key": new.api_key}, json={})
        assert minted.status_code == 200
        assert app.gate.verifier.revocations is not None
        assert app.gate.verifier.revocations.is_revoked({"sub": "a", "iat": 0})


@pytest.mark.parametrize(
    "document",
    [
        pytest.param("{not json", id="not-json"),
        pytest.param(json.dumps({"api_key": "short"}), id="weak-key"),
        pytest.param(json.dumps({"api_key": "k" * 40, "jwt_secret": "k" * 40}), id="reused"),
        pytest.param(None, id="missing"),
    ],
)
async def test_reload_refuses_a_broken_file_and_keeps_the_old_keys(
    secrets_file: Path,
    keys: Keys,
    caplog: pytest.LogCaptureFixture,
    document: str | None,
) -> None:
    app = built(secrets_file)
    replace_file(secrets_file, document)
    with caplog.at_level(logging.INFO, logger="devicegate"):
        assert await app.reload() is False
    (record,) = caplog.records
    assert record.levelno == logging.ERROR
    assert record.getMessage().startswith(
        "devicegate: reload refused, the configuration in force stays: "
    )
    assert keys.api_key not in record.getMessage()
    async with client(app) as http:
        assert (await http.get("/whoami", headers={"x-api-key": keys.api_key})).status_code == 200


async def test_reload_is_all_or_nothing_across_gate_and_forward_auth(
    secrets_file: Path, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The new file's api_key is the forward-auth secret: the gate alone could take it, the
    # forward-auth endpoint cannot; neither changes.
    shared = "f" * 8 + "orward-auth-shared-secret"
    monkeypatch.setenv("FA_SECRET", shared)
    settings = ServeSettings(
        secrets_file=str(secrets_file),
        forward_auth_path="/_devicegate/auth",
        forward_auth_secret_env="FA_SECRET",
    )
    app = settings.build(os.environ)
    before = app.gate.config
    write_secrets(secrets_file, keys, api_key=shared)
    assert await app.reload() is False
    assert app.gate.config is before
    assert app.forward_auth is not None
    assert app.forward_auth.config is before


@pytest.mark.skipif(not can_receive_hangup(), reason="no SIGHUP here")
async def test_sighup_during_the_lifespan_reloads_on_either_event_loop(
    secrets_file: Path, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = built(secrets_file)
    new = fresh_keys()
    reloaded = anyio.Event()
    reload = app.reload

    async def reload_and_tell() -> bool:
        done = await reload()
        reloaded.set()
        return done

    monkeypatch.setattr(app, "reload", reload_and_tell)
    to_app, app_inbox = anyio.create_memory_object_stream[Message](2)
    app_outbox, from_app = anyio.create_memory_object_stream[Message](2)
    async with to_app, app_inbox, app_outbox, from_app, anyio.create_task_group() as tasks:
        tasks.start_soon(app, lifespan_scope(), app_inbox.receive, app_outbox.send)
        await to_app.send({"type": "lifespan.startup"})
        assert (await from_app.receive())["type"] == "lifespan.startup.complete"
        write_secrets(secrets_file, new)
        os.kill(os.getpid(), signal.SIGHUP)
        with anyio.fail_after(IO_SECONDS):
            await reloaded.wait()
        assert app.config.api_keys == (new.api_key,)
        await to_app.send({"type": "lifespan.shutdown"})
        assert (await from_app.receive())["type"] == "lifespan.shutdown.complete"


@pytest.mark.integration
def test_a_worker_that_cannot_start_says_why_in_one_line(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "broken.json"
    path.write_text("{")
    path.chmod(0o600)
    environment = {**os.environ, **ServeSettings(secrets_file=str(path), workers=2).to_env()}
    program = "from devicegate.gateway._app import app_from_env; app_from_env()"
    done = subprocess.run(  # noqa: S603 - a fixed command line
        [sys.executable, "-c", program],
        env=child_env(environment),
        capture_output=True,
        text=True,
        timeout=IO_SECONDS,
        check=False,
    )
    # 1, not uvicorn's startup failure (3), which would stop every other worker.
    assert done.returncode == 1
    line = one_line(done.stderr)
    assert line.startswith("devicegate: this worker cannot start, the configuration is refused:")


# -- against a real devicegate serve ------------------------------------------------------------


@contextlib.contextmanager
def running_serve(cwd: Path, *args: str) -> Iterator[Server]:
    """``devicegate serve ARGS --secrets secrets.json`` in ``cwd``, once it answers /health."""
    command = devicegate_command("--secrets", "secrets.json", *args)
    with serve(command, cwd / "serve.log", cwd=cwd, ready=answers("/health")) as server:
        yield server


def devicegate(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``devicegate ARGS`` as a user would, in ``cwd``."""
    return subprocess.run(  # noqa: S603 - a fixed command line built by the test
        [sys.executable, "-m", "devicegate", *args],
        cwd=cwd,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=IO_SECONDS,
        check=False,
    )


def until(condition: Callable[[], bool], what: str, seconds: float = START_SECONDS) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def status(server: Server, path: str, headers: dict[str, str]) -> int:
    with sync_client(server.url) as http:
        return http.get(path, headers=headers).status_code


def hang_up(server: Server, line: str) -> None:
    """Send SIGHUP to ``serve`` and wait until it has logged ``line`` once more."""
    seen = server.output().count(line)
    os.kill(server.process.pid, signal.SIGHUP)
    until(lambda: server.output().count(line) > seen, f"{line!r} in the log")


RELOADED = "devicegate: reloaded "
REFUSED = "devicegate: reload refused, the configuration in force stays: "


@pytest.mark.integration
def test_real_revoke_through_the_cli(secrets_file: Path, tmp_path: Path) -> None:
    with running_serve(tmp_path) as server:
        assert f"revocation endpoint: POST {server.url}/revoke" in server.output()
        minted = devicegate(tmp_path, "token", "--instance-id", "phone-1", "--sub", "alice")
        token = minted.stdout.strip()
        other = devicegate(tmp_path, "token", "--instance-id", "phone-2").stdout.strip()
        assert status(server, "/whoami", bearer(token, "phone-1")) == 200

        revoked = devicegate(tmp_path, "revoke", "--device", "phone-1", "--url", server.url)
        assert (revoked.returncode, revoked.stderr) == (0, "")
        assert revoked.stdout.startswith("revoked every token of the device 'phone-1' issued")
        # Refused on its very next request (it was cached); another device's token is not.
        assert status(server, "/whoami", bearer(token, "phone-1")) == 401
        assert status(server, "/whoami", bearer(other, "phone-2")) == 200

        jti = jti_of(other)
        by_jti = devicegate(tmp_path, "revoke", "--jti", jti, "--url", server.url)
        assert by_jti.stdout == f"revoked the token with jti {jti!r}\n"
        assert status(server, "/whoami", bearer(other, "phone-2")) == 401

        wrong = tmp_path / "other.json"
        write_secrets(wrong, fresh_keys())
        refused = devicegate(
            tmp_path, "revoke", "--all", "--url", server.url, "--secrets", "other.json"
        )
        assert refused.returncode == 1
        assert one_line(refused.stderr).startswith(
            f"devicegate: the server at {HOST}:{server.port} did not revoke (401"
        )
        assert "Traceback" not in server.output()


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[Server]:
    with serve(uvicorn_command("tests.servers.echo:app"), tmp_path / "echo.log") as server:
        yield server


@pytest.mark.integration
async def test_real_workers_refuse_revocation_and_never_forward_it(
    secrets_file: Path, keys: Keys, tmp_path: Path, upstream: Server
) -> None:
    with running_serve(tmp_path, "--workers", "2", "--upstream", upstream.url) as server:
        (line,) = [line for line in server.output().splitlines() if "revocation endpoint" in line]
        assert line.strip().startswith("revocation endpoint: off with 2 workers: an in-memory")
        assert "a shared store is needed" in line
        for _ in range(4):  # whichever worker answers
            with sync_client(server.url) as http:
                answer = http.post("/revoke", headers={"x-api-key": keys.api_key}, json={})
            assert answer.status_code == 501
            assert answer.json()["error"] == "revocation_off"
        refused = devicegate(tmp_path, "revoke", "--all", "--url", server.url)
        assert refused.returncode == 1
        assert "did not revoke (501: revocation_off: Revocation is off" in one_line(refused.stderr)
        assert status(server, "/api", {"x-api-key": keys.api_key}) == 200  # the upstream is there
    assert [target for target in await seen_by(upstream) if "revoke" in target] == []


@pytest.mark.integration
def test_real_sighup_rotates_the_api_key(secrets_file: Path, keys: Keys, tmp_path: Path) -> None:
    new = fresh_keys()
    with running_serve(tmp_path) as server:
        old_key, new_key = {"x-api-key": keys.api_key}, {"x-api-key": new.api_key}
        assert (status(server, "/whoami", old_key), status(server, "/whoami", new_key)) == (
            200,
            401,
        )
        # Rotation: the new key first in the list, the old one still accepted.
        write_secrets(secrets_file, keys, api_key=[new.api_key, keys.api_key])
        hang_up(server, RELOADED)
        assert (status(server, "/whoami", old_key), status(server, "/whoami", new_key)) == (
            200,
            200,
        )
        # ... then the old key removed.
        write_secrets(secrets_file, keys, api_key=new.api_key)
        hang_up(server, RELOADED)
        assert (status(server, "/whoami", old_key), status(server, "/whoami", new_key)) == (
            401,
            200,
        )
        # devicegate token and revoke read the first key, the one in force.
        assert devicegate(tmp_path, "revoke", "--all", "--url", server.url).returncode == 0
        assert server.process.poll() is None
        assert "Traceback" not in server.output()


@pytest.mark.integration
def test_real_sighup_with_a_broken_file_keeps_the_old_keys(
    secrets_file: Path, keys: Keys, tmp_path: Path
) -> None:
    with running_serve(tmp_path) as server:
        secrets_file.write_text('{"api_key": "short", "jwt_secret": ')
        hang_up(server, REFUSED)
        refusals = [line for line in server.output().splitlines() if REFUSED in line]
        assert len(refusals) == 1
        assert status(server, "/whoami", {"x-api-key": keys.api_key}) == 200
        assert server.process.poll() is None
        assert "Traceback" not in server.output()


def uvicorn_restarts_safely() -> bool:
    # uvicorn 0.51 brings each replacement worker up before retiring the old one on SIGHUP, and
    # keeps the old one when the replacement cannot start; earlier versions stop it first.
    major, minor = importlib.metadata.version("uvicorn").split(".")[:2]
    return (int(major), int(minor)) >= (0, 51)


@pytest.mark.integration
@pytest.mark.skipif(not uvicorn_restarts_safely(), reason="uvicorn < 0.51 restarts unsafely")
def test_real_sighup_with_workers_and_a_broken_file_keeps_the_workers(
    secrets_file: Path, keys: Keys, tmp_path: Path
) -> None:
    with running_serve(tmp_path, "--workers", "2") as server:
        until(lambda: server.output().count("Application startup complete") >= 2, "two workers")
        secrets_file.write_text("{")
        hang_up(server, "aborting the restart")
        output = server.output()
        assert output.count("devicegate: this worker cannot start") == 1
        assert server.process.poll() is None
        for _ in range(4):
            assert status(server, "/whoami", {"x-api-key": keys.api_key}) == 200


@pytest.mark.integration
@pytest.mark.skipif(not uvicorn_restarts_safely(), reason="uvicorn < 0.51 restarts unsafely")
def test_real_sighup_with_workers_replaces_them_with_the_new_keys(
    secrets_file: Path, keys: Keys, tmp_path: Path
) -> None:
    new = fresh_keys()
    with running_serve(tmp_path, "--workers", "2") as server:
        until(lambda: server.output().count("Application startup complete") >= 2, "two workers")
        write_secrets(secrets_file, new)
        os.kill(server.process.pid, signal.SIGHUP)
        # uvicorn starts each replacement, then retires the worker it replaces.
        until(
            lambda: server.output().count("Finished server process") >= 2,
            "both old workers to finish",
        )
        for _ in range(4):
            assert status(server, "/whoami", {"x-api-key": new.api_key}) == 200
            assert status(server, "/whoami", {"x-api-key": keys.api_key}) == 401


def seen_now(server: Server) -> list[str]:
    with sync_client(server.url) as http:
        seen: list[str] = http.get("/__seen").json()
    return seen


@pytest.mark.integration
def test_real_request_in_flight_during_sighup_completes(
    secrets_file: Path, keys: Keys, tmp_path: Path, upstream: Server
) -> None:
    """A request admitted under the old key finishes after the key is gone."""
    go = threading.Event()
    results: list[httpx.Response | BaseException] = []
    # Larger than the gateway buffers: streamed, so the upstream has the request mid-body.
    first = b"x" * (ProxyLimits().buffer_bytes + 1)

    def body() -> Iterator[bytes]:
        yield first
        go.wait(IO_SECONDS)
        yield b"second part"

    def upload(url: str) -> None:
        try:
            with sync_client(url) as http:
                results.append(
                    http.post("/upload", headers={"x-api-key": keys.api_key}, content=body())
                )
        except BaseException as exc:  # reported by the assertion below
            results.append(exc)

    new = fresh_keys()
    with running_serve(tmp_path, "--upstream", upstream.url) as server:
        thread = threading.Thread(target=upload, args=(server.url,))
        thread.start()
        try:
            # The upstream has the request: the gateway admitted it and is streaming its body.
            until(lambda: "/upload" in seen_now(upstream), "the upload")
            write_secrets(secrets_file, new)
            hang_up(server, RELOADED)
            assert status(server, "/api", {"x-api-key": keys.api_key}) == 401
        finally:
            go.set()
            thread.join(IO_SECONDS)
    (result,) = results
    assert isinstance(result, httpx.Response), result
    assert result.status_code == 200
    assert result.json()["body_length"] == len(first + b"second part")


@pytest.mark.parametrize(
    ("before", "shown"),
    [
        (1_700_000_000, "2023-11-14T22:13:20Z (1700000000)"),
        (1_700_000_000.25, "2023-11-14T22:13:20Z (1700000000.25)"),
        # Cut, never rounded up: the cutoff shown is never later than the server's.
        (1_700_000_000.9999, "2023-11-14T22:13:20Z (1700000000.999)"),
        (None, "now"),
        (True, "now"),
    ],
)
def test_revoke_shows_the_cutoff_the_server_applied(before: object, shown: str) -> None:
    assert cli._moment(before) == shown


@pytest.mark.integration
def test_real_sighup_rotates_a_key_pair_add_promote_retire(keys: Keys, tmp_path: Path) -> None:
    # The README's three steps, each a rewrite of secrets.json and a SIGHUP: tokens of each key
    # are admitted or refused exactly when they should be, and the JWKS follows.
    old, new = ed25519.Ed25519PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate()
    device = "device-rotating"
    base = {"api_key": keys.api_key, "mobile_api_key": keys.mobile_api_key}
    secrets_file = tmp_path / "secrets.json"

    def stage(**members: Any) -> None:
        write_secrets(secrets_file, None, **base, **members)

    def mint(server: Server) -> str:
        with sync_client(server.url) as http:
            answer = http.post(
                "/gen-jwt", headers={"x-api-key": keys.api_key}, json={"instance_id": device}
            )
        assert answer.status_code == 200
        token: str = answer.json()["access_token"]
        return token

    def published(server: Server) -> list[str]:
        with sync_client(server.url) as http:
            return [jwk["kid"] for jwk in http.get("/.well-known/jwks.json").json()["keys"]]

    def admitted(server: Server, token: str) -> bool:
        return status(server, "/whoami", bearer(token, device)) == 200

    by_new = (
        TokenIssuer(GateConfig(jwt_private_key={"2026-12": private_pem(new)}))
        .issue(device)
        .access_token
    )  # minted by an instance that already holds the new key
    stage(jwt_private_key={"2026-06": private_pem(old)})
    with running_serve(tmp_path) as server:
        by_old = mint(server)
        assert jwt.get_unverified_header(by_old)["kid"] == "2026-06"
        assert (admitted(server, by_old), admitted(server, by_new)) == (True, False)
        assert published(server) == ["2026-06"]

        # 1. Add: the new public key verifies and is published; the old key still signs.
        stage(
            jwt_private_key={"2026-06": private_pem(old)},
            jwt_public_keys={"2026-12": public_pem(new)},
        )
        hang_up(server, RELOADED)
        assert (admitted(server, by_old), admitted(server, by_new)) == (True, True)
        assert published(server) == ["2026-06", "2026-12"]
        assert jwt.get_unverified_header(mint(server))["kid"] == "2026-06"

        # 2. Promote: the new key signs; the old one only verifies.
        stage(
            jwt_private_key={"2026-12": private_pem(new)},
            jwt_public_keys={"2026-06": public_pem(old)},
        )
        hang_up(server, RELOADED)
        assert (admitted(server, by_old), admitted(server, by_new)) == (True, True)
        assert published(server) == ["2026-12", "2026-06"]
        assert jwt.get_unverified_header(mint(server))["kid"] == "2026-12"

        # 3. Retire: the old key's tokens stop at once, though the gate has them cached.
        stage(jwt_private_key={"2026-12": private_pem(new)})
        hang_up(server, RELOADED)
        assert (admitted(server, by_old), admitted(server, by_new)) == (False, True)
        assert published(server) == ["2026-12"]
        assert "Traceback" not in server.output()
