"""Running real servers for tests: ports on 127.0.0.1, bounded waits, always stopped.

Every server runs in a session of its own, so that stopping it also stops whatever it started
(``--workers`` processes): nothing outlives its test.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
# Generous: a loaded CI machine can be slow to start Python. Reaching one is a failure.
START_SECONDS = 60.0
STOP_SECONDS = 15.0
IO_SECONDS = 30.0
_POLL_SECONDS = 0.05
_START_ATTEMPTS = 3
_PROXY_VARIABLES = frozenset({"http_proxy", "https_proxy", "all_proxy"})


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def output(self) -> str:
        """Everything the server printed so far (stdout and stderr)."""
        return self.log.read_text(errors="replace")


def free_port() -> int:
    """A port nothing listens on right now (the server started next may still lose a race;
    :func:`serve` then retries on another port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def bound_port(*, reuse_address: bool = False) -> Iterator[int]:
    """A port on 127.0.0.1 held bound, never listening, while the block runs.

    Connecting to it is refused (it stands for a stopped server), and the OS gives it to no one
    else. With ``reuse_address`` the socket sets ``SO_REUSEADDR``, so that a check that binds
    the port the way servers do (``devicegate serve`` before it starts uvicorn) finds it free.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        if reuse_address:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        yield port


@contextlib.contextmanager
def listening_port() -> Iterator[int]:
    """A port on 127.0.0.1 that accepts connections while the block runs, and never answers:
    a port already in use, or an upstream that is up."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        sock.listen()
        port: int = sock.getsockname()[1]
        yield port


def listening(server: Server) -> bool:
    """Whether ``server`` accepts TCP connections."""
    try:
        with socket.create_connection((HOST, server.port), timeout=1.0):
            return True
    except OSError:
        return False


def answers(path: str) -> Callable[[Server], bool]:
    """A readiness check for :func:`serve`: ``GET path`` answers 200."""

    def ready(server: Server) -> bool:
        try:
            with sync_client(server.url) as http:
                return http.get(path, timeout=1.0).status_code == 200
        except httpx.TransportError:
            return False

    return ready


def stop(process: subprocess.Popen[bytes]) -> None:
    """Terminate ``process`` (SIGTERM, then its whole process group gets SIGKILL after a
    bounded wait), reap it, and kill whatever it left behind in its group."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
            _kill_group(process)
            process.wait(timeout=STOP_SECONDS)
    # A server that exited on its own may have left children (workers) in its group.
    _kill_group(process)


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    # The group was created for this process (start_new_session) and is named by its pid.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a child: ours, with the repository importable, no ``DEVICEGATE_*``
    variables and no proxies (a proxy would see requests meant for 127.0.0.1)."""
    env = {
        name: value
        for name, value in os.environ.items()
        if name.lower() not in _PROXY_VARIABLES and not name.startswith("DEVICEGATE_")
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
    cwd: Path = ROOT,
    ready: Callable[[Server], bool] = listening,
) -> Iterator[Server]:
    """Start ``command(port)`` in ``cwd`` and yield once ``ready`` says it serves (by default:
    it accepts connections on ``port``); stop it after.

    Without ``port`` a free one is chosen, and a start that fails (say, the port was taken
    meanwhile) is retried on another one. Output goes to ``log``.
    """
    attempts = 1 if port is not None else _START_ATTEMPTS
    failure = ""
    for _ in range(attempts):
        chosen = port if port is not None else free_port()
        with log.open("wb") as output:
            process = subprocess.Popen(  # noqa: S603 - a fixed command line built by the test
                command(chosen),
                cwd=cwd,
                env=child_env(env),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        server = Server(process, chosen, log)
        try:
            deadline = time.monotonic() + START_SECONDS
            while process.poll() is None and time.monotonic() < deadline:
                if ready(server):
                    break
                time.sleep(_POLL_SECONDS)
            if process.poll() is None and ready(server):
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


def devicegate_command(*args: str) -> Callable[[int], list[str]]:
    """``python -m devicegate serve ARGS`` on 127.0.0.1, as a :func:`serve` command."""

    def build(port: int) -> list[str]:
        return [
            sys.executable,
            "-m",
            "devicegate",
            "serve",
            *args,
            "--host",
            HOST,
            "--port",
            str(port),
        ]

    return build


def async_client(url: str) -> httpx.AsyncClient:
    """An HTTP client for a real server: no proxy from the environment, bounded waits."""
    return httpx.AsyncClient(base_url=url, trust_env=False, timeout=IO_SECONDS)


def sync_client(url: str) -> httpx.Client:
    """The blocking :func:`async_client`."""
    return httpx.Client(base_url=url, trust_env=False, timeout=IO_SECONDS)


async def seen_by(server: Server) -> list[str]:
    """Every request target a test server (``echo.py``, ``app.py``) has received so far."""
    async with async_client(server.url) as http:
        seen: list[str] = (await http.get("/__seen")).json()
    return seen


# -- Linux /proc: memory, children and who holds a connection ------------------------------------


def peak_rss_bytes(pid: int) -> int:
    """The peak resident set size of a process (Linux ``VmHWM``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


def children(pid: int) -> set[int]:
    """The live child processes of ``pid``."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # it exited meanwhile
            continue
        # Field 2, the command name, is in parentheses and may hold spaces: split after it.
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.add(int(entry.name))
    return found


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def connection_owner(server_port: int, client_port: int, candidates: Iterable[int]) -> int | None:
    """Which of the processes ``candidates`` holds the server side of the TCP connection from
    127.0.0.1:``client_port`` to ``server_port`` (``None`` if none of them does)."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, inode = fields[1], fields[2], fields[9]
        if int(local.split(":")[1], 16) == server_port and (
            int(remote.split(":")[1], 16) == client_port
        ):
            inodes.add(f"socket:[{inode}]")
    for pid in candidates:
        with contextlib.suppress(OSError):  # it exited meanwhile
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in inodes:
                        return pid
    return None
