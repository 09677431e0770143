"""What ``devicegate serve`` tells an operator: Prometheus metrics on a listener of their own
(``--metrics``), and logs that say why (``--log-level``, ``--log-format text|json``).

In process, ``uvicorn.run`` and prometheus_client's ``start_http_server`` are recorders; the
``integration`` tests start a real ``devicegate serve``, send it requests, scrape its metrics
with the client library's own parser and read what it printed.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import prometheus_client
import pytest
import uvicorn
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from devicegate import cli
from devicegate.gateway._logging import JsonFormatter, log_config
from tests.helpers import Keys, bearer, client, make_token, scrub_devicegate_env, write_secrets
from tests.servers.process import (
    HOST,
    START_SECONDS,
    Server,
    answers,
    bound_port,
    devicegate_command,
    free_port,
    serve,
    sync_client,
)

DEVICE = "device-A"
SECRET = "forward-shared-secret-0123456789"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Samples:
    """Every sample of a scrape, by name and sorted labels, parsed as Prometheus would."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def requests_total(kind: str, outcome: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return ("devicegate_requests_total", (("kind", kind), ("outcome", outcome)))


MINTED = ("devicegate_tokens_minted_total", ())


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    scrub_devicegate_env(monkeypatch)
    monkeypatch.chdir(tmp_path)
    yield
    for name in [name for name in os.environ if name.startswith("DEVICEGATE_")]:
        del os.environ[name]  # what serve --workers exported


@pytest.fixture
def secrets_file(tmp_path: Path, keys: Keys) -> Path:
    return write_secrets(tmp_path / "secrets.json", keys)


@pytest.fixture
def port() -> Iterator[int]:
    with bound_port(reuse_address=True) as number:
        yield number


@dataclass
class Recorder:
    """Stands for ``uvicorn.run`` and prometheus_client's ``start_http_server``."""

    runs: list[tuple[Any, dict[str, Any]]] = field(default_factory=list)
    listeners: list[tuple[int, str, CollectorRegistry]] = field(default_factory=list)

    def run(self, app: Any, **options: Any) -> None:
        self.runs.append((app, options))

    def start_http_server(self, port: int, addr: str, registry: CollectorRegistry) -> None:
        self.listeners.append((port, addr, registry))


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    recorded = Recorder()
    monkeypatch.setattr(uvicorn, "run", recorded.run)
    monkeypatch.setattr(prometheus_client, "start_http_server", recorded.start_http_server)
    return recorded


def one_line(text: str) -> str:
    assert "Traceback" not in text
    (line,) = text.strip().splitlines()
    return line


# -- metrics, in process -------------------------------------------------------------------------


async def test_metrics_count_what_the_served_app_decides(
    secrets_file: Path,
    keys: Keys,
    recorder: Recorder,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    port: int,
) -> None:
    monkeypatch.setenv("FORWARD_SECRET", SECRET)
    argv = ["serve", "--port", str(port), "--metrics", "9107", "--forward-auth-path"]
    argv += ["--forward-auth-secret-env", "FORWARD_SECRET"]
    assert cli.main(argv) == 0
    ((listen_port, address, registry),) = recorder.listeners
    assert (listen_port, address) == (9107, "127.0.0.1")  # private unless asked otherwise
    assert "  metrics: http://127.0.0.1:9107/metrics (Prometheus, on a listener of its own)\n" in (
        capsys.readouterr().err
    )
    ((app, _),) = recorder.runs
    expired = make_token(keys.jwt_secret, instance_id=DEVICE, lifetime=-5)
    async with client(app) as http:
        for _ in range(2):
            await http.get("/whoami", headers={"x-api-key": keys.api_key})
        await http.get("/whoami")
        await http.get("/whoami", headers=bearer(expired, DEVICE))
        await http.post("/gen-jwt", headers={"x-api-key": keys.api_key}, json={})
        # The forward-auth endpoint counts its decisions into the same counters.
        await http.get(
            "/_devicegate/auth",
            headers={"x-original-uri": "/x", "x-devicegate-forward-secret": SECRET},
        )
        not_here = await http.get("/metrics", headers={"x-api-key": keys.api_key})
    assert not_here.status_code == 404  # the API's port never serves them
    scraped = samples(generate_latest(registry).decode())
    # Two calls, the mint, and the call to /metrics on the API's port.
    assert scraped[requests_total("api_key", "admitted")] == 4
    assert scraped[requests_total("none", "no_credential")] == 2  # one direct, one asked
    assert scraped[requests_total("device_token", "expired")] == 1
    assert scraped[MINTED] == 1
    assert ("devicegate_token_cache_entries", ()) in scraped
    assert ("process_resident_memory_bytes", ()) in scraped or sys.platform != "linux"


@dataclass(frozen=True)
class Refused:
    argv: list[str]
    environ: dict[str, str]
    line: str


METRICS_REFUSED = [
    pytest.param(
        ["--metrics", "9107", "--workers", "2"],
        {},
        "--metrics needs one worker: each of the 2 workers counts its own requests, so one "
        "listener would show a part as the whole; run one worker per instance, and scrape "
        "each instance",
        id="several-workers",
    ),
    pytest.param(
        ["--metrics", "PORT"],
        {},
        "invalid configuration: --metrics: must be [ADDRESS:]PORT, such as 9100 or "
        "127.0.0.1:9100 ([::1]:9100 for IPv6); got 'PORT'",
        id="not-a-port",
    ),
    pytest.param(
        [],
        {"DEVICEGATE_METRICS": "::1:9100"},
        "invalid configuration: DEVICEGATE_METRICS: must be [ADDRESS:]PORT, such as 9100 or "
        "127.0.0.1:9100 ([::1]:9100 for IPv6); got '::1:9100'",
        id="ipv6-without-brackets",
    ),
    pytest.param(
        ["--metrics", "70000"],
        {},
        "invalid configuration: --metrics: must be [ADDRESS:]PORT, such as 9100 or "
        "127.0.0.1:9100 ([::1]:9100 for IPv6); got '70000'",
        id="port-too-large",
    ),
    pytest.param(
        ["--log-format", "xml"],
        {},
        "",  # argparse's own message: checked below for the exit status only
        id="unknown-log-format-flag",
    ),
    pytest.param(
        [],
        {"DEVICEGATE_LOG_FORMAT": "xml"},
        "invalid configuration: DEVICEGATE_LOG_FORMAT: must be one of text, json, got 'xml'",
        id="unknown-log-format-variable",
    ),
]


@pytest.mark.parametrize(("argv", "environ", "line"), METRICS_REFUSED)
def test_refused_in_one_line(
    secrets_file: Path,
    recorder: Recorder,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    environ: dict[str, str],
    line: str,
) -> None:
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    if line:
        assert cli.main(["serve", *argv]) == 2
        assert one_line(capsys.readouterr().err) == f"devicegate: {line}"
    else:
        with pytest.raises(SystemExit) as info:
            cli.main(["serve", *argv])
        assert info.value.code == 2
    assert (recorder.runs, recorder.listeners) == ([], [])


def test_metrics_on_the_apis_own_port(
    secrets_file: Path, recorder: Recorder, capsys: pytest.CaptureFixture[str], port: int
) -> None:
    assert cli.main(["serve", "--port", str(port), "--metrics", f"{HOST}:{port}"]) == 2
    assert one_line(capsys.readouterr().err) == (
        f"devicegate: --metrics: port {port} is the API's own; give the metrics a port of their own"
    )


def test_metrics_without_the_extra(
    secrets_file: Path,
    recorder: Recorder,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    port: int,
) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    assert cli.main(["serve", "--port", str(port), "--metrics", "9107"]) == 2
    assert one_line(capsys.readouterr().err) == (
        "devicegate: --metrics needs prometheus_client: pip install 'devicegate[metrics]'"
    )


@pytest.mark.parametrize(
    ("given", "address"),
    [
        ("9100", ("127.0.0.1", 9100)),
        (":9100", ("127.0.0.1", 9100)),
        ("10.0.0.5:9100", ("10.0.0.5", 9100)),
        ("[::1]:9100", ("::1", 9100)),
    ],
)
def test_metrics_address(given: str, address: tuple[str, int]) -> None:
    assert cli._metrics_address(given, "--metrics") == address


def test_a_metrics_port_in_use_is_one_line(
    secrets_file: Path, recorder: Recorder, capsys: pytest.CaptureFixture[str], port: int
) -> None:
    with bound_port() as taken:
        assert cli.main(["serve", "--port", str(port), "--metrics", str(taken)]) == 1
    assert one_line(capsys.readouterr().err) == (
        f"devicegate: port {taken} on 127.0.0.1 is already in use (is another server "
        "running?); choose another --metrics"
    )


# -- logs, in process ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "environ", "log_format"),
    [
        ([], {}, "text"),
        (["--log-format", "json"], {}, "json"),
        ([], {"DEVICEGATE_LOG_FORMAT": "JSON"}, "json"),
        (["--log-format", "text"], {"DEVICEGATE_LOG_FORMAT": "json"}, "text"),  # flags win
    ],
)
def test_log_format_reaches_uvicorn(
    secrets_file: Path,
    recorder: Recorder,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    port: int,
    argv: list[str],
    environ: dict[str, str],
    log_format: str,
) -> None:
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    assert cli.main(["serve", "--port", str(port), "--log-level", "warning", *argv]) == 0
    ((_, options),) = recorder.runs
    assert options["log_config"] == log_config("warning", log_format)
    banner = capsys.readouterr().err
    if log_format == "json":
        (line,) = banner.splitlines()  # the banner too is one JSON object
        assert json.loads(line)["message"].startswith("devicegate ")


def test_json_lines_carry_the_audit_facts_and_escape_what_the_client_chose() -> None:
    facts = {"event": "refused", "reason": "expired", "status": 401, "path": "/a\n{fake}"}
    record = logging.LogRecord(
        "devicegate.audit", logging.INFO, __file__, 1, "refused %s", ("x",), None
    )
    record.devicegate = facts
    try:
        raise ValueError("boom")
    except ValueError:
        record.exc_info = sys.exc_info()
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["time"].endswith("Z")
    assert (entry["level"], entry["logger"], entry["message"]) == (
        "INFO",
        "devicegate.audit",
        "refused x",
    )
    assert entry["devicegate"] == facts
    assert entry["exception"].endswith("ValueError: boom")


# -- for real ------------------------------------------------------------------------------------


@pytest.fixture
def running(starts_a_process: None, tmp_path: Path) -> Callable[..., Any]:
    def start(*args: str) -> Any:
        command = devicegate_command("--secrets", "secrets.json", *args)
        return serve(command, tmp_path / "serve.log", cwd=tmp_path, ready=answers("/health"))

    return start


def until_printed(server: Server, needle: str) -> str:
    """The server's output once it holds ``needle`` (bounded wait)."""
    deadline = time.monotonic() + START_SECONDS
    while needle not in (output := server.output()):
        assert time.monotonic() < deadline, f"never printed {needle!r}:\n{output}"
        time.sleep(0.05)
    return output


def test_real_serve_metrics_scraped_with_the_client_parser(
    running: Callable[..., Any], secrets_file: Path, keys: Keys
) -> None:
    metrics_port = free_port()
    expired = make_token(keys.jwt_secret, instance_id=DEVICE, lifetime=-5)
    with running("--metrics", str(metrics_port)) as server, sync_client(server.url) as http:
        for _ in range(3):
            assert http.get("/whoami", headers={"x-api-key": keys.api_key}).status_code == 200
        assert http.get("/whoami").status_code == 401
        assert http.get("/whoami", headers=bearer(expired, DEVICE)).status_code == 401
        minted = http.post("/gen-jwt", headers={"x-api-key": keys.api_key}, json={})
        assert minted.status_code == 200
        # Not on the API's port, with any credential.
        assert http.get("/metrics", headers={"x-api-key": keys.api_key}).status_code == 404
        with sync_client(f"http://{HOST}:{metrics_port}") as scraper:
            scrape = scraper.get("/metrics")
    assert scrape.status_code == 200
    scraped = samples(scrape.text)
    # Three calls, the mint, and the call to /metrics on the API's port.
    assert scraped[requests_total("api_key", "admitted")] == 5
    assert scraped[requests_total("none", "no_credential")] == 1
    assert scraped[requests_total("device_token", "expired")] == 1
    assert scraped[MINTED] == 1


def test_real_serve_logs_one_audit_line_per_refusal(
    running: Callable[..., Any], secrets_file: Path, keys: Keys
) -> None:
    expired = make_token(keys.jwt_secret, instance_id=DEVICE, lifetime=-5)
    with running() as server, sync_client(server.url) as http:
        assert http.get("/orders", headers=bearer(expired, DEVICE)).status_code == 401
        output = until_printed(server, '"GET /orders HTTP/1.1" 401')
    (line,) = [line for line in output.splitlines() if "devicegate refused a request" in line]
    assert line.startswith("INFO:")
    assert "reason=expired status=401 kind=device_token method='GET' path='/orders'" in line
    for secret in (expired, keys.api_key, keys.mobile_api_key, keys.jwt_secret):
        assert secret not in output


def test_real_serve_json_logs(running: Callable[..., Any], secrets_file: Path, keys: Keys) -> None:
    wrong = make_token(keys.jwt_secret + "x", instance_id=DEVICE)
    with running("--log-format", "json") as server, sync_client(server.url) as http:
        assert http.get("/orders", headers=bearer(wrong, DEVICE)).status_code == 401
        assert http.post("/gen-jwt", headers={"x-api-key": keys.api_key}, json={}).is_success
        output = until_printed(server, "POST /gen-jwt")
    entries = [json.loads(line) for line in output.splitlines() if line.strip()]
    for entry in entries:
        assert {"time", "level", "logger", "message"} <= set(entry), entry
    refused = [entry for entry in entries if entry.get("devicegate", {}).get("event") == "refused"]
    (line,) = refused
    assert line["logger"] == "devicegate.audit"
    assert line["level"] == "INFO"
    assert {
        key: line["devicegate"][key] for key in ("reason", "status", "kind", "method", "path")
    } == {
        "reason": "bad_signature",
        "status": 401,
        "kind": "device_token",
        "method": "GET",
        "path": "/orders",
    }
    assert any(entry.get("devicegate", {}).get("event") == "minted" for entry in entries)
    assert any(entry["logger"] == "uvicorn.access" for entry in entries)
    for secret in (wrong, keys.api_key, keys.mobile_api_key, keys.jwt_secret):
        assert secret not in output
