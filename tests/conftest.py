from __future__ import annotations

import _posixsubprocess
import os
import subprocess
from collections.abc import Generator
from typing import Any, NoReturn

import pytest

from tests.helpers import Keys, RecordingApp, fresh_keys

# Files the tests write get the modes of the usual umask, whatever the machine's: a secrets file
# that others may write is refused (a umask of 002 would make every such file group-writable).
os.umask(0o022)

# Every way a test can start another process: subprocess.Popen (and so subprocess.run and the
# subprocesses of asyncio and trio) starts each child in _execute_child, multiprocessing calls
# _posixsubprocess.fork_exec itself, and the rest are os functions.
_SPAWNERS: tuple[tuple[Any, str], ...] = (
    (subprocess.Popen, "_execute_child"),
    (_posixsubprocess, "fork_exec"),
    (os, "posix_spawn"),
    (os, "posix_spawnp"),
    (os, "fork"),
    (os, "system"),
)


def _refuse_to_spawn(name: str) -> Any:
    def refuse(*args: object, **kwargs: object) -> NoReturn:
        pytest.fail(
            f"this test starts a process ({name}) but is not marked integration: add "
            "@pytest.mark.integration (or a module-level pytestmark), so that "
            '`pytest -m "not integration"` stays fast and needs no servers',
            pytrace=False,
        )

    return refuse


@pytest.fixture(scope="session")
def starts_a_process() -> None:
    """Asked for by every fixture that starts a real process (a server, a proxy): each test that
    uses such a fixture, however indirectly, is marked ``integration`` at collection."""


@pytest.hookimpl(tryfirst=True)  # before -m deselects by the marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "starts_a_process" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.integration)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None]:
    """Hold every test not marked ``integration`` to its promise: it starts no process, in its
    set-up (fixtures included), its body or its tear-down."""
    if item.get_closest_marker("integration") is not None:
        return (yield)
    with pytest.MonkeyPatch.context() as patch:
        for owner, name in _SPAWNERS:
            if hasattr(owner, name):
                patch.setattr(owner, name, _refuse_to_spawn(f"{owner.__name__}.{name}"))
        return (yield)


# Every async test runs on asyncio and on trio (anyio_mode = "auto" in pyproject): devicegate
# uses anyio only. A module for an asyncio-only framework parametrises anyio_backend itself.
@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def keys() -> Keys:
    return fresh_keys()


@pytest.fixture
def app() -> RecordingApp:
    return RecordingApp()
