"""A real redis-server for tests: 127.0.0.1, a free port, no persistence, always stopped.

Without persistence (``--save '' --appendonly no``) a restart comes back empty: what a Redis
without a disk, or a failover to an empty replica, looks like to devicegate.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.servers.process import HOST, START_SECONDS, free_port, stop

_INSTALL = "apt-get install redis-server (scripts/test does it)"


class RedisServer:
    """One redis-server process that a test may stop, pause, kill and start again on the same
    port."""

    def __init__(self, directory: Path) -> None:
        executable = shutil.which("redis-server")
        if executable is None:
            pytest.fail(f"the Redis tests need redis-server: {_INSTALL}", pytrace=False)
        self.executable = executable
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}"

    def start(self) -> None:
        """Start the server, empty, and return once it answers PING."""
        self.starts += 1
        log = self.directory / f"redis-{self.starts}.log"
        with log.open("wb") as output:
            self.process = subprocess.Popen(  # noqa: S603 - a fixed command line
                [
                    self.executable,
                    *("--port", str(self.port), "--bind", HOST),
                    *("--save", "", "--appendonly", "no"),
                    *("--dir", str(self.directory)),
                ],
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline and self.process.poll() is None:
            if self._answers():
                return
            time.sleep(0.02)
        raise RuntimeError(f"redis-server did not start:\n{log.read_text(errors='replace')}")

    def _answers(self) -> bool:
        try:
            with socket.create_connection((HOST, self.port), timeout=1.0) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL), whatever state it is in."""
        if self.process is not None:
            self.resume()
            stop(self.process)
            self.process = None

    def kill(self) -> None:
        """SIGKILL: a crash, with no chance to answer or close anything."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=START_SECONDS)
            self.process = None

    def pause(self) -> None:
        """SIGSTOP: connections stay open and nothing answers (a hung server)."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGCONT)

    def restart(self) -> None:
        """Stop and start again on the same port: empty."""
        self.stop()
        self.start()

    def client(self) -> redis.Redis:
        """A client for the test itself (tools writing to Redis, CLIENT KILL, inspection)."""
        return redis.Redis(host=HOST, port=self.port, socket_timeout=5.0)


@contextlib.contextmanager
def redis_server(directory: Path) -> Iterator[RedisServer]:
    server = RedisServer(directory)
    server.start()
    try:
        yield server
    finally:
        server.stop()
