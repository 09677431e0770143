"""The benchmark script still runs and still reports every row (``benchmarks/overhead.py``).

A tiny iteration count, no HTTP: this checks that the script works, never how fast anything
is (timings on a shared CI machine mean nothing).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "overhead.py"

IN_PROCESS_ROWS = [
    "raw ASGI app",
    "raw + devicegate, cached device token",
    "raw + devicegate, API key",
    "raw + devicegate, mobile API key",
    "raw + devicegate, never-seen token (cold)",
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
            "--repeats",
            "1",
            "--requests",
            "30",
            "--slow-requests",
            "5",
            "--cache-entries",
            "300",
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
