"""The benchmark script still runs and still reports every row (``benchmarks/overhead.py``).

Tiny iteration counts and one-second HTTP rounds: these check that the script works, never how
fast anything is (timings on a shared CI machine mean nothing).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from devicegate import _auth

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "overhead.py"

IN_PROCESS_ROWS = [
    "raw ASGI app",
    "raw + devicegate, cached device token",
    "raw + devicegate, API key",
    "raw + devicegate, mobile API key",
    "raw + devicegate, never-seen token (cold)",
    "raw + devicegate, cached device token, a new path every request",
    "raw + devicegate, pure Python, cached device token",
    "raw + devicegate, pure Python, API key",
    "raw + devicegate, pure Python, mobile API key",
    "Starlette hello-world",
    "Starlette + devicegate, cached device token",
    "Starlette + AuthenticationMiddleware + PyJWT",
    "Litestar hello-world",
    "Litestar + JWTAuth",
    "bare jwt.decode (HS256)",
    "token endpoint, POST /gen-jwt through devicegate",
]
TARGET_ROWS = [
    "cached device token ≤ 1.5 µs overhead",
    "cached token ≥ 20x less overhead than Starlette AuthenticationMiddleware + PyJWT",
    "API key ≤ 1 µs overhead",
    "mobile API key ≤ 1 µs overhead",
    "cold path ≤ 1.15x bare jwt.decode",
    "token endpoint ≥ 20,000 tokens/s in-process",
    "a full cache (300 tokens) < 30 MB",
]
HTTP_ROWS = [
    "uvicorn, raw ASGI app",
    "uvicorn, raw ASGI app again (control)",
    "uvicorn, raw + devicegate, cached device token",
    "uvicorn, POST /gen-jwt through devicegate",
]
# Tiny in-process samples: these tests check that the script works, not what it measures.
SMALL = ["--repeats", "1", "--requests", "30", "--slow-requests", "5", "--cache-entries", "300"]


def table_rows(output: str) -> dict[str, list[str]]:
    """Markdown table rows by their first cell."""
    rows: dict[str, list[str]] = {}
    for line in output.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def test_benchmark_reports_every_in_process_row() -> None:
    result = subprocess.run(  # noqa: S603 - our own script, fixed arguments
        [
            sys.executable,
            "-W",
            "error",
            str(SCRIPT),
            "--no-http",
            *SMALL,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    rows = table_rows(result.stdout)
    for name in IN_PROCESS_ROWS:
        assert name in rows, f"missing row {name!r}"
        assert float(rows[name][0]) > 0  # microseconds per request, a number
    for name in TARGET_ROWS:
        assert name in rows, f"missing target {name!r}"
        assert rows[name][-1] in {"yes", "**no**"}
    assert "tokens/s in-process" in result.stdout
    assert "bytes per entry" in result.stdout
    assert "Python " in result.stdout  # the machine is stated
    path = "pure Python" if _auth.EXTENSIONS_DISABLED else "compiled (devicegate._speedups)"
    assert f"fast path: {path}" in result.stdout


@pytest.mark.parametrize("generator", ["wrk", "anyio/httpx"])
def test_benchmark_reports_the_http_rows_with_a_control(generator: str, tmp_path: Path) -> None:
    # Real uvicorn servers on 127.0.0.1 and a load generator in another process: wrk (the test
    # script installs it), or the script's own client when no wrk is on the PATH.
    env = dict(os.environ)
    if generator != "wrk":
        env["PATH"] = str(tmp_path)  # the script needs nothing else from the PATH
    elif not shutil.which("wrk"):
        # Optional for a developer's own pytest run; CI (scripts/test installs it) must run it.
        if os.environ.get("CI"):
            pytest.fail("wrk is not installed (scripts/test installs it)")
        pytest.skip("wrk is not installed; scripts/test installs it")
    result = subprocess.run(  # noqa: S603 - our own script, fixed arguments
        [
            sys.executable,
            "-W",
            "error",
            str(SCRIPT),
            *SMALL,
            "--rounds",
            "2",
            "--seconds",
            "1",
            "--connections",
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert f"Over HTTP ({generator}" in result.stdout
    rows = table_rows(result.stdout)
    for name in HTTP_ROWS:
        assert name in rows, f"missing row {name!r}"
        assert float(rows[name][0].replace(",", "")) > 0  # requests per second
        assert float(rows[name][3]) > 0  # µs per request timed inside the server
    # The control and devicegate rows carry a share of the unprotected server's rate.
    for name in HTTP_ROWS[1:3]:
        assert rows[name][2].endswith("%"), rows[name]
    target = rows["≥ 97 % of the unprotected requests/s over uvicorn"]
    assert "from the time inside uvicorn (" in target[0]
    assert "by requests/s, control " in target[0]
    assert target[-1] in {"yes", "**no**"}
    assert "this run's noise" in result.stdout
    assert "Timed inside uvicorn, devicegate with a cached token adds " in result.stdout
