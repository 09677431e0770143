"""Every Python and shell example of README.md and docs/*.md, run as written.

README.md's Python blocks run in ``tests/test_readme.py``; this module runs the rest: the
Python blocks of the deployment guide in process, and the shell blocks of both against a real
``devicegate serve`` (and, for the gateway, a real upstream). What each block shows as output
(the lines after a ``$ command``) must be what the command prints, with ``...`` standing for
anything and times compared by shape only.

A block runs as written except for what a test machine must change, and nothing else:

* paths under ``/etc/`` are moved into the test's own directory;
* the addresses ``127.0.0.1:8000`` (devicegate) and ``127.0.0.1:8080`` (an upstream) become free
  ports, and ``--host 0.0.0.0`` becomes ``127.0.0.1`` (a test listens on no public interface);
* ``devicegate`` is the command of this checkout, and ``$API_KEY`` holds the server API key.

:data:`HOW` lists every fenced block of the documents, with how it is run or why it cannot be:
a new block needs a line there. A failure here means a document is wrong (or devicegate no
longer does what it says): fix the document, not this file.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

import devicegate
from devicegate import DeviceAuthMiddleware
from devicegate.gateway.forward_auth import ForwardAuth
from devicegate.gateway.proxy import ReverseProxy
from tests.helpers import Keys, RecordingApp, bearer, client, fresh_keys, write_secrets
from tests.servers.process import (
    HOST,
    ROOT,
    Server,
    answers,
    child_env,
    devicegate_command,
    serve,
    sync_client,
    uvicorn_command,
)

README = ROOT / "README.md"
DEPLOYMENT = ROOT / "docs" / "deployment.md"
DOCUMENTS = (README, DEPLOYMENT)
SHELLS = frozenset({"console", "bash", "sh", "shell"})
RUN_SECONDS = 60.0


@dataclass(frozen=True)
class Block:
    """One fenced block of a document, under the nearest heading above it."""

    document: str  # the file name
    heading: str
    language: str
    line: int  # 1-based line of the first line of code
    code: str


def fenced_blocks(path: Path) -> list[Block]:
    """Every fenced block of ``path``, indented ones (in a list item) dedented."""
    blocks: list[Block] = []
    heading, fence, start, indent = "", None, 0, ""
    lines: list[str] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        stripped = line.lstrip()
        if fence is None:
            if stripped.startswith("```"):
                fence, start, lines = stripped[3:].strip(), number + 1, []
                indent = line[: len(line) - len(stripped)]
            elif line.startswith("#"):
                heading = line.lstrip("#").strip()
        elif stripped.startswith("```") and line.startswith(indent):
            code = textwrap.dedent("\n".join(lines)) + "\n"
            blocks.append(Block(path.name, heading, fence, start, code))
            fence = None
        else:
            lines.append(line)
    assert fence is None, f"{path.name} has an unclosed code fence"
    return blocks


BLOCKS = [block for path in DOCUMENTS for block in fenced_blocks(path)]

NGINX = "needs nginx; tests/test_auth_proxies.py runs the same file and checks this copy"
CADDY = "needs Caddy; tests/test_auth_proxies.py runs the same file and checks this copy"

# Every block, by document, heading and language: the test that runs it, or why none can.
HOW: dict[tuple[str, str, str], str] = {
    # -- README.md --
    ("README.md", "Two commands on a fresh machine", "console"): (
        "not run: installs packages and runs the whole suite (tests/test_scripts.py runs "
        "scripts/serve with stand-ins; CI runs scripts/test)"
    ),
    ("README.md", "Starlette", "python"): "tests/test_readme.py",
    ("README.md", "FastAPI", "python"): "tests/test_readme.py",
    ("README.md", "Quart", "python"): "tests/test_readme.py",
    ("README.md", "Rules", "python"): "tests/test_readme.py",
    ("README.md", "FastAPI dependencies and /docs", "python"): "tests/test_readme.py",
    ("README.md", "Logs", "text"): "not code: sample log lines (tests/test_audit.py)",
    ("README.md", "Metrics", "python"): "tests/test_readme.py",
    ("README.md", "Configuration", "json"): "not code: a secrets.json with placeholders",
    ("README.md", "Minting tokens", "console"): "test_shell_examples_against_a_real_serve",
    ("README.md", "Minting tokens", "json"): "not code: a request body",
    ("README.md", "Minting tokens", "python"): "tests/test_readme.py",
    ("README.md", "Revoking", "python"): "tests/test_readme.py",
    ("README.md", "Revoking", "console"): "test_shell_examples_against_a_real_serve",
    ("README.md", "Revoking across instances: Redis", "python"): (
        "tests/test_redis.py, against a real redis-server"
    ),
    ("README.md", "Revoking across instances: Redis", "console"): (
        "not run here: the command runs tests/test_redis_serve.py, which the suite runs"
    ),
    ("README.md", "Proof of possession: DPoP", "python"): "tests/test_dpop.py",
    ("README.md", "Proof of possession: DPoP", "text"): (
        "not run: a sketch with the user's own login; tests/test_client.py runs DPoPAuth so "
        "against a real serve"
    ),
    ("README.md", "Rate limits", "python"): (
        "tests/test_ratelimit.py, against a real redis-server"
    ),
    ("README.md", "Revoking across instances: Redis", "http"): (
        "not code: the /health answer (tests/test_redis_serve.py checks it from a real serve)"
    ),
    ("README.md", "Reliability", "console"): (
        "not run: the full soak runs for minutes (tests/test_soak.py runs its short form)"
    ),
    ("README.md", "Performance", "console"): (
        "not run: installs the bench extra and runs the full benchmark for minutes "
        "(tests/test_benchmarks_smoke.py runs it briefly)"
    ),
    ("README.md", "Instruction counts", "console"): (
        "not run: counts for a minute and a half under valgrind "
        "(tests/test_benchmarks_smoke.py counts one row)"
    ),
    ("README.md", "Keys: key ids, EdDSA and ES256, the JWKS", "json"): (
        "not code: a secrets.json and a JWKS document with placeholders"
    ),
    ("README.md", "Development", "console"): "not run: runs this very suite",
    # -- docs/deployment.md --
    ("deployment.md", "In front of a SenseCrypt server (gateway)", "console"): (
        "test_gateway_commands"
    ),
    ("deployment.md", "In front of a SenseCrypt server (gateway)", "python"): (
        "test_gateway_library_example"
    ),
    ("deployment.md", "Behind nginx (`auth_request`)", "nginx"): NGINX,
    ("deployment.md", "Behind nginx (`auth_request`)", "console"): "test_forward_auth_commands",
    ("deployment.md", "Behind nginx (`auth_request`)", "python"): (
        "test_forward_auth_library_example"
    ),
    ("deployment.md", "Behind Traefik (`ForwardAuth` middleware)", "yaml"): (
        "needs Traefik, which the test suite does not install"
    ),
    ("deployment.md", "Behind Caddy (forward auth)", "caddyfile"): CADDY,
    ("deployment.md", "Naming keys", "json"): "not code: a secrets.json with placeholders",
    ("deployment.md", "Custom claims", "console"): "test_shell_examples_against_a_real_serve",
    ("deployment.md", "Revoking", "console"): "test_shell_examples_against_a_real_serve",
    ("deployment.md", "Rotating keys and secrets without a restart", "python"): (
        "test_reconfigure_example"
    ),
    ("deployment.md", "Other services verifying devicegate's tokens", "yaml"): (
        "needs Envoy, which the test suite does not install"
    ),
    ("deployment.md", "Other services verifying devicegate's tokens", "text"): (
        "PyJWT code that tests/test_jwks.py runs against a real server"
    ),
    ("deployment.md", "TLS termination at the proxy", "nginx"): (
        "needs nginx and a certificate for a public name"
    ),
}


def block(document: Path, heading: str, language: str) -> Block:
    (found,) = [
        b
        for b in BLOCKS
        if (b.document, b.heading, b.language) == (document.name, heading, language)
    ]
    return found


def test_every_block_is_accounted_for() -> None:
    seen = [(b.document, b.heading, b.language) for b in BLOCKS]
    assert sorted(set(seen)) == sorted(HOW), "a block was added, moved or removed: update HOW"
    # One block per key, except where a heading holds two of a kind that are never run.
    twice = {key for key in seen if seen.count(key) > 1}
    assert twice == {
        ("README.md", "Two commands on a fresh machine", "console"),
        ("README.md", "Keys: key ids, EdDSA and ES256, the JWKS", "json"),
        ("deployment.md", "Behind Traefik (`ForwardAuth` middleware)", "yaml"),
    }


# -- what a test machine changes -----------------------------------------------------------------


def as_run_here(code: str, root: Path, *, port: int = 8000, upstream_port: int = 8080) -> str:
    """``code`` with the substitutions the module docstring lists, and no others."""
    code = code.replace("/etc/", f"{root}/etc/")
    code = code.replace("--host 0.0.0.0", f"--host {HOST}")
    code = code.replace("127.0.0.1:8080", f"{HOST}:{upstream_port}")
    code = code.replace("127.0.0.1:8000", f"{HOST}:{port}")
    return code.replace("--port 8000", f"--port {port}")


def run_python(block: Block, namespace: dict[str, Any]) -> None:
    tree = ast.parse(block.code, filename=f"{block.document}:{block.line}")
    ast.increment_lineno(tree, block.line - 1)  # tracebacks point at the document's lines
    # The document's code is the code under test here; it is this repository's own text.
    exec(compile(tree, block.document, "exec"), namespace)  # noqa: S102


def sensecrypt_files(root: Path, keys: Keys, sensecrypt: Keys) -> None:
    """devicegate's ``secrets.json`` and the SenseCrypt server's, where the guide puts them."""
    (root / "etc" / "devicegate").mkdir(parents=True)
    (root / "etc" / "sensecrypt").mkdir(parents=True)
    write_secrets(root / "etc" / "devicegate" / "secrets.json", keys)
    write_secrets(root / "etc" / "sensecrypt" / "secrets.json", sensecrypt)


# -- the Python blocks of the deployment guide ---------------------------------------------------


async def test_gateway_library_example(
    tmp_path: Path, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    sensecrypt = fresh_keys()
    sensecrypt_files(tmp_path, keys, sensecrypt)
    example = block(DEPLOYMENT, "In front of a SenseCrypt server (gateway)", "python")
    namespace: dict[str, Any] = {"__name__": "deployment_gateway"}
    run_python(
        Block(**{**example.__dict__, "code": as_run_here(example.code, tmp_path)}), namespace
    )
    app, proxy = namespace["app"], namespace["proxy"]
    assert isinstance(app, DeviceAuthMiddleware)
    assert isinstance(proxy, ReverseProxy)
    assert app.app is proxy
    assert (proxy.timeout, proxy.upstream) == (10.0, f"http://{HOST}:8080")

    # "injects the SenseCrypt server's keys into the requests it forwards": what an upstream
    # at 127.0.0.1:8080 receives, answered in process instead (the proxy opens its pool lazily).
    def upstream(request: httpx.Request) -> httpx.Response:
        names = ("x-api-key", "authorization")
        return httpx.Response(200, json={name: request.headers.get(name) for name in names})

    real = httpx.AsyncClient

    def pooled(**options: Any) -> httpx.AsyncClient:
        return real(**{"transport": httpx.MockTransport(upstream), **options})

    monkeypatch.setattr(httpx, "AsyncClient", pooled)
    async with client(app) as http:
        server = await http.get("/items", headers={"x-api-key": keys.api_key})
        mobile = await http.get("/items", headers={"authorization": keys.mobile_api_key})
        health = await http.get("/health")
    assert server.json() == {"x-api-key": sensecrypt.api_key, "authorization": None}
    assert mobile.json() == {"x-api-key": None, "authorization": sensecrypt.mobile_api_key}
    assert health.status_code == 200


async def test_forward_auth_library_example(
    tmp_path: Path, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    sensecrypt_files(tmp_path, keys, fresh_keys())
    secret = "a-shared-secret-0123456789"
    monkeypatch.setenv("DEVICEGATE_FORWARD_SECRET", secret)
    example = block(DEPLOYMENT, "Behind nginx (`auth_request`)", "python")
    namespace: dict[str, Any] = {"__name__": "deployment_forward_auth"}
    run_python(
        Block(**{**example.__dict__, "code": as_run_here(example.code, tmp_path)}), namespace
    )
    app = namespace["app"]
    assert isinstance(app, ForwardAuth)

    async def decide(uri: str, headers: dict[str, str]) -> int:
        asked = {"x-original-uri": uri, "x-devicegate-forward-secret": secret, **headers}
        async with client(app) as http:
            return (await http.get("/_devicegate/auth", headers=asked)).status_code

    # The rules of the example: /admin/* for servers, /mobile/* for phones, /health public.
    assert await decide("/health", {}) == 204
    assert await decide("/admin/users", {"x-api-key": keys.api_key}) == 204
    assert await decide("/admin/users", {"authorization": keys.mobile_api_key}) == 403
    assert await decide("/mobile/feed", {"authorization": keys.mobile_api_key}) == 204
    assert await decide("/mobile/feed", {"x-api-key": keys.api_key}) == 403


def test_reconfigure_example(tmp_path: Path, keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    # A continuation: "in your own app", where ``middleware`` is the app's DeviceAuthMiddleware
    # and devicegate's names are imported; it runs where secrets.json is.
    example = block(DEPLOYMENT, "Rotating keys and secrets without a restart", "python")
    middleware = DeviceAuthMiddleware(RecordingApp(), config=keys.config())
    rotated = fresh_keys()
    write_secrets(tmp_path / "secrets.json", rotated)
    monkeypatch.chdir(tmp_path)
    namespace = {name: getattr(devicegate, name) for name in devicegate.__all__}
    run_python(example, {**namespace, "middleware": middleware})
    assert middleware.config.api_keys == (rotated.api_key,)


# -- the shell blocks ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    """One ``$ command`` of a shell block (continuation lines joined) and the output shown."""

    text: str
    shown: tuple[str, ...]


def prompted_commands(code: str) -> list[Command]:
    commands: list[Command] = []
    text: list[str] = []
    shown: list[str] = []
    for line in code.splitlines():
        if line.startswith("$ ") or (text and text[-1].endswith("\\") and not shown):
            if line.startswith("$ ") and text:
                commands.append(Command("\n".join(text), tuple(shown)))
                text, shown = [], []
            text.append(line.removeprefix("$ "))
        else:
            shown.append(line)
    if text:
        commands.append(Command("\n".join(text), tuple(shown)))
    return commands


_TIMES = [
    (re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"), "<time>"),
    (re.compile(r"\b\d{10}(?:\.\d+)?\b"), "<unixtime>"),
]


def shown_matches(shown: str, printed: str) -> bool:
    """Whether ``printed`` is what a document shows: ``...`` stands for anything, and dates and
    Unix times (which change every run) are compared by shape."""
    for pattern, placeholder in _TIMES:
        shown, printed = pattern.sub(placeholder, shown), pattern.sub(placeholder, printed)
    expected = re.escape(shown).replace(re.escape("..."), ".*?")
    return re.fullmatch(expected, printed, re.DOTALL) is not None


def devicegate_on_path(directory: Path) -> str:
    """A ``PATH`` whose ``devicegate`` is this checkout's, run by this interpreter."""
    directory.mkdir(exist_ok=True)
    command = directory / "devicegate"
    command.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m devicegate "$@"\n')
    command.chmod(0o755)
    return os.pathsep.join([str(directory), os.environ.get("PATH", "")])


def bash(line: str, cwd: Path, environ: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603 - a document's own line, run as a reader would
        ["bash", "-c", line],  # noqa: S607 - bash from PATH, as a reader would
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=RUN_SECONDS,
        env=child_env(environ),
        check=False,
    )


@contextlib.contextmanager
def running(
    command: Callable[[int], list[str]], cwd: Path, environ: dict[str, str] | None = None
) -> Iterator[Server]:
    with serve(
        command,
        cwd / f"server-{len(list(cwd.glob('server-*')))}.log",
        cwd=cwd,
        env=environ,
        ready=answers("/health"),
    ) as server:
        yield server


PROMPTED = [
    (README, "Minting tokens"),
    (README, "Revoking"),
    (DEPLOYMENT, "Custom claims"),
    (DEPLOYMENT, "Revoking"),
]


@pytest.mark.integration
@pytest.mark.parametrize(
    ("document", "heading"),
    [pytest.param(d, h, id=f"{d.name}-{h}") for d, h in PROMPTED],
)
def test_shell_examples_against_a_real_serve(
    tmp_path: Path, keys: Keys, document: Path, heading: str
) -> None:
    example = block(document, heading, "console")
    write_secrets(tmp_path / "secrets.json", keys)
    environ = {"PATH": devicegate_on_path(tmp_path / "bin"), "API_KEY": keys.api_key}
    with running(devicegate_command("--secrets", "secrets.json"), tmp_path) as server:
        for command in prompted_commands(example.code):
            line = as_run_here(command.text, tmp_path, port=server.port)
            result = bash(line, tmp_path, environ)
            where = f"{document.name}:{example.line}: {command.text.splitlines()[0]}"
            assert result.returncode == 0, f"{where}\n{result.stderr}"
            if command.shown:
                assert shown_matches("\n".join(command.shown), result.stdout.rstrip("\n")), (
                    f"{where}: the document shows\n"
                    + "\n".join(command.shown)
                    + f"\nbut it printed\n{result.stdout}"
                )
    for secret in (keys.mobile_api_key, keys.jwt_secret):
        assert secret not in server.output()


def headers_seen(answer: httpx.Response) -> dict[str, str]:
    """The headers the echo upstream received, by lower-case name (last one wins)."""
    seen: dict[str, str] = dict(answer.json()["headers"])
    return seen


@pytest.mark.integration
def test_gateway_commands(tmp_path: Path, keys: Keys) -> None:
    example = block(DEPLOYMENT, "In front of a SenseCrypt server (gateway)", "console")
    sensecrypt = fresh_keys()
    (tmp_path / "etc" / "devicegate").mkdir(parents=True)
    (tmp_path / "etc" / "sensecrypt").mkdir()
    write_secrets(tmp_path / "etc" / "sensecrypt" / "secrets.json", sensecrypt)
    environ = {"PATH": devicegate_on_path(tmp_path / "bin")}
    with running(uvicorn_command("tests.servers.echo:app"), tmp_path) as upstream:

        def the_block(port: int) -> list[str]:
            code = as_run_here(example.code, tmp_path, port=port, upstream_port=upstream.port)
            return ["bash", "-c", code]

        with running(the_block, tmp_path, environ) as gateway:
            # The block's `devicegate init` wrote devicegate's own keys.
            ours = json.loads((tmp_path / "etc" / "devicegate" / "secrets.json").read_text())
            with sync_client(gateway.url) as http:
                minted = http.post(
                    "/gen-jwt", headers={"x-api-key": ours["api_key"]}, json={"instance_id": "d1"}
                )
                token = minted.json()["access_token"]
                as_device = http.get("/items", headers=bearer(token, "d1"))
                anonymous = http.get("/items")
    assert as_device.status_code == 200, as_device.text
    seen = headers_seen(as_device)
    # Devices never hold the upstream's keys: devicegate injects them.
    assert seen["authorization"] == sensecrypt.mobile_api_key
    assert (seen["x-devicegate-kind"], seen["x-devicegate-instance-id"]) == ("device_token", "d1")
    assert anonymous.status_code == 401


@pytest.mark.integration
def test_forward_auth_commands(tmp_path: Path, keys: Keys) -> None:
    example = block(DEPLOYMENT, "Behind nginx (`auth_request`)", "console")
    sensecrypt_files(tmp_path, keys, fresh_keys())
    environ = {"PATH": devicegate_on_path(tmp_path / "bin")}

    def the_block(port: int) -> list[str]:
        return ["bash", "-c", as_run_here(example.code, tmp_path, port=port)]

    with running(the_block, tmp_path, environ) as server, sync_client(server.url) as http:
        # The secret the block exported is required: without it, 403 before any credential.
        asked = {"x-original-uri": "/api", "x-api-key": keys.api_key}
        without_secret = http.get("/_devicegate/auth", headers=asked)
        health = http.get("/health")
    assert without_secret.status_code == 403
    assert without_secret.json()["error"] == "forbidden"
    assert health.status_code == 200
