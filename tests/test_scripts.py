"""``scripts/serve``: it sets the project up in the repository, then runs devicegate where it was
started from. Run against a copy of the script beside stand-ins for the set-up and the command,
so that nothing is installed and no server starts."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration  # it runs the script with bash

SERVE = Path(__file__).resolve().parents[1] / "scripts" / "serve"


def test_serve_keeps_the_callers_directory_for_relative_paths(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(SERVE, repo / "scripts" / "serve")
    # The set-up stand-in records where it ran; the command stand-in, where it runs and with what.
    (repo / "scripts" / "setup.sh").write_text('ensure_venv() { echo "setup in $(pwd)" >&2; }\n')
    command = repo / ".venv" / "bin" / "devicegate"
    command.parent.mkdir(parents=True)
    command.write_text('#!/usr/bin/env bash\necho "cwd=$(pwd)"; printf "arg=%s\\n" "$@"\n')
    command.chmod(0o755)
    caller = tmp_path / "elsewhere"
    caller.mkdir()

    result = subprocess.run(  # noqa: S603 - a copy of our own script, fixed arguments
        ["bash", str(repo / "scripts" / "serve"), "--secrets", "./mine.json", "--port", "9"],  # noqa: S607
        cwd=caller,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert f"setup in {repo}" in result.stderr
    assert result.stdout.splitlines() == [
        f"cwd={caller}",
        "arg=serve",
        "arg=--secrets",
        "arg=./mine.json",
        "arg=--port",
        "arg=9",
    ]
