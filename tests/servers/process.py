"""Running real servers for tests: free ports on 127.0.0.1, bounded waits, always stopped."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
# Generous: a loaded CI machine can be slow to start Python. Reaching it is a failure.
START_SECONDS = 60.0
STOP_SECONDS = 15.0
_POLL_SECONDS = 0.05
_START_ATTEMPTS = 3


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def free_port() -> int:
    """A port nothing listens on right now (the server started next may still lose a race;
    :func:`serve` then retries on another port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _listening(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1.0):
            return True
    except OSError:
        return False


def stop(process: subprocess.Popen[bytes]) -> None:
    """Terminate ``process`` (SIGTERM, then SIGKILL after a bounded wait) and reap it."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=STOP_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=STOP_SECONDS)


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a child: ours, with the repository importable and no proxies."""
    env = {
        name: value
        for name, value in os.environ.items()
        if name.lower() not in ("http_proxy", "https_proxy", "all_proxy")
        and not name.startswith("DEVICEGATE_")
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


@contextlib.contextmanager
def serve(
    command: Callable[[int], list[str]],
    log: Path,
    *,
    env: Mapping[str, str] | None = None,
    port: int | None = None,
) -> Iterator[Server]:
    """Start ``command(port)`` and yield once it accepts connections on ``port``; stop it after.

    Without ``port`` a free one is chosen, and a start that fails (say, the port was taken
    meanwhile) is retried on another one.
    """
    attempts = 1 if port is not None else _START_ATTEMPTS
    failure = ""
    for _ in range(attempts):
        chosen = port if port is not None else free_port()
        with log.open("wb") as output:
            process = subprocess.Popen(  # noqa: S603 - a fixed command line built by the test
                command(chosen),
                cwd=ROOT,
                env=child_env(env),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        server = Server(process, chosen, log)
        try:
            deadline = time.monotonic() + START_SECONDS
            while process.poll() is None and time.monotonic() < deadline:
                if _listening(chosen):
                    break
                time.sleep(_POLL_SECONDS)
            if process.poll() is None and _listening(chosen):
                yield server
                return
            failure = server.output()
        finally:
            stop(process)
    raise RuntimeError(f"server did not start: {command(0)!r}\n{failure}")


def uvicorn_command(app: str, *options: str) -> Callable[[int], list[str]]:
    """``python -m uvicorn APP`` on 127.0.0.1 with the h11 protocol, as a :func:`serve`
    command."""

    def build(port: int) -> list[str]:
        return [
            sys.executable,
            "-m",
            "uvicorn",
            app,
            "--host",
            HOST,
            "--port",
            str(port),
            "--http",
            "h11",
            "--no-access-log",
            "--log-level",
            "warning",
            *options,
        ]

    return build


def peak_rss_bytes(pid: int) -> int:
    """The peak resident set size of a process (Linux ``VmHWM``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for process {pid}")
