from __future__ import annotations

import pytest

from tests.helpers import Keys, RecordingApp, fresh_keys

# Every async test runs on asyncio and on trio: devicegate uses anyio only.
pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def keys() -> Keys:
    return fresh_keys()


@pytest.fixture
def app() -> RecordingApp:
    return RecordingApp()
