"""The benchmark script still runs and reports every row (``benchmarks/overhead.py --quick``).

These check that the script works and that its figures are of the right kinds, never how fast
anything is: timings on a shared CI machine mean nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "overhead.py"

REDIS_ROW = "raw + devicegate, cached device token, 100,000 revocations in a Redis replica"
# Every in-process row, and the row its overhead is measured against (None: no overhead).
IN_PROCESS = {
    "raw ASGI app": None,
    "raw + devicegate, cached device token": "raw ASGI app",
    "raw + devicegate, API key": "raw ASGI app",
    "raw + devicegate, mobile API key": "raw ASGI app",
    "raw + devicegate, never-seen token (full verification)": "raw ASGI app",
    "raw + devicegate, cached device token, a new path every request": "raw ASGI app",
    "raw + devicegate, cached device token, 100,000 revocations": (
        "raw + devicegate, cached device token"
    ),
    "raw + devicegate, cached device token, metrics on": "raw + devicegate, cached device token",
    # Present where redis-server is installed (scripts/test installs it).
    REDIS_ROW: "raw + devicegate, cached device token, 100,000 revocations",
    "Starlette hello-world": None,
    "Starlette + devicegate, cached device token": "Starlette hello-world",
    "Starlette + AuthenticationMiddleware + PyJWT": "Starlette hello-world",
    "Litestar hello-world": None,
    "Litestar + JWTAuth": "Litestar hello-world",
    "bare jwt.decode (HS256)": None,
    "TokenIssuer.issue": None,
    "token endpoint, POST /gen-jwt through devicegate": None,
    "bare cryptography P-256 ECDSA verify of a DPoP proof": None,
    "raw + devicegate, DPoP request (cached ES256-proven token, a new proof)": (
        "bare cryptography P-256 ECDSA verify of a DPoP proof"
    ),
    **{
        row: baseline
        for algorithm, check in (("EdDSA", "Ed25519"), ("ES256", "P-256 ECDSA"))
        for row, baseline in {
            f"bare cryptography {check} verify ({algorithm})": None,
            f"TokenVerifier.verify, never-seen {algorithm} token": (
                f"bare cryptography {check} verify ({algorithm})"
            ),
            f"raw + devicegate, never-seen {algorithm} token (full verification)": (
                f"bare cryptography {check} verify ({algorithm})"
            ),
            f"raw + devicegate, cached {algorithm} device token": (
                "raw + devicegate, cached device token"
            ),
            f"TokenIssuer.issue, {algorithm}": None,
        }.items()
    },
}
HTTP = {
    "uvicorn, raw ASGI app": None,
    "uvicorn, raw ASGI app again (control)": "uvicorn, raw ASGI app",
    "uvicorn, raw + devicegate, cached device token": "uvicorn, raw ASGI app",
    "uvicorn, POST /gen-jwt": None,
}


@pytest.fixture(scope="module")
def run(
    starts_a_process: None, tmp_path_factory: pytest.TempPathFactory
) -> tuple[dict[str, Any], str]:
    """One quick run: its JSON figures and its Markdown output."""
    for tool in ("wrk", "redis-server"):
        if not shutil.which(tool) and os.environ.get("CI"):
            pytest.fail(f"{tool} is not installed (scripts/test installs it)")
    figures = tmp_path_factory.mktemp("bench") / "figures.json"
    output = run_script("--quick", "--json", str(figures), timeout=300)
    return json.loads(figures.read_text()), output


def run_script(*arguments: str, timeout: float) -> str:
    """What the script prints, run with ``arguments``; it must exit 0 and warn of nothing."""
    result = subprocess.run(  # noqa: S603 - our own script, fixed arguments
        [sys.executable, "-W", "error", str(SCRIPT), *arguments],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout


def test_every_in_process_row_has_a_time_and_each_paired_one_an_overhead(
    run: tuple[dict[str, Any], str],
) -> None:
    figures, output = run
    rows = {row["row"]: row for row in figures["in process"]}
    expected = dict(IN_PROCESS)
    if not shutil.which("redis-server"):
        del expected[
            "raw + devicegate, cached device token, 100,000 revocations in a Redis replica"
        ]
    assert {name: row["baseline"] for name, row in rows.items()} == expected
    for name, row in rows.items():
        assert row["µs / request"] > 0
        assert f"| {name} | " in output
        if row["baseline"] is None:
            assert row["overhead (µs)"] is None
        else:
            low, high = row["its quartiles (µs)"]
            assert low <= row["overhead (µs)"] <= high
    assert figures["tokens / s"] > 0
    assert figures["cache"]["entries"] == 10_000  # the default cache size, full
    assert figures["cache"]["bytes"] > 0


def test_every_http_row_has_a_rate_and_a_time_inside_the_server(
    run: tuple[dict[str, Any], str],
) -> None:
    figures, output = run
    if figures["over HTTP"] is None:
        pytest.skip("wrk is not installed; scripts/test installs it")
    rows = {row["row"]: row for row in figures["over HTTP"]}
    assert {name: row["baseline"] for name, row in rows.items()} == HTTP
    for row in rows.values():
        assert row["requests / s"] > 0
        assert row["p99 (ms)"] > 0
        assert row["µs inside uvicorn"] > 0
        paired = row["µs inside, over it"], row["% of its requests/s by time inside"]
        assert (None in paired) == (row["baseline"] is None)
    assert "| uvicorn, raw ASGI app again (control) | " in output


def test_the_machine_and_every_target_are_stated(run: tuple[dict[str, Any], str]) -> None:
    figures, output = run
    assert figures["machine"]["python"].startswith("CPython ")
    assert "starlette " in figures["machine"]["packages"]
    # Seven in process (eight with the Redis replica), two per asymmetric algorithm, DPoP and
    # the EdDSA minting rate; one over HTTP.
    expected = 13 + bool(shutil.which("redis-server")) + (1 if figures["over HTTP"] else 0)
    assert len(figures["targets"]) == expected
    for target in figures["targets"]:
        assert isinstance(target["met"], bool)
        assert f"| {target['target']} | {target['measured']} | " in output


def test_instruction_counts_of_a_cached_token_over_the_raw_app(
    starts_a_process: None, tmp_path: Path
) -> None:
    # Counts, not timings: deterministic, yet never held to a number here either.
    if not shutil.which("valgrind"):
        if os.environ.get("CI"):
            pytest.fail("valgrind is not installed (scripts/test installs it)")
        pytest.skip("valgrind is not installed; scripts/test installs it")
    figures = tmp_path / "counts.json"
    output = run_script("--instructions", "cached", "--json", str(figures), timeout=600)
    raw, cached = json.loads(figures.read_text())["instructions"]  # raw first: the baseline
    assert raw["row"] == "raw ASGI app"
    assert raw["over the raw app"] is None
    assert cached["row"] == "raw + devicegate, cached device token"
    # devicegate does work on every request: authentication is never free.
    assert 0 < raw["instructions / request"] < cached["instructions / request"]
    over = cached["instructions / request"] - raw["instructions / request"]
    assert cached["over the raw app"] == over
    assert f"| raw + devicegate, cached device token | {cached['instructions / request']:,} | " in (
        output
    )
