from __future__ import annotations

import os

import pytest

from tests.helpers import Keys, RecordingApp, fresh_keys

# Files the tests write get the modes of the usual umask, whatever the machine's: a secrets file
# that others may write is refused (a umask of 002 would make every such file group-writable).
os.umask(0o022)


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
